"""pytest plugin (entry point `pytest11: qexport`): a one-line CI gate, and the report hooks of qexport's own suite.

    pytest --qexport-model PATH [--qexport-formats int8 int4] [--qexport-keep DIR] [--qexport-threshold NAME=VALUE]
           [--qexport-engine vllm[=PYTHON]]
    pytest --qexport-export OUT/int4 [OUT2/int8 ...] --qexport-reference SRC
    ... --qexport-only          (the gate alone: the folder's own tests are not collected)

exports the model at PATH in each format (to a temporary folder, or DIR/<format> with --qexport-keep), or takes
existing export folders, and runs every `qexport verify` check on each, one test item per (target, check), named
`qexport[int4]::functional` etc. Thresholds come from the format defaults (qexport.verify.thresholds), then the
`qexport_thresholds` ini lines, then `--qexport-threshold` options. `--qexport-engine vllm` adds the item
`qexport[FMT]::engine_vllm` (vLLM in its own interpreter; see qexport.verify.engines.runner); an engine that cannot run
fails its item. Without a gate option the plugin adds no tests.

Under pytest-xdist each export is made once per session (a file lock in the controller's folder, which every worker
shares) and all items of one target run on one worker (xdist's loadgroup), which exports, loads and computes the
reference outputs for it once; different targets run on different workers.

Reports (always on): tests record numbers through the `qexport_report` fixture; they appear as per-test extras in
pytest-html and as rows of a pandas summary table (per model x format) above the results table. Rows travel in
`user_properties`, so the controller of `pytest -n N` sees every worker's rows. With `--html=R.html` (or
`--qexport-json=R.json`) the same numbers are written as JSON next to the HTML.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROW = "qexport_row"
METRICS = "qexport_metrics"
HTML = "qexport_html"


def pytest_addoption(parser):
    group = parser.getgroup("qexport", "qexport export verification")
    group.addoption("--qexport-model", metavar="PATH", default=None,
                    help="export this model folder and run the qexport verification checks on it")
    group.addoption("--qexport-formats", nargs="+", metavar="FMT", default=None,
                    help="formats to export and check (default: ini qexport_formats, else int8 int4)")
    group.addoption("--qexport-export", nargs="+", metavar="DIR", default=None,
                    help="check these existing export folders (OUT/int4, or OUT for each format folder in it) "
                         "instead of exporting; needs --qexport-reference")
    group.addoption("--qexport-reference", metavar="SRC", default=None,
                    help="the source model the --qexport-export folders were made from")
    group.addoption("--qexport-keep", metavar="DIR", default=None,
                    help="export into DIR/<format> and keep it (default: a temporary folder, deleted at the end)")
    group.addoption("--qexport-only", action="store_true", default=False,
                    help="run only the gate's items: the folder's own tests are neither collected nor run")
    group.addoption("--qexport-threshold", action="append", default=[], metavar="NAME=VALUE",
                    help="override a threshold, e.g. max_kld_mean=0.05 (repeatable; see qexport.verify.thresholds)")
    group.addoption("--qexport-engine", action="append", default=[], metavar="vllm[=PYTHON]",
                    help="also run each export in this engine (item engine_vllm; repeatable)")
    group.addoption("--qexport-json", metavar="PATH", default=None,
                    help="write the summary rows and per-test metrics as JSON (default: next to --html)")
    parser.addini("qexport_formats", type="args", default=["int8", "int4"],
                  help="formats --qexport-model exports and checks")
    parser.addini("qexport_thresholds", type="linelist", default=[],
                  help="threshold overrides, one NAME=VALUE per line")


# ---------------------------------------------------------------------------------------------------------------
# Recording numbers from tests


class Recorder:
    """What a test hands to the report: numbers behind its assertions, summary-table rows, inline HTML (SVG)."""

    def __init__(self, item):
        self._item = item

    def metrics(self, **numbers) -> None:
        self._item.user_properties.append((METRICS, _plain(numbers)))

    def row(self, model: str, format: str, **numbers) -> None:
        self._item.user_properties.append((ROW, _plain({"model": model, "format": format, **numbers})))

    def html(self, fragment: str) -> None:
        self._item.user_properties.append((HTML, fragment))


def _plain(value):
    """JSON-able copy (xdist ships user_properties between processes)."""
    return json.loads(json.dumps(value, default=str))


@pytest.fixture
def qexport_report(request) -> Recorder:
    """Record numbers for the HTML/JSON report: `.metrics(sqnr_db=...)`, `.row(model, format, top1=...)`."""
    return Recorder(request.node)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when != "call":
        return
    metrics = [v for k, v in item.user_properties if k == METRICS]
    fragments = [v for k, v in item.user_properties if k == HTML]
    if not metrics and not fragments:
        return
    from qexport.report.html import STYLE, metrics_table, standard_json_value

    merged = {k: v for m in metrics for k, v in m.items()}
    extras = list(getattr(report, "extras", []))
    extras.append({"name": "qexport metrics", "format_type": "html", "content":
                   f"<style>{STYLE}</style>{metrics_table(merged)}{''.join(fragments)}",
                   "mime_type": None, "extension": None})
    extras.append({"name": "metrics.json", "format_type": "json", "content":
                   json.dumps(standard_json_value(merged), default=str, allow_nan=False),
                   "mime_type": "application/json", "extension": "json"})
    report.extras = extras


class _Collected:
    """Rows and per-test metrics seen by this process (the controller under xdist); one per config."""

    def __init__(self):
        self.rows: list[dict] = []
        self.tests: dict[str, dict] = {}

    def pytest_runtest_logreport(self, report):
        if report.when != "call":
            return
        for key, value in getattr(report, "user_properties", []):
            if key == ROW:
                self.rows.append(value)
            elif key == METRICS:
                self.tests.setdefault(report.nodeid, {}).update(value)


_COLLECTED = pytest.StashKey[_Collected]()


def pytest_configure(config):
    collected = config.stash[_COLLECTED] = _Collected()
    config.pluginmanager.register(collected, f"qexport-collected-{id(config)}")
    if config.getoption("qexport_model", None) is not None or config.getoption("qexport_export", None):
        from qexport.errors import InputError

        try:
            config.stash[_GATE] = Gate(config)
        except InputError as e:
            raise pytest.UsageError(str(e))
    elif config.getoption("qexport_only", False):
        raise pytest.UsageError("--qexport-only runs the gate alone: give --qexport-model or --qexport-export")
    elif config.getoption("qexport_reference", None) or config.getoption("qexport_keep", None):
        raise pytest.UsageError("--qexport-reference / --qexport-keep belong to a gate: give --qexport-export or "
                                "--qexport-model")


@pytest.hookimpl(optionalhook=True)
def pytest_html_results_summary(prefix, summary, postfix, session):
    from qexport.report.html import merge_rows, summary_html, svg_histogram

    collected = session.config.stash.get(_COLLECTED, None)
    if not collected or not collected.rows:
        return
    rows = merge_rows(collected.rows)
    plots = "".join(svg_histogram(r["sqnr_values"], f"{r['model']} {r['format']}: per-tensor SQNR (dB)",
                                  threshold=r.get("sqnr_threshold"))
                    for r in rows if r.get("sqnr_values"))
    hidden = ("sqnr_values", "sqnr_threshold")
    prefix.append(summary_html([{k: v for k, v in r.items() if k not in hidden} for r in rows],
                               "qexport summary (model x format)") + plots)


def pytest_sessionfinish(session):
    config = session.config
    if hasattr(config, "workerinput"):
        return  # an xdist worker: the controller writes the report
    collected = config.stash.get(_COLLECTED, None)
    path = config.getoption("qexport_json", None)
    html_path = getattr(config.option, "htmlpath", None)
    if path is None and html_path:
        path = str(Path(html_path).with_suffix(".json"))
    if path is None or collected is None or not (collected.rows or collected.tests):
        return
    from qexport.report.html import merge_rows, to_json, write_text

    write_text(path, to_json({"rows": merge_rows(collected.rows), "tests": collected.tests}))


# ---------------------------------------------------------------------------------------------------------------
# The CI gate: --qexport-model (export, then check) or --qexport-export (check existing folders)


_GATE = pytest.StashKey["Gate"]()
_GATE_DIR = "qexport_gate_dir"  # workerinput key: the controller's folder every xdist worker shares
_GROUPED = "qexport_grouped"  # workerinput key: the controller schedules the gate's items by target


@dataclass
class Target:
    """One export the gate checks: `label` names its items (`qexport[label]::check`) and its summary row."""

    label: str
    fmt: str | None = None  # --qexport-model: the format the gate exports
    folder: Path | None = None  # --qexport-export: the existing folder


class Gate:
    """The gate's targets, and per process: each target's export (made once per session, shared by every xdist
    worker through a file lock) and one verification context, so each item runs only its own check."""

    def __init__(self, config):
        from qexport.formats import format_name
        from qexport.verify.thresholds import parse_overrides

        model, exports = config.getoption("qexport_model"), config.getoption("qexport_export")
        reference, keep = config.getoption("qexport_reference"), config.getoption("qexport_keep")
        if model is not None and exports:
            raise pytest.UsageError("--qexport-export checks existing folders: give their source with "
                                    "--qexport-reference, not --qexport-model")
        if exports and reference is None:
            raise pytest.UsageError("--qexport-export needs --qexport-reference SRC (the model it was made from)")
        if exports and keep is not None:
            raise pytest.UsageError("--qexport-keep keeps what --qexport-model exports; --qexport-export exports "
                                    "nothing")
        from qexport.errors import InputError
        from qexport.io.model_path import resolve_model

        try:  # a folder, a Hugging Face cache root or a hub id in the local cache, as on the command line
            self.reference = resolve_model(model if model is not None else reference)
        except InputError as e:
            option = "--qexport-model" if model is not None else "--qexport-reference"
            raise pytest.UsageError(f"{option} {e}")
        self.overrides = {**parse_overrides(config.getini("qexport_thresholds"), "qexport_thresholds"),
                          **parse_overrides(config.getoption("qexport_threshold"), "--qexport-threshold")}
        if exports:
            self.targets = _export_targets([Path(e) for e in exports])
        else:
            # Any case, as on the command line; an unknown name is an InputError naming the option it came from.
            option = "--qexport-formats" if config.getoption("qexport_formats") else "ini qexport_formats"
            formats = [format_name(f, option)
                       for f in config.getoption("qexport_formats") or config.getini("qexport_formats")]
            self.targets = {fmt: Target(fmt, fmt=fmt) for fmt in dict.fromkeys(formats)}
        from qexport.verify.engines.runner import parse_engine

        self.engines = [parse_engine(value) for value in config.getoption("qexport_engine")]
        self.keep = Path(keep) if keep is not None else None
        workerinput = getattr(config, "workerinput", {})
        self.worker = workerinput.get("workerid", "main")
        self.grouped = bool(workerinput.get(_GROUPED))
        shared = workerinput.get(_GATE_DIR)
        # The controller (or a serial run) owns the shared folder; a worker on another machine (--tx ssh) cannot
        # see it and uses its own.
        self.owns_dir = shared is None or not Path(shared).is_dir()
        self.dir = Path(tempfile.mkdtemp(prefix="qexport-gate-")) if self.owns_dir else Path(shared)
        self._exports: dict[str, dict] = {}
        self._contexts: dict[str, object] = {}
        self._results: dict[tuple[str, str], object] = {}
        # Workers busy at once: one per target at most (a target's items stay on one worker when grouped).
        busy = min(int(workerinput.get("workercount", 1)), len(self.targets)) if self.grouped else 1
        from qexport.verify.threads import verify_threads

        # One function for this and `qexport verify`'s default; the checks' numbers do not depend on it.
        self.verify_threads = verify_threads(busy).threads
        self.threads = self.verify_threads if busy > 1 else None

    def share_cores(self) -> None:
        """Under xdist, give this worker's torch its share of the cores: each process defaults to one thread per
        core, so N workers computing at once would run N x cores threads that spin-wait for each other."""
        if self.threads is not None:
            import torch

            torch.set_num_threads(self.threads)
            self.threads = None

    def export(self, label: str) -> dict:
        """{"folder": ..., "by": worker, "seconds": ...} for the target's export, or {"error": ...}. The first
        process to get here exports (under a file lock in the shared folder); the others read its record."""
        self.share_cores()
        if label not in self._exports:
            target = self.targets[label]
            if target.folder is not None:
                self._exports[label] = {"folder": str(target.folder)}
                return self._exports[label]
            from filelock import FileLock

            record = self.dir / f"export-{label}.json"
            with FileLock(str(self.dir / f"export-{label}.lock")):
                if not record.exists():
                    record.write_text(json.dumps(self._export_now(target)))
                self._exports[label] = json.loads(record.read_text())
        return self._exports[label]

    def _export_now(self, target: Target) -> dict:
        from qexport.export.pipeline import ExportOptions, export_folder

        root = self.keep if self.keep is not None else self.dir / "exports"
        start = time.perf_counter()
        try:
            # --qexport-keep DIR: DIR/<fmt> is this gate's to write; an earlier gate's export there is replaced.
            export_folder(self.reference, root, ExportOptions(formats=(target.fmt,), progress=False,
                                                              overwrite=self.keep is not None))
        except Exception as e:  # every item of this format reports it
            return {"error": f"export failed: {type(e).__name__}: {e}"}
        return {"folder": str(root / target.fmt), "by": self.worker,
                "seconds": round(time.perf_counter() - start, 3)}

    def context(self, label: str):
        """The verification Context of the target's export (or the exception that prevented it), per process."""
        if label not in self._contexts:
            from qexport.verify import Context

            made = self.export(label)
            try:
                if "error" in made:
                    raise CheckFailed(made["error"])
                ctx = Context(made["folder"], self.reference, self.overrides, threads=self.verify_threads)
                ctx.engines = {spec.name: spec for spec in self.engines}
                self._contexts[label] = ctx
            except Exception as e:  # InputError (not a model folder, ...) and anything else
                self._contexts[label] = e
        return self._contexts[label]

    def check(self, label: str, check: str):
        """The CheckResult of one check on the target (each item runs its own; they share the context)."""
        if (label, check) not in self._results:
            from qexport.verify import CHECK_NAMES, CHECKS, ENGINE_CHECKS, run_check

            ctx = self.context(label)
            functions = {**dict(zip(CHECK_NAMES, CHECKS)), **{name: f for f, name in ENGINE_CHECKS.values()}}
            self._results[label, check] = ctx if isinstance(ctx, Exception) else \
                run_check(functions[check], check, ctx)
        return self._results[label, check]

    def cleanup(self) -> None:
        self._contexts.clear()
        if self.owns_dir:
            shutil.rmtree(self.dir, ignore_errors=True)


