"""The `qexport` command line. Heavy libraries are imported inside each command, so `--help` stays fast.

Exit codes: 0 all good; 1 a verification check failed; 2 bad input or usage (one line on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import sys


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit code 2."""

    def error(self, message):
        self.exit(2, f"qexport: error: {message}\n")


def _add_export(sub):
    p = sub.add_parser("export", help="export a Hugging Face checkpoint folder as fp16 / int8 / int4",
                       description="Export SRC to OUT/<format>/ for each format (compressed-tensors layout).")
    p.add_argument("src", metavar="SRC", help="model folder: config.json + model.safetensors (or index + shards)")
    p.add_argument("--out", required=True, metavar="OUT", help="output folder; each format goes to OUT/<format>")
    p.add_argument("--formats", nargs="+", default=["fp16", "int8", "int4"], metavar="FMT",
                   help="formats to write (default: fp16 int8 int4)")
    p.add_argument("--group-size", type=int, default=128, help="int4 group size along the input (default 128)")
    p.add_argument("--max-shard-size", default="5GB", help="shard size like transformers: 5GB, 500MB (default 5GB)")
    p.add_argument("--workers", type=int, default=1, help="threads encoding tensors (output is identical for any N)")
    p.add_argument("--overwrite", action="store_true", help="replace existing OUT/<format> folders")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="keep Linear weights holding NaN/Inf dense instead of refusing the export")
    bar = p.add_mutually_exclusive_group()
    bar.add_argument("--progress", action="store_true", default=None,
                     help="always show the progress bar (default: only when stderr is a terminal)")
    bar.add_argument("--quiet", dest="progress", action="store_false", help="never show the progress bar")
    p.set_defaults(run=_run_export)


def _run_export(args) -> int:
    from .export import ExportOptions, export_folder
    from .report import print_export_summary
    from .sizes import parse_size

    options = ExportOptions(
        formats=tuple(args.formats),
        group_size=args.group_size,
        max_shard_size=parse_size(args.max_shard_size),
        workers=args.workers,
        overwrite=args.overwrite,
        allow_nonfinite=args.allow_nonfinite,
        progress=args.progress,
    )
    manifests = export_folder(args.src, args.out, options)
    print_export_summary(manifests, args.out)
    return 0


def _add_demo(sub):
    p = sub.add_parser("demo", help="build a tiny Qwen3 model locally, export fp16/int8/int4, reload and compare",
                       description="Builds a tiny Qwen3 model (no download), exports it in every format, reloads "
                                   "each export through transformers and prints a table.")
    p.add_argument("--out", default="qexport-demo", help="working folder (default ./qexport-demo)")
    p.add_argument("--preset", default="qwen3", help="tiny model preset (qwen3, qwen3-tied, llama, qwen3-100m, ...)")
    p.set_defaults(run=_run_demo)


def _run_demo(args) -> int:
    from .demo import run_demo

    return run_demo(args.out, args.preset)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="qexport", description="Streaming FP16 / INT8 / INT4 export of Hugging Face checkpoints "
                                                 "in the compressed-tensors layout, and the checks that prove it.")
    parser.add_argument("--version", action="version", version=f"qexport {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add in COMMANDS:
        add(sub)
    return parser


COMMANDS = [_add_demo, _add_export]


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def main(argv: list[str] | None = None) -> int:
    from .errors import InputError, VerificationFailed

    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except InputError as e:
        print(f"qexport: error: {_one_line(e)}", file=sys.stderr)
        return e.exit_code
    except VerificationFailed as e:
        print(f"qexport: verification failed: {_one_line(e)}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # disk full, permission, I/O error while reading or writing: the system's words, one line
        where = ": ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
        reason = " ".join(str(e.strerror or e).split())
        print(f"qexport: error: {where or 'I/O error'}: {reason}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qexport: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
