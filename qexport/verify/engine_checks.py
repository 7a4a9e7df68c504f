"""Checks that run the export in the engines users deploy it with, not only in transformers.

- `engine_sentence_transformers` (folders with modules.json; on by default, it is cheap): SentenceTransformer(export)
  encodes the functional check's sentences; cosine against SentenceTransformer(reference).
- `engine_vllm` (only when asked: `--engine vllm[=PYTHON]`): vLLM in its own interpreter (qexport.verify.engines.runner)
  parses the quantization config, picks a scheme and kernel per Linear, and where it has kernels generates
  greedily with logprobs; transformers on the same folder, in the same dtype, scores the same tokens.

Skipped is not passed: a row says what it checked and what it could not, and an engine asked for explicitly that
cannot run at all is a failed check naming the engine.
"""

from __future__ import annotations

import torch

from qexport.io.checkpoint import declared_dtype
from qexport.io.library_guard import LOAD_KWARGS
from qexport.verify.context import CheckResult, Context, fail, listing, ok, skip, has_tokenizer

# |logprob(vLLM) - logprob(transformers)| on the same folder, tokens and dtype, per dtype. Measured on the tiny
# qwen3 preset (vLLM 0.32 CPU vs transformers 5.24, 3 prompts, 78 scored positions incl. 24 generated): fp16
# export (fp16) max 9.8e-4 / 9.9e-4 (bf16 / fp16 source); int4 export of an fp16 source (fp16) max 9.8e-4; of a bf16 source
# (bf16, what vLLM's dtype "auto" picks from its config) max 8.4e-3 (the issue measured 1.5e-3 on int4 fp16).
# Both sides round activations in a different order: fp16 keeps 11 significant bits, bf16 8, so bf16's error
# is ~8x fp16's, as measured. The bounds sit 10x (fp16) and 6x (bf16) above the measurements; a misread packing
# or scale moves logprobs by 0.1 or more.
MAX_ABS_DLOGPROB = {"float16": 1e-2, "bfloat16": 5e-2}
# Those floors hold for tiny models only: rounding error grows with depth and width. On a real model the bound is
# DTYPE_NOISE_FACTOR x the model's own rounding noise, max |logprob(transformers, dtype) - logprob(transformers,
# float32)| on the same folder and sequences, when that is larger. Theory: vLLM and transformers each deviate from
# the exact (float32) result by about that noise, so they differ by about up to twice it, more at single positions
# (a max over positions is itself noisy). Measured on SmolLM2-135M in bfloat16, 42 positions, vLLM 0.32 CPU vs
# transformers 5.24 (transformers' own bf16-vs-fp32 max / vLLM-vs-transformers max / ratio): int4 g64 0.287 /
# 0.258 / 0.90x; int4-asym 0.360 / 0.228 / 0.63x; the dense bf16 source itself 0.107 / 0.223 / 2.09x. A fixed 0.05
# failed all three clean folders. On a CPU with AMX / AVX512-BF16 (Xeon, 2026-12-07) vLLM's CPUWNA16 int4 kernel
# departs further: int4 g64 0.279 / 1.44 / 5.2x (greedy tokens 19/24, each difference within a tie). The factor sits
# ~2x above the worst ratio measured on either CPU, as before; a misread packing or scale moves logprobs by 1 or
# more on such a model, so on a real model the greedy-token rule below and, on the tiny models, the floors above
# catch it, not this bound alone.
DTYPE_NOISE_FACTOR = 10.0
# Greedy tokens may differ only where transformers' top two logprobs are closer than that bound (a tie).
PROMPTS = (
    "The capital of France is",
    "Quantized weights take fewer bits, so the model",
    "def fibonacci(n):",
)
MAX_NEW_TOKENS = 8


# ---------------------------------------------------------------------------------------------------------------
# sentence-transformers


