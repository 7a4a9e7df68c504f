"""Builders for the unit tests of verify's engine checks (tests/unit/verify/test_engine_checks_unit.py) and for recording real
vLLM results once (fixtures/record_vllm_results.py).

A whole one-layer qwen3 written by hand, weights drawn from a seeded generator (no transformers init, no export):
hidden 128 and intermediate 256 so group-128 int4 applies to every Linear and vLLM's CPU kernel (CPUWNA16) runs it;
head_dim 64 (vLLM's CPU attention wants a usual head size); vocab 128. Int4 tensors come from qexport's quantization
primitives (tests.support.unit_verify.int4_module), as the exporter stores them. Deterministic: the same bytes on every run,
which the recorded vLLM results (fixtures/vllm_results/*.json) depend on; each result records the sha256 of the
model.safetensors it was measured on and the tests compare it first.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from tests.support.unit_verify import int4_module, qc, write_folder

CONFIG = {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "hidden_size": 128,
          "intermediate_size": 256, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
          "head_dim": 64, "vocab_size": 128, "max_position_embeddings": 128, "tie_word_embeddings": False,
          "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "dtype": "float16"}
LAYER = "model.layers.0"
LINEARS = [f"{LAYER}.self_attn.{p}_proj" for p in "qkvo"] + [f"{LAYER}.mlp.{p}_proj" for p in ("gate", "up", "down")]
RESULTS = Path(__file__).resolve().parents[2] / "fixtures" / "vllm_results"


def weights(seed: int = 0) -> dict[str, torch.Tensor]:
    """The model's float32 weights: Linears N(0, 0.05^2), embeddings N(0, 1), norms 1 + N(0, 0.1^2)."""
    g = torch.Generator().manual_seed(seed)
    h, i, v, kv = 128, 256, 128, 64
    shapes = {f"{LAYER}.self_attn.q_proj.weight": (h, h), f"{LAYER}.self_attn.k_proj.weight": (kv, h),
              f"{LAYER}.self_attn.v_proj.weight": (kv, h), f"{LAYER}.self_attn.o_proj.weight": (h, h),
              f"{LAYER}.mlp.gate_proj.weight": (i, h), f"{LAYER}.mlp.up_proj.weight": (i, h),
              f"{LAYER}.mlp.down_proj.weight": (h, i), "lm_head.weight": (v, h)}
    w = {name: torch.randn(*shape, generator=g) * 0.05 for name, shape in shapes.items()}
    w["lm_head.weight"] *= 10  # logits spread over a few units: greedy choices are clear, not near-ties
    w["model.embed_tokens.weight"] = torch.randn(v, h, generator=g)
    for norm, size in (("model.norm.weight", h), (f"{LAYER}.input_layernorm.weight", h),
                       (f"{LAYER}.post_attention_layernorm.weight", h), (f"{LAYER}.self_attn.q_norm.weight", 64),
                       (f"{LAYER}.self_attn.k_norm.weight", 64)):
        w[norm] = 1 + 0.1 * torch.randn(size, generator=g)
    return w


def reference(folder: Path) -> Path:
    """The source model: every weight in fp16."""
    return write_folder(folder, {k: v.half() for k, v in weights().items()}, CONFIG)


def int4_export(folder: Path, dense: tuple[str, ...] = ()) -> Path:
    """An int4 (W4A16 g128, pack-quantized) export of `reference`: every Linear but lm_head (and `dense`) quantized,
    the rest in fp16."""
    tensors = {}
    for name, w in weights().items():
        module = name.removesuffix(".weight")
        if module in LINEARS and module not in dense:
            tensors |= int4_module(module, w.half().float(), 128)[0]
        else:
            tensors[name] = w.half()
    return write_folder(folder, tensors, {**CONFIG, "quantization_config": qc(group_size=128)})


def int8_export(folder: Path) -> Path:
    """An int8 (W8A16 per channel, pack-quantized) export: what qexport writes for int8."""
    from qexport.quant import primitives as quant
    tensors = {}
    for name, w in weights().items():
        module = name.removesuffix(".weight")
        if module in LINEARS:
            w = w.half().float()
            scales = quant.compute_scales(w, 8, None, torch.float16)
            q = quant.quantize(w, scales, 8, None)
            tensors |= {f"{module}.weight_packed": quant.pack_int8(q),
                        f"{module}.weight_scale": scales, f"{module}.weight_shape": torch.tensor(list(w.shape))}
        else:
            tensors[name] = w.half()
    return write_folder(folder, tensors, {**CONFIG, "quantization_config": qc(num_bits=8, strategy="channel")})


def sha256(folder: Path) -> str:
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


def recorded(name: str) -> dict:
    """A recorded vLLM result (fixtures/vllm_results/NAME.json): {"recorded": how, "sha256": of the folder's
    model.safetensors, "result": what vllm_child.py wrote}."""
    return json.loads((RESULTS / f"{name}.json").read_text())
