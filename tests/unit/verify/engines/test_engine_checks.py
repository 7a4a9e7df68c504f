"""Engine checks without vLLM: the child's result protocol, the missing-interpreter behaviour, the verdict drawn
from a child's result, and sentence-transformers on the MiniLM exports. (vLLM itself: tests/unit/verify/engines/test_vllm.py,
marker `engine`.)"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from qexport.cli.main import main
from qexport.verify.engines.runner import ChildFailed, EngineSpec, parse_engine, read_result, run_child
from qexport.errors import InputError
from qexport.verify import verify
from qexport.verify.context import Context
from qexport.verify.engine_checks import MAX_ABS_DLOGPROB, judge_vllm, prompt_ids

pytest_plugins = ["pytester"]


def child_result(**changes) -> dict:
    result = {"protocol": 1, "vllm_version": "0.32.0", "platform": "cpu", "dtype": "float16", "stages": [],
              "layers": {}, "generation": None, "not_generated": None, "error": None}
    result.update(changes)
    return result


# ---------------------------------------------------------------------------------------------------------------
# The protocol and the interpreter


def test_result_protocol_round_trips():
    result = child_result(stages=["config_parse"])
    assert read_result(json.dumps(result), 0) == result


@pytest.mark.parametrize("text, code, message", [
    (None, 1, "exited with code 1 without writing its result"),
    ("{not json", 0, "unreadable result"),
    (json.dumps({"protocol": 2, "stages": [], "layers": {}}), 0, "protocol 2"),
    (json.dumps([1, 2]), 0, "protocol 'list'"),
    (json.dumps({"protocol": 1, "layers": {}}), 0, "no stages list"),
    (json.dumps(child_result(generation={"sequences": [{"prompt": [1, 2], "prompt_logprobs": [None, -1.0],
                                                         "tokens": [3], "logprobs": []}]})), 0, "differ in length"),
])
def test_result_protocol_rejects_what_it_cannot_read(text, code, message):
    with pytest.raises(ChildFailed, match=message):
        read_result(text, code, tail="last words")


def test_child_dying_after_saving_progress_is_a_generation_error():
    result = read_result(json.dumps(child_result(stages=["config_parse", "scheme_selection"])), -9)
    assert result["error"]["stage"] == "generation" and "-9" in result["error"]["message"]


def test_engine_option_names_interpreter_env_then_default(monkeypatch):
    monkeypatch.delenv("QEXPORT_VLLM_PYTHON", raising=False)
    assert parse_engine("vllm").python == str(Path.home() / ".cache/qexport/vllm-venv/bin/python")
    monkeypatch.setenv("QEXPORT_VLLM_PYTHON", "/opt/v/bin/python")
    assert parse_engine("vllm").python == "/opt/v/bin/python"
    assert parse_engine("vllm=/x/python").python == "/x/python"


@pytest.mark.parametrize("value", ["tgi", "vllm="])
def test_engine_option_rejects_unknown_engine_or_empty_interpreter(value):
    with pytest.raises(InputError, match="--engine"):
        parse_engine(value)


def test_explicit_engine_with_missing_interpreter_fails_naming_vllm(capsys, qwen3_out, qwen3_src, tmp_path):
    code = main(["verify", str(qwen3_out / "int4"), "--reference", str(qwen3_src),
                 "--engine", f"vllm={tmp_path / 'nope' / 'python'}"])
    out, err = capsys.readouterr()
    assert code == 1
    assert "FAILED  engine_vllm" in out and "engine vLLM cannot run" in out and "does not exist" in out
    assert "engine_vllm" in err  # the one-line verdict names the engine


def test_implicit_engine_with_missing_interpreter_is_skipped_with_reason(qwen3_out, qwen3_src, tmp_path):
    spec = EngineSpec("vllm", str(tmp_path / "nope"), explicit=False)
    [check] = verify(qwen3_out / "int4", qwen3_src, only=["engine_vllm"], engines=[spec]).checks
    assert check.skipped and "does not exist" in check.detail


def test_interpreter_without_vllm_fails_at_import(qwen3_out, qwen3_src):
    # qexport's own interpreter has no vLLM: the child starts, reports the failed import, and the check says so.
    [check] = verify(qwen3_out / "int4", qwen3_src, only=["engine_vllm"],
                     engines=[parse_engine(f"vllm={sys.executable}")]).checks
    assert not check.passed and "cannot import vLLM" in check.detail and "vllm" in check.detail


def test_gate_engine_option_adds_a_failing_item_when_vllm_cannot_run(pytester, qwen3_src, tmp_path):
    result = pytester.runpytest(f"--qexport-model={qwen3_src}", "--qexport-formats", "int4",
                                f"--qexport-engine=vllm={tmp_path / 'nope'}", "-k", "engine", "-p",
                                "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*qexport int4 engine_vllm: engine vLLM cannot run: interpreter * does not exist*"])


def test_child_timeout_is_reported_with_limit(tmp_path):
    slow = tmp_path / "python"
    slow.write_text("#!/bin/sh\necho starting engine\nsleep 30\n")
    slow.chmod(0o755)
    with pytest.raises(ChildFailed, match="timed out after 1 s") as info:
        run_child(str(slow), {"model": str(tmp_path)}, timeout=1)
    assert "starting engine" in info.value.output_tail


# ---------------------------------------------------------------------------------------------------------------
# The verdict drawn from a child's result


def test_parser_rejection_fails_and_explains_naive_quantized(qwen3_out, qwen3_src, tmp_path):
    folder = tmp_path / "naive"
    import shutil

    shutil.copytree(qwen3_out / "int4", folder)
    config = json.loads((folder / "config.json").read_text())
    qc = config["quantization_config"]
    qc["format"] = qc["config_groups"]["group_0"]["format"] = "naive-quantized"
    (folder / "config.json").write_text(json.dumps(config))
    error = {"stage": "config_parse", "type": "AssertionError", "message": "", "where": "compressed_tensors.py:367"}
    check = judge_vllm(Context(folder, qwen3_src), child_result(error=error))
    assert not check.passed
    assert "parser rejects" in check.detail and "naive-quantized" in check.detail and ":367" in check.detail


def test_quantized_linear_that_vllm_loads_dense_fails(qwen3_out, qwen3_src):
    ctx = Context(qwen3_out / "int4", qwen3_src)
    layers = {"model.layers.0.self_attn.q_proj": {"scheme": None}, "lm_head": {"scheme": None}}
    check = judge_vllm(ctx, child_result(stages=["config_parse", "scheme_selection"], layers=layers,
                                         quant_method="compressed-tensors", not_generated="x"))
    assert not check.passed and "q_proj is stored quantized but vLLM would load it dense" in check.detail


def test_quantized_files_without_quantization_config_fail(qwen3_out, qwen3_src, tmp_path):
    import shutil

    folder = shutil.copytree(qwen3_out / "int4", tmp_path / "int4")
    config = json.loads((folder / "config.json").read_text())
    del config["quantization_config"]
    (folder / "config.json").write_text(json.dumps(config))
    ctx = Context(folder, qwen3_src)
    layers = {w[:-7]: {"scheme": None} for w in ctx.arch.linear_weights}  # what the child reports for a dense config
    check = judge_vllm(ctx, child_result(stages=["config_parse"], layers=layers, quant_method=None,
                                         not_generated="x"))
    assert not check.passed and "stored quantized but vLLM would load it dense" in check.detail


def test_no_kernel_passes_but_says_generation_was_not_checked(qwen3_out, qwen3_src):
    ctx = Context(qwen3_out / "int4", qwen3_src)
    layers = {w[:-7]: {"scheme": "CompressedTensorsWNA16", "kernel": None, "kernel_error": "no"}
              for w in ctx.arch.linear_weights if w != "lm_head.weight"}
    layers["lm_head"] = {"scheme": None}
    check = judge_vllm(ctx, child_result(stages=["config_parse", "scheme_selection"], layers=layers,
                                         quant_method="compressed-tensors",
                                         not_generated="no kernel on this platform: uint8b128"))
    assert check.passed and not check.skipped
    assert "14 Linear -> CompressedTensorsWNA16 [no kernel here]" in check.detail
    assert "NOT checked: generation (no kernel on this platform: uint8b128)" in check.detail


def transformers_generation(folder, prompts, steps=4) -> dict:
    """What a perfect engine would answer: transformers' own greedy tokens and logprobs (fp16)."""
    from qexport.verify.functional import load_model

    model, _ = load_model(folder, dtype=torch.float16)
    sequences = []
    with torch.no_grad():
        for prompt in prompts:
            ids = list(prompt)
            for _ in range(steps):
                ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
            lps = [logp[i - 1, ids[i]].item() for i in range(1, len(ids))]
            sequences.append({"prompt": prompt, "prompt_logprobs": [None] + lps[:len(prompt) - 1],
                              "tokens": ids[len(prompt):], "logprobs": lps[len(prompt) - 1:]})
    return {"sequences": sequences}


