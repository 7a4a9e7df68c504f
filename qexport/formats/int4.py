"""INT4 W4A16: symmetric group-wise int4 weights packed 8 per int32 word (compressed-tensors pack-quantized),
with scales in the compute dtype."""

from __future__ import annotations

import torch

from .. import quant
from .base import register
from .int8 import INT8


@register
class INT4(INT8):
    name = "int4"
    num_bits = 4

    def __init__(self, group_size: int = 128, dtype: str = "float16", **_options):
        super().__init__(dtype)
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

    def pack(self, q: torch.Tensor) -> torch.Tensor:
        return quant.pack_int4(q)
