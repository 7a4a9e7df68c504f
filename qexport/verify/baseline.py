"""Release regression checks: metrics against a stored baseline, within stated tolerances.

A baseline whose compared metrics are not finite numbers (NaN, +-inf, their strings "NaN" / "Infinity" as
qexport's standard JSON writes them, a bool, any other non-number) is malformed: InputError (exit 2) naming the
key. A current metric that is not a finite number where the baseline holds one is a regression, never "within
tolerance" (every comparison with NaN is false).
"""

from __future__ import annotations

import math
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
    for key in REGRESSIONS:
        value = metrics.get(key)
        if value is not None and not is_finite_number(value):
            raise InputError(f"--baseline {path}: metric {key!r} is {str(value)[:40]!r}, not a finite number")
    return metrics


def is_finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_baseline(metrics: dict, baseline: dict) -> CheckResult:
    """Each metric with a regression rule may move in the bad direction by at most its stated tolerance."""
    name = "baseline"
    if baseline.get("format") not in (None, metrics.get("format")):
        raise InputError(f"--baseline: it is for format {baseline.get('format')!r}, this export is "
                         f"{metrics.get('format')!r}")
    regressions, compared = [], {}
    for key, rule in REGRESSIONS.items():
        old, new = baseline.get(key), metrics.get(key)
        if old is None or new is None:
            continue
        if not is_finite_number(old):
            raise InputError(f"--baseline: metric {key!r} is {str(old)[:40]!r}, not a finite number")
        compared[key] = {"baseline": old, "now": new, "allowed": rule.allowed(old)}
        if not is_finite_number(new):
            regressions.append(f"{key} {format_value(old)} -> {str(new)[:40]} (not a finite number)")
            continue
        worse = (old - new) if rule.higher_is_better else (new - old)
        if worse > rule.allowed(old):
            regressions.append(f"{key} {format_value(old)} -> {format_value(new)} (allowed "
                               f"{'-' if rule.higher_is_better else '+'}{format_value(rule.allowed(old))})")
    if not compared:
        return fail(name, "no metric in common with the baseline")
    if regressions:
        return fail(name, "regressed: " + "; ".join(regressions), compared=compared)
    return ok(name, f"{len(compared)} metrics within tolerance of the baseline", compared=compared)