def check_engine_sentence_transformers(ctx: Context) -> CheckResult:
    """SentenceTransformer loads the export and embeds the functional sentences like the reference does."""
    name = "engine_sentence_transformers"
    if not (ctx.export / "modules.json").is_file():
        if (ctx.reference.folder / "modules.json").is_file():
            return fail(name, "the reference is a sentence-transformers model (modules.json) but the export "
                               "has no modules.json: SentenceTransformer(export) would not rebuild its pooling")
        return skip(name, "not a sentence-transformers folder (no modules.json)")
    if ctx.tokenizer_problem is not None:  # SentenceTransformer would load that tokenizer in this process
        return fail(name, ctx.tokenizer_problem)
    try:
        import sentence_transformers
    except ImportError:
        return skip(name, "the folder has modules.json but sentence-transformers is not installed: not checked")
    from qexport.verify.functional import SENTENCES
    from qexport.model.quiet import quiet

    def encode(folder, **kwargs):
        with quiet():
            model = sentence_transformers.SentenceTransformer(str(folder), device="cpu", **LOAD_KWARGS, **kwargs)
            compressed = _still_compressed(model)
            try:
                return torch.as_tensor(model.encode(list(SENTENCES), convert_to_numpy=True)).float(), compressed
            except Exception as e:
                e.still_compressed = compressed
                raise

    reference, _ = encode(ctx.reference.folder)
    version = f"sentence-transformers {sentence_transformers.__version__}"
    try:
        embeddings, _ = encode(ctx.export)
    except Exception as e:
        error = f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
        if not getattr(e, "still_compressed", None):
            return fail(name, f"{version}: SentenceTransformer(export) fails: {error}")
        workaround = _dequantize_workaround(ctx, encode, reference)
        return fail(name, f"{version}: SentenceTransformer(export).encode fails: {error}. Upstream cause, not "
                           f"the folder: sentence-transformers calls the model's forward() directly "
                           f"(base/modules/transformer.py, Transformer.forward), which skips the forward pre-hook "
                           f"that compressed-tensors registers to decompress the weights on the first call "
                           f"(ModelCompressor.add_decompress_hook), so {listing(e.still_compressed, 2)} keep "
                           f"their compressed tensors. {workaround}", st_loads=False)
    return _cosine_result(name, ctx, reference, embeddings, version)


def _still_compressed(st_model) -> list[str]:
    """Linear modules of the loaded transformer that hold compressed tensors instead of a float `weight`."""
    inner = getattr(st_model[0], "auto_model", None) or getattr(st_model[0], "model", None)
    if inner is None:
        return []
    return [n for n, m in inner.named_modules() if isinstance(m, torch.nn.Linear)
            and (not isinstance(getattr(m, "weight", None), torch.Tensor) or not m.weight.is_floating_point())]


def _dequantize_workaround(ctx: Context, encode, reference: torch.Tensor) -> str:
    try:
        from transformers import CompressedTensorsConfig

        embeddings, _ = encode(ctx.export, model_kwargs={"quantization_config": CompressedTensorsConfig(
            dequantize=True)})
    except Exception as e:
        return f"The dequantize-on-load workaround fails too: {type(e).__name__}: {' '.join(str(e).split())[:150]}"
    cos = torch.nn.functional.cosine_similarity(reference, embeddings, dim=-1)
    return (f"Workaround (measured): SentenceTransformer(export, model_kwargs={{'quantization_config': "
            f"CompressedTensorsConfig(dequantize=True)}}) loads it, cosine {cos.mean().item():.4f} "
            f"(min {cos.min().item():.4f}).")


def _cosine_result(name, ctx, reference, embeddings, version) -> CheckResult:
    cos = torch.nn.functional.cosine_similarity(reference, embeddings, dim=-1)
    metrics = {"st_loads": True, "st_cosine": cos.mean().item(), "st_cosine_min": cos.min().item()}
    limit = ctx.thresholds.min_cosine
    shown = f"{version}: loads and encodes; cosine vs reference {metrics['st_cosine']:.4f} " \
            f"(min {metrics['st_cosine_min']:.4f})"
    if limit is not None and not metrics["st_cosine"] >= limit:
        return fail(name, f"{shown} < {limit:g}", **metrics)
    return ok(name, shown, **metrics)


