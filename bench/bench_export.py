"""Benchmark: qexport export vs llm-compressor's data-free model_free_ptq vs a warm `cp -r`, whole processes.

    .venv/bin/python bench/bench_export.py [--sizes 0.1b 1b] [--rounds 3] [--skip-peer]

1. Generates random-init bf16 Qwen3-like checkpoints (~0.1B and ~1B parameters, ~500 MB shards + index) tensor by
   tensor (never the whole model in memory), cached in ~/.cache/qexport/bench/
   ($QEXPORT_BENCH_CACHE).
2. Times, alternating A B C ... for --rounds rounds: qexport int4 / int8 (--workers 1 and 2), model_free_ptq W4A16 /
   W8A16 (max_workers 1 and 2; run from its own venv <cache>/venv-llmc, created on first use because llmcompressor pins
   older compressed-tensors / transformers than ours), and `cp -r` of the checkpoint (page cache warm) as the I/O floor.
3. Records wall seconds (median, min-max), input GB/s, peak RSS and peak anonymous RSS of the process tree (polled
   from /proc every 20 ms), output bytes, and whether the output reloads in transformers with empty loading info.
4. Prints a markdown table and writes it to bench/RESULTS.md with versions and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# Shared by every checkout on the machine (worktrees included); QEXPORT_BENCH_CACHE moves it.
CACHE = Path(os.environ.get("QEXPORT_BENCH_CACHE", Path.home() / ".cache" / "qexport" / "bench"))
PEER_VENV = CACHE / "venv-llmc"
# This checkout's qexport (a worktree too), in the interpreter running the benchmark; main() puts ROOT on PYTHONPATH.
QEXPORT = [sys.executable, "-m", "qexport.cli.main"]
PEER_PINS = ["torch==2.13.0", "llmcompressor==0.14.0.1"]

SIZES = {
    # ~0.1B: the qwen3-100m preset's shapes.
    "0.1b": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=10, num_attention_heads=12,
                 num_key_value_heads=4, head_dim=64, vocab_size=32768),
    # ~1B: 18 layers of hidden 2048 / MLP 5632, untied 32k vocabulary.
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=18, num_attention_heads=16,
               num_key_value_heads=8, head_dim=128, vocab_size=32000),
}
SHARD_BYTES = 500 * 10**6


# --- checkpoints -------------------------------------------------------------------------------------------------


def make_checkpoint(size: str) -> Path:
    """A bf16 Qwen3-like checkpoint written tensor by tensor, cached between runs."""
    folder = CACHE / f"qwen3-{size}"
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import AutoConfig

    from qexport.model.architecture import inspect_architecture
    from qexport.io.safetensors_file import StreamWriter, nbytes
    from qexport.model.tiny import build_tokenizer

    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = AutoConfig.for_model("qwen3", architectures=["Qwen3ForCausalLM"], tie_word_embeddings=False,
                                  max_position_embeddings=4096, dtype="bfloat16", **SIZES[size])
    config.save_pretrained(tmp)
    arch = inspect_architecture(json.loads((tmp / "config.json").read_text()))
    shards, used = [[]], 0
    for name, shape in arch.shapes.items():
        size_b = nbytes("BF16", shape)
        if used and used + size_b > SHARD_BYTES:
            shards.append([])
            used = 0
        shards[-1].append((name, "BF16", shape))
        used += size_b
    gen = torch.Generator().manual_seed(0)
    weight_map = {}
    for i, layout in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        writer = StreamWriter(tmp / file, layout, {"format": "pt"})
        for name, _, shape in layout:
            t = torch.ones(shape) if name.endswith("norm.weight") else torch.randn(shape, generator=gen) * 0.02
            writer.add(name, t.to(torch.bfloat16))
            weight_map[name] = file
        writer.close()
    total = sum(nbytes("BF16", s) for s in arch.shapes.values())
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    build_tokenizer().save_pretrained(tmp)
    tmp.rename(folder)
    return folder


def params_of(folder: Path) -> int:
    from qexport.io.checkpoint import Checkpoint

    import math

    return sum(math.prod(e.shape) for e in Checkpoint.open(folder).entries.values())


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


# --- the peer ----------------------------------------------------------------------------------------------------


def ensure_peer() -> Path | None:
    python = PEER_VENV / "bin" / "python"
    if python.exists() and subprocess.run([python, "-c", "import llmcompressor"], capture_output=True).returncode == 0:
        return python
    print(f"creating {PEER_VENV} for llm-compressor (one time) ...", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", PEER_VENV], check=True)
    r = subprocess.run([python, "-m", "pip", "install", "-q", *PEER_PINS], capture_output=True, text=True)
    if r.returncode:
        print(f"llm-compressor could not be installed; peer rows skipped:\n{r.stderr[-2000:]}", file=sys.stderr)
        return None
    return python


PEER_SCRIPT = (
    "import sys; from llmcompressor import model_free_ptq; "
    "model_free_ptq(model_stub=sys.argv[1], save_directory=sys.argv[2], scheme=sys.argv[3], ignore=['lm_head'], "
    "max_workers=int(sys.argv[4]), device='cpu')"
)


# --- measuring ---------------------------------------------------------------------------------------------------


def _tree(pid: int) -> list[int]:
    pids, frontier = [pid], [pid]
    while frontier:
        p = frontier.pop()
        try:
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        for c in map(int, children):
            pids.append(c)
            frontier.append(c)
    return pids


def _rss(pids: list[int]) -> tuple[int, int]:
    total = anon = 0
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
                elif line.startswith("RssAnon:"):
                    anon += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total, anon


def run_measured(cmd: list[str], env=None) -> dict:
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    peak = peak_anon = 0
    while proc.poll() is None:
        rss, anon = _rss(_tree(proc.pid))
        peak, peak_anon = max(peak, rss), max(peak_anon, anon)
        time.sleep(0.02)
    wall = time.perf_counter() - started
    err = proc.stderr.read().decode(errors="replace")
    if proc.returncode:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{err[-3000:]}")
    return {"wall": wall, "rss": peak, "anon": peak_anon}


def reloads(folder: Path) -> bool:
    code = (
        "import sys, torch; from qexport.verify.functional import load_model; "
        "_, info = load_model(sys.argv[1], dtype=torch.float16); sys.exit(1 if any(info.values()) else 0)"
    )
    return subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True).returncode == 0


def variants(src: Path, scratch: Path, peer: Path | None) -> dict[str, dict]:
    out = {}
    for fmt in ("int4", "int8"):
        for workers in (1, 2):
            target = scratch / f"qexport-{fmt}-w{workers}"
            out[f"qexport {fmt} --workers {workers}"] = dict(
                cmd=[*QEXPORT, "export", str(src), "--out", str(target), "--formats", fmt, "--quiet", "--overwrite",
                     "--workers", str(workers)],
                out=target / fmt, clean=target)
    if peer is not None:
        for scheme in ("W4A16", "W8A16"):
            for workers in (1, 2):
                target = scratch / f"llmc-{scheme}-w{workers}"
                out[f"model_free_ptq {scheme} max_workers={workers}"] = dict(
                    cmd=[str(peer), "-c", PEER_SCRIPT, str(src), str(target), scheme, str(workers)],
                    out=target, clean=target)
    target = scratch / "copy"
    out["cp -r (warm, I/O floor)"] = dict(cmd=["cp", "-r", str(src), str(target)], out=target, clean=target)
    return out


def bench_size(size: str, rounds: int, peer: Path | None, scratch: Path) -> list[dict]:
    src = make_checkpoint(size)
    in_bytes = folder_bytes(src)
    runs = variants(src, scratch, peer)
    subprocess.run(["cat", *map(str, src.glob("*.safetensors"))], stdout=subprocess.DEVNULL)  # warm the page cache
    samples: dict[str, list[dict]] = {name: [] for name in runs}
    for r in range(rounds):
        for name, spec in runs.items():
            shutil.rmtree(spec["clean"], ignore_errors=True)
            samples[name].append(run_measured(spec["cmd"]))
            samples[name][-1]["load"] = float(Path("/proc/loadavg").read_text().split()[0])
            print(f"[{size} round {r + 1}/{rounds}] {name}: {samples[name][-1]['wall']:.2f} s", file=sys.stderr)
    rows = []
    for name, spec in runs.items():
        walls = [s["wall"] for s in samples[name]]
        median = statistics.median(walls)
        rows.append({
            "size": size,
            "model": f"{size} ({params_of(src) / 1e9:.2f}B, {in_bytes / 1e9:.2f} GB)",
            "tool": name,
            "wall s median": round(median, 2),
            "min-max": f"{min(walls):.2f}-{max(walls):.2f}",
            "input GB/s": round(in_bytes / 1e9 / median, 2),
            "steady GB/s": None,
            "peak RSS GB": round(max(s["rss"] for s in samples[name]) / 1e9, 3),
            "peak anon GB": round(max(s["anon"] for s in samples[name]) / 1e9, 3),
            "output GB": round(folder_bytes(spec["out"]) / 1e9, 3),
            "reloads": "-" if name.startswith("cp") else ("yes" if reloads(spec["out"]) else "NO"),
            "load": f"{min(x['load'] for x in samples[name]):.1f}-{max(x['load'] for x in samples[name]):.1f}",
        })
        shutil.rmtree(spec["clean"], ignore_errors=True)
    return rows


PROFILE_SCRIPT = r"""
import json, resource, sys, threading, time
t0 = time.perf_counter()
from qexport.io.malloc import keep_freed_memory
keep_freed_memory()
from qexport.io import forked
from qexport.model.architecture import prefetch
from qexport.io.checkpoint import Checkpoint
calls, init = [], forked.ForkedCall.__init__
forked.ForkedCall.__init__ = lambda self, *a: calls.append(self) or init(self, *a)
source = Checkpoint.open(sys.argv[1])
source.hash_in_child()  # as the command line does: before torch is imported
with forked.no_gc():
    import torch
