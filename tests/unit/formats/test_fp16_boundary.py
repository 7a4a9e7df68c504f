"""The edge of fp16's range, for every source dtype (fp32, bf16, fp16) against every stored dtype (fp16, bf16).

Law: `nonfinite_error` refuses a finite source value exactly when storing it in the stored dtype makes it inf, and
an export never writes an inf that the source did not hold. fp16's largest finite value is 65504; 65520 is the
midpoint to the next power of two and rounds (to even) to inf; bf16 holds 65280 and 65536 around 65504 (a spacing
of 256 there), so bf16(65504) is 65536, which is past fp16's range.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from qexport.cli.main import main
from qexport.formats.base import nonfinite_error
from tests.support import write_folder

BF16_BELOW = 65280.0  # the largest bf16 value below 65504
BF16_ABOVE = 65536.0  # the smallest bf16 value above 65504

# (value as written in the source dtype, source dtype) -> the value the source actually holds
SOURCE_VALUE = {
    (65504.0, torch.float32): 65504.0, (65520.0, torch.float32): 65520.0, (65536.0, torch.float32): 65536.0,
    (BF16_BELOW, torch.float32): BF16_BELOW,
    (65504.0, torch.bfloat16): 65536.0, (65520.0, torch.bfloat16): 65536.0, (65536.0, torch.bfloat16): 65536.0,
    (BF16_BELOW, torch.bfloat16): BF16_BELOW,
    (65504.0, torch.float16): 65504.0, (65520.0, torch.float16): float("inf"), (65536.0, torch.float16): float("inf"),
    (BF16_BELOW, torch.float16): BF16_BELOW,
}
# whether the held value is refused when stored as fp16 (bf16's range holds all of them)
REFUSED_AS_FP16 = {65504.0: False, BF16_BELOW: False, 65520.0: True, 65536.0: True}

CASES = [(value, src, stored, sign) for (value, src) in SOURCE_VALUE
         for stored in (torch.float16, torch.bfloat16) for sign in (1.0, -1.0)]


def case_id(case):
    value, src, stored, sign = case
    return f"{'-' if sign < 0 else ''}{value:g}-{str(src)[6:]}-as-{str(stored)[6:]}"


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_a_value_at_fp16s_edge_is_refused_exactly_when_storing_it_makes_inf(case):
    value, src, stored, sign = case
    w = torch.tensor([1.0, sign * value]).to(src)
    held = SOURCE_VALUE[(value, src)]
    assert w[1].item() == sign * held  # the table says what the source dtype holds
    error = nonfinite_error("t", w, allow_nonfinite=False, dtype=stored)
    if held == float("inf"):  # already inf in the source: NaN / Inf, allowed only on request
        assert "holds NaN or Inf" in str(error)
        assert nonfinite_error("t", w, allow_nonfinite=True, dtype=stored) is None
    elif stored == torch.float16 and REFUSED_AS_FP16[held]:
        assert "overflows fp16 (max 65504)" in str(error) and f"value {held:.6g}" in str(error)
    else:
        assert error is None


@pytest.mark.parametrize("src", [torch.float32, torch.bfloat16])
def test_a_source_value_between_65504_and_the_midpoint_rounds_into_fp16_and_is_kept(src):
    w = torch.tensor([65519.0, -65519.0, 65504.0]).to(src)  # bf16 holds 65536 here: refused below
    error = nonfinite_error("t", w, allow_nonfinite=False, dtype=torch.float16)
    assert (error is None) == (src == torch.float32)


def test_the_largest_fp32_value_overflows_bf16_and_bf16s_largest_does_not():
    fp32_max = torch.tensor([torch.finfo(torch.float32).max])
    assert "overflows bf16" in str(nonfinite_error("t", fp32_max, allow_nonfinite=False, dtype=torch.bfloat16))
    bf16_max = torch.tensor([torch.finfo(torch.bfloat16).max], dtype=torch.bfloat16)
    assert nonfinite_error("t", bf16_max, allow_nonfinite=False, dtype=torch.bfloat16) is None


@pytest.mark.parametrize("value", [BF16_BELOW, 65504.0, -65536.0])  # bf16(65504) is 65536
def test_an_fp16_export_of_a_bf16_source_never_writes_an_inf_the_source_lacks(tmp_path, capsys, value):
    """A dense bf16 tensor (a norm) next to a Linear: exit 2 naming the tensor, or a finite fp16 copy."""
    from qexport.model.tiny import build_tiny_model

    src = build_tiny_model(tmp_path / "src", "qwen3", dtype="bfloat16",
                           overrides=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                                          num_attention_heads=2, num_key_value_heads=1, vocab_size=256))
    tensors = load_file(str(src / "model.safetensors"))
    norm = "model.norm.weight"
    tensors[norm] = tensors[norm].clone()
    tensors[norm][0] = value
    write_folder(src, tensors)
    code = main(["export", str(src), "--out", str(tmp_path / "out"), "--formats", "fp16", "--quiet"])
    err = capsys.readouterr().err
    if abs(torch.tensor(value).to(torch.bfloat16).item()) > 65504:
        assert code == 2 and norm in err and "overflows fp16" in err
        assert not (tmp_path / "out" / "fp16").exists()
    else:
        assert code == 0, err
        stored = load_file(str(tmp_path / "out" / "fp16" / "model.safetensors"))
        assert all(torch.isfinite(t.float()).all() for t in stored.values())
        assert json.loads((tmp_path / "out" / "fp16" / "config.json").read_text())
