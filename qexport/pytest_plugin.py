"""pytest plugin (entry point `pytest11: qexport`): a one-line CI gate, and the report hooks of qexport's own suite.

    pytest --qexport-model PATH [--qexport-formats int8 int4] [--qexport-threshold max_kld_mean=0.05 ...]
           [--qexport-engine vllm[=PYTHON]]

exports the model at PATH to a temporary folder in each format and runs every `qexport verify` check on it, one
test item per (format, check), named `qexport[int4]::functional` etc. Thresholds come from the format defaults
(qexport.thresholds), then the `qexport_thresholds` ini lines, then `--qexport-threshold` options.
`--qexport-engine vllm` adds the item `qexport[FMT]::engine_vllm` (vLLM in its own interpreter; see
qexport.engines.runner); an engine that cannot run fails its item. Without --qexport-model the plugin adds no
tests.

Reports (always on): tests record numbers through the `qexport_report` fixture; they appear as per-test extras in
pytest-html and as rows of a pandas summary table (per model x format) above the results table. Rows travel in
`user_properties`, so the controller of `pytest -n N` sees every worker's rows. With `--html=R.html` (or
`--qexport-json=R.json`) the same numbers are written as JSON next to the HTML.
"""

from __future__ import annotations

import json
import shutil
import tempfile
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
    group.addoption("--qexport-threshold", action="append", default=[], metavar="NAME=VALUE",
                    help="override a threshold, e.g. max_kld_mean=0.05 (repeatable; see qexport.thresholds)")
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
    from .html_report import STYLE, metrics_table

    merged = {k: v for m in metrics for k, v in m.items()}
    extras = list(getattr(report, "extras", []))
    extras.append({"name": "qexport metrics", "format_type": "html", "content":
                   f"<style>{STYLE}</style>{metrics_table(merged)}{''.join(fragments)}",
                   "mime_type": None, "extension": None})
    extras.append({"name": "metrics.json", "format_type": "json", "content": json.dumps(merged, default=str),
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
    model = config.getoption("qexport_model", None)
    if model is not None:
        from .errors import InputError

        if not Path(model).is_dir():
            raise pytest.UsageError(f"--qexport-model {model}: not a folder")
        try:
            config.stash[_GATE] = Gate(config)
        except InputError as e:
            raise pytest.UsageError(str(e))


@pytest.hookimpl(optionalhook=True)
def pytest_html_results_summary(prefix, summary, postfix, session):
    from .html_report import merge_rows, summary_html, svg_histogram

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
    from .html_report import merge_rows, to_json, write_text

    write_text(path, to_json({"rows": merge_rows(collected.rows), "tests": collected.tests}))


# ---------------------------------------------------------------------------------------------------------------
# The CI gate: --qexport-model


_GATE = pytest.StashKey["Gate"]()


class Gate:
    """Exports the user's model once per format (per process) and runs the verification on it."""

    def __init__(self, config):
        from .thresholds import parse_overrides

        self.model = Path(config.getoption("qexport_model"))
        from .formats import format_name

        # Any case, as on the command line; an unknown name is an InputError naming the option it came from.
        option = "--qexport-formats" if config.getoption("qexport_formats") else "ini qexport_formats"
        self.formats = list(dict.fromkeys(
            format_name(f, option) for f in config.getoption("qexport_formats") or config.getini("qexport_formats")))
        self.overrides = {**parse_overrides(config.getini("qexport_thresholds"), "qexport_thresholds"),
                          **parse_overrides(config.getoption("qexport_threshold"), "--qexport-threshold")}
        from .engines.runner import parse_engine

        self.engines = [parse_engine(value) for value in config.getoption("qexport_engine")]
        self._tmp: Path | None = None
        self._results: dict[str, object] = {}

    def result(self, fmt: str, checks: list[str] | None = None):
        """The Verification of `fmt` (or the exception that prevented it), computed on first use for `checks`
        (the items selected in this session, so `-k functional` does not run every check)."""
        if fmt not in self._results:
            try:
                from .export import ExportOptions, export_folder
                from .verify import verify

                if self._tmp is None:
                    self._tmp = Path(tempfile.mkdtemp(prefix="qexport-gate-"))
                out = self._tmp / fmt
                export_folder(self.model, out, ExportOptions(formats=(fmt,), progress=False))
                self._results[fmt] = verify(out / fmt, self.model, self.overrides, only=checks,
                                            engines=self.engines)
            except Exception as e:  # InputError and anything else: every item of this format reports it
                self._results[fmt] = e
        return self._results[fmt]

    def cleanup(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)


class CheckFailed(Exception):
    pass


class QexportCheckItem(pytest.Item):
    def __init__(self, *, fmt: str, check: str, **kwargs):
        super().__init__(**kwargs)
        self.fmt, self.check = fmt, check

    def runtest(self):
        from .verify import Verification

        wanted = [i.check for i in self.session.items if isinstance(i, QexportCheckItem) and i.fmt == self.fmt]
        result = self.config.stash[_GATE].result(self.fmt, wanted)
        if not isinstance(result, Verification):
            raise CheckFailed(f"export or verification of {self.fmt} failed: {type(result).__name__}: {result}")
        check = next(c for c in result.checks if c.name == self.check)
        scalars = {k: v for k, v in check.metrics.items() if not isinstance(v, (dict, list))}
        if check.thresholds:  # the bounds this check used, loosened or disabled ones marked as such
            scalars["thresholds"] = "; ".join(e["text"] for e in check.thresholds)
        Recorder(self).metrics(**scalars)
        row = {k: v for k, v in result.metrics.items() if k != "format"}
        sqnr = next((c.metrics.get("per_tensor_sqnr_db") for c in result.checks if c.name == "weights_sqnr"), None)
        from .report import model_name

        gate = self.config.stash[_GATE]
        Recorder(self).row(model_name(gate.model), self.fmt, path=str(gate.model), passed=result.passed,
                           sqnr_values=list(sqnr.values()) if sqnr else None,
                           sqnr_threshold=result.thresholds.min_sqnr_db,
                           thresholds="; ".join(result.thresholds_changed) or "defaults", **row)
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
    from .verify import CHECK_NAMES, ENGINE_CHECKS, applies

    names = [c for c in CHECK_NAMES if applies(c, gate.model)] + [ENGINE_CHECKS[e.name][1] for e in gate.engines]
    added = []
    for fmt in gate.formats:
        for check in names:
            name = f"qexport[{fmt}]::{check}"
            added.append(QexportCheckItem.from_parent(session, name=name, nodeid=name, fmt=fmt, check=check))
    items.extend(added)
    # Report them as collected, so that "collected N items" and -k / --deselect counts include them.
    config.hook.pytest_collectreport(report=pytest.CollectReport("qexport", "passed", None, added))


def pytest_unconfigure(config):
    collected = config.stash.get(_COLLECTED, None)
    if collected is not None and config.pluginmanager.is_registered(collected):
        config.pluginmanager.unregister(collected)
    gate = config.stash.get(_GATE, None)
    if gate is not None:
        gate.cleanup()
