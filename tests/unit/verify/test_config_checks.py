"""verify's config.json checks (qexport/verify/config_checks.py) called directly on hand-written folders: a config
dict and a few tensors in tmp_path, no model built or exported (milliseconds a test). docs/design.md: model_type and
every other source key survive; a quantization_config must be one transformers and vLLM load right (without the
group-level format int8 loads as packed; without quantization_status the weights load silently as garbage)."""

from __future__ import annotations

import copy

import pytest
import torch

from qexport.verify import config_checks
from tests.support.unit_verify import (
    CONFIG,
    DOWN,
    NORM,
    config_with,
    context,
    named,
    qc,
    reference_folder,
    reference_weights,
    write_folder,
)

# each check reports under the name `verify --only`, reports and baselines know it by
check_model_type = named(config_checks.check_model_type, "model_type")
check_config_keys = named(config_checks.check_config_keys, "config_keys")
check_quantization_config = named(config_checks.check_quantization_config, "quantization_config")


ref = pytest.fixture(scope="module", name="ref")(reference_folder)


def export(tmp_path, config=None, tensors=None):
    return write_folder(tmp_path / "export", reference_weights() if tensors is None else tensors,
                        config_with(quantization_config=qc()) if config is None else config)


def packed_int4() -> dict[str, torch.Tensor]:
    """down_proj [32, 64] as int4 g16 pack-quantized stores it (values do not matter to these checks)."""
    weights = reference_weights()
    weights.pop(f"{DOWN}.weight")
    return weights | {f"{DOWN}.weight_packed": torch.zeros(32, 8, dtype=torch.int32),
                      f"{DOWN}.weight_scale": torch.ones(32, 4, dtype=torch.float16),
                      f"{DOWN}.weight_shape": torch.tensor([32, 64])}


# ---------------------------------------------------------------------------------------------------------------
# model_type


def test_model_type_as_in_the_reference_passes(tmp_path, ref):
    result = check_model_type(context(export(tmp_path), ref))
    assert result.passed and result.detail == "model_type 'qwen3' as in the reference"


@pytest.mark.parametrize("model_type", [..., "", None])
def test_model_type_missing_or_empty_fails_naming_the_reference_type(tmp_path, ref, model_type):
    result = check_model_type(context(export(tmp_path, config_with(model_type=model_type)), ref))
    assert not result.passed
    assert result.detail == ("config.json has no model_type (transformers says 'Unrecognized model'); the reference "
                             "has 'qwen3'")


def test_other_model_type_fails_naming_both(tmp_path, ref):
    result = check_model_type(context(export(tmp_path, config_with(model_type="llama")), ref))
    assert not result.passed
    assert result.detail == "config.json model_type is 'llama', the reference has 'qwen3'"


@pytest.mark.parametrize("check", [check_model_type, check_config_keys, check_quantization_config])
@pytest.mark.parametrize("content,reason", [(None, "config.json is missing"),
                                             ("[1, 2]", "config.json is not a JSON object")])
def test_every_config_check_fails_on_an_unreadable_config_naming_why(tmp_path, ref, check, content, reason):
    folder = export(tmp_path, config=False)
    if content is not None:
        (folder / "config.json").write_text(content)
    result = check(context(folder, ref))
    assert not result.passed and result.detail == f"config.json: {reason}"


# ---------------------------------------------------------------------------------------------------------------
# config_keys


def test_every_source_key_kept_passes_with_an_autoconfig_round_trip(tmp_path, ref):
    result = check_config_keys(context(export(tmp_path), ref))
    assert result.passed
    assert result.detail == f"all {len(CONFIG)} source keys kept; AutoConfig round trip ok"
    assert result.metrics == {"missing_keys": [], "changed_keys": []}


@pytest.mark.parametrize("changes", [{"dtype": "bfloat16"}, {"dtype": ...}, {"torch_dtype": "float32"},
                                     {"transformers_version": "9.9.9"}, {"quantization_config": qc(8, "channel")},
                                     {"added_by_the_exporter": 1}],
                         ids=["dtype", "no_dtype", "torch_dtype", "transformers_version", "quantization_config",
                              "a_new_key"])
def test_keys_an_export_may_change_or_add_do_not_fail(tmp_path, ref, changes):
    assert check_config_keys(context(export(tmp_path, config_with(**changes)), ref)).passed


def test_a_missing_source_key_fails_naming_it(tmp_path, ref):
    result = check_config_keys(context(export(tmp_path, config_with(rms_norm_eps=...)), ref))
    assert not result.passed and result.detail == "config.json vs reference: missing rms_norm_eps"
    assert result.metrics == {"missing_keys": ["rms_norm_eps"], "changed_keys": []}


@pytest.mark.parametrize("changes", [{"vocab_size": 65}, {"tie_word_embeddings": 1},
                                     {"architectures": ["Qwen3ForCausalLM", "Extra"]}],
                         ids=["number", "true_vs_1", "list"])
def test_a_changed_source_key_fails_naming_it(tmp_path, ref, changes):
    [key] = changes
    result = check_config_keys(context(export(tmp_path, config_with(**changes)), ref))
    assert not result.passed and result.detail == f"config.json vs reference: changed {key}"
    assert result.metrics == {"missing_keys": [], "changed_keys": [key]}


