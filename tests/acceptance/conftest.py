"""Fixtures the acceptance tests share: the mini model (hidden 128, 2 layers: an export takes a second) and its
int4 export, built once per module, and a private copy of that export per test."""

from __future__ import annotations

import shutil

import pytest

from tests.acceptance.test_hostile_inputs import MINI


@pytest.fixture(scope="module")
def mini(build_model):
    return build_model("qwen3", **MINI)


@pytest.fixture(scope="module")
def int4_export(mini, export_model):
    out, _ = export_model(mini, formats=("int4",))
    return out / "int4"


@pytest.fixture
def int4_copy(int4_export, tmp_path):
    """A copy of the mini int4 export that a test may change."""
    folder = tmp_path / "int4"
    shutil.copytree(int4_export, folder)
    return folder
