"""INT4 W4A16 asymmetric: group-wise int4 weights with a scale and a zero point per group (compressed-tensors
pack-quantized with `symmetric: false`, the layout of its W4A16_ASYM preset).

Stored per quantized Linear [out, in] with g groups per row (g = in / group_size):
- `weight_packed` I32 [out, in/8]: codes q in [-8, 7] stored as q + 8, eight per word (as int4);
- `weight_scale` [out, g] in the compute dtype: (max - min) / 15 over the group's range widened to include 0;
- `weight_zero_point` I32 [ceil(out/8), g]: zero points in [-8, 7], packed eight per word along the OUTPUT
  dimension (compressed-tensors' `pack_to_int32(zp, 4, packed_dim=0)`, what vLLM's WNA16 kernels read);
- `weight_shape` I64 [2].
w ≈ (q - zero point) * scale. The zero point costs 4 bits per group: 4.156 bits per weight at group 128 with
16-bit scales (4.125 symmetric), 4.3125 at group 64 (4.25).
"""

from __future__ import annotations

import math

import torch

from qexport.quant import clip_search

from qexport.quant import primitives as quant
from qexport.formats.base import module_of, register
from qexport.formats.int4 import INT4


@register
class INT4Asymmetric(INT4):
    name = "int4-asym"

    def weights_args(self) -> dict:
        return {**super().weights_args(), "symmetric": False}

    def stored(self, name, dtype, shape, quantize):
        tensors = super().stored(name, dtype, shape, quantize)
        if not quantize:
            return tensors
        out, cols = shape
        return tensors + [(f"{module_of(name)}.weight_zero_point", "I32", (math.ceil(out / 8), cols // self.group_size))]

    def encode(self, name, w, quantize):
        if not quantize:
            return {name: self.dense(w)}
        module = module_of(name)
        wc = w.to(self.dtype)  # qparams from the weight in the compute dtype, as compressed-tensors computes them
        if self.method == "mse":
            scales, zero_points, q = clip_search.search_qparams(wc, 4, self.group_size, symmetric=False,
                                                                dtype=self.dtype)
        else:
            scales, zero_points = quant.compute_asymmetric_qparams(wc, 4, self.group_size, dtype=self.dtype)
            q = quant.quantize_asymmetric(wc, scales, zero_points, 4, self.group_size)
        return {
            f"{module}.weight_packed": quant.pack_int4(q),
            f"{module}.weight_scale": scales,
            f"{module}.weight_shape": torch.tensor(list(w.shape), dtype=torch.int64),
            f"{module}.weight_zero_point": quant.pack_int4_columns(zero_points),
        }

    def quantization_config(self, ignore):
        # transformers 5.24 with compressed-tensors 0.20 cannot load asymmetric pack-quantized weights on its default
        # route: compressing the empty (meta) model leaves `weight_zero_point` unpacked [out, g], so the packed
        # [out/8, g] tensor that compressed-tensors' own compressor writes is a size mismatch (reproduced with a
        # checkpoint compressed by compressed-tensors itself). `dequantize: true` (a CompressedTensorsConfig option)
        # takes its other route, which decompresses each Linear while loading, zero points included: plain
        # `from_pretrained` then loads with empty loading info. vLLM and compressed-tensors ignore the key.
        return {**super().quantization_config(ignore), "dequantize": True}

    def parameters(self):
        return {**super().parameters(), "scheme": "W4A16_ASYM"}
