"""INT8 W8A16: symmetric per-output-channel int8 weights with fp16 scales (compressed-tensors naive-quantized)."""

from __future__ import annotations

import torch

from .. import quant
from .base import Format, dense, dense_dtype, register, to_fp16


def _module(name: str) -> str:
    return name.removesuffix(".weight")


@register
class INT8(Format):
    name = "int8"
    quantizes = True
    num_bits = 8
    compression = "naive-quantized"

    def __init__(self, **_options):
        pass

    def weights_args(self) -> dict:
        return {"num_bits": 8, "type": "int", "strategy": "channel", "symmetric": True, "dynamic": False}

    def stored(self, name, dtype, shape, quantize):
        if not quantize:
            return [(name, dense_dtype(dtype), shape)]
        out, _ = shape
        return [(name, "I8", shape), (f"{_module(name)}.weight_scale", "F16", (out, 1))]

    def encode(self, name, w, quantize):
        if not quantize:
            return {name: dense(name, w)}
        w16 = to_fp16(name, w)
        scales = quant.compute_scales(w16, 8, None)
        return {name: quant.quantize(w16, scales, 8, None), f"{_module(name)}.weight_scale": scales}

    def parameters(self):
        return {"scheme": "W8A16", "weights": self.weights_args(), "scale_dtype": "float16"}

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
