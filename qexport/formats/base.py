"""What a format is: how one tensor is stored, and the config.json entry that tells loaders so.

A format sees one tensor (with its name and whether it is a quantizable nn.Linear weight) and returns the tensors
to store; it knows nothing about files, shards or the pipeline. New formats register themselves by name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from qexport.errors import InputError
from qexport.io.safetensors_file import DTYPE_NAMES

Stored = tuple[str, str, tuple[int, ...]]  # (tensor name, safetensors dtype, shape)

FP16_MAX = torch.finfo(torch.float16).max

# The floating dtypes an export can compute in: config.json's `dtype`, the scales and every dense tensor.
COMPUTE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
STORED_NAMES = {torch.float16: "F16", torch.bfloat16: "BF16"}


def nonfinite_error(name: str, w: torch.Tensor, allow_nonfinite: bool, where: object = None,
                    dtype: torch.dtype = torch.float16) -> InputError | None:
    """Why a source tensor whose stored form (in `dtype`) is not finite cannot be exported, or None if allowed.

    Finite values that become inf when cast to the stored dtype are always refused (they would silently become
    inf); NaN / Inf that the source already holds are refused unless `allow_nonfinite`. The test is the cast
    itself, exact for every source dtype: a bf16 source is never compared in bf16, where fp16's 65504 rounds to
    65536 and 65536 would pass.
    """
    prefix = f"{where}: " if where else ""
    wide = w if w.element_size() > 1 else w.float()  # float8 has no isfinite kernel
    finite = torch.isfinite(wide)
    limit = torch.finfo(dtype).max
    overflow = finite & torch.isinf(wide.to(dtype))
    if overflow.any():
        peak = wide[overflow].abs().max().item()
        short = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, str(dtype))
        return InputError(f"{prefix}tensor {name!r} {list(w.shape)} {w.dtype}: value {peak:.6g} overflows {short} "
                          f"(max {limit:.6g})")
    if not allow_nonfinite and not finite.all():
        return InputError(f"{prefix}tensor {name!r} {list(w.shape)} holds NaN or Inf "
                          f"(use --allow-nonfinite to keep it dense)")
    return None


class Format(ABC):
    """A storage format. `dtype` is the floating dtype it computes in: config.json's `dtype`, the dtype of its
    scales and of every tensor it keeps dense (fp16, or bf16 for a bf16 source; see `compute_dtype_of`)."""

    name: str
    quantizes: bool = False

    def __init__(self, dtype: str = "float16", **_options):
        if dtype not in COMPUTE_DTYPES:
            raise InputError(f"{self.name}: compute dtype {dtype!r} is not one of {', '.join(COMPUTE_DTYPES)}")
        self.config_dtype = dtype
        self.dtype = COMPUTE_DTYPES[dtype]

    def dense(self, w: torch.Tensor) -> torch.Tensor:
        """How a tensor that is not quantized is stored: floating tensors in the compute dtype, others unchanged.
        Values the dtype cannot hold become inf; the pipeline finds them in the stored tensors."""
        return w.to(self.dtype) if w.is_floating_point() else w

    def dense_dtype(self, dtype: str) -> str:
        """The safetensors dtype `dense` stores a source dtype as."""
        return STORED_NAMES[self.dtype] if dtype.startswith(("F", "BF")) else dtype  # float8 too

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


def module_of(weight: str) -> str:
    """The module a weight belongs to: `model.layers.0.mlp.up_proj` of `model.layers.0.mlp.up_proj.weight`."""
    return weight.removesuffix(".weight")


def register(cls: type[Format]) -> type[Format]:
    REGISTRY[cls.name] = cls
    return cls


def dtype_name(t: torch.Tensor) -> str:
    return DTYPE_NAMES[t.dtype]
