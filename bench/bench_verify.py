"""Benchmark: `qexport verify` of an int4 export of bench's ~1B bf16 Qwen3 checkpoint, whole process.

    PYTHONPATH=. .venv/bin/python bench/bench_verify.py [--size 1b] [--format int4] [--label after] [--out VERIFY.md]

1. Takes the cached checkpoint of bench_export.make_checkpoint(size) (built there on first use, ~2 GB for 1b) and
   exports it with this checkout's `qexport export --formats FORMAT` into a scratch folder under the bench cache.
2. Runs `qexport verify EXPORT --reference SRC --json R.json` as a child process and polls the RSS of its process
   tree every 20 ms (bench_export.run_measured's way), while reading verify's progress lines from stderr
   (`[ 9/18] weights_sqnr ... passed in 2.2 s`) to attribute each RSS sample to the check running at that moment.
3. Prints one table: per check its status, wall seconds and the peak RSS while it ran; the whole run's peak RSS and
   peak anonymous RSS; the machine's load average (1 min) before, during (mean of samples) and after the run.
4. Appends the table under a heading `## LABEL` to bench/VERIFY.md (or --out), so that before/after runs sit
   side by side. The model and the bound they are judged against (one fp32 copy of the model + one shard) come
   first in the heading's text.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from bench_export import CACHE, QEXPORT, _rss, _tree, folder_bytes, make_checkpoint, params_of  # noqa: E402

PROGRESS = re.compile(r"\[\s*(\d+)/(\d+)\]\s+(\S+)\s+\.\.\.\s*")
DONE = re.compile(r"(passed|FAILED|skipped) in ([\d.]+) s")


def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def measured_verify(cmd: list[str], env=None) -> dict:
    """Run verify; peak RSS / anon of the process tree overall and per check, wall per check, load samples."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    current = {"check": "(start-up: imports, open folders)"}
    order = [current["check"]]
    walls: dict[str, float] = {}
    statuses: dict[str, str] = {}
    err_lines: list[str] = []

    def read_stderr():
        # Progress arrives as "[ i/n] name ... " then, when it ends, "passed in 2.2 s (...)\n": read by chunks.
        buffer = ""
        while True:
            chunk = proc.stderr.read1(4096).decode(errors="replace")
            if not chunk:
                break
            buffer += chunk
            while True:
                start = PROGRESS.search(buffer)
                done = DONE.search(buffer)
                if start and (not done or start.start() < done.start()):
                    current["check"] = start.group(3)
                    if start.group(3) not in order:  # a step line ("120/254 tensors") restates the check
                        order.append(start.group(3))
                    buffer = buffer[start.end():]
                elif done:
                    statuses[current["check"]] = done.group(1)
                    walls[current["check"]] = float(done.group(2))
                    current["check"] = "(end: report, exit)"
                    buffer = buffer[done.end():]
                else:
                    break
            err_lines.append(chunk)

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    stdout_chunks: list[bytes] = []
    out_reader = threading.Thread(target=lambda: stdout_chunks.append(proc.stdout.read()), daemon=True)
    out_reader.start()
    peak = peak_anon = 0
    per_check: dict[str, int] = {}
    loads = []
    last_load = 0.0
    while proc.poll() is None:
        rss, anon = _rss(_tree(proc.pid))
        peak, peak_anon = max(peak, rss), max(peak_anon, anon)
        per_check[current["check"]] = max(per_check.get(current["check"], 0), rss)
        if time.perf_counter() - last_load > 5:
            loads.append(loadavg())
            last_load = time.perf_counter()
        time.sleep(0.02)
    wall = time.perf_counter() - started
    reader.join()
    out_reader.join()
    if "(end: report, exit)" not in order:
        order.append("(end: report, exit)")
    return {"wall": wall, "rss": peak, "anon": peak_anon, "per_check_rss": per_check, "walls": walls,
            "statuses": statuses, "order": order, "loads": loads, "returncode": proc.returncode,
            "stderr": "".join(err_lines), "stdout": b"".join(stdout_chunks).decode(errors="replace")}


# Random-init Llama models of 7B-class width (issue 25): memory must stay flat in depth.
LLAMA = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, vocab_size=32000, head_dim=128)
LLAMA_SIZES = {"llama7b-2l": dict(num_hidden_layers=2, num_key_value_heads=8),
               "llama7b-6l": dict(num_hidden_layers=6, num_key_value_heads=8),
               "llama2-7b": dict(num_hidden_layers=32, num_key_value_heads=32)}


