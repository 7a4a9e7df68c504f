"""qexport/merge/sources.py on hand-made folders (no model built, no peft): a LoRA adapter folded into its base is
W + (B @ A) * scale in fp32 rounded once to W's dtype, a weighted average is sum_i w_i * W_i in fp32, and every bad
input is an InputError naming the file, tensor or option. The architecture (which module is a Linear, Conv1D or
Embedding) comes from a one-layer hidden-8 config built on the meta device (milliseconds).

tests/unit/merge/test_merge_folders.py checks the same merges against peft's merge_and_unload() and torch on real tiny models."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from qexport.io.checkpoint import Checkpoint
from qexport.errors import InputError
from qexport.io.publish import input_folders
from qexport.merge.sources import ADAPTER_CONFIG, ADAPTER_WEIGHTS, UNSUPPORTED_FIELDS, Adapter, AveragedSource, \
    LoraMergedSource, merge_folder, normalized_weights, open_source, pattern_value
from tests import support

LLAMA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 8, "intermediate_size": 12,
         "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": 16,
         "max_position_embeddings": 16, "tie_word_embeddings": False}
GPT2 = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": 8, "n_layer": 1, "n_head": 2,
        "vocab_size": 16, "n_positions": 8}
Q, V, DOWN, EMBED = ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
                     "model.layers.0.mlp.down_proj", "model.embed_tokens")
P = "base_model.model."


def llama_tensors(seed=0, dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    """Every tensor of the one-layer llama (LLAMA), random."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {"model.embed_tokens.weight": (16, 8), "lm_head.weight": (16, 8), "model.norm.weight": (8,),
              "model.layers.0.input_layernorm.weight": (8,), "model.layers.0.post_attention_layernorm.weight": (8,),
              **{f"model.layers.0.self_attn.{p}.weight": (8, 8) for p in ("q_proj", "k_proj", "v_proj", "o_proj")},
              "model.layers.0.mlp.gate_proj.weight": (12, 8), "model.layers.0.mlp.up_proj.weight": (12, 8),
              "model.layers.0.mlp.down_proj.weight": (8, 12)}
    return {n: torch.randn(s, generator=gen).to(dtype) for n, s in shapes.items()}


def model(root: Path, tensors: dict, config=LLAMA) -> Path:
    return support.write_folder(root, tensors, config)


def pair(rank, fan_in, fan_out, seed=1, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rank, fan_in, generator=gen).to(dtype), torch.randn(fan_out, rank, generator=gen).to(dtype)


def adapter(root: Path, tensors: dict | None = None, **config) -> Path:
    """An adapter folder: adapter_config.json (r=4, lora_alpha=8 unless changed) and the given adapter tensors
    (default: LoRA on q_proj and down_proj)."""
    root.mkdir(parents=True)
    if tensors is None:
        (qa, qb), (da, db) = pair(4, 8, 8, seed=1), pair(4, 12, 8, seed=2)
        tensors = {f"{P}{Q}.lora_A.weight": qa, f"{P}{Q}.lora_B.weight": qb,
                   f"{P}{DOWN}.lora_A.weight": da, f"{P}{DOWN}.lora_B.weight": db}
    (root / ADAPTER_CONFIG).write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, **config}))
    save_file(tensors, root / ADAPTER_WEIGHTS)
    return root


def expected(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, transpose=False) -> torch.Tensor:
    delta = b.float() @ a.float()
    return (w.float() + (delta.T if transpose else delta) * scale).to(w.dtype)


def merged(tmp_path, base=None, tensors=None, **config) -> LoraMergedSource:
    base = base or model(tmp_path / "base", llama_tensors())
    return open_source(base, lora=adapter(tmp_path / "lora", tensors, **config))


def refused(tmp_path, match, base=None, tensors=None, **config) -> str:
    with pytest.raises(InputError, match=match) as e:
        merged(tmp_path, base, tensors, **config)
    return str(e.value)


# --- LoRA: the merged tensors ----------------------------------------------------------------------------------


def test_lora_merge_is_w_plus_b_at_a_times_alpha_over_r_in_fp32_rounded_to_the_base_dtype(tmp_path):
    base = llama_tensors()
    src = merged(tmp_path, model(tmp_path / "base", base))
    a = src.adapter
    for module in (Q, DOWN):
        w = f"{module}.weight"
        got = src.read(w)
        want = expected(base[w], a.read(f"{P}{module}.lora_A.weight"), a.read(f"{P}{module}.lora_B.weight"), 8 / 4)
        assert got.dtype == torch.bfloat16 and torch.equal(got, want), module
        assert not torch.equal(got, base[w])  # the adapter changes it


def test_lora_merge_leaves_every_other_tensor_bit_identical(tmp_path):
    base = llama_tensors()
    src = merged(tmp_path, model(tmp_path / "base", base))
    assert src.names == Checkpoint.open(tmp_path / "base").names and set(src.lora) == {f"{Q}.weight", f"{DOWN}.weight"}
    for name in set(base) - set(src.lora):
        got = src.read(name)
        assert got.dtype == base[name].dtype and torch.equal(got, base[name]), name


def test_lora_merge_of_an_fp32_base_stays_fp32(tmp_path):
    base = llama_tensors(dtype=torch.float32)
    src = merged(tmp_path, model(tmp_path / "base", base))
    a = src.adapter
    got = src.read(f"{Q}.weight")
    assert got.dtype == torch.float32
    assert torch.equal(got, expected(base[f"{Q}.weight"], a.read(f"{P}{Q}.lora_A.weight"),
                                     a.read(f"{P}{Q}.lora_B.weight"), 2.0))


def test_lora_merge_does_not_write_into_the_base_tensor(tmp_path):
    base = llama_tensors(dtype=torch.float32)
    src = merged(tmp_path, model(tmp_path / "base", base))
    src.read(f"{Q}.weight")
    assert torch.equal(src.base.read(f"{Q}.weight"), base[f"{Q}.weight"])


