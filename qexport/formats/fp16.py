"""FP16: every floating tensor stored as float16; nothing quantized."""

from __future__ import annotations

import torch

from qexport.formats.base import Format, register


@register
class FP16(Format):
    name = "fp16"

    def __init__(self, **_options):
        super().__init__("float16")  # what the user asked for, whatever the source computes in

    def stored(self, name, dtype, shape, quantize):
        return [(name, self.dense_dtype(dtype), shape)]

    def encode(self, name, w: torch.Tensor, quantize):
        return {name: self.dense(w)}
