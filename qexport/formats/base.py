"""What a format is: how one tensor is stored, and the config.json entry that tells loaders so.

A format sees one tensor (with its name and whether it is a quantizable nn.Linear weight) and returns the tensors
to store; it knows nothing about files, shards or the pipeline. New formats register themselves by name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from ..errors import InputError
from ..safetensors_io import DTYPE_NAMES

Stored = tuple[str, str, tuple[int, ...]]  # (tensor name, safetensors dtype, shape)

FP16_MAX = torch.finfo(torch.float16).max


def to_fp16(name: str, w: torch.Tensor) -> torch.Tensor:
    """Cast a floating tensor to fp16. Values fp16 cannot hold become inf: the pipeline finds them in the
    stored tensors (a non-finite scale or dense value) and `nonfinite_error` says which it was."""
    return w.to(torch.float16)


def nonfinite_error(name: str, w: torch.Tensor, allow_nonfinite: bool, where: object = None) -> InputError | None:
    """Why a source tensor whose stored form is not finite cannot be exported, or None if that is allowed.

    Finite values above fp16's range are always refused (they would silently become inf); NaN / Inf that the
    source already holds are refused unless `allow_nonfinite`.
    """
    prefix = f"{where}: " if where else ""
    wide = w if w.element_size() > 1 else w.float()  # float8 has no isfinite kernel
    finite = torch.isfinite(wide)
    overflow = finite & (wide.abs() > FP16_MAX)
    if overflow.any():
        peak = wide[overflow].abs().max().item()
        return InputError(f"{prefix}tensor {name!r} {list(w.shape)} {w.dtype}: value {peak:.6g} overflows fp16 "
                          f"(max {FP16_MAX:.0f})")
    if not allow_nonfinite and not finite.all():
        return InputError(f"{prefix}tensor {name!r} {list(w.shape)} holds NaN or Inf "
                          f"(use --allow-nonfinite to keep it dense)")
    return None


def dense(name: str, w: torch.Tensor) -> torch.Tensor:
    """How every format stores what it does not quantize: floating tensors as fp16, the rest unchanged."""
    return to_fp16(name, w) if w.is_floating_point() else w


def dense_dtype(dtype: str) -> str:
    return "F16" if dtype in ("F64", "F32", "F16", "BF16") else dtype


class Format(ABC):
    name: str
    quantizes: bool = False

    def why_not_quantizable(self, name: str, shape: tuple[int, ...]) -> str | None:
        """Why a Linear weight of this shape must stay dense in this format, or None if it can be quantized."""
        return None if self.quantizes and len(shape) == 2 else "not a quantizing format"

    @abstractmethod
    def stored(self, name: str, dtype: str, shape: tuple[int, ...], quantize: bool) -> list[Stored]:
        """The tensors `encode` will return for a source tensor, predicted from dtype and shape alone."""

    @abstractmethod
    def encode(self, name: str, w: torch.Tensor, quantize: bool) -> dict[str, torch.Tensor]:
        """The tensors to store for source tensor `name` (a pure function: `w` is not modified)."""

    def quantization_config(self, ignore: list[str]) -> dict | None:
        return None

    def parameters(self) -> dict:
        return {}


REGISTRY: dict[str, type[Format]] = {}


def register(cls: type[Format]) -> type[Format]:
    REGISTRY[cls.name] = cls
    return cls


def dtype_name(t: torch.Tensor) -> str:
    return DTYPE_NAMES[t.dtype]