def test_rslora_scales_by_alpha_over_sqrt_r(tmp_path):
    base = llama_tensors()
    src = merged(tmp_path, model(tmp_path / "base", base), use_rslora=True, r=4, lora_alpha=8)
    a = src.adapter
    assert src.lora[f"{Q}.weight"].scale == 8 / math.sqrt(4) == 4.0 and src.merge["use_rslora"] is True
    assert torch.equal(src.read(f"{Q}.weight"), expected(base[f"{Q}.weight"], a.read(f"{P}{Q}.lora_A.weight"),
                                                         a.read(f"{P}{Q}.lora_B.weight"), 4.0))


def test_rank_and_alpha_patterns_set_each_modules_rank_alpha_and_scale(tmp_path):
    (qa, qb), (da, db) = pair(2, 8, 8), pair(4, 12, 8)
    tensors = {f"{P}{Q}.lora_A.weight": qa, f"{P}{Q}.lora_B.weight": qb,
               f"{P}{DOWN}.lora_A.weight": da, f"{P}{DOWN}.lora_B.weight": db}
    src = merged(tmp_path, tensors=tensors, r=4, lora_alpha=8, rank_pattern={"q_proj": 2}, alpha_pattern={"mlp.down_proj": 3})
    assert src.merge["modules"] == {Q: {"rank": 2, "alpha": 8, "scale": 4.0}, DOWN: {"rank": 4, "alpha": 3, "scale": 0.75}}
    assert src.merge["use_rslora"] is False
    base = src.base
    assert torch.equal(src.read(f"{DOWN}.weight"), expected(base.read(f"{DOWN}.weight"), da, db, 0.75))


def test_pattern_matches_a_whole_name_suffix_and_the_first_matching_key_wins():
    module = "model.layers.0.self_attn.q_proj"
    assert pattern_value({"q_proj": 2}, module, 8) == 2
    assert pattern_value({"self_attn.q_proj": 2}, module, 8) == 2
    assert pattern_value({module: 2}, module, 8) == 2
    assert pattern_value({"proj": 2}, module, 8) == 8  # a suffix of the last part is not a module name
    assert pattern_value({"q_pro": 2}, module, 8) == 8  # the pattern must reach the end
    assert pattern_value({"layers": 2}, module, 8) == 8
    assert pattern_value({"k_proj": 1, r"layers\.0\..*_proj": 3, "q_proj": 5}, module, 8) == 3
    assert pattern_value({}, module, 8) == 8


def test_pattern_that_is_not_a_valid_regex_is_an_input_error_naming_where_it_came_from():
    with pytest.raises(InputError, match=r"somewhere/adapter_config.json: rank_pattern.*not a valid regular"):
        pattern_value({"(": 2}, "model.q_proj", 8, "somewhere/adapter_config.json: rank_pattern")


def test_pattern_error_names_the_adapter_config_and_the_pattern_field(tmp_path):
    message = refused(tmp_path, "not a valid regular expression", alpha_pattern={"(": 2})
    assert f"{tmp_path / 'lora' / ADAPTER_CONFIG}: alpha_pattern" in message


def test_conv1d_module_adds_the_transpose_of_b_at_a(tmp_path):
    # GPT-2 stores c_attn as transformers' Conv1D, weight [in, out]; peft's fan_in_fan_out merge adds (B @ A).T
    gen = torch.Generator().manual_seed(0)
    base = {"transformer.h.0.attn.c_attn.weight": torch.randn(8, 24, generator=gen).to(torch.bfloat16),
            "transformer.wte.weight": torch.randn(16, 8, generator=gen).to(torch.bfloat16)}
    a, b = pair(4, 8, 24)
    module = "transformer.h.0.attn.c_attn"
    src = merged(tmp_path, model(tmp_path / "base", base, GPT2),
                 {f"{P}{module}.lora_A.weight": a, f"{P}{module}.lora_B.weight": b}, fan_in_fan_out=True)
    assert src.lora[f"{module}.weight"].kind == "conv1d"
    assert torch.equal(src.read(f"{module}.weight"), expected(base[f"{module}.weight"], a, b, 2.0, transpose=True))


def test_embedding_module_adds_the_transpose_of_b_at_a(tmp_path):
    # peft's Embedding LoRA: lora_embedding_A [r, num_embeddings], lora_embedding_B [dim, r]; W [num, dim] += (B@A).T
    base = llama_tensors()
    a, b = pair(4, 16, 8)
    src = merged(tmp_path, model(tmp_path / "base", base),
                 {f"{P}{EMBED}.lora_embedding_A": a, f"{P}{EMBED}.lora_embedding_B": b})
    assert src.lora[f"{EMBED}.weight"].kind == "embedding"
    assert torch.equal(src.read(f"{EMBED}.weight"), expected(base[f"{EMBED}.weight"], a, b, 2.0, transpose=True))