def test_engine_equal_to_transformers_passes_and_off_by_0_05_fails(qwen3_out, qwen3_src):
    ctx = Context(qwen3_out / "fp16", qwen3_src)
    generation = transformers_generation(ctx.export, prompt_ids(ctx))
    same = judge_vllm(ctx, child_result(stages=["config_parse", "generation"], generation=generation))
    assert same.passed and same.metrics["engine_max_abs_dlogprob"] == 0
    assert same.metrics["engine_tokens_agree"] == same.metrics["engine_tokens"] == 12
    # A misread scale or packing moves logprobs by far more than fp16 rounding (~1e-3 measured).
    generation["sequences"][1]["logprobs"][2] -= 0.05
    off = judge_vllm(ctx, child_result(stages=["config_parse", "generation"], generation=generation))
    assert not off.passed and f"> {MAX_ABS_DLOGPROB['float16']:g} (float16; floor" in off.detail


def test_engine_picking_another_token_beyond_a_tie_fails(qwen3_out, qwen3_src):
    ctx = Context(qwen3_out / "fp16", qwen3_src)
    generation = transformers_generation(ctx.export, prompt_ids(ctx)[:1], steps=1)
    seq = generation["sequences"][0]
    with torch.no_grad():
        from qexport.verify.functional import load_model

        model, _ = load_model(ctx.export, dtype=torch.float16)
        logp = torch.log_softmax(model(input_ids=torch.tensor([seq["prompt"]])).logits[0, -1].float(), -1)
    worst = int(logp.argmin())
    seq["tokens"], seq["logprobs"] = [worst], [logp[worst].item()]
    check = judge_vllm(ctx, child_result(stages=["config_parse", "generation"], generation=generation))
    assert not check.passed and "1 greedy token(s) differ" in check.detail


