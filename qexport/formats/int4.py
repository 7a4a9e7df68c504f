"""INT4 W4A16: symmetric group-wise int4 weights packed 8 per int32 word (compressed-tensors pack-quantized),
with scales in the compute dtype."""

from __future__ import annotations

import torch

from qexport.quant import clip_search

from qexport.quant import primitives as quant
from qexport.errors import InputError
from qexport.formats.base import register
from qexport.formats.int8 import INT8

# How scales (and zero points) are chosen; the stored layout is the same for every method.
# rtn: round-to-nearest over each group's full range (compressed-tensors' minmax observer).
# mse: each group's range clipped by the factor (1.0 down to 0.8) whose reconstruction has the lowest
#      error, sum |w - ŵ|^2.4 (clip_search; compressed-tensors calls such a search the "mse" observer).
INT4_METHODS = ("rtn", "mse")


@register
class INT4(INT8):
    name = "int4"
    num_bits = 4

    def __init__(self, group_size: int = 128, dtype: str = "float16", method: str = "rtn", **_options):
        super().__init__(dtype)
        if method not in INT4_METHODS:
            raise InputError(f"--int4-method: {method!r} is not one of {', '.join(INT4_METHODS)}")
        self.group_size = group_size
        self.method = method

    def weights_args(self) -> dict:
        return {
            "num_bits": 4,
            "type": "int",
            "strategy": "group",
            "group_size": self.group_size,
            "symmetric": True,
            "dynamic": False,
            **({"observer": "mse"} if self.method == "mse" else {}),
        }

    def why_not_quantizable(self, name, shape):
        if len(shape) != 2:
            return "not a 2-D weight"
        if shape[1] % self.group_size:
            return f"input size {shape[1]} does not divide by group size {self.group_size}"
        return None

    def pack(self, q: torch.Tensor) -> torch.Tensor:
        return quant.pack_int4(q)

    def qparams(self, wc):
        if self.method == "rtn":
            return super().qparams(wc)
        scales, _, q = clip_search.search_qparams(wc, 4, self.group_size, symmetric=True, dtype=self.dtype)
        return scales, q

    def parameters(self):
        return {**super().parameters(), "method": self.method}