def test_base_layer_saved_with_the_adapter_replaces_the_base_weight(tmp_path):
    base = llama_tensors()
    a, b = pair(4, 16, 8)
    copy = torch.randn(16, 8, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
    src = merged(tmp_path, model(tmp_path / "base", base),
                 {f"{P}{EMBED}.lora_embedding_A": a, f"{P}{EMBED}.lora_embedding_B": b,
                  f"{P}{EMBED}.base_layer.weight": copy})
    assert torch.equal(src.read(f"{EMBED}.weight"), expected(copy, a, b, 2.0, transpose=True))


def test_base_layer_of_another_shape_is_refused_naming_it(tmp_path):
    a, b = pair(4, 16, 8)
    message = refused(tmp_path, "another shape", tensors={
        f"{P}{EMBED}.lora_embedding_A": a, f"{P}{EMBED}.lora_embedding_B": b,
        f"{P}{EMBED}.base_layer.weight": torch.zeros(17, 8)})
    assert f"'{P}{EMBED}.base_layer.weight' [17, 8] replaces '{EMBED}.weight' [16, 8]" in message


def test_non_finite_delta_is_refused_naming_the_adapter_keys_and_module(tmp_path):
    a, b = pair(4, 8, 8)
    a[0, 0] = float("nan")
    src = merged(tmp_path, tensors={f"{P}{Q}.lora_A.weight": a, f"{P}{Q}.lora_B.weight": b})
    with pytest.raises(InputError, match="NaN or Inf") as e:
        src.read(f"{Q}.weight")
    assert str(e.value).startswith(f"{src.adapter.file}: keys '{P}{Q}.lora_A.weight' / '{P}{Q}.lora_B.weight'")
    assert repr(Q) in str(e.value)


@pytest.mark.parametrize("where", ["low", "high"])
def test_delta_overflowing_fp32_is_refused(tmp_path, where):
    a, b = pair(4, 8, 8)
    a[0, 0] = b[0, 0] = 1e30  # 1e60 * scale: beyond fp32; only one element, at the low or the high end
    if where == "low":
        a[0, 0] = -1e30
    src = merged(tmp_path, tensors={f"{P}{Q}.lora_A.weight": a, f"{P}{Q}.lora_B.weight": b})
    with pytest.raises(InputError, match="NaN or Inf"):
        src.read(f"{Q}.weight")


def test_merge_record_names_inputs_absolute_and_each_modules_scale(tmp_path, monkeypatch):
    model(tmp_path / "base", llama_tensors())
    adapter(tmp_path / "lora")
    monkeypatch.chdir(tmp_path)
    src = open_source("base", lora="lora")
    assert src.merge == {"method": "lora", "base": str(tmp_path / "base"), "adapter": str(tmp_path / "lora"),
                         "use_rslora": False, "modules": {Q: {"rank": 4, "alpha": 8, "scale": 2.0},
                                                          DOWN: {"rank": 4, "alpha": 8, "scale": 2.0}}}


def test_lora_source_files_are_the_bases_then_the_adapters_with_sha256(tmp_path):
    import hashlib

    src = merged(tmp_path)
    records = src.source_files()
    assert [r["name"] for r in records] == ["base/config.json", "base/model.safetensors",
                                            f"adapter/{ADAPTER_CONFIG}", f"adapter/{ADAPTER_WEIGHTS}"]
    assert records[:2] == [{**r, "name": f"base/{r['name']}"} for r in src.base.source_files()]
    for r in records[-2:]:
        path = tmp_path / "lora" / r["name"].removeprefix("adapter/")
        assert r["bytes"] == path.stat().st_size and r["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert src.input_folders() == [tmp_path / "base", tmp_path / "lora"] == input_folders(src)
    assert src.side_files() == src.base.side_files() and src.side_tree() == src.base.side_tree()
    assert (src.folder, src.config, src.entries) == (src.base.folder, src.base.config, src.base.entries)


# --- LoRA: the adapter folder and its config -------------------------------------------------------------------


def test_adapter_that_is_not_a_folder_is_refused(tmp_path):
    with pytest.raises(InputError, match=rf"^--lora {tmp_path / 'nope'}: not a folder$"):
        Adapter.open(tmp_path / "nope")


def test_adapter_config_that_is_not_an_object_is_refused(tmp_path):
    root = adapter(tmp_path / "lora")
    (root / ADAPTER_CONFIG).write_text("[1]")
    with pytest.raises(InputError, match=rf"^{root / ADAPTER_CONFIG}: not a JSON object$"):
        Adapter.open(root)


def test_adapter_without_weights_is_refused_naming_the_file(tmp_path):
    root = adapter(tmp_path / "lora")
    (root / ADAPTER_WEIGHTS).unlink()
    with pytest.raises(InputError, match=rf"^{root / ADAPTER_WEIGHTS}: adapter weights not found$"):
        Adapter.open(root)


def test_pickle_adapter_is_refused_and_never_unpickled(tmp_path):
    root = adapter(tmp_path / "lora")
    (root / ADAPTER_WEIGHTS).unlink()
    (root / "adapter_model.bin").write_bytes(b"not even a pickle")
    with pytest.raises(InputError, match=rf"^{root / 'adapter_model.bin'}: pickle adapter refused"):
        Adapter.open(root)


def test_adapter_with_no_tensors_is_refused(tmp_path):
    root = adapter(tmp_path / "lora", tensors={})
    with pytest.raises(InputError, match=rf"^{root / ADAPTER_WEIGHTS}: holds no tensors$"):
        Adapter.open(root)


def test_adapter_opens_with_its_config_file_and_header(tmp_path):
    root = adapter(tmp_path / "lora")
    a = Adapter.open(str(root))
    assert a.folder == root and a.file == root / ADAPTER_WEIGHTS and a.config["r"] == 4
    assert set(a.entries) == {f"{P}{Q}.lora_A.weight", f"{P}{Q}.lora_B.weight", f"{P}{DOWN}.lora_A.weight",
                              f"{P}{DOWN}.lora_B.weight"}


@pytest.mark.parametrize("key", sorted(UNSUPPORTED_FIELDS))
def test_each_unsupported_adapter_option_is_refused_naming_it(tmp_path, key):
    message = refused(tmp_path, "is not supported", **{key: ["x"]})
    assert message == f"{tmp_path / 'lora' / ADAPTER_CONFIG}: {key}=[\"x\"]: {UNSUPPORTED_FIELDS[key]} is not supported"


@pytest.mark.parametrize("key", ["use_dora", "modules_to_save", "layer_replication"])
def test_unsupported_options_left_off_false_or_empty_are_accepted(tmp_path, key):
    for value in (False, None, []):
        assert merged(tmp_path / f"{key}-{value}", **{key: value}).lora


def test_other_peft_type_is_refused_naming_it(tmp_path):
    message = refused(tmp_path, "is not supported", peft_type="IA3")
    assert message == f"{tmp_path / 'lora' / ADAPTER_CONFIG}: peft_type 'IA3' is not supported (only LORA)"


def test_peft_type_left_out_means_lora(tmp_path):
    root = adapter(tmp_path / "lora")
    (root / ADAPTER_CONFIG).write_text(json.dumps({"r": 4, "lora_alpha": 8}))
    assert open_source(model(tmp_path / "base", llama_tensors()), lora=root).lora


def test_trained_bias_is_refused_naming_the_option(tmp_path):
    message = refused(tmp_path, "trained biases", bias="lora_only")
    assert message == (f"{tmp_path / 'lora' / ADAPTER_CONFIG}: bias='lora_only': trained biases are not supported "
                       f"(only 'none')")


def test_mica_initialisation_is_refused(tmp_path):
    message = refused(tmp_path, "MiCA", init_lora_weights="mica")
    assert message.startswith(f"{tmp_path / 'lora' / ADAPTER_CONFIG}: init_lora_weights='mica'")


@pytest.mark.parametrize("key", ["r", "lora_alpha"])
@pytest.mark.parametrize("value", [0, -4, "4", True, None, 10**400, 1e308 * 10])
def test_rank_and_alpha_must_be_positive_finite_numbers(tmp_path, key, value):
    message = refused(tmp_path, "is not a positive finite number", **{key: value})
    assert message.startswith(f"{tmp_path / 'lora' / ADAPTER_CONFIG}: {key}=")


def test_fractional_alpha_is_accepted(tmp_path):
    assert merged(tmp_path, lora_alpha=0.5).lora[f"{Q}.weight"].scale == 0.125


@pytest.mark.parametrize("key", ["rank_pattern", "alpha_pattern"])
def test_pattern_field_that_is_not_an_object_is_refused(tmp_path, key):
    message = refused(tmp_path, "is not a JSON object", **{key: ["q_proj"]})
    assert message == f"{tmp_path / 'lora' / ADAPTER_CONFIG}: {key} is not a JSON object"


@pytest.mark.parametrize("value", [0, -2, 2.0, True, "2"])
def test_rank_pattern_values_must_be_positive_integers(tmp_path, value):
    message = refused(tmp_path, "is not a positive integer", rank_pattern={"q_proj": value})
    assert message.startswith(f"{tmp_path / 'lora' / ADAPTER_CONFIG}: rank_pattern['q_proj']=")


@pytest.mark.parametrize("value", [0, -2, True, "2"])
def test_alpha_pattern_values_must_be_positive_numbers(tmp_path, value):
    message = refused(tmp_path, "is not a positive number", alpha_pattern={"q_proj": value})
    assert message.startswith(f"{tmp_path / 'lora' / ADAPTER_CONFIG}: alpha_pattern['q_proj']=")


def test_alpha_pattern_takes_fractions_and_rank_pattern_checks_do_not_apply_to_it(tmp_path):
    src = merged(tmp_path, alpha_pattern={"q_proj": 0.5}, rank_pattern={"down_proj": 4})
    assert src.lora[f"{Q}.weight"].scale == 0.125 and src.lora[f"{DOWN}.weight"].scale == 2.0


# --- LoRA: adapter tensors against the base --------------------------------------------------------------------


def lora_pair(module, rank=4, fan_in=8, fan_out=8, a="lora_A.weight", b="lora_B.weight"):
    ta, tb = pair(rank, fan_in, fan_out)
    return {f"{P}{module}.{a}": ta, f"{P}{module}.{b}": tb}


@pytest.mark.parametrize("key", [f"{P}{Q}.lora_C.weight", f"{Q}.lora_A.weight", f"x{P}{Q}.lora_A.weight"])
def test_key_that_is_not_a_lora_weight_is_refused_naming_it(tmp_path, key):
    tensors = {**lora_pair(Q), key: torch.zeros(4, 8)}
    message = refused(tmp_path, "is not a LoRA weight", tensors=tensors)
    assert message.startswith(f"{tmp_path / 'lora' / ADAPTER_WEIGHTS}: key {key!r} is not a LoRA weight")


def test_integer_adapter_tensor_is_refused_naming_it(tmp_path):
    tensors = {f"{P}{Q}.lora_A.weight": torch.zeros(4, 8, dtype=torch.int32),
               f"{P}{Q}.lora_B.weight": torch.zeros(8, 4)}
    message = refused(tmp_path, "not floating point", tensors=tensors)
    assert message == (f"{tmp_path / 'lora' / ADAPTER_WEIGHTS}: key '{P}{Q}.lora_A.weight' has dtype I32, "
                       f"not floating point")


@pytest.mark.parametrize("present,missing", [("A", "B"), ("B", "A")])
def test_half_a_pair_is_refused_naming_the_missing_half(tmp_path, present, missing):
    tensors = {k: t for k, t in lora_pair(Q).items() if f"lora_{present}" in k}
    message = refused(tmp_path, f"has no matching lora_{missing}$", tensors=tensors)
    assert f"key '{P}{Q}.lora_{present}.weight'" in message


def test_module_the_architecture_lacks_is_refused_naming_the_key(tmp_path):
    module = "model.layers.0.self_attn.x_proj"
    message = refused(tmp_path, "matches no base module", tensors=lora_pair(module))
    assert message.startswith(f"{tmp_path / 'lora' / ADAPTER_WEIGHTS}: key '{P}{module}.lora_")
    assert message.endswith(f"(no such module in {tmp_path / 'base'})")


def test_module_whose_weight_the_base_does_not_store_is_refused(tmp_path):
    base = llama_tensors()
    del base[f"{V}.weight"]
    message = refused(tmp_path, "matches no base module", base=model(tmp_path / "base", base), tensors=lora_pair(V))
    assert message.endswith(f"(the base checkpoint stores no {V}.weight in {tmp_path / 'base'})")


@pytest.mark.parametrize("module,keys,kind", [
    ("model.norm", ("lora_A.weight", "lora_B.weight"), "LlamaRMSNorm"),
    (Q, ("lora_embedding_A", "lora_embedding_B"), "Linear"),
    (EMBED, ("lora_A.weight", "lora_B.weight"), "Embedding")])
def test_lora_on_an_unsupported_module_kind_is_refused_naming_it(tmp_path, module, keys, kind):
    message = refused(tmp_path, "is not supported", tensors=lora_pair(module, a=keys[0], b=keys[1]))
    assert f"LoRA on {kind} {module!r} is not supported" in message


def test_conv1d_with_embedding_keys_is_refused(tmp_path):
    base = {"transformer.h.0.attn.c_attn.weight": torch.zeros(8, 24)}
    module = "transformer.h.0.attn.c_attn"
    message = refused(tmp_path, "is not supported", base=model(tmp_path / "base", base, GPT2),
                      tensors=lora_pair(module, 4, 8, 24, "lora_embedding_A", "lora_embedding_B"))
    assert f"LoRA on Conv1D {module!r}" in message


def test_three_dimensional_a_is_refused_as_not_a_rank_r_pair(tmp_path):
    tensors = {f"{P}{Q}.lora_A.weight": torch.zeros(4, 8, 1), f"{P}{Q}.lora_B.weight": torch.zeros(8, 4)}
    message = refused(tmp_path, "are not a rank-r pair", tensors=tensors)
    assert f"key '{P}{Q}.lora_A.weight' [4, 8, 1] and '{P}{Q}.lora_B.weight' [8, 4]" in message


def test_three_dimensional_b_is_refused_as_not_a_rank_r_pair(tmp_path):
    tensors = {f"{P}{Q}.lora_A.weight": torch.zeros(4, 8), f"{P}{Q}.lora_B.weight": torch.zeros(8, 4, 1)}
    refused(tmp_path, "are not a rank-r pair", tensors=tensors)


def test_a_and_b_of_different_ranks_are_refused(tmp_path):
    tensors = {f"{P}{Q}.lora_A.weight": torch.zeros(4, 8), f"{P}{Q}.lora_B.weight": torch.zeros(8, 3)}
    refused(tmp_path, "are not a rank-r pair", tensors=tensors)


def test_rank_other_than_the_configs_is_refused_naming_both(tmp_path):
    message = refused(tmp_path, "has rank", tensors=lora_pair(Q, rank=2))
    assert message.endswith(f"key '{P}{Q}.lora_A.weight' [2, 8] has rank 2 but {ADAPTER_CONFIG} gives {Q!r} rank 4 "
                            f"(r / rank_pattern)")


@pytest.mark.parametrize("fan_in,fan_out", [(8, 12), (12, 8)])
def test_delta_of_another_shape_than_the_base_tensor_is_refused_naming_both(tmp_path, fan_in, fan_out):
    message = refused(tmp_path, "B @ A gives", tensors=lora_pair(Q, 4, fan_in, fan_out))
    assert message.endswith(f"key '{P}{Q}.lora_B.weight': B @ A gives {[fan_out, fan_in]} for {Q!r} but the base "
                            f"tensor '{Q}.weight' is [8, 8]")


def test_transposed_delta_shape_is_checked_for_a_conv1d(tmp_path):
    base = {"transformer.h.0.attn.c_attn.weight": torch.zeros(8, 24)}
    module = "transformer.h.0.attn.c_attn"
    message = refused(tmp_path, "B @ A gives", base=model(tmp_path / "base", base, GPT2),
                      tensors=lora_pair(module, 4, 24, 8))
    assert "B @ A gives [24, 8]" in message and "is [8, 24]" in message


def test_integer_base_weight_is_refused_naming_its_file(tmp_path):
    base = llama_tensors()
    base[f"{Q}.weight"] = torch.zeros(8, 8, dtype=torch.int8)
    root = model(tmp_path / "base", base)
    message = refused(tmp_path, "LoRA needs a floating point base weight", base=root, tensors=lora_pair(Q))
    assert message == (f"{root / 'model.safetensors'}: tensor '{Q}.weight' has dtype I8; LoRA needs a floating "
                       f"point base weight")


# --- weighted average ------------------------------------------------------------------------------------------


def test_weights_default_to_equal():
    assert normalized_weights(None, 4) == [0.25] * 4


def test_weights_are_divided_by_their_sum():
    assert normalized_weights([1.0, 3.0], 2) == [0.25, 0.75]
    assert normalized_weights([0.0, 2.0], 2) == [0.0, 1.0]


def test_huge_weights_keep_their_ratios():
    assert normalized_weights([1e308, 1e308, 1e308], 3) == pytest.approx([1 / 3] * 3)
    assert normalized_weights([1.5e308, 0.5e308, 1e308], 3) == pytest.approx([0.5, 1 / 6, 1 / 3])


def test_wrong_number_of_weights_is_refused():
    with pytest.raises(InputError, match=r"^--weights: 3 weights for 2 models$"):
        normalized_weights([1.0, 1.0, 1.0], 2)


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf, -0.5])
def test_negative_or_non_finite_weight_is_refused_naming_its_position(bad):
    with pytest.raises(InputError, match=rf"^--weights: weight 2 is {bad}; weights must be finite and non-negative$"):
        normalized_weights([1.0, bad], 2)


