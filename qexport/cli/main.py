"""The `qexport` command line. Heavy libraries are imported inside each command, so `--help` stays fast.

Exit codes: 0 all good; 1 a verification check failed; 2 bad input or usage (one line on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import sys

from qexport.cli.help_text import EXIT_CODES, FORMATS, verify_epilog
from qexport.report.escape import terminal_safe  # light: the standard library only


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit code 2."""

    def error(self, message):
        self.exit(2, f"qexport: error: {terminal_safe(message)}\n")


def _add_export(sub):
    p = sub.add_parser("export", help="export a Hugging Face checkpoint folder as fp16 / int8 / int4",
                       description="Export SRC to OUT/<format>/ for each format (compressed-tensors layout).",
                       usage="qexport export SRC --out OUT [options]\n"
                             "       qexport export --models M1 M2 ... [--weights W ...] --out OUT [options]",
                       epilog=EXIT_CODES.replace("a verification check failed; ", ""))
    p.add_argument("src", metavar="SRC", nargs="?",
                   help="the source model (required unless --models): a model folder (config.json + "
                        "model.safetensors, or index + shards), a Hugging Face cache folder models--OWNER--NAME, or a "
                        "hub id OWNER/NAME already in the local Hugging Face cache (never downloaded); the base with "
                        "--lora")
    p.add_argument("--out", required=True, metavar="OUT", help="output folder; each format goes to OUT/<format>")
    _add_merge_inputs(p, base_option=False)
    p.add_argument("--formats", nargs="+", default=DEFAULT_FORMATS, metavar="FMT",
                   help=f"formats to write, in any case: {', '.join(FORMATS)} (default: fp16 int8 int4)")
    p.add_argument("--group-size", type=int, default=None,
                   help="int4 group size along the input. Default: the largest of 128, 64, 32 that every Linear's "
                        "input size divides by (one per model). Given: exactly that; Linears whose input does not "
                        "divide by it stay dense, with a warning")
    p.add_argument("--int4-method", choices=("rtn", "mse"), default="rtn",
                   help="how int4 scales are chosen: rtn, round-to-nearest over each group's range (default); mse, "
                        "each group's range clipped by the factor (1.0 down to 0.8) with the lowest weight error "
                        "(sum |w - ŵ|^2.4) (slower; same stored layout)")
    p.add_argument("--workers", type=int, default=2,
                   help="tensors encoded at once, one thread each (default 2; the output is identical for any N)")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="keep Linear weights holding NaN/Inf dense instead of refusing the export")
    _add_writing_options(p, overwrite_help="replace existing OUT/<format> folders")
    p.set_defaults(run=_run_export)


def _add_writing_options(p, overwrite_help: str) -> None:
    """Options shared by every command that writes model folders."""
    p.add_argument("--max-shard-size", default="5GB", help="shard size like transformers: 5GB, 500MB (default 5GB)")
    p.add_argument("--overwrite", action="store_true", help=overwrite_help)
    bar = p.add_mutually_exclusive_group()
    bar.add_argument("--progress", action="store_true", default=None,
                     help="always show the progress bar (default: only when stderr is a terminal)")
    bar.add_argument("--quiet", dest="progress", action="store_false", help="never show the progress bar")


def _export_options(args):
    from qexport.export.pipeline import ExportOptions
    from qexport.io.sizes import parse_size

    return ExportOptions(
        formats=tuple(args.formats),
        group_size=args.group_size,
        int4_method=args.int4_method,
        max_shard_size=parse_size(args.max_shard_size),
        workers=args.workers,
        overwrite=args.overwrite,
        allow_nonfinite=args.allow_nonfinite,
        progress=args.progress,
    )


