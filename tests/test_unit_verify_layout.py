"""verify's checks of the stored files (qexport/verify/layout_checks.py: shards, manifest, tensor_names, layout,
bytes) called directly on hand-written folders: a few tensors, a manifest and a config in tmp_path, no model built
or exported. design.md: a quantized Linear stores weight_packed I32 [out, in*bits/32], weight_scale [out, 1] or
[out, in/group] and weight_shape I64 [2]; every reference tensor is stored once (tied ones once); bytes are
accounted: stored equals predicted per tensor and per file."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from qexport.verify.layout_checks import check_manifest, check_shards
from tests.unit_verify import (DOWN, NORM, UP, config_with, context, int4_module, manifest_of, qc, reference_weights,
                               write_folder, write_manifest)


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("ref") / "ref", reference_weights())


def int4_tensors(group_size: int = 16) -> dict[str, torch.Tensor]:
    w = reference_weights()
    tensors = {NORM: w[NORM].half()}
    for module in (DOWN, UP):
        tensors |= int4_module(module, w[f"{module}.weight"], group_size)[0]
    return tensors


def int4_export(tmp_path, tensors=None, config=None, manifest=True):
    folder = write_folder(tmp_path / "int4", int4_tensors() if tensors is None else tensors,
                          config_with(quantization_config=qc()) if config is None else config)
    return write_manifest(folder) if manifest else folder


# ---------------------------------------------------------------------------------------------------------------
# shards


def test_a_single_file_export_passes_shards_naming_its_file(tmp_path, ref):
    result = check_shards(context(int4_export(tmp_path), ref))
    assert result.passed and result.detail == "1 file(s), 7 tensors; single file"
    assert result.metrics == {"files": ["model.safetensors"]}


def test_unreadable_shards_fail_shards_with_the_reason(tmp_path, ref):
    folder = int4_export(tmp_path, manifest=False)
    (folder / "model.safetensors").write_bytes(b"\x00" * 4)
    result = check_shards(context(folder, ref))
    assert not result.passed and "model.safetensors" in result.detail


# ---------------------------------------------------------------------------------------------------------------
# manifest


def test_files_matching_the_manifest_pass_counting_them(tmp_path, ref):
    result = check_manifest(context(int4_export(tmp_path), ref))
    assert result.passed and result.detail == "1 files match their recorded size and sha256"
    assert result.metrics == {"files_checked": 1}


def test_no_manifest_skips_saying_hashes_are_not_checked(tmp_path, ref):
    result = check_manifest(context(int4_export(tmp_path, manifest=False), ref))
    assert result.skipped and result.detail == "no qexport.json (not written by qexport): file hashes not checked"
