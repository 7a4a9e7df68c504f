"""Mutation testing of qexport with mutmut, per module with its own fast test selection, summarised into
bench/MUTATION.md.

    pip install -e '.[mutation]' -c constraints.txt
    python bench/mutation.py run qexport/io/safetensors_file.py qexport/formats/int8.py   # mutate, test, summarise
    python bench/mutation.py run qexport/verify/layout_checks.py::check_layout       # one function's mutants
    python bench/mutation.py summary                                                 # re-summarise every run

Why per module: mutmut 3 runs, for each mutant, the tests of its selection that executed the mutated function
while it collected coverage ("stats") once. With one selection for all of qexport/, every test that builds and
exports a model covers the reader, writer and format code, so a mutant of `nbytes` ran minutes of export and
verify tests. Here each group of modules (SELECTIONS below) gets its own mutmut state directory,
bench/.mutation/<group>/ (git-ignored), holding links to qexport/, tests/, conftest.py and fixtures/ and a
pyproject.toml whose [tool.mutmut] names only that group's modules and that group's tests; the shared settings
(fork server, preload, pytest arguments) come from [tool.mutmut] in pyproject.toml. A second `run` only tests
mutants without a result (or with a timeout) yet: mutmut keeps its results in the group's mutants/ folder; delete the
folder to start over, or name mutants to test them again.

Two speed-ups live in conftest.py, active only under mutmut (MUTANT_UNDER_TEST set): the tests a mutant runs are
ordered fastest first (mutmut's fork server passes them unordered; with -x a killed mutant stops at its first
failing test); tiny source models come from a disk cache keyed by qexport/model/tiny.py's source (unless the mutant is
in qexport.model.tiny), and for groups of verify code (which the export never imports) their exports too, keyed by the
source of every non-verify module and the input's bytes. A mutant outside qexport.verify never reads a cached
export (conftest.py checks the mutant's name); every cached folder is re-hashed before use.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "MUTATION.md"
WORK = ROOT / "bench" / ".mutation"
EXPORT_CACHE = Path(os.environ.get("QEXPORT_CACHE", Path.home() / ".cache" / "qexport")) / "mutation-exports"
LINKED = ("qexport", "tests", "conftest.py", "fixtures")
# committed: each group's mutmut results (mutmut's own .meta files: exit code per mutant and a hash per mutated
# function) and the diffs of its survivors, so a fresh checkout summarises, and resumes, every earlier run. mutmut keeps
# a saved result while its function's hash is unchanged; the summary counts a mutant of a function edited since as
# "not checked" (stale), never as killed.
STATE = ROOT / "bench" / "mutation_state"
# survivors judged equivalent (no test can tell them from the original), each with the reason; the summary scores
# killed / (tested - equivalent) and prints the reason under the diff
EQUIVALENT = ROOT / "bench" / "mutation_equivalent.json"
# mutmut's exit-code meanings (mutmut/stats.py): 1 and 3 are kills, 0 a survivor.
STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 34: "skipped", 36: "timeout",
          24: "timeout", -24: "timeout", 152: "timeout", 255: "timeout", 37: "type check", None: "not checked",
          "stale": "stale (function edited since)"}

# pytest's own start in each mutant's child cost 2.7 s of a 3.4 s mutant (measured, idle, verify-files): assertion
# rewriting of the mutated modules, gc.collect twice at exit (unraisableexception), anyio's plugin probing event loops.
# Off for the unit-test selections (0.7 s); a mutant's tests still fail on the same asserts.
FAST_PYTEST = ["-p", "no:anyio", "-p", "no:unraisableexception", "--assert=plain"]

# group -> (module globs it mutates, the tests mutmut maps onto them, whether exports come from the disk cache: only
# for groups of verify code; tiny source models come from it in every group).
# The tests are the fast ones that state each module's behaviour; mutmut runs, per mutant, only those of them that
# executed the mutated function.
SELECTIONS: dict[str, tuple[list[str], list[str], bool]] = {
    "thresholds": (["qexport/verify/thresholds.py"],
                   ["tests/unit/verify/test_thresholds.py",
                    "tests/unit/verify/test_planted_defects.py::test_threshold_errors_name_the_option_they_came_from",
                    "tests/unit/verify/test_planted_defects.py::test_unknown_format_gets_the_fp16_thresholds",
                    "tests/unit/verify/test_planted_defects.py::test_regression_allowance_is_absolute_plus_relative_to_the_baseline"],
                   True),
    "io": (["qexport/io/safetensors_file.py", "qexport/io/checkpoint.py"],
           ["tests/unit/io/test_safetensors_file.py", "tests/unit/io/test_checkpoint.py"], False),
    "formats": (["qexport/formats/*"],
                ["tests/unit/formats/test_formats.py", "tests/unit/quant/test_compressed_tensors_bit_equality.py",
                 "tests/unit/formats/test_int4_asym.py::test_int4_asym_equals_compressed_tensors_compress",
                 "tests/unit/formats/test_int4_asym.py::test_int4_asym_predicted_layout_is_what_encode_returns",
                 "tests/unit/formats/test_int4_asym.py::test_zero_point_column_packing_equals_compressed_tensors",
                 "tests/unit/formats/test_int4_asym.py::test_compressed_tensors_decompresses_our_tensors_to_our_dequantization",
                 # --int4-method mse: the format's encode through the clipping search (no export)
                 "tests/unit/quant/test_clip_search.py::test_mse_method_stores_the_round_to_nearest_layout",
                 "tests/unit/quant/test_clip_search.py::test_mse_method_dequantizes_to_what_it_scored",
                 "tests/unit/quant/test_clip_search.py::test_unknown_method_is_an_input_error"],
                False),
    # export: the planning and folder helpers as plain functions, and the write path on a hand-made checkpoint with
    # a hand-made Architecture in place of discovery (no model build)
    "export": (["qexport/export/pipeline.py", "qexport/io/publish.py"],
               ["tests/unit/export/test_pipeline.py", "tests/unit/export/test_write.py"], False),
    # verify's file-level checks, called directly on hand-written folders (a config dict, a few tensors, a manifest;
    # no model built, exported or loaded: milliseconds a test). The planted-defect tests that verify exported models
    # (13-47 s a mutant) stay in the default tier and in the "verify" group.
    "verify-files": (["qexport/verify/config_checks.py", "qexport/verify/file_checks.py",
                      "qexport/verify/weight_checks.py", "qexport/verify/layout_checks.py"],
                     [*FAST_PYTEST,
                      "tests/unit/verify/test_config_checks.py", "tests/unit/verify/test_file_checks.py",
                      "tests/unit/verify/test_weight_checks.py", "tests/unit/verify/test_layout_checks.py"],
                     False),
    # verify's engine checks without an engine: the request sent to vLLM's child and the verdict on its result dict,
    # judged on vLLM's real answers recorded once (fixtures/vllm_results/) for a hand-written one-layer qwen3 (model
    # loads of a few ms), check_engine_vllm with a stand-in interpreter, sentence-transformers with a stand-in library
    "verify-engine": (["qexport/verify/engine_checks.py"],
                      [*FAST_PYTEST,
                       "tests/unit/verify/test_engine_checks_unit.py"], False),
    # verify's runner and Context (the result type, the JSON / shard / target helpers, lazy loading, the runner's
    # failure, NaN and threshold rules, verify() itself) on hand-written folders and stand-in checks; the model
    # loads, tokenizer and forward passes are recording fakes (milliseconds a test)
    "verify-core": (["qexport/verify/context.py", "qexport/verify/__init__.py"],
                    [*FAST_PYTEST,
                     "tests/unit/verify/test_runner.py"],
                    False),
    # verify's checks that load models (reload, reload_matches_dequant, finite_outputs, functional,
    # functional_vs_rtn) and the round-to-nearest reference: bounds and messages on hand-made outputs (no model),
    # loads on a 1-layer hidden-32 qwen3 exported to int8 per test module (about a second)
    "verify-functional": (["qexport/verify/functional_checks.py", "qexport/verify/reference_quant.py"],
                          [*FAST_PYTEST,
                           "tests/unit/verify/test_functional_checks.py", "tests/unit/verify/test_reload.py"],
                          False),
    # merge: LoRA folding and averaging on hand-made safetensors checkpoints and adapters (a one-layer hidden-8
    # llama / gpt2 config built on the meta device for the module kinds; no model built, no peft)
    "merge": (["qexport/merge/sources.py"],
              [*FAST_PYTEST, "tests/unit/merge/test_sources.py"],
              False),
    # the numeric core: scales, codes and int32 packing (quant), the quantization_config matcher (scheme), reading
    # compressed-tensors layouts back to dense weights (dequant), byte sizes and ratios (sizes); laws on small
    # tensors and compressed-tensors' own functions, no model built. Hypothesis on its derandomized "ci" profile: a
    # mutant's verdict must not depend on the draw.
    "numeric": (["qexport/quant/primitives.py", "qexport/quant/dequant.py", "qexport/quant/scheme.py",
                 "qexport/io/sizes.py"],
                [*FAST_PYTEST, "--hypothesis-profile=ci",
                 "tests/unit/quant/test_primitives.py", "tests/unit/quant/test_scheme.py", "tests/unit/quant/test_round_trip_laws.py", "tests/unit/quant/test_compressed_tensors_bit_equality.py",
                 "tests/unit/quant/test_dequant_g_idx.py", "tests/unit/formats/test_formats.py"],
                False),
    "verify": (["qexport/verify/*"],
               ["tests/unit/verify/test_planted_defects.py", "tests/unit/verify/test_no_silent_pass.py", "tests/unit/verify/test_reload_on_models.py"], True),
}


def group_of(module: str) -> str:
    for group, (globs, _, _) in SELECTIONS.items():
        if any(fnmatch.fnmatch(module, g) for g in globs):
            return group
    raise SystemExit(f"{module}: no group in SELECTIONS mutates it (bench/mutation.py)")


def module_file(arg: str) -> str:
    """A module file, a module::function, or a mutant name (qexport.formats.int8.xǁINT8ǁencode__mutmut_27) -> its
    module file."""
    if "__mutmut_" in arg:
        parts = arg.split(".")
        module = ".".join(parts[:next(i for i, p in enumerate(parts) if p.startswith("x"))]).replace(".", "/")
        return f"{module}/__init__.py" if (ROOT / module).is_dir() else f"{module}.py"
    return arg.partition("::")[0]


def mutant_pattern(path: str) -> str:
    """qexport/verify/layout_checks.py -> the mutant-name glob mutmut matches: qexport.verify.layout_checks.*;
    qexport/verify/layout_checks.py::check_layout -> only that function's mutants (a method: ::Checkpoint.read); a
    mutant name -> itself (mutmut then tests it again even if it has a result)."""
    if "__mutmut_" in path:
        return path
    path, _, function = path.partition("::")
    module = path.removesuffix(".py").replace("/", ".")
    if "." in function:  # mutmut names a method's mutants xǁClassǁmethod__mutmut_N
        cls, _, method = function.partition(".")
        return f"{module}.xǁ{cls}ǁ{method}__mutmut_*"
    if module.endswith(".__init__"):  # mutmut names a package's own mutants after the package
        module = module.removesuffix(".__init__")
        return f"{module}.x_{function}__mutmut_*" if function else f"{module}.x*"
    return f"{module}.x_{function}__mutmut_*" if function else f"{module}.*"


def toml_value(value) -> str:
    return json.dumps(value)  # strings, numbers, booleans and lists of them read the same in TOML


def prepare(group: str) -> Path:
    """The group's state directory: links to the tree and a pyproject.toml with the group's [tool.mutmut]."""
    globs, tests, _ = SELECTIONS[group]
    work = WORK / group
    work.mkdir(parents=True, exist_ok=True)
    for name in LINKED:
        link = work / name
        if not link.is_symlink():
            link.symlink_to(os.path.relpath(ROOT / name, work))
    text = (ROOT / "pyproject.toml").read_text()
    base = tomllib.loads(text)["tool"]["mutmut"]
    settings = {**base, "only_mutate": globs, "pytest_add_cli_args_test_selection": tests,
                "preload_modules_file": str(ROOT / base["preload_modules_file"]),
                "use_git_change_detection": False}
    head, _, rest = text.partition("[tool.mutmut]")
    tail = rest[rest.find("\n[") + 1:] if "\n[" in rest else ""
    section = "\n".join(f"{k} = {toml_value(v)}" for k, v in settings.items())
    (work / "pyproject.toml").write_text(f"{head}[tool.mutmut]\n{section}\n\n{tail}")
    saved = STATE / group
    for meta in saved.rglob("*.py.meta") if saved.is_dir() else ():
        target = work / "mutants" / meta.relative_to(saved)
        if not target.exists():  # mutmut merges it with the mutants it generates (same function hash = same result)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(meta, target)
    return work


def save(group: str, work: Path) -> None:
    """Copy the group's results and its survivors' diffs from the state directory into bench/mutation_state/."""
    globs = SELECTIONS[group][0]
    saved = STATE / group
    for meta in (work / "mutants").rglob("*.py.meta"):
        rel = meta.relative_to(work / "mutants")
        if any(fnmatch.fnmatch(rel.as_posix().removesuffix(".meta"), g) for g in globs):
            (saved / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(meta, saved / rel)
    diffs_file = saved / "survivors.json"
    old = json.loads(diffs_file.read_text()) if diffs_file.exists() else {}
    diffs = {}
    for codes in results(group).values():
        for name, code in sorted(codes.items()):
            if STATUS.get(code) == "survived":
                diffs[name] = old.get(name) or subprocess.run(
                    [sys.executable, "-m", "mutmut", "show", name], cwd=work, text=True,
                    capture_output=True).stdout.strip()
    if diffs or diffs_file.exists():
        saved.mkdir(parents=True, exist_ok=True)
        diffs_file.write_text(json.dumps(diffs, indent=1, ensure_ascii=False) + "\n")


def module_codes(meta: Path, rel: str) -> dict[str, int | str | None]:
    """mutant name -> result for one module as mutmut sees it now: the mutants of the module's current source, each
    with the result saved in `meta` if its function is unchanged since (same hash: mutmut keeps it too), "stale" if the
    function changed since it was tested, None if never tested."""
    from mutmut.mutation.file_mutation import mutate_file_contents
    from mutmut.utils.format_utils import get_mutant_name

    source = ROOT / rel
    if not source.is_file():
        return {}
    data = json.loads(meta.read_text()) if meta.is_file() else {}
    saved, then = data.get("exit_code_by_key", {}), data.get("hash_by_function_name", {})
    mutated = mutate_file_contents(rel, source.read_text())
    now = mutated.hash_by_function_name
    codes: dict[str, int | str | None] = {}
    for mangled in mutated.mutant_names:
        name = get_mutant_name(Path(rel), mangled)
        function = mangled.partition("__mutmut_")[0]
        if now.get(function) == then.get(function):
            codes[name] = saved.get(name)
        else:
            codes[name] = "stale" if name in saved else None
    return codes


def _results(root: Path, globs: list[str]) -> dict[str, dict[str, int | str | None]]:
    out = {}
    for meta in sorted(root.rglob("*.py.meta")) if root.is_dir() else ():
        rel = meta.relative_to(root).as_posix().removesuffix(".meta")
        if any(fnmatch.fnmatch(rel, g) for g in globs) and (codes := module_codes(meta, rel)):
            out[rel] = codes
    return out


def live_results(work: Path, globs: list[str]) -> dict[str, dict[str, int | str | None]]:
    """module file -> {mutant name: result} from the group's mutmut working state (bench/.mutation/<group>/)."""
    return _results(work / "mutants", globs)


