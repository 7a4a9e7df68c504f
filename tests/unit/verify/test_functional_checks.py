"""verify's functional checks (qexport/verify/functional_checks.py: functional, functional_vs_rtn and their
helpers) called directly on a real verify Context over hand-written folders whose model outputs are given: the
reference's, the export's and round-to-nearest's logits (or pooled embeddings) are small hand-made tensors, so
each bound is tested at its exact edge (a bound equal to the measured value passes, one just tighter fails
naming the metric) in milliseconds. No model is loaded here; the checks that load one (reload,
reload_matches_dequant, finite_outputs) are in tests/unit/verify/test_reload.py on a tiny exported model."""

from __future__ import annotations

import math

import pytest
import torch

from qexport.verify.functional import LogitWindows, compare, perplexity
from qexport.verify.thresholds import Thresholds
from qexport.verify import functional_checks as F
from qexport.verify.reference_quant import UnsupportedScheme
from tests.support.unit_verify import CONFIG, config_with, context, named, qc, reference_weights, write_folder

check_functional = named(F.check_functional, "functional")
check_vs_rtn = named(F.check_functional_vs_rtn, "functional_vs_rtn")

SOURCE = "reloaded model (bfloat16)"
# every bound off: each test turns on the ones it is about
OFF = {"max_kld_mean": None, "max_kld_p99": None, "min_top1": None, "min_cosine": None, "max_kld_vs_rtn": None,
       "max_top1_drop_vs_rtn": None, "max_cosine_gap_vs_rtn": None, "kld_vs_rtn_slack": 0.0,
       "cosine_vs_rtn_slack": 0.0}
