"""Symmetric integer quantization primitives, bit-compatible with compressed-tensors.

Pure functions over tensors. The block shape decides the granularity:
- `group_size=None`: one scale per output channel (row), scale shape [out, 1];
- `group_size=g`: one scale per `g` consecutive input elements of a row, scale shape [out, in // g].

Arithmetic (matches compressed-tensors 0.20 bit for bit):
- scale = absmax / ((qmax - qmin) / 2), computed in fp32 and cast to the scale dtype; a zero scale becomes that
  dtype's eps, so all-zero groups quantize to 0 without dividing by zero;
- q = round(clamp(w / scale, qmin, qmax)), the division in the scale dtype, rounding half to even;
- dequantize: q * scale in the scale dtype.
"""

from __future__ import annotations

import sys

import torch

SCALE_DTYPE = torch.float16  # the default; an export stores scales in its compute dtype (fp16 or bf16)
_LITTLE_ENDIAN = sys.byteorder == "little"


def qrange(num_bits: int) -> tuple[int, int]:
    """The signed integer range of `num_bits`: (-2^(b-1), 2^(b-1) - 1)."""
    return -(1 << (num_bits - 1)), (1 << (num_bits - 1)) - 1


def group_view(w: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """View a [out, in] matrix as [out, groups, group_len]."""
    rows, cols = w.shape
    if group_size is None:
        return w.reshape(rows, 1, cols)
    if cols % group_size:
        raise ValueError(f"input size {cols} does not divide by group size {group_size}")
    return w.reshape(rows, cols // group_size, group_size)


def compute_scales(w: torch.Tensor, num_bits: int, group_size: int | None, dtype=SCALE_DTYPE) -> torch.Tensor:
    """Symmetric scales of a 2-D weight: [out, 1] per channel or [out, in // group_size] per group."""
    qmin, qmax = qrange(num_bits)
    absmax = _absmax(group_view(w, group_size)).to(torch.float32)
    scales = (absmax / ((qmax - qmin) / 2)).to(dtype)
    return torch.where(scales == 0, torch.tensor(torch.finfo(dtype).eps, dtype=dtype), scales)


# Floats of one sign order like their bit patterns read as integers, and NaN's patterns lie above inf's.
_SIGN_CLEARED = {2: (torch.int16, 0x7FFF), 4: (torch.int32, 0x7FFF_FFFF)}


def _absmax(grouped: torch.Tensor) -> torch.Tensor:
    """max |x| over the last dimension, bit for bit what `abs().amax()` gives (NaN if the block holds one). For 16-
    and 32-bit floats: the integer max of the bit patterns with the sign bit cleared, one cheap pass (3x faster here
    than an abs copy and a float max)."""
    view = _SIGN_CLEARED.get(grouped.element_size()) if grouped.is_floating_point() else None
    if view is None:
        return grouped.abs().amax(dim=-1)
    int_dtype, mask = view
    absmax = (grouped.view(int_dtype) & mask).amax(dim=-1).view(grouped.dtype)
    return absmax.masked_fill_(absmax.isnan(), float("nan"))  # the quiet NaN a float max returns, not the payload


def quantize(w: torch.Tensor, scales: torch.Tensor, num_bits: int, group_size: int | None) -> torch.Tensor:
    """Integer codes (int8 storage) of a 2-D weight for the given scales."""
    qmin, qmax = qrange(num_bits)
    scaled = group_view(w.to(scales.dtype), group_size) / scales.unsqueeze(-1)
    # round then clamp equals clamp then round: the bounds are integers. In place: one temporary, not three.
    return scaled.round_().clamp_(qmin, qmax).to(torch.int8).reshape(w.shape)


def dequantize(q: torch.Tensor, scales: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """Weights in the scale dtype from integer codes and their scales."""
    grouped = group_view(q.to(scales.dtype), group_size)
    return (grouped * scales.unsqueeze(-1)).reshape(q.shape)


def compute_asymmetric_qparams(w: torch.Tensor, num_bits: int, group_size: int | None,
                               dtype=SCALE_DTYPE) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric scales (in `dtype`) and int8 zero points of a 2-D weight, per channel or per group.

    Each block's range is widened to include 0; scale = (max - min) / (2^b - 1) and zero point =
    round(clamp(qmin - min / scale, qmin, qmax)), every step in `dtype` as compressed-tensors 0.20 computes it
    (`calculate_qparams`, zp_dtype int8). An all-zero block gets scale eps and zero point 0.
    """
    qmin, qmax = qrange(num_bits)
    grouped = group_view(w.to(dtype), group_size)
    low = grouped.amin(dim=-1).clamp(max=0)
    high = grouped.amax(dim=-1).clamp(min=0)
    scales = (high - low) / torch.tensor(qmax - qmin, dtype=dtype)
    zero_points = (qmin - low / scales).clamp(qmin, qmax).nan_to_num_(0.0)  # 0 / 0 for an all-zero block
    scales = torch.where(scales == 0, torch.tensor(torch.finfo(dtype).eps, dtype=dtype), scales)
    return scales, zero_points.round().to(torch.int8)


def quantize_asymmetric(w: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor, num_bits: int,
                        group_size: int | None) -> torch.Tensor:
    """Integer codes (int8 storage) round(clamp(w / scale + zero point)), the sum in the scale dtype."""
    qmin, qmax = qrange(num_bits)
    scaled = group_view(w.to(scales.dtype), group_size) / scales.unsqueeze(-1)
    scaled += zero_points.to(scales.dtype).unsqueeze(-1)
    return scaled.round_().clamp_(qmin, qmax).to(torch.int8).reshape(w.shape)


def dequantize_asymmetric(q: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor,
                          group_size: int | None) -> torch.Tensor:
    """(q - zero point) * scale in the scale dtype."""
    codes = group_view(q.to(scales.dtype), group_size) - zero_points.to(scales.dtype).unsqueeze(-1)
    return (codes * scales.unsqueeze(-1)).reshape(q.shape)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack int4 codes [out, in] (int8 storage, values in [-8, 7]) into int32 words [out, ceil(in / 8)].

    Each code is stored as q + 8; element j of a row sits at bits 4 * (j mod 8) of word j // 8. A row whose length
    does not divide by 8 ends in a word padded with zero bits (as compressed-tensors pads).
    """
    rows, cols = q.shape
    if _LITTLE_ENDIAN and cols % 8 == 0:
        # Two codes per int16 (element 2k in the low byte): q + 8 in 4 bits is q XOR 8; the high code's nibble
        # shifted down next to the low one makes the byte. Four passes over int16, no strided copies.
        pairs = q.contiguous().view(torch.int16).bitwise_xor(0x0808).bitwise_and_(0x0F0F)
        pairs |= pairs >> 4
        return pairs.to(torch.uint8).view(torch.int32)
    # Little-endian: byte k of a word holds elements 2k (low nibble) and 2k + 1 (high nibble) of its eight.
    nibbles = q.view(torch.uint8) + 8  # wraps modulo 256: -8..7 become 0..15
    if cols % 8:
        nibbles = torch.nn.functional.pad(nibbles, (0, 8 - cols % 8))
    packed_bytes = nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)
    return packed_bytes.contiguous().view(torch.int32) if _LITTLE_ENDIAN else _pack_words(nibbles)


def _pack_words(nibbles: torch.Tensor) -> torch.Tensor:
    """Portable (byte-order independent) packing: sum of disjoint shifted bit fields, wrapping as int32."""
    rows, cols = nibbles.shape
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    return (nibbles.to(torch.int32).reshape(rows, cols // 8, 8) << shifts).sum(dim=-1, dtype=torch.int32)


def pack_int4_columns(q: torch.Tensor) -> torch.Tensor:
    """Pack int4 codes [out, groups] along the output dimension into int32 words [ceil(out / 8), groups]: how
    compressed-tensors stores zero points (`pack_to_int32(..., packed_dim=0)`)."""
    # clone, not contiguous(): the transpose of a one-column [out, 1] is [1, out] with strides (1, 1), which counts
    # as contiguous; pack_int4's byte-to-int32 view then fails on it (int4-asym of any Linear with one group a row).
    return pack_int4(q.t().clone(memory_format=torch.contiguous_format)).t().contiguous()


def unpack_int4_columns(packed: torch.Tensor, rows: int) -> torch.Tensor:
    """Inverse of `pack_int4_columns`: int32 words [ceil(rows / 8), groups] to int4 codes [rows, groups]."""
    return unpack_int4(packed.t().contiguous(), rows).t().contiguous()


def pack_int8(q: torch.Tensor) -> torch.Tensor:
    """Pack int8 codes [out, in] into int32 words [out, ceil(in / 4)], compressed-tensors' 8-bit pack-quantized.

    Each code is stored as q + 128; element j of a row sits at bits 8 * (j mod 4) of word j // 4. A row whose
    length does not divide by 4 ends in a word padded with zero bytes (as compressed-tensors pads).
    """
    rows, cols = q.shape
    shifted = q.view(torch.uint8) ^ 0x80  # q + 128 modulo 256: -128..127 become 0..255
    if cols % 4:
        shifted = torch.nn.functional.pad(shifted, (0, 4 - cols % 4))
    if _LITTLE_ENDIAN:
        return shifted.contiguous().view(torch.int32)
    shifts = torch.arange(0, 32, 8, dtype=torch.int32)
    return (shifted.to(torch.int32).reshape(rows, -1, 4) << shifts).sum(dim=-1, dtype=torch.int32)


def unpack_int8(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """Inverse of `pack_int8`: int32 words [out, ceil(cols / 4)] to int8 codes [out, cols]."""
    shifts = torch.arange(0, 32, 8, dtype=torch.int32)
    codes = (packed.unsqueeze(-1) >> shifts) & 0xFF
    return (codes.reshape(packed.shape[0], -1)[:, :cols] - 128).to(torch.int8)


def unpack_int4(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """Inverse of `pack_int4`: int32 words [out, ceil(cols / 8)] to int4 codes [out, cols] in int8 storage."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    nibbles = (packed.unsqueeze(-1) >> shifts) & 0xF
    return (nibbles.reshape(packed.shape[0], -1)[:, :cols] - 8).to(torch.int8)