def results(group: str) -> dict[str, dict[str, int | str | None]]:
    """module file -> {mutant name: result} from the committed results (bench/mutation_state/<group>/)."""
    return _results(STATE / group, SELECTIONS[group][0])


def resume(work: Path, members: list[str]) -> list[str]:
    """What to hand mutmut: named mutants as given (tested again); for a module or function, those of its current
    mutants that have no result yet, a timeout, or a result from before their function was edited (mutmut re-tests
    every mutant matching a pattern, so a stopped run would start over)."""
    names = []
    for m in members:
        if "__mutmut_" in m:
            names.append(m)
            continue
        rel = module_file(m)
        pattern = mutant_pattern(m)
        codes = module_codes(work / "mutants" / f"{rel}.meta", rel)
        names += [n for n, code in codes.items() if fnmatch.fnmatch(n, pattern) and STATUS.get(code) in
                  ("not checked", "no tests", "timeout", STATUS["stale"])]
    return names


def forget_stale_stats(work: Path, names: list[str]) -> None:
    """Delete mutmut's record of which tests call which function when it lacks a function about to be mutated, so
    that mutmut collects it again over the whole selection. mutmut's incremental collection re-runs only tests that
    are new: a new function called by existing tests (INT8.qparams, split out of encode) read "no tests" for each of
    its mutants. Costs one run of the group's selection."""
    stats = work / "mutants" / "mutmut-stats.json"
    if not stats.exists():
        return
    known = json.loads(stats.read_text())["tests_by_mangled_function_name"]
    missing = sorted({n.rpartition("__mutmut_")[0] for n in names} - set(known))
    if missing:
        print(f"collecting which tests call which function again ({len(missing)} not in mutmut's stats, e.g. "
              f"{missing[0]})")
        stats.unlink()