def test_all_zero_weights_are_refused():
    with pytest.raises(InputError, match=r"^--weights: all weights are zero$"):
        normalized_weights([0.0, 0.0], 2)


def models(tmp_path, n=2, dtype=torch.bfloat16, edit=None) -> list[Path]:
    roots = []
    for i in range(n):
        tensors = llama_tensors(seed=i, dtype=dtype)
        config = dict(LLAMA)
        if edit is not None:
            edit(i, tensors, config)
        roots.append(model(tmp_path / f"m{i}", tensors, config))
    return roots


def test_average_is_the_weighted_sum_in_fp32_in_the_given_order_in_the_first_models_dtype(tmp_path):
    roots = models(tmp_path, 3)
    src = open_source(models=roots, weights=[1.0, 2.0, 5.0])
    ts = [llama_tensors(seed=i) for i in range(3)]
    for name in ts[0]:
        want = ((ts[0][name].float() * 0.125 + ts[1][name].float() * 0.25) + ts[2][name].float() * 0.625)
        got = src.read(name)
        assert got.dtype == torch.bfloat16 and torch.equal(got, want.to(torch.bfloat16)), name
    assert src.names == Checkpoint.open(roots[0]).names


def test_average_with_default_weights_is_the_mean(tmp_path):
    src = open_source(models=models(tmp_path, 2, dtype=torch.float32))
    t0, t1 = llama_tensors(0, torch.float32), llama_tensors(1, torch.float32)
    name = f"{Q}.weight"
    assert torch.equal(src.read(name), t0[name] * 0.5 + t1[name] * 0.5)
    assert src.weights == [0.5, 0.5] and "weights_given" not in src.merge


