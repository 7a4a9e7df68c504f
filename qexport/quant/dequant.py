"""Read any compressed-tensors integer layout back to dense weights, independently of transformers.

Handles what transformers loads: naive-quantized and int-quantized (int8 `weight` + `weight_scale`), and
pack-quantized (`weight_packed` int32 + `weight_scale` + `weight_shape`), 4 or 8 bits, per channel or per group,
with optional `weight_zero_point`. Dense tensors pass through. Used by verify to build "our own dequantized model".
"""

from __future__ import annotations

from pathlib import Path

import torch

from qexport.quant import primitives as quant
from qexport.quant import scheme
from qexport.io.checkpoint import Checkpoint
from qexport.quant.scheme import QUANT_LEAVES


def unpack_int32(packed: torch.Tensor, num_bits: int, cols: int) -> torch.Tensor:
    """Codes of `num_bits` (4 or 8) packed into int32 words along rows, lowest bits first, stored as q + 2^(b-1)."""
    if num_bits == 4:
        return quant.unpack_int4(packed, cols)
    if num_bits == 8:
        return quant.unpack_int8(packed, cols)
    shifts = torch.arange(0, 32, num_bits, dtype=torch.int32)
    mask = (1 << num_bits) - 1
    codes = (packed.unsqueeze(-1) >> shifts) & mask
    return (codes.reshape(packed.shape[0], -1)[:, :cols] - (1 << (num_bits - 1))).to(torch.int8)


def dequantize_module(tensors: dict[str, torch.Tensor], num_bits: int, dtype=None) -> torch.Tensor:
    """Dense weight of one quantized module from its stored tensors (names without the module).

    The product q * scale is computed in `dtype` (default: the stored scale dtype), as transformers does when
    it loads the model in that dtype, so the two agree exactly.
    """
    scale = tensors["weight_scale"] if dtype is None else tensors["weight_scale"].to(dtype)
    if "weight_packed" in tensors:
        rows, cols = (int(x) for x in tensors["weight_shape"].tolist())
        q = unpack_int32(tensors["weight_packed"], num_bits, cols)
    else:
        q = tensors["weight"]
        rows, cols = q.shape
    if scale.dim() == 1:
        scale = scale.reshape(-1, 1)
    scale_rows = scale.shape[0]  # 1 for a per-tensor scale (and zero point), else rows
    if scale_rows == 1 and rows != 1:  # per-tensor scale
        scale = scale.expand(rows, 1)
    groups = scale.shape[1]
    group_size = None if groups == 1 else cols // groups
    codes = q.to(scale.dtype)
    zp = None
    if "weight_zero_point" in tensors:
        zp = tensors["weight_zero_point"]
        zp_rows = scale_rows
        if zp.dtype == torch.int32:  # pack-quantized: packed along the output dimension (packed_dim=0)
            zp = unpack_int32(zp.t().contiguous(), num_bits, zp_rows).t()
        zp = zp.reshape(zp_rows, -1).to(scale.dtype)
    g_idx = _column_groups(tensors.get("weight_g_idx"), cols, groups)
    if g_idx is not None:  # activation order (GPTQ actorder="group"): column c uses group g_idx[c]
        if zp is not None:
            codes = codes - zp[:, g_idx]
        return codes * scale[:, g_idx]
    if zp is not None:
        codes = (quant.group_view(codes, group_size) - zp.unsqueeze(-1)).reshape(rows, cols)
    return quant.dequantize(codes, scale, group_size)


def _column_groups(g_idx: torch.Tensor | None, cols: int, groups: int) -> torch.Tensor | None:
    """The group of each input column from a stored `weight_g_idx`, as compressed-tensors and vLLM read it; None
    when there is none or it is uninitialised (any -1: column order)."""
    if g_idx is None or groups == 1:
        return None
    g_idx = g_idx.reshape(-1).long()
    if bool((g_idx == -1).any()):
        return None
    if g_idx.numel() != cols or bool((g_idx < 0).any()) or bool((g_idx >= groups).any()):
        raise ValueError(f"weight_g_idx {list(g_idx.shape)} does not map {cols} columns to {groups} groups")
    return g_idx


def num_bits_of(config: dict, module: str) -> int:
    """Weight bit width for `module` from the quantization_config: the group that targets it (quant.scheme; its
    class is unknown here, so class targets match any module), else the first group; 8 without groups."""
    qc = config.get("quantization_config") or {}
    found = scheme.group_for(qc, module, classes=None)
    if found is not None:
        return int(found[1]["weights"]["num_bits"])
    groups = list((qc.get("config_groups") or {}).values())
    return int(groups[0]["weights"]["num_bits"]) if groups else 8




def quantized_modules(ckpt: Checkpoint) -> dict[str, dict[str, str]]:
    """Module name -> {leaf: stored tensor name} for every module stored in a quantized layout.

    A module is quantized when it has a `weight_scale`; its integer `weight` (naive/int-quantized) counts as part.
    """
    modules: dict[str, dict[str, str]] = {}
    for name in ckpt.names:
        module, _, leaf = name.rpartition(".")
        if leaf in QUANT_LEAVES:
            modules.setdefault(module, {})[leaf] = name
    for module, parts in modules.items():
        weight = f"{module}.weight"
        if weight in ckpt.entries and not ckpt.entries[weight].dtype.startswith(("F", "BF")):
            parts["weight"] = weight
    return modules


def iter_dequantized(ckpt: Checkpoint, dtype=torch.float32):
    """Yield (original name, dense `dtype` tensor, quantized?) for every tensor, one module at a time."""
    modules = quantized_modules(ckpt)
    parts_of = {stored: module for module, parts in modules.items() for stored in parts.values()}
    done = set()
    for name in ckpt.names:
        module = parts_of.get(name)
        if module is None:
            t = ckpt.read(name)
            yield name, (t.to(dtype) if t.is_floating_point() else t), False
        elif module not in done:
            done.add(module)
            tensors = {leaf: ckpt.read(stored) for leaf, stored in modules[module].items()}
            yield f"{module}.weight", dequantize_module(tensors, num_bits_of(ckpt.config, module), dtype), True


def dequantized_count(ckpt: Checkpoint) -> int:
    """How many tensors `iter_dequantized` yields: one per quantized module, one per other stored tensor."""
    modules = quantized_modules(ckpt)
    parts = sum(len(p) for p in modules.values())
    return len(ckpt.entries) - parts + len(modules)


def dequantized_state_dict(folder: str | Path | Checkpoint, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Every tensor of an export folder as a dense `dtype` tensor under its original (unquantized) name."""
    ckpt = folder if isinstance(folder, Checkpoint) else Checkpoint.open(folder)
    return {name: t for name, t, _ in iter_dequantized(ckpt, dtype)}
