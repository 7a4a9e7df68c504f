"""verify's runner and Context (qexport/verify/__init__.py, qexport/verify/context.py) on hand-written folders and
stand-in checks: no model built, exported or loaded (the transformers load, the tokenizer and the forward passes are
replaced by recording fakes where a test needs them; milliseconds a test). docs/design.md: a check that raises is a
failure naming the exception, never a crash; a NaN or an infinite metric beyond an enabled bound never passes; a
threshold that is not the format's default says so wherever the verdict is shown; verify never trusts its own
manifest more than the files, and loads one model at a time."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import qexport.verify as verify_module
from qexport.verify import functional
from qexport.errors import InputError
from qexport.verify.thresholds import Thresholds, thresholds_for
from qexport.verify import (
    CHECK_NAMES,
    CHECKS,
    CheckResult,
    Verification,
    _bound_kind,
    _nan_paths,
    _no_silent_pass,
    run_check,
    _thresholds_of,
    applies,
    record_in_card,
    run_checks,
    threshold_entries,
    threshold_text,
    verify,
)
from qexport.verify import context as context_module
from qexport.verify.context import (
    listing,
    detect_format,
    has_tokenizer,
    json_equal,
    open_tensors,
)
from tests.support import fail_a_hang  # noqa: F401  (autouse)
from tests.support.unit_verify import (
    CONFIG,
    DOWN,
    NORM,
    UP,
    config_with,
    context,
    int4_module,
    qc,
    reference_folder,
    reference_weights,
    write_folder,
)

ref = pytest.fixture(scope="module", name="ref")(reference_folder)


def int4_export(tmp_path, name="int4", **kwargs):
    w = reference_weights()
    tensors = {NORM: w[NORM].half()}
    for module in (DOWN, UP):
        tensors |= int4_module(module, w[f"{module}.weight"])[0]
    return write_folder(tmp_path / name, tensors, config_with(quantization_config=qc()), **kwargs)


def dense_export(tmp_path, name="dense", config=None, **kwargs):
    return write_folder(tmp_path / name, {k: v.half() for k, v in reference_weights().items()},
                        config_with() if config is None else config, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# CheckResult and the listing every detail uses


def test_check_result_status_is_skipped_passed_or_failed():
    assert CheckResult("a", True, "d").status == "passed"
    assert CheckResult("a", False, "d").status == "FAILED"
    assert CheckResult("a", True, "d", skipped=True).status == "skipped"
    assert CheckResult("a", False, "d", skipped=True).status == "skipped"


def test_check_result_as_dict_holds_every_field_a_report_shows():
    result = CheckResult("bytes", False, "too big", {"ratio": 2.0}, thresholds=[{"name": "x"}], seconds=0.5)
    assert result.as_dict() == {"name": "bytes", "status": "FAILED", "passed": False, "detail": "too big",
                                "metrics": {"ratio": 2.0}, "thresholds": [{"name": "x"}], "seconds": 0.5}


def test_a_new_check_result_has_no_metrics_thresholds_or_time_and_is_not_skipped():
    result = CheckResult("a", True, "d")
    assert (result.metrics, result.thresholds, result.seconds, result.skipped) == ({}, [], None, False)
    assert result.metrics is not CheckResult("b", True, "d").metrics  # no shared default


def test_ok_fail_and_skip_build_the_result_they_say():
    assert context_module.ok("a", "fine", x=1) == CheckResult("a", True, "fine", {"x": 1})
    assert context_module.fail("a", "broken", x=1) == CheckResult("a", False, "broken", {"x": 1})
    assert context_module.skip("a", "why") == CheckResult("a", True, "why", {}, skipped=True)


def test_listing_shows_four_items_then_counts_the_rest():
    assert listing(["a", "b", "c", "d"]) == "a, b, c, d"
    assert listing(["a", "b", "c", "d", "e", "f"]) == "a, b, c, d and 2 more"
    assert listing(iter([1, 2, 3]), 2) == "1, 2 and 1 more"
    assert listing([]) == ""


# ---------------------------------------------------------------------------------------------------------------
# json_equal


@pytest.mark.parametrize("a,b", [
    (float("nan"), float("nan")), (1, 1.0), ({"a": [1, {"b": float("nan")}]}, {"a": [1, {"b": float("nan")}]}),
    ([], []), ({}, {}), (None, None), (True, True), ("x", "x"),
])
def test_json_equal_values_are_equal(a, b):
    assert json_equal(a, b) and json_equal(b, a)


@pytest.mark.parametrize("a,b", [
    (float("nan"), 1.0), (1.0, float("nan")), (True, 1), (1, True), (False, 0), (True, False), (1, 2), (1.5, 1.0),
    ({"a": 1}, {"a": 1, "b": 2}), ({"a": 1}, {"b": 1}), ({"a": {"b": 1}}, {"a": {"b": 2}}), ([1, 2], [1, 2, 3]),
    ([1, 2], [2, 1]), ([1, [2]], [1, [3]]), ({"a": 1}, [("a", 1)]), ([1], (1,)), ("1", 1), (None, 0),
    ({"a": float("nan")}, {"a": 1.0}), ([1, 2, 3], [1, 2]),
])
def test_json_unequal_values_are_not_equal(a, b):
    assert not json_equal(a, b) and not json_equal(b, a)


# ---------------------------------------------------------------------------------------------------------------
# detect_format, has_tokenizer


def test_format_comes_from_the_config_groups_bits():
    assert detect_format(config_with(quantization_config=qc(4)), None) == "int4"
    assert detect_format(config_with(quantization_config=qc(8, strategy="channel")), None) == "int8"
    mixed = qc(8, strategy="channel")
    mixed["config_groups"]["group_1"] = {"targets": ["x"], "weights": {"num_bits": 4}}
    assert detect_format({"quantization_config": mixed}, None) == "int4"  # any 4-bit group makes it int4


def test_the_config_wins_over_the_manifest():
    assert detect_format(config_with(quantization_config=qc(8, strategy="channel")), {"format": "int4"}) == "int8"


@pytest.mark.parametrize("fmt", ["fp16", "int8", "int4"])
def test_the_manifest_names_the_format_when_the_config_says_nothing(fmt):
    assert detect_format(config_with(), {"format": fmt}) == fmt
    assert detect_format(None, {"format": fmt}) == fmt
    unreadable = {"quantization_config": {"config_groups": {"g": {"weights": {"num_bits": "4"}}}}}
    assert detect_format(unreadable, {"format": fmt}) == fmt


@pytest.mark.parametrize("config,manifest", [
    (None, None), ({}, {}), (config_with(), {"format": "int3"}), (config_with(), {"format": None}),
    ({"quantization_config": "int4"}, None), ({"quantization_config": {"config_groups": ["int4"]}}, None),
    ({"quantization_config": {"config_groups": {"g": "int4", "h": {"weights": [4]}}}}, None),
    ({"quantization_config": {"config_groups": {"g": {"weights": {"num_bits": 2}}}}}, None),
])
def test_anything_else_reads_as_fp16(config, manifest):
    assert detect_format(config, manifest) == "fp16"


def test_a_folder_has_a_tokenizer_with_tokenizer_json_or_tokenizer_config(tmp_path):
    assert not has_tokenizer(tmp_path)
    (tmp_path / "vocab.txt").write_text("x")
    assert not has_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").mkdir()  # a folder by that name is no tokenizer
    assert not has_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{}")
    assert has_tokenizer(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    (other / "tokenizer.json").write_text("{}")
    assert has_tokenizer(other)


# ---------------------------------------------------------------------------------------------------------------
# Context: opening the folders


def test_an_export_path_that_is_not_a_folder_is_bad_input(tmp_path, ref):
    (tmp_path / "file").write_text("x")
    for path in (tmp_path / "file", tmp_path / "missing"):
        with pytest.raises(InputError, match=f"^{path}: export is not a folder$"):
            context(path, ref)


def test_an_export_root_is_bad_input_naming_its_format_folders(tmp_path, ref):
    int4_export(tmp_path / "out")
    with pytest.raises(InputError, match=f"{tmp_path / 'out'}: not a model folder.*verify one format folder"):
        context(tmp_path / "out", ref)


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pth", ".ckpt", ".pkl"])
def test_pickle_weights_in_the_export_are_bad_input_naming_the_file(tmp_path, ref, suffix):
    folder = int4_export(tmp_path, files={f"b{suffix}": b"x", f"a{suffix}": b"x", "notes.txt": "x"})
    with pytest.raises(InputError, match=f"^{folder / ('a' + suffix)}: pickle weights in the export; verify never"):
        context(folder, ref)


def test_a_link_out_of_the_export_is_bad_input(tmp_path, ref):
    folder = int4_export(tmp_path)
    (tmp_path / "secret.txt").write_text("x")
    os.symlink(tmp_path / "secret.txt", folder / "notes.txt")
    with pytest.raises(InputError, match="notes.txt"):
        context(folder, ref)


@pytest.mark.parametrize("which", ["export", "reference"])
def test_a_link_to_nothing_is_bad_input_naming_the_link(tmp_path, which):
    reference = write_folder(tmp_path / "ref", reference_weights())
    export = int4_export(tmp_path)
    link = (export if which == "export" else reference) / "notes.txt"
    os.symlink(link.parent / "nowhere.txt", link)
    with pytest.raises(InputError, match=f"^{link}: symlink to {link.parent / 'nowhere.txt'}, which does not exist$"):
        context(export, reference)



def test_a_file_gone_between_listing_and_reading_is_bad_input_naming_it(tmp_path, monkeypatch):
    from qexport.io import safe_fs
    (tmp_path / "notes.txt").write_text("x")

    def gone(path, root=None):
        raise FileNotFoundError(2, "No such file or directory", str(path))

    monkeypatch.setattr(safe_fs, "check_regular", gone)
    with pytest.raises(InputError, match=f"^{tmp_path / 'notes.txt'}: disappeared while being read$"):
        safe_fs.walk_files(tmp_path, tmp_path)

def test_a_link_out_of_the_reference_is_bad_input(tmp_path, ref):
    reference = write_folder(tmp_path / "ref", reference_weights())
    (tmp_path / "secret.txt").write_text("x")
    os.symlink(tmp_path / "secret.txt", reference / "notes.txt")
    with pytest.raises(InputError, match="notes.txt"):
        context(int4_export(tmp_path), reference)


@pytest.mark.parametrize("which", ["export", "reference"])
def test_a_link_between_files_inside_a_folder_is_allowed(tmp_path, which):
    # the folder is the root links may point into, not the folder the link sits in
    reference = write_folder(tmp_path / "ref", reference_weights())
    export = int4_export(tmp_path)
    folder = export if which == "export" else reference
    (folder / "notes.txt").write_text("x")
    (folder / "sub").mkdir()
    os.symlink(folder / "notes.txt", folder / "sub" / "notes.txt")
    assert context(export, reference).format == "int4"


def test_a_reference_config_transformers_rejects_is_bad_input_naming_the_file(tmp_path):
    reference = write_folder(tmp_path / "ref", reference_weights(), config_with(vocab_size=None))
    with pytest.raises(InputError, match=f"^{reference / 'config.json'}: transformers rejects this qwen3 config"):
        context(int4_export(tmp_path), reference)


def test_a_quantized_reference_is_bad_input(tmp_path):
    reference = write_folder(tmp_path / "ref", reference_weights(), config_with(quantization_config=qc()))
    with pytest.raises(InputError, match=f"^{reference / 'config.json'}: --reference is itself quantized; pass "):
        context(int4_export(tmp_path), reference)


def test_an_untrusted_pattern_in_the_exports_config_is_bad_input(tmp_path, ref):
    config = qc()
    config["ignore"] = ["re:(a+)+$"]
    folder = write_folder(tmp_path / "e", {NORM: torch.zeros(32)}, config_with(quantization_config=config))
    with pytest.raises(InputError, match=f"{folder / 'config.json'}: quantization_config"):
        context(folder, ref)


def test_a_good_export_opens_with_its_config_manifest_and_tensors(tmp_path, ref):
    folder = int4_export(tmp_path, files={"qexport.json": json.dumps({"format": "int8"})})
    ctx = context(folder, ref)
    assert ctx.export == folder and ctx.reference.folder == ref
    assert ctx.config == config_with(quantization_config=qc()) and ctx.config_error is None
    assert ctx.manifest == {"format": "int8"} and ctx.manifest_error is None
    assert ctx.ckpt_error is None and set(ctx.ckpt.entries) == set(ctx.ckpt.entries) and len(ctx.ckpt.entries) == 7
    assert ctx.ckpt.config == ctx.config
    assert ctx.qc == qc() and ctx.format == "int4" and ctx.is_causal
    assert ctx.thresholds == thresholds_for("int4") == ctx.defaults
    assert ctx.load_errors == {} and ctx.input_kind is None and ctx.candidate is None and ctx.on_step is None


def test_no_manifest_is_no_error(tmp_path, ref):
    ctx = context(int4_export(tmp_path), ref)
    assert ctx.manifest is None and ctx.manifest_error is None


@pytest.mark.parametrize("content,error", [
    ("[1]", "qexport.json is not a JSON object"), ("{", "qexport.json is not valid JSON (Expecting property name"),
])
def test_an_unreadable_manifest_is_data_for_the_checks(tmp_path, ref, content, error):
    ctx = context(int4_export(tmp_path, files={"qexport.json": content}), ref)
    assert ctx.manifest is None and ctx.manifest_error.startswith(error)
    assert str(tmp_path) not in ctx.manifest_error  # the file's name, not the path


def test_a_long_json_error_is_one_line_of_at_most_300_characters(tmp_path):
    # a link out of the folder: the error names where it leads, a path longer than a report line
    far = tmp_path / ("deep  \n  " + "d" * 200) / ("e" * 200)
    far.mkdir(parents=True)
    (far / "config.json").write_text("{}")
    folder = tmp_path / "e"
    folder.mkdir()
    os.symlink(far / "config.json", folder / "config.json")
    value, error = context_module.read_json_object(folder / "config.json")
    assert value is None and len(error) == 300 and "\n" not in error and "  " not in error
    assert error.startswith(f"symlink leads outside {folder} (to {tmp_path}/deep ")


def test_a_missing_or_broken_config_is_data_for_the_checks(tmp_path, ref):
    folder = write_folder(tmp_path / "e", {NORM: torch.zeros(32)}, config=False)
    ctx = context(folder, ref)
    assert ctx.config is None and ctx.config_error == "config.json is missing"
    assert ctx.qc is None and ctx.format == "fp16" and ctx.ckpt_error is None
    (folder / "config.json").write_text("[]")
    ctx = context(folder, ref)
    assert ctx.config is None and ctx.config_error == "config.json is not a JSON object"


def test_a_dangling_config_link_is_reported_as_not_found_not_missing(tmp_path):
    folder = tmp_path / "e"
    folder.mkdir()
    os.symlink(folder / "nowhere.json", folder / "config.json")
    assert context_module.read_json_object(folder / "config.json") == (None, "config.json not found")
    assert context_module.read_json_object(folder / "other.json") == (None, "other.json is missing")


def test_the_format_falls_back_to_the_manifest(tmp_path, ref):
    ctx = context(dense_export(tmp_path, files={"qexport.json": json.dumps({"format": "int8"})}), ref)
    assert ctx.format == "int8" and ctx.thresholds == thresholds_for("int8") == ctx.defaults


def test_thresholds_given_as_overrides_or_as_thresholds(tmp_path, ref):
    folder = int4_export(tmp_path)
    ctx = context(folder, ref, {"min_top1": 0.5})
    assert ctx.thresholds == thresholds_for("int4", {"min_top1": 0.5}) and ctx.defaults == thresholds_for("int4")
    mine = Thresholds(min_sqnr_db=1.0)
    ctx = context(folder, ref, mine)
    assert ctx.thresholds is mine and ctx.defaults == thresholds_for("int4")


# ---------------------------------------------------------------------------------------------------------------
# open_tensors: the shards as the checks see them (any failure is ckpt_error, a failed `shards` check)


def sharded(tmp_path, index, **shards) -> Path:
    from safetensors.torch import save_file

    folder = tmp_path / "sharded"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(CONFIG))
    for name, tensors in shards.items():
        save_file(tensors, str(folder / f"{name}.safetensors"))
    if index is not None:
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


A = {"a": torch.zeros(2)}
B = {"b": torch.zeros(3)}


def test_sharded_tensors_open_with_their_files(tmp_path):
    index = {"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}, "metadata": {"total_size": 20}}
    ckpt = open_tensors(sharded(tmp_path, index, s1=A, s2=B), {"x": 1})
    assert set(ckpt.entries) == {"a", "b"} and ckpt.config == {"x": 1}
    assert ckpt.entries["b"].file.name == "s2.safetensors" and ckpt.folder == tmp_path / "sharded"
    assert ckpt.files == [tmp_path / "sharded" / "s1.safetensors", tmp_path / "sharded" / "s2.safetensors"]


@pytest.mark.parametrize("index,error", [
    ({"weight_map": {"a": "s1.safetensors", "x": "s2.safetensors"}},
     "s2.safetensors: tensor 'b' is not in model.safetensors.index.json under this shard (index says None)"),
    ({"weight_map": {"a": "s1.safetensors", "b": "s1.safetensors", "x": "s2.safetensors"}},
     ("s2.safetensors: tensor 'b' is not in model.safetensors.index.json under this shard (index says "
      "'s1.safetensors')")),
    ({"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors", "c": "s2.safetensors"}},
     "model.safetensors.index.json: tensor 'c' is not in shard 's2.safetensors'"),
    ({"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}, "metadata": {"total_size": 21}},
     "model.safetensors.index.json: metadata.total_size 21 but the shards hold 20 tensor bytes"),
])
def test_index_and_shards_must_agree_both_ways(tmp_path, index, error):
    with pytest.raises(InputError, match=f"^{error.replace('(', '.').replace(')', '.')}$"):
        open_tensors(sharded(tmp_path, index, s1=A, s2=B), {})


@pytest.mark.parametrize("metadata", [None, [], {}, {"total_size": "21"}, {"total_size": 20}])
def test_total_size_is_only_compared_when_it_is_a_number(tmp_path, metadata):
    index = {"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}} | (
        {"metadata": metadata} if metadata is not None else {})
    assert len(open_tensors(sharded(tmp_path, index, s1=A, s2=B), {}).entries) == 2


def test_a_tensor_in_two_shards_names_both(tmp_path):
    with pytest.raises(InputError, match="^s2.safetensors: tensor 'a' is also in s1.safetensors$"):
        open_tensors(sharded(tmp_path, {"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}, s1=A, s2=A | B), {})


def test_shards_without_tensors_are_refused(tmp_path):
    from safetensors.torch import save_file

    folder = sharded(tmp_path, None)
    save_file({}, str(folder / "model.safetensors"))
    with pytest.raises(InputError, match="^model.safetensors: holds no tensors$"):
        open_tensors(folder, {})


def test_broken_shards_are_a_ckpt_error_not_bad_input(tmp_path, ref):
    index = {"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}, "metadata": {"total_size": 1}}
    ctx = context(sharded(tmp_path, index, s1=A, s2=B), ref)
    assert ctx.ckpt is None and ctx.ckpt_error.startswith("model.safetensors.index.json: metadata.total_size 1")


# ---------------------------------------------------------------------------------------------------------------
# Context: lazy loading, one model at a time


class FakeLoads:
    """Stands in for functional.load_model: records each load and each release."""

    def __init__(self, monkeypatch, fail=()):
        self.calls, self.released, self.fail = [], 0, fail
        monkeypatch.setattr(functional, "load_model", self.load)
        monkeypatch.setattr(context_module, "release_memory", self.release)

    def load(self, folder, dtype):
        self.calls.append((Path(folder), dtype))
        if dtype in self.fail:
            raise self.fail[dtype]
        return (f"model-{dtype}", {"missing_keys": []})

    def release(self):
        self.released += 1


def test_load_loads_once_per_dtype_and_keeps_the_latest(tmp_path, ref, monkeypatch):
    loads = FakeLoads(monkeypatch)
    ctx = context(int4_export(tmp_path), ref)
    first = ctx.load(torch.float32)
    assert first == ("model-torch.float32", {"missing_keys": []})
    assert ctx.load(torch.float32) is first and loads.calls == [(ctx.export, torch.float32)]
    assert ctx.load(torch.float16) == ("model-torch.float16", {"missing_keys": []})
    assert loads.released == 2  # the float16 load dropped the float32 model first (and the first load released too)
    assert ctx.loaded == ("model-torch.float32", {"missing_keys": []})  # loads it again
    assert [dtype for _, dtype in loads.calls] == [torch.float32, torch.float16, torch.float32]


def test_unload_drops_the_model_and_the_next_load_loads_it_again(tmp_path, ref, monkeypatch):
    loads = FakeLoads(monkeypatch)
    ctx = context(int4_export(tmp_path), ref)
    ctx.reload()
    ctx.unload()
    assert loads.released == 2 and ctx._load is None
    ctx.reload()
    assert [dtype for _, dtype in loads.calls] == [torch.float32, torch.float32]


def test_a_failed_load_is_remembered_with_its_reason_and_not_retried(tmp_path, ref, monkeypatch):
    error = ValueError("no\n  such   " + "x" * 400)
    loads = FakeLoads(monkeypatch, fail={torch.float32: error})
    ctx = context(int4_export(tmp_path), ref)
    assert ctx.loaded is None and ctx.load(torch.float32) is None
    assert loads.calls == [(ctx.export, torch.float32)]
    assert ctx.load_error == "ValueError: " + ("no such " + "x" * 400)[:300]
    assert ctx.load_errors == {torch.float32: ctx.load_error}
    assert ctx.load(torch.float16) == ("model-torch.float16", {"missing_keys": []})


def test_a_failed_load_drops_the_previous_model(tmp_path, ref, monkeypatch):
    FakeLoads(monkeypatch, fail={torch.float16: OSError("x")})
    ctx = context(int4_export(tmp_path), ref)
    ctx.reload()
    assert ctx.load(torch.float16) is None and ctx._load is None and ctx.load_error is None


def test_user_load_loads_the_dtype_the_config_names(tmp_path, ref, monkeypatch):
    loads = FakeLoads(monkeypatch)
    ctx = context(int4_export(tmp_path), ref)
    assert ctx.config_dtype == torch.float16
    assert ctx.user_load() == ("model-torch.float16", {"missing_keys": []})
    assert loads.calls == [(ctx.export, torch.float16)]


def test_config_dtype_without_a_config_is_float32(tmp_path, ref):
    ctx = context(write_folder(tmp_path / "e", {NORM: torch.zeros(32)}, config=False), ref)
    assert ctx.config_dtype == torch.float32


def test_step_reports_to_on_step_when_someone_listens(tmp_path, ref):
    ctx = context(int4_export(tmp_path), ref)
    ctx.step(1, 2, "tensors")  # nobody listens: nothing happens
    heard = []
    ctx.on_step = lambda *args: heard.append(args)
    ctx.step(3, 4, "windows")
    assert heard == [(3, 4, "windows")]


def test_release_collects_the_freed_models_cycles(monkeypatch):
    import gc
    import weakref

    class Model:
        pass

    model = Model()
    model.me = model  # a reference cycle, as torch modules hold
    alive = weakref.ref(model)
    gc.disable()
    try:
        del model
        context_module.release_memory()
        assert alive() is None
    finally:
        gc.enable()


def test_release_hands_free_pages_back_to_glibc(monkeypatch):
    import ctypes
    import ctypes.util

    trims = []

    class Libc:
        def malloc_trim(self, pad):
            trims.append(pad)

    names = []
    monkeypatch.setattr(ctypes.util, "find_library", {"c": "libc.so.found"}.get)  # the C library's name, as found
    monkeypatch.setattr(ctypes, "CDLL", lambda name: names.append(name) or Libc())
    context_module.release_memory()
    assert trims == [0] and names == ["libc.so.found"]


def test_release_without_glibc_trims_nothing_and_does_not_fail(monkeypatch):
    import ctypes
    import ctypes.util

    def no_libc(name):
        raise OSError(name)

    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    names = []
    monkeypatch.setattr(ctypes, "CDLL", lambda name: names.append(name) or no_libc(name))
    context_module.release_memory()
    assert names == ["libc.so.6"]
    monkeypatch.setattr(ctypes, "CDLL", lambda name: SimpleNamespace())  # a libc without malloc_trim
    context_module.release_memory()


# ---------------------------------------------------------------------------------------------------------------
# Context: inputs and outputs (the tokenizer and the forward passes are fakes here)


class FakeFunctional:
    def __init__(self, monkeypatch):
        self.calls = []
        ids = torch.arange(12).reshape(3, 4)
        monkeypatch.setattr(functional, "text_windows", lambda folder: self.calls.append(("text", folder)) or ids)
        monkeypatch.setattr(functional, "encode_sentences", lambda folder: self.calls.append(("sentences", folder))
                            or {"input_ids": ids, "attention_mask": torch.zeros_like(ids)})
        monkeypatch.setattr(functional, "fixed_token_ids",
                            lambda vocab: self.calls.append(("random", vocab)) or ids + vocab)
        monkeypatch.setattr(functional, "window_logits", self.window_logits)
        monkeypatch.setattr(functional, "pooled_embeddings", lambda model, inputs: ("pooled", model, inputs))

    def window_logits(self, model, ids, step, threads=1):
        step(1, 2)
        return ("logits", model, ids)


def test_a_causal_reference_with_a_tokenizer_gets_text_windows(tmp_path, monkeypatch):
    fake = FakeFunctional(monkeypatch)
    reference = write_folder(tmp_path / "ref", reference_weights(), files={"tokenizer.json": "{}"})
    ctx = context(int4_export(tmp_path), reference)
    inputs = ctx.inputs()
    assert ctx.input_kind == "text" and fake.calls == [("text", reference)]
    assert torch.equal(inputs["input_ids"], torch.arange(12).reshape(3, 4))
    assert torch.equal(inputs["attention_mask"], torch.ones(3, 4, dtype=torch.long))
    assert ctx.inputs() is inputs and len(fake.calls) == 1  # once


def test_an_encoder_reference_with_a_tokenizer_gets_sentences(tmp_path, monkeypatch):
    fake = FakeFunctional(monkeypatch)
    reference = write_folder(tmp_path / "ref", reference_weights(), files={"tokenizer_config.json": "{}"})
    ctx = context(int4_export(tmp_path), reference)
    ctx.arch = SimpleNamespace(is_causal_lm=False)
    inputs = ctx.inputs()
    assert ctx.input_kind == "sentences" and fake.calls == [("sentences", reference)]
    assert torch.equal(inputs["attention_mask"], torch.zeros(3, 4, dtype=torch.long))  # the tokenizer's own mask
    assert ctx.inputs() is inputs and len(fake.calls) == 1


@pytest.mark.parametrize("causal", [True, False])
def test_a_reference_without_a_tokenizer_gets_random_ids_over_its_vocabulary(tmp_path, ref, monkeypatch, causal):
    fake = FakeFunctional(monkeypatch)
    ctx = context(int4_export(tmp_path), ref)
    ctx.arch = SimpleNamespace(is_causal_lm=causal)
    inputs = ctx.inputs()
    assert ctx.input_kind == "random" and fake.calls == [("random", 64)]
    assert torch.equal(inputs["input_ids"], torch.arange(12).reshape(3, 4) + 64)
    assert torch.equal(inputs["attention_mask"], torch.ones(3, 4, dtype=torch.long))
    assert ctx.inputs() is inputs and len(fake.calls) == 1


def test_random_ids_without_a_vocab_size_use_1000(tmp_path, monkeypatch):
    fake = FakeFunctional(monkeypatch)
    reference = write_folder(tmp_path / "ref", reference_weights(), config_with(vocab_size=...))
    ctx = context(int4_export(tmp_path), reference)
    ctx.inputs()
    assert fake.calls == [("random", 1000)]


def test_outputs_of_a_causal_lm_are_window_logits_of_the_first_windows(tmp_path, ref, monkeypatch):
    FakeFunctional(monkeypatch)
    ctx = context(int4_export(tmp_path), ref)
    heard = []
    ctx.on_step = lambda *args: heard.append(args)
    kind, model, ids = ctx.outputs("m", windows=2)
    assert (kind, model) == ("logits", "m") and torch.equal(ids, ctx.inputs()["input_ids"][:2])
    assert heard == [(1, 2, "windows through the export")]  # a fake model: no parameters, no dtype
    assert torch.equal(ctx.outputs("m")[2], ctx.inputs()["input_ids"])


def test_outputs_of_an_encoder_are_pooled_embeddings(tmp_path, ref, monkeypatch):
    FakeFunctional(monkeypatch)
    ctx = context(int4_export(tmp_path), ref)
    ctx.arch = SimpleNamespace(is_causal_lm=False)
    kind, model, inputs = ctx.outputs("m", windows=1)
    assert (kind, model, set(inputs)) == ("pooled", "m", {"input_ids", "attention_mask"})
    assert torch.equal(inputs["input_ids"], ctx.inputs()["input_ids"][:1])
    assert torch.equal(inputs["attention_mask"], ctx.inputs()["attention_mask"][:1])


def test_reference_outputs_are_computed_once_per_reference_after_unloading_the_export(tmp_path, monkeypatch):
    FakeFunctional(monkeypatch)
    loads = FakeLoads(monkeypatch)
    built = []
    monkeypatch.setattr(functional, "load_streamed", lambda folder: built.append(folder) or f"ref-{folder.name}")
    monkeypatch.setattr(context_module, "_REFERENCE_OUTPUTS", {})
    reference = write_folder(tmp_path / "r1", reference_weights())
    ctx = context(int4_export(tmp_path), reference)
    ctx.reload()
    out = ctx.reference_outputs()
    assert out[:2] == ("logits", "ref-r1") and ctx._load is None and built == [reference]
    assert ctx.reference_outputs() is out and built == [reference]
    assert context(int4_export(tmp_path, "again"), reference).reference_outputs() is out  # same reference folder
    other = write_folder(tmp_path / "r2", reference_weights())
    assert context(int4_export(tmp_path, "other"), other).reference_outputs()[1] == "ref-r2"
    assert len(context_module._REFERENCE_OUTPUTS) == 1  # one reference at a time
    (reference / "config.json").write_text((reference / "config.json").read_text() + " ")
    os.utime(reference / "config.json", ns=(1, 1))
    assert ctx.reference_outputs() is not out and built == [reference, other, reference]  # a changed config
    assert loads.released >= 2


def test_reference_outputs_of_another_folder_are_its_own_even_with_the_same_config_time(tmp_path, monkeypatch):
    FakeFunctional(monkeypatch)
    FakeLoads(monkeypatch)
    monkeypatch.setattr(functional, "load_streamed", lambda folder: f"ref-{folder.name}")
    monkeypatch.setattr(context_module, "_REFERENCE_OUTPUTS", {})
    first, second = (write_folder(tmp_path / name, reference_weights()) for name in ("r1", "r2"))
    for folder in (first, second):
        os.utime(folder / "config.json", ns=(10**18, 10**18))
    assert context(int4_export(tmp_path), first).reference_outputs()[1] == "ref-r1"
    assert context(int4_export(tmp_path, "again"), second).reference_outputs()[1] == "ref-r2"


def test_the_tokenizer_runs_before_the_reference_model_is_loaded(tmp_path, ref, monkeypatch):
    fake = FakeFunctional(monkeypatch)
    FakeLoads(monkeypatch)
    monkeypatch.setattr(functional, "load_streamed", lambda folder: fake.calls.append(("model", folder)) or "ref")
    monkeypatch.setattr(context_module, "_REFERENCE_OUTPUTS", {})
    context(int4_export(tmp_path), ref).reference_outputs()
    assert fake.calls == [("random", 64), ("model", ref)]


def test_rtn_outputs_are_computed_once_per_reference_scheme_and_dtype(tmp_path, monkeypatch):
    from qexport.verify import reference_quant

    FakeFunctional(monkeypatch)
    FakeLoads(monkeypatch)
    built = []
    monkeypatch.setattr(reference_quant, "rtn_model",
                        lambda folder, scheme, dtype: built.append((folder, json.dumps(scheme), dtype)) or "rtn")
    monkeypatch.setattr(context_module, "_RTN_OUTPUTS", {})
    reference = write_folder(tmp_path / "r1", reference_weights())
    ctx = context(int4_export(tmp_path), reference)
    ctx.reload()
    out = ctx.rtn_outputs()
    assert out[:2] == ("logits", "rtn") and ctx._load is None and ctx.input_kind == "random"
    assert built == [(reference, json.dumps(qc()), torch.float32)]
    assert ctx.rtn_outputs() is out and len(built) == 1
    assert ctx.rtn_outputs(torch.float16) is not out and built[-1][2] == torch.float16
    assert len(context_module._RTN_OUTPUTS) == 1  # one at a time
    ctx.qc = qc(8, strategy="channel")
    ctx.rtn_outputs(torch.float16)
    assert len(built) == 3 and built[-1][1] == json.dumps(ctx.qc)


def test_rtn_outputs_of_the_same_scheme_written_in_another_key_order_are_reused(tmp_path, ref, monkeypatch):
    from qexport.verify import reference_quant

    FakeFunctional(monkeypatch)
    FakeLoads(monkeypatch)
    built = []
    monkeypatch.setattr(reference_quant, "rtn_model", lambda folder, scheme, dtype: built.append(scheme) or "rtn")
    monkeypatch.setattr(context_module, "_RTN_OUTPUTS", {})
    ctx = context(int4_export(tmp_path), ref)
    out = ctx.rtn_outputs()
    ctx.qc = dict(reversed(list(qc().items())))
    assert ctx.rtn_outputs() is out and len(built) == 1


def test_rtn_outputs_of_another_folder_are_its_own_even_with_the_same_config_time(tmp_path, monkeypatch):
    from qexport.verify import reference_quant

    FakeFunctional(monkeypatch)
    FakeLoads(monkeypatch)
    monkeypatch.setattr(reference_quant, "rtn_model", lambda folder, scheme, dtype: f"rtn-{folder.name}")
    monkeypatch.setattr(context_module, "_RTN_OUTPUTS", {})
    first, second = (write_folder(tmp_path / name, reference_weights()) for name in ("r1", "r2"))
    for folder in (first, second):
        os.utime(folder / "config.json", ns=(10**18, 10**18))
    assert context(int4_export(tmp_path), first).rtn_outputs()[1] == "rtn-r1"
    assert context(int4_export(tmp_path, "again"), second).rtn_outputs()[1] == "rtn-r2"


def test_dequantized_model_is_built_from_our_float32_dequantization(tmp_path, ref, monkeypatch):
    loads = FakeLoads(monkeypatch)
    seen = {}

    def model_from_tensors(config, tensors):
        seen.update(dict(tensors()))
        return ("model", config)

    monkeypatch.setattr(functional, "model_from_tensors", model_from_tensors)
    ctx = context(int4_export(tmp_path), ref)
    ctx.reload()
    heard = []
    ctx.on_step = lambda *args: heard.append(args)
    assert ctx.dequantized_model() == ("model", ctx.reference.config) and ctx._load is None and loads.released == 2
    assert set(seen) == {NORM, f"{DOWN}.weight", f"{UP}.weight"}
    assert all(t.dtype == torch.float32 for t in seen.values())
    w_hat = int4_module(DOWN, reference_weights()[f"{DOWN}.weight"])[1]
    assert torch.equal(seen[f"{DOWN}.weight"], w_hat)
    unit = "tensors of the export dequantized (float32)"
    assert heard == [(1, 3, unit), (2, 3, unit), (3, 3, unit)]


def test_dequantized_model_follows_transformers_dequantize_route_in_the_config_dtype(tmp_path, ref, monkeypatch):
    # dequantize=True: transformers multiplies codes and scales in the scale dtype (fp16 here) and casts after
    from qexport.quant import dequant
    FakeLoads(monkeypatch)
    dtypes = []
    real = dequant.iter_dequantized
    monkeypatch.setattr(dequant, "iter_dequantized", lambda ckpt, dtype: dtypes.append(dtype) or real(ckpt, dtype))
    monkeypatch.setattr(functional, "model_from_tensors", lambda config, tensors: dict(tensors()))
    ctx = context(int4_export(tmp_path), ref)
    ctx.qc = {**ctx.qc, "dequantize": True}
    seen = ctx.dequantized_model()
    assert dtypes == [torch.float16] and all(t.dtype == torch.float32 for t in seen.values())
    ctx.qc = "not a dict"
    ctx.dequantized_model()
    assert dtypes[-1] == torch.float32


def test_dequantized_model_keeps_integer_tensors_as_they_are(tmp_path, ref, monkeypatch):
    FakeLoads(monkeypatch)
    monkeypatch.setattr(functional, "model_from_tensors", lambda config, tensors: dict(tensors()))
    folder = write_folder(tmp_path / "e", {NORM: torch.zeros(32), "counter": torch.tensor([3])})
    seen = context(folder, ref).dequantized_model()
    assert seen["counter"].dtype == torch.int64 and seen[NORM].dtype == torch.float32


# ---------------------------------------------------------------------------------------------------------------
# run_check: a check that raises is a failure naming the exception


def ctx_stub(fmt="int4", causal=True, **overrides):
    return SimpleNamespace(thresholds=thresholds_for(fmt, overrides or None), defaults=thresholds_for(fmt),
                           is_causal=causal)


def raises(ctx):
    raise ValueError("weight_scale\n   of   down_proj " + "y" * 400)


def test_a_check_that_raises_fails_naming_the_exception_and_where():
    result = run_check(raises, "layout", ctx_stub())
    line = raises.__code__.co_firstlineno + 1
    message = ("weight_scale of down_proj " + "y" * 400)[:300]
    assert (result.name, result.passed, result.metrics) == ("layout", False, {})
    assert result.detail == f"check raised ValueError: {message} (test_runner.py:{line})"


def test_a_check_that_raises_deeper_down_is_placed_where_it_raised():
    def check(ctx):
        return raises(ctx)

    line = raises.__code__.co_firstlineno + 1
    assert run_check(check, "layout", ctx_stub()).detail.endswith(f"(test_runner.py:{line})")


def test_a_check_that_raises_a_non_exception_error_still_propagates():
    def interrupted(ctx):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_check(interrupted, "layout", ctx_stub())


def test_the_runner_attaches_the_thresholds_the_check_compared_against():
    result = run_check(lambda ctx: CheckResult("weights_sqnr", True, "ok"), "weights_sqnr",
                      ctx_stub("int8", min_sqnr_db=10.0))
    assert [(e["name"], e["status"]) for e in result.thresholds] == [("min_sqnr_db", "loosened"),
                                                                      ("dense_min_sqnr_db", "default")]
    assert run_check(raises, "layout", ctx_stub()).thresholds == []


def test_the_runner_never_lets_a_nan_metric_pass():
    result = run_check(lambda ctx: CheckResult("functional", True, "ok", {"kld_mean": math.nan}), "functional",
                      ctx_stub("int8"))
    assert not result.passed and result.detail == "non-finite metric: kld_mean is NaN; ok"


def test_the_runner_never_lets_an_infinite_metric_beyond_its_bound_pass():
    result = run_check(lambda ctx: CheckResult("functional", True, "ok", {"kld_mean": math.inf}), "functional",
                      ctx_stub("int8"))
    assert not result.passed and result.detail == "non-finite metric: kld_mean is inf (bound max_kld_mean 0.01); ok"


def test_functional_thresholds_are_kld_and_top1_for_causal_lms_cosine_for_encoders():
    causal, encoder = ctx_stub(causal=True), ctx_stub(causal=False)
    assert _thresholds_of("functional", causal) == ("max_kld_mean", "max_kld_p99", "min_top1")
    assert _thresholds_of("functional", encoder) == ("min_cosine",)
    assert _thresholds_of("functional_vs_rtn", causal) == ("max_kld_vs_rtn", "kld_vs_rtn_slack",
                                                           "max_top1_drop_vs_rtn")
    assert _thresholds_of("functional_vs_rtn", encoder) == ("max_cosine_gap_vs_rtn", "cosine_vs_rtn_slack")
    assert _thresholds_of("bytes", encoder) == ("min_quantized_ratio",)
    assert _thresholds_of("reload_matches_dequant", causal) == ("reload_max_abs_diff",)
    assert _thresholds_of("layout", causal) == ()


# ---------------------------------------------------------------------------------------------------------------
# _no_silent_pass


def test_nan_paths_name_every_nan_inside_dicts_lists_and_tuples():
    value = {"a": [1.0, math.nan, {"b": math.nan}], "c": (math.nan,), "d": 2, "e": "nan", "f": None}
    assert list(_nan_paths(value, "m")) == ["m.a[1]", "m.a[2].b", "m.c[0]"]
    assert list(_nan_paths(math.nan, "x")) == ["x"] and list(_nan_paths(1.0, "x")) == []


def test_a_check_with_a_nan_metric_is_failed_not_just_falsy():
    result = _no_silent_pass(CheckResult("f", True, "ok", {"x": math.nan}), thresholds_for("int8"))
    assert result.passed is False and result.as_dict()["status"] == "FAILED"


def test_a_failed_check_gets_its_nans_named_too():
    result = _no_silent_pass(CheckResult("f", False, "broke", {"x": math.nan, "y": [math.nan]}), thresholds_for("int8"))
    assert not result.passed and result.detail == "non-finite metric: x is NaN, y[0] is NaN; broke"


def test_a_skipped_check_is_left_as_it_is():
    result = CheckResult("f", True, "why", {"kld_mean": math.nan}, skipped=True)
    assert _no_silent_pass(result, thresholds_for("int8")) == CheckResult("f", True, "why", {"kld_mean": math.nan},
                                                                          skipped=True)


def test_a_finite_check_is_left_as_it_is():
    metrics = {"kld_mean": 0.001, "top1": 1.0, "sqnr_min_db": 40.0, "note": "text", "n": 3}
    result = _no_silent_pass(CheckResult("functional", True, "ok", dict(metrics)), thresholds_for("int8"))
    assert result == CheckResult("functional", True, "ok", metrics)


@pytest.mark.parametrize("key,value,bound", [
    ("kld_mean", math.inf, "max_kld_mean 0.01"), ("kld_p99", math.inf, "max_kld_p99 0.1"),
    ("top1", -math.inf, "min_top1 0.9"), ("sqnr_min_db", -math.inf, "min_sqnr_db 30"),
    ("dense_sqnr_min_db", -math.inf, "dense_min_sqnr_db 60"),
    ("reload_vs_dequant_max_abs", math.inf, "reload_max_abs_diff 0.0001"),
])
def test_an_infinite_metric_beyond_its_enabled_bound_fails_naming_the_bound(key, value, bound):
    result = _no_silent_pass(CheckResult("c", True, "ok", {key: value}), thresholds_for("int8"))
    assert not result.passed and result.detail == f"non-finite metric: {key} is {value} (bound {bound}); ok"


def test_infinite_cosine_and_ratio_are_judged_by_their_lower_bounds():
    thresholds = Thresholds(min_cosine=0.9, min_quantized_ratio=3.0)
    low = _no_silent_pass(CheckResult("c", True, "ok", {"cosine": -math.inf, "quantized_ratio": -math.inf}),
                          thresholds)
    assert low.detail == ("non-finite metric: cosine is -inf (bound min_cosine 0.9), quantized_ratio is -inf "
                          "(bound min_quantized_ratio 3); ok")
    high = _no_silent_pass(CheckResult("c", True, "ok", {"cosine": math.inf, "quantized_ratio": math.inf}),
                           thresholds)
    assert high.passed


@pytest.mark.parametrize("key,value", [("sqnr_min_db", math.inf), ("dense_sqnr_min_db", math.inf),
                                       ("top1", math.inf), ("kld_mean", -math.inf)])
def test_an_infinite_metric_on_the_right_side_of_its_bound_passes(key, value):
    assert _no_silent_pass(CheckResult("c", True, "ok", {key: value}), thresholds_for("int8")).passed


def test_an_infinite_metric_with_its_bound_disabled_passes():
    # the user turned that bound off; the report says so next to the verdict (threshold_text: disabled)
    thresholds = thresholds_for("int8", {"max_kld_mean": None})
    assert _no_silent_pass(CheckResult("c", True, "ok", {"kld_mean": math.inf}), thresholds).passed


def test_bound_kind_reads_min_and_max_from_the_name():
    assert _bound_kind("min_top1") == "min" and _bound_kind("dense_min_sqnr_db") == "min"
    assert _bound_kind("max_kld_mean") == "max" and _bound_kind("reload_max_abs_diff") == "max"
    assert _bound_kind("kld_vs_rtn_slack") is None and _bound_kind("minimal") is None


# ---------------------------------------------------------------------------------------------------------------
# threshold_entries / threshold_text


def entry(entries, name):
    return next(e for e in entries if e["name"] == name)


def test_every_threshold_is_listed_with_its_value_default_and_status():
    defaults = thresholds_for("int8")
    entries = threshold_entries(defaults, defaults)
    assert [e["name"] for e in entries] == list(Thresholds.__dataclass_fields__)
    assert entry(entries, "min_top1") == {"name": "min_top1", "value": 0.9, "default": 0.9, "status": "default",
                                          "text": "min_top1 0.9"}


@pytest.mark.parametrize("name,value,status,text", [
    ("min_top1", 0.95, "tightened", "min_top1 0.95: tightened (default 0.9)"),
    ("min_top1", 0.5, "loosened", "min_top1 0.5: loosened (default 0.9)"),
    ("max_kld_mean", 0.001, "tightened", "max_kld_mean 0.001: tightened (default 0.01)"),
    ("max_kld_mean", 0.05, "loosened", "max_kld_mean 0.05: loosened (default 0.01)"),
    ("min_top1", None, "disabled", "min_top1: disabled (default 0.9)"),
    ("min_quantized_ratio", 1.5, "enabled", "min_quantized_ratio 1.5: enabled (default none)"),
    ("kld_vs_rtn_slack", 1e-3, "changed", "kld_vs_rtn_slack 0.001: changed (default 1e-06)"),
])
def test_a_changed_threshold_says_how_it_changed(name, value, status, text):
    defaults = thresholds_for("int8")
    (got,) = threshold_entries(thresholds_for("int8", {name: value}), defaults, [name])
    assert got == {"name": name, "value": value, "default": getattr(defaults, name), "status": status, "text": text}


def test_a_bound_that_is_off_by_default_reads_none():
    (got,) = threshold_entries(thresholds_for("int4"), thresholds_for("int4"), ["min_top1"])
    assert got["status"] == "default" and got["text"] == "min_top1: none (default)"


def test_threshold_text_for_a_change_without_a_default_value():
    assert threshold_text("x_max", 2.0, None, "enabled") == "x_max 2: enabled (default none)"
    assert threshold_text("x_max", None, None, "changed") == "x_max none: changed (default none)"


# ---------------------------------------------------------------------------------------------------------------
# Verification


def verification(*checks, thresholds=None, defaults=None):
    return Verification(Path("e"), Path("r"), "int8", thresholds or thresholds_for("int8"), list(checks), defaults)


def test_a_verification_passes_only_when_every_check_passes():
    good, bad = CheckResult("a", True, "ok"), CheckResult("b", False, "no")
    assert verification(good, CheckResult("c", True, "x", skipped=True)).passed
    assert not verification(good, bad).passed and verification(good, bad).failures == [bad]
    assert verification().passed and verification().failures == []
    result = verification(good)
    result.add(bad)
    assert result.checks == [good, bad] and not result.passed


def test_headline_metrics_take_each_summary_key_from_the_first_check_holding_it():
    result = verification(CheckResult("a", True, "", {"kld_mean": 0.1, "private": 1}),
                          CheckResult("b", True, "", {"kld_mean": 0.2, "top1": 0.9}))
    assert result.metrics == {"format": "int8", "kld_mean": 0.1, "top1": 0.9}


def test_thresholds_changed_lists_only_those_that_are_not_the_default():
    result = verification(thresholds=thresholds_for("int8", {"min_top1": None, "max_kld_mean": 0.05}),
                          defaults=thresholds_for("int8"))
    assert result.thresholds_changed == ["max_kld_mean 0.05: loosened (default 0.01)",
                                         "min_top1: disabled (default 0.9)"]
    assert verification(thresholds=thresholds_for("int8", {"min_top1": None})).thresholds_changed == []  # no defaults


def test_as_dict_is_the_json_report():
    check = CheckResult("a", True, "ok", {"top1": 0.95})
    thresholds = thresholds_for("int8", {"min_top1": 0.5})
    data = verification(check, thresholds=thresholds, defaults=thresholds_for("int8")).as_dict()
    assert data["export"] == "e" and data["reference"] == "r" and data["format"] == "int8" and data["passed"]
    assert data["metrics"] == {"format": "int8", "top1": 0.95} and data["checks"] == [check.as_dict()]
    assert data["thresholds"]["min_top1"] == 0.5 and data["threshold_defaults"]["min_top1"] == 0.9
    assert data["thresholds_changed"] == ["min_top1 0.5: loosened (default 0.9)"]
    assert entry(data["threshold_entries"], "min_top1")["status"] == "loosened"
    assert verification(thresholds=thresholds).as_dict()["threshold_defaults"]["min_top1"] == 0.5
    json.dumps(data)


# ---------------------------------------------------------------------------------------------------------------
# Which checks run


def test_sentence_transformers_check_applies_only_to_its_own_folders(tmp_path):
    st, plain = tmp_path / "st", tmp_path / "plain"
    st.mkdir(), plain.mkdir()
    (st / "modules.json").write_text("[]")
    (plain / "modules.json").mkdir()
    assert applies("engine_sentence_transformers", plain, st) and applies("engine_sentence_transformers", st, plain)
    assert not applies("engine_sentence_transformers", plain, plain)
    assert not applies("engine_sentence_transformers", str(plain))
    assert applies("layout", plain, plain)


def test_every_check_has_a_name_and_every_named_threshold_exists():
    assert len(CHECKS) == len(CHECK_NAMES) == len(set(CHECK_NAMES))
    fields = set(Thresholds.__dataclass_fields__)
    for names in verify_module.CHECK_THRESHOLDS.values():
        assert set(names) <= fields
    assert set(verify_module.METRIC_BOUNDS.values()) <= fields


class Recorder:
    """A progress callback with steps, recording what verify() reports."""

    def __init__(self):
        self.events = []

    def __call__(self, name, index, total, elapsed, result):
        assert elapsed >= 0
        self.events.append((name, index, total, None if result is None else result.name))

    def step(self, name, done, total, unit, elapsed):
        self.events.append((name, "step", done, total, unit))


def fake_checks(monkeypatch, names=("model_type", "layout", "engine_sentence_transformers")):
    def make(name):
        def check(ctx):
            ctx.step(1, 2, "tensors")
            return CheckResult(name, name != "layout", f"{name} ran", {"top1": 0.5} if name == "layout" else {})
        return check

    monkeypatch.setattr(verify_module, "CHECKS", [make(n) for n in names])
    monkeypatch.setattr(verify_module, "CHECK_NAMES", list(names))
    monkeypatch.setattr(verify_module, "ENGINE_CHECKS", {"vllm": (make("engine_vllm"), "engine_vllm")})


def test_verify_runs_the_checks_in_order_and_reports_progress(tmp_path, ref, monkeypatch):
    fake_checks(monkeypatch)
    folder = int4_export(tmp_path)
    progress = Recorder()
    result = verify(folder, ref, {"min_top1": 0.5}, progress=progress)
    assert [c.name for c in result.checks] == ["model_type", "layout"]  # no modules.json: no sentence-transformers
    assert [c.passed for c in result.checks] == [True, False] and not result.passed
    assert all(isinstance(c.seconds, float) and c.seconds >= 0 for c in result.checks)
    assert (result.export, result.reference, result.format) == (folder, ref, "int4")
    assert result.thresholds == thresholds_for("int4", {"min_top1": 0.5}) and result.defaults == thresholds_for("int4")
    assert result.thresholds_changed == ["min_top1 0.5: enabled (default none)"]
    assert progress.events == [("model_type", 1, 2, None), ("model_type", "step", 1, 2, "tensors"),
                               ("model_type", 1, 2, "model_type"),
                               ("layout", 2, 2, None), ("layout", "step", 1, 2, "tensors"), ("layout", 2, 2, "layout")]


class Clock:
    """time.perf_counter stand-in: far from zero (as the real one), 1.23 ms a reading."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        self.now += 0.00123
        return self.now


