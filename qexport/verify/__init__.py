"""The verification harness: small checks over an export folder and its reference (source) folder.

Each check is a function `check_xxx(ctx) -> CheckResult`; `run_checks(export, reference, thresholds)` runs them
all in order. They read any compressed-tensors integer layout (naive-, int-, pack-quantized; 4 or 8 bits; per
channel, group or tensor) or a dense folder, written by qexport or another tool. Nothing here trusts qexport's
own manifest more than the files: the manifest is one more thing to check when it exists.

Bad input (the EXPORT path is not a model folder, the reference cannot be read) raises InputError (exit 2);
anything wrong inside the export is a failed check (exit 1).
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..thresholds import Thresholds
from .baseline import check_baseline, load_baseline  # noqa: F401  (public API)
from .config_checks import check_config_keys, check_model_type, check_quantization_config
from .engine_checks import check_engine_sentence_transformers, check_engine_vllm
from .context import CheckResult, Context, _fail, detect_format, has_tokenizer, open_tensors, weights_args  # noqa: F401
from .file_checks import check_side_files, check_tokenizer, check_tokenizer_files
from .functional_checks import check_functional, check_reload, check_reload_matches_dequant
from .layout_checks import check_bytes, check_layout, check_manifest, check_shards, check_tensor_names
from .weight_checks import check_weights

CHECKS: list[Callable[[Context], CheckResult]] = [
    check_model_type, check_config_keys, check_quantization_config, check_shards, check_manifest,
    check_tensor_names, check_layout, check_bytes, check_weights, check_tokenizer_files, check_side_files,
    check_tokenizer, check_reload, check_reload_matches_dequant, check_functional, check_engine_sentence_transformers,
]
CHECK_NAMES = [
    "model_type", "config_keys", "quantization_config", "shards", "manifest", "tensor_names", "layout", "bytes",
    "weights_sqnr", "tokenizer_files", "side_files", "tokenizer", "reload", "reload_matches_dequant", "functional",
    "engine_sentence_transformers",
]
# Engines that run only when asked (`--engine NAME[=PYTHON]`): name -> (check, row name).
ENGINE_CHECKS: dict[str, tuple[Callable[[Context], CheckResult], str]] = {"vllm": (check_engine_vllm, "engine_vllm")}


def _run_one(check: Callable[[Context], CheckResult], name: str, ctx: Context) -> CheckResult:
    try:
        return check(ctx)
    except Exception as e:  # a malformed export can break a check's assumptions: that is a failure, not a crash
        where = traceback.extract_tb(e.__traceback__)[-1]
        return _fail(name, f"check raised {type(e).__name__}: {' '.join(str(e).split())[:300]} "
                           f"({Path(where.filename).name}:{where.lineno})")


# ---------------------------------------------------------------------------------------------------------------
# Running and summarising.

SUMMARY_KEYS = ("weight_bytes", "file_ratio", "quantized_ratio", "bits_per_quantized_weight", "sqnr_min_db",
                "sqnr_median_db", "kld_mean", "kld_p99", "kld_max", "top1", "cosine", "max_abs_diff", "reload_ok")


@dataclass
class Verification:
    export: Path
    reference: Path
    format: str
    thresholds: Thresholds
    checks: list[CheckResult]

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
        import dataclasses

        return {"export": str(self.export), "reference": str(self.reference), "format": self.format,
                "passed": self.passed, "metrics": self.metrics, "thresholds": dataclasses.asdict(self.thresholds),
                "checks": [c.as_dict() for c in self.checks]}


def applies(check_name: str, *folders: Path) -> bool:
    """Whether a check has a row for these folders: sentence-transformers only for its own folders."""
    if check_name == "engine_sentence_transformers":
        return any((Path(folder) / "modules.json").is_file() for folder in folders)
    return True


def verify(export_dir: str | Path, reference_dir: str | Path, thresholds: Thresholds | dict | None = None,
           only: list[str] | None = None, engines=()) -> Verification:
    """Run the checks (all, or those named in `only`) and return them with the headline metrics.

    `engines`: EngineSpecs (qexport.engines.runner.parse_engine) whose checks run too, e.g. engine_vllm."""
    ctx = Context(export_dir, reference_dir, thresholds)
    ctx.engines = {spec.name: spec for spec in engines}
    results = []
    for check, name in zip(CHECKS, CHECK_NAMES):
        if (only is None or name in only) and applies(name, ctx.export, ctx.reference.folder):
            results.append(_run_one(check, name, ctx))
    for engine in ctx.engines:
        check, name = ENGINE_CHECKS[engine]
        if only is None or name in only:
            results.append(_run_one(check, name, ctx))
    return Verification(ctx.export, ctx.reference.folder, ctx.format, ctx.thresholds, results)


def record_in_card(result: Verification) -> None:
    """Write the checks into the export's README.md model card and qexport.json (folders qexport wrote)."""
    from ..card import update_card_verification, verification_result
    from ..errors import InputError

    if not (result.export / "qexport.json").is_file():
        raise InputError(f"--write-card: {result.export} has no qexport.json (only qexport exports carry a card)")
    checks = [{"name": c.name, "value": c.detail, "passed": None if c.skipped else c.passed} for c in result.checks]
    update_card_verification(result.export, verification_result("qexport verify", checks,
                                                                reference=str(result.reference)))


def run_checks(export_dir: str | Path, reference_dir: str | Path,
               thresholds: Thresholds | dict | None = None) -> list[CheckResult]:
    return verify(export_dir, reference_dir, thresholds).checks