def test_missing_and_changed_keys_are_both_listed(tmp_path, ref):
    config = config_with(rms_norm_eps=..., head_dim=..., vocab_size=1, hidden_size=2, num_hidden_layers=1)
    result = check_config_keys(context(export(tmp_path, config), ref))
    assert not result.passed
    assert result.detail == "config.json vs reference: missing head_dim, rms_norm_eps; changed hidden_size, vocab_size"
    assert result.metrics == {"missing_keys": ["head_dim", "rms_norm_eps"], "changed_keys": ["hidden_size",
                                                                                              "vocab_size"]}


def test_a_config_autoconfig_cannot_load_fails_with_its_error(tmp_path, ref):
    # dtype may change in an export, but to a dtype: transformers resolves the name with getattr(torch, name)
    result = check_config_keys(context(export(tmp_path, config_with(dtype="float17")), ref))
    assert not result.passed
    assert result.detail == ("AutoConfig.from_pretrained fails: AttributeError: module 'torch' has no attribute "
                             "'float17'")
    assert result.metrics == {"missing_keys": [], "changed_keys": []}


# ---------------------------------------------------------------------------------------------------------------
# quantization_config


def test_dense_export_without_a_quantization_config_passes(tmp_path, ref):
    result = check_quantization_config(context(export(tmp_path, CONFIG), ref))
    assert result.passed and result.detail == "dense export: no quantization_config, no integer weights"


def test_integer_buffers_other_than_weights_need_no_quantization_config(tmp_path, ref):
    tensors = reference_weights() | {"model.position_ids": torch.arange(4), "model.mask.weight_shape": torch.arange(2)}
    assert check_quantization_config(context(export(tmp_path, CONFIG, tensors), ref)).passed


@pytest.mark.parametrize("leaf,tensor", [("weight_packed", torch.zeros(32, 8, dtype=torch.int32)),
                                         ("weight", torch.zeros(32, 64, dtype=torch.int8))])
def test_integer_weights_without_a_quantization_config_fail(tmp_path, ref, leaf, tensor):
    tensors = reference_weights()
    tensors.pop(f"{DOWN}.weight")
    tensors[f"{DOWN}.{leaf}"] = tensor
    result = check_quantization_config(context(export(tmp_path, CONFIG, tensors), ref))
    assert not result.passed
    assert result.detail == "config.json has no quantization_config but the shards hold integer weights"


def test_float_weights_of_any_float_dtype_are_dense(tmp_path, ref):
    tensors = {NORM: torch.ones(32, dtype=torch.bfloat16), f"{DOWN}.weight": torch.zeros(32, 64, dtype=torch.float8_e4m3fn)}
    assert check_quantization_config(context(export(tmp_path, CONFIG, tensors), ref)).passed


@pytest.mark.parametrize("config,detail", [
    (qc(), "compressed-tensors pack-quantized, status compressed, 1 config group(s)"),
    (qc(8, "channel", fmt="naive-quantized"), "compressed-tensors naive-quantized, status compressed, 1 config group(s)"),
    (qc(8, "tensor", fmt="int-quantized"), "compressed-tensors int-quantized, status compressed, 1 config group(s)"),
], ids=["int4_pack", "int8_naive", "int8_int_tensor"])
def test_a_quantization_config_transformers_loads_passes_naming_format_and_groups(tmp_path, ref, config, detail):
    result = check_quantization_config(context(export(tmp_path, config_with(quantization_config=config),
                                                      packed_int4()), ref))
    assert result.passed and result.detail == detail


def test_group_format_may_be_left_out_when_the_format_is_pack_quantized(tmp_path, ref):
    # transformers assumes pack-quantized for a group without one: right when that is the format
    config = qc()
    del config["config_groups"]["group_0"]["format"]
    config["config_groups"]["group_1"] = copy.deepcopy(config["config_groups"]["group_0"])
    result = check_quantization_config(context(export(tmp_path, config_with(quantization_config=config)), ref))
    assert result.passed and result.detail.endswith("2 config group(s)")


def test_weights_type_may_be_left_out(tmp_path, ref):
    config = qc()
    del config["config_groups"]["group_0"]["weights"]["type"]
    assert check_quantization_config(context(export(tmp_path, config_with(quantization_config=config)), ref)).passed


def test_ignore_may_be_left_out(tmp_path, ref):
    config = qc()
    del config["ignore"]
    assert check_quantization_config(context(export(tmp_path, config_with(quantization_config=config)), ref)).passed


def _qc(change):
    def make():
        config = qc()
        change(config)
        return config
    return make


def _group(change):
    return _qc(lambda q: change(q["config_groups"]["group_0"]))


def _weights(change):
    return _group(lambda g: change(g["weights"]))


