"""The documentation says what the code does: README.md's sample demo output is what `qexport demo` prints (the
table's columns, formats, sizes and verdicts; not KLD / top-1 / max |Δlogit| of a random model, which move between
CPUs), the sample `qexport inspect` output of docs/inspect.md is what inspect prints, every `qexport` and gate
command the README shows parses with the real parsers, the default thresholds the README and docs/thresholds.md
state are DEFAULTS, every relative link of README.md, CONTRIBUTING.md and docs/ names a file that exists, and the
mkdocs site builds with `--strict` (a broken link or anchor, or a page missing from nav, fails it)."""

from __future__ import annotations

import contextlib
import io
import itertools
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOC_FILES = [README, ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]
# Columns whose values come from a random model's forward passes (they differ between CPUs); the rest are sizes.
MEASURED_COLUMNS = ("KLD mean", "top-1", "max |Δlogit|")
NUMBER = re.compile(r"-?\d[\d,]*(\.\d+)?(e[-+]?\d+)?")


def code_lines(text: str) -> list[str]:
    """The lines of indented (4-space) code blocks, without the indent."""
    lines, out, previous_blank, in_block = text.splitlines(), [], True, False
    for line in lines:
        if line.startswith("    ") and (in_block or previous_blank):
            out.append(line[4:])
            in_block = True
        elif line.strip():
            in_block = False
        previous_blank = not line.strip()
    return out


def block_after(text: str, first_line: str) -> list[str]:
    """The indented code block that starts with `first_line`, up to the next prose line."""
    lines = text.splitlines()
    start = lines.index("    " + first_line)
    block = []
    for line in lines[start + 1:]:
        if line.strip() and not line.startswith("    "):
            break
        block.append(line[4:])
    while block and not block[-1].strip():
        block.pop()
    return block


def cells(row: str) -> list[str]:
    return [c.strip() for c in row.strip().strip("|").split("|")]


def markdown_table(lines: list[str]) -> list[list[str]]:
    """Rows of the first `| ... |` table in lines (up to its first other line), separator row left out. Cells split on ' | ', so a `|` inside a
    header (`max |Δlogit|`) stays in its cell."""
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = list(itertools.takewhile(lambda line: line.startswith("|"), lines[start:]))
    return [[c.strip() for c in row.strip()[1:-1].split(" | ")] for row in rows if not set(row) <= set("|-: ")]


def qexport_commands(text: str) -> list[str]:
    """Every `.venv/bin/qexport ...` example in text's code blocks that is a command, not a synopsis with [...]."""
    found = []
    for line in code_lines(text):
        line = line.removeprefix("$ ").strip()
        if line.startswith(".venv/bin/qexport ") and "[" not in line:
            found.append(line)
    return found


# --- the demo and inspect samples ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_output(tmp_path_factory):
    """What `qexport demo --out DIR` prints on stdout (the command calls `run_demo(DIR, "qwen3")`; run here in this
    process, whose libraries are imported already), with DIR written as the README's default `qexport-demo`."""
    from qexport.cli.demo import run_demo

    out = tmp_path_factory.mktemp("docs") / "qexport-demo"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert run_demo(out, "qwen3") == 0
    return printed.getvalue().replace(str(out), "qexport-demo")


def test_readme_demo_sample_has_the_columns_formats_sizes_and_verdicts_the_demo_prints(demo_output):
    sample = markdown_table(block_after(README.read_text(), "$ .venv/bin/qexport demo"))
    printed = markdown_table(demo_output.splitlines())
    assert sample[0] == printed[0], "README's demo table has other columns than the demo prints"
    assert [row[0] for row in sample] == [row[0] for row in printed], "other formats, or in another order"
    measured = [sample[0].index(name) for name in MEASURED_COLUMNS]
    for shown, real in zip(sample[1:], printed[1:]):
        for i, (a, b) in enumerate(zip(shown, real)):
            if i in measured:
                assert NUMBER.fullmatch(a) and NUMBER.fullmatch(b), f"{sample[0][i]}: {a!r} / {b!r}"
            else:
                assert a == b, f"{real[0]} {sample[0][i]}: README shows {a!r}, the demo prints {b!r}"


