"""Laws of the quantization primitives (qexport/quant/primitives.py), over generated shapes, dtypes and value distributions.

Tensors are drawn from a seeded torch generator whose seed, shape, dtype and distribution hypothesis chooses, so
failures shrink to a small reproducible case. Profiles (conftest.py): `ci` derandomized, `deep` 2000 examples
(HYPOTHESIS_PROFILE=deep pytest tests/unit/quant/test_round_trip_laws.py).

fp16 slack in the half-step bound: the division w / scale happens in fp16 (as in compressed-tensors), and the
scale itself is absmax / 7.5 (or / 127.5) rounded to fp16 (relative error <= 2^-11). Near the top of the range
that rounding can push the largest element past qmax + 0.5 before clamping, and the fp16 quotient is rounded to
the fp16 grid (spacing 1/16 between 64 and 128). docs/design.md measured up to ~0.52 step for int4 and ~0.63 step for
int8; the bounds below are those. They hold while scales are normal fp16 numbers (>= 2^-14); the "tiny"
distribution is chosen to stay there (a subnormal scale has fewer significant bits and a looser bound).
"""

from __future__ import annotations

import shutil

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from qexport.quant import primitives as quant
from qexport.quant.dequant import dequantize_module
from qexport.errors import InputError
from qexport.formats import get_format

STEP_BOUND = {4: 0.52, 8: 0.63}  # docs/design.md, measured with fp16 scales; see the module docstring
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DISTRIBUTIONS = ["normal", "heavy_tailed", "outlier_rows", "zero_rows", "tiny", "huge"]


