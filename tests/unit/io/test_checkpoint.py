"""qexport/io/checkpoint.py on hand-made folders (no model build): what a model folder must hold, checked up front,
and tensors read back exactly as the safetensors library wrote them."""

from __future__ import annotations

import json
import os

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from qexport.io.checkpoint import INDEX_FILE, Checkpoint, auto_class_for, check_layer_counts, is_float, load_config, \
    pickle_advice, weight_files
from qexport.errors import InputError

CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_hidden_layers": 2}


def tensors(names=("model.layers.0.w", "model.layers.1.w", "model.norm.weight")):
    gen = torch.Generator().manual_seed(0)
    return {n: torch.randn(2, 3, generator=gen).to(torch.bfloat16) for n in names}


def folder(tmp_path, shards: dict[str, dict] | None = None, index: dict | None = None, config=CONFIG):
    """A model folder: config.json, the given shards (file name -> tensors), and an index if given."""
    root = tmp_path / "model"
    root.mkdir(parents=True)
    if config is not None:
        (root / "config.json").write_text(json.dumps(config))
    for name, ts in (shards if shards is not None else {"model.safetensors": tensors()}).items():
        save_file(ts, root / name)
    if index is not None:
        (root / INDEX_FILE).write_text(json.dumps(index))
    return root


def sharded(tmp_path, weight_map=None, **changes):
    t = tensors()
    shards = {"a.safetensors": {k: t[k] for k in list(t)[:2]}, "b.safetensors": {k: t[k] for k in list(t)[2:]}}
    wm = weight_map or {k: f for f, ts in shards.items() for k in ts}
    return folder(tmp_path, shards, {"metadata": {}, "weight_map": wm}, **changes)


def refused(path, match):
    with pytest.raises(InputError, match=match) as e:
        Checkpoint.open(path)
    return str(e.value)


def test_single_file_checkpoint_reads_every_tensor_back_exactly(tmp_path):
    t = tensors()
    ckpt = Checkpoint.open(folder(tmp_path, {"model.safetensors": t}))
    assert ckpt.config == CONFIG and [f.name for f in ckpt.files] == ["model.safetensors"]
    assert set(ckpt.names) == set(t) and all(torch.equal(ckpt.read(n), t[n]) for n in t)
    assert ckpt.input_folders() == [ckpt.folder]


def test_zero_size_tensor_reads_as_empty(tmp_path):
    ckpt = Checkpoint.open(folder(tmp_path, {"model.safetensors": {"e": torch.zeros(0, 4), "w": torch.ones(2)}},
                                  config={"model_type": "llama"}))
    empty = ckpt.read("e")
    assert empty.shape == (0, 4) and empty.dtype == torch.float32


def test_sharded_checkpoint_reads_each_tensor_from_its_shard_in_file_then_offset_order(tmp_path):
    t = tensors()
    ckpt = Checkpoint.open(sharded(tmp_path))
    assert [f.name for f in ckpt.files] == ["a.safetensors", "b.safetensors"]
    assert all(torch.equal(ckpt.read(n), t[n]) for n in t)
    by_file = [(ckpt.files.index(ckpt.entries[n].file), ckpt.entries[n].start) for n in ckpt.names]
    assert by_file == sorted(by_file) and len(ckpt.names) == 3


def test_truncated_tensor_data_is_refused_when_read(tmp_path):
    root = folder(tmp_path)
    ckpt = Checkpoint.open(root)
    last = max(ckpt.names, key=lambda n: ckpt.entries[n].end)
    with open(root / "model.safetensors", "r+b") as f:
        f.truncate(os.path.getsize(root / "model.safetensors") - 2)
    with pytest.raises(InputError, match=rf"tensor '{last}' is truncated \(10 of 12 bytes\)"):
        ckpt.read(last)


def test_not_a_folder_and_an_empty_folder_are_refused(tmp_path):
    refused(tmp_path / "nope", "nope: not a folder$")
    (tmp_path / "empty").mkdir()
    refused(tmp_path / "empty", r"folder is empty \(expected config.json and model.safetensors\)")