def test_verify_times_each_check_and_reports_elapsed_seconds_since_it_started(tmp_path, ref, monkeypatch):
    import time

    fake_checks(monkeypatch)
    folder = int4_export(tmp_path)
    events = []

    class Progress:
        def __call__(self, name, index, total, elapsed, result):
            events.append(elapsed)

        def step(self, name, done, total, unit, elapsed):
            events.append(elapsed)

    clock = Clock()
    monkeypatch.setattr(time, "perf_counter", clock)
    result = verify(folder, ref, progress=Progress())
    wall = clock.now - 1000.0
    assert len(events) == 6 and events == sorted(events) and all(0 < e <= wall for e in events)
    for check in result.checks:
        assert 0 < check.seconds < wall and check.seconds == round(check.seconds, 3)


def test_verify_names_a_check_that_raises_and_attaches_its_thresholds(tmp_path, ref, monkeypatch):
    monkeypatch.setattr(verify_module, "CHECKS", [raises])
    monkeypatch.setattr(verify_module, "CHECK_NAMES", ["bytes"])
    (result,) = verify(int4_export(tmp_path), ref).checks
    assert result.name == "bytes" and result.detail.startswith("check raised ValueError: weight_scale of down_proj")
    assert [e["name"] for e in result.thresholds] == ["min_quantized_ratio"]


