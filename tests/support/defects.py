"""Planted defects for verify tests: copies of a good export with exactly one thing broken.

Each function edits the (single-file) model.safetensors of an export folder in place; callers copy first.
"""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file, save_file

from qexport.quant import primitives as quant
WEIGHTS = "model.safetensors"


def edit_tensors(folder, change) -> None:
    tensors = load_file(folder / WEIGHTS)
    change(tensors)
    save_file(tensors, folder / WEIGHTS, metadata={"format": "pt"})


def scale_one_layer(folder, module: str, factor: float = 1.25) -> None:
    """Every scale of one quantized Linear off by `factor` (an exporter's wrong absmax divisor on one tensor)."""
    name = f"{module}.weight_scale"
    edit_tensors(folder, lambda t: t.update({name: t[name] * factor}))


def embedding_stored_quantized(folder, name: str = "model.embed_tokens.weight", group_size: int = 64) -> None:
    """The input embedding written as packed int4 (weight_packed / weight_scale / weight_shape) although the
    config does not target it: transformers ignores those keys and reloads the embedding as random init."""
    def change(tensors):
        w = tensors.pop(name).float()
        scales = quant.compute_scales(w, 4, group_size)
        module = name.rsplit(".", 1)[0]
        tensors[f"{module}.weight_packed"] = quant.pack_int4(quant.quantize(w, scales, 4, group_size))
        tensors[f"{module}.weight_scale"] = scales
        tensors[f"{module}.weight_shape"] = torch.tensor(list(w.shape), dtype=torch.int64)
    edit_tensors(folder, change)


def random_init_layer(folder, module: str, std: float, seed: int = 0) -> None:
    """One quantized Linear holding a correctly quantized, freshly random-initialised weight (normal, `std`):
    what an exporter writes when it read the model with that key missing. The files stay well-formed."""
    def change(tensors):
        scale = tensors[f"{module}.weight_scale"]
        rows, cols = (int(x) for x in tensors[f"{module}.weight_shape"].tolist())
        packed = tensors[f"{module}.weight_packed"]
        num_bits = 32 * packed.shape[1] // cols
        group = None if scale.shape[1] == 1 else cols // scale.shape[1]
        w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * std
        scales = quant.compute_scales(w, num_bits, group, dtype=scale.dtype)
        codes = quant.quantize(w, scales, num_bits, group)
        tensors[f"{module}.weight_packed"] = quant.pack_int4(codes) if num_bits == 4 else quant.pack_int8(codes)
        tensors[f"{module}.weight_scale"] = scales
    edit_tensors(folder, change)


def edit_json(path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data, indent=2))


def dense_noise(folder, name: str, sqnr_db: float, seed: int = 0) -> None:
    """A dense tensor stored with seeded Gaussian noise at `sqnr_db` below its own norm (a lossy path, e.g. a
    round trip through a narrower dtype, on one tensor that should be the reference rounded to fp16)."""
    def change(tensors):
        w = tensors[name].float()
        noise = torch.randn(w.shape, generator=torch.Generator().manual_seed(seed))
        noise *= w.norm() / noise.norm() * 10 ** (-sqnr_db / 20)
        tensors[name] = (w + noise).to(tensors[name].dtype)
    edit_tensors(folder, change)


def widen_scales(folder, dtype=torch.float32) -> None:
    """Every weight_scale stored in a wider dtype than the config's (same values): loads and computes the same, and
    costs bytes the declared scheme does not need."""
    edit_tensors(folder, lambda t: t.update({k: v.to(dtype) for k, v in t.items() if k.endswith(".weight_scale")}))


def stray_g_idx(folder, module: str) -> None:
    """A `weight_g_idx` (activation-order group index) on one module whose config declares no actorder: the
    identity mapping, so the weights mean the same, but transformers has no parameter for it."""
    def change(tensors):
        cols = int(tensors[f"{module}.weight_shape"][1])
        group = cols // tensors[f"{module}.weight_scale"].shape[1]
        tensors[f"{module}.weight_g_idx"] = torch.arange(cols, dtype=torch.int32) // group
    edit_tensors(folder, change)


def dense_where_quantized(folder, module: str, reference) -> None:
    """One targeted (not ignored) Linear stored dense, the source weight as is, beside quantized siblings."""
    source = load_file(reference / WEIGHTS)

    def change(tensors):
        for leaf in ("weight_packed", "weight_scale", "weight_shape"):
            tensors.pop(f"{module}.{leaf}")
        tensors[f"{module}.weight"] = source[f"{module}.weight"].clone()
    edit_tensors(folder, change)
