"""The verification harness: small checks over an export folder and its reference (source) folder.

Each check is a function `check_xxx(ctx) -> CheckResult`; `run_checks(export, reference, thresholds)` runs them
all in order. They read any compressed-tensors integer layout (naive-, int-, pack-quantized; 4 or 8 bits; per
channel, group or tensor) or a dense folder, written by qexport or another tool. Nothing here trusts qexport's
own manifest more than the files: the manifest is one more thing to check when it exists.

Bad input (the EXPORT path is not a model folder, the reference cannot be read) raises InputError (exit 2);
anything wrong inside the export is a failed check (exit 1).
"""

from __future__ import annotations

import dataclasses
import math
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from qexport.verify.thresholds import Thresholds
from qexport.verify.baseline import check_baseline, load_baseline  # noqa: F401  (public API)
from qexport.verify.config_checks import check_config_keys, check_model_type, check_quantization_config
from qexport.verify.context import CheckResult, Context, fail, listing, detect_format, has_tokenizer, open_tensors  # noqa: F401
from qexport.verify.engine_checks import check_engine_sentence_transformers, check_engine_vllm
from qexport.verify.file_checks import (LIBRARY_CHECKS, check_safe_to_load, check_side_files, check_tokenizer,
                                        check_tokenizer_files, unsafe_summary)
from qexport.verify.functional_checks import (check_finite_outputs, check_functional, check_functional_vs_rtn, check_reload,
                                check_reload_matches_dequant)
from qexport.verify.layout_checks import check_bytes, check_layout, check_manifest, check_shards, check_tensor_names
from qexport.verify.weight_checks import check_weights

CHECKS: list[Callable[[Context], CheckResult]] = [
    check_safe_to_load, check_model_type, check_config_keys, check_quantization_config, check_shards, check_manifest,
    check_tensor_names, check_layout, check_bytes, check_weights, check_tokenizer_files, check_side_files,
    check_tokenizer, check_reload, check_reload_matches_dequant, check_finite_outputs, check_functional,
    check_functional_vs_rtn, check_engine_sentence_transformers,
]
CHECK_NAMES = [
    "safe_to_load", "model_type", "config_keys", "quantization_config", "shards", "manifest", "tensor_names", "layout", "bytes",
    "weights_sqnr", "tokenizer_files", "side_files", "tokenizer", "reload", "reload_matches_dequant",
    "finite_outputs", "functional", "functional_vs_rtn", "engine_sentence_transformers",
]
# Engines that run only when asked (`--engine NAME[=PYTHON]`): name -> (check, row name).
ENGINE_CHECKS: dict[str, tuple[Callable[[Context], CheckResult], str]] = {"vllm": (check_engine_vllm, "engine_vllm")}

# The thresholds each check compares against; reports show them beside the check's result. Encoders use
# the cosine bounds, causal LMs the KLD and top-1 bounds (see `_thresholds_of`).
CHECK_THRESHOLDS: dict[str, tuple[str, ...]] = {
    "bytes": ("min_quantized_ratio",),
    "weights_sqnr": ("min_sqnr_db", "dense_min_sqnr_db"),
    "reload_matches_dequant": ("reload_max_abs_diff",),
    "functional": ("max_kld_mean", "max_kld_p99", "min_top1", "min_cosine"),
    "functional_vs_rtn": ("max_kld_vs_rtn", "kld_vs_rtn_slack", "max_top1_drop_vs_rtn", "max_cosine_gap_vs_rtn",
                          "cosine_vs_rtn_slack"),
}
# Which bound a metric is judged by: an infinite value on the wrong side of an enabled bound cannot pass, whatever
# the check's own comparison says. (SQNR +inf, an exact tensor, is on the right side of its lower bound.)
METRIC_BOUNDS = {
    "kld_mean": "max_kld_mean", "kld_p99": "max_kld_p99", "top1": "min_top1", "cosine": "min_cosine",
    "sqnr_min_db": "min_sqnr_db", "dense_sqnr_min_db": "dense_min_sqnr_db", "quantized_ratio": "min_quantized_ratio",
    "reload_vs_dequant_max_abs": "reload_max_abs_diff",
}


def run_check(check: Callable[[Context], CheckResult], name: str, ctx: Context) -> CheckResult:
    """One check, its arithmetic on one torch thread (forward passes in parallel windows, `Context.threads`): its
    numbers are the same whatever the thread count, from the CLI, the API or the gate. A check that would hand an
    unsafe folder to a library is not run (check_safe_to_load says why)."""
    from qexport.verify.threads import one_thread

    try:
        unsafe = unsafe_summary(ctx) if name in LIBRARY_CHECKS else None
        with one_thread():
            result = check(ctx) if unsafe is None else fail(name, f"not run: {unsafe}")
    except Exception as e:  # a malformed export can break a check's assumptions: that is a failure, not a crash
        where = traceback.extract_tb(e.__traceback__)[-1]
        result = fail(name, f"check raised {type(e).__name__}: {' '.join(str(e).split())[:300]} "
                             f"({Path(where.filename).name}:{where.lineno})")
    result.thresholds = threshold_entries(ctx.thresholds, ctx.defaults, _thresholds_of(name, ctx))
    return _no_silent_pass(result, ctx.thresholds)