def _export_targets(folders: list[Path]) -> dict[str, Target]:
    """One target per model folder; a folder holding format folders (qexport's OUT) stands for each of them."""
    found = []
    for folder in folders:
        if not folder.is_dir():
            raise pytest.UsageError(f"--qexport-export {folder}: not a folder")
        if (folder / "config.json").exists() or any(folder.glob("*.safetensors")):
            found.append(folder)
            continue
        inner = sorted(p for p in folder.iterdir() if p.is_dir() and (p / "config.json").is_file())
        if not inner:
            raise pytest.UsageError(f"--qexport-export {folder}: not a model folder (no config.json, no "
                                    f"*.safetensors, no model folders inside)")
        found.extend(inner)
    names = [f.name for f in found]
    targets = {}
    for folder in found:
        # Items and rows are named by the folder (OUT/int4 -> int4); two folders of the same name by their parents.
        label = folder.name if names.count(folder.name) == 1 else f"{folder.parent.name}-{folder.name}"
        if label in targets:
            raise pytest.UsageError(f"--qexport-export {folder}: given twice")
        targets[label] = Target(label, folder=folder)
    return targets


class CheckFailed(Exception):
    pass


class QexportCheckItem(pytest.Item):
    def __init__(self, *, fmt: str, check: str, **kwargs):
        super().__init__(**kwargs)
        self.fmt, self.check = fmt, check  # fmt: the target's label (its format, for --qexport-model)

    def runtest(self):
        from qexport.verify import threshold_entries

        gate = self.config.stash[_GATE]
        made = gate.export(self.fmt)
        if "by" in made:  # the gate exported it: which process, how long (once per session, whatever -n says)
            Recorder(self).metrics(export=made["folder"], exported_by=made["by"], export_seconds=made["seconds"])
        check = gate.check(self.fmt, self.check)
        if isinstance(check, CheckFailed):  # the export failed
            raise check
        if isinstance(check, Exception):
            raise CheckFailed(f"verification of {self.fmt} failed: {type(check).__name__}: {check}")
        ctx = gate.context(self.fmt)
        scalars = {k: v for k, v in check.metrics.items() if not isinstance(v, (dict, list))}
        if check.thresholds:  # the bounds this check used, loosened or disabled ones marked as such
            scalars["thresholds"] = "; ".join(e["text"] for e in check.thresholds)
        Recorder(self).metrics(**scalars)
        # This check's part of the summary row; the report merges the parts of every item (and every worker).
        from qexport.verify import SUMMARY_KEYS

        changed = [e["text"] for e in threshold_entries(ctx.thresholds, ctx.defaults) if e["status"] != "default"]
        sqnr = check.metrics.get("per_tensor_sqnr_db") if check.name == "weights_sqnr" else None
        from qexport.io.identity import model_name

        Recorder(self).row(model_name(gate.reference), self.fmt, path=str(gate.reference), passed=check.passed,
                           sqnr_values=list(sqnr.values()) if sqnr else None,
                           sqnr_threshold=ctx.thresholds.min_sqnr_db,
                           thresholds="; ".join(changed) or "defaults",
                           **{k: check.metrics[k] for k in SUMMARY_KEYS if k in check.metrics})
        if check.skipped:
            pytest.skip(check.detail)
        if not check.passed:
            raise CheckFailed(f"{self.check}: {check.detail}")

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, CheckFailed):
            return f"qexport {self.fmt} {excinfo.value}"
        return super().repr_failure(excinfo, style)

    def reportinfo(self):
        return self.path, None, f"qexport[{self.fmt}]::{self.check}"


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(session, config, items):
    gate = config.stash.get(_GATE, None)
    if gate is None:
        return
    from qexport.verify import CHECK_NAMES, ENGINE_CHECKS, applies

    if config.getoption("qexport_only"):
        # Gate only: whatever the folder's own tests are, none runs (pytest_ignore_collect skipped collecting most).
        if items:
            config.hook.pytest_deselected(items=list(items))
            items.clear()
    engine_names = [ENGINE_CHECKS[e.name][1] for e in gate.engines]
    added = []
    for label, target in gate.targets.items():
        folders = [gate.reference] + ([target.folder] if target.folder is not None else [])
        for check in [c for c in CHECK_NAMES if applies(c, *folders)] + engine_names:
            name = f"qexport[{label}]::{check}"
            # Under xdist every item of one target goes to the same worker (xdist's loadgroup `@group` suffix):
            # that worker alone exports, loads and computes reference outputs for it; targets run in parallel.
            nodeid = f"{name}@qexport-{label}" if gate.grouped else name
            added.append(QexportCheckItem.from_parent(session, name=name, nodeid=nodeid, fmt=label, check=check))
    items.extend(added)
    # Report them as collected, so that "collected N items" and -k / --deselect counts include them.
    config.hook.pytest_collectreport(report=pytest.CollectReport("qexport", "passed", None, added))


