"""qexport/export/pipeline.py's planning and folder helpers as plain functions (no model build, no export; milliseconds):
which tensors are quantized, how they are sharded, what config.json says, where an export may be written."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from qexport.model.architecture import Architecture
from qexport.errors import InputError
from qexport.export.pipeline import ExportOptions, _assign_shards, _ignored, check_shapes, choose_group_size, \
    compute_dtype_of, dense_linears_warning, output_config, plan_format
from qexport.io.publish import TMP_MARK, OwnedFolder, check_destination, check_not_input, clean_stale, input_folders
from qexport.formats import get_format
from tests.support import fail_a_hang  # noqa: F401  (autouse: a hung test fails after 120 s)


@dataclass
class Entry:
    dtype: str
    shape: tuple
    file: Path = Path("src/model.safetensors")


@dataclass
class Source:
    entries: dict
    config: dict = field(default_factory=dict)
    folder: Path = Path("src")

    @property
    def names(self):
        return list(self.entries)


def arch(shapes: dict, linear=(), tied=(), ignored=()):
    return Architecture("TinyForCausalLM", shapes, frozenset(linear), frozenset(tied), True, tuple(ignored))


def test_ignore_patterns_match_a_module_or_its_trailing_name_parts():
    assert _ignored("lm_head", ["lm_head"]) and _ignored("model.layers.0.mlp.up_proj", ["mlp.up_proj"])
    assert not _ignored("model.layers.0.mlp.up_proj", ["up"])  # whole name parts only
    assert not _ignored("xlm_head", ["lm_head"]) and not _ignored("lm_head", [])


@pytest.mark.parametrize("shapes,group", [
    ([(8, 256), (8, 512)], 128),  # every input divides by the largest candidate
    ([(8, 576), (8, 1152)], 64),  # 576 = 9 x 64
    ([(8, 96)], 32),
    ([(100, 128), (1, 96), (1, 100)], 32),  # none covers all: the candidate quantizing the most weights
    ([(100, 128), (1, 64), (1, 100)], 64),  # 64 and 32 cover as much: the larger
    ([(1, 128), (100, 96)], 32),  # 96 divides by 32 only: 32 covers everything
])
def test_group_size_is_the_largest_dividing_every_input_else_the_one_covering_most_weights(shapes, group):
    assert choose_group_size(shapes, (128, 64, 32)) == group


def test_group_size_ties_go_to_the_larger_group():
    assert choose_group_size([(4, 100)], (128, 64, 32)) == 128  # covers nothing whichever: the largest


def test_group_size_is_the_largest_dividing_every_input_whatever_the_order_of_the_candidates():
    assert choose_group_size([(8, 256), (8, 512)], (32, 64, 128)) == 128
    assert choose_group_size([(8, 576)], (32, 128, 64)) == 64


def plans(sizes):
    from qexport.export.pipeline import TensorPlan

    return [TensorPlan(f"t{i}", False, [(f"t{i}", "U8", (n,))]) for i, n in enumerate(sizes)]


def test_a_single_shard_is_model_safetensors():
    ps = plans([10, 20, 30])
    assert _assign_shards(ps, 60) == ["model.safetensors"] and [p.shard for p in ps] == [0, 0, 0]


def test_shards_fill_greedily_in_source_order_and_an_oversized_tensor_gets_its_own():
    ps = plans([10, 20, 31, 100, 5])
    names = _assign_shards(ps, 60)
    assert [p.shard for p in ps] == [0, 0, 1, 2, 3]
    assert names == [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]


def test_a_shard_may_be_filled_exactly():
    ps = plans([30, 30, 1])
    _assign_shards(ps, 60)
    assert [p.shard for p in ps] == [0, 0, 1]


def test_output_config_keeps_every_source_key_and_sets_the_dtype_and_quantization_config():
    config = {"model_type": "qwen3", "torch_dtype": "bfloat16", "vocab_size": 7}
    out = output_config(config, get_format("int8"), ["b", "a", "b"])
    assert out["model_type"] == "qwen3" and out["vocab_size"] == 7
    assert out["dtype"] == out["torch_dtype"] == "float16"
    assert out["quantization_config"] == get_format("int8").quantization_config(["a", "b"])
    assert config == {"model_type": "qwen3", "torch_dtype": "bfloat16", "vocab_size": 7}  # not modified
    assert "torch_dtype" not in output_config({"model_type": "x"}, get_format("fp16"), [])
    assert "quantization_config" not in output_config({"model_type": "x"}, get_format("fp16"), [])


def test_output_config_of_original_keeps_the_source_dtype_and_sentence_transformers_get_dequantize():
    assert output_config({"dtype": "bfloat16"}, get_format("original"), []) == {"dtype": "bfloat16"}
    st = output_config({}, get_format("int4"), [], sentence_transformers=True)["quantization_config"]
    assert st == {**get_format("int4").quantization_config([]), "dequantize": True}


@pytest.mark.parametrize("config,dtypes,expected", [
    ({"dtype": "bfloat16"}, {"F32"}, "bfloat16"),
    ({"dtype": "float32"}, {"BF16"}, "float16"),  # the declared dtype decides
    ({}, {"BF16"}, "bfloat16"),  # undeclared: bf16 Linear weights keep bf16
    ({}, {"BF16", "F32"}, "float16"),
    ({}, set(), "float16"),
])
def test_compute_dtype_is_bf16_for_a_bf16_source_else_fp16(config, dtypes, expected):
    entries = {f"l{i}.weight": Entry(d, (2, 2)) for i, d in enumerate(sorted(dtypes))}
    entries["emb"] = Entry("F32", (4, 2))
    assert compute_dtype_of(Source(entries, config), list(entries)[:-1] + ["missing.weight"]) == expected


def test_dense_linears_warning_counts_per_reason_and_shows_the_first_few():
    dense = {f"m.{i}.weight": "odd" for i in range(5)} | {"x.weight": "2-D"}
    assert dense_linears_warning("int4", dense, shown=2) == (
        "int4: 6 Linear weight(s) stay dense; odd: 5 (m.0, m.1, ...); 2-D: 1 (x) (all listed in config.json's "
        "ignore and qexport.json's dense_linears)")
    assert dense_linears_warning("int4", {"a.weight": "r", "b.weight": "r"}, shown=2).count("...") == 0


def test_plan_quantizes_linear_weights_and_keeps_the_rest_dense_with_reasons():
    entries = {"emb": Entry("BF16", (16, 128)), "a.weight": Entry("BF16", (8, 128)), "b.weight": Entry("BF16", (8, 96)),
               "c.weight": Entry("I32", (8, 128)), "d.weight": Entry("BF16", (8, 128)),
               "lm_head.weight": Entry("BF16", (16, 128)), "tied.weight": Entry("BF16", (16, 128))}
    a = arch({n: e.shape for n, e in entries.items()}, linear=["a.weight", "b.weight", "c.weight", "d.weight",
                                                                "lm_head.weight", "tied.weight"], tied=["tied.weight"])
    plan = plan_format(Source(entries), a, get_format("int4", group_size=128), ExportOptions(formats=("int4",)),
                       nonfinite={"d.weight"})
    assert {t.source: t.quantize for t in plan.tensors} == {"emb": False, "a.weight": True, "b.weight": False,
                                                            "c.weight": False, "d.weight": False,
                                                            "lm_head.weight": False}
    assert plan.dense_linears == {"b.weight": "input size 96 does not divide by group size 128",
                                  "c.weight": "dtype I32 is not floating point",
                                  "d.weight": "holds NaN or Inf (kept dense because of --allow-nonfinite)"}
    assert plan.ignore == ["lm_head", "b", "c", "d"] and plan.shard_names == ["model.safetensors"]
    quantized = next(t for t in plan.tensors if t.source == "a.weight")
    assert quantized.stored == get_format("int4").stored("a.weight", "BF16", (8, 128), True)
    assert plan.shard_layout(0) == [s for t in plan.tensors for s in t.stored]
    dense = plan_format(Source(entries), a, get_format("fp16"), ExportOptions(formats=("fp16",)))
    assert not any(t.quantize for t in dense.tensors) and dense.dense_linears == {}


def test_check_shapes_refuses_a_missing_linear_a_stray_tensor_and_a_wrong_shape():
    entries = {"a.weight": Entry("F32", (2, 2)), "extra.rotary": Entry("F32", (3,))}
    ok = arch({"a.weight": (2, 2), "t.weight": (2, 2)}, linear=["a.weight", "t.weight"], tied=["t.weight"],
              ignored=[r"rotary$"])
    check_shapes(Source(entries), ok)
    with pytest.raises(InputError, match=r"^src: tensor 'b.weight' of TinyForCausalLM is missing from the checkpoint "
                                         r"\(2 Linear weights missing in all\)"):
        check_shapes(Source(entries), arch({"a.weight": (2, 2)}, linear=["a.weight", "b.weight", "c.weight"]))
    with pytest.raises(InputError, match=r"^src/model.safetensors: tensor 'extra.rotary' is not part of "
                                         r"TinyForCausalLM as config.json describes it"):
        check_shapes(Source(entries), arch({"a.weight": (2, 2)}))
    with pytest.raises(InputError, match=r"tensor 'a.weight' has shape \[2, 2\] but TinyForCausalLM expects \[2, 3\]"):
        check_shapes(Source(entries), arch({"a.weight": (2, 3)}, ignored=[r"rotary$"]))


def test_export_options_read_format_names_in_any_case_once_each():
    assert ExportOptions(formats=("INT4", "int4", "Fp16")).formats == ("int4", "fp16")
    with pytest.raises(InputError, match="--formats: unknown format 'q5'"):
        ExportOptions(formats=("q5",))


def test_output_inside_an_input_or_replacing_one_is_refused(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    check_not_input(tmp_path / "out", [tmp_path / "out" / "int4"], [src])
    with pytest.raises(InputError, match=rf"^--out {src}/sub: is inside the input {src}; qexport never writes"):
        check_not_input(src / "sub", [], [src])
    with pytest.raises(InputError, match=rf"^--out {src}: is inside the input"):
        check_not_input(src, [], [src])
    with pytest.raises(InputError, match=rf"replacing {tmp_path} would delete the input {src}"):
        check_not_input(tmp_path / "o", [tmp_path], [src])
    assert input_folders(Source({})) == [Path("src")]


def test_destination_must_be_a_writable_folder_without_the_formats_unless_overwriting(tmp_path):
    out = tmp_path / "out"
    check_destination(out / "deeper", ["int4"], overwrite=False)  # created later
    (out / "int4").mkdir(parents=True)
    with pytest.raises(InputError, match=rf"^--out {out}/int4: already exists \(pass --overwrite to replace it\)"):
        check_destination(out, ["fp16", "int4"], overwrite=False)
    check_destination(out, ["int4"], overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="exists and is not a folder"):
        check_destination(tmp_path / "file", ["int4"], overwrite=True)
    with pytest.raises(InputError, match=rf"{tmp_path}/file is not a folder"):
        check_destination(tmp_path / "file" / "out", ["int4"], overwrite=True)
    assert not [p for p in out.iterdir() if p.name.startswith(".qexport-probe")]  # the probe is removed


def test_clean_stale_removes_unlocked_temporaries_only(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    live = OwnedFolder(out / f".int4{TMP_MARK}live")
    dead = OwnedFolder(out / f".int8{TMP_MARK}dead")
    dead.release()
    dead.release()  # twice is harmless
    (out / f".fp16{TMP_MARK}old-1").write_text("moved aside")
    (out / f".fp16{TMP_MARK}keep").write_text("not an old- file")
    (out / "int4").mkdir()
    clean_stale(out)
    assert sorted(p.name for p in out.iterdir()) == sorted([f".int4{TMP_MARK}live", f".fp16{TMP_MARK}keep", "int4"])
    live.release()
    clean_stale(out)
    assert sorted(p.name for p in out.iterdir()) == sorted([f".fp16{TMP_MARK}keep", "int4"])
    clean_stale(tmp_path / "nothing")  # no folder: nothing to do
    assert os.path.isdir(out)


def test_quantizable_linears_are_the_stored_2d_linear_weights_not_tied_or_ignored():
    from qexport.export.pipeline import quantizable_linears

    entries = {"emb.weight": Entry("BF16", (16, 128)), "a.weight": Entry("BF16", (8, 128)),
               "b.weight": Entry("BF16", (8, 96)), "lm_head.weight": Entry("BF16", (16, 128)),
               "tied.weight": Entry("BF16", (16, 128)), "conv.weight": Entry("BF16", (8, 4, 2)),
               "norm.weight": Entry("BF16", (128,))}
    a = arch({n: e.shape for n, e in entries.items()},
             linear=["a.weight", "b.weight", "lm_head.weight", "tied.weight", "conv.weight"], tied=["tied.weight"])
    assert quantizable_linears(Source(entries), a, ["lm_head"]) == {"a.weight": (8, 128), "b.weight": (8, 96)}


def test_a_temporary_folder_is_stale_only_when_it_is_a_real_folder_whose_lock_is_free(tmp_path):
    from qexport.io.publish import is_stale

    free = OwnedFolder(tmp_path / "free")
    free.release()
    held = OwnedFolder(tmp_path / "held")
    (tmp_path / "link").symlink_to(tmp_path / "free")
    (tmp_path / "file").write_text("x")
    assert is_stale(tmp_path / "free") and not is_stale(tmp_path / "held")
    assert not is_stale(tmp_path / "link")  # never followed: what it points to is not the link's to judge
    assert not is_stale(tmp_path / "file") and not is_stale(tmp_path / "missing")
    held.release()


def test_in_background_runs_on_a_daemon_thread_and_hands_back_the_result_or_the_error():
    import threading

    from qexport.export.pipeline import in_background

    seen = {}

    def work():
        seen["thread"] = threading.current_thread()
        return 42

    assert in_background(work).result(timeout=300) == 42
    assert seen["thread"] is not threading.current_thread() and seen["thread"].daemon
    assert seen["thread"].name == "qexport-background"

    def fail():
        raise KeyboardInterrupt  # a BaseException too reaches whoever asks for the result

    with pytest.raises(KeyboardInterrupt):
        in_background(fail).result(timeout=300)


@pytest.mark.parametrize("values,dtype,finite", [
    ([1.0, -2.0], torch.bfloat16, True),
    ([1.0, float("nan")], torch.float16, False),
    ([1.0, float("inf")], torch.float32, False),
    ([float("-inf"), 1.0], torch.float32, False),
    ([1.0, float("nan")], torch.float8_e4m3fn, False),  # no aminmax kernel for float8: checked through float32
    ([1.0, 2.0], torch.float8_e5m2, True),
    ([], torch.float32, True),
    ([1, 2], torch.int32, True),
])
def test_all_finite_is_false_for_any_nan_or_inf(values, dtype, finite):
    from qexport.export.pipeline import all_finite

    assert all_finite(torch.tensor(values).to(dtype)) is finite


def test_deferred_computes_once_on_the_first_result_call_on_the_calling_thread():
    import threading

    from qexport.export.pipeline import Deferred

    calls = []
    deferred = Deferred(lambda: calls.append(threading.current_thread()) or len(calls))
    assert calls == []
    assert deferred.result() == 1 and deferred.result() == 1
    assert calls == [threading.current_thread()]

    def fail():
        calls.append("fail")
        raise ValueError("no")

    failing = Deferred(fail)
    for _ in range(2):
        with pytest.raises(ValueError, match="no"):
            failing.result()
    assert calls.count("fail") == 1


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_ordered_map_yields_in_order_with_at_most_workers_items_ahead(workers):
    import threading

    from qexport.export.pipeline import ordered_map

    started, lock = [], threading.Lock()

    def fn(i):
        with lock:
            started.append(i)
        return i * 10

    out = []
    for result in ordered_map(fn, list(range(7)), workers):
        out.append(result)
        assert len(started) <= len(out) + workers  # bounded memory: never more than `workers` computed ahead
    assert out == [i * 10 for i in range(7)]
    assert list(ordered_map(fn, [], workers)) == []


def test_dense_linears_warning_shows_three_names_per_reason_by_default():
    dense = {f"m.{i}.weight": "odd" for i in range(4)}
    assert "odd: 4 (m.0, m.1, m.2, ...)" in dense_linears_warning("int4", dense)


def test_a_stale_folder_or_file_removed_by_another_run_meanwhile_is_no_error(tmp_path, monkeypatch):
    import shutil

    import qexport.io.publish as publish
    from qexport.io.publish import remove_stale

    folder = tmp_path / f".int4{TMP_MARK}1"
    folder.mkdir()
    monkeypatch.setattr(publish, "is_stale", lambda p: shutil.rmtree(p) or True)  # gone once judged stale

    class Vanishing(type(tmp_path)):
        def is_file(self):  # removed by another run right after this look
            found = super().is_file()
            os.unlink(self)
            return found

    moved = tmp_path / f".int4{TMP_MARK}old-1"
    moved.write_text("x")
    remove_stale([folder, Vanishing(moved)])
    assert not folder.exists() and not moved.exists()


@dataclass
class MergedEntry:  # a tensor of a merged or averaged source: no single file holds it
    dtype: str
    shape: tuple


def test_shape_errors_name_the_file_holding_the_tensor_else_the_source_folder():
    wrong = arch({"a.weight": (2, 3)})
    with pytest.raises(InputError, match=r"^src/model.safetensors: tensor 'a.weight' has shape \[2, 2\] but "):
        check_shapes(Source({"a.weight": Entry("F32", (2, 2))}), wrong)
    with pytest.raises(InputError, match=r"^src: tensor 'a.weight' has shape \[2, 2\] but TinyForCausalLM"):
        check_shapes(Source({"a.weight": MergedEntry("F32", (2, 2))}), wrong)
    with pytest.raises(InputError, match=r"^src: tensor 'x' is not part of TinyForCausalLM"):
        check_shapes(Source({"x": MergedEntry("F32", (3,))}), arch({}))


def test_destination_is_probed_with_a_hidden_folder_in_itself_or_its_nearest_existing_parent(tmp_path, monkeypatch):
    import tempfile

    made = []
    real = tempfile.mkdtemp

    def record(*args, **kwargs):
        made.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(tempfile, "mkdtemp", record)
    (tmp_path / "out").mkdir()
    check_destination(tmp_path / "out", ["int4"], overwrite=False)
    check_destination(tmp_path / "new" / "deeper", ["int4"], overwrite=False)
    assert [m["dir"] for m in made] == [tmp_path / "out", tmp_path]
    assert all(m["prefix"] == f".qexport-probe-{os.getpid()}-" for m in made)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the probes are gone


def test_an_unwritable_destination_says_where_and_why(tmp_path, monkeypatch):
    import errno
    import tempfile

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    with pytest.raises(InputError) as refused:
        check_destination(tmp_path / "out", ["int4"], overwrite=False)
    assert str(refused.value) == f"--out {tmp_path / 'out'}: cannot create folders in {tmp_path} (Read-only file system)"


def test_a_failed_text_write_names_the_file_with_the_systems_reason(tmp_path, monkeypatch):
    import errno

    from qexport.export.pipeline import _write_text

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")  # as a full disk reports it: no file name

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(OSError) as error:
        _write_text(tmp_path / "config.json", "{}")
    e = error.value
    assert (e.errno, e.strerror, e.filename) == (errno.ENOSPC, "No space left on device", str(tmp_path / "config.json"))

    def bare(self, *args, **kwargs):
        raise OSError("disk went away")  # no errno, no strerror: the message itself is the reason

    monkeypatch.setattr(Path, "write_text", bare)
    with pytest.raises(OSError) as error:
        _write_text(tmp_path / "config.json", "{}")
    assert (error.value.strerror, error.value.filename) == ("disk went away", str(tmp_path / "config.json"))


def test_a_merged_source_protects_every_input_folder_not_only_its_first():
    @dataclass
    class Merged(Source):
        def input_folders(self):
            return [Path("a"), Path("b")]

    assert input_folders(Merged({})) == [Path("a"), Path("b")]


def test_an_owned_folder_creates_its_missing_parents(tmp_path):
    owned = OwnedFolder(tmp_path / "out" / ".int4.tmp")
    try:
        assert owned.path == tmp_path / "out" / ".int4.tmp" and owned.path.is_dir()
    finally:
        owned.release()


def test_a_finite_float64_tensor_beyond_float32s_range_is_finite():
    # all_finite must not judge a wide dtype through float32 (1e300 would become inf there).
    from qexport.export.pipeline import all_finite

    assert all_finite(torch.tensor([1e300, -1e300], dtype=torch.float64))
    assert not all_finite(torch.tensor([1.0, float("inf")], dtype=torch.float64))


def test_every_shard_may_be_filled_exactly_not_only_the_first():
    ps = plans([30, 30, 30, 30, 1])
    _assign_shards(ps, 60)
    assert [p.shard for p in ps] == [0, 0, 1, 1, 2]


@pytest.mark.parametrize("workers", [1, 2])
def test_ordered_map_maps_every_item_even_a_none_or_falsy_one(workers):
    from qexport.export.pipeline import ordered_map

    items = [1, None, 0, None, 2]
    assert list(ordered_map(lambda x: (x,), items, workers)) == [(x,) for x in items]