def _thresholds_of(name: str, ctx: Context) -> tuple[str, ...]:
    names = CHECK_THRESHOLDS.get(name, ())
    if name == "functional":
        names = tuple(n for n in names if (n != "min_cosine") == ctx.is_causal)
    elif name == "functional_vs_rtn":
        names = tuple(n for n in names if ("cosine" not in n) == ctx.is_causal)
    return names


def _nan_paths(value, path: str):
    """Dotted paths of the NaNs inside a metric value (numbers, dicts, lists)."""
    if isinstance(value, float) and math.isnan(value):
        yield path
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _nan_paths(v, f"{path}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _nan_paths(v, f"{path}[{i}]")


def _no_silent_pass(result: CheckResult, thresholds: Thresholds) -> CheckResult:
    """A check whose metrics hold a NaN cannot pass (every comparison with NaN is false, so a NaN would slip
    through any bound), nor one with an infinite metric beyond an enabled bound. +inf SQNR (exact) is fine.
    A check that failed anyway gets the NaNs named too (its own comparisons cannot see them)."""
    if result.skipped:
        return result
    problems = [f"{p} is NaN" for key, value in result.metrics.items() for p in _nan_paths(value, key)]
    for key, field in METRIC_BOUNDS.items():
        value, limit = result.metrics.get(key), getattr(thresholds, field, None)
        if isinstance(value, float) and math.isinf(value) and limit is not None:
            if (value < 0) if _bound_kind(field) == "min" else (value > 0):
                problems.append(f"{key} is {value} (bound {field} {limit:g})")
    if problems:
        result.passed = False
        result.detail = f"non-finite metric: {listing(problems)}; {result.detail}"
    return result


def _bound_kind(field: str) -> str | None:
    """'min' for a lower bound (a higher value is stricter), 'max' for an upper bound, None if unknown."""
    parts = field.split("_")
    return "min" if "min" in parts else "max" if "max" in parts else None


def threshold_entries(thresholds: Thresholds, defaults: Thresholds, names=None) -> list[dict]:
    """Each threshold (all, or `names`) with its value, the format's default and how it compares:
    default, tightened, loosened, disabled, enabled (no default bound) or changed (direction unknown)."""
    names = [f.name for f in dataclasses.fields(thresholds)] if names is None else names
    entries = []
    for field in names:
        value, default = getattr(thresholds, field, None), getattr(defaults, field, None)
        if value == default:
            status = "default"
        elif value is None:
            status = "disabled"
        elif default is None:
            status = "enabled"
        elif _bound_kind(field) is None:
            status = "changed"
        else:
            stricter = value > default if _bound_kind(field) == "min" else value < default
            status = "tightened" if stricter else "loosened"
        entries.append({"name": field, "value": value, "default": default, "status": status,
                        "text": threshold_text(field, value, default, status)})
    return entries


def threshold_text(field: str, value, default, status: str) -> str:
    """How a threshold reads in every report: `min_top1 0.9`, `min_top1: disabled (default 0.9)`,
    `max_kld_mean 0.05: loosened (default 0.01)`."""
    shown = "none" if value is None else f"{value:g}"
    if status == "default":
        return f"{field} {shown}" if value is not None else f"{field}: none (default)"
    if status == "disabled":
        return f"{field}: disabled (default {default:g})"
    return f"{field} {shown}: {status} (default {'none' if default is None else f'{default:g}'})"


# ---------------------------------------------------------------------------------------------------------------
# Running and summarising.

SUMMARY_KEYS = ("weight_bytes", "file_ratio", "quantized_ratio", "bits_per_quantized_weight",
                "quantized_linear_share", "sqnr_min_db", "sqnr_median_db", "kld_mean", "kld_p99", "kld_max", "top1",
                "cosine", "max_abs_diff", "reload_ok", "ppl_reference", "ppl_export", "rtn_kld_mean", "rtn_top1",
                "rtn_ppl", "kld_ratio_vs_rtn")


@dataclass
class Verification:
    export: Path
    reference: Path
    format: str
    thresholds: Thresholds
    checks: list[CheckResult]
    defaults: Thresholds | None = None  # the format's default thresholds (None: the thresholds are the defaults)

    @property
    def threshold_entries(self) -> list[dict]:
        return threshold_entries(self.thresholds, self.defaults or self.thresholds)

    @property
    def thresholds_changed(self) -> list[str]:
        """`min_top1: disabled (default 0.9)` for each threshold that is not the format's default."""
        return [e["text"] for e in self.threshold_entries if e["status"] != "default"]

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def failures(self) -> list[CheckResult]:
        return [c for c in self.checks if not c.passed]

    @property
    def metrics(self) -> dict:
        """The headline numbers (report table, baselines), flattened from the checks."""
        out = {"format": self.format}
        for check in self.checks:
            for key in SUMMARY_KEYS:
                if key in check.metrics and key not in out:
                    out[key] = check.metrics[key]
        return out

    def add(self, check: CheckResult) -> None:
        self.checks.append(check)

    def as_dict(self) -> dict:
        return {"export": str(self.export), "reference": str(self.reference), "format": self.format,
                "passed": self.passed, "metrics": self.metrics, "thresholds": dataclasses.asdict(self.thresholds),
                "threshold_defaults": dataclasses.asdict(self.defaults or self.thresholds),
                "threshold_entries": self.threshold_entries, "thresholds_changed": self.thresholds_changed,
                "checks": [c.as_dict() for c in self.checks]}


def applies(check_name: str, *folders: Path) -> bool:
    """Whether a check has a row for these folders: sentence-transformers only for its own folders."""
    if check_name == "engine_sentence_transformers":
        return any((Path(folder) / "modules.json").is_file() for folder in folders)
    return True


# progress(name, index, total, elapsed, result): called when a check starts (result None) and when it ends (its
# CheckResult); index counts from 1 over the checks that run, elapsed is seconds since verify() started. A progress
# object with a `step(name, done, total, unit, elapsed)` method also hears a long check's steps ("120/254 tensors").
Progress = Callable[[str, int, int, float, "CheckResult | None"], None]


def verify(export_dir: str | Path, reference_dir: str | Path, thresholds: Thresholds | dict | None = None,
           only: list[str] | None = None, engines=(), progress: Progress | None = None,
           threads: int | None = None) -> Verification:
    """Run the checks (all, or those named in `only`) and return them with the headline metrics.

    `engines`: EngineSpecs (qexport.verify.engines.runner.parse_engine) whose checks run too, e.g. engine_vllm.
    `threads`: windows of the fixed text run through a model at once (default: the cores free now,
    qexport.verify.threads.verify_threads); the metrics are the same for any value."""
    import time

    start = time.perf_counter()
    ctx = Context(export_dir, reference_dir, thresholds, threads=threads)
    ctx.engines = {spec.name: spec for spec in engines}
    chosen = [(check, name) for check, name in zip(CHECKS, CHECK_NAMES)
              if (only is None or name in only) and applies(name, ctx.export, ctx.reference.folder)]
    chosen += [ENGINE_CHECKS[engine] for engine in ctx.engines if only is None or ENGINE_CHECKS[engine][1] in only]
    results = []
    step = getattr(progress, "step", None)
    for index, (check, name) in enumerate(chosen, 1):
        if progress is not None:
            progress(name, index, len(chosen), time.perf_counter() - start, None)
        if step is not None:
            ctx.on_step = lambda done, total, unit, name=name: step(name, done, total, unit,
                                                                    time.perf_counter() - start)
        began = time.perf_counter()
        results.append(run_check(check, name, ctx))
        results[-1].seconds = round(time.perf_counter() - began, 3)
        ctx.on_step = None
        if progress is not None:
            progress(name, index, len(chosen), time.perf_counter() - start, results[-1])
    return Verification(ctx.export, ctx.reference.folder, ctx.format, ctx.thresholds, results, ctx.defaults)


def record_in_card(result: Verification, tool: str = "qexport verify") -> None:
    """Write the checks into the export's README.md model card and qexport.json (folders qexport wrote)."""
    from qexport.report.card import update_card_verification, verification_result
    from qexport.errors import InputError

    if not (result.export / "qexport.json").is_file():
        raise InputError(f"--write-card: {result.export} has no qexport.json (only qexport exports carry a card)")
    checks = [{"name": c.name, "value": c.detail, "threshold": "; ".join(e["text"] for e in c.thresholds) or None,
               "passed": None if c.skipped else c.passed} for c in result.checks]
    update_card_verification(result.export, verification_result(tool, checks,
                                                                reference=str(result.reference),
                                                                thresholds_changed=result.thresholds_changed))


def run_checks(export_dir: str | Path, reference_dir: str | Path,
               thresholds: Thresholds | dict | None = None) -> list[CheckResult]:
    return verify(export_dir, reference_dir, thresholds).checks

