"""How far the just-past rows' metrics move between CPUs: each row of tests/unit/verify/test_planted_defects.py's JUST_PAST
measured with torch at 1 and 2 threads, with the CPU's own kernels and with the AVX512-BF16 / AMX paths off
(ATen at AVX2, oneDNN capped at AVX2). A row's margin to its default and to its loosened value must stay outside
this spread, or the row passes on one CPU and fails on another.

    .venv/bin/python bench/just_past_spread.py            # writes bench/JUST_PAST_SPREAD.md

Each setting runs in its own pytest process (the ISA is chosen when torch loads); about 1 minute each.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {
    "native, 1 thread": {"OMP_NUM_THREADS": "1"},
    "native, 2 threads": {"OMP_NUM_THREADS": "2"},
    "avx2, 1 thread": {"OMP_NUM_THREADS": "1", "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "avx2, 2 threads": {"OMP_NUM_THREADS": "2", "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
}
# The metric each threshold field is judged on (CheckResult.metrics keys).
METRIC = {"min_sqnr_db": "sqnr_min_db", "dense_min_sqnr_db": "dense_sqnr_min_db",
          "max_kld_vs_rtn": "kld_ratio_vs_rtn", "max_top1_drop_vs_rtn": "top1_drop_vs_rtn",
          "min_top1": "top1", "max_kld_mean": "kld_mean", "max_kld_p99": "kld_p99"}

PROBE = '''
import json, os
import pytest
from qexport.verify.thresholds import DEFAULTS
from qexport.verify import verify
from tests.unit.verify.test_planted_defects import JUST_PAST, just_past_folder, sources  # noqa: F401 (fixtures)


@pytest.mark.parametrize("row", JUST_PAST, ids=lambda r: r.id)
def test_measure(just_past_folder, row):
    folder, ref = just_past_folder(row)
    off = {name: None for name in row.others_off}
    check = verify(folder, ref, thresholds={**vars(DEFAULTS[row.fmt]), **off}, only=[row.check]).checks[0]
    with open(os.environ["SPREAD_OUT"], "a", encoding="utf-8") as out:
        out.write(json.dumps({"row": row.id, "metrics": check.metrics}, default=str) + "\\n")
'''


def measure(env: dict[str, str]) -> dict[str, dict]:
    # The probe lives under the repository so that its conftest.py (the fixture models) applies.
    with tempfile.TemporaryDirectory(dir=ROOT / "bench") as tmp:
        probe, out = Path(tmp) / "probe_spread.py", Path(tmp) / "out.jsonl"
        probe.write_text(PROBE, encoding="utf-8")
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", "--rootdir",
                        str(ROOT), str(probe)], cwd=ROOT, check=True,
                       env={**os.environ, **env, "SPREAD_OUT": str(out), "PYTHONPATH": str(ROOT)})
        return {r["row"]: r["metrics"] for r in map(json.loads, out.read_text(encoding="utf-8").splitlines())}


def main() -> None:
    sys.path.insert(0, str(ROOT))
    from qexport.verify.thresholds import DEFAULTS
    from tests.unit.verify.test_planted_defects import JUST_PAST

    runs = {name: measure(env) for name, env in SETTINGS.items()}
    lines = ["# Just-past rows across CPU settings", "",
             "`bench/just_past_spread.py` on " + os.uname().machine + "; each row's metric at its planted defect. "
             "margin = the smaller distance from the measured range to the default and to the loosened value, "
             "in units of the range's spread (the test needs margin > 1 with room to spare).", "",
             "| row | default | loosened | " + " | ".join(SETTINGS) + " | spread | margin / spread |",
             "|---|---|---|" + "---|" * len(SETTINGS) + "---|---|"]
    for row in JUST_PAST:
        key = METRIC[row.field]
        values = [float(runs[s][row.id][key]) for s in SETTINGS]
        default = getattr(DEFAULTS[row.fmt], row.field)
        spread = max(values) - min(values)
        margin = min(abs(min(values) - default), abs(max(values) - default),
                     abs(min(values) - row.loosened), abs(max(values) - row.loosened))
        ratio = "exact" if spread == 0 else f"{margin / spread:.1f}"
        lines.append(f"| {row.id} | {default:g} | {row.loosened:g} | " + " | ".join(f"{v:.5g}" for v in values)
                     + f" | {spread:.3g} | {ratio} |")
    (ROOT / "bench" / "JUST_PAST_SPREAD.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
