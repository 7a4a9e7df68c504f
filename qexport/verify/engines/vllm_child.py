"""Runs in vLLM's own interpreter (not qexport's venv): what vLLM makes of an export folder.

    PYTHON vllm_child.py REQUEST.json RESULT.json

Imports nothing from qexport (qexport's torch / transformers are not this interpreter's). Steps, each recorded
in RESULT.json as it completes, so that the parent can say exactly what was and was not checked:

1. `config_parse`: vLLM's `CompressedTensorsConfig.from_config(quantization_config)` (dense folders: nothing to
   parse);
2. `scheme_selection`: `get_scheme` for every Linear of the request (names and shapes from the parent), i.e.
   the scheme vLLM would build for that layer, and for weight-only (WNA16) schemes the mixed-precision kernel
   `choose_mp_linear_kernel` picks on this platform for the requested activation dtype;
3. `generation`: only when every quantized Linear has a kernel here: `vllm.LLM` on the folder, greedy decoding
   with the logprob of each prompt and generated token, from fixed prompt token ids (no tokenizer needed).

RESULT.json: {"protocol": 1, "vllm_version", "platform", "dtype", "stages": [...done], "layers": {name:
{"scheme", "kernel" | "kernel_error"}}, "generation": {"sequences": [{"prompt", "prompt_logprobs", "tokens",
"logprobs"}]} | null, "not_generated": reason | null, "error": {"stage", "type", "message", "where"} | null}.
Exit code 0 whenever RESULT.json was written, also when a stage failed (the failure is data, in "error").
"""

import json
import os
import sys
import traceback

PROTOCOL = 1
# Run by path, this file's folder is sys.path[0]: keep qexport's modules out of the way of vLLM's imports.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]


def _where(exc):
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return None
    last = frames[-1]
    return f"{last.filename.split('site-packages/')[-1]}:{last.lineno}"


def _error(result, stage, exc):
    result["error"] = {"stage": stage, "type": type(exc).__name__, "message": " ".join(str(exc).split())[:1500],
                       "where": _where(exc)}


def _write(path, result):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(result, f)
    os.replace(tmp, path)


def _schemes(request, result, torch):
    """Steps 1 and 2. Returns the reasons no kernel exists (empty: every quantized layer has one)."""
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import (
        CompressedTensorsConfig,
    )

    with open(os.path.join(request["model"], "config.json"), encoding="utf-8") as f:
        qc = json.load(f).get("quantization_config")
    if qc is None:  # dense: vLLM loads every Linear unquantized (the parent compares that with the files)
        result["stages"].append("config_parse")
        result["quant_method"] = None
        result["layers"] = {layer["name"]: {"scheme": None} for layer in request["linears"]}
        return []
    result["quant_method"] = qc.get("quant_method")
    if qc.get("quant_method") != "compressed-tensors":
        raise ValueError(f"quant_method {qc.get('quant_method')!r}: this check reads compressed-tensors only")
    try:
        config = CompressedTensorsConfig.from_config(json.loads(json.dumps(qc)))
    except BaseException as e:
        _error(result, "config_parse", e)
        return None
    result["stages"].append("config_parse")

    dtype = getattr(torch, request["dtype"])
    missing = []
    try:
        for layer in request["linears"]:
            name = layer["name"]
            module = torch.nn.Linear(layer["in"], layer["out"], bias=False, device="meta")
            scheme = config.get_scheme(layer=module, layer_name=name)
            entry = {"scheme": type(scheme).__name__ if scheme is not None else None}
            if scheme is not None and hasattr(scheme, "quant_type") and hasattr(scheme, "group_size"):
                entry["kernel"], entry["kernel_error"] = _wna16_kernel(scheme, layer, dtype)
                if entry["kernel"] is None:
                    missing.append(f"{entry['scheme']} {scheme.quant_type} in {request['dtype']}: "
                                   f"{entry['kernel_error']}")
            elif scheme is not None:
                entry["kernel_error"] = "kernel choice not probed for this scheme"
            result["layers"][name] = entry
    except BaseException as e:
        _error(result, "scheme_selection", e)
        result["error"]["layer"] = name
        return None
    result["stages"].append("scheme_selection")
    return sorted(set(missing))


def _wna16_kernel(scheme, layer, dtype):
    from vllm.model_executor.kernels.linear import choose_mp_linear_kernel
    from vllm.model_executor.kernels.linear.mixed_precision.MPLinearKernel import MPLinearLayerConfig

    config = MPLinearLayerConfig(full_weight_shape=(layer["in"], layer["out"]),
                                 partition_weight_shape=(layer["in"], layer["out"]),
                                 weight_type=scheme.quant_type, act_type=dtype, group_size=scheme.group_size,
                                 zero_points=not scheme.symmetric)
    try:
        return choose_mp_linear_kernel(config).__name__, None
    except ValueError as e:
        return None, " ".join(str(e).split())[:400]


def _generate(request, result):
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=request["model"], dtype=request["dtype"], enforce_eager=True, seed=0,
              max_model_len=request["max_model_len"], skip_tokenizer_init=True, max_num_seqs=4,
              trust_remote_code=False)
    params = SamplingParams(temperature=0.0, max_tokens=request["max_tokens"], logprobs=0, prompt_logprobs=0,
                            detokenize=False, ignore_eos=True)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in request["prompts"]], params,
                           use_tqdm=False)
    sequences = []
    for prompt, out in zip(request["prompts"], outputs):
        completion = out.outputs[0]
        prompt_lps = [None] + [entry[tok].logprob for tok, entry in zip(prompt[1:], out.prompt_logprobs[1:])]
        sequences.append({"prompt": prompt, "prompt_logprobs": prompt_lps, "tokens": list(completion.token_ids),
                          "logprobs": [entry[tok].logprob
                                       for tok, entry in zip(completion.token_ids, completion.logprobs)]})
    result["generation"] = {"sequences": sequences}


def main(request_path, result_path):
    with open(request_path, encoding="utf-8") as f:
        request = json.load(f)
    result = {"protocol": PROTOCOL, "dtype": request["dtype"], "stages": [], "layers": {}, "generation": None,
              "not_generated": None, "error": None}
    try:
        import torch
        import vllm
        from vllm.platforms import current_platform

        result["vllm_version"] = vllm.__version__
        result["platform"] = str(current_platform.device_type)
    except BaseException as e:
        _error(result, "import", e)
        _write(result_path, result)
        return
    try:
        missing = _schemes(request, result, torch)
    except BaseException as e:
        _error(result, "config_parse", e)
        missing = None
    if missing is None:
        _write(result_path, result)
        return
    if missing:
        result["not_generated"] = "no kernel on this platform: " + "; ".join(missing)
    elif not request.get("generate", True):
        result["not_generated"] = request.get("why_not_generate") or "generation not requested"
    else:
        _write(result_path, result)  # what was checked so far survives a crash inside the engine
        try:
            _generate(request, result)
            result["stages"].append("generation")
        except BaseException as e:
            _error(result, "generation", e)
    _write(result_path, result)


if __name__ == "__main__":  # vllm.LLM spawns its engine process, which re-imports this file
    main(sys.argv[1], sys.argv[2])
