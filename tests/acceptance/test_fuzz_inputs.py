"""Fuzzing the two things qexport parses from a model folder: safetensors headers and config.json.

Law: any input gives either a complete export (exit 0, manifest intact) or a one-line refusal (exit 2, no output
folder) -- never a traceback, never a hang. Runs `qexport.cli.main.main` in-process for speed; each example is bounded
by an alarm. Example counts come from the hypothesis profile (ci/dev: 60, deep: 2000; see conftest.py).
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from fixtures.bad_inputs import manifest_problems, read_raw
from qexport.cli.main import main
from qexport.errors import InputError
from qexport.io.safetensors_file import DTYPES, read_header
from tests.support import deadline

SECONDS_PER_EXAMPLE = 60  # a tiny export takes about 0.2 s; a minute means a hang, not a slow machine
MINI = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, vocab_size=256)

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**66), 2**66) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
DTYPE_NAMES = st.sampled_from([*DTYPES, "U16", "U32", "F4", "Q4_K", "bf16", ""])
SMALL_SHAPES = st.lists(st.integers(0, 300), max_size=3)


@pytest.fixture(scope="module")
def mini_src(build_model):
    return build_model("qwen3", **MINI)


def export_outcome(src: Path, root: Path) -> None:
    """Run the export; assert it is a complete export or a one-line refusal with nothing written."""
    out = root / "out"
    stderr = io.StringIO()
    with deadline(SECONDS_PER_EXAMPLE, ": qexport hangs on this input"), contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        rc = main(["export", str(src), "--out", str(out), "--formats", "int4", "--quiet"])
    lines = stderr.getvalue().strip().splitlines()
    event(f"exit {rc}")
    if rc == 0:
        assert manifest_problems(out / "int4") == []
    else:
        assert rc == 2 and len(lines) == 1 and lines[0].startswith("qexport: error: "), (rc, lines)
        assert not out.exists()


# --------------------------------------------------------------------------------------------------------------
# safetensors header


def header_mutations(names: list[str]):
    tensor = st.sampled_from(names)
    return st.one_of(
        st.tuples(st.just("dtype"), tensor, DTYPE_NAMES | JSON_VALUES),
        st.tuples(st.just("shape"), tensor, SMALL_SHAPES | JSON_VALUES),
        st.tuples(st.just("offsets"), tensor, st.tuples(st.integers(-600, 600), st.integers(-600, 600))),
        st.tuples(st.just("offsets_value"), tensor, JSON_VALUES),
        st.tuples(st.just("entry"), tensor | st.text(max_size=12), JSON_VALUES),
        st.tuples(st.just("delete"), tensor, st.none()),
        st.tuples(st.just("metadata"), st.none(), JSON_VALUES),
        st.tuples(st.just("length"), st.none(), st.integers(0, 2**64 - 1)),
        st.tuples(st.just("raw_header"), st.none(), st.binary(max_size=64)),
        st.tuples(st.just("resize"), st.none(), st.integers(-300, 300)),
    )


def apply_mutations(header: dict, data: bytes, mutations) -> bytes:
    """The safetensors file bytes after the mutations (header edits first, then byte-level ones)."""
    header = json.loads(json.dumps(header))
    for kind, name, value in mutations:
        if kind in ("dtype", "shape") and isinstance(header.get(name), dict):
            header[name][kind] = value
        elif kind == "offsets" and isinstance(header.get(name), dict):
            offsets = header[name].get("data_offsets")
            if isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets):
                header[name]["data_offsets"] = [offsets[0] + value[0], offsets[1] + value[1]]
        elif kind == "offsets_value" and isinstance(header.get(name), dict):
            header[name]["data_offsets"] = value
        elif kind == "entry":
            header[name] = value
        elif kind == "delete":
            header.pop(name, None)
        elif kind == "metadata":
            header["__metadata__"] = value
    text = json.dumps(header).encode()
    raw = bytearray(struct.pack("<Q", len(text)) + text + data)
    for kind, _, value in mutations:
        if kind == "length":
            raw[:8] = struct.pack("<Q", value)
        elif kind == "raw_header":
            raw = bytearray(struct.pack("<Q", len(value)) + value + data)
        elif kind == "resize":
            raw = raw[: len(raw) + value] if value < 0 else raw + bytes(value)
    return bytes(raw)


class RawFile(tuple):
    """(header dict, data bytes) of a safetensors file, with a short repr for hypothesis' failure reports."""

    def __repr__(self):
        return f"<safetensors file: {len(self[0])} header entries, {len(self[1])} data bytes>"


@pytest.fixture(scope="module")
def mini_header(mini_src):
    return RawFile(read_raw(mini_src / "model.safetensors"))


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow], deadline=None)
@given(data=st.data())
def test_any_safetensors_header_gives_an_export_or_exit_2(mini_src, mini_header, data):
    header, tensor_data = mini_header
    names = sorted(k for k in header if k != "__metadata__")
    mutations = data.draw(st.lists(header_mutations(names), min_size=1, max_size=3), label="mutations")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "model"
        src.mkdir()
        shutil.copyfile(mini_src / "config.json", src / "config.json")
        (src / "model.safetensors").write_bytes(apply_mutations(header, tensor_data, mutations))
        export_outcome(src, Path(tmp))