ENCODER = {"model_type": "bert", "architectures": ["BertModel"], "hidden_size": 32, "intermediate_size": 64,
           "num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 64, "max_position_embeddings": 64}


def swapped(logits: torch.Tensor, positions) -> torch.Tensor:
    """`logits` [B, T, V] with the top two logits exchanged at each (window, position): top-1 lost there."""
    out = logits.clone()
    for b, t in positions:
        top = out[b, t].topk(2).indices
        out[b, t, top[0]], out[b, t, top[1]] = logits[b, t, top[1]], logits[b, t, top[0]]
    return out


# Causal LM outputs: 2 windows x 4 positions x 8 tokens, so top-1 is a multiple of 1/8 (exact in binary).
REFERENCE = torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(0)) * 2
RTN = swapped(REFERENCE, [(0, 1)])  # top-1 7/8
EXPORT = swapped(REFERENCE, [(0, 1), (1, 2)])  # top-1 6/8, about twice round-to-nearest's KLD
IDS = torch.randint(0, 8, (2, 4), generator=torch.Generator().manual_seed(1))
# Encoder outputs: 4 pooled embeddings of 32
EMBED = torch.randn(4, 32, generator=torch.Generator().manual_seed(2))
EMBED_RTN = EMBED + 0.05 * torch.randn(4, 32, generator=torch.Generator().manual_seed(3))
EMBED_EXPORT = EMBED + 0.1 * torch.randn(4, 32, generator=torch.Generator().manual_seed(4))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(causal reference, encoder reference, int4 export, dense export): config and a few tensors each; the
    checks here never read the tensors."""
    root = tmp_path_factory.mktemp("functional")
    w = reference_weights()
    return (write_folder(root / "ref", w), write_folder(root / "bert", w, ENCODER),
            write_folder(root / "int4", w, config_with(quantization_config=qc())),
            write_folder(root / "fp16", w))


def given(folder, ref, thresholds, export, reference, rtn=None, kind="random", ids=IDS, dtype=torch.bfloat16):
    """A Context on the folders whose candidate, reference and round-to-nearest outputs are the given tensors
    (the candidate comes from `source` in `dtype`, as _candidate records it); rtn may be an exception to raise."""
    ctx = context(folder, ref, {**vars(Thresholds()), **OFF, **thresholds})
    ctx.candidate = (export, SOURCE, dtype)
    ctx.reference_outputs = lambda: reference
    ctx.rtn_dtypes = []

    def rtn_outputs(dtype):
        ctx.rtn_dtypes.append(dtype)
        if isinstance(rtn, Exception):
            raise rtn
        return rtn

    ctx.rtn_outputs = rtn_outputs
    ctx._inputs, ctx.input_kind = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, kind
    return ctx


# ---------------------------------------------------------------------------------------------------------------
# helpers


def test_max_abs_diff_of_tensors_is_the_largest_difference_and_equality_is_exact():
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert F._max_abs_diff(a, a - torch.tensor([[0.0, 0.5], [-1.5, 0.0]])) == (1.5, False)
    assert F._max_abs_diff(a, a.clone()) == (0.0, True)


def test_max_abs_diff_over_windows_takes_the_largest_of_every_window():
    def windows(*rows):
        out = LogitWindows()
        for row in rows:
            out.append(torch.tensor(row))
        return out

    same = windows([[1.0, 2.0]], [[3.0, 4.0]])
    assert F._max_abs_diff(same, windows([[1.0, 2.0]], [[3.0, 4.0]])) == (0.0, True)
    assert F._max_abs_diff(same, windows([[1.0, 2.0]], [[3.0, 6.5]])) == (2.5, False)  # the last window differs
    assert F._max_abs_diff(same, windows([[1.25, 2.0]], [[3.0, 4.0]])) == (0.25, False)  # the first one does
    assert F._max_abs_diff(same, windows([[1.5, 2.0]], [[3.0, 4.25]])) == (0.5, False)  # the first is the larger
    nan, equal = F._max_abs_diff(same, windows([[1.0, 2.0]], [[float("nan"), 4.0]]))
    assert math.isnan(nan) and not equal
    with pytest.raises(ValueError, match="^2 windows of outputs against 1$"):
        F._max_abs_diff(same, windows([[1.0, 2.0]]))


def test_ratio_is_the_quotient_one_when_both_are_zero_and_infinite_when_only_the_reference_is():
    assert F._ratio(3.0, 4.0) == 0.75
    assert F._ratio(0.0, 4.0) == 0.0
    assert F._ratio(0.0, 0.0) == 1.0
    assert F._ratio(-1e-12, 0.0) == 1.0  # rounding below zero is as close as the reference
    assert F._ratio(1e-12, 0.0) == math.inf


def test_nonfinite_names_the_float_metrics_that_are_nan_or_infinite_in_order():
    metrics = {"a": 1.0, "b": math.nan, "c": "text", "d": -math.inf, "e": None, "f": 3}
    assert F._nonfinite(metrics) == ["b", "d"]


def test_param_dtype_is_the_first_floating_parameters_and_float32_without_one():
    model = torch.nn.Module()
    model.codes = torch.nn.Parameter(torch.zeros(2, dtype=torch.int8), requires_grad=False)
    model.scale = torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))
    model.bias = torch.nn.Parameter(torch.zeros(2, dtype=torch.float16))
    assert F._param_dtype(model) == torch.bfloat16
    assert F._param_dtype(torch.nn.Module()) == torch.float32


def test_input_metrics_count_windows_and_tokens_of_the_inputs(folders):
    ref, _, export, _ = folders
    ctx = given(export, ref, {}, EXPORT, REFERENCE, ids=torch.zeros(3, 5, dtype=torch.long), kind="text")
    assert F._input_metrics(ctx) == {"inputs": "text", "windows": 3, "tokens": 15}


# ---------------------------------------------------------------------------------------------------------------
# functional: absolute bounds


def test_functional_passes_within_every_bound_reporting_metrics_perplexities_and_inputs(folders):
    ref, _, export, _ = folders
    ours = compare(REFERENCE, EXPORT)
    result = check_functional(given(export, ref, {"max_kld_mean": 1.0, "max_kld_p99": 1.0, "min_top1": 0.5},
                                    EXPORT, REFERENCE, kind="text"))
    assert result.passed and not result.skipped, result.detail
    ppl, ppl_ref = perplexity(EXPORT, IDS), perplexity(REFERENCE, IDS)
    assert result.detail == (f"{SOURCE} on 8 tokens of text: kld_mean {ours.kld_mean:.4g}, kld_p99 "
                             f"{ours.kld_p99:.4g}, top1 0.75, ppl {ppl:.4g} (reference {ppl_ref:.4g})")
    assert result.metrics == {k: v for k, v in ours.as_dict().items() if v is not None} | {
        "ppl_reference": ppl_ref, "ppl_export": ppl, "inputs": "text", "windows": 2, "tokens": 8}


def test_functional_on_random_ids_reports_no_perplexity(folders):
    ref, _, export, _ = folders
    result = check_functional(given(export, ref, {"min_top1": 0.5}, EXPORT, REFERENCE, kind="random"))
    assert result.passed, result.detail
    assert "ppl_export" not in result.metrics and "ppl_reference" not in result.metrics
    assert result.detail.startswith(f"{SOURCE} on 8 tokens of random: kld_mean ") and "ppl" not in result.detail


@pytest.mark.parametrize("key,field,at_least", [("kld_mean", "max_kld_mean", False),
                                                ("kld_p99", "max_kld_p99", False), ("top1", "min_top1", True)])
def test_functional_bound_equal_to_the_measured_value_passes_and_just_tighter_fails_naming_it(folders, key, field,
                                                                                               at_least):
    ref, _, export, _ = folders
    value = compare(REFERENCE, EXPORT).as_dict()[key]
    at = check_functional(given(export, ref, {field: value}, EXPORT, REFERENCE))
    assert at.passed, at.detail
    tighter = value * (1.01 if at_least else 0.99)
    past = check_functional(given(export, ref, {field: tighter}, EXPORT, REFERENCE))
    assert not past.passed
    op = "<" if at_least else ">"
    assert past.detail == f"{SOURCE} on 8 tokens of random: {key} {value:.4g} {op} {tighter:g}", past.detail
    assert past.metrics[key] == value and past.metrics["tokens"] == 8  # a failure reports what it measured


def test_functional_lists_every_bound_that_fails(folders):
    ref, _, export, _ = folders
    ours = compare(REFERENCE, EXPORT)
    result = check_functional(given(export, ref, {"max_kld_mean": 1e-9, "max_kld_p99": 1.0, "min_top1": 0.9},
                                    EXPORT, REFERENCE))
    assert not result.passed
    assert result.detail == f"{SOURCE} on 8 tokens of random: kld_mean {ours.kld_mean:.4g} > 1e-09; top1 0.75 < 0.9"


def test_functional_with_every_bound_off_passes_whatever_the_outputs(folders):
    ref, _, export, _ = folders
    far = REFERENCE.flip(-1)
    assert check_functional(given(export, ref, {}, far, REFERENCE)).passed


def test_functional_fails_non_finite_metrics_whatever_the_bounds(folders):
    ref, _, export, _ = folders
    broken = EXPORT.clone()
    broken[1, 1, 0] = math.nan  # not the last position: perplexity reads it
    result = check_functional(given(export, ref, {}, broken, REFERENCE, kind="text"))
    assert not result.passed
    assert result.detail.startswith(f"{SOURCE}: non-finite metrics: kld_mean nan, kld_p99 nan, "), result.detail
    assert "ppl_export nan" in result.detail and "ppl_reference" not in result.detail
    assert result.metrics["windows"] == 2 and result.metrics["inputs"] == "text"


def test_functional_of_an_encoder_bounds_the_mean_cosine(folders):
    _, bert, _, fp16 = folders
    cosine = compare(EMBED, EMBED_EXPORT).cosine
    ids = torch.zeros(4, 6, dtype=torch.long)
    at = check_functional(given(fp16, bert, {"min_cosine": cosine, "max_kld_mean": 0.0, "min_top1": 1.0},
                                EMBED_EXPORT, EMBED, kind="sentences", ids=ids))
    assert at.passed, at.detail  # the causal LM bounds do not apply to an encoder
    assert at.detail == f"{SOURCE} on 24 tokens of sentences: cosine {cosine:.4g}"
    assert "kld_mean" not in at.metrics and at.metrics["cosine"] == cosine
    past = check_functional(given(fp16, bert, {"min_cosine": cosine * 1.0001}, EMBED_EXPORT, EMBED,
                                  kind="sentences", ids=ids))
    assert not past.passed and past.detail.endswith(f": cosine {cosine:.4g} < {cosine * 1.0001:g}"), past.detail


# ---------------------------------------------------------------------------------------------------------------
# functional_vs_rtn: relative to round-to-nearest of the declared scheme


def test_functional_vs_rtn_skips_a_dense_export(folders):
    ref, _, _, fp16 = folders
    result = check_vs_rtn(given(fp16, ref, {}, EXPORT, REFERENCE, RTN))
    assert result.skipped and result.detail == "no quantization_config: a dense export has no scheme to reproduce"


@pytest.mark.parametrize("declared", [{"quant_method": "compressed-tensors"}, {"config_groups": {}}, ["group_0"]])
def test_functional_vs_rtn_skips_a_quantization_config_without_groups(folders, tmp_path, declared):
    ref, _, _, _ = folders
    folder = write_folder(tmp_path / "x", reference_weights(), config_with(quantization_config=declared))
    result = check_vs_rtn(given(folder, ref, {}, EXPORT, REFERENCE, RTN))
    assert result.skipped and result.detail.startswith("no quantization_config: ")


def test_functional_vs_rtn_skips_a_scheme_round_to_nearest_cannot_reproduce_saying_why(folders):
    ref, _, export, _ = folders
    result = check_vs_rtn(given(export, ref, {}, EXPORT, REFERENCE, UnsupportedScheme("strategy block")))
    assert result.skipped
    assert result.detail == "no round-to-nearest reference for the declared scheme: strategy block"


def test_functional_vs_rtn_quantizes_the_reference_in_the_candidates_dtype(folders):
    ref, _, export, _ = folders
    ctx = given(export, ref, {}, EXPORT, REFERENCE, RTN, dtype=torch.float16)
    assert check_vs_rtn(ctx).passed
    assert ctx.rtn_dtypes == [torch.float16]


def test_functional_vs_rtn_passes_within_both_bounds_reporting_both_models(folders):
    ref, _, export, _ = folders
    ours, theirs = compare(REFERENCE, EXPORT), compare(REFERENCE, RTN)
    result = check_vs_rtn(given(export, ref, {"max_kld_vs_rtn": 4.0, "kld_vs_rtn_slack": 1e-6,
                                              "max_top1_drop_vs_rtn": 0.125}, EXPORT, REFERENCE, RTN, kind="text"))
    assert result.passed and not result.skipped, result.detail
    ratio = ours.kld_mean / theirs.kld_mean
    assert 1.5 < ratio < 4  # as built: two top-1 swaps against one
    assert result.detail == (f"{SOURCE}: KLD {ours.kld_mean:.4g} = {ratio:.3g}x round-to-nearest's "
                             f"{theirs.kld_mean:.4g} (limit 4x + 1e-06); top-1 0.75 vs round-to-nearest's 0.875 "
                             f"(may drop 0.125)")
    assert result.metrics == {"kld_mean": ours.kld_mean, "top1": 0.75, "rtn_kld_mean": theirs.kld_mean,
                              "rtn_kld_p99": theirs.kld_p99, "rtn_top1": 0.875, "rtn_ppl": perplexity(RTN, IDS),
                              "kld_ratio_vs_rtn": ratio, "top1_drop_vs_rtn": 0.125, "inputs": "text",
                              "windows": 2, "tokens": 8}


def test_functional_vs_rtn_on_random_ids_reports_no_perplexity(folders):
    ref, _, export, _ = folders
    result = check_vs_rtn(given(export, ref, {}, EXPORT, REFERENCE, RTN, kind="random"))
    assert "rtn_ppl" not in result.metrics and result.metrics["inputs"] == "random"


def test_functional_vs_rtn_kld_limit_is_inclusive_and_slack_is_added(folders):
    ref, _, export, _ = folders
    kld = compare(REFERENCE, EXPORT).kld_mean
    # max_kld_vs_rtn 0: the limit is the slack alone, here exactly the export's KLD
    at = check_vs_rtn(given(export, ref, {"max_kld_vs_rtn": 0.0, "kld_vs_rtn_slack": kld}, EXPORT, REFERENCE, RTN))
    assert at.passed, at.detail
    past = check_vs_rtn(given(export, ref, {"max_kld_vs_rtn": 0.0, "kld_vs_rtn_slack": kld * 0.99},
                              EXPORT, REFERENCE, RTN))
    assert not past.passed


def test_functional_vs_rtn_kld_limit_multiplies_round_to_nearests_kld(folders):
    ref, _, export, _ = folders
    ours, theirs = compare(REFERENCE, EXPORT), compare(REFERENCE, RTN)
    ratio = ours.kld_mean / theirs.kld_mean
    same = check_vs_rtn(given(export, ref, {"max_kld_vs_rtn": 1.0}, RTN, REFERENCE, RTN))
    assert same.passed, same.detail  # as close as round-to-nearest: 1x its KLD
    worse = check_vs_rtn(given(export, ref, {"max_kld_vs_rtn": 1.5, "kld_vs_rtn_slack": 1e-6},
                               EXPORT, REFERENCE, RTN))
    assert not worse.passed
    assert worse.detail == (f"{SOURCE}: worse than round-to-nearest of its own scheme: KLD {ours.kld_mean:.4g} = "
                            f"{ratio:.3g}x round-to-nearest's {theirs.kld_mean:.4g} (limit 1.5x + 1e-06)")
    assert worse.metrics["kld_ratio_vs_rtn"] == ratio
    assert check_vs_rtn(given(export, ref, {"max_kld_vs_rtn": ratio * 1.001}, EXPORT, REFERENCE, RTN)).passed


def test_functional_vs_rtn_top1_drop_limit_is_inclusive(folders):
    ref, _, export, _ = folders
    at = check_vs_rtn(given(export, ref, {"max_top1_drop_vs_rtn": 0.125}, EXPORT, REFERENCE, RTN))
    assert at.passed and at.detail.endswith("top-1 0.75 vs round-to-nearest's 0.875 (may drop 0.125)"), at.detail
    past = check_vs_rtn(given(export, ref, {"max_top1_drop_vs_rtn": 0.0625}, EXPORT, REFERENCE, RTN))
    assert not past.passed
    assert past.detail == (f"{SOURCE}: worse than round-to-nearest of its own scheme: top-1 0.75 vs "
                           f"round-to-nearest's 0.875 (may drop 0.0625)")
    assert past.metrics["top1_drop_vs_rtn"] == 0.125


def test_functional_vs_rtn_lists_both_failed_bounds(folders):
    ref, _, export, _ = folders
    result = check_vs_rtn(given(export, ref, {"max_kld_vs_rtn": 1.0, "max_top1_drop_vs_rtn": 0.0},
                                EXPORT, REFERENCE, RTN))
    assert not result.passed
    kld_part, top1_part = result.detail.split(": ", 1)[1].split(": ", 1)[1].split("; ")
    assert kld_part.startswith("KLD ") and top1_part.startswith("top-1 0.75 ")


def test_functional_vs_rtn_export_within_the_slack_of_a_lossless_rtn_passes_with_an_infinite_ratio(folders):
    ref, _, export, _ = folders
    kld = compare(REFERENCE, EXPORT).kld_mean
    result = check_vs_rtn(given(export, ref, {"max_kld_vs_rtn": 1.5, "kld_vs_rtn_slack": kld},
                                EXPORT, REFERENCE, REFERENCE))
    assert result.passed, result.detail
    assert result.metrics["kld_ratio_vs_rtn"] == math.inf and result.metrics["rtn_kld_mean"] == 0


def test_functional_vs_rtn_without_a_relative_bound_says_so(folders):
    ref, _, export, _ = folders
    result = check_vs_rtn(given(export, ref, {}, EXPORT.flip(-1), REFERENCE, RTN))
    assert result.passed and result.detail == f"{SOURCE}: no relative bound set"
    assert result.metrics["windows"] == 2


@pytest.mark.parametrize("which", ["export", "rtn"])
def test_functional_vs_rtn_fails_non_finite_metrics_of_either_model(folders, which):
    ref, _, export, _ = folders
    broken = (EXPORT if which == "export" else RTN).clone()
    broken[0, 0, 0] = math.nan
    outputs = (broken, RTN) if which == "export" else (EXPORT, broken)
    result = check_vs_rtn(given(export, ref, {"max_kld_vs_rtn": 1e9, "max_top1_drop_vs_rtn": 1.0},
                                outputs[0], REFERENCE, outputs[1]))
    assert not result.passed
    # the KLD ratio is left out: an infinite one is a lossless round-to-nearest, not a broken export
    named_ = "kld_mean nan" if which == "export" else "rtn_kld_mean nan, rtn_kld_p99 nan"
    assert result.detail == f"{SOURCE}: non-finite metrics: {named_}", result.detail
    assert result.metrics["tokens"] == 8


def test_functional_vs_rtn_of_an_encoder_bounds_the_cosine_gap(folders, tmp_path):
    _, bert, _, _ = folders
    folder = write_folder(tmp_path / "bert-int8", reference_weights(), {**ENCODER, "quantization_config": qc(8)})
    ours, theirs = compare(EMBED, EMBED_EXPORT).cosine, compare(EMBED, EMBED_RTN).cosine
    gap, rtn_gap = 1 - ours, 1 - theirs
    ids = torch.zeros(4, 6, dtype=torch.long)

    def run(**bounds):
        return check_vs_rtn(given(folder, bert, bounds, EMBED_EXPORT, EMBED, EMBED_RTN, kind="sentences", ids=ids))

    ratio = gap / rtn_gap
    assert 2 < ratio < 6  # as built: twice the noise
    result = run(max_cosine_gap_vs_rtn=ratio * 1.01, max_kld_vs_rtn=0.0, max_top1_drop_vs_rtn=0.0)
    assert result.passed, result.detail  # the causal LM bounds do not apply to an encoder
    assert result.detail == (f"{SOURCE}: 1 - cosine {gap:.4g} = {ratio:.3g}x round-to-nearest's {rtn_gap:.4g} "
                             f"(limit {ratio * 1.01:g}x + 0)")
    assert result.metrics == {"cosine": ours, "rtn_cosine": theirs, "cosine_gap_ratio_vs_rtn": ratio,
                              "inputs": "sentences", "windows": 4, "tokens": 24}
    past = run(max_cosine_gap_vs_rtn=1.5, cosine_vs_rtn_slack=1e-6)
    assert not past.passed
    assert past.detail == (f"{SOURCE}: worse than round-to-nearest of its own scheme: 1 - cosine {gap:.4g} = "
                           f"{ratio:.3g}x round-to-nearest's {rtn_gap:.4g} (limit 1.5x + 1e-06)")
    assert run(max_cosine_gap_vs_rtn=0.0, cosine_vs_rtn_slack=gap).passed  # the slack alone, at the gap: inclusive
    assert not run(max_cosine_gap_vs_rtn=0.0, cosine_vs_rtn_slack=gap * 0.99).passed
    assert run(max_cosine_gap_vs_rtn=1.0).passed is False and run(max_cosine_gap_vs_rtn=None).detail == (
        f"{SOURCE}: no relative bound set")


def test_functional_vs_rtn_of_an_encoder_fails_a_non_finite_cosine(folders, tmp_path):
    _, bert, _, _ = folders
    folder = write_folder(tmp_path / "bert-int8", reference_weights(), {**ENCODER, "quantization_config": qc(8)})
    broken = EMBED_EXPORT.clone()
    broken[0, 0] = math.nan
    result = check_vs_rtn(given(folder, bert, {"max_cosine_gap_vs_rtn": 1e9}, broken, EMBED, EMBED_RTN,
                                kind="sentences", ids=torch.zeros(4, 6, dtype=torch.long)))
    assert not result.passed and result.detail.startswith(f"{SOURCE}: non-finite metrics: cosine nan"), result.detail


def test_functional_vs_rtn_of_an_encoder_within_the_slack_of_a_lossless_rtn_passes_with_an_infinite_ratio(
        folders, tmp_path):
    _, bert, _, _ = folders
    folder = write_folder(tmp_path / "bert-int8", reference_weights(), {**ENCODER, "quantization_config": qc(8)})
    gap = 1 - compare(EMBED, EMBED_EXPORT).cosine
    result = check_vs_rtn(given(folder, bert, {"max_cosine_gap_vs_rtn": 1.5, "cosine_vs_rtn_slack": gap},
                                EMBED_EXPORT, EMBED, EMBED, kind="sentences", ids=torch.zeros(4, 6, dtype=torch.long)))
    assert result.passed, result.detail
    assert result.metrics["cosine_gap_ratio_vs_rtn"] == math.inf


def test_functional_vs_rtn_of_an_encoder_as_close_as_a_lossless_rtn_passes(folders, tmp_path):
    _, bert, _, _ = folders
    folder = write_folder(tmp_path / "bert-int8", reference_weights(), {**ENCODER, "quantization_config": qc(8)})
    result = check_vs_rtn(given(folder, bert, {"max_cosine_gap_vs_rtn": 1.5}, EMBED, EMBED, EMBED,
                                kind="sentences", ids=torch.zeros(4, 6, dtype=torch.long)))
    assert result.passed and result.metrics["cosine_gap_ratio_vs_rtn"] == 1.0, result.detail
    # a cosine rounded above 1 is a gap of 0, not a negative one
    assert result.detail == f"{SOURCE}: 1 - cosine 0 = 1x round-to-nearest's 0 (limit 1.5x + 0)"


assert CONFIG["vocab_size"] >= 8  # the hand-made logits' vocabulary fits the reference's
