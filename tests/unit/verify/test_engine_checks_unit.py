"""verify's engine checks (qexport/verify/engine_checks.py) without starting an engine.

vLLM: the request qexport sends (vllm_request, prompt_ids, engine_dtype) and the verdict drawn from the dict the
child (qexport/verify/engines/vllm_child.py) writes back (judge_vllm and its helpers), on tests/support/unit_engine.py's hand-written
one-layer qwen3. The good results are real: vLLM 0.32 CPU's answers on these very folders, recorded once
(fixtures/vllm_results/, fixtures/record_vllm_results.py); the bad ones are those results with one thing changed.
check_engine_vllm itself runs end to end with a stand-in interpreter (a shell script that answers with a recorded
result). sentence-transformers: the check's logic with a stand-in `sentence_transformers` module (its import alone
takes seconds); the real library on MiniLM exports is tested in tests/unit/verify/engines/test_engine_checks.py."""

from __future__ import annotations

import copy
import json
import sys
import types
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch

from qexport.verify.engines.runner import EngineSpec
from qexport.verify import engine_checks
from qexport.verify.engine_checks import (
    DTYPE_NOISE_FACTOR,
    MAX_ABS_DLOGPROB,
    MAX_NEW_TOKENS,
    PROMPTS,
    compare_logprobs,
    engine_dtype,
    prompt_ids,
    vllm_request,
)
from tests.support import unit_engine
from tests.support.unit_engine import CONFIG, LAYER, LINEARS
from tests.support.unit_verify import context, named, write_folder

check_vllm = named(engine_checks.check_engine_vllm, "engine_vllm")


def judge_vllm(ctx, result, *tail):
    """engine_checks.judge_vllm that also asserts the row's name (the one verify's --only and reports know)."""
    check = engine_checks.judge_vllm(ctx, result, *tail)
    assert check.name == "engine_vllm", check.name
    return check

check_st = named(engine_checks.check_engine_sentence_transformers, "engine_sentence_transformers")
WHO = "vLLM 0.32.0 (cpu)"
Q = f"{LAYER}.self_attn.q_proj"
DOWN = f"{LAYER}.mlp.down_proj"
NORM = f"{LAYER}.input_layernorm.weight"  # one tensor of block 0: the config's one layer is there


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """The reference and its int4 / int8 / fp16 exports, checked against the bytes the results were recorded on."""
    tmp = tmp_path_factory.mktemp("engine")
    made = {"ref": unit_engine.reference(tmp / "ref"), "int4": unit_engine.int4_export(tmp / "int4"),
            "int8": unit_engine.int8_export(tmp / "int8"), "fp16": unit_engine.reference(tmp / "fp16")}
    for name in ("int4", "int8", "fp16"):
        assert unit_engine.sha256(made[name]) == unit_engine.recorded(name)["sha256"], \
            f"tests/support/unit_engine.py's {name} folder changed since fixtures/vllm_results/{name}.json was recorded: " \
            f"re-record (fixtures/record_vllm_results.py)"
    return made


def ctx_of(folders, name):
    return context(folders[name], folders["ref"])


def result_of(name, **changes) -> dict:
    result = copy.deepcopy(unit_engine.recorded(name)["result"])
    result.update(changes)
    return result


# ---------------------------------------------------------------------------------------------------------------
# What qexport asks vLLM


@pytest.mark.parametrize("config, dtype", [
    ({"dtype": "bfloat16"}, "bfloat16"), ({"dtype": "float16"}, "float16"), ({"torch_dtype": "bfloat16"}, "bfloat16"),
    # vLLM CPU runs int4 only in fp16 / bf16: a float32 (or unnamed) folder runs in float16
    ({"dtype": "float32"}, "float16"), ({}, "float16"), (None, "float16")])
def test_engine_runs_the_folder_in_its_config_dtype_else_float16(config, dtype):
    assert engine_dtype(config) == dtype


def test_request_names_every_linear_with_its_shape_the_dtype_and_fixed_prompts(folders):
    ctx = ctx_of(folders, "int4")
    shapes = {"self_attn.q_proj": (128, 128), "self_attn.k_proj": (128, 64), "self_attn.v_proj": (128, 64),
              "self_attn.o_proj": (128, 128), "mlp.gate_proj": (128, 256), "mlp.up_proj": (128, 256),
              "mlp.down_proj": (256, 128)}
    linears = sorted([{"name": f"{LAYER}.{k}", "in": i, "out": o} for k, (i, o) in shapes.items()]
                     + [{"name": "lm_head", "in": 128, "out": 128}], key=lambda x: x["name"])
    request = vllm_request(ctx)
    assert request == {"model": str(folders["int4"].resolve()), "dtype": "float16", "linears": linears,
                       "prompts": prompt_ids(ctx), "max_tokens": MAX_NEW_TOKENS, "max_model_len": 128,
                       "generate": True}
    assert all(type(x["in"]) is int and type(x["out"]) is int for x in request["linears"])  # JSON, not tensors
    # the request the recorded result answered (its prompts came back with it)
    recorded = [s["prompt"] for s in unit_engine.recorded("int4")["result"]["generation"]["sequences"]]
    assert request["prompts"] == recorded


def test_request_runs_a_bfloat16_export_in_bfloat16(tmp_path, folders):
    export = unit_engine.int4_export(tmp_path / "int4")
    config = json.loads((export / "config.json").read_text())
    (export / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))
    assert vllm_request(context(export, folders["ref"]))["dtype"] == "bfloat16"


