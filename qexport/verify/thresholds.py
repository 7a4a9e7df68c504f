"""Pass/fail thresholds of the verification checks, per format, as data.

Where each default comes from (the measurements, the margins, the broken exports each bound catches) is written
down in docs/thresholds.md; a changed default changes that page too.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from qexport.errors import InputError


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
    # Relative to round-to-nearest of the export's own declared scheme on the same reference (functional_vs_rtn).
    max_kld_vs_rtn: float | None = 1.5  # KLD_export <= this * KLD_rtn + kld_vs_rtn_slack
    kld_vs_rtn_slack: float = 1e-6
    max_top1_drop_vs_rtn: float | None = 0.05  # top1_export >= top1_rtn - this
    max_cosine_gap_vs_rtn: float | None = 1.5  # encoders: 1 - cos_export <= this * (1 - cos_rtn) + slack
    cosine_vs_rtn_slack: float = 1e-6

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
    # Absolute KLD / top-1 bounds only where they held on random and real models alike (docs/thresholds.md); the
    # relative bounds (functional_vs_rtn) are the fields' defaults and apply to every quantized format.
    "int8": Thresholds(min_sqnr_db=30.0, max_kld_mean=0.01, max_kld_p99=0.1, min_top1=0.90, min_cosine=0.999),
    "int4": Thresholds(min_sqnr_db=13.0, min_cosine=0.93),
}


def thresholds_for(fmt: str, overrides: dict[str, float | None] | None = None) -> Thresholds:
    """The format's defaults (a variant such as int4-asym takes its family's, int4's), then `overrides`."""
    base = DEFAULTS.get(fmt) or DEFAULTS.get(fmt.split("-")[0], DEFAULTS["fp16"])
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