def test_readme_demo_sample_opens_with_the_lines_the_demo_prints(demo_output):
    sample = block_after(README.read_text(), "$ .venv/bin/qexport demo")
    shown = sample[:sample.index("")]
    printed = demo_output.splitlines()[:len(shown)]
    seconds = re.compile(r"in \d+(\.\d+)? s")
    assert [seconds.sub("in N s", line) for line in shown] == [seconds.sub("in N s", line) for line in printed]


def test_readme_says_what_the_demo_says_about_int4s_default_bounds(demo_output):
    from qexport.verify.thresholds import DEFAULTS

    readme, int4 = " ".join(README.read_text().split()), DEFAULTS["int4"]
    no_floor = int4.max_kld_mean is None and int4.min_top1 is None
    assert ("int4 no absolute KLD / top-1 floor" in demo_output) == no_floor
    assert ("int4 has **no absolute KLD / top-1 floor by default**" in readme) == no_floor
    relative = re.search(r"KLD at most ([\d.]+)x, top-1 at most ([\d.]+) below", readme)
    assert relative and (float(relative[1]), float(relative[2])) == (int4.max_kld_vs_rtn, int4.max_top1_drop_vs_rtn)


def test_inspect_sample_in_docs_is_what_inspect_prints(qwen3_out):
    """docs/inspect.md's sample is the demo's int4 folder; the suite's tiny qwen3 export has the same tensors. Only
    the folder's own bytes (card and manifest text) differ."""
    sample = block_after((ROOT / "docs" / "inspect.md").read_text(), "$ .venv/bin/qexport inspect qexport-demo/export/int4")
    result = subprocess.run([sys.executable, "-m", "qexport.cli.main", "inspect", str(qwen3_out / "int4")],
                            capture_output=True, text=True, timeout=600)
    printed = result.stdout.rstrip("\n").replace(str(qwen3_out / "int4"), "qexport-demo/export/int4").splitlines()
    folder_bytes = re.compile(r"folder [\d,]+ bytes")
    assert result.returncode == 0
    assert [folder_bytes.sub("folder N bytes", line) for line in sample] == \
        [folder_bytes.sub("folder N bytes", line) for line in printed]


# --- commands ------------------------------------------------------------------------------------------------------