BERT = {"model_type": "bert", "architectures": ["BertModel"], "hidden_size": 32, "num_hidden_layers": 1,
        "num_attention_heads": 2, "intermediate_size": 64, "vocab_size": 64, "max_position_embeddings": 32}


def test_request_for_a_model_that_is_not_a_causal_lm_asks_for_no_generation_and_says_why(tmp_path):
    tensors = {"encoder.layer.0.output.LayerNorm.weight": torch.ones(32)}
    ref = write_folder(tmp_path / "ref", tensors, BERT)
    export = write_folder(tmp_path / "export", {k: v.half() for k, v in tensors.items()}, BERT)
    request = vllm_request(context(export, ref))
    assert request["generate"] is False
    assert request["why_not_generate"] == "not a causal LM: vLLM generation is checked on causal LMs only"
    assert {"name": "encoder.layer.0.attention.self.query", "in": 32, "out": 32} in request["linears"]


def fixed(vocab):
    from qexport.verify.functional import fixed_token_ids

    return fixed_token_ids(vocab, batch=len(PROMPTS), length=12).tolist()


def test_prompts_without_a_tokenizer_are_fixed_ids_within_the_references_vocab(folders):
    assert prompt_ids(ctx_of(folders, "int4")) == fixed(CONFIG["vocab_size"])


def test_prompts_without_a_vocab_size_are_fixed_ids_below_1000(tmp_path):
    config = {k: v for k, v in CONFIG.items() if k != "vocab_size"}
    ref = write_folder(tmp_path / "ref", {NORM: torch.ones(128)}, config)
    export = write_folder(tmp_path / "export", {NORM: torch.ones(128).half()}, config)
    assert prompt_ids(context(export, ref)) == fixed(1000)