def test_average_does_not_write_into_the_first_models_tensor(tmp_path):
    src = open_source(models=models(tmp_path, 2, dtype=torch.float32))
    src.read(f"{Q}.weight")
    assert torch.equal(src.checkpoints[0].read(f"{Q}.weight"), llama_tensors(0, torch.float32)[f"{Q}.weight"])


def test_average_keeps_the_first_models_dtype(tmp_path):
    def to_fp32(i, tensors, config):
        if i == 1:
            tensors.update({k: v.float() for k, v in tensors.items()})

    src = open_source(models=models(tmp_path, 2, edit=to_fp32))
    assert src.read(f"{Q}.weight").dtype == torch.bfloat16


def test_integer_tensors_equal_in_all_models_come_from_the_first(tmp_path):
    def counter(i, tensors, config):
        tensors["model.counter"] = torch.tensor([3, 1, 2])

    src = open_source(models=models(tmp_path, 2, edit=counter))
    got = src.read("model.counter")
    assert got.dtype == torch.int64 and torch.equal(got, torch.tensor([3, 1, 2]))


def test_merge_record_names_the_models_and_the_normalised_and_given_weights(tmp_path, monkeypatch):
    models(tmp_path, 2)
    monkeypatch.chdir(tmp_path)
    src = open_source(models=["m0", "m1"], weights=[1, 3])
    assert src.merge == {"method": "average", "models": [str(tmp_path / "m0"), str(tmp_path / "m1")],
                         "weights": [0.25, 0.75], "weights_given": [1, 3]}