def make_weight(seed: int, rows: int, cols: int, dtype: torch.dtype, distribution: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen) * 0.02
    if distribution == "heavy_tailed":  # Student-t with 2 degrees of freedom: occasional values 100x the std
        chi2 = torch.randn(rows, cols, 2, generator=gen).pow(2).sum(-1)
        w = torch.randn(rows, cols, generator=gen) / (chi2 / 2).sqrt() * 0.02
    elif distribution == "outlier_rows":
        w[torch.randint(0, rows, (max(1, rows // 3),), generator=gen)] *= 300
    elif distribution == "zero_rows":
        w[torch.randint(0, rows, (max(1, rows // 2),), generator=gen)] = 0
    elif distribution == "tiny":
        w = w * 0.25  # absmax ~0.02: scales ~1.6e-4 (int8) and ~3e-3 (int4), still normal fp16
    elif distribution == "huge":
        w = (w * 1e5).clamp(-6e4, 6e4)  # values in the thousands, within fp16's 65504
    return w.to(dtype)


@st.composite
def weights(draw, num_bits: int):
    group = 128 if num_bits == 4 else None
    rows = draw(st.integers(1, 12))
    cols = 128 * draw(st.integers(1, 3)) if group else draw(st.integers(1, 300))
    w = make_weight(draw(st.integers(0, 2**31 - 1)), rows, cols, draw(st.sampled_from(DTYPES)),
                    draw(st.sampled_from(DISTRIBUTIONS)))
    return w, group


def encode(w: torch.Tensor, num_bits: int, group: int | None):
    w16 = w.to(torch.float16)  # what the formats quantize: the fp16 cast of the source (formats/base.py)
    scales = quant.compute_scales(w16, num_bits, group)
    return w16, scales, quant.quantize(w16, scales, num_bits, group)


FP16_MIN_NORMAL = 2.0**-14


def step_error(w16, scales, q) -> float:
    """max |w / scale - q| in exact (float64) arithmetic, in units of each element's own scale, over elements
    whose scale is a normal fp16 number (the bound's premise; see the module docstring)."""
    scale = scales.double().repeat_interleave(w16.shape[1] // scales.shape[1], dim=1)
    normal = scale >= FP16_MIN_NORMAL
    return (w16.double() / scale - q.double()).abs()[normal].max().item() if normal.any() else 0.0


@pytest.mark.parametrize("num_bits", [4, 8])
@given(data=st.data())
def test_element_error_is_within_half_a_step_plus_fp16_slack(num_bits, data):
    w, group = data.draw(weights(num_bits))
    w16, scales, q = encode(w, num_bits, group)
    assert step_error(w16, scales, q) <= STEP_BOUND[num_bits]


@pytest.mark.slow
@pytest.mark.parametrize("num_bits", [4, 8])
@settings(max_examples=1500)
@given(data=st.data())
def test_element_error_bound_holds_over_many_examples(num_bits, data):
    # The same law as above with 25x the CI examples, whatever the active profile (the slow tier's deep pass).
    w, group = data.draw(weights(num_bits))
    w16, scales, q = encode(w, num_bits, group)
    assert step_error(w16, scales, q) <= STEP_BOUND[num_bits]


@given(data=st.data())
def test_int4_format_encode_dequantizes_within_the_bound(data):
    # The whole int4 encode path (scales, quantize, pack) read back by the independent dequantizer.
    w, _ = data.draw(weights(4))
    stored = get_format("int4").encode("m.weight", w, quantize=True)
    tensors = {k.removeprefix("m."): v for k, v in stored.items()}
    w_hat = dequantize_module(tensors, 4, torch.float64)
    scale = tensors["weight_scale"].double().repeat_interleave(128, dim=1)
    error = ((w.to(torch.float16).double() - w_hat) / scale).abs()
    assert error[scale >= FP16_MIN_NORMAL].max().item() <= STEP_BOUND[4]


def test_pack_unpack_is_identity_for_every_int4_value_at_every_position():
    # Row r, position j holds ((r + j) mod 16) - 8: across the 16 rows every position takes every value.
    q = ((torch.arange(16)[:, None] + torch.arange(8)[None, :]) % 16 - 8).to(torch.int8)
    assert all(set(q[:, j].tolist()) == set(range(-8, 8)) for j in range(8))
    assert torch.equal(quant.unpack_int4(quant.pack_int4(q), 8), q)


@given(seed=st.integers(0, 2**31 - 1), rows=st.integers(1, 16), words=st.integers(1, 40))
def test_pack_unpack_is_identity_on_random_codes(seed, rows, words):
    q = torch.randint(-8, 8, (rows, words * 8), generator=torch.Generator().manual_seed(seed), dtype=torch.int8)
    assert torch.equal(quant.unpack_int4(quant.pack_int4(q), words * 8), q)


@pytest.mark.parametrize("num_bits", [4, 8])
@given(data=st.data())
def test_quantize_of_dequantize_returns_the_codes(num_bits, data):
    w, group = data.draw(weights(num_bits))
    _, scales, q = encode(w, num_bits, group)
    assert torch.equal(quant.quantize(quant.dequantize(q, scales, group), scales, num_bits, group), q)


@pytest.mark.parametrize("num_bits", [4, 8])
@given(data=st.data())
def test_negating_weights_negates_codes_away_from_the_clamp_edge(num_bits, data):
    w, group = data.draw(weights(num_bits))
    w16, scales, q = encode(w, num_bits, group)
    q_neg = quant.quantize(-w16, scales, num_bits, group)
    _, qmax = quant.qrange(num_bits)
    inside = q.to(torch.int16).abs() < qmax  # -absmax lands on qmin = -(qmax + 1), which +absmax cannot reach
    assert torch.equal(q_neg[inside], -q[inside])


@pytest.mark.parametrize("num_bits,group", [(4, 128), (8, None)])
@given(rows=st.integers(1, 8), zero_row=st.integers(0, 7), seed=st.integers(0, 2**31 - 1))
def test_zero_groups_give_zero_output_and_no_nan(num_bits, group, rows, zero_row, seed):
    w = make_weight(seed, rows, 256, torch.float32, "normal")
    w[zero_row % rows] = 0
    w16, scales, q = encode(w, num_bits, group)
    w_hat = quant.dequantize(q, scales, group)
    assert torch.isfinite(scales).all() and (scales > 0).all()
    assert torch.isfinite(w_hat).all()
    assert not q[zero_row % rows].any() and not w_hat[zero_row % rows].any()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_export_refuses_non_finite_weights_naming_the_tensor(tmp_path, qwen3_src, bad):
    from qexport.export.pipeline import ExportOptions, export_folder

    src = tmp_path / "src"
    shutil.copytree(qwen3_src, src)
    tensors = load_file(src / "model.safetensors")
    name = "model.layers.1.self_attn.o_proj.weight"
    tensors[name][3, 17] = bad
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(InputError, match=r"model\.layers\.1\.self_attn\.o_proj\.weight.*(NaN|Inf)"):
        export_folder(src, tmp_path / "out", ExportOptions(formats=("int4",), progress=False))
    assert not (tmp_path / "out" / "int4").exists()