def word_tokenizer(folder: Path, ids: dict[str, int] | None = None, pre_tokenize=True) -> Path:
    """A word-level tokenizer over PROMPTS' words (ids from 2; `ids` overrides some), adding <s> as a special token
    unless told not to; without pre-tokenization a whole prompt is one (unknown) token."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for p in PROMPTS for w in p.split()})
    vocab = {"[UNK]": 0, "<s>": 1, **{w: i + 2 for i, w in enumerate(words)}, **(ids or {})}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    if pre_tokenize:
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", unk_token="[UNK]").save_pretrained(folder)
    return folder


def words_of(vocab):
    return [[vocab[w] for w in p.split()] for p in PROMPTS]


def test_prompts_are_the_exports_tokenizer_on_fixed_text_without_special_tokens(tmp_path, folders):
    export = word_tokenizer(unit_engine.int4_export(tmp_path / "int4"))
    words = sorted({w for p in PROMPTS for w in p.split()})
    prompts = prompt_ids(context(export, folders["ref"]))
    # "def fibonacci(n):" is two words: two tokens are enough for a prompt
    assert prompts == words_of({w: i + 2 for i, w in enumerate(words)}) and len(prompts[2]) == 2


def test_prompts_are_cut_to_32_tokens(tmp_path, folders):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    chars = sorted({c for p in PROMPTS for c in p})
    export = unit_engine.int4_export(tmp_path / "int4")
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE({c: i for i, c in enumerate(chars)}, []))
                            ).save_pretrained(export)
    prompts = prompt_ids(context(export, folders["ref"]))
    assert prompts == [[chars.index(c) for c in p[:32]] for p in PROMPTS]
    assert len(PROMPTS[1]) > 32


@pytest.mark.parametrize("why, make", [
    ("one token is the model's vocab size (ids must stay below it)",
     lambda f: word_tokenizer(f, {"model": CONFIG["vocab_size"]})),
    ("a whole prompt is one token", lambda f: word_tokenizer(f, pre_tokenize=False)),
    ("the tokenizer does not load", lambda f: write_folder(f, config=False, files={"tokenizer.json": "{not json",
                                                                                   "tokenizer_config.json": "{}"})),
])
def test_prompts_fall_back_to_fixed_ids_when_the_tokenizer_gives_unusable_ones(tmp_path, folders, why, make):
    export = make(unit_engine.int4_export(tmp_path / "int4"))
    assert prompt_ids(context(export, folders["ref"])) == fixed(CONFIG["vocab_size"]), why


# ---------------------------------------------------------------------------------------------------------------
# The verdict on real results


def test_vllm_generating_int4_like_transformers_passes_with_what_it_checked(folders):
    # recorded: max |dlogprob| 0.0068 over 57 positions, transformers' own fp16 noise 0.0109 (bound 4x that)
    check = judge_vllm(ctx_of(folders, "int4"), result_of("int4"))
    m = check.metrics
    assert check.passed and not check.skipped, check.detail
    assert m["vllm_version"] == "0.32.0" and m["vllm_checked"] == ["config_parse", "scheme_selection", "generation"]
    assert m["vllm_schemes"] == {"unquantized (lm_head)": 1, "CompressedTensorsWNA16 [CPUWNA16LinearKernel]": 7}
    assert m["engine_positions"] == 3 * (12 + MAX_NEW_TOKENS) - 3 and m["engine_tokens"] == 3 * MAX_NEW_TOKENS
    assert m["engine_tokens_agree"] == m["engine_tokens"] and m["engine_token_disagreements_beyond_tie"] == 0
    assert 0 < m["engine_max_abs_dlogprob"] < MAX_ABS_DLOGPROB["float16"] < m["engine_dlogprob_bound"]
    assert m["engine_dlogprob_bound"] == DTYPE_NOISE_FACTOR * m["engine_dtype_noise"]
    assert m["engine_dlogprob_floor"] == MAX_ABS_DLOGPROB["float16"]
    assert check.detail == (
        f"{WHO}: config parsed; 1 Linear -> unquantized (lm_head); 7 Linear -> CompressedTensorsWNA16 "
        f"[CPUWNA16LinearKernel]; generated 57 positions in float16: max |Δlogprob| vs transformers "
        f"{m['engine_max_abs_dlogprob']:.2g} (bound {m['engine_dlogprob_bound']:.2g}: {DTYPE_NOISE_FACTOR:g}x "
        f"transformers' own {m['engine_dtype_noise']:.3g} vs float32), greedy tokens agree 24/24")


def test_vllm_on_the_dense_folder_passes_saying_every_linear_is_unquantized(folders):
    check = judge_vllm(ctx_of(folders, "fp16"), result_of("fp16"))
    assert check.passed, check.detail
    assert check.detail.startswith(f"{WHO}: dense folder (no quantization_config), every Linear unquantized; "
                                   f"generated 57 positions in float16")
    assert check.metrics["vllm_schemes"] == {"unquantized": 8}  # more than three: not listed


def test_vllm_without_a_kernel_passes_saying_generation_was_not_checked(folders):
    result = result_of("int8")
    check = judge_vllm(ctx_of(folders, "int8"), result)
    assert check.passed and not check.skipped
    assert check.detail == (f"{WHO}: config parsed; 1 Linear -> unquantized (lm_head); 7 Linear -> "
                            f"CompressedTensorsWNA16 [no kernel here]. NOT checked: generation "
                            f"({result['not_generated']}).")
    assert check.metrics == {"vllm_version": "0.32.0", "vllm_checked": ["config_parse", "scheme_selection"],
                             "vllm_schemes": {"unquantized (lm_head)": 1, "CompressedTensorsWNA16 [no kernel here]": 7}}
    result["not_generated"] = None
    assert judge_vllm(ctx_of(folders, "int8"), result).detail.endswith(
        "NOT checked: generation (no generation result).")


def test_vllm_off_by_more_than_the_bound_fails_naming_the_bound(folders):
    ctx = ctx_of(folders, "int4")
    result = result_of("int4")
    result["generation"]["sequences"][1]["logprobs"][3] -= 0.2  # a misread scale moves logprobs by 0.1 or more
    check = judge_vllm(ctx, result)
    m = check.metrics
    assert not check.passed
    assert m["engine_max_abs_dlogprob"] > 0.2 - 0.01
    assert check.detail.endswith(
        f": max |Δlogprob| {m['engine_max_abs_dlogprob']:.3g} > {m['engine_dlogprob_bound']:.3g} (float16; "
        f"{DTYPE_NOISE_FACTOR:g}x transformers' own {m['engine_dtype_noise']:.3g} vs float32)")


def test_vllm_choosing_a_token_transformers_ranks_far_lower_fails(folders):
    ctx = ctx_of(folders, "int4")
    result = result_of("int4")
    seq = result["generation"]["sequences"][0]
    seq["tokens"][-1] = (seq["tokens"][-1] + 1) % CONFIG["vocab_size"]  # same logprob claimed, other token
    check = judge_vllm(ctx, result)
    assert not check.passed and check.metrics["engine_token_disagreements_beyond_tie"] == 1
    assert check.metrics["engine_tokens_agree"] == 23
    bound = check.metrics["engine_dlogprob_bound"]
    # its logprob under transformers is far from the one vLLM reported: both findings, joined
    assert check.detail.endswith(f"(float16; {DTYPE_NOISE_FACTOR:g}x transformers' own "
                                 f"{check.metrics['engine_dtype_noise']:.3g} vs float32); 1 greedy token(s) differ "
                                 f"where transformers' top choice leads by more than {bound:.3g}")


# ---------------------------------------------------------------------------------------------------------------
# Schemes: a Linear vLLM would load otherwise than the files store it


def test_quantized_linear_that_vllm_would_load_dense_fails_naming_it(folders):
    result = result_of("int8")
    result["layers"][Q] = {"scheme": None}
    check = judge_vllm(ctx_of(folders, "int8"), result)
    assert not check.passed
    assert check.detail == (f"{WHO}: schemes disagree with the files: {Q} is stored quantized but vLLM would load it "
                            f"dense")
    assert check.metrics["vllm_schemes"]["unquantized (lm_head, " + Q + ")"] == 2


def test_dense_linear_that_vllm_would_load_quantized_fails_naming_scheme(tmp_path, folders):
    export = unit_engine.int4_export(tmp_path / "int4", dense=(DOWN,))
    result = result_of("int4")
    check = judge_vllm(context(export, folders["ref"]), result)
    assert not check.passed
    assert check.detail == (f"{WHO}: schemes disagree with the files: {DOWN} is stored dense but vLLM would load it "
                            f"as CompressedTensorsWNA16")


def test_scheme_listing_shows_three_problems_and_counts_the_rest(folders):
    result = result_of("int8")
    four = [m for m in result["layers"] if m in LINEARS][:4]
    for module in four:
        result["layers"][module] = {"scheme": None}
    check = judge_vllm(ctx_of(folders, "int8"), result)
    shown = ", ".join(f"{m} is stored quantized but vLLM would load it dense" for m in four[:3])
    assert check.detail == f"{WHO}: schemes disagree with the files: {shown} and 1 more"
    assert check.metrics["vllm_schemes"] == {"unquantized": 5, "CompressedTensorsWNA16 [no kernel here]": 3}


def test_scheme_summary_names_up_to_three_unquantized_linears(folders):
    three = {"lm_head": {"scheme": None}, "a": {"scheme": None}, "b": {"scheme": None}, "c": {"scheme": "S"}}
    assert engine_checks._scheme_summary(three) == {"unquantized (lm_head, a, b)": 3, "S [no kernel here]": 1}
    three["c"] = {"scheme": None}
    assert engine_checks._scheme_summary(three) == {"unquantized": 4}


def test_a_linear_the_files_do_not_hold_is_no_scheme_mismatch(folders):
    result = result_of("int8")
    result["layers"]["model.layers.9.mlp.up_proj"] = {"scheme": "CompressedTensorsWNA16", "kernel": "K"}
    check = judge_vllm(ctx_of(folders, "int8"), result)
    assert check.passed, check.detail
    assert "1 Linear -> CompressedTensorsWNA16 [K]" in check.detail


# ---------------------------------------------------------------------------------------------------------------
# A stage that failed in the engine


def test_parser_rejecting_naive_quantized_weight_only_fails_with_the_reason(tmp_path, folders):
    export = unit_engine.int4_export(tmp_path / "naive")
    config = json.loads((export / "config.json").read_text())
    config["quantization_config"]["format"] = "naive-quantized"
    config["quantization_config"]["config_groups"]["group_0"]["format"] = "naive-quantized"
    (export / "config.json").write_text(json.dumps(config))
    check = judge_vllm(context(export, folders["ref"]), unit_engine.recorded("naive")["result"], "x")
    assert not check.passed
    assert check.detail == (
        f"{WHO}: vLLM's compressed-tensors parser rejects the quantization_config: AssertionError at "
        f"vllm/model_executor/layers/quantization/compressed_tensors/compressed_tensors.py:367 (format "
        f"naive-quantized with no input_activations: vLLM reads naive-quantized as activation quantization; "
        f"weight-only int loads in vLLM only as pack-quantized)")
    assert check.metrics == {"vllm_version": "0.32.0", "vllm_checked": []}


def error(stage, message="boom", where="x.py:1", **extra):
    return {"stage": stage, "type": "RuntimeError", "message": message, "where": where, **extra}


@pytest.mark.parametrize("stage, said", [
    ("import", "cannot import vLLM"),
    ("scheme_selection", f"vLLM finds no scheme for {Q}"),
    ("generation", "vLLM fails to run the model"),
    ("config_parse", "vLLM's compressed-tensors parser rejects the quantization_config"),
    ("somewhere_new", "somewhere_new")])
def test_a_failed_stage_fails_saying_which_and_what_was_checked_before(folders, stage, said):
    result = result_of("int4", stages=["config_parse", "scheme_selection"], error=error(stage, layer=Q))
    check = judge_vllm(ctx_of(folders, "int4"), result, "t" * 700)
    # the output tail only where the engine itself broke; the parser's verdict says all in its message
    output = f"; output tail: {'t' * 600}" if stage in ("import", "generation") else ""
    assert not check.passed
    assert check.detail == (f"{WHO}: {said}: RuntimeError: boom at x.py:1 (checked before: config_parse, "
                            f"scheme_selection){output}")
    assert check.metrics == {"vllm_version": "0.32.0", "vllm_checked": ["config_parse", "scheme_selection"]}


def test_a_message_keeps_its_last_character_and_an_empty_one_leaves_the_type(folders):
    result = result_of("int4", stages=[], error=error("generation", message="bad tensor X", where=None))
    assert judge_vllm(ctx_of(folders, "int4"), result).detail == (
        f"{WHO}: vLLM fails to run the model: RuntimeError: bad tensor X; output tail: (none)")
    result = result_of("int4", stages=[], error=error("config_parse", message="", where=None))
    assert judge_vllm(ctx_of(folders, "int4"), result).detail == (
        f"{WHO}: vLLM's compressed-tensors parser rejects the quantization_config: RuntimeError")


def test_an_engine_that_broke_without_output_says_so(folders):
    # no version, platform or stages reported (a child older than the protocol's keys), no output tail passed
    result = {"protocol": 1, "dtype": "float16", "layers": {}, "generation": None,
              "not_generated": None, "error": error("import", message=" " + "m" * 500, where=None)}
    check = judge_vllm(ctx_of(folders, "int4"), result)
    assert check.detail == f"vLLM ? (?): cannot import vLLM: RuntimeError:  {'m' * 399}; output tail: (none)"
    assert check.metrics == {"vllm_version": None, "vllm_checked": []}


@pytest.mark.parametrize("qc, hint", [
    ({"format": "pack-quantized", "config_groups": {"g": {"format": "naive-quantized"}}}, True),
    ({"format": "naive-quantized", "config_groups": {"g": {"weights": {}}, "h": "not a group"}}, True),
    ({"format": "pack-quantized", "config_groups": {"g": {"format": None}}}, False),
    ({"config_groups": {"g": {"format": "naive-quantized", "input_activations": {"num_bits": 8}}}}, False),
    ({"config_groups": {"g": {"format": "naive-quantized"}, "h": {"input_activations": {"num_bits": 8}}}}, False),
    ({"config_groups": {"g": {"format": "naive-quantized", "input_activations": None}}}, True),
    ({"format": "naive-quantized", "config_groups": None}, False),
    ({"format": "naive-quantized", "config_groups": [{"format": "naive-quantized"}]}, False),
    ("naive-quantized", False),
    (None, False)])
def test_naive_quantized_hint_only_for_weight_only_naive_configs(folders, qc, hint):
    ctx = ctx_of(folders, "int4")
    ctx.qc = qc
    got = engine_checks._naive_hint(ctx)
    assert got == (" (format naive-quantized with no input_activations: vLLM reads naive-quantized as activation "
                   "quantization; weight-only int loads in vLLM only as pack-quantized)" if hint else "")


def test_naive_hint_is_given_for_parser_rejections_only(folders):
    ctx = ctx_of(folders, "int4")
    ctx.qc = {"config_groups": {"g": {"format": "naive-quantized"}}}
    result = result_of("int4", error=error("generation"))
    assert "naive-quantized" not in judge_vllm(ctx, result).detail


# ---------------------------------------------------------------------------------------------------------------
# compare_logprobs' arithmetic, on transformers' scores stubbed with exact numbers


def stub_scores(monkeypatch, low, exact):
    monkeypatch.setattr(engine_checks, "_score", lambda folder, dtype, sequences: {
        torch.float16: low, torch.bfloat16: low, torch.float32: exact}[dtype])


def rows(*targets, vocab=8, at=-0.5):
    """log-probabilities, -30 everywhere but `at` on row i's target i."""
    r = torch.full((len(targets), vocab), -30.0)
    for i, t in enumerate(targets):
        r[i, t] = at
    return r