def test_average_presents_the_first_models_folder_config_and_files(tmp_path):
    roots = models(tmp_path, 2)
    (roots[0] / "tokenizer.json").write_text("{}")
    src = open_source(models=roots)
    first = src.checkpoints[0]
    assert (src.folder, src.config, src.entries) == (first.folder, first.config, first.entries)
    assert src.side_files() == first.side_files() and src.side_tree() == first.side_tree()
    assert input_folders(src) == roots
    names = [r["name"] for r in src.source_files()]
    assert names == [f"model1/{r['name']}" for r in first.source_files()] + \
        [f"model2/{r['name']}" for r in src.checkpoints[1].source_files()]


def test_average_needs_two_models(tmp_path):
    with pytest.raises(InputError, match="^--models: give at least two checkpoints to average$"):
        AveragedSource([Checkpoint.open(models(tmp_path, 1)[0])])


@pytest.mark.parametrize("key,value", [("model_type", "mistral"), ("architectures", ["LlamaModel"])])
def test_models_of_another_architecture_are_refused_naming_the_key(tmp_path, key, value):
    def change(i, tensors, config):
        if i == 1:
            config[key] = value

    roots = models(tmp_path, 2, edit=change)
    with pytest.raises(InputError, match="differs from") as e:
        open_source(models=roots)
    assert str(e.value) == f"{roots[1] / 'config.json'}: {key} {value!r} differs from {roots[0]}'s {LLAMA[key]!r}"


def test_quantized_model_is_refused(tmp_path):
    def quantize(i, tensors, config):
        if i == 1:
            config["quantization_config"] = {"quant_method": "compressed-tensors"}

    roots = models(tmp_path, 2, edit=quantize)
    with pytest.raises(InputError, match=rf"^{roots[1] / 'config.json'}: source is already quantized"):
        open_source(models=roots)


def test_other_config_differences_are_warned_about_by_key_and_the_first_config_kept(tmp_path, caplog):
    def change(i, tensors, config):
        config.update({"rope_theta": 1000.0 * (i + 1), "transformers_version": f"4.{i}", "_name_or_path": str(i),
                       "torch_dtype": ["bfloat16", "float32"][i], "dtype": str(i)})

    roots = models(tmp_path, 2, edit=change)
    with caplog.at_level(logging.WARNING, logger="qexport"):
        src = open_source(models=roots)
    assert src.config["rope_theta"] == 1000.0
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings == [f"{roots[1] / 'config.json'}: config differs from {roots[0]} in rope_theta; the first "
                        f"model's config is kept"]


def test_config_key_only_one_model_has_is_warned_about(tmp_path, caplog):
    def change(i, tensors, config):
        if i == 0:
            config["rope_theta"] = 5.0
        else:
            config["head_dim"] = 4

    roots = models(tmp_path, 2, edit=change)
    with caplog.at_level(logging.WARNING, logger="qexport"):
        open_source(models=roots)
    assert [r.getMessage() for r in caplog.records][0].split(" in ")[1] == "head_dim, rope_theta; the first model's config is kept"


def test_equal_configs_warn_nothing(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="qexport"):
        open_source(models=models(tmp_path, 2))
    assert caplog.records == []


def test_tensor_missing_from_a_later_model_is_refused_naming_it(tmp_path):
    def drop(i, tensors, config):
        if i == 1:
            del tensors["lm_head.weight"]

    roots = models(tmp_path, 2, edit=drop)
    with pytest.raises(InputError) as e:
        open_source(models=roots)
    assert str(e.value) == f"{roots[1]}: tensor 'lm_head.weight' is in {roots[0]} but not here"


def test_extra_tensor_in_a_later_model_is_refused_naming_it(tmp_path):
    def extra(i, tensors, config):
        if i == 1:
            tensors["model.extra"] = torch.zeros(2)

    roots = models(tmp_path, 2, edit=extra)
    with pytest.raises(InputError) as e:
        open_source(models=roots)
    assert str(e.value) == f"{roots[1] / 'model.safetensors'}: tensor 'model.extra' is not in {roots[0]}"


def test_tensor_of_another_shape_is_refused_naming_both_files(tmp_path):
    def reshape(i, tensors, config):
        if i == 1:
            tensors["model.norm.weight"] = torch.zeros(9, dtype=torch.bfloat16)

    roots = models(tmp_path, 2, edit=reshape)
    with pytest.raises(InputError) as e:
        open_source(models=roots)
    assert str(e.value) == (f"{roots[1] / 'model.safetensors'}: tensor 'model.norm.weight' has shape [9] but "
                            f"{roots[0] / 'model.safetensors'} has [8]")


@pytest.mark.parametrize("integer_in", [0, 1])
def test_integer_tensor_where_another_model_has_floats_is_refused(tmp_path, integer_in):
    def to_int(i, tensors, config):
        if i == integer_in:
            tensors["model.norm.weight"] = torch.zeros(8, dtype=torch.int32)

    roots = models(tmp_path, 2, edit=to_int)
    with pytest.raises(InputError) as e:
        open_source(models=roots)
    dtypes = ["I32", "BF16"] if integer_in == 0 else ["BF16", "I32"]
    assert str(e.value) == (f"{roots[1] / 'model.safetensors'}: tensor 'model.norm.weight' is {dtypes[1]} but "
                            f"{roots[0] / 'model.safetensors'} has {dtypes[0]}")