G = "config_groups.group_0"
QC_FAULTS = [
    # (id, config.json's quantization_config, the check's whole detail)
    ("not_an_object", lambda: ["compressed-tensors"], "quantization_config is not an object"),
    ("quant_method", _qc(lambda q: q.update(quant_method="gptq")), "quant_method is 'gptq', not 'compressed-tensors'"),
    ("no_quant_method", _qc(lambda q: q.pop("quant_method")), "quant_method is None, not 'compressed-tensors'"),
    ("format", _qc(lambda q: q.update(format="marlin-24")),
     ("format 'marlin-24' is not one of pack-quantized, naive-quantized, int-quantized; "
     f"{G}.format 'pack-quantized' differs from format 'marlin-24'")),
    ("status_missing", _qc(lambda q: q.pop("quantization_status")),
     "quantization_status is None, must be 'compressed' (else transformers silently loads garbage)"),
    ("status_frozen", _qc(lambda q: q.update(quantization_status="frozen")),
     "quantization_status is 'frozen', must be 'compressed' (else transformers silently loads garbage)"),
    ("groups_missing", _qc(lambda q: q.pop("config_groups")), "config_groups is missing or empty"),
    ("groups_empty", _qc(lambda q: q.update(config_groups={})), "config_groups is missing or empty"),
    ("groups_list", _qc(lambda q: q.update(config_groups=[{"targets": ["Linear"]}])), "config_groups is missing or empty"),
    ("groups_not_objects", _qc(lambda q: q.update(config_groups={"a": "x", "b": 1})),
     "config_groups.a is not an object; config_groups.b is not an object"),
    ("no_targets", _group(lambda g: g.pop("targets")), f"{G} has no targets"),
    ("empty_targets", _group(lambda g: g.update(targets=[])), f"{G} has no targets"),
    ("no_group_format_naive", _qc(lambda q: (q.update(format="naive-quantized"), q["config_groups"]["group_0"].pop(
        "format"))), f"{G} has no format (it would load as pack-quantized)"),
    ("group_format_differs", _group(lambda g: g.update(format="int-quantized")),
     f"{G}.format 'int-quantized' differs from format 'pack-quantized'"),
    ("no_weights", _group(lambda g: g.pop("weights")), f"{G} has no weights args"),
    ("weights_not_object", _group(lambda g: g.update(weights=[4])), f"{G} has no weights args"),
    ("num_bits_2", _weights(lambda w: w.update(num_bits=2)), f"{G}.weights.num_bits 2 is not 4 or 8"),
    ("num_bits_missing", _weights(lambda w: w.pop("num_bits")), f"{G}.weights.num_bits None is not 4 or 8"),
    ("type_float", _weights(lambda w: w.update(type="float")), f"{G}.weights.type 'float' is not 'int'"),
    ("strategy_block", _weights(lambda w: w.update(strategy="block")),
     f"{G}.weights.strategy 'block' is not channel, group or tensor"),
    ("strategy_missing", _weights(lambda w: w.pop("strategy")),
     f"{G}.weights.strategy None is not channel, group or tensor"),
    ("group_size_zero", _weights(lambda w: w.update(group_size=0)), f"{G}.weights.group_size 0 is not positive"),
    ("group_size_negative", _weights(lambda w: w.update(group_size=-128)), f"{G}.weights.group_size -128 is not positive"),
    ("group_size_text", _weights(lambda w: w.update(group_size="128")), f"{G}.weights.group_size '128' is not positive"),
    ("group_size_missing", _weights(lambda w: w.pop("group_size")), f"{G}.weights.group_size None is not positive"),
    ("ignore_not_list", _qc(lambda q: q.update(ignore="lm_head")), "ignore is not a list"),
]


@pytest.mark.parametrize("make,detail", [f[1:] for f in QC_FAULTS], ids=[f[0] for f in QC_FAULTS])
def test_a_quantization_config_loaders_misread_fails_saying_what_is_wrong(tmp_path, ref, make, detail):
    result = check_quantization_config(context(export(tmp_path, config_with(quantization_config=make()),
                                                      packed_int4()), ref))
    assert not result.passed and result.detail == detail


def test_every_group_is_checked_not_only_the_first(tmp_path, ref):
    config = qc()
    config["config_groups"] = {"a": {"targets": ["Linear"], "format": "pack-quantized"},
                               "b": {"format": "pack-quantized", "weights": {"num_bits": 4, "strategy": "channel"}},
                               "c": {"targets": ["Linear"], "format": "pack-quantized",
                                     "weights": {"num_bits": 3, "strategy": "channel"}}}
    result = check_quantization_config(context(export(tmp_path, config_with(quantization_config=config)), ref))
    assert not result.passed
    assert result.detail == ("config_groups.a has no weights args; config_groups.b has no targets; "
                             "config_groups.c.weights.num_bits 3 is not 4 or 8")


def test_a_group_of_one_is_a_positive_group_size(tmp_path, ref):
    config = config_with(quantization_config=qc(group_size=1))
    assert check_quantization_config(context(export(tmp_path, config), ref)).passed


def test_channel_and_tensor_strategies_need_no_group_size(tmp_path, ref):
    for strategy in ("channel", "tensor"):
        config = qc(8, strategy)
        assert "group_size" not in config["config_groups"]["group_0"]["weights"]
        assert check_quantization_config(context(export(tmp_path / strategy, config_with(quantization_config=config)),
                                                 ref)).passed