def help_subcommands() -> set[str]:
    """The subcommands `qexport --help` lists."""
    result = subprocess.run([sys.executable, "-m", "qexport.cli.main", "--help"], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    return set(re.search(r"\{([a-z,]+)\}", result.stdout)[1].split(","))


def test_qexport_help_lists_exactly_the_commands_the_readme_documents():
    documented = set(re.findall(r"^\*\*([a-z]+)\*\*: ", README.read_text(), re.M)) | {"demo"}
    assert help_subcommands() == documented


@pytest.mark.parametrize("doc", DOC_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_qexport_command_shown_parses(doc):
    from qexport.cli.main import build_parser

    parser = build_parser()
    for command in qexport_commands(doc.read_text()):
        argv = shlex.split(command, comments=True)[1:]
        try:
            parser.parse_args(argv)
        except SystemExit as e:
            pytest.fail(f"{doc.name}: `{command}` does not parse (exit {e.code})")


def test_readme_shows_a_qexport_command_for_every_subcommand():
    shown = {shlex.split(c)[1] for c in qexport_commands(README.read_text())}
    assert shown == help_subcommands()


class _Options:
    """Records the option names a pytest plugin adds (a stand-in for pytest's parser and its groups)."""

    def __init__(self):
        self.names: set[str] = set()

    def getgroup(self, *args, **kwargs):
        return self

    def addoption(self, *names, **kwargs):
        self.names.update(names)

    def addini(self, *args, **kwargs):
        pass


@pytest.mark.parametrize("doc", DOC_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_gate_option_shown_is_an_option_of_the_plugin(doc):
    from qexport import pytest_plugin

    options = _Options()
    pytest_plugin.pytest_addoption(options)
    shown = set(re.findall(r"(--qexport-[a-z-]+)", doc.read_text()))
    assert shown <= options.names, f"{doc.name} shows options the plugin does not have: {shown - options.names}"


# --- thresholds ----------------------------------------------------------------------------------------------------


def _threshold_value(cell: str):
    if cell.startswith("(skipped"):
        return "skipped"
    if cell == "-" or cell.startswith("off"):
        return None
    return float(cell)


def test_threshold_table_in_docs_is_the_defaults():
    from qexport.verify.thresholds import DEFAULTS

    text = (ROOT / "docs" / "thresholds.md").read_text()
    table = markdown_table(text[text.index("| threshold |"):].splitlines())
    formats = table[0][1:4]
    assert formats == ["fp16", "int8", "int4"]
    checked = set()
    for row in table[1:]:
        names = re.findall(r"`(\w+)`", row[0].split("(")[0])
        for column, fmt in enumerate(formats, start=1):
            values = [_threshold_value(v.strip()) for v in row[column].split(" / ")]
            values = values * len(names) if len(values) == 1 else values
            for name, value in zip(names, values, strict=True):
                if value != "skipped":
                    assert getattr(DEFAULTS[fmt], name) == value, f"docs/thresholds.md: {fmt} {name}"
                checked.add(name)
    assert checked >= {"min_sqnr_db", "max_kld_mean", "max_kld_p99", "min_top1", "min_cosine", "max_kld_vs_rtn",
                       "max_top1_drop_vs_rtn"}


# --- links and the site --------------------------------------------------------------------------------------------


def relative_links(text: str) -> list[str]:
    """Targets of markdown links that are neither external nor a bare #anchor, outside code."""
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    prose = "\n".join(line for line in prose.splitlines() if not line.startswith("    "))
    prose = re.sub(r"`[^`\n]*`", "", prose)
    targets = re.findall(r"\]\(([^)\s]+)\)", prose)
    return [t.split("#")[0] for t in targets if "://" not in t and not t.startswith(("#", "mailto:"))]


@pytest.mark.parametrize("doc", DOC_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_names_a_file_that_exists(doc):
    links = relative_links(doc.read_text())
    missing = [link for link in links if not (doc.parent / link).exists()]
    assert not missing, f"{doc.relative_to(ROOT)} links to files that do not exist: {missing}"


def test_readme_links_every_docs_page():
    linked = {(ROOT / link).resolve() for link in relative_links(README.read_text())}
    pages = {page.resolve() for page in (ROOT / "docs").glob("*.md")}
    assert pages <= linked, f"README does not link {sorted(p.name for p in pages - linked)}"


def mkdocs_build(config: Path, site: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})


def test_docs_site_builds_with_strict_link_and_nav_checks(tmp_path):
    result = mkdocs_build(ROOT / "mkdocs.yml", tmp_path / "site")
    assert result.returncode == 0, result.stderr[-3000:]


def _small_site(tmp_path: Path, pages: dict[str, str], nav: list[str]) -> Path:
    """A two-page site under tmp_path/repo with the project's mkdocs.yml settings (validation, hook) and its own
    nav; returns its config file."""
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    config.update(nav=nav, hooks=[str(ROOT / "docs" / "hooks" / "repo_links.py")])
    repo = tmp_path / "repo"
    (repo / "docs").mkdir(parents=True)
    for name, text in pages.items():
        (repo / "docs" / name).write_text(text)
    (repo / "mkdocs.yml").write_text(yaml.safe_dump(config))
    return repo / "mkdocs.yml"


GOOD = {"index.md": "# Home\n\n[Other](other.md#other)\n", "other.md": "# Other\n"}


def test_a_small_site_with_the_projects_settings_builds(tmp_path):
    """The control for the next test: its sites fail for their defect, not for the settings."""
    result = mkdocs_build(_small_site(tmp_path, GOOD, ["index.md", "other.md"]), tmp_path / "site")
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("pages, nav", [
    pytest.param({**GOOD, "index.md": "# Home\n\n[Other](missing.md)\n"}, ["index.md", "other.md"],
                 id="link-to-a-missing-page"),
    pytest.param({**GOOD, "index.md": "# Home\n\n[Other](other.md#no-such-heading)\n"}, ["index.md", "other.md"],
                 id="link-to-a-missing-anchor"),
    pytest.param(GOOD, ["index.md"], id="page-missing-from-nav"),
    pytest.param({**GOOD, "index.md": "# Home\n\n[Bench](../bench/NOTHING.md)\n"}, ["index.md", "other.md"],
                 id="link-outside-docs-to-a-missing-file"),
])
def test_docs_build_fails_on(tmp_path, pages, nav):
    result = mkdocs_build(_small_site(tmp_path, pages, nav), tmp_path / "site")
    assert result.returncode != 0, "mkdocs build --strict passed a site with this defect"
