"""Activation-ordered groups (`weight_g_idx`, GPTQ actorder="group", written by llm-compressor): our dequantization
reads them as compressed-tensors 0.17 / vLLM do, so verify measures such a foreign export's real weights."""

from __future__ import annotations

import pytest
import torch

from qexport.quant import primitives as quant
from qexport.quant.dequant import dequantize_module

GROUP = 32


def _module(w: torch.Tensor, asymmetric: bool) -> dict[str, torch.Tensor]:
    """Column-order int4 tensors of w, as our formats store them."""
    if asymmetric:
        scales, zp = quant.compute_asymmetric_qparams(w, 4, GROUP, dtype=torch.float32)
        q = quant.quantize_asymmetric(w, scales, zp, 4, GROUP)
        return {"weight_packed": quant.pack_int4(q), "weight_scale": scales, "weight_zero_point": zp,
                "weight_shape": torch.tensor(w.shape)}
    scales = quant.compute_scales(w, 4, GROUP, dtype=torch.float32)
    q = quant.quantize(w, scales, 4, GROUP)
    return {"weight_packed": quant.pack_int4(q), "weight_scale": scales, "weight_shape": torch.tensor(w.shape)}


@pytest.mark.parametrize("asymmetric", [False, True])
def test_identity_group_index_changes_nothing(asymmetric):
    tensors = _module(torch.randn(16, 128), asymmetric)
    plain = dequantize_module(tensors, 4)
    g_idx = torch.arange(128, dtype=torch.int32) // GROUP
    assert torch.equal(dequantize_module({**tensors, "weight_g_idx": g_idx}, 4), plain)


@pytest.mark.parametrize("asymmetric", [False, True])
def test_permuted_columns_with_their_group_index_dequantize_to_the_permuted_weight(asymmetric):
    # Store the columns in a shuffled order with g_idx saying which group each came from: the dense weight read
    # back is the column-order weight with its columns shuffled the same way.
    torch.manual_seed(0)
    tensors = _module(torch.randn(16, 128), asymmetric)
    dense = dequantize_module(tensors, 4)
    perm = torch.randperm(128)
    q = quant.unpack_int4(tensors["weight_packed"], 128)[:, perm]
    g_idx = (torch.arange(128) // GROUP)[perm].to(torch.int32)
    shuffled = {**tensors, "weight_packed": quant.pack_int4(q), "weight_g_idx": g_idx}
    assert torch.equal(dequantize_module(shuffled, 4), dense[:, perm])


def test_uninitialised_group_index_means_column_order():
    tensors = _module(torch.randn(8, 64), False)
    unset = torch.full((64,), -1, dtype=torch.int32)
    assert torch.equal(dequantize_module({**tensors, "weight_g_idx": unset}, 4), dequantize_module(tensors, 4))


@pytest.mark.parametrize("g_idx", [torch.zeros(63, dtype=torch.int32), torch.full((64,), 2, dtype=torch.int32)])
def test_group_index_that_does_not_fit_the_weight_is_refused(g_idx):
    tensors = _module(torch.randn(8, 64), False)
    with pytest.raises(ValueError, match="weight_g_idx"):
        dequantize_module({**tensors, "weight_g_idx": g_idx}, 4)
