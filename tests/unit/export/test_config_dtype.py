"""config.json's dtype has one reading (qexport.io.checkpoint.declared_dtype) shared by export, verify, card, engines."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from qexport.io.checkpoint import declared_dtype
from qexport.export.pipeline import compute_dtype_of
from qexport.verify.functional import config_dtype
from qexport.verify.engine_checks import engine_dtype


@pytest.mark.parametrize("config, expected", [
    ({"dtype": "bfloat16"}, "bfloat16"),
    ({"torch_dtype": "float16"}, "float16"),           # older writers
    ({"torch_dtype": "torch.float32"}, "float32"),     # some writers keep torch's repr
    ({"dtype": "bfloat16", "torch_dtype": "float16"}, "bfloat16"),  # transformers 5 reads `dtype` first
    ({"dtype": "auto"}, None),
    ({"dtype": "int8"}, None),                          # not a floating dtype: transformers would not load in it
    ({"dtype": 16}, None),
    ({}, None),
    (None, None),
])
def test_declared_dtype_names_only_floating_dtypes(config, expected):
    assert declared_dtype(config) == expected


def test_an_undeclared_dtype_loads_in_float32_everywhere_we_say_so():
    # transformers' from_pretrained without dtype= loads in float32; verify and the card must say the same.
    assert config_dtype({}) is torch.float32
    assert config_dtype({"dtype": "auto"}) is torch.float32


def test_vllm_runs_float32_and_undeclared_folders_in_float16():
    # vLLM CPU's int4 kernel (CPUWNA16) runs fp16/bf16 only.
    assert engine_dtype({"dtype": "float32"}) == engine_dtype({}) == "float16"
    assert engine_dtype({"torch_dtype": "bfloat16"}) == "bfloat16"


def _source(config: dict, weight_dtype: str):
    return SimpleNamespace(config=config, entries={"w": SimpleNamespace(dtype=weight_dtype)})


def test_compute_dtype_follows_the_declared_dtype_then_the_stored_weights():
    assert compute_dtype_of(_source({"dtype": "bfloat16"}, "F32"), ["w"]) == "bfloat16"
    assert compute_dtype_of(_source({"dtype": "float32"}, "BF16"), ["w"]) == "float16"
    assert compute_dtype_of(_source({"dtype": "auto"}, "BF16"), ["w"]) == "bfloat16"
    assert compute_dtype_of(_source({}, "F16"), ["w"]) == "float16"