def sequence(prompt, tokens, engine):
    """A child sequence whose logprobs (prompt's after its first token, then generated) are `engine`."""
    n = len(prompt) - 1
    return {"prompt": prompt, "prompt_logprobs": [None] + engine[:n], "tokens": tokens, "logprobs": engine[n:]}


@pytest.mark.parametrize("dtype, floor", [("float16", 1e-2), ("bfloat16", 5e-2)])
def test_bound_is_the_dtypes_floor_while_transformers_own_noise_is_small(monkeypatch, folders, dtype, floor):
    low = [rows(2, 3, 4)]
    exact = [low[0].clone()]
    exact[0][1, 3] += floor / DTYPE_NOISE_FACTOR / 2  # noise x factor stays under the floor
    stub_scores(monkeypatch, low, exact)
    seq = sequence([1, 2, 3], [4], [-0.5, -0.5, -0.5])
    got = compare_logprobs(ctx_of(folders, "int4"), {"dtype": dtype, "generation": {"sequences": [seq]}})
    assert got == {"engine_max_abs_dlogprob": 0.0, "engine_positions": 3, "engine_tokens": 1,
                   "engine_tokens_agree": 1, "engine_token_disagreements_beyond_tie": 0,
                   "engine_dtype_noise": pytest.approx(floor / DTYPE_NOISE_FACTOR / 2, rel=1e-4),  # float32 rows
                   "engine_dlogprob_floor": floor, "engine_dlogprob_bound": floor}
    assert engine_checks._bound_origin(got) == (f"floor; transformers' own noise vs float32 "
                                                f"{got['engine_dtype_noise']:.3g}")