def test_integer_tensors_that_differ_are_refused(tmp_path):
    def counter(i, tensors, config):
        tensors["model.counter"] = torch.tensor([3, 1, i])

    roots = models(tmp_path, 2, edit=counter)
    with pytest.raises(InputError) as e:
        open_source(models=roots)
    assert str(e.value) == (f"{roots[1] / 'model.safetensors'}: integer tensor 'model.counter' differs from "
                            f"{roots[0] / 'model.safetensors'}'s; only floating point tensors can be averaged")


def test_third_model_is_checked_too(tmp_path):
    def drop(i, tensors, config):
        if i == 2:
            del tensors["lm_head.weight"]

    roots = models(tmp_path, 3, edit=drop)
    with pytest.raises(InputError, match=f"^{roots[2]}: tensor 'lm_head.weight'"):
        open_source(models=roots)


def test_origin_blames_the_files_holding_nan_or_inf_else_all(tmp_path):
    def poison(i, tensors, config):
        if i == 1:
            tensors["model.norm.weight"][3] = float("inf")

    roots = models(tmp_path, 3, edit=poison)
    src = open_source(models=roots)
    assert src.origin("model.norm.weight") == str(roots[1] / "model.safetensors")
    assert src.origin("lm_head.weight") == ", ".join(str(r / "model.safetensors") for r in roots)


# --- open_source and merge_folder ------------------------------------------------------------------------------


def test_open_source_without_merge_options_is_the_checkpoint(tmp_path):
    root = model(tmp_path / "base", llama_tensors())
    src = open_source(root)
    assert type(src) is Checkpoint and src.folder == root


@pytest.mark.parametrize("extra", [{"src": "x"}, {"lora": "x"}])
def test_models_combined_with_a_base_or_lora_is_refused(tmp_path, extra):
    with pytest.raises(InputError, match=r"^--models: averages the given checkpoints; do not combine"):
        open_source(models=models(tmp_path, 2), **extra)


def test_weights_without_models_are_refused(tmp_path):
    with pytest.raises(InputError, match=r"^--weights: only applies to --models$"):
        open_source(model(tmp_path / "base", llama_tensors()), weights=[1.0])


def test_no_model_given_is_refused():
    with pytest.raises(InputError, match=r"^no model given: name a base folder"):
        open_source()


def test_merge_folder_writes_the_merged_tensors_and_the_base_config(tmp_path):
    from safetensors.torch import load_file

    src = merged(tmp_path)
    manifest = merge_folder(src, tmp_path / "out", progress=False)
    out = load_file(tmp_path / "out" / "model.safetensors")
    assert set(out) == set(src.names) and all(torch.equal(out[n], src.read(n)) for n in src.names)
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == LLAMA
    assert manifest["source"]["merge"] == src.merge and manifest["source"]["files"] == src.source_files()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folder left


def test_merge_folder_refuses_an_existing_out_unless_overwrite(tmp_path):
    src = merged(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old").write_text("x")
    with pytest.raises(InputError, match=rf"^--out {tmp_path / 'out'}: already exists \(pass --overwrite"):
        merge_folder(src, tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "old").exists()
    merge_folder(src, tmp_path / "out", overwrite=True, progress=False)
    assert not (tmp_path / "out" / "old").exists() and (tmp_path / "out" / "model.safetensors").exists()


def test_merge_folder_refuses_a_file_as_out(tmp_path):
    src = merged(tmp_path)
    (tmp_path / "out").write_text("x")
    with pytest.raises(InputError, match=rf"^--out {tmp_path / 'out'}: exists and is not a folder$"):
        merge_folder(src, tmp_path / "out", overwrite=True, progress=False)


@pytest.mark.parametrize("inside", ["base", "lora"])
def test_merge_folder_refuses_to_write_into_an_input(tmp_path, inside):
    src = merged(tmp_path)
    with pytest.raises(InputError, match="qexport never writes into its input"):
        merge_folder(src, tmp_path / inside / "out", progress=False)


def test_lora_on_a_zero_size_weight_merges_to_the_empty_tensor(tmp_path):
    # intermediate_size 0: down_proj is Linear(0, 8), weight [8, 0]; B @ A is empty (nothing to check for NaN)
    config = {**LLAMA, "intermediate_size": 0}
    base = {f"{DOWN}.weight": torch.zeros(8, 0, dtype=torch.bfloat16), f"{Q}.weight": torch.zeros(8, 8)}
    src = merged(tmp_path, model(tmp_path / "base", base, config),
                 {f"{P}{DOWN}.lora_A.weight": torch.zeros(4, 0), f"{P}{DOWN}.lora_B.weight": torch.ones(8, 4)})
    got = src.read(f"{DOWN}.weight")
    assert got.shape == (8, 0) and got.dtype == torch.bfloat16


def test_merge_folder_shows_progress_only_when_asked(tmp_path, capsys):
    src = merged(tmp_path)
    merge_folder(src, tmp_path / "quiet", progress=False)
    assert capsys.readouterr().err == ""
    merge_folder(src, tmp_path / "shown", progress=True)
    assert capsys.readouterr().err != ""  # stderr is not a terminal here: None (auto) would show nothing


def test_merge_folder_shards_at_the_given_size(tmp_path):
    src = merged(tmp_path)
    merge_folder(src, tmp_path / "out", max_shard_size=1000, progress=False)
    shards = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "out" / "model.safetensors.index.json").exists()


def test_merge_folder_creates_a_missing_parent_and_leaves_no_temporary_folder(tmp_path):
    src = merged(tmp_path)
    out = tmp_path / "missing" / "deeper" / "out"
    merge_folder(src, out, progress=False)
    assert (out / "model.safetensors").is_file() and [p.name for p in out.parent.iterdir()] == ["out"]


def test_merge_folder_under_a_file_is_the_exports_input_error_alone(tmp_path):
    # the parent cannot be created: export() says why; the cleanup of a temporary folder never made adds nothing
    src = merged(tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match=str(tmp_path / "file")):
        merge_folder(src, tmp_path / "file" / "out", progress=False)