def pytest_ignore_collect(collection_path, config):
    if config.getoption("qexport_only", False) and config.stash.get(_GATE, None) is not None:
        return True  # --qexport-only: the folder's own tests are not even imported
    return None


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    """xdist controller, per worker: the shared gate folder, and whether the gate's items are grouped."""
    gate = node.config.stash.get(_GATE, None)
    if gate is not None:
        node.workerinput[_GATE_DIR] = str(gate.dir)
        node.workerinput[_GROUPED] = node.config.getvalue("dist") in ("load", "loadgroup")


@pytest.hookimpl(optionalhook=True, tryfirst=True)
def pytest_xdist_make_scheduler(config, log):
    """`-n N` (xdist's default `--dist load`) with the gate: xdist's loadgroup, which is load for every other test
    and sends each gate target's items to one worker (the `@qexport-<target>` nodeid suffix)."""
    if config.stash.get(_GATE, None) is None or config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadGroupScheduling

    return LoadGroupScheduling(config, log)


def pytest_unconfigure(config):
    collected = config.stash.get(_COLLECTED, None)
    if collected is not None and config.pluginmanager.is_registered(collected):
        config.pluginmanager.unregister(collected)
    gate = config.stash.get(_GATE, None)
    if gate is not None:
        gate.cleanup()