def test_bound_scales_with_noise_and_a_difference_exactly_at_it_passes(monkeypatch, folders):
    # values exact in binary: noise 0.125 at one position of the second sequence -> bound DTYPE_NOISE_FACTOR x 0.125
    bound = DTYPE_NOISE_FACTOR * 0.125
    low = [rows(2, 3, 4), rows(5, 6, 7)]
    exact = [low[0].clone(), low[1].clone()]
    exact[1][0, 5] = -0.625
    stub_scores(monkeypatch, low, exact)
    seqs = [sequence([1, 2, 3], [4], [-0.5, -0.5, -0.5]), sequence([4, 5], [6, 7], [-0.5 - bound, -0.5, -0.5])]
    result = {"dtype": "float16", "generation": {"sequences": seqs}, "stages": [], "layers": {},
              "quant_method": None, "vllm_version": "0.32.0", "platform": "cpu"}
    ctx = ctx_of(folders, "int4")
    got = compare_logprobs(ctx, result)
    assert got == {"engine_max_abs_dlogprob": bound, "engine_positions": 6, "engine_tokens": 3,
                   "engine_tokens_agree": 3, "engine_token_disagreements_beyond_tie": 0, "engine_dtype_noise": 0.125,
                   "engine_dlogprob_floor": 1e-2, "engine_dlogprob_bound": bound}
    assert engine_checks._bound_origin(got) == f"{DTYPE_NOISE_FACTOR:g}x transformers' own 0.125 vs float32"
    check = judge_vllm(ctx, result)
    assert check.passed, check.detail  # |dlogprob| exactly the bound
    # a hair beyond it fails: vLLM's numbers are compared in double precision (1e-9 is lost in float32)
    seqs[1]["prompt_logprobs"][1] = -0.5 - bound - 1e-9
    assert not judge_vllm(ctx, result).passed