def test_merge_folder_holds_its_temporary_folder_so_a_concurrent_cleanup_leaves_it(tmp_path, monkeypatch):
    from qexport.merge import sources as merge
    from qexport.io.publish import TMP_MARK, remove_stale

    real = merge.export
    seen = []

    def export_with_a_cleanup_racing(source, work, options):
        remove_stale(work.parent.glob(f".out{TMP_MARK}*"))  # what another run's start does
        seen.append(work.is_dir())
        return real(source, work, options)

    monkeypatch.setattr(merge, "export", export_with_a_cleanup_racing)
    merge_folder(merged(tmp_path), tmp_path / "out", progress=False)
    assert seen == [True]


def test_merge_folder_without_overwrite_never_replaces_an_out_that_appeared_meanwhile(tmp_path, monkeypatch):
    from qexport.merge import sources as merge
    real = merge.export
    out = tmp_path / "out"

    def export_while_another_run_writes_out(source, work, options):
        out.mkdir()
        (out / "theirs").write_text("x")
        return real(source, work, options)

    monkeypatch.setattr(merge, "export", export_while_another_run_writes_out)
    with pytest.raises(InputError, match="appeared while this export was running"):
        merge_folder(merged(tmp_path), out, progress=False)
    assert [p.name for p in out.iterdir()] == ["theirs"]


def test_weights_below_one_are_fine():
    assert normalized_weights([0.5, 0.25], 2) == pytest.approx([2 / 3, 1 / 3])


def test_open_source_messages_name_the_options_as_the_cli_spells_them(tmp_path):
    with pytest.raises(InputError) as e:
        open_source()
    assert str(e.value) == "no model given: name a base folder (SRC / --base) or average several with --models"
    with pytest.raises(InputError) as e:
        open_source("x", models=["a", "b"])
    assert str(e.value) == "--models: averages the given checkpoints; do not combine it with a base/SRC or --lora"


def test_invalid_pattern_error_names_the_key_cut_at_80_characters(tmp_path):
    key = "(" + "a" * 100
    message = refused(tmp_path, "not a valid regular expression", rank_pattern={key: 4})
    assert f"{tmp_path / 'lora' / ADAPTER_CONFIG}: rank_pattern: key {key[:80]!r}: pattern" in message


def test_long_bad_values_and_pattern_names_are_cut_in_the_message(tmp_path):
    value, name = "v" * 60, "p" * 100
    assert f"r={json.dumps(value)[:40]} is not" in refused(tmp_path / "r", "positive finite", r=value)
    message = refused(tmp_path / "rank", "positive integer", rank_pattern={name: value})
    assert f"rank_pattern[{name[:80]!r}]={json.dumps(value)[:40]} is not" in message
    message = refused(tmp_path / "alpha", "positive number", alpha_pattern={name: value})
    assert f"alpha_pattern[{name[:80]!r}]={json.dumps(value)[:40]} is not" in message


def test_rank_pattern_of_one_is_accepted(tmp_path):
    tensors = lora_pair(Q, rank=1)
    assert merged(tmp_path, tensors=tensors, rank_pattern={"q_proj": 1}).lora[f"{Q}.weight"].rank == 1


def test_base_config_transformers_does_not_know_is_refused_naming_the_bases_config(tmp_path):
    root = model(tmp_path / "base", llama_tensors(), {**LLAMA, "model_type": "no-such-model-type"})
    message = refused(tmp_path, "is not known to this transformers", base=root)
    assert message.startswith(f"{root / 'config.json'}: model_type 'no-such-model-type'")


def test_adapter_without_a_config_is_refused_naming_adapter_config_json(tmp_path):
    root = adapter(tmp_path / "lora")
    (root / ADAPTER_CONFIG).unlink()
    with pytest.raises(InputError) as e:
        Adapter.open(root)
    assert str(e.value) == f"{root / ADAPTER_CONFIG}: {ADAPTER_CONFIG} not found"


def test_adapter_config_over_the_config_size_cap_is_refused(tmp_path):
    from qexport.io import safe_fs
    root = adapter(tmp_path / "lora")
    (root / ADAPTER_CONFIG).write_text(json.dumps({"r": 4, "lora_alpha": 8, "pad": "x" * safe_fs.MAX_CONFIG_BYTES}))
    with pytest.raises(InputError, match=ADAPTER_CONFIG):
        Adapter.open(root)


def test_integer_tensor_comes_from_the_first_model_in_its_dtype(tmp_path):
    # equal values in another integer dtype pass the equality check; the tensor (and its dtype) is the first's
    def counter(i, tensors, config):
        tensors["model.counter"] = torch.tensor([3, 1, 2], dtype=[torch.int64, torch.int32][i])

    src = open_source(models=models(tmp_path, 2, edit=counter))
    assert src.read("model.counter").dtype == torch.int64 and src.entries["model.counter"].dtype == "I64"


def test_fp32_base_layer_from_the_adapter_reads_the_same_twice(tmp_path):
    a, b = pair(4, 16, 8)
    copy = torch.randn(16, 8, generator=torch.Generator().manual_seed(7))
    src = merged(tmp_path, model(tmp_path / "base", llama_tensors(dtype=torch.float32)),
                 {f"{P}{EMBED}.lora_embedding_A": a, f"{P}{EMBED}.lora_embedding_B": b,
                  f"{P}{EMBED}.base_layer.weight": copy})
    first = src.read(f"{EMBED}.weight")
    assert torch.equal(src.read(f"{EMBED}.weight"), first)
    assert torch.equal(first, expected(copy, a, b, 2.0, transpose=True))


def test_lora_merge_of_an_fp64_base_is_computed_in_fp32_and_stored_in_fp64(tmp_path):
    # the module docstring's rule: every merged tensor is computed in fp32, whatever the base dtype
    base = llama_tensors(dtype=torch.float64)
    src = merged(tmp_path, model(tmp_path / "base", base))
    a, b = src.adapter.read(f"{P}{Q}.lora_A.weight"), src.adapter.read(f"{P}{Q}.lora_B.weight")
    got = src.read(f"{Q}.weight")
    assert got.dtype == torch.float64
    assert torch.equal(got, (base[f"{Q}.weight"].float() + (b @ a) * 2.0).double())