@pytest.mark.parametrize("config,why", [
    ([1], "config.json is not a JSON object"),
    ({"architectures": ["X"]}, "no model_type key"),
    ({"model_type": ""}, "no model_type key"),
    ({"model_type": 3}, "no model_type key"),
    ({"model_type": "llama", "architectures": "LlamaForCausalLM"}, "architectures 'LlamaForCausalLM' is not a list"),
    ({"model_type": "llama", "architectures": [1]}, r"architectures \[1\] is not a list of class names"),
])
def test_config_without_a_usable_model_type_or_architectures_is_refused(tmp_path, config, why):
    msg = refused(folder(tmp_path, config=config), why)
    assert msg.startswith(str(tmp_path / "model" / "config.json"))


def test_config_without_architectures_is_accepted(tmp_path):
    assert load_config(folder(tmp_path, config={"model_type": "llama"}))["model_type"] == "llama"


def test_tensor_in_two_shards_is_refused(tmp_path):
    t = tensors()
    shards = {"a.safetensors": t, "b.safetensors": {"model.norm.weight": t["model.norm.weight"], "x": torch.ones(2)}}
    wm = {**{k: "a.safetensors" for k in t}, "x": "b.safetensors"}
    refused(folder(tmp_path, shards, {"weight_map": wm}), "b.safetensors: tensor 'model.norm.weight' is also in a.safetensors")


def test_index_naming_the_other_listed_shard_is_refused(tmp_path):
    t = tensors()
    wm = {"model.layers.0.w": "b.safetensors", "model.layers.1.w": "a.safetensors", "model.norm.weight": "b.safetensors"}
    refused(sharded(tmp_path, wm), r"a.safetensors: tensor 'model.layers.0.w' is here but model.safetensors.index.json "
                                   r"puts it in 'b.safetensors'")
    assert t  # the tensors as written


def test_index_listing_a_tensor_no_shard_holds_is_refused(tmp_path):
    wm = {**{k: "a.safetensors" for k in list(tensors())[:2]}, "model.norm.weight": "b.safetensors",
          "ghost": "a.safetensors"}
    refused(sharded(tmp_path, wm), r"index.json: tensor 'ghost' is not in shard 'a.safetensors'")


def test_a_file_without_tensors_is_refused(tmp_path):
    refused(folder(tmp_path, {"model.safetensors": {}}), r"model.safetensors: holds no tensors")


@pytest.mark.parametrize("index,why", [
    ({"weight_map": {}}, "no weight_map object"),
    ({"weight_map": []}, "no weight_map object"),
    ([], "no weight_map object"),
    ({"weight_map": {"t": "/abs.safetensors"}}, r"tensor 't' names shard '/abs.safetensors', which is not a file in"),
    ({"weight_map": {"t": "sub/a.safetensors"}}, "names shard 'sub/a.safetensors', which is not a file"),
    ({"weight_map": {"t": ".."}}, "names shard '..', which is not a file"),
    ({"weight_map": {"t": 3}}, "names shard 3, which is not a file"),
    ({"weight_map": {"t": "c.safetensors"}}, "tensor 't' is in shard 'c.safetensors', which does not exist"),
])
def test_index_naming_shards_that_are_not_files_here_is_refused(tmp_path, index, why):
    root = folder(tmp_path, {"a.safetensors": tensors()}, index)
    with pytest.raises(InputError, match=why) as e:
        weight_files(root)
    assert str(e.value).startswith(str(root / INDEX_FILE))


def test_shard_not_listed_in_the_index_is_refused(tmp_path):
    root = sharded(tmp_path)
    save_file(tensors(), root / "stray.safetensors")
    with pytest.raises(InputError, match="stray.safetensors: shard is not listed in model.safetensors.index.json"):
        weight_files(root)


def test_weight_files_are_the_indexed_shards_once_each_sorted(tmp_path):
    root = sharded(tmp_path)
    assert weight_files(root) == [root / "a.safetensors", root / "b.safetensors"]


def test_one_safetensors_file_of_another_name_is_the_weights(tmp_path):
    root = folder(tmp_path, {"weights.safetensors": tensors()})
    assert weight_files(root) == [root / "weights.safetensors"]


def test_several_safetensors_files_without_an_index_are_refused(tmp_path):
    root = folder(tmp_path, {"x.safetensors": tensors(), "y.safetensors": tensors()})
    with pytest.raises(InputError, match=r"2 safetensors files but no model.safetensors.index.json"):
        weight_files(root)


def test_folder_without_weights_is_refused(tmp_path):
    root = folder(tmp_path, {})
    with pytest.raises(InputError, match=r"no weights \(model.safetensors or model.safetensors.index.json\) found"):
        weight_files(root)


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "consolidated.pt", "weights.pth", "x.ckpt",
                                  "shard-1.bin"])
