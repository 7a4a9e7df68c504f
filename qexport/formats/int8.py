"""INT8 W8A16: symmetric per-output-channel int8 weights, packed 4 per int32 word (compressed-tensors
pack-quantized, 8 bits), with scales in the compute dtype.

pack-quantized rather than naive-quantized: vLLM's compressed-tensors parser reads weight-only naive-quantized as
activation quantization and rejects it; pack-quantized 8-bit is what compressed-tensors' own W8A16 preset and
llm-compressor write, and what transformers and vLLM load.
"""

from __future__ import annotations

import math

import torch

from qexport.quant import primitives as quant
from qexport.formats.base import STORED_NAMES, Format, module_of, register


@register
class INT8(Format):
    name = "int8"
    quantizes = True
    num_bits = 8
    compression = "pack-quantized"
    group_size: int | None = None  # per output channel

    def __init__(self, dtype: str = "float16", **_options):
        super().__init__(dtype)

    def weights_args(self) -> dict:
        return {"num_bits": 8, "type": "int", "strategy": "channel", "symmetric": True, "dynamic": False}

    def why_not_quantizable(self, name, shape):
        return None if len(shape) == 2 else "not a 2-D weight"

    def stored(self, name, dtype, shape, quantize):
        if not quantize:
            return [(name, self.dense_dtype(dtype), shape)]
        out, cols = shape
        module = module_of(name)
        groups = 1 if self.group_size is None else cols // self.group_size
        return [
            (f"{module}.weight_packed", "I32", (out, math.ceil(cols * self.num_bits / 32))),
            (f"{module}.weight_scale", STORED_NAMES[self.dtype], (out, groups)),
            (f"{module}.weight_shape", "I64", (2,)),
        ]

    def pack(self, q: torch.Tensor) -> torch.Tensor:
        return quant.pack_int8(q)

    def encode(self, name, w, quantize):
        if not quantize:
            return {name: self.dense(w)}
        module = module_of(name)
        # Scales from the weight already cast to the compute dtype, as compressed-tensors computes them.
        scales, q = self.qparams(w.to(self.dtype))
        return {
            f"{module}.weight_packed": self.pack(q),
            f"{module}.weight_scale": scales,
            f"{module}.weight_shape": torch.tensor(list(w.shape), dtype=torch.int64),
        }

    def qparams(self, wc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scales, integer codes) of a weight already in the compute dtype: round-to-nearest over each row's or
        group's full range (compressed-tensors' minmax observer)."""
        scales = quant.compute_scales(wc, self.num_bits, self.group_size, dtype=self.dtype)
        return scales, quant.quantize(wc, scales, self.num_bits, self.group_size)

    def parameters(self):
        return {"scheme": f"W{self.num_bits}A16", "weights": self.weights_args(), "scale_dtype": self.config_dtype}

    def quantization_config(self, ignore):
        return {
            "quant_method": "compressed-tensors",
            "format": self.compression,
            "quantization_status": "compressed",
            "config_groups": {
                "group_0": {"targets": ["Linear"], "format": self.compression, "weights": self.weights_args()}
            },
            "ignore": list(ignore),
        }