# ---------------------------------------------------------------------------------------------------------------
# sentence-transformers


@pytest.fixture(scope="module")
def minilm_out(minilm_src, export_model):
    out, _ = export_model(minilm_src)
    return out


def st_check(out, src, fmt):
    [check] = verify(out / fmt, src, only=["engine_sentence_transformers"]).checks
    return check


def test_sentence_transformers_loads_minilm_fp16_export(minilm_out, minilm_src):
    check = st_check(minilm_out, minilm_src, "fp16")
    # fp16 rounding of MiniLM's weights: cosine measured 1.0000 (fp16 threshold 0.9999).
    assert check.passed and check.metrics["st_cosine"] >= 0.9999


@pytest.mark.parametrize("fmt,floor", [("int8", 0.999), ("int4", 0.93)])
def test_sentence_transformers_loads_quantized_minilm_exports(minilm_out, minilm_src, fmt, floor):
    # Our exports of a sentence-transformers folder carry `dequantize: true` (export.output_config), so
    # SentenceTransformer(export) decompresses on load. Floors: the format's cosine thresholds (thresholds.py;
    # measured 0.9996 int8, 0.946 int4).
    check = st_check(minilm_out, minilm_src, fmt)
    assert check.passed, check.detail
    assert check.metrics["st_cosine"] >= floor


