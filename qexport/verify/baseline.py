"""Release regression checks: metrics against a stored baseline, within stated tolerances."""

from __future__ import annotations

from pathlib import Path

from qexport.errors import InputError
from qexport.report.values import format_value
from qexport.verify.thresholds import REGRESSIONS
from qexport.verify.context import CheckResult, fail, ok, read_json_object


def load_baseline(path: str | Path) -> dict:
    data, error = read_json_object(Path(path))
    if data is None:
        raise InputError(f"--baseline {path}: {error}")
    metrics = data.get("metrics", data)
    if not isinstance(metrics, dict):
        raise InputError(f"--baseline {path}: 'metrics' is not an object")
    return metrics


def check_baseline(metrics: dict, baseline: dict) -> CheckResult:
    """Each metric with a regression rule may move in the bad direction by at most its stated tolerance."""
    name = "baseline"
    if baseline.get("format") not in (None, metrics.get("format")):
        raise InputError(f"--baseline: it is for format {baseline.get('format')!r}, this export is "
                         f"{metrics.get('format')!r}")
    regressions, compared = [], {}
    for key, rule in REGRESSIONS.items():
        old, new = baseline.get(key), metrics.get(key)
        if not isinstance(old, (int, float)) or not isinstance(new, (int, float)):
            continue
        worse = (old - new) if rule.higher_is_better else (new - old)
        compared[key] = {"baseline": old, "now": new, "allowed": rule.allowed(old)}
        if worse > rule.allowed(old):
            regressions.append(f"{key} {format_value(old)} -> {format_value(new)} (allowed "
                               f"{'-' if rule.higher_is_better else '+'}{format_value(rule.allowed(old))})")
    if not compared:
        return fail(name, "no metric in common with the baseline")
    if regressions:
        return fail(name, "regressed: " + "; ".join(regressions), compared=compared)
    return ok(name, f"{len(compared)} metrics within tolerance of the baseline", compared=compared)
