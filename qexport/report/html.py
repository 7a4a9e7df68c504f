"""HTML pieces for reports: the per model x format summary table (pandas), a per-tensor SQNR histogram as inline
SVG (no plotting dependency), and the standalone page `qexport verify --report` writes.

JSON that qexport writes (`verify --json`, `--save-baseline`, `inspect --json`, the pytest gate's metrics, the
JSON embedded in the HTML page) is standard JSON (RFC 8259) that any parser reads (`JSON.parse` too): a float
that is NaN or +-inf, which standard JSON cannot spell, is written as the string "NaN", "Infinity" or
"-Infinity" (what Python's `float()` and JavaScript's `Number()` read back); every other number stays a number.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

from qexport.report.terminal import SUMMARY_COLUMNS
from qexport.io.identity import model_name
from qexport.report.values import format_value


STYLE = """
table.qexport {border-collapse: collapse; font: 13px sans-serif; margin: 8px 0}
table.qexport th, table.qexport td {border: 1px solid #ccc; padding: 3px 8px; text-align: right}
table.qexport th {background: #f0f0f0}
table.qexport td:first-child, table.qexport td:nth-child(2) {text-align: left}
.fail {color: #b00; font-weight: bold} .pass {color: #070} .skip {color: #777}
"""


def merge_rows(rows: list[dict]) -> list[dict]:
    """One row per (model, format): later rows fill in columns earlier rows left empty (tests record parts)."""
    merged: dict[tuple, dict] = {}
    for row in rows:
        key = (row.get("model"), row.get("format"))
        target = merged.setdefault(key, {"model": key[0], "format": key[1]})
        for k, v in row.items():
            if k == "passed" and k in target:
                target[k] = bool(target[k]) and bool(v)
            elif v is not None and target.get(k) is None:
                target[k] = v
    return [merged[k] for k in sorted(merged, key=lambda k: (str(k[0]), str(k[1])))]


def summary_frame(rows: list[dict]):
    import pandas as pd

    rows = merge_rows(rows)
    columns = [c for c in SUMMARY_COLUMNS if any(c in r for r in rows)]
    frame = pd.DataFrame([{c: r.get(c) for c in columns} for r in rows], columns=columns)
    return frame.rename(columns=SUMMARY_COLUMNS)


def _fmt(value) -> str:
    return format_value(value, false="NO")


def summary_html(rows: list[dict], title: str = "qexport summary") -> str:
    if not rows:
        return ""
    frame = summary_frame(rows).astype(object)
    table = frame.map(_fmt).to_html(index=False, classes="qexport", border=0)
    return f"<style>{STYLE}</style><h2>{html.escape(title)}</h2>{table}"


def svg_histogram(values: list[float], title: str = "per-tensor SQNR (dB)", bins: int = 12,
                  width: int = 420, height: int = 160, threshold: float | None = None,
                  xlabel: str = "SQNR (dB)", ylabel: str = "tensors") -> str:
    """A bar histogram as an inline SVG string, with axis labels and (if given) a red marker at `threshold`
    (the bound the values are judged by; the x range stretches to include it)."""
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return ""
    lo, hi = min(values), max(values)
    if threshold is not None and math.isfinite(threshold):
        lo, hi = min(lo, threshold), max(hi, threshold)
    span = (hi - lo) or 1.0
    counts = [0] * bins
    for v in values:
        counts[min(bins - 1, int((v - lo) / span * bins))] += 1
    top, left, right, base = max(counts), 40, 16, height - 36
    bar_w = (width - left - right) / bins
    bars = []
    for i, c in enumerate(counts):
        h = (base - 24) * c / top
        x = left + i * bar_w
        bars.append(f'<rect x="{x:.1f}" y="{base - h:.1f}" width="{bar_w - 2:.1f}" height="{h:.1f}" fill="#4a7ab5">'
                    f"<title>{lo + i * span / bins:.2f}-{lo + (i + 1) * span / bins:.2f}: {c}</title></rect>")
    marker = ""
    if threshold is not None and math.isfinite(threshold):
        x = left + (threshold - lo) / span * (width - left - right)
        marker = (f'<line x1="{x:.1f}" y1="20" x2="{x:.1f}" y2="{base}" stroke="#b00" stroke-dasharray="4 2"/>'
                  f'<text x="{x:.1f}" y="30" fill="#b00" text-anchor="middle">threshold {threshold:g}</text>')
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
            f'font-size="11"><text x="{left}" y="12">{html.escape(title)} (n={len(values)})</text>{"".join(bars)}'
            f'<line x1="{left}" y1="{base}" x2="{width - right}" y2="{base}" stroke="#333"/>'
            f'<line x1="{left}" y1="20" x2="{left}" y2="{base}" stroke="#333"/>'
            f'<text x="{left - 4}" y="{base}" text-anchor="end">0</text>'
            f'<text x="{left - 4}" y="28" text-anchor="end">{top}</text>'
            f'<text x="12" y="{(base + 20) / 2:.0f}" text-anchor="middle" '
            f'transform="rotate(-90 12 {(base + 20) / 2:.0f})">{html.escape(ylabel)}</text>'
            f'<text x="{left}" y="{base + 14}">{lo:.1f}</text>'
            f'<text x="{width - right}" y="{base + 14}" text-anchor="end">{hi:.1f}</text>'
            f'<text x="{(left + width - right) / 2:.0f}" y="{height - 6}" text-anchor="middle">'
            f"{html.escape(xlabel)}</text>{marker}</svg>")


def metrics_table(metrics: dict) -> str:
    """A two-column table of scalar metrics (the numbers behind an assertion)."""
    rows = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(_fmt(v))}</td></tr>"
                   for k, v in metrics.items() if not isinstance(v, (dict, list)))
    return f'<table class="qexport"><tr><th>metric</th><th>value</th></tr>{rows}</table>' if rows else ""


def _status_cell(status: str) -> str:
    return f'<td class="{ {"passed": "pass", "skipped": "skip"}.get(status, "fail") }">{status}</td>'


def _status_class(status: str) -> str:
    return "fail" if status in ("loosened", "disabled") else ""


def thresholds_html(entries: list[dict]) -> str:
    """Every threshold with its value, the format's default and whether it was loosened or disabled."""
    rows = "".join(
        f"<tr><td>{html.escape(e['name'])}</td><td>{'none' if e['value'] is None else html.escape(_fmt(e['value']))}"
        f"</td><td>{'none' if e['default'] is None else html.escape(_fmt(e['default']))}</td>"
        f"<td class=\"{_status_class(e['status'])}\">{html.escape(e['status'])}</td></tr>" for e in entries)
    return (f'<table class="qexport"><tr><th>threshold</th><th>value</th><th>default</th><th>status</th></tr>'
            f"{rows}</table>")


def verification_html(result: dict) -> str:
    """A standalone page for one `Verification.as_dict()`."""
    changed = result.get("thresholds_changed") or []
    status = "PASSED" if result["passed"] else "FAILED"
    headline = status + (f" with {len(changed)} threshold(s) not at their defaults" if changed else "")
    checks = "".join(
        f'<tr><td>{html.escape(c["name"])}</td>{_status_cell(c["status"])}'
        f'<td style="text-align:left">{html.escape(c["detail"])}</td>'
        f'<td style="text-align:left">{html.escape("; ".join(e["text"] for e in c.get("thresholds", [])))}</td></tr>'
        for c in result["checks"])
    sqnr = next((c["metrics"].get("per_tensor_sqnr_db") for c in result["checks"] if c["name"] == "weights_sqnr"),
                None)
    plot = svg_histogram(list(sqnr.values()), threshold=result["thresholds"].get("min_sqnr_db")) if sqnr else ""
    row = {"model": result.get("model") or model_name(result["reference"]), **result["metrics"],
           "passed": result["passed"], "thresholds": "; ".join(changed) or "defaults", "path": result["reference"]}
    entries = result.get("threshold_entries") or [
        {"name": k, "value": v, "default": v, "status": "default"} for k, v in result["thresholds"].items()]
    notes = "".join(f"<li class='fail'>{html.escape(t)}</li>" for t in changed)
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>qexport verify: {status}</title>"
        f"<style>{STYLE} body {{font: 14px sans-serif; margin: 20px}}</style></head><body>"
        f"<h1>qexport verify: <span class='{'pass' if result['passed'] else 'fail'}'>{html.escape(headline)}</span>"
        f"</h1>{f'<ul>{notes}</ul>' if notes else ''}"
        f"<p>export <code>{html.escape(result['export'])}</code> ({html.escape(result['format'])}) against "
        f"reference <code>{html.escape(result['reference'])}</code></p>"
        f"{summary_html([row], 'summary')}<h2>checks</h2>"
        f'<table class="qexport"><tr><th>check</th><th>status</th><th>detail</th><th>threshold</th></tr>{checks}'
        f"</table>{plot}<h2>thresholds</h2>{thresholds_html(entries)}"
        f"<script type='application/json' id='qexport-json'>{html.escape(to_json(result, indent=None))}</script>"
        "</body></html>"
    )


def write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


NONFINITE_JSON = {math.inf: "Infinity", -math.inf: "-Infinity"}  # NaN: "NaN"


def standard_json_value(value):
    """`value` with every NaN / +-inf float (in dicts, lists and tuples, at any depth) replaced by its string."""
    if isinstance(value, float) and not math.isfinite(value):
        return NONFINITE_JSON.get(value, "NaN")
    if isinstance(value, dict):
        return {k: standard_json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [standard_json_value(v) for v in value]
    return value


def to_json(data, indent: int | None = 2) -> str:
    """Standard JSON (see the module docstring): never a NaN or Infinity token."""
    return json.dumps(standard_json_value(data), indent=indent, default=_json_default, allow_nan=False) + \
        ("\n" if indent else "")


def _json_default(value):
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and hasattr(value, "dtype"):  # a numpy / torch scalar
        return standard_json_value(value.item())
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