prefetch(source.config, source.folder / "config.json", fork=True)  # as the command line does, right after torch
import qexport.export.pipeline as E
from qexport import formats
from qexport.io import safetensors_file as safetensors_io
imports_cpu, imports_wall = time.process_time(), time.perf_counter() - t0
stats, lock = {}, threading.Lock()
def account(key, seconds):
    with lock:
        stats[key] = stats.get(key, 0.0) + seconds
def wrap(owner, attr, key):
    original = getattr(owner, attr)
    def timed(*a, **k):
        c = time.thread_time()
        try:
            return original(*a, **k)
        finally:
            account(key, time.thread_time() - c)
    setattr(owner, attr, timed)
wrap(Checkpoint, "read", "read tensors (positioned reads)")
wrap(formats.REGISTRY[sys.argv[3]], "encode", "encode (scales, quantize, pack)")
def _write(self, data):  # StreamWriter._write, timed in two parts
    c = time.thread_time(); self._sha.update(data); c2 = time.thread_time()
    with safetensors_io._naming(self.path):
        self._file.write(data)
    account("hash the output (sha256)", c2 - c); account("write the output", time.thread_time() - c2)
safetensors_io.StreamWriter._write = _write
E.export(source, sys.argv[2], E.ExportOptions(formats=(sys.argv[3],), overwrite=True, progress=False))
wall = time.perf_counter() - t0
me = resource.getrusage(resource.RUSAGE_SELF)
total = me.ru_utime + me.ru_stime
child = {c.what: c.cpu_seconds for c in calls}
rows = {"interpreter, import torch + qexport": imports_cpu,
        "architecture discovery (forked child: transformers modeling import, meta model)":
            child["architecture discovery"],
        "hash the source (sha256; forked child: read + hash)": child["hashing the source"], **stats}