def test_sentence_transformers_check_runs_when_the_reference_is_a_sentence_transformers_folder(tmp_path, monkeypatch):
    fake_checks(monkeypatch)
    reference = write_folder(tmp_path / "ref", reference_weights(), files={"modules.json": "[]"})
    names = [c.name for c in verify(int4_export(tmp_path), reference).checks]
    assert names == ["model_type", "layout", "engine_sentence_transformers"]


def test_verify_runs_only_the_checks_named_and_the_engines_asked_for(tmp_path, ref, monkeypatch):
    fake_checks(monkeypatch)
    folder = int4_export(tmp_path, files={"modules.json": "[]"})
    engines = [SimpleNamespace(name="vllm")]
    assert [c.name for c in verify(folder, ref).checks] == ["model_type", "layout", "engine_sentence_transformers"]
    assert [c.name for c in verify(folder, ref, only=["layout"]).checks] == ["layout"]
    assert [c.name for c in verify(folder, ref, engines=engines).checks][-1] == "engine_vllm"
    assert [c.name for c in verify(folder, ref, only=["layout"], engines=engines).checks] == ["layout"]
    assert [c.name for c in verify(folder, ref, only=["engine_vllm"], engines=engines).checks] == ["engine_vllm"]


def test_verify_without_progress_runs_quietly_and_leaves_no_step_listener(tmp_path, ref, monkeypatch):
    fake_checks(monkeypatch)
    seen = []
    monkeypatch.setattr(verify_module, "CHECKS", [lambda ctx: seen.append(ctx) or CheckResult("a", True, "ok")])
    monkeypatch.setattr(verify_module, "CHECK_NAMES", ["a"])
    progress = []
    result = verify(int4_export(tmp_path), ref, progress=lambda *args: progress.append(args[:3]))
    assert result.passed and seen[0].on_step is None and seen[0].engines == {}
    assert progress == [("a", 1, 1), ("a", 1, 1)]