def load() -> str:
    return Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else "?"


def run(modules: list[str], max_children: int) -> None:
    by_group: dict[str, list[str]] = {}
    for m in modules:
        by_group.setdefault(group_of(module_file(m)), []).append(m)
    for group, members in by_group.items():
        work = prepare(group)
        globs, _, cached = SELECTIONS[group]
        before = sum(c not in (None, "stale") for codes in live_results(work, globs).values() for c in codes.values())
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)  # the mutants/ copy must be the qexport the tests import
        # Each mutant's child imports the mutated modules afresh (the fork server preloads libraries, not qexport):
        # with PYTHONDONTWRITEBYTECODE set, every child compiled them again (the four verify-files modules, 4 MB of
        # mutants, took 3.0 s of a 3.7 s child); with bytecode written once, the child takes 0.8 s (measured).
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        # A mutant that hands transformers a wrong path sends it to the Hugging Face Hub: offline it fails at once
        # (killed) instead of retrying a network that is not there until mutmut's wall limit (150 s a mutant).
        env["HF_HUB_OFFLINE"] = "1"
        env["QEXPORT_MUTATION_CACHE"] = str(EXPORT_CACHE)  # tiny models, for every group (see conftest.py)
        if cached:
            env["QEXPORT_MUTATION_CACHE_EXPORTS"] = "1"
        names = resume(work, members)
        if not names:
            print(f"{group}: every mutant of {', '.join(members)} has a result")
            continue
        forget_stale_stats(work, names)
        start, load_start = time.monotonic(), load()
        subprocess.run([sys.executable, "-m", "mutmut", "run", "--max-children", str(max_children), *names],
                       cwd=work, env=env)
        wall = time.monotonic() - start
        after = sum(c not in (None, "stale") for codes in live_results(work, globs).values() for c in codes.values())
        save(group, work)
        log = STATE / group / "runs.json"
        log.parent.mkdir(parents=True, exist_ok=True)
        runs = json.loads(log.read_text()) if log.exists() else []
        runs.append({"modules": members, "wall_s": round(wall), "tested": after - before, "max_children": max_children,
                     "load_start": load_start, "load_end": load(), "date": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                                        time.gmtime())})
        log.write_text(json.dumps(runs, indent=1))


