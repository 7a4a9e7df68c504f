"""Plain-text tables for the terminal (export summary, demo). HTML reports live in the pytest plugin."""

from __future__ import annotations

import math


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} GB"


# The columns of every summary table (export, demo, verify --report, the pytest report), in order, with their
# headings: one name for one number everywhere. Rows may carry any subset; the ratios are defined once, in
# qexport.sizes.size_summary.
SUMMARY_COLUMNS = {
    "model": "model",
    "format": "format",
    "weight_bytes": "bytes",
    "file_ratio": "ratio (whole model)",
    "quantized_ratio": "ratio (quantized)",
    "bits_per_quantized_weight": "bits / q-weight",
    "sqnr_min_db": "SQNR min dB",
    "sqnr_median_db": "SQNR median dB",
    "kld_mean": "KLD mean",
    "kld_p99": "KLD p99",
    "top1": "top-1",
    "cosine": "cosine",
    "max_abs_diff": "max |Δlogit|",
    "reload_ok": "reload ok",
    "passed": "all checks",
    "thresholds": "thresholds",
    "path": "path",
}

# What the columns mean, for the line under a table a newcomer reads.
COLUMN_NOTES = (
    "bytes: the safetensors files; ratio (whole model): all tensors as a float16 copy would store them / as stored; "
    "ratio (quantized): the same for the quantized Linear weights alone (with their scales); bits / q-weight: "
    "stored bits per quantized weight (4.125 for int4 g128)."
)


def table(rows: list[dict]) -> str:
    """A markdown table of `rows` (all with the same keys), headed by SUMMARY_COLUMNS' names where they have one."""
    if not rows:
        return ""
    keys = list(rows[0])
    headers = [SUMMARY_COLUMNS.get(k, k) for k in keys]
    cells = [[format_value(r[k]) for k in keys] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)])


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


def export_rows(manifests: dict[str, dict]) -> list[dict]:
    """One summary row per format, with the keys (and so the headings) of `qexport verify` and the reports."""
    return [{"format": name,
             "weight_bytes": m["summary"]["weight_bytes"],
             "file_ratio": m["summary"]["ratio_vs_fp16"],
             "quantized_ratio": m["summary"]["quantized_ratio_vs_fp16"],
             "bits_per_quantized_weight": m["summary"]["bits_per_quantized_weight"]} for name, m in manifests.items()]


def print_export_summary(manifests: dict[str, dict], out) -> None:
    from pathlib import Path

    print(table(export_rows(manifests)))
    print(f"\n{COLUMN_NOTES}")
    print("\nwritten (each folder a complete model with a qexport.json manifest and a README.md card):")
    for name in manifests:
        print(f"  {Path(out) / name}")
