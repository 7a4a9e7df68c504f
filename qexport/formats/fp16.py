"""FP16: every floating tensor stored as float16; nothing quantized."""

from __future__ import annotations

import torch

from .base import Format, dense, dense_dtype, register


@register
class FP16(Format):
    name = "fp16"

    def __init__(self, **_options):
        pass

    def stored(self, name, dtype, shape, quantize):
        return [(name, dense_dtype(dtype), shape)]

    def encode(self, name, w: torch.Tensor, quantize):
        return {name: dense(name, w)}
