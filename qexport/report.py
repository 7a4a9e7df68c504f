"""Plain-text tables for the terminal (export summary, demo). HTML reports live in the pytest plugin."""

from __future__ import annotations

import math


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} GB"


def table(rows: list[dict]) -> str:
    """A markdown table of `rows` (all with the same keys)."""
    if not rows:
        return ""
    headers = list(rows[0])
    cells = [[format_value(r[h]) for h in headers] for r in rows]
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
        return f"{value:.4g}"
    return str(value)


def export_rows(manifests: dict[str, dict]) -> list[dict]:
    rows = []
    for name, m in manifests.items():
        s = m["summary"]
        rows.append({
            "format": name,
            "files": len(m["files"]) + 1,
            "bytes": human_bytes(s["total_bytes"]),
            "ratio vs fp16 (whole)": round(s["ratio_vs_fp16"], 3),
            "ratio vs fp16 (quantized)": None if s["quantized_ratio_vs_fp16"] is None
            else round(s["quantized_ratio_vs_fp16"], 3),
            "bits/quantized weight": None if s["bits_per_quantized_weight"] is None
            else round(s["bits_per_quantized_weight"], 3),
            "Linears quantized": _linears_quantized(s, m.get("parameters", {})),
        })
    return rows


def _linears_quantized(summary: dict, parameters: dict) -> str | None:
    """'168/168 (100% of bytes), g64' for a quantizing format; None for one that quantizes nothing."""
    if not summary.get("linear_weights") or not parameters.get("weights"):
        return None
    text = (f"{summary['quantized_linears']}/{summary['linear_weights']} "
            f"({100 * summary['quantized_linear_share']:.0f}% of bytes)")
    group = parameters["weights"].get("group_size")
    return text + (f", g{group}" if parameters["weights"].get("strategy") == "group" else "")


def print_export_summary(manifests: dict[str, dict], out) -> None:
    print(table(export_rows(manifests)))
    print(f"\nwritten to {out}/<format>; each folder has a qexport.json manifest")