rows["rest (planning, threads, side files, card, manifest)"] = total - imports_cpu - sum(stats.values())
rows["all (all processes)"] = total + sum(child.values())
print(json.dumps({"rows": rows, "wall": wall, "imports_wall": imports_wall}))
"""


def profile(src: Path, fmt: str, scratch: Path) -> tuple[list[dict], str]:
    """CPU seconds by phase of one export (default options), each phase timed on the thread that runs it."""
    out = subprocess.run([sys.executable, "-c", PROFILE_SCRIPT, str(src), str(scratch / "profile"), fmt],
                         capture_output=True, text=True, check=True).stdout
    shutil.rmtree(scratch / "profile", ignore_errors=True)
    data = json.loads(out.splitlines()[-1])
    note = (f"wall {data['wall']:.2f} s, imports done at {data['imports_wall']:.2f} s, load "
            f"{Path('/proc/loadavg').read_text().split()[0]}")
    return [{"phase": k, "CPU s": round(v, 2)} for k, v in data["rows"].items()], note


def throughput(rows: list[dict], sizes: dict[str, int]) -> None:
    """Steady-state GB/s of each tool: input bytes over wall time between the two model sizes (fixed start-up,
    imports and discovery cancel out), written into the larger model's rows."""
    if len(sizes) < 2:
        return
    small, large = sorted(sizes, key=sizes.get)[0], sorted(sizes, key=sizes.get)[-1]
    wall = {(r["size"], r["tool"]): r["wall s median"] for r in rows}
    for r in rows:
        if r["size"] == large and (small, r["tool"]) in wall:
            extra = r["wall s median"] - wall[(small, r["tool"])]
            r["steady GB/s"] = round((sizes[large] - sizes[small]) / 1e9 / extra, 2) if extra > 0 else None


