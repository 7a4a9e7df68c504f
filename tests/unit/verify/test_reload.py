"""verify's checks that load the export (qexport/verify/functional_checks.py: reload, reload_matches_dequant,
finite_outputs, and how functional picks its model) and the round-to-nearest reference
(qexport/verify/reference_quant.py), on the smallest real model that exercises them: a one-layer qwen3 of hidden
32 and vocabulary 64 (no tokenizer, so the inputs are 4 x 64 seeded random ids), built and exported to int8 once
per module in about a second. Each defect is planted in a copy of that export."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from qexport.export.pipeline import ExportOptions, export_folder
from qexport.verify import context as context_module
from qexport.verify import functional_checks as F
from qexport.verify import reference_quant as R
from qexport.verify.context import Context
from tests.support import defects
from tests.support.unit_verify import named

check_reload = named(F.check_reload, "reload")
check_matches = named(F.check_reload_matches_dequant, "reload_matches_dequant")
check_finite = named(F.check_finite_outputs, "finite_outputs")
check_functional = named(F.check_functional, "functional")
check_vs_rtn = named(F.check_functional_vs_rtn, "functional_vs_rtn")

DOWN = "model.layers.0.mlp.down_proj"
GOOD_SOURCE = "reloaded model (bfloat16)"


@pytest.fixture(autouse=True)
def no_release(monkeypatch):
    """release_memory hands freed memory back to the system (gc.collect, 0.4 s a call here): what these tests check does
    not depend on it (tests/unit/verify/test_bounded_memory.py measures it)."""
    monkeypatch.setattr(context_module, "release_memory", lambda: None)
    monkeypatch.setattr(F, "release_memory", lambda: None)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(reference folder, its int8 export): qwen3, 1 layer, hidden 32, bf16, no tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    root = tmp_path_factory.mktemp("tiny")
    config = AutoConfig.for_model("qwen3", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=1, head_dim=16, vocab_size=64,
                                  max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(root / "ref")
    export_folder(root / "ref", root / "out", ExportOptions(formats=("int8",), progress=False))
    return root / "ref", root / "out" / "int8"


def planted(tiny, tmp_path, config=None, tensors=None) -> Path:
    """A copy of the int8 export with `config(dict)` / `tensors(dict)` applied to config.json / the weights."""
    folder = tmp_path / "int8"
    shutil.copytree(tiny[1], folder)
    if config:
        defects.edit_json(folder / "config.json", config)
    if tensors:
        defects.edit_tensors(folder, tensors)
    return folder


def unknown_model_type(c):
    c["model_type"] = "nosuch"


def scaled(name, factor):
    def change(t):
        t[name] = (t[name].float() * factor).to(t[name].dtype)
    return change


def ctx_of(folder, ref, **thresholds) -> Context:
    return Context(folder, ref, thresholds or None)


# ---------------------------------------------------------------------------------------------------------------
# reload


def test_reload_of_a_good_export_passes_with_empty_loading_info(tiny):
    result = check_reload(ctx_of(tiny[1], tiny[0]))
    assert result.passed and result.detail == "Qwen3ForCausalLM loads with empty loading info"
    assert result.metrics == {"reload_ok": True}


def test_reload_fails_listing_the_first_three_keys_of_each_nonempty_loading_info_list(tiny, tmp_path):
    norms = ["model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight",
             "model.layers.0.self_attn.k_norm.weight", "model.layers.0.self_attn.q_norm.weight"]

    def change(t):
        for name in norms:
            t.pop(name)
        t["model.extra"] = torch.zeros(2)

    result = check_reload(ctx_of(planted(tiny, tmp_path, tensors=change), tiny[0]))
    assert not result.passed
    assert result.detail == ("loads, but loading info is not empty (weights are garbage): missing_keys: "
                             f"{', '.join(norms[:3])} and 1 more; unexpected_keys: model.extra")
    assert result.metrics == {"reload_ok": False, "loading_info": {"missing_keys": norms,
                                                                   "unexpected_keys": ["model.extra"],
                                                                   "mismatched_keys": []}}


def test_reload_of_an_export_transformers_cannot_load_fails_with_its_error(tiny, tmp_path):
    result = check_reload(ctx_of(planted(tiny, tmp_path, config=unknown_model_type), tiny[0]))
    assert not result.passed and result.metrics == {"reload_ok": False}
    assert result.detail.startswith("transformers cannot load it: InputError: ") and "'nosuch'" in result.detail


# ---------------------------------------------------------------------------------------------------------------
# reload_matches_dequant


def test_reload_matches_dequant_on_a_good_export_is_bit_exact_on_one_window(tiny):
    ctx = ctx_of(tiny[1], tiny[0], reload_max_abs_diff=0.0)  # the bound is inclusive: 0 passes equality
    steps = []
    ctx.on_step = lambda done, total, unit: steps.append((done, total, unit))
    result = check_matches(ctx)
    assert result.passed and result.detail == "reloaded outputs equal our dequantization bit for bit"
    assert result.metrics == {"reload_vs_dequant_max_abs": 0.0, "bit_exact": True}
    # one window of each model, each count naming its model
    assert [s for s in steps if s[2].startswith("windows")] == [(1, 1, "windows through the export (float32)"),
                                                                 (1, 1, "windows through own dequantization (float32)")]


def off_dequantization(ctx, factor):
    """ctx whose own dequantization has model.norm x factor (transformers' reload is untouched)."""
    from qexport.model.streamed import WeightSource

    real = ctx.dequantized_source()

    def read(name):
        return real.read(name) * factor if name == "model.norm.weight" else real.read(name)

    ctx.dequantized_source = lambda: WeightSource(real.names, read)
    return ctx


def test_reload_matches_dequant_fails_a_difference_just_past_its_bound(tiny):
    measured = check_matches(off_dequantization(ctx_of(tiny[1], tiny[0], reload_max_abs_diff=1.0), 1.001))
    diff = measured.metrics["reload_vs_dequant_max_abs"]
    assert measured.passed and 0 < diff < 1e-2 and measured.metrics["bit_exact"] is False
    assert measured.detail == f"reloaded outputs within {diff:.3g} of our dequantization"
    at = check_matches(off_dequantization(ctx_of(tiny[1], tiny[0], reload_max_abs_diff=diff), 1.001))
    assert at.passed, at.detail
    past = check_matches(off_dequantization(ctx_of(tiny[1], tiny[0], reload_max_abs_diff=diff * 0.99), 1.001))
    assert not past.passed
    assert past.detail == f"reloaded outputs differ from our dequantization by {diff:.3g} (> {diff * 0.99:g})"
    assert past.metrics == {"reload_vs_dequant_max_abs": diff, "bit_exact": False}


def test_reload_matches_dequant_fails_nan_whatever_the_bound(tiny):
    result = check_matches(off_dequantization(ctx_of(tiny[1], tiny[0], reload_max_abs_diff=1e30), math.nan))
    assert not result.passed and math.isnan(result.metrics["reload_vs_dequant_max_abs"])


def test_reload_matches_dequant_skips_an_export_transformers_cannot_load(tiny, tmp_path):
    result = check_matches(ctx_of(planted(tiny, tmp_path, config=unknown_model_type), tiny[0]))
    assert result.skipped and result.detail == "needs a reloaded model and readable shards"


# ---------------------------------------------------------------------------------------------------------------
# finite_outputs, and the candidate functional measures


def test_finite_outputs_of_a_good_export_in_both_dtypes_and_kept_as_the_candidate(tiny):
    ctx = ctx_of(tiny[1], tiny[0])
    result = check_finite(ctx)
    assert result.passed
    assert result.detail == "outputs finite when loaded in float32 and bfloat16 (config.json: bfloat16)"
    assert result.metrics == {"config_dtype": "bfloat16", "nonfinite_share_float32": 0.0,
                              "nonfinite_share_bfloat16": 0.0}
    outputs, source, dtype = ctx.candidate  # functional measures this load: no second one
    assert (source, dtype, len(outputs)) == (GOOD_SOURCE, torch.bfloat16, 4)


def test_finite_outputs_of_a_float32_export_loads_once(tiny, tmp_path):
    ctx = ctx_of(planted(tiny, tmp_path, config=lambda c: c.update(dtype="float32")), tiny[0])
    result = check_finite(ctx)
    assert result.passed and result.detail == "outputs finite when loaded in float32 (config.json: float32)"
    assert result.metrics == {"config_dtype": "float32", "nonfinite_share_float32": 0.0}
    assert ctx.candidate[1:] == ("reloaded model (float32)", torch.float32)


def test_finite_outputs_keeps_a_candidate_already_measured(tiny):
    ctx = ctx_of(tiny[1], tiny[0])
    ctx.candidate = before = ("outputs", "source", torch.float16)
    assert check_finite(ctx).passed and ctx.candidate is before


def test_finite_outputs_fails_each_load_with_nan_naming_the_first_module_and_layer(tiny, tmp_path):
    def nan_norm(t):
        t["model.layers.0.input_layernorm.weight"][3] = math.nan

    result = check_finite(ctx_of(planted(tiny, tmp_path, tensors=nan_norm), tiny[0]))
    assert not result.passed
    first = "non-finite hidden state first at model.layers.0.input_layernorm (layer 0); "
    assert result.detail.startswith(f"float32 load: {first}") and f"; bfloat16 load: {first}" in result.detail
    for dtype in ("float32", "bfloat16"):
        assert result.metrics[f"nonfinite_first_{dtype}"] == "model.layers.0.input_layernorm"
        assert result.metrics[f"nonfinite_layer_{dtype}"] == 0
        assert result.metrics[f"nonfinite_share_{dtype}"] == 1.0


def test_finite_outputs_fails_a_float16_overflow_only_in_float16(tiny, tmp_path):
    # the final norm x 3e4: its outputs pass 65504 in float16 (bfloat16 and float32 hold them)
    folder = planted(tiny, tmp_path, config=lambda c: c.update(dtype="float16"),
                     tensors=scaled("model.norm.weight", 3e4))
    result = check_finite(ctx_of(folder, tiny[0]))
    assert not result.passed
    assert result.detail.startswith("float16 load: non-finite hidden state first at model.norm; "), result.detail
    assert "float32 load" not in result.detail
    assert result.metrics["nonfinite_share_float32"] == 0.0 and result.metrics["nonfinite_share_float16"] > 0
    assert (result.metrics["nonfinite_first_float16"], result.metrics["nonfinite_layer_float16"]) == ("model.norm",
                                                                                                      None)
    assert "nonfinite_first_float32" not in result.metrics


def test_finite_outputs_judges_each_load_on_its_own(tiny):
    ctx = ctx_of(tiny[1], tiny[0])
    ctx.load_errors[torch.float32] = "RuntimeError: no float32 load"  # what Context.load records when one fails
    result = check_finite(ctx)
    assert result.passed and result.detail == "outputs finite when loaded in bfloat16 (config.json: bfloat16)"
    assert result.metrics == {"config_dtype": "bfloat16", "nonfinite_share_bfloat16": 0.0}


def test_finite_outputs_skips_an_export_transformers_cannot_load(tiny, tmp_path):
    result = check_finite(ctx_of(planted(tiny, tmp_path, config=unknown_model_type), tiny[0]))
    assert result.skipped and result.detail == "transformers cannot load the export"


def test_functional_measures_the_export_as_users_load_it(tiny):
    ctx = ctx_of(tiny[1], tiny[0])
    result = check_functional(ctx)
    assert result.passed, result.detail  # int8's default absolute bounds
    assert result.detail.startswith(f"{GOOD_SOURCE} on 256 tokens of random: ")
    assert ctx.candidate[1:] == (GOOD_SOURCE, torch.bfloat16) and len(ctx.candidate[0]) == 4
    assert check_vs_rtn(ctx).passed  # round-to-nearest's default relative bounds


def test_functional_falls_back_to_our_dequantization_when_transformers_cannot_load(tiny, tmp_path):
    ctx = ctx_of(planted(tiny, tmp_path, config=unknown_model_type), tiny[0])
    result = check_functional(ctx)
    assert result.passed and result.detail.startswith("own dequantization (reload failed) on 256 tokens"), \
        result.detail
    assert ctx.candidate[1:] == ("own dequantization (reload failed)", torch.float32) and len(ctx.candidate[0]) == 4
    assert check_vs_rtn(ctx).passed


def test_checks_skip_when_transformers_cannot_load_and_the_shards_are_unreadable(tiny, tmp_path):
    folder = planted(tiny, tmp_path)
    (folder / "model.safetensors").write_bytes(b"\0" * 64)
    ctx = ctx_of(folder, tiny[0])
    assert ctx.ckpt is None
    for check in (check_functional, check_vs_rtn):
        result = check(ctx)
        assert result.skipped and result.detail == "no model: reload failed and shards unreadable"
    assert check_matches(ctx).skipped


def test_functional_vs_rtn_skips_a_scheme_compressed_tensors_refuses_naming_the_field(tiny, tmp_path):
    def gptq_group_order(c):
        c["quantization_config"]["config_groups"]["group_0"]["weights"]["actorder"] = "group"

    ctx = ctx_of(planted(tiny, tmp_path, config=gptq_group_order), tiny[0])
    result = check_vs_rtn(ctx)
    assert result.skipped, result.detail
    assert result.detail.startswith("no round-to-nearest reference for the declared scheme: compressed-tensors "
                                    "refuses its weights args (actorder: actorder='group' has been removed")


# ---------------------------------------------------------------------------------------------------------------
# reference_quant


INT4_G16 = {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 16, "symmetric": True}


@pytest.mark.parametrize("weights,reason", [
    ({**INT4_G16, "type": "float"}, "type float"),
    ({"num_bits": 8, "type": "int", "strategy": "block", "block_structure": [8, 8], "symmetric": True},
     "strategy block"),
    ({**INT4_G16, "strategy": "tensor_group"}, "strategy tensor_group"),
    ({**INT4_G16, "group_size": None},
     "compressed-tensors refuses its weights args (strategy group requires group_size to be set to a positive value)"),
    ({**INT4_G16, "num_bits": "four", "actorder": "group"},
     "compressed-tensors refuses its weights args (num_bits: Input should be a valid integer, unable to parse string "
     "as an integer; actorder: actorder='group' has been removed. Consider using actorder='weight' or actorder=None "
     "instead.)"),
])
def test_quantization_args_refuses_what_round_to_nearest_cannot_reproduce_saying_why(weights, reason):
    with pytest.raises(R.UnsupportedScheme) as caught:
        R.quantization_args(weights)
    assert str(caught.value) == reason


@pytest.mark.parametrize("strategy", ["channel", "group", "tensor"])
def test_quantization_args_accepts_integer_channel_group_and_tensor(strategy):
    args = R.quantization_args({**INT4_G16, "strategy": strategy, "group_size": 16 if strategy == "group" else None})
    assert (args.num_bits, getattr(args.strategy, "value", args.strategy)) == (4, strategy)


@pytest.mark.parametrize("strategy,shape", [("channel", (64, 1, 32)), ("group", (64, 2, 16)), ("tensor", (1, 1, -1))])
def test_rtn_fake_quantize_is_symmetric_round_to_nearest_on_absmax_over_7_5(strategy, shape):
    w = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    args = R.quantization_args({**INT4_G16, "strategy": strategy, "group_size": 16 if strategy == "group" else None})
    groups = w.reshape(shape)
    scale = groups.abs().amax(dim=-1, keepdim=True) / 7.5  # compressed-tensors' int4: absmax / ((2^4 - 1) / 2)
    expected = (torch.clamp(torch.round(groups / scale), -8, 7) * scale).reshape(64, 32)
    assert torch.allclose(R.rtn_fake_quantize(w, args), expected, atol=1e-6)


def test_rtn_fake_quantize_refuses_a_group_size_the_rows_do_not_divide_by():
    with pytest.raises(R.UnsupportedScheme, match="^in features 24 not divisible by group_size 16$"):
        R.rtn_fake_quantize(torch.zeros(4, 24), R.quantization_args(INT4_G16))


def test_rtn_model_fake_quantizes_exactly_the_targeted_linears_in_the_given_dtype(tiny):
    from qexport.verify.functional import load_streamed

    ref = tiny[0]
    qc = json.loads((tiny[1] / "config.json").read_text())["quantization_config"]  # int8 per channel, lm_head out
    model = R.rtn_model(ref, qc, dtype=torch.bfloat16)
    source = load_streamed(ref, dtype=torch.float32)
    args = R.quantization_args(qc["config_groups"]["group_0"]["weights"])
    down = model.get_submodule(DOWN).weight
    assert down.dtype == torch.bfloat16 and not down.requires_grad
    assert torch.equal(down, R.rtn_fake_quantize(source.get_submodule(DOWN).weight, args).bfloat16())
    assert torch.equal(model.lm_head.weight, source.lm_head.weight.bfloat16())  # ignored: untouched
    assert not torch.equal(down, source.get_submodule(DOWN).weight.bfloat16())


def test_apply_rtn_refuses_a_config_that_targets_no_linear(tiny):
    from qexport.verify.functional import load_streamed

    qc = {"config_groups": {"g": {"targets": ["Embedding"], "weights": INT4_G16}}, "ignore": []}
    with pytest.raises(R.UnsupportedScheme, match="targets no Linear of the reference architecture"):
        R.apply_rtn(load_streamed(tiny[0]), qc)