def test_run_checks_returns_the_checks(tmp_path, ref, monkeypatch):
    fake_checks(monkeypatch)
    assert [c.name for c in run_checks(int4_export(tmp_path), ref)] == ["model_type", "layout"]


def test_run_checks_uses_the_thresholds_given(tmp_path, ref, monkeypatch):
    monkeypatch.setattr(verify_module, "CHECKS", [lambda ctx: CheckResult("a", True, "ok", {"t": ctx.thresholds.min_top1})])
    monkeypatch.setattr(verify_module, "CHECK_NAMES", ["a"])
    assert run_checks(int4_export(tmp_path), ref, {"min_top1": 0.5})[0].metrics == {"t": 0.5}


def test_the_real_cheap_checks_run_through_verify_on_a_hand_written_export(tmp_path, ref):
    result = verify(int4_export(tmp_path), ref, only=["model_type", "shards", "engine_sentence_transformers"])
    assert [(c.name, c.passed) for c in result.checks] == [("model_type", True), ("shards", True)]


# ---------------------------------------------------------------------------------------------------------------
# record_in_card


def test_recording_in_a_folder_without_a_qexport_manifest_is_bad_input(tmp_path):
    with pytest.raises(InputError, match=f"^--write-card: {tmp_path} has no qexport.json"):
        record_in_card(Verification(tmp_path, Path("r"), "int8", thresholds_for("int8"), []))


