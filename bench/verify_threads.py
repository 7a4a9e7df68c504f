"""Benchmark: `qexport verify` wall time with 1 thread, 2 threads and the default choice, with a busy loop on one core.

    .venv/bin/python bench/verify_threads.py [--repeats 2] [--old PATH] [--out bench/VERIFY_THREADS.md]

1. Builds a mid-size random qwen3 (hidden 512, intermediate 2048, 4 layers, vocab 8192, bf16; ~25M parameters)
   with a tokenizer, and exports it as int4, in a temporary folder.
2. Starts a busy loop (`while True: pass`) pinned to core 0 and waits 20 s, so that the load on 2 cores is ~2
   (the loop + verify) plus whatever else runs on the machine.
3. Runs `qexport verify EXPORT --reference SRC --quiet` as a child process with `--threads 1`, `--threads 2` and no
   option (the default, whose choice is read from the progress header of one more run), round-robin, `--repeats`
   times each; with `--old PATH` (a checkout of the code before the change, e.g. `git archive`) also that code's
   default (torch's one thread per core). Wall time per run, load average (1 min) before each run.
4. Prints a markdown table (median wall time per setting, each run's time, the default's chosen count) and appends
   it to --out. The default passes when its median is within 10% of the best median of 1 and 2 threads.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def build(folder: Path) -> tuple[Path, Path]:
    from qexport.export.pipeline import ExportOptions, export_folder
    from qexport.model.tiny import build_tiny_model

    src = build_tiny_model(folder / "src", "qwen3", overrides=dict(hidden_size=512, intermediate_size=2048,
                                                                    num_hidden_layers=4, vocab_size=8192))
    export_folder(src, folder / "out", ExportOptions(formats=("int4",), progress=False))
    return src, folder / "out" / "int4"


def busy_loop() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import os; os.sched_setaffinity(0, {0})\nwhile True: pass"])


def run_verify(src: Path, export: Path, option: list[str], pythonpath: str | None = None) -> tuple[float, str]:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    started = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "qexport.cli.main", "verify", str(export), "--reference", str(src),
                          *option], capture_output=True, text=True, env=env, cwd=pythonpath or ROOT)
    seconds = time.perf_counter() - started
    if run.returncode != 0:
        raise SystemExit(f"verify {option} exited {run.returncode}: {run.stderr[-1000:]}")
    header = next((line for line in run.stderr.splitlines() if line.startswith("verifying ")), "")
    return seconds, header


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--old", help="a checkout of the code before the change: its default is measured too")
    parser.add_argument("--out", default=str(ROOT / "bench" / "VERIFY_THREADS.md"))
    args = parser.parse_args()

    settings = {"--threads 1": ["--threads", "1"], "--threads 2": ["--threads", "2"], "default": []}
    with tempfile.TemporaryDirectory(prefix="qexport-bench-threads-") as tmp:
        src, export = build(Path(tmp))
        loop = busy_loop()
        try:
            time.sleep(20)
            _, header = run_verify(src, export, [])  # what the default chooses (and a warm-up run)
            times: dict[str, list[float]] = {name: [] for name in settings}
            if args.old:
                times["before (torch default)"] = []
            loads = []
            for _ in range(args.repeats):
                for name in times:
                    loads.append(os.getloadavg()[0])
                    if name.startswith("before"):
                        seconds, _ = run_verify(src, export, ["--quiet"], pythonpath=args.old)
                    else:
                        seconds, _ = run_verify(src, export, ["--quiet", *settings[name]])
                    times[name].append(seconds)
                    print(f"{name}: {seconds:.1f} s", file=sys.stderr, flush=True)
        finally:
            loop.kill()
    medians = {name: statistics.median(values) for name, values in times.items()}
    best = min(medians["--threads 1"], medians["--threads 2"])
    ratio = medians["default"] / best
    lines = [f"\n## {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: 2 cores, busy loop on core 0, "
             f"{os.cpu_count()} CPUs; load average before runs {min(loads):.1f}-{max(loads):.1f}\n",
             f"Default's choice (progress header of the warm-up run): `{header}`\n",
             "| setting | median wall s | runs (s) |", "|---|---|---|"]
    lines += [f"| {name} | {medians[name]:.1f} | {', '.join(f'{t:.1f}' for t in values)} |"
              for name, values in times.items()]
    lines.append(f"\ndefault / best of 1 and 2 threads: {ratio:.2f} ({'within' if ratio <= 1.10 else 'NOT within'} "
                 f"10%)\n")
    text = "\n".join(lines)
    print(text)
    with open(args.out, "a", encoding="utf-8") as f:
        f.write(text)


if __name__ == "__main__":
    main()