# ---------------------------------------------------------------------------------------------------------------
# vLLM


def check_engine_vllm(ctx: Context) -> CheckResult:
    """vLLM parses the config, maps each Linear to the scheme the files hold, and (where it has kernels)
    generates with logprobs equal to transformers' on the same folder."""
    from qexport.verify.engines.runner import ChildFailed, run_child, unavailable_reason

    name = "engine_vllm"
    spec = (getattr(ctx, "engines", None) or {}).get("vllm")
    if spec is None:
        return skip(name, "vLLM not asked for (--engine vllm)")
    reason = unavailable_reason(spec)
    if reason is not None:
        return (fail if spec.explicit else skip)(name, f"engine vLLM cannot run: {reason}")
    if ctx.ckpt is None:
        return fail(name, f"engine vLLM not run: the export's shards are unreadable ({ctx.ckpt_error})")
    request = vllm_request(ctx)
    try:
        result, tail = run_child(spec.python, request)
    except ChildFailed as e:
        return fail(name, f"engine vLLM ({spec.python}) {e}; output tail: {e.output_tail or '(none)'}")
    return judge_vllm(ctx, result, tail)


def engine_dtype(config: dict | None) -> str:
    """The dtype vLLM runs the folder in: config.json's (vLLM's `auto`) when fp16 or bf16; float16 instead of
    float32, since vLLM CPU runs int4 (CPUWNA16) only in fp16/bf16."""
    named = declared_dtype(config)
    return named if named in ("float16", "bfloat16") else "float16"


def vllm_request(ctx: Context) -> dict:
    linears = []
    for weight in sorted(ctx.arch.linear_weights):
        out_features, in_features = ctx.arch.shapes[weight][:2]
        linears.append({"name": weight[: -len(".weight")], "in": int(in_features), "out": int(out_features)})
    request = {"model": str(ctx.export.resolve()), "dtype": engine_dtype(ctx.config), "linears": linears,
               "prompts": prompt_ids(ctx), "max_tokens": MAX_NEW_TOKENS, "max_model_len": 128, "generate": True}
    if not ctx.is_causal:
        request.update(generate=False, why_not_generate="not a causal LM: vLLM generation is checked on causal "
                                                        "LMs only")
    return request


def prompt_ids(ctx: Context) -> list[list[int]]:
    """Fixed prompts through the export's tokenizer, else fixed token ids (models without a tokenizer)."""
    vocab = int(ctx.reference.config.get("vocab_size") or 1000)
    if has_tokenizer(ctx.export) and ctx.tokenizer_problem is None:
        from transformers import AutoTokenizer

        from qexport.model.quiet import quiet

        try:
            with quiet():
                tokenizer = AutoTokenizer.from_pretrained(str(ctx.export), **LOAD_KWARGS)
            prompts = [tokenizer(text, add_special_tokens=False)["input_ids"][:32] for text in PROMPTS]
        except Exception:  # a broken tokenizer is the tokenizer check's finding; the engine still gets prompts
            prompts = []
        if prompts and all(len(p) >= 2 and max(p) < vocab for p in prompts):
            return prompts
    from qexport.verify.functional import fixed_token_ids

    return fixed_token_ids(vocab, batch=len(PROMPTS), length=12).tolist()