@pytest.mark.parametrize("poison", [False, True])
def test_float8_weights_export_or_name_their_nan(mini_src, tmp_path, poison, capsys):
    """Found while fuzzing: torch has no isfinite for float8_e4m3fn, so the NaN check raised a traceback."""
    from safetensors.torch import load_file, save_file

    name = "model.layers.0.mlp.down_proj.weight"
    src = tmp_path / "model"
    shutil.copytree(mini_src, src)
    tensors = load_file(src / "model.safetensors")
    w = tensors[name].to(torch.float8_e4m3fn)
    if poison:
        w.view(torch.uint8).view(-1)[3] = 0x7F  # the e4m3fn NaN bit pattern
    tensors[name] = w
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    rc = main(["export", str(src), "--out", str(tmp_path / "out"), "--formats", "int4", "--quiet"])
    err = capsys.readouterr().err
    if poison:
        assert rc == 2 and name in err and "NaN" in err, err
    else:
        assert rc == 0, err
        assert manifest_problems(tmp_path / "out" / "int4") == []


# Oracle: what read_header accepts, the safetensors library (which does the actual reading) accepts too; and what
# read_header refuses, the library refuses too, except where qexport is stricter on purpose. Those rules, each named
# by a phrase of its one-line error (qexport/io/safetensors_file.py):
STRICTER_THAN_THE_LIBRARY = {
    # a cap on tensors per file: a header of millions of tiny entries would take minutes to build and plan
    "above qexport's limit of": "MAX_TENSORS_PER_FILE",
    # torch cannot build a tensor of rank > 8 or with a dimension past 2**40, even empty ([0, 2**70] passes the byte
    # count); the library accepts both for zero-size tensors
    "or a dimension above 2**40": "MAX_DIMS / MAX_DIM",
    # dtypes the library reads that no qexport format reads or writes (sub-byte floats, F8_E8M0, complex, ...)
    "unknown dtype": "DTYPES",
}


def library_reads(path: Path) -> bool:
    """The safetensors library opens the file and reads every tensor in it."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                f.get_tensor(name)
    except Exception:  # the library's refusals are SafetensorError, its dtype gaps TypeError/ValueError
        return False
    return True


SYNTHETIC = {"a": {"dtype": "F16", "shape": [2, 3], "data_offsets": [0, 12]},
             "b": {"dtype": "I8", "shape": [4], "data_offsets": [12, 16]},
             "c": {"dtype": "F32", "shape": [0], "data_offsets": [16, 16]}}


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(mutations=st.lists(header_mutations(sorted(SYNTHETIC)), min_size=1, max_size=3))
@example(mutations=[("resize", None, 8)])  # trailing bytes: the library refuses them
@example(mutations=[("offsets", "c", (-4, -4))])  # an empty tensor inside another one: the library refuses it
def test_read_header_accepts_what_the_safetensors_library_accepts_bar_stricter_rules(mutations):
    from safetensors import safe_open

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.safetensors"
        path.write_bytes(apply_mutations(SYNTHETIC, bytes(range(16)), mutations))
        try:
            entries, _ = read_header(path)
        except InputError as e:
            # a reader that refuses more than the library does would pass the acceptance half on its own
            stricter = [rule for phrase, rule in STRICTER_THAN_THE_LIBRARY.items() if phrase in str(e)]
            assert stricter or not library_reads(path), f"the library reads it, qexport refuses: {e}"
            return
        with safe_open(str(path), framework="pt") as f:
            assert sorted(f.keys()) == sorted(entries)
            for name, entry in entries.items():
                assert list(f.get_tensor(name).shape) == list(entry.shape)


# --------------------------------------------------------------------------------------------------------------
# config.json


def config_mutations(keys: list[str]):
    key = st.sampled_from([*keys, "architectures", "tie_word_embeddings", "quantization_config", "torch_dtype",
                           "head_dim", "rope_scaling", "layer_types"]) | st.text(max_size=10)
    small = st.integers(-3, 300)  # bounded: a config asking for 10**9 layers is a different (size) problem
    value = small | JSON_VALUES | st.sampled_from(["qwen3", "llama", "bert", "Qwen3ForCausalLM", "BertModel"])
    return st.one_of(
        st.tuples(st.just("set"), key, value),
        st.tuples(st.just("delete"), key, st.none()),
        st.tuples(st.just("replace"), st.none(), JSON_VALUES),
        st.tuples(st.just("text"), st.none(), st.text(max_size=40)),
    )


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow], deadline=None)
@given(data=st.data())
def test_any_config_json_gives_an_export_or_exit_2(mini_src, data):
    config = json.loads((mini_src / "config.json").read_text())
    mutations = data.draw(st.lists(config_mutations(sorted(config)), min_size=1, max_size=3), label="mutations")
    text = None
    for kind, key, value in mutations:
        if kind == "set" and isinstance(config, dict):
            config[key] = value
        elif kind == "delete" and isinstance(config, dict):
            config.pop(key, None)
        elif kind == "replace":
            config = value
        elif kind == "text":
            text = value
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "model"
        src.mkdir()
        shutil.copyfile(mini_src / "model.safetensors", src / "model.safetensors")
        (src / "config.json").write_text(text if text is not None else json.dumps(config))
        export_outcome(src, Path(tmp))
