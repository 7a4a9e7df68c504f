"""Pass/fail thresholds of the verification checks, per format, as data.

Where the defaults come from (measured on this stack: torch 2.13 CPU, transformers 5.24, compressed-tensors 0.20):
- SQNR: seeded Gaussian weights give ~41 dB INT8 per channel and ~18.6-19 dB INT4 g128; real MiniLM weights
  (heavier tails) measured INT8 min 33.5 / median 42.1 dB, INT4 min 17.0 / median 18.6 dB; the tiny qwen3 fixture
  INT8 min 42.4, INT4 min 19.0. The floors (30 / 13 dB) sit 3.5-4 dB below the real-weight minimum; one tensor's
  scales off by 25% drops that tensor to ~12 dB in either format.
- Quantized-tensor compression vs fp16: INT4 g128 with 16-bit scales is 4.125 bits -> 3.879x; INT8 per channel is
  8 + 16/in bits -> 1.95x or more for in >= 256. The `bytes` check holds every export to the bytes its declared
  scheme needs; `min_quantized_ratio` is an opt-in floor on the scheme itself (e.g. 3.85 refuses int4 g32).
- KLD / top-1 on next-token distributions: the tiny random-init qwen3 fixture measured INT8 KLD 1.8e-5, top-1
  0.965; INT4 KLD 4.0e-3 (p99 6.3e-3), top-1 0.57 (near-uniform logits of a random model make top-1 flip
  easily, so its top-1 floor is low; KLD is the real gate). Real-model reference (llama.cpp, Llama-3-8B): Q8_0
  KLD 0.0014 / top-1 97.7%, Q4_0 KLD 0.072. The KLD ceilings (0.01 INT8, 0.1 INT4) admit real models of that
  quality; the fp16 ones are far above the measured 1e-14.
- Embedding cosine (encoders, mean-pooled over real sentences): MiniLM measured 0.9996 INT8 and 0.946 INT4;
  floors 0.999 and 0.93 as the issue sets them.
- Reload equality: transformers' decompressed logits equal qexport's own dequantization bit for bit on our
  exports (max |diff| 0); 1e-4 leaves room for other tools' arithmetic order.
- Dense tensors: fp16 has an 11-bit significand, so rounding a normal-range value costs at most 2^-11 relative
  error (>= 66 dB); 60 dB leaves margin for subnormals.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .errors import InputError


@dataclass(frozen=True)
class Thresholds:
    """What a format must reach. `None` disables that bound."""

    min_sqnr_db: float | None = None  # lowest per-tensor SQNR of quantized weights vs the reference
    dense_min_sqnr_db: float = 60.0  # every tensor stored dense vs the reference
    min_quantized_ratio: float | None = None  # fp16 bytes / stored bytes of the quantized tensors
    max_kld_mean: float | None = None
    max_kld_p99: float | None = None
    min_top1: float | None = None
    min_cosine: float | None = None  # encoders: mean cosine of pooled embeddings
    reload_max_abs_diff: float = 1e-4  # transformers' reload vs our own dequantization, output units

    def with_overrides(self, overrides: dict[str, float | None]) -> "Thresholds":
        """A copy with some fields replaced; unknown names are an InputError listing the known ones."""
        known = {f.name for f in dataclasses.fields(self)}
        for key in overrides:
            if key not in known:
                raise InputError(f"--threshold: unknown threshold {key!r} (known: {', '.join(sorted(known))})")
        checked = {key: threshold_value(value, f"threshold {key}") for key, value in overrides.items()}
        return dataclasses.replace(self, **checked)


DEFAULTS: dict[str, Thresholds] = {
    "fp16": Thresholds(max_kld_mean=1e-4, max_kld_p99=1e-3, min_top1=0.99, min_cosine=0.9999),
    "int8": Thresholds(min_sqnr_db=30.0, max_kld_mean=0.01, max_kld_p99=0.1,
                       min_top1=0.90, min_cosine=0.999),
    "int4": Thresholds(min_sqnr_db=13.0, max_kld_mean=0.1, max_kld_p99=1.0,
                       min_top1=0.50, min_cosine=0.93),
}


def thresholds_for(fmt: str, overrides: dict[str, float | None] | None = None) -> Thresholds:
    base = DEFAULTS.get(fmt, DEFAULTS["fp16"])
    return base.with_overrides(overrides) if overrides else base


def parse_overrides(items: list[str], option: str = "--threshold") -> dict[str, float | None]:
    """`["max_kld_mean=0.05", "min_top1=none"]` -> {"max_kld_mean": 0.05, "min_top1": None}.

    A value is a finite number or `none` (the bound is disabled, and reports say so). NaN and infinity are
    refused: every comparison with NaN is false, so `min_top1=nan` would silently pass anything.
    """
    out: dict[str, float | None] = {}
    known = {f.name for f in dataclasses.fields(Thresholds)}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in known:
            raise InputError(f"{option}: {item!r} is not NAME=VALUE with NAME one of {', '.join(sorted(known))}")
        out[key] = threshold_value(value, f"{option}: {item!r}")
    return out


def threshold_value(value, where: str) -> float | None:
    """A threshold as given (text or number) -> a finite float, or None for `none`; anything else is an InputError."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "none"):
        return None
    if isinstance(value, bool):
        raise InputError(f"{where}: {value!r} is not a number (or 'none')")
    try:
        number = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        raise InputError(f"{where}: {value!r} is not a number (or 'none')")
    if not math.isfinite(number):
        raise InputError(f"{where}: {value!r} is not a finite number (use 'none' to disable a threshold)")
    return number


@dataclass(frozen=True)
class Regression:
    """How far a metric may move in the bad direction against a stored baseline before it is a regression."""

    higher_is_better: bool
    abs_tol: float
    rel_tol: float = 0.0

    def allowed(self, baseline: float) -> float:
        return self.abs_tol + self.rel_tol * abs(baseline)


# Tolerances from run-to-run noise: every metric here is deterministic on a fixed stack (seeded inputs, CPU), so
# the tolerances only absorb library-version arithmetic drift, not randomness.
REGRESSIONS: dict[str, Regression] = {
    "kld_mean": Regression(higher_is_better=False, abs_tol=1e-6, rel_tol=0.10),
    "kld_p99": Regression(higher_is_better=False, abs_tol=1e-5, rel_tol=0.20),
    "top1": Regression(higher_is_better=True, abs_tol=0.01),
    "cosine": Regression(higher_is_better=True, abs_tol=5e-4),
    "sqnr_min_db": Regression(higher_is_better=True, abs_tol=0.25),
    "sqnr_median_db": Regression(higher_is_better=True, abs_tol=0.25),
    "quantized_ratio": Regression(higher_is_better=True, abs_tol=0.005),
    "weight_bytes": Regression(higher_is_better=False, abs_tol=0, rel_tol=0.001),
}