def test_another_greedy_token_within_the_bound_is_a_tie_and_beyond_it_a_failure(monkeypatch, folders):
    # transformers' top choice at the generated position is token 4 (-0.5); the engine took token 5
    low = [rows(2, 3, 4)]
    exact = [low[0].clone()]
    exact[0][0, 2] = -0.625  # noise 0.125: bound DTYPE_NOISE_FACTOR x 0.125
    bound = DTYPE_NOISE_FACTOR * 0.125
    stub_scores(monkeypatch, low, exact)
    ctx = ctx_of(folders, "int4")

    def judged(runner_up: float):
        low[0][2, 5] = exact[0][2, 5] = runner_up
        seq = sequence([1, 2, 3], [5], [-0.5, -0.5, runner_up])
        return compare_logprobs(ctx, {"dtype": "float16", "generation": {"sequences": [seq]}})

    tie = judged(-0.5 - bound)  # leads by exactly the bound: a tie
    assert tie["engine_tokens_agree"] == 0 and tie["engine_token_disagreements_beyond_tie"] == 0
    beyond = judged(-0.5 - bound - 0.0625)
    assert beyond["engine_tokens_agree"] == 0 and beyond["engine_token_disagreements_beyond_tie"] == 1
    seq = sequence([1, 2, 3], [5], [-0.5, -0.5, -0.5 - bound - 0.0625])
    low.append(low[0])
    exact.append(exact[0])
    twice = compare_logprobs(ctx, {"dtype": "float16", "generation": {"sequences": [seq, seq]}})
    assert twice["engine_tokens"] == 2 and twice["engine_token_disagreements_beyond_tie"] == 2


def test_transformers_scores_every_position_in_the_engines_dtype_and_in_float32(folders):
    # a perfect engine: transformers' own fp16 logprobs of the recorded sequences, computed here independently
    from qexport.verify.functional import load_model

    ctx = ctx_of(folders, "int4")
    result = result_of("int4")
    seqs = result["generation"]["sequences"]
    scored = {}
    for dtype in (torch.float16, torch.float32):
        model, _ = load_model(ctx.export, dtype=dtype)
        with torch.no_grad():
            scored[dtype] = [torch.log_softmax(model(input_ids=torch.tensor([s["prompt"] + s["tokens"]])).logits[0]
                                               .float(), -1) for s in seqs]
    noise = 0.0
    for s, lo, ex in zip(seqs, scored[torch.float16], scored[torch.float32]):
        ids = s["prompt"] + s["tokens"]
        lps = [lo[i - 1, ids[i]].item() for i in range(1, len(ids))]
        s["prompt_logprobs"], s["logprobs"] = [None] + lps[:len(s["prompt"]) - 1], lps[len(s["prompt"]) - 1:]
        noise = max(noise, max(abs(lo[i - 1, ids[i]].double() - ex[i - 1, ids[i]].double()).item()
                               for i in range(1, len(ids))))
    got = compare_logprobs(ctx, result)
    assert got["engine_max_abs_dlogprob"] == 0.0
    assert got["engine_dtype_noise"] == noise > 0
    assert got["engine_tokens_agree"] == 24


# ---------------------------------------------------------------------------------------------------------------
# check_engine_vllm end to end, with an interpreter that answers like vLLM's child


def answering(tmp_path, body: str) -> str:
    """An executable standing in for vLLM's interpreter: `sh` running `body` with $2 = request, $3 = result."""
    python = tmp_path / "bin" / "python"
    python.parent.mkdir(parents=True, exist_ok=True)
    python.write_text(f"#!/bin/sh\n{body}\n")
    python.chmod(0o755)
    return str(python)


def with_engine(ctx, python, explicit=True):
    ctx.engines = {"vllm": EngineSpec("vllm", python, explicit)}
    return ctx


def test_vllm_check_sends_the_request_and_judges_the_answer(tmp_path, folders):
    answer = tmp_path / "answer.json"
    answer.write_text(json.dumps(unit_engine.recorded("int4")["result"]))
    python = answering(tmp_path, f'cp "$2" {tmp_path}/sent.json; cp {answer} "$3"')
    ctx = with_engine(ctx_of(folders, "int4"), python)
    check = check_vllm(ctx)
    assert check.passed, check.detail
    assert check.detail == judge_vllm(ctx, unit_engine.recorded("int4")["result"]).detail
    assert json.loads((tmp_path / "sent.json").read_text()) == vllm_request(ctx)


def test_vllm_check_fails_naming_the_interpreter_when_the_child_dies(tmp_path, folders):
    python = answering(tmp_path, "echo 'Segmentation fault'; exit 3")
    check = check_vllm(with_engine(ctx_of(folders, "int4"), python))
    assert not check.passed
    assert check.detail == (f"engine vLLM ({python}) exited with code 3 without writing its result; output tail: "
                            f"Segmentation fault")
    silent = answering(tmp_path, "exit 3")
    assert check_vllm(with_engine(ctx_of(folders, "int4"), silent)).detail.endswith("; output tail: (none)")


def test_vllm_check_shows_the_childs_output_when_the_engine_broke(tmp_path, folders):
    answer = tmp_path / "answer.json"
    answer.write_text(json.dumps(result_of("int4", generation=None, stages=["config_parse", "scheme_selection"],
                                           error=error("generation", message="engine core died", where=None))))
    python = answering(tmp_path, f"echo 'RuntimeError: out of memory in the KV cache'; cp {answer} \"$3\"")
    check = check_vllm(with_engine(ctx_of(folders, "int4"), python))
    assert not check.passed
    assert check.detail == (f"{WHO}: vLLM fails to run the model: RuntimeError: engine core died (checked before: "
                            f"config_parse, scheme_selection); output tail: RuntimeError: out of memory in the KV "
                            f"cache")