def summarise(note: str) -> str:
    lines = ["# Mutation testing (mutmut)", "",
             "Generated by `python bench/mutation.py summary` (see its docstring and CONTRIBUTING.md "
             "\"Mutation testing\"); each group of modules has its own test selection (`SELECTIONS` in "
             "bench/mutation.py).", ""]
    if note:
        lines += [note, ""]
    equivalent = json.loads(EQUIVALENT.read_text()) if EQUIVALENT.exists() else {}
    table = ["| module | mutants | killed | survived (equivalent) | other | score: killed / (tested - equivalent) |",
             "|---|---|---|---|---|---|"]
    runs_table = ["| group | modules or mutants run | new results (re-runs and reset timeouts not counted) | wall | "
                  "s per new result | children | load (start, end) | date |",
                  "|---|---|---|---|---|---|---|---|"]
    survivors: dict[str, list[tuple[Path, str]]] = {}
    for group, (globs, tests, _) in SELECTIONS.items():
        saved = STATE / group
        diffs = json.loads((saved / "survivors.json").read_text()) if (saved / "survivors.json").exists() else {}
        for module, codes in results(group).items():
            counts = Counter(STATUS.get(code, "suspicious") for code in codes.values())
            same = sum(1 for n, c in codes.items() if STATUS.get(c) == "survived" and n in equivalent)
            tested = counts["killed"] + counts["survived"] - same
            other = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()) if k not in ("killed", "survived")) or "-"
            score = f"{100 * counts['killed'] / tested:.1f}%" if tested else "-"
            table.append(f"| {module} | {len(codes)} | {counts['killed']} | {counts['survived']} ({same}) | {other} | "
                         f"{score} |")
            survivors[module] = [(n, diffs.get(n, "(diff not saved)")) for n, c in sorted(codes.items())
                                 if STATUS.get(c) == "survived"]
        log = saved / "runs.json"
        for r in json.loads(log.read_text()) if log.exists() else []:
            per = f"{r['wall_s'] / r['tested']:.1f}" if r["tested"] > 0 else "-"
            members = ", ".join(r["modules"]) if len(r["modules"]) <= 3 else f"{len(r['modules'])} named"
            runs_table.append(f"| {group} | {members} | {max(r['tested'], 0)} | {r['wall_s'] / 60:.1f} min | "
                              f"{per} | {r['max_children']} | {r['load_start']}, {r['load_end']} | {r['date']} |")
    lines += table + ["", "## Runs", "", *runs_table, "", "## Test selections", ""]
    lines += [f"- {group} ({', '.join(globs)}): {', '.join(tests)}" + (" (verify's disk cache of exports)" if c else "")
              for group, (globs, tests, c) in SELECTIONS.items()]
    for module, names in survivors.items():
        if not names:
            continue
        lines += ["", f"## Survivors in {module}", ""]
        for name, diff in names:
            lines += [f"`{name}`" + (f": equivalent. {equivalent[name]}" if name in equivalent else ": not killed yet"),
                      "", "```diff", diff, "```", ""]
    # An entry whose mutant is no survivor (killed by a later test, or renumbered when its function was edited) would
    # excuse a different mutant if the numbers came back: listed here to be removed from the file.
    surviving = {name for names in survivors.values() for name, _ in names}
    orphans = sorted(set(equivalent) - surviving)
    if orphans:
        lines += ["", f"## Equivalent entries naming no survivor (remove from {EQUIVALENT.name})", "",
                  *[f"- `{name}`" for name in orphans]]
    return "\n".join(lines).rstrip() + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    run_ = sub.add_parser("run", help="mutate and test the given modules, then write bench/MUTATION.md")
    run_.add_argument("modules", nargs="+", help="module files, e.g. qexport/verify/thresholds.py, one function of one: "
                      "qexport/verify/layout_checks.py::check_layout, or mutant names (tested again)")
    run_.add_argument("--max-children", type=int, default=2)
    for p in (run_, sub.add_parser("summary", help="write bench/MUTATION.md from every group's results")):
        p.add_argument("--note", default="", help="a paragraph for the summary (machine, what was left out)")
    args = parser.parse_args(argv)
    if args.cmd == "run":
        run(args.modules, args.max_children)
    OUT.write_text(summarise(args.note))
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