def _run_export(args) -> int:
    from qexport.errors import InputError
    from qexport.io.malloc import keep_freed_memory

    keep_freed_memory()
    if args.src is not None and args.lora is None and not args.models and args.weights is None:
        # Two child processes run beside the export on the other core (qexport.io.forked): one forked before torch is
        # imported here hashes the source during that import; one forked right after it (nothing run on torch yet)
        # discovers the architecture without importing torch again. Where torch was imported before this command
        # (a test calling main()) nothing is forked: discovery spawns a new interpreter, hashes come from the reads.
        # Opening the checkpoint first refuses bad input as before.
        from qexport.model.architecture import prefetch
        from qexport.io.checkpoint import Checkpoint
        from qexport.io.forked import can_fork, no_gc

        try:
            source = Checkpoint.open(args.src)
        except InputError:
            _export_options(args)  # a bad option is reported before a bad source, as when options came first
            raise
        if "quantization_config" not in source.config:
            fresh = "torch" not in sys.modules
            if fresh and can_fork():
                source.hash_in_child()
            with no_gc():
                import torch  # noqa: F401

            prefetch(source.config, source.folder / "config.json", source.tensor_bytes, fork=fresh)
    else:
        source = None
    from qexport.export.pipeline import export
    from qexport.merge.sources import open_source
    from qexport.report.terminal import print_export_summary

    options = _export_options(args)
    if source is None:
        source = open_source(args.src, lora=args.lora, models=args.models, weights=args.weights)
    manifests = export(source, args.out, options)
    print_export_summary(manifests, args.out)
    return 0


def _add_merge_inputs(p, base_option: bool) -> None:
    if base_option:
        p.add_argument("--base", metavar="BASE", help="base model folder the LoRA adapter was trained on")
    p.add_argument("--lora", metavar="ADAPTER",
                   help="PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors) to fold into "
                        "the base: W + scale * B @ A, computed in fp32, stored in the base dtype")
    p.add_argument("--models", nargs="+", metavar="M",
                   help="average these checkpoints of one architecture instead (tensor by tensor, in fp32)")
    p.add_argument("--weights", nargs="+", type=float, metavar="W",
                   help="one non-negative weight per --models entry; normalised to sum to 1 (default: equal)")


def _add_merge(sub):
    p = sub.add_parser("merge", help="fold a LoRA adapter into its base, or average checkpoints",
                       description="Write a merged model to OUT as a plain Hugging Face folder (tensors in the base "
                                   "dtype, config and tokenizer of the base or first model), streaming one tensor at "
                                   "a time. Either --base BASE --lora ADAPTER, or --models M1 M2 ... [--weights ...]. "
                                   "To merge and quantize in one pass, give the same options to `qexport export`.")
    p.add_argument("--out", required=True, metavar="OUT", help="output model folder")
    _add_merge_inputs(p, base_option=True)
    _add_writing_options(p, overwrite_help="replace an existing OUT folder")
    p.set_defaults(run=_run_merge)


def _run_merge(args) -> int:
    from qexport.io.malloc import keep_freed_memory

    keep_freed_memory()
    from qexport.errors import InputError
    from qexport.merge.sources import merge_folder, open_source
    from qexport.io.sizes import parse_size

    if args.lora is not None and args.base is None:
        raise InputError("--lora: needs --base, the model the adapter was trained on")
    if args.base is not None and args.lora is None:
        raise InputError("--base: needs --lora ADAPTER (or average checkpoints with --models)")
    if args.base is None and not args.models:
        raise InputError("nothing to merge: give --base BASE --lora ADAPTER, or --models M1 M2 ...")
    max_shard_size = parse_size(args.max_shard_size)
    source = open_source(args.base, lora=args.lora, models=args.models, weights=args.weights)
    manifest = merge_folder(source, args.out, max_shard_size=max_shard_size, overwrite=args.overwrite,
                            progress=args.progress)
    summary = manifest["summary"]
    print(f"merged ({manifest['source']['merge']['method']}) -> {terminal_safe(args.out)}: "
          f"{len(manifest['tensors'])} tensors, "
          f"{summary['weight_bytes'] / 1e6:.1f} MB")
    return 0


def _add_demo(sub):
    p = sub.add_parser("demo", help="build a tiny Qwen3 model locally, export fp16/int8/int4, reload and compare",
                       description="Builds a tiny model (no download), exports it in every format, runs "
                                   "`qexport verify` on each export and prints a table with each format's verdict.")
    p.add_argument("--out", default="qexport-demo", help="working folder (default ./qexport-demo)")
    from qexport.model.tiny import PRESETS

    p.add_argument("--preset", default="qwen3", metavar="PRESET",
                   help=f"tiny model preset: {', '.join(PRESETS)} (default qwen3)")
    p.set_defaults(run=_run_demo)


