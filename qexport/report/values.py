"""How a value reads in every table and sentence qexport prints (terminal, model card, HTML report, verify)."""

from __future__ import annotations

import math


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} GB"


def format_value(value, missing: str = "-", false: str = "no") -> str:
    """How a number reads in every table qexport prints (terminal, model card, HTML report)."""
    if hasattr(value, "item"):  # numpy / pandas / torch scalars
        value = value.item()
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return missing
    if isinstance(value, bool):
        return "yes" if value else false
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value.is_integer() and abs(value) >= 1e4:  # a byte count that went through a float: 1,868,632
            return f"{int(value):,}"
        return f"{value:.4g}"
    return str(value)


def format_ratio(value) -> str:
    """A ratio vs fp16 in a sentence: `2.253x`."""
    return f"{format_value(value)}x"
