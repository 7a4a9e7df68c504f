"""INT4 W4A16: symmetric group-wise int4 weights packed 8 per int32 word (compressed-tensors pack-quantized)."""

from __future__ import annotations

import torch

from .. import quant
from .base import dense, dense_dtype, register, to_fp16
from .int8 import INT8, _module


@register
class INT4(INT8):
    name = "int4"
    num_bits = 4
    compression = "pack-quantized"

    def __init__(self, group_size: int = 128, **_options):
        self.group_size = group_size

    def weights_args(self) -> dict:
        return {
            "num_bits": 4,
            "type": "int",
            "strategy": "group",
            "group_size": self.group_size,
            "symmetric": True,
            "dynamic": False,
        }

    def why_not_quantizable(self, name, shape):
        if len(shape) != 2:
            return "not a 2-D weight"
        if shape[1] % self.group_size:
            return f"input size {shape[1]} does not divide by group size {self.group_size}"
        return None

    def stored(self, name, dtype, shape, quantize):
        if not quantize:
            return [(name, dense_dtype(dtype), shape)]
        out, cols = shape
        module = _module(name)
        return [
            (f"{module}.weight_packed", "I32", (out, cols // 8)),
            (f"{module}.weight_scale", "F16", (out, cols // self.group_size)),
            (f"{module}.weight_shape", "I64", (2,)),
        ]

    def encode(self, name, w, quantize):
        if not quantize:
            return {name: dense(name, w)}
        module = _module(name)
        w16 = to_fp16(name, w)
        scales = quant.compute_scales(w16, 4, self.group_size)
        q = quant.quantize(w16, scales, 4, self.group_size)
        return {
            f"{module}.weight_packed": quant.pack_int4(q),
            f"{module}.weight_scale": scales,
            f"{module}.weight_shape": torch.tensor(list(w.shape), dtype=torch.int64),
        }

    def parameters(self):
        return {"scheme": "W4A16", "weights": self.weights_args(), "scale_dtype": "float16"}
