"""verify in bounded memory: models streamed in one tensor at a time, logits kept one window at a time on disk,
SQNR of a large tensor in slices -- each giving the same numbers as the whole-model / whole-tensor way.

The memory itself is measured on bench's 1B checkpoint (bench/bench_verify.py, bench/VERIFY.md), not here.
"""

from __future__ import annotations

import pytest
import torch

from qexport.verify import functional as F
from qexport.io.checkpoint import load_config
from qexport.verify.functional import LogitWindows, compare, load_model, load_streamed, model_outputs, perplexity


@pytest.fixture(scope="module")
def ids(qwen3_src):
    return F.fixed_token_ids(int(load_config(qwen3_src)["vocab_size"]), batch=2, length=16)


@pytest.mark.parametrize("preset", ["qwen3", "qwen3-tied", "llama"])
def test_reference_loaded_tensor_by_tensor_gives_transformers_logits_bit_for_bit(build_model, preset):
    src = build_model(preset)
    ids = F.fixed_token_ids(int(load_config(src)["vocab_size"]), batch=2, length=16)
    theirs, _ = load_model(src)
    ours = load_streamed(src)
    assert torch.equal(model_outputs(theirs, ids), model_outputs(ours, ids))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streamed_load_keeps_the_checkpoint_weights_in_the_asked_dtype(qwen3_src, dtype):
    from qexport.io.checkpoint import Checkpoint

    model = load_streamed(qwen3_src, dtype)
    ckpt = Checkpoint.open(qwen3_src)
    state = model.state_dict()
    for name in ckpt.names:
        assert state[name].dtype == dtype
        assert torch.equal(state[name], ckpt.read(name).to(dtype)), name


def test_strict_stream_refuses_names_the_model_does_not_have(qwen3_src):
    from qexport.io.checkpoint import Checkpoint

    ckpt = Checkpoint.open(qwen3_src)

    def renamed():  # what a checkpoint whose names transformers maps while loading looks like to us
        for name in ckpt.names:
            yield name.replace("model.", "transformer.", 1), ckpt.read(name)

    assert F.model_from_tensors(ckpt.config, renamed, strict=True) is None


def test_window_by_window_forward_equals_the_batched_logits_closely(qwen3_src, ids):
    # Per-window forward passes are what verify runs now; a batch of windows can round differently in the last
    # bits (another GEMM blocking), never more. Measured: max |diff| 0 to ~1e-6 on the tiny qwen3.
    model, _ = load_model(qwen3_src)
    batched = model_outputs(model, ids)
    windows = F.window_logits(model, ids)
    assert windows.shape == tuple(batched.shape)
    assert max((a - b).abs().max().item() for a, b in zip(windows, batched)) <= 1e-5


def test_logit_windows_read_back_what_was_written_and_count_nonfinite():
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(3, 5, 7, generator=gen)
    rows[1, 2, 3] = float("nan")
    rows[2, 0, 0] = float("inf")
    store = LogitWindows()
    for row in rows:
        store.append(row)
    assert len(store) == 3 and store.shape == (3, 5, 7) and store.numel == rows.numel()
    assert store.nonfinite == 2
    assert all(torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
               for a, b in zip(store, rows))
    assert torch.equal(store[-1], rows[2])
    with pytest.raises(IndexError):
        store[3]
    with pytest.raises(ValueError):
        store.append(torch.zeros(4, 7))


def test_compare_and_perplexity_of_logit_windows_equal_those_of_tensors(monkeypatch):
    # Slices of positions: rows are independent, so the numbers are the same to the last bit.
    monkeypatch.setattr(F, "COMPARE_POSITIONS", 3)
    gen = torch.Generator().manual_seed(1)
    ref = torch.randn(2, 10, 50, generator=gen) * 3
    cand = ref + torch.randn(2, 10, 50, generator=gen) * 0.2
    ids = torch.randint(0, 50, (2, 10), generator=gen)
    ref_w, cand_w = LogitWindows(), LogitWindows()
    for a, b in zip(ref, cand):
        ref_w.append(a)
        cand_w.append(b)
    monkeypatch.setattr(F, "COMPARE_POSITIONS", 10**6)
    whole = compare(ref, cand)
    monkeypatch.setattr(F, "COMPARE_POSITIONS", 3)
    assert compare(ref_w, cand_w) == whole
    assert perplexity(ref_w, ids) == perplexity(ref, ids)


def test_compare_of_logit_windows_keeps_a_nan_a_nan():
    ref, cand = torch.zeros(2, 4, 6), torch.zeros(2, 4, 6)
    cand[1, 3, 5] = float("nan")
    ref_w, cand_w = LogitWindows(), LogitWindows()
    for a, b in zip(ref, cand):
        ref_w.append(a)
        cand_w.append(b)
    result = compare(ref_w, cand_w)
    assert result.max_abs_diff != result.max_abs_diff and result.kld_mean != result.kld_mean  # NaN


def test_sqnr_of_a_large_tensor_in_slices_equals_the_whole_tensor_value(monkeypatch):
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(64, 48, generator=gen)
    w_hat = w + torch.randn(64, 48, generator=gen) * 0.01
    whole = F.sqnr_db(w, w_hat)
    monkeypatch.setattr(F, "SQNR_SLICE_ELEMENTS", 100)  # two rows per slice
    sliced = F.sqnr_db(w, w_hat)
    # the same norms summed in another order: equal to ~1e-12 dB (float64 rounding)
    assert sliced == pytest.approx(whole, abs=1e-9)
    assert F.sqnr_db(w, w.clone()) == float("inf")


def test_dequantized_model_is_built_without_a_second_copy_of_the_weights(qwen3_out, qwen3_src, monkeypatch):
    """Our own dequantization streams into the model: no full state dict exists at any point."""
    from qexport.quant import dequant
    from qexport.verify import Context

    monkeypatch.setattr(dequant, "dequantized_state_dict",
                        lambda *a, **k: pytest.fail("verify must not build a whole dequantized state dict"))
    ctx = Context(qwen3_out / "int4", qwen3_src)
    model = ctx.dequantized_model()
    ckpt_names = {name for name, _, _ in dequant.iter_dequantized(ctx.ckpt)}
    state = model.state_dict()
    for name, tensor, _ in dequant.iter_dequantized(ctx.ckpt):
        assert torch.equal(state[name], tensor), name
    assert ckpt_names