@pytest.mark.parametrize("explicit", [True, False])
def test_vllm_check_without_its_interpreter_fails_if_asked_for_else_skips(tmp_path, folders, explicit):
    missing = str(tmp_path / "nope" / "python")
    check = check_vllm(with_engine(ctx_of(folders, "int4"), missing, explicit))
    assert check.passed is not explicit and check.skipped is not explicit
    assert check.detail.startswith(f"engine vLLM cannot run: interpreter {missing} does not exist")


@pytest.mark.parametrize("engines", [None, {}, {"other": EngineSpec("other", "x")}])
def test_vllm_check_not_asked_for_is_skipped(folders, engines):
    ctx = ctx_of(folders, "int4")
    if engines is not None:
        ctx.engines = engines
    check = check_vllm(ctx)
    assert check.skipped and check.detail == "vLLM not asked for (--engine vllm)"


def test_vllm_check_on_unreadable_shards_fails_without_running_the_engine(tmp_path, folders):
    export = unit_engine.int4_export(tmp_path / "int4")
    (export / "model.safetensors").write_bytes(b"\x00" * 4)
    ran = tmp_path / "ran"
    ctx = with_engine(context(export, folders["ref"]), answering(tmp_path, f"touch {ran}"))
    check = check_vllm(ctx)
    assert not check.passed and not ran.exists()
    assert check.detail == f"engine vLLM not run: the export's shards are unreadable ({ctx.ckpt_error})"
    assert "model.safetensors" in ctx.ckpt_error


# ---------------------------------------------------------------------------------------------------------------
# sentence-transformers, with a stand-in library


class FakeST:
    """SentenceTransformer as the check uses it: built from a folder, [0].auto_model, encode. `plan[folder name]`
    says what a folder gives: embeddings, or ("compressed", exception) for a model whose Linears kept compressed
    tensors (no float `weight`), or an exception raised on load; with model_kwargs["quantization_config"]
    (dequantize=True) `plan[folder name + " dequantized"]` is used instead."""

    plan: ClassVar[dict] = {}
    built: ClassVar[list] = []

    def __init__(self, folder, device=None, model_kwargs=None, trust_remote_code=None):
        from qexport.verify.functional import SENTENCES

        assert trust_remote_code is False  # the check never lets a folder's code run (io.library_guard)
        torch.device(device)  # as the real one: an unknown device is an error
        self.device, self.folder = device, Path(folder)
        FakeST.built.append(self)
        key = self.folder.name
        if model_kwargs is not None:
            assert model_kwargs["quantization_config"].dequantize is True
            key += " dequantized"
        self.what = FakeST.plan[key]
        if isinstance(self.what, Exception):
            raise self.what
        self.module = types.SimpleNamespace(auto_model=torch.nn.Sequential(torch.nn.LayerNorm(4)))
        if isinstance(self.what, tuple) and self.what[0] == "compressed":
            for name in ("query", "key", "value"):
                linear = torch.nn.Linear(4, 4)
                del linear.weight
                linear.weight_packed = torch.zeros(4, 1, dtype=torch.int32)
                self.module.auto_model.add_module(name, linear)
        self.sentences = list(SENTENCES)

    def __getitem__(self, i):
        assert i == 0
        return self.module

    def encode(self, sentences, convert_to_numpy=False):
        assert sentences == self.sentences and convert_to_numpy is True
        if isinstance(self.what, tuple):
            raise self.what[1]
        return np.asarray(self.what, dtype=np.float32)


@pytest.fixture
def fake_st(monkeypatch):
    monkeypatch.setitem(sys.modules, "sentence_transformers",
                        types.SimpleNamespace(__version__="9.9.9", SentenceTransformer=FakeST))
    FakeST.built = []
    return FakeST


MODULES = {"modules.json": "[]"}
REF = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])


def st_folders(tmp_path, export_files=MODULES, ref_files=MODULES, thresholds=None):
    ref = write_folder(tmp_path / "ref", {NORM: torch.ones(128)}, CONFIG, ref_files)
    export = write_folder(tmp_path / "export", {NORM: torch.ones(128).half()}, CONFIG, export_files)
    return context(export, ref, thresholds)


def test_st_export_embedding_like_the_reference_passes_with_the_cosine(tmp_path, fake_st):
    fake_st.plan = {"ref": REF, "export": REF * 2}
    check = check_st(st_folders(tmp_path, thresholds={"min_cosine": 1.0}))
    assert check.passed and not check.skipped
    assert check.detail == "sentence-transformers 9.9.9: loads and encodes; cosine vs reference 1.0000 (min 1.0000)"
    assert check.metrics == {"st_loads": True, "st_cosine": pytest.approx(1.0), "st_cosine_min": pytest.approx(1.0)}
    assert [(m.folder.name, m.device) for m in fake_st.built] == [("ref", "cpu"), ("export", "cpu")]