def _run_demo(args) -> int:
    from qexport.cli.demo import run_demo

    return run_demo(args.out, args.preset)


def _add_verify(sub):
    p = sub.add_parser("verify", help="check an export folder against its source model (exit 1 if a check fails)",
                       description="Run the verification checks on EXPORT (any compressed-tensors or dense folder) "
                                   "against the source model it was made from. Exit 0 all pass, 1 a check "
                                   "failed, 2 bad input.",
                       epilog=verify_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("export", metavar="EXPORT", help="an export folder (one format), e.g. OUT/int4")
    p.add_argument("--reference", required=True, metavar="SRC",
                   help="the source model: a folder, a Hugging Face cache folder models--OWNER--NAME, or a hub id "
                        "OWNER/NAME in the local Hugging Face cache")
    p.add_argument("--report", metavar="R.html", help="write a standalone HTML report")
    p.add_argument("--json", metavar="R.json", help="write the checks and metrics as JSON")
    p.add_argument("--baseline", metavar="B.json", help="fail on a metric regression vs this earlier JSON")
    p.add_argument("--save-baseline", metavar="B.json", help="write this run's metrics as a baseline")
    p.add_argument("--threshold", action="extend", nargs="+", default=[], metavar="NAME=VALUE",
                   help="override thresholds, e.g. --threshold max_kld_mean=0.05 min_top1=none (a finite number, "
                        "or none to disable; reports mark loosened and disabled thresholds)")
    p.add_argument("--name", metavar="NAME",
                   help="the model's name in reports (default: config.json's _name_or_path, the source README's "
                        "model_name, else the folder name)")
    p.add_argument("--write-card", action="store_true",
                   help="record the results in EXPORT's README.md model card and qexport.json (qexport exports)")
    p.add_argument("--quiet", action="store_true",
                   help="no progress on stderr (default: each check's name as it starts, its time as it ends)")
    p.add_argument("--threads", type=_positive_int, metavar="N",
                   help="windows of the evaluation text run through a model at once, one CPU thread each; the "
                        "rest of verify runs on one thread. Default: the cores free now (usable cores less the "
                        "load average, at least 1; 1 when the load is above the core count), or OMP_NUM_THREADS "
                        "when set. The metrics are the same for any N")
    p.add_argument("--engine", action="append", default=[], metavar="vllm[=PYTHON]",
                   help="also run the export in this engine (check engine_vllm): vLLM in its own interpreter, "
                        "default $QEXPORT_VLLM_PYTHON or ~/.cache/qexport/vllm-venv/bin/python; if it cannot "
                        "run, the check fails")
    p.set_defaults(run=_run_verify)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


class _VerifyProgress:
    """`[ 9/17] weights_sqnr ... passed in 2.2 s (elapsed 3.1 s)` on stderr: which check runs, how long it took.

    A check that walks tensors (or windows, files) and has run for STEP_EVERY seconds since the last line gets a
    line of its count so far, `[ 9/17] weights_sqnr ... 120/254 tensors (10.0 s)`, and the line starts again."""

    STEP_EVERY = 10.0

    def __init__(self, stream, header: str = ""):
        self.stream, self.started, self.shown, self.prefix, self.header = stream, 0.0, 0.0, "", header

    def __call__(self, name, index, total, elapsed, result):
        if self.header:
            self.stream.write(f"{self.header.format(checks=total)}\n")
            self.header = ""
        if result is None:
            self.started = self.shown = elapsed
            self.prefix = f"[{index:>{len(str(total))}}/{total}] {terminal_safe(name):<24} ... "
            self.stream.write(self.prefix)
        else:
            self.stream.write(f"{result.status} in {elapsed - self.started:.1f} s (elapsed {elapsed:.1f} s)\n")
        self.stream.flush()

    def step(self, name, done, total, unit, elapsed):
        if elapsed - self.shown < self.STEP_EVERY or done >= total:
            return
        self.shown = elapsed
        self.stream.write(f"{done}/{total} {terminal_safe(unit)} ({elapsed - self.started:.1f} s)\n{self.prefix}")
        self.stream.flush()


def _run_verify(args) -> int:
    from qexport.errors import VerificationFailed
    from qexport.report.html import to_json, verification_html, write_text
    from qexport.io.identity import model_name
    from qexport.verify.thresholds import parse_overrides
    from qexport.verify.engines.runner import parse_engine
    from qexport.verify import check_baseline, load_baseline, record_in_card, verify

    from qexport.verify.threads import ThreadChoice, verify_threads

    overrides = parse_overrides(args.threshold)
    engines = [parse_engine(value) for value in args.engine]
    baseline = load_baseline(args.baseline) if args.baseline else None
    threads = ThreadChoice(args.threads, "--threads") if args.threads else verify_threads()
    header = f"verifying {args.export} against {args.reference}: {{checks}} checks, {threads.describe()}"
    result = verify(args.export, args.reference, overrides, engines=engines, threads=threads.threads,
                    progress=None if args.quiet else _VerifyProgress(sys.stderr, header))
    if baseline is not None:
        result.add(check_baseline(result.metrics, baseline))
    for check in result.checks:  # names and details quote the folders' file and tensor names
        print(f"{check.status:>7}  {terminal_safe(check.name):<24} {terminal_safe(check.detail)}")
    data = {"model": model_name(args.reference, args.name), **result.as_dict()}
    if args.json:
        write_text(args.json, to_json(data))
    if args.report:
        write_text(args.report, verification_html(data))
    if args.save_baseline:
        write_text(args.save_baseline, to_json({"format": result.format, "metrics": result.metrics,
                                                "thresholds": data["threshold_entries"],
                                                "thresholds_changed": result.thresholds_changed}))
    if args.write_card:
        record_in_card(result)
    for text in result.thresholds_changed:
        print(f"   note  threshold {terminal_safe(text)}")
    failures = result.failures
    if failures:
        raise VerificationFailed(f"{len(failures)} check(s) failed: "
                                 + "; ".join(f"{c.name}: {c.detail}" for c in failures))
    changed = f"; {len(result.thresholds_changed)} threshold(s) not at their defaults" if result.thresholds_changed \
        else ""
    skipped = [c.name for c in result.checks if c.skipped]
    print(terminal_safe(f"all {len(result.checks) - len(skipped)} checks passed ({result.format}{changed})"
                        + (f"; {len(skipped)} skipped (not passed, not failed): {', '.join(skipped)}" if skipped
                           else "")))
    return 0


def _add_inspect(sub):
    p = sub.add_parser("inspect", help="what a model folder holds, from headers only (exit 1 if problems found)",
                       description="Summarise any model folder (qexport export, another tool's, or a dense "
                                   "checkpoint) from its safetensors headers and JSON files, without loading "
                                   "it: architecture, quantization config, tensors by layer type, totals, and "
                                   "the problems visible from headers. Exit 0 no problems, 1 problems found, "
                                   "2 not a folder, or an export root (its format folders are named).")
    p.add_argument("dir", metavar="DIR", help="a model folder")
    p.add_argument("--json", action="store_true", help="print the report as JSON (every tensor included)")
    p.add_argument("--tensors", action="store_true", help="also list every tensor")
    p.set_defaults(run=_run_inspect)


def _run_inspect(args) -> int:
    from qexport.report.html import to_json
    from qexport.report.inspection import format_report, inspect_folder

    report = inspect_folder(args.dir)
    print(to_json(report).rstrip("\n") if args.json else format_report(report, args.tensors))
    return 1 if report["problems"] else 0


def build_parser() -> argparse.ArgumentParser:
    from qexport import __version__
    parser = _Parser(prog="qexport", description="Streaming FP16 / INT8 / INT4 export of Hugging Face checkpoints "
                                                 "in the compressed-tensors layout, and the checks that prove it.",
                     epilog=EXIT_CODES)
    parser.add_argument("--version", action="version", version=f"qexport {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add in COMMANDS:
        add(sub)
    return parser


COMMANDS = [_add_demo, _add_export, _add_merge, _add_verify, _add_inspect]


MAX_ERROR_CHARS = 500  # one short line, even for a path nested a thousand folders deep


def _one_line(error: Exception | str) -> str:
    """The message on one line, every character a terminal would act on escaped (names come from the input)."""
    text = terminal_safe(" ".join(str(error).split()))
    if len(text) <= MAX_ERROR_CHARS:
        return text
    # the head names the file, the tail says what is wrong: cut the middle (a huge tensor name, a deep path)
    return text[:300] + f" …[{len(text) - 450:,} characters]… " + text[-150:]


class Terminated(BaseException):
    """SIGTERM or SIGHUP (docker stop, a CI cancel, a closed terminal): unwinds like Ctrl-C, so the same cleanup
    runs (temporary folders and created parents removed) before exit 128 + signal."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_terminated(signum, frame):
    raise Terminated(signum)


def _handle_termination() -> None:
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(sig) in (signal.SIG_DFL, None):
                signal.signal(sig, _raise_terminated)


def _printable_streams() -> None:
    """A path the terminal's encoding cannot show (undecodable bytes) is printed escaped, not a traceback."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            try:
                stream.reconfigure(errors="backslashreplace")
            except (ValueError, OSError):
                pass


def _stdout_closed() -> int:
    """The reader of our stdout went away (`qexport inspect --json | head`): stop quietly, as `cat` does.

    What is still buffered can never be written; pointing stdout at /dev/null keeps the interpreter's final flush
    from printing a second error. Exit status 141 = 128 + SIGPIPE, what a shell reports for a tool killed by it.
    """
    import os

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 141


DEFAULT_FORMATS = ["fp16", "int8", "int4"]


def _check_paths(args) -> None:
    """Source models resolved (a folder, a Hugging Face cache root or a cached hub id: qexport.io.model_path) and
    the other input folders checked before any heavy import, so that a typo is reported at once, not after torch
    loads. A bad option given with a bad path is still reported first, as the commands themselves do."""
    from pathlib import Path

    from qexport.errors import InputError
    from qexport.io.model_path import resolve_model
    from qexport.io.sizes import parse_size

    command = args.command
    if command in ("export", "merge"):
        try:
            if getattr(args, "base", None) is not None:
                args.base = str(resolve_model(args.base))
            if getattr(args, "src", None) is not None:
                args.src = str(resolve_model(args.src))
            if args.models:
                args.models = [str(resolve_model(m)) for m in args.models]
            if args.lora is not None and not Path(args.lora).is_dir():
                raise InputError(f"--lora {args.lora}: not a folder")
        except InputError:
            parse_size(args.max_shard_size)
            if command == "export" and args.formats != DEFAULT_FORMATS:
                _export_options(args)  # format names are known only to the formats package (imports torch)
            raise
    elif command == "verify":
        if not Path(args.export).is_dir():
            raise InputError(f"{args.export}: export is not a folder")
        args.reference = str(resolve_model(args.reference))


def main(argv: list[str] | None = None) -> int:
    from qexport.errors import InputError, VerificationFailed

    _printable_streams()
    args = build_parser().parse_args(argv)
    _handle_termination()
    try:
        _check_paths(args)
        code = args.run(args)
        sys.stdout.flush()  # a reader that stopped early (`| head`) shows here, while BrokenPipeError is caught
        return code
    except BrokenPipeError:
        return _stdout_closed()
    except InputError as e:
        advice = f"; {terminal_safe(' '.join(e.advice.split()))}" if getattr(e, "advice", None) else ""  # never cut
        print(f"qexport: error: {_one_line(e.args[0] if e.args else e)}{advice}", file=sys.stderr)
        return e.exit_code
    except VerificationFailed as e:
        print(f"qexport: verification failed: {_one_line(e)}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # disk full, permission, I/O error while reading or writing: the system's words, one line
        where = ": ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
        reason = " ".join(str(e.strerror or e).split())
        message = f"{where or 'I/O error'}: {reason}"
        print(f"qexport: error: {_one_line(message)}", file=sys.stderr)
        return 2
    except RecursionError:  # a structure nested deeper than Python's stack, from some input not capped yet
        print("qexport: error: input nested too deeply to process (RecursionError)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qexport: interrupted", file=sys.stderr)
        return 130
    except Terminated as e:
        print(f"qexport: terminated by signal {e.signum}", file=sys.stderr)
        return 128 + e.signum


if __name__ == "__main__":
    sys.exit(main())
