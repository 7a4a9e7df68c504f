"""Planted defects for verify tests: copies of a good export with exactly one thing broken.

Each function edits the (single-file) model.safetensors of an export folder in place; callers copy first.
"""

from __future__ import annotations

import torch
from safetensors.torch import load_file, save_file

from qexport import quant

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