def test_st_cosine_below_the_threshold_fails_naming_it(tmp_path, fake_st):
    # cosines 1, 1, 1/sqrt(2): mean 0.9024, min 0.7071
    fake_st.plan = {"ref": REF, "export": np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])}
    check = check_st(st_folders(tmp_path, thresholds={"min_cosine": 0.95}))
    assert not check.passed
    assert check.detail == ("sentence-transformers 9.9.9: loads and encodes; cosine vs reference 0.9024 (min 0.7071) "
                            "< 0.95")
    assert check.metrics["st_cosine"] == pytest.approx((2 + 2 ** -0.5) / 3)
    assert check.metrics["st_cosine_min"] == pytest.approx(2 ** -0.5)
    assert check_st(st_folders(tmp_path, thresholds={"min_cosine": None})).passed  # no threshold: reported only


def test_st_cosine_exactly_at_the_threshold_passes(tmp_path, fake_st):
    other = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    fake_st.plan = {"ref": REF, "export": other}
    at = torch.nn.functional.cosine_similarity(torch.as_tensor(REF).float(), torch.as_tensor(other).float(),
                                               dim=-1).mean().item()
    assert check_st(st_folders(tmp_path, thresholds={"min_cosine": at})).passed


def test_st_export_that_fails_to_load_fails_with_the_error(tmp_path, fake_st):
    fake_st.plan = {"ref": REF, "export": OSError("no   such\nfile " + "x" * 300)}
    check = check_st(st_folders(tmp_path))
    assert not check.passed
    assert check.detail == ("sentence-transformers 9.9.9: SentenceTransformer(export) fails: OSError: no such file "
                            + "x" * (200 - len("no such file ")))


def test_st_export_failing_to_encode_with_nothing_compressed_fails_with_the_error(tmp_path, fake_st):
    fake_st.plan = {"ref": REF, "export": ("plain", RuntimeError("shapes cannot be multiplied"))}
    check = check_st(st_folders(tmp_path))
    assert not check.passed
    assert check.detail == ("sentence-transformers 9.9.9: SentenceTransformer(export) fails: RuntimeError: shapes "
                            "cannot be multiplied")


def test_st_export_still_compressed_fails_naming_upstream_cause_layers_and_measured_workaround(tmp_path, fake_st):
    fake_st.plan = {"ref": REF, "export": ("compressed", AttributeError("'Linear' object has no attribute 'weight'")),
                    "export dequantized": np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])}
    check = check_st(st_folders(tmp_path))
    assert not check.passed and check.metrics == {"st_loads": False}
    assert check.detail == (
        "sentence-transformers 9.9.9: SentenceTransformer(export).encode fails: AttributeError: 'Linear' object has "
        "no attribute 'weight'. Upstream cause, not the folder: sentence-transformers calls the model's forward() "
        "directly (base/modules/transformer.py, Transformer.forward), which skips the forward pre-hook that "
        "compressed-tensors registers to decompress the weights on the first call "
        "(ModelCompressor.add_decompress_hook), so query, key and 1 more keep their compressed tensors. Workaround "
        "(measured): SentenceTransformer(export, model_kwargs={'quantization_config': "
        "CompressedTensorsConfig(dequantize=True)}) loads it, cosine 0.9024 (min 0.7071).")


def test_st_workaround_failing_too_is_said(tmp_path, fake_st):
    fake_st.plan = {"ref": REF, "export": ("compressed", AttributeError("no weight")),
                    "export dequantized": ValueError("bad\n  " + "y" * 200)}
    check = check_st(st_folders(tmp_path))
    assert not check.passed
    assert check.detail.endswith("keep their compressed tensors. The dequantize-on-load workaround fails too: "
                                 "ValueError: bad " + "y" * (150 - 4))


@pytest.mark.parametrize("export_files, ref_files, failed, said", [
    ({}, MODULES, True, ("the reference is a sentence-transformers model (modules.json) but the export has no "
                         "modules.json: SentenceTransformer(export) would not rebuild its pooling")),
    ({}, {}, False, "not a sentence-transformers folder (no modules.json)"),
    # a folder named modules.json is not the file
    ({"modules.json/x": ""}, MODULES, True, "the reference is a sentence-transformers model"),
])
def test_st_folder_without_modules_json(tmp_path, fake_st, export_files, ref_files, failed, said):
    check = check_st(st_folders(tmp_path, export_files, ref_files))
    assert check.passed is not failed and check.skipped is not failed
    assert check.detail.startswith(said) if failed else check.detail == said
    assert fake_st.built == []


def test_st_not_installed_skips_saying_not_checked(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)  # import raises ImportError
    check = check_st(st_folders(tmp_path))
    assert check.skipped
    assert check.detail == "the folder has modules.json but sentence-transformers is not installed: not checked"


@pytest.mark.parametrize("attr", ["auto_model", "model"])
def test_still_compressed_lists_linears_without_a_float_weight(attr):
    inner = torch.nn.Module()
    inner.dense = torch.nn.Linear(2, 2)
    inner.packed = torch.nn.Linear(2, 2)
    del inner.packed.weight
    inner.int8 = torch.nn.Linear(2, 2)
    inner.int8.weight = torch.nn.Parameter(torch.zeros(2, 2, dtype=torch.int8), requires_grad=False)
    inner.norm = torch.nn.LayerNorm(2)
    del inner.norm.weight
    assert engine_checks._still_compressed([types.SimpleNamespace(**{attr: inner})]) == ["packed", "int8"]
    assert engine_checks._still_compressed([types.SimpleNamespace()]) == []
