"""Plain-text tables for the terminal (export summary, demo). HTML reports live in the pytest plugin."""

from __future__ import annotations

from qexport.report.values import format_value


# The columns of every summary table (export, demo, verify --report, the pytest report), in order, with their
# headings: one name for one number everywhere. Rows may carry any subset; the ratios are defined once, in
# qexport.io.sizes.size_summary.
SUMMARY_COLUMNS = {
    "model": "model",
    "format": "format",
    "weight_bytes": "bytes",
    "file_ratio": "ratio (whole model)",
    "quantized_ratio": "ratio (quantized)",
    "bits_per_quantized_weight": "bits / q-weight",
    "linears_quantized": "Linears quantized",
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
    "bytes: the safetensors files. ratio (whole model): the bytes of all tensors in a float16 copy / as stored.\n"
    "ratio (quantized): the same for the quantized Linear weights alone, scales included. bits / q-weight: stored\n"
    "bits per quantized weight (int4 group 128: 4.125; int8 per channel: 8 + 16 / input size). Linears quantized:\n"
    "quantized / targeted nn.Linear weights (lm_head stays dense by design), their share of the bytes, group size."
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


def export_rows(manifests: dict[str, dict]) -> list[dict]:
    """One summary row per format, with the keys (and so the headings) of `qexport verify` and the reports."""
    return [{"format": name,
             "weight_bytes": m["summary"]["weight_bytes"],
             "file_ratio": m["summary"]["ratio_vs_fp16"],
             "quantized_ratio": m["summary"]["quantized_ratio_vs_fp16"],
             "bits_per_quantized_weight": m["summary"]["bits_per_quantized_weight"],
             "linears_quantized": _linears_quantized(m["summary"], m.get("parameters", {}))}
            for name, m in manifests.items()]


def _linears_quantized(summary: dict, parameters: dict) -> str | None:
    """'168/168 (100% of bytes), g64' for a quantizing format; None for one that quantizes nothing."""
    if not summary.get("linear_weights") or not parameters.get("weights"):
        return None
    text = (f"{summary['quantized_linears']}/{summary['linear_weights']} "
            f"({100 * summary['quantized_linear_share']:.0f}% of bytes)")
    group = parameters["weights"].get("group_size")
    return text + (f", g{group}" if parameters["weights"].get("strategy") == "group" else "")


def print_export_summary(manifests: dict[str, dict], out) -> None:
    from pathlib import Path

    from qexport.report.escape import terminal_safe

    print(table(export_rows(manifests)))
    print(f"\n{COLUMN_NOTES}")
    print("\nwritten (each folder a complete model with a qexport.json manifest and a README.md card):")
    for name in manifests:
        print(f"  {terminal_safe(Path(out) / name)}")