def test_pickle_checkpoint_is_refused_with_a_conversion_command(tmp_path, name):
    root = folder(tmp_path, {})
    (root / name).write_bytes(b"not really a pickle")
    with pytest.raises(InputError, match=rf"{name}: pickle checkpoint refused") as e:
        weight_files(root)
    advice = e.value.advice
    assert "from transformers import AutoModelForCausalLM as M" in advice
    assert 'ignore_patterns("*.bin", "*.bin.index.json", "*.pt", "*.pth", "*.ckpt")' in advice
    assert advice.endswith(f"{root} {root}-safetensors")


def test_pickle_advice_without_a_known_architecture_says_to_pick_the_head_class(tmp_path):
    root = folder(tmp_path, {}, config={"model_type": "llama"})
    advice = pickle_advice(root)
    assert "from transformers import AutoModel as M" in advice and "replace AutoModel by the class" in advice
    (root / "config.json").write_text("{")
    assert "from transformers import AutoModel as M" in pickle_advice(root)


def test_pickle_advice_for_a_very_long_path_uses_placeholders(tmp_path):
    long = tmp_path / ("d" * 210)
    long.mkdir()
    (long / "config.json").write_text(json.dumps(CONFIG))
    assert pickle_advice(long).endswith(" SRC SRC-safetensors")


@pytest.mark.parametrize("config,cls", [
    ({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, "AutoModelForCausalLM"),
    ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "AutoModelForCausalLM"),
    ({"model_type": "bert", "architectures": ["BertModel"]}, "AutoModel"),
    ({"model_type": "bert", "architectures": ["BertForMaskedLM"]}, "AutoModelForMaskedLM"),
    # in the masked-LM mapping too, which sorts first by name: the preferred order decides
    ({"model_type": "bart", "architectures": ["BartForConditionalGeneration"]}, "AutoModelForSeq2SeqLM"),
    ({"model_type": "funnel", "architectures": ["FunnelBaseModel"]}, "AutoModel"),  # one of a tuple of classes
    ({"model_type": "llama", "architectures": ["BertModel"]}, "BertModel"),  # no mapping: the class itself
    ({"model_type": "llama", "architectures": ["NoSuchModel"]}, None),
    ({"model_type": "llama"}, None),
    ({"model_type": "llama", "architectures": []}, None),
    ({"model_type": "llama", "architectures": [3]}, None),
])
def test_auto_class_is_the_one_whose_mapping_gives_the_architecture(config, cls):
    assert auto_class_for(config) == cls


def test_source_files_list_config_weights_and_index_with_sizes_and_hashes(tmp_path):
    import hashlib

    root = sharded(tmp_path)
    files = Checkpoint.open(root).source_files()
    assert [f["name"] for f in files] == ["config.json", "a.safetensors", "b.safetensors", INDEX_FILE]
    for f in files:
        data = (root / f["name"]).read_bytes()
        assert (f["bytes"], f["sha256"]) == (len(data), hashlib.sha256(data).hexdigest())
    assert [f["name"] for f in Checkpoint.open(folder(tmp_path / "one")).source_files()] == ["config.json",
                                                                                            "model.safetensors"]


def test_side_files_are_everything_but_weights_config_index_manifest_and_hidden(tmp_path):
    root = sharded(tmp_path)
    for name in ("tokenizer.json", "README.md", ".hidden", "qexport.json", "extra.bin.txt"):
        (root / name).write_text("x")
    (root / "sub").mkdir()
    (root / "sub" / "a.txt").write_text("y")
    ckpt = Checkpoint.open(root)
    assert [p.name for p in ckpt.side_files()] == ["README.md", "extra.bin.txt", "sub", "tokenizer.json"]
    assert [rel for rel, _ in ckpt.side_tree()] == ["README.md", "extra.bin.txt", "sub/a.txt", "tokenizer.json"]


@pytest.mark.parametrize("key", ["num_hidden_layers", "n_layer", "decoder_layers"])
def test_config_asking_for_more_blocks_than_the_tensors_hold_is_refused(tmp_path, key):
    entries = dict.fromkeys(["model.layers.0.w", "model.layers.1.w", "lm_head.weight"])
    check_layer_counts({key: 2}, entries, tmp_path / "config.json")
    with pytest.raises(InputError, match=rf"config.json: {key}=3 but the checkpoint's tensor names number at most 2"):
        check_layer_counts({key: 3}, entries, tmp_path / "config.json")