def test_sentence_transformers_fails_a_folder_without_dequantize_naming_upstream_cause(minilm_out, minilm_src,
                                                                                      tmp_path):
    # As other tools write it: sentence-transformers 6.2 calls model.forward() directly, so compressed-tensors'
    # decompress-on-first-forward hook never runs. Not passed silently: failed, with the cause and the workaround.
    import shutil

    folder = Path(shutil.copytree(minilm_out / "int8", tmp_path / "int8"))
    config = json.loads((folder / "config.json").read_text())
    del config["quantization_config"]["dequantize"]
    (folder / "config.json").write_text(json.dumps(config))
    check = st_check(folder.parent, minilm_src, "int8")
    assert not check.passed
    assert "'Linear' object has no attribute 'weight'" in check.detail
    assert "Upstream cause" in check.detail and "add_decompress_hook" in check.detail
    assert "CompressedTensorsConfig(dequantize=True)" in check.detail and "cosine 0.9" in check.detail


def test_causal_lm_has_no_sentence_transformers_row(qwen3_out, qwen3_src):
    names = [c.name for c in verify(qwen3_out / "fp16", qwen3_src, only=["engine_sentence_transformers"]).checks]
    assert names == []


def test_export_that_lost_modules_json_fails(minilm_out, minilm_src, tmp_path):
    import shutil

    folder = shutil.copytree(minilm_out / "fp16", tmp_path / "fp16")
    (folder / "modules.json").unlink()
    check = st_check(tmp_path, minilm_src, "fp16")
    assert not check.passed and "no modules.json" in check.detail


def test_engine_bound_scales_with_the_models_own_rounding_noise(qwen3_out, qwen3_src, monkeypatch):
    # A real model's bf16 logprobs move by ~0.3 from float32 on their own (SmolLM2-135M: 0.107-0.360); an engine
    # within the factor times that noise agrees with transformers, a little beyond does not. Scores are stubbed so
    # the law is tested exactly: low = float32 + noise at one position.
    import qexport.verify.engine_checks as engine_checks

    ctx = Context(qwen3_out / "fp16", qwen3_src)
    generation = transformers_generation(ctx.export, prompt_ids(ctx)[:1], steps=2)
    seq = generation["sequences"][0]
    vocab = int(ctx.reference.config["vocab_size"])
    exact = torch.full((len(seq["prompt"]) + 1, vocab), -30.0)
    targets = (seq["prompt"] + seq["tokens"])[1:]
    for i, t in enumerate(targets):
        exact[i, t] = -0.5
    low = exact.clone()
    low[0, targets[0]] += 0.3  # the dtype's own noise at one position
    scores = {torch.float16: [low], torch.float32: [exact]}
    monkeypatch.setattr(engine_checks, "_score", lambda folder, dtype, sequences: scores[dtype])

    def judged(engine_shift: float):
        seq["prompt_logprobs"] = [None] + [-0.5] * (len(seq["prompt"]) - 1)
        seq["logprobs"] = [-0.5] * len(seq["tokens"])
        seq["logprobs"][-1] += engine_shift
        return judge_vllm(ctx, child_result(stages=["config_parse", "generation"], generation=generation))

    bound = engine_checks.DTYPE_NOISE_FACTOR * 0.3
    inside, outside = judged(bound - 0.01), judged(bound + 0.01)
    assert inside.passed and inside.metrics["engine_dlogprob_bound"] == pytest.approx(bound, abs=1e-6), inside.detail
    assert not outside.passed and f"{engine_checks.DTYPE_NOISE_FACTOR:g}x transformers' own 0.3" in outside.detail