def make_llama(size: str) -> Path:
    """A bf16 random-init LlamaForCausalLM checkpoint of 7B width (LLAMA_SIZES[size]) written tensor by tensor,
    never a float32 copy of the model; cached between runs."""
    import torch
    from transformers import AutoConfig

    from qexport.io.safetensors_file import StreamWriter, nbytes
    from qexport.model.architecture import inspect_architecture
    from qexport.model.tiny import build_tokenizer

    folder = CACHE / size
    if (folder / "config.json").is_file():
        return folder
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = AutoConfig.for_model("llama", architectures=["LlamaForCausalLM"], tie_word_embeddings=False,
                                  max_position_embeddings=4096, dtype="bfloat16", **LLAMA, **LLAMA_SIZES[size])
    config.save_pretrained(tmp)
    arch = inspect_architecture(json.loads((tmp / "config.json").read_text()))
    gen = torch.Generator().manual_seed(0)
    weight_map = {}
    names = list(arch.shapes)
    per_shard = 8
    for i in range(0, len(names), per_shard):
        file = f"model-{i // per_shard + 1:05d}-of-{(len(names) + per_shard - 1) // per_shard:05d}.safetensors"
        layout = [(n, "BF16", arch.shapes[n]) for n in names[i:i + per_shard]]
        writer = StreamWriter(tmp / file, layout, {"format": "pt"})
        for name, _, shape in layout:
            t = torch.ones(shape, dtype=torch.bfloat16) if name.endswith("norm.weight") else (
                torch.randn(shape, generator=gen, dtype=torch.bfloat16) * 0.02)
            writer.add(name, t)
            weight_map[name] = file
        writer.close()
    total = sum(nbytes("BF16", s) for s in arch.shapes.values())
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    build_tokenizer().save_pretrained(tmp)
    os.rename(tmp, folder)
    return folder


def machine() -> str:
    import torch
    import transformers

    return (f"{platform.machine()}, {os.cpu_count()} cores, "
            f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB; torch {torch.__version__}, "
            f"transformers {transformers.__version__}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="1b", choices=["0.1b", "1b", *LLAMA_SIZES])
    parser.add_argument("--format", default="int4", choices=["fp16", "int8", "int4"])
    parser.add_argument("--label", default="this checkout", help="heading of this run's section in --out")
    parser.add_argument("--out", default=str(HERE / "VERIFY.md"), help="markdown file the table is appended to")
    parser.add_argument("--export", help="verify this existing export instead of exporting into scratch")
    parser.add_argument("--keep", action="store_true", help="keep the scratch export")
    parser.add_argument("--qexport", default=str(ROOT),
                        help="the qexport tree whose verify is measured (a copy of an older commit: 'before')")
    args = parser.parse_args()
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [args.qexport, os.environ.get("PYTHONPATH")]))
    from qexport.report.terminal import table

    src = make_llama(args.size) if args.size in LLAMA_SIZES else make_checkpoint(args.size)
    scratch = CACHE / f"scratch-verify-{os.getpid()}"
    if args.export:
        export = Path(args.export)
    else:
        subprocess.run([*QEXPORT, "export", str(src), "--out", str(scratch), "--formats", args.format, "--quiet",
                        "--overwrite"], check=True, stdout=subprocess.DEVNULL)
        export = scratch / args.format
    report = scratch / "verify.json"
    scratch.mkdir(parents=True, exist_ok=True)
    subprocess.run(["cat", *map(str, src.glob("*.safetensors")), *map(str, export.glob("*.safetensors"))],
                   stdout=subprocess.DEVNULL)  # warm the page cache: measure verify, not the disk
    load_before = loadavg()
    run = measured_verify([*QEXPORT, "verify", str(export), "--reference", str(src), "--json", str(report)])
    load_after = loadavg()
    rows = []
    for check in run["order"]:
        rss = run["per_check_rss"].get(check)
        rows.append({"check": check, "status": run["statuses"].get(check, "-"),
                     "wall s": run["walls"].get(check, "-"),
                     "peak RSS GB while running": "-" if rss is None else round(rss / 1e9, 2)})
    params = params_of(src)
    shards = sorted(export.glob("*.safetensors"))
    largest_shard = max(p.stat().st_size for p in shards)
    fp32 = params * 4
    during = sum(run["loads"]) / len(run["loads"]) if run["loads"] else load_before
    text = (
        f"\n## {args.label}\n\n"
        f"- `qexport verify` of `{args.format}` export ({folder_bytes(export) / 1e9:.2f} GB, {len(shards)} shard(s), "
        f"largest {largest_shard / 1e9:.2f} GB) of the {args.size} checkpoint ({params / 1e9:.2f}B parameters, "
        f"{folder_bytes(src) / 1e9:.2f} GB bf16); fp32 copy of the model {fp32 / 1e9:.2f} GB\n"
        f"- machine: {machine()}; load average (1 min) before {load_before:.2f}, during {during:.2f} "
        f"(mean of {len(run['loads'])} samples), after {load_after:.2f}\n"
        f"- exit code {run['returncode']}; wall {run['wall']:.1f} s; **peak RSS {run['rss'] / 1e9:.2f} GB**, "
        f"peak anonymous RSS {run['anon'] / 1e9:.2f} GB; bound (fp32 model + largest shard) "
        f"{(fp32 + largest_shard) / 1e9:.2f} GB\n\n{table(rows)}\n")
    print(text)
    if run["returncode"] != 0:
        print(run["stderr"][-3000:], file=sys.stderr)
    with open(args.out, "a", encoding="utf-8") as f:
        f.write(text)
    if report.is_file():
        data = json.loads(report.read_text())
        print("verdicts: " + ", ".join(f"{c['name']} {c['status']}" for c in data["checks"]), file=sys.stderr)
    if not args.keep:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