def test_layer_counts_of_nested_configs_are_checked_and_booleans_ignored(tmp_path):
    entries = dict.fromkeys(["layers.0.w"])
    check_layer_counts({"num_layers": True, "text_config": {"num_layers": 1}}, entries, tmp_path)
    with pytest.raises(InputError, match="num_layers=2"):
        check_layer_counts({"text_config": {"num_layers": 2}}, entries, tmp_path)
    with pytest.raises(InputError, match="at most 0 blocks"):
        check_layer_counts({"num_layers": 1}, dict.fromkeys(["w"]), tmp_path)


def test_is_float_is_true_for_floating_dtypes_only():
    assert [is_float(n) for n in ("F32", "BF16", "F8_E4M3", "I8", "I64", "BOOL")] == [True] * 3 + [False] * 3


def test_side_folder_may_link_to_a_file_elsewhere_in_the_model_folder_but_not_outside_it(tmp_path):
    # the Hugging Face cache links files to blobs: a link is fine while it stays inside the model folder
    root = sharded(tmp_path)
    (root / "tokenizer.json").write_text("{}")
    (root / "sub").mkdir()
    (root / "sub" / "tok.json").symlink_to(root / "tokenizer.json")
    ckpt = Checkpoint.open(root)
    assert dict(ckpt.side_tree())["sub/tok.json"] == (root / "tokenizer.json").resolve()
    (tmp_path / "outside.txt").write_text("x")
    (root / "sub" / "out.txt").symlink_to(tmp_path / "outside.txt")
    with pytest.raises(InputError, match="symlink leads outside"):
        ckpt.side_tree()


@pytest.mark.parametrize("config,dtype", [
    ({"dtype": "bfloat16"}, "bfloat16"),
    ({"torch_dtype": "torch.float16"}, "float16"),
    ({"dtype": "float32", "torch_dtype": "float16"}, "float32"),  # transformers 5's key first
    ({"dtype": "auto", "torch_dtype": "float64"}, "float64"),  # a key naming no floating dtype is skipped
    ({"dtype": "auto"}, None),
    ({"dtype": "int8"}, None),
    ({"dtype": 16}, None),
    ({}, None),
    (None, None),
])
def test_declared_dtype_is_the_floating_dtype_config_json_names(config, dtype):
    from qexport.io.checkpoint import declared_dtype

    assert declared_dtype(config) == dtype


def test_one_byte_tensor_reads_back_its_value(tmp_path):
    ckpt = Checkpoint.open(folder(tmp_path, {"model.safetensors": {"b": torch.tensor([0xA5], dtype=torch.uint8)}},
                                  config={"model_type": "llama"}))
    assert ckpt.read("b").tolist() == [0xA5]


def test_zero_size_tensor_reads_as_empty_in_its_own_dtype(tmp_path):
    ckpt = Checkpoint.open(folder(tmp_path, {"model.safetensors": {"e": torch.zeros(3, 0, dtype=torch.bfloat16),
                                                                   "w": torch.ones(2)}},
                                  config={"model_type": "llama"}))
    empty = ckpt.read("e")
    assert empty.shape == (3, 0) and empty.dtype == torch.bfloat16