def judge_vllm(ctx: Context, result: dict, tail: str = "") -> CheckResult:
    """The check row from the child's result (a dict in the vllm_child protocol)."""
    name = "engine_vllm"
    who = f"vLLM {result.get('vllm_version', '?')} ({result.get('platform', '?')})"
    checked = list(result.get("stages", []))
    metrics = {"vllm_version": result.get("vllm_version"), "vllm_checked": checked}
    error = result.get("error")
    if error is not None:
        stage = {"import": "cannot import vLLM", "config_parse": "vLLM's compressed-tensors parser rejects the "
                 "quantization_config", "scheme_selection": f"vLLM finds no scheme for {error.get('layer')}",
                 "generation": "vLLM fails to run the model"}.get(error["stage"], error["stage"])
        hint = _naive_hint(ctx) if error["stage"] == "config_parse" else ""
        where = f" at {error['where']}" if error.get("where") else ""
        done = f" (checked before: {', '.join(checked)})" if checked else ""
        message = f"{error['type']}: {error['message'][:400]}".rstrip(": ")
        # The output tail helps where the engine itself broke; a parser verdict says all in its message.
        output = f"; output tail: {tail[-600:] or '(none)'}" if error["stage"] in ("import", "generation") else ""
        return fail(name, f"{who}: {stage}: {message}{where}{hint}{done}{output}", **metrics)

    layers = result["layers"]
    problems = _scheme_mismatches(ctx, layers)
    summary = _scheme_summary(layers)
    metrics["vllm_schemes"] = summary
    if problems:
        return fail(name, f"{who}: schemes disagree with the files: {listing(problems, 3)}", **metrics)
    if result.get("quant_method") is None:
        shown = f"{who}: dense folder (no quantization_config), every Linear unquantized"
    else:
        shown = f"{who}: config parsed; " + "; ".join(f"{n} Linear -> {s}" for s, n in summary.items())
    if result.get("generation") is None:
        why = result.get("not_generated") or "no generation result"
        return ok(name, f"{shown}. NOT checked: generation ({why}).", **metrics)
    metrics.update(compare_logprobs(ctx, result))
    shown += (f"; generated {metrics['engine_positions']} positions in {result['dtype']}: max |Δlogprob| vs "
              f"transformers {metrics['engine_max_abs_dlogprob']:.2g} (bound {metrics['engine_dlogprob_bound']:.2g}: "
              f"{_bound_origin(metrics)}), greedy tokens agree "
              f"{metrics['engine_tokens_agree']}/{metrics['engine_tokens']}")
    failures = []
    bound = metrics["engine_dlogprob_bound"]
    if not metrics["engine_max_abs_dlogprob"] <= bound:
        failures.append(f"max |Δlogprob| {metrics['engine_max_abs_dlogprob']:.3g} > {bound:.3g} ({result['dtype']}; "
                        f"{_bound_origin(metrics)})")
    if metrics["engine_token_disagreements_beyond_tie"]:
        failures.append(f"{metrics['engine_token_disagreements_beyond_tie']} greedy token(s) differ where "
                        f"transformers' top choice leads by more than {bound:.3g}")
    if failures:
        return fail(name, f"{shown}: " + "; ".join(failures), **metrics)
    return ok(name, shown, **metrics)


def _naive_hint(ctx: Context) -> str:
    qc = ctx.qc if isinstance(ctx.qc, dict) else {}
    groups = qc.get("config_groups")
    if not isinstance(groups, dict):  # malformed: the config checks say so; vLLM's own verdict still reaches the row
        groups = {}
    formats = {g.get("format") or qc.get("format") for g in groups.values() if isinstance(g, dict)}
    if "naive-quantized" in formats and not any(isinstance(g, dict) and g.get("input_activations")
                                                for g in groups.values()):
        return (" (format naive-quantized with no input_activations: vLLM reads naive-quantized as activation "
                "quantization; weight-only int loads in vLLM only as pack-quantized)")
    return ""


def _scheme_summary(layers: dict) -> dict[str, int]:
    counts: dict[str, int] = {}
    unquantized = [name for name, entry in layers.items() if entry.get("scheme") is None]
    for entry in layers.values():
        if entry.get("scheme") is None:
            key = "unquantized" + (f" ({', '.join(unquantized)})" if len(unquantized) <= 3 else "")
        else:
            key = entry["scheme"] + (f" [{entry['kernel']}]" if entry.get("kernel") else " [no kernel here]")
        counts[key] = counts.get(key, 0) + 1
    return counts