def ratios(rows: list[dict]) -> list[dict]:
    """Per model and format: the best qexport row against the best model_free_ptq row (medians)."""
    out = []
    for size in dict.fromkeys(r["size"] for r in rows):
        for fmt, scheme in (("int4", "W4A16"), ("int8", "W8A16")):
            ours = [r for r in rows if r["size"] == size and r["tool"].startswith(f"qexport {fmt}")]
            peer = [r for r in rows if r["size"] == size and r["tool"].startswith(f"model_free_ptq {scheme}")]
            if ours and peer:
                a = min(ours, key=lambda r: r["wall s median"])
                b = min(peer, key=lambda r: r["wall s median"])
                out.append({"model": a["model"], "format": fmt, "qexport s": a["wall s median"],
                            "model_free_ptq s": b["wall s median"],
                            "speed-up": round(b["wall s median"] / a["wall s median"], 2),
                            "RSS ratio (peer / qexport)": round(b["peak RSS GB"] / a["peak RSS GB"], 2)})
    return out


def versions(peer: Path | None) -> str:
    import compressed_tensors
    import safetensors
    import torch
    import transformers

    lines = [f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
             f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB, {platform.platform()}",
             f"- qexport side: python {platform.python_version()}, torch {torch.__version__}, transformers "
             f"{transformers.__version__}, compressed-tensors {compressed_tensors.__version__}, safetensors "
             f"{safetensors.__version__}"]
    if peer is not None:
        code = ("import llmcompressor, compressed_tensors, transformers, torch; print(llmcompressor.__version__, "
                "compressed_tensors.__version__, transformers.__version__, torch.__version__)")
        v = subprocess.run([peer, "-c", code], capture_output=True, text=True).stdout.split()
        if len(v) == 4:
            lines.append(f"- peer venv: llmcompressor {v[0]}, compressed-tensors {v[1]}, transformers {v[2]}, "
                         f"torch {v[3]}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["0.1b", "1b"], choices=list(SIZES))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-peer", action="store_true", help="do not run llm-compressor")
    parser.add_argument("--results", default=str(HERE / "RESULTS.md"))
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    from qexport.report.terminal import table

    peer = None if args.skip_peer else ensure_peer()
    CACHE.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="scratch-", dir=CACHE))  # one per run: checkouts may bench at once
    rows, sizes = [], {}
    for size in args.sizes:
        rows += bench_size(size, args.rounds, peer, scratch)
        sizes[size] = folder_bytes(make_checkpoint(size))
    throughput(rows, sizes)
    ratio_rows = ratios(rows)
    for r in rows:
        del r["size"]
    profiles = ""
    if "1b" in args.sizes:
        for fmt in ("int4", "int8"):
            phase_rows, note = profile(make_checkpoint("1b"), fmt, scratch)
            profiles += (f"\nCPU by phase of one `qexport export --formats {fmt}` of the 1b checkpoint (default options; "
                         f"{note}):\n\n{table(phase_rows)}\n")
    help_walls = [run_measured([*QEXPORT, "--help"])["wall"] for _ in range(5)]
    startup = f"- `qexport --help` start-up: median {statistics.median(help_walls):.3f} s over 5 runs\n"
    text = (f"# Export benchmark\n\nVerify and the pytest gate at scale: bench/VERIFY.md (bench_verify.py), bench/GATE.md "
            f"(bench_gate.py); INT4 quality: bench/QUALITY.md.\n\n{versions(peer)}\n{startup}- {args.rounds} rounds, alternating tools within each "
            f"round; whole processes (imports included); wall median and min-max; load = 1-minute load average "
            f"when each run ended (2 cores: above ~0.5 means other work shared them); steady GB/s = input bytes "
            f"over wall time between the two model sizes (start-up cancels out)\n\n{table(rows)}\n"
            f"\nBest qexport row against the best model_free_ptq row, per model and format (medians):\n\n"
            f"{table(ratio_rows)}\n{profiles}")
    print(text)
    Path(args.results).write_text(text)
    shutil.rmtree(scratch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
