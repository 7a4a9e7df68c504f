"""The pickle refusal's advice is a command that works: run verbatim on a causal LM saved as pytorch_model.bin, it
writes a safetensors folder that keeps `lm_head` and the tokenizer, and qexport exports it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import torch

from qexport.io.checkpoint import Checkpoint, auto_class_for, load_config
from qexport.cli.main import main

ADVICE_START = "then export that: "


def pickle_copy(src, folder):
    """`src` as an old-style checkpoint: pytorch_model.bin (a torch.save'd state dict) and the same side files.
    transformers 5 no longer writes .bin files (save_pretrained lost safe_serialization), but still loads them."""
    from safetensors.torch import load_file

    shutil.copytree(src, folder, ignore=shutil.ignore_patterns("*.safetensors", "*.safetensors.index.json"))
    torch.save(load_file(src / "model.safetensors"), folder / "pytorch_model.bin")
    return folder


def test_auto_class_comes_from_the_config_architectures():
    assert auto_class_for({"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"]}) == "AutoModelForCausalLM"
    assert auto_class_for({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}) == "AutoModelForCausalLM"
    assert auto_class_for({"model_type": "bert", "architectures": ["BertModel"]}) == "AutoModel"
    assert auto_class_for({"model_type": "bert", "architectures": ["BertForMaskedLM"]}) == "AutoModelForMaskedLM"
    assert auto_class_for({"model_type": "t5", "architectures": ["T5ForConditionalGeneration"]}) == \
        "AutoModelForSeq2SeqLM"
    assert auto_class_for({"model_type": "qwen3"}) is None


def test_pickle_advice_runs_and_its_result_exports_with_the_lm_head(qwen3_src, tmp_path, capsys):
    src = pickle_copy(qwen3_src, tmp_path / "model")
    assert main(["export", str(src), "--out", str(tmp_path / "refused"), "--formats", "int4", "--quiet"]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "pytorch_model.bin" in error and "AutoModelForCausalLM" in error
    command = error[error.index(ADVICE_START) + len(ADVICE_START):]

    # Verbatim, through a shell, with this venv's python first on PATH (the advice says `python`).
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(command, shell=True, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    converted = Checkpoint.open(tmp_path / "model-safetensors")
    original = Checkpoint.open(qwen3_src)
    assert set(converted.entries) == set(original.entries)  # lm_head.weight included: the head survived
    assert "lm_head.weight" in converted.entries
    for name in original.entries:
        assert torch.equal(converted.read(name), original.read(name)), name  # bf16 kept (dtype='auto')
    assert (tmp_path / "model-safetensors" / "tokenizer.json").is_file()
    assert not (tmp_path / "model-safetensors" / "pytorch_model.bin").exists()
    assert load_config(tmp_path / "model-safetensors")["architectures"] == ["Qwen3ForCausalLM"]

    assert main(["export", str(tmp_path / "model-safetensors"), "--out", str(tmp_path / "out"), "--formats", "int4",
                 "--quiet"]) == 0
    exported = Checkpoint.open(tmp_path / "out" / "int4")
    assert "lm_head.weight" in exported.entries