def test_reading_a_tensor_emits_no_warning(tmp_path):
    import warnings

    ckpt = Checkpoint.open(folder(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ckpt.read("model.norm.weight")


def test_a_weight_file_gone_after_opening_is_refused_naming_file_tensor_and_os_error(tmp_path):
    root = folder(tmp_path)
    ckpt = Checkpoint.open(root)
    (root / "model.safetensors").unlink()
    with pytest.raises(InputError) as e:
        ckpt.read("model.norm.weight")
    assert str(e.value) == f"{root / 'model.safetensors'}: cannot read tensor 'model.norm.weight': " \
                           "No such file or directory"


def test_opening_a_checkpoint_with_fewer_blocks_than_config_json_names_refuses_it_naming_config_json(tmp_path):
    msg = refused(folder(tmp_path, config={**CONFIG, "num_hidden_layers": 3}), "num_hidden_layers=3 but")
    assert msg.startswith(f"{tmp_path / 'model' / 'config.json'}: ")


def file_digests(root, names):
    import hashlib

    return {n: hashlib.sha256((root / n).read_bytes()).hexdigest() for n in names}


def test_tensors_fed_in_file_order_give_each_weight_files_sha256_without_reading_it_again(tmp_path, monkeypatch):
    import qexport.io.checkpoint as checkpoint

    t = {"a": torch.arange(6, dtype=torch.float32), "b": torch.tensor([9], dtype=torch.uint8),
         "c": torch.zeros(0, dtype=torch.bfloat16), "d": torch.ones(3, dtype=torch.bfloat16)}
    root = folder(tmp_path, {"model.safetensors": t}, config={"model_type": "llama"})
    ckpt = Checkpoint.open(root)
    for name in ckpt.names:
        ckpt.hash_read(name, ckpt.read(name))
    hashed, read = [], []
    real_hash, real_open = checkpoint.sha256_file, checkpoint.safe_fs.open_regular

    class Counted:
        def __init__(self, path, f):
            self.path, self.f = Path(path), f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def seek(self, offset):
            self.f.seek(offset)

        def fileno(self):
            return self.f.fileno()

        def read(self, n=-1):
            data = self.f.read(n)
            read.append((self.path.name, len(data)))
            return data

        def readinto(self, buffer):
            got = self.f.readinto(buffer)
            read.append((self.path.name, got))
            return got

    monkeypatch.setattr(checkpoint, "sha256_file", lambda path, *a, **k: hashed.append(path.name) or real_hash(path))
    monkeypatch.setattr(checkpoint.safe_fs, "open_regular", lambda p, *a, **k: Counted(p, real_open(p, *a, **k)))
    files = {f["name"]: f["sha256"] for f in ckpt.source_files()}
    assert files == file_digests(root, ["config.json", "model.safetensors"])
    assert hashed == ["config.json"]
    assert sum(n for name, n in read if name == "model.safetensors") == 0  # hashed from the tensors fed


@pytest.mark.parametrize("order", [[1, 0, 2], [0, 2], [2], [0, 0, 1]])
def test_tensors_fed_out_of_file_order_still_give_the_right_sha256(tmp_path, order):
    # a tensor that is not the next span of its file is ignored; the rest of the file is read from disk
    t = {"a": torch.arange(6, dtype=torch.float32), "b": torch.ones(3, dtype=torch.bfloat16),
         "c": torch.full((5,), 7, dtype=torch.int16)}
    root = folder(tmp_path, {"model.safetensors": t}, config={"model_type": "llama"})
    ckpt = Checkpoint.open(root)
    for i in order:
        name = ckpt.names[i]
        ckpt.hash_read(name, ckpt.read(name))
    assert {f["name"]: f["sha256"] for f in ckpt.source_files()} == file_digests(root, ["config.json",
                                                                                        "model.safetensors"])


def test_index_naming_an_empty_shard_name_is_refused(tmp_path):
    root = folder(tmp_path, {"a.safetensors": tensors()}, {"weight_map": {"t": ""}})
    with pytest.raises(InputError, match="tensor 't' names shard '', which is not a file in this folder"):
        weight_files(root)


def test_an_index_that_is_not_json_is_refused_naming_it(tmp_path):
    root = folder(tmp_path, {"a.safetensors": tensors()})
    (root / INDEX_FILE).write_text("{")
    msg = refused(root, "not valid JSON")
    assert msg.startswith(f"{root / INDEX_FILE}: {INDEX_FILE} is not valid JSON (")


def test_a_config_json_that_is_not_json_is_refused_naming_it(tmp_path):
    root = folder(tmp_path)
    (root / "config.json").write_text("{")
    assert refused(root, "not valid JSON").startswith(f"{root / 'config.json'}: config.json is not valid JSON (")


def test_config_json_above_its_16_mib_cap_is_refused_even_when_valid(tmp_path):
    # config.json's cap (MAX_CONFIG_BYTES, 16 MiB) is below the other JSON files' (64 MiB)
    root = folder(tmp_path)
    (root / "config.json").write_text(json.dumps(CONFIG) + " " * (16 * 2**20))
    assert refused(root, "above qexport's 16 MiB limit").startswith(f"{root / 'config.json'}: config.json is ")


def test_pickle_advice_for_a_known_architecture_has_no_note(tmp_path):
    root = folder(tmp_path, {})
    advice = pickle_advice(root)
    assert "with its own class AutoModelForCausalLM, keeping the tokenizer and other files, then export that: " \
           in advice


def test_pickle_advice_without_a_known_architecture_names_a_head_class_to_use(tmp_path):
    advice = pickle_advice(folder(tmp_path, {}, config={"model_type": "llama"}))
    assert "replace AutoModel by the class of the model's task, e.g. AutoModelForCausalLM, or the head is lost" \
           in advice


@pytest.mark.parametrize("name", ["model ", "CKPT-X"])
def test_pickle_advice_names_the_folder_as_it_is(tmp_path, name):
    import shlex

    root = tmp_path / name
    root.mkdir()
    (root / "config.json").write_text(json.dumps(CONFIG))
    assert pickle_advice(root).endswith(f"{shlex.quote(str(root))} {shlex.quote(f'{root}-safetensors')}")


@pytest.mark.parametrize("extra,placeholders", [(0, False), (1, True)])
def test_pickle_advice_uses_placeholders_above_200_characters_of_path(tmp_path, extra, placeholders):
    root = tmp_path / ("d" * (200 - len(str(tmp_path)) - 1 + extra))
    assert len(str(root)) == 200 + extra
    root.mkdir()
    (root / "config.json").write_text(json.dumps(CONFIG))
    assert pickle_advice(root).endswith(" SRC SRC-safetensors") == placeholders


def test_pickle_advice_command_copies_the_folder_without_pickles_and_resaves_with_the_named_class(tmp_path,
                                                                                                 monkeypatch):
    # the advice's python code run as given, with a stand-in for the transformers class it names
    import shlex
    import sys
    import types

    root = folder(tmp_path, {})
    (root / "pytorch_model.bin").write_bytes(b"pickle")
    (root / "tokenizer.json").write_text("{}")
    words = shlex.split(pickle_advice(root).split("export that: ", 1)[1])
    assert words[:2] == ["python", "-c"]
    calls = []

    class Model:
        @classmethod
        def from_pretrained(cls, path, **kwargs):
            calls.append(("from_pretrained", path, kwargs))
            return cls()

        def save_pretrained(self, path):
            calls.append(("save_pretrained", path))

    monkeypatch.setitem(sys.modules, "transformers", types.SimpleNamespace(AutoModelForCausalLM=Model))
    monkeypatch.setattr(sys, "argv", ["-c", *words[3:]])
    exec(compile(words[2], "<advice>", "exec"), {})
    out = root.parent / "model-safetensors"
    assert words[3:] == [str(root), str(out)]
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "tokenizer.json"]
    assert calls == [("from_pretrained", str(root), {"dtype": "auto"}), ("save_pretrained", str(out))]


def test_files_hashed_in_a_forked_child_give_the_same_source_files(tmp_path):
    # The command line forks the hashing before importing torch; the child touches no torch, so forking under
    # pytest is safe here (qexport.io.forked: only other threads' locks are a hazard, and the child takes none).
    root = folder(tmp_path, {"model.safetensors": tensors()}, config={"model_type": "llama"})
    ckpt = Checkpoint.open(root)
    ckpt.hash_in_child()
    name = ckpt.names[0]
    ckpt.hash_read(name, ckpt.read(name))  # ignored: the child hashes every file itself
    assert ckpt._hashes == {}
    assert {f["name"]: f["sha256"] for f in ckpt.source_files()} == file_digests(root, ["config.json",
                                                                                        "model.safetensors"])


def test_a_failure_of_the_hashing_child_is_named(tmp_path, monkeypatch):
    ckpt = Checkpoint.open(folder(tmp_path, {"model.safetensors": tensors()}, config={"model_type": "llama"}))
    monkeypatch.setattr(ckpt, "_hash_files", lambda: 1 / 0)
    ckpt.hash_in_child()
    with pytest.raises(RuntimeError, match="^hashing the source failed \\(forked child\\): .*ZeroDivisionError"):
        ckpt.source_files()


def test_tensor_bytes_is_the_sum_of_every_tensors_data(tmp_path):
    t = {"a": torch.zeros(6, dtype=torch.float32), "b": torch.zeros(3, dtype=torch.bfloat16),
         "c": torch.zeros(0, 4, dtype=torch.int8)}
    ckpt = Checkpoint.open(folder(tmp_path, {"model.safetensors": t}, config={"model_type": "llama"}))
    assert ckpt.tensor_bytes == 6 * 4 + 3 * 2 + 0