def _scheme_mismatches(ctx: Context, layers: dict) -> list[str]:
    """A Linear the files store quantized must get a vLLM scheme, and one stored dense must not."""
    problems = []
    for module, entry in layers.items():
        stored_quantized = f"{module}.weight_scale" in ctx.ckpt.entries
        if stored_quantized and entry.get("scheme") is None:
            problems.append(f"{module} is stored quantized but vLLM would load it dense")
        elif not stored_quantized and entry.get("scheme") is not None and f"{module}.weight" in ctx.ckpt.entries:
            problems.append(f"{module} is stored dense but vLLM would load it as {entry['scheme']}")
    return problems


def _bound_origin(metrics: dict) -> str:
    noise = metrics["engine_dtype_noise"]
    if metrics["engine_dlogprob_bound"] > metrics["engine_dlogprob_floor"]:
        return f"{DTYPE_NOISE_FACTOR:g}x transformers' own {noise:.3g} vs float32"
    return f"floor; transformers' own noise vs float32 {noise:.3g}"


def _score(folder, dtype: torch.dtype, sequences: list[dict]) -> list[torch.Tensor]:
    """Per sequence, transformers' next-token log-probabilities (float32) at every position but the last."""
    from qexport.verify.functional import load_model
    from qexport.model.quiet import quiet

    model, _ = load_model(folder, dtype=dtype)
    rows = []
    with torch.no_grad():
        for seq in sequences:
            ids = torch.tensor([seq["prompt"] + seq["tokens"]])
            with quiet():
                logits = model(input_ids=ids[:, :-1] if seq["tokens"] else ids).logits[0]
            rows.append(torch.log_softmax(logits.float(), dim=-1))  # position i predicts token i + 1
    del model
    return rows


def compare_logprobs(ctx: Context, result: dict) -> dict:
    """Score vLLM's sequences with transformers on the same folder and dtype (teacher forcing), and in float32 to
    measure how far that dtype's rounding alone moves this model's logprobs (the bound scales with it)."""
    dtype = getattr(torch, result["dtype"])
    sequences = result["generation"]["sequences"]
    low = _score(ctx.export, dtype, sequences)
    exact = _score(ctx.export, torch.float32, sequences)  # vLLM runs fp16 or bf16 here (engine_dtype)
    max_diff = noise = 0.0
    positions = 0
    for seq, logp, logp32 in zip(sequences, low, exact):
        targets = torch.tensor((seq["prompt"] + seq["tokens"])[1:])
        at = torch.arange(len(targets))
        engine = torch.tensor(seq["prompt_logprobs"][1:] + seq["logprobs"], dtype=torch.float64)
        ours = logp[at, targets].double()
        max_diff = max(max_diff, (ours - engine).abs().max().item())
        noise = max(noise, (ours - logp32[at, targets].double()).abs().max().item())
        positions += len(targets)
    floor = MAX_ABS_DLOGPROB[result["dtype"]]
    bound = max(floor, DTYPE_NOISE_FACTOR * noise)
    agree = total = beyond_tie = 0
    for seq, logp in zip(sequences, low):
        for j, token in enumerate(seq["tokens"]):
            row = logp[len(seq["prompt"]) - 1 + j]
            total += 1
            if int(row.argmax()) == token:
                agree += 1
            elif (row.max() - row[token]).item() > bound:
                beyond_tie += 1
    return {"engine_max_abs_dlogprob": max_diff, "engine_positions": positions, "engine_tokens": total,
            "engine_tokens_agree": agree, "engine_token_disagreements_beyond_tie": beyond_tie,
            "engine_dtype_noise": noise, "engine_dlogprob_floor": floor, "engine_dlogprob_bound": bound}