def test_record_in_card_writes_each_check_with_its_thresholds_and_changes(tmp_path, monkeypatch):
    from qexport.report import card
    written = []
    monkeypatch.setattr(card, "update_card_verification", lambda folder, results: written.append((folder, results)))
    (tmp_path / "qexport.json").write_text("{}")
    thresholds = thresholds_for("int8", {"min_top1": None})
    checks = [CheckResult("functional", True, "kld 0", thresholds=threshold_entries(
                  thresholds, thresholds_for("int8"), ["max_kld_mean", "min_top1"])),
              CheckResult("layout", False, "bad"), CheckResult("engine", True, "not run", skipped=True)]
    record_in_card(Verification(tmp_path, Path("ref"), "int8", thresholds, checks, thresholds_for("int8")),
                   tool="pytest")
    ((folder, results),) = written
    assert folder == tmp_path
    assert results == card.verification_result("pytest", [
        {"name": "functional", "value": "kld 0", "threshold": "max_kld_mean 0.01; min_top1: disabled (default 0.9)",
         "passed": True},
        {"name": "layout", "value": "bad", "threshold": None, "passed": False},
        {"name": "engine", "value": "not run", "threshold": None, "passed": None},
    ], reference="ref", thresholds_changed=["min_top1: disabled (default 0.9)"])
    assert results["tool"] == "pytest"


def test_record_in_card_names_qexport_verify_as_the_tool_by_default(tmp_path, monkeypatch):
    from qexport.report import card
    written = []
    monkeypatch.setattr(card, "update_card_verification", lambda folder, results: written.append(results))
    (tmp_path / "qexport.json").write_text("{}")
    record_in_card(Verification(tmp_path, Path("ref"), "int8", thresholds_for("int8"), []))
    assert written[0]["tool"] == "qexport verify"
