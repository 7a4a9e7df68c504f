"""quant.scheme picks the config group of a module as compressed-tensors does when transformers loads a model:
every answer is compared with compressed-tensors' own `is_match` (one target) and `apply_quantization_config`
(groups and ignore together) on the same module names and modules. Malformed configs target nothing, and `re:`
patterns go through io.untrusted_regex (bounded; errors name the key)."""

from __future__ import annotations

import pytest
import torch
from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
from compressed_tensors.utils.match import is_match

from qexport.errors import InputError
from qexport.quant import scheme
from qexport.quant.scheme import LINEAR, classes_of, group_for, is_ignored, weights_args

DOWN, UP = "model.layers.0.mlp.down_proj", "model.layers.0.mlp.up_proj"


class Mlp(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up_proj, self.down_proj = torch.nn.Linear(16, 16, bias=False), torch.nn.Linear(16, 16, bias=False)


class Layer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = Mlp()


class Body(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens, self.layers = torch.nn.Embedding(4, 16), torch.nn.ModuleList([Layer()])


class Tiny(torch.nn.Module):
    """Module names of a causal LM: model.embed_tokens, model.layers.0.mlp.{up,down}_proj, lm_head."""

    def __init__(self):
        super().__init__()
        self.model, self.lm_head = Body(), torch.nn.Linear(16, 4, bias=False)


def weights(bits: int) -> dict:
    return {"num_bits": bits, "type": "int", "strategy": "channel", "symmetric": True}


def config(*groups, ignore=()) -> dict:
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "frozen",
            "config_groups": {f"group_{i}": {"targets": list(targets), "weights": weights(bits)}
                              for i, (targets, bits) in enumerate(groups)},
            "ignore": list(ignore)}


TARGETS = ["Linear", "Embedding", "Module", "lm_head", "down_proj", DOWN, "mlp", "re:.*down_proj", "re:model",
           "re:.*mlp\\.(up|down)_proj", "re:Linear", "re:lm_head$", "re:.*proj$", "re:model\\.layers\\.\\d+\\.mlp$",
           "re:(?i)LM_HEAD"]


@pytest.mark.parametrize("target", TARGETS)
def test_one_target_matches_the_modules_compressed_tensors_is_match_does(target):
    for name, module in Tiny().named_modules():
        assert scheme.matches(target, name, classes_of(module)) == is_match(name, module, target), (target, name)


CONFIGS = {
    "linear": config((["Linear"], 4)),
    "linear_ignore_lm_head": config((["Linear"], 4), ignore=["lm_head"]),
    "pattern_beats_class": config((["Linear"], 4), (["re:.*down_proj"], 8), ignore=["lm_head"]),
    "name_beats_pattern": config((["re:.*proj"], 4), ([DOWN], 8)),
    "plain_name_is_not_a_suffix": config((["Linear"], 4), (["down_proj"], 8)),
    "pattern_is_a_prefix_match": config((["re:model"], 8)),
    "later_group_owns_a_shared_target": config((["Linear"], 4), (["Linear"], 8)),
    "ignore_by_pattern": config((["Linear"], 4), ignore=["re:.*down"]),
    "ignore_by_class": config(([DOWN, "lm_head"], 8), ignore=["Linear"]),
    "embedding_class": config((["Embedding"], 8), (["Linear"], 4)),
    "patterns_sorted_not_listed": config((["re:model.*"], 4), (["re:model.layers.*"], 8)),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_the_group_of_every_module_is_the_one_compressed_tensors_applies(name):
    qc = CONFIGS[name]
    model = Tiny()
    apply_quantization_config(model, QuantizationConfig.model_validate(qc))
    for module_name, module in model.named_modules():
        if not isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            continue  # compressed-tensors quantizes only these (and attention), whatever else a target matches
        applied = getattr(module, "quantization_scheme", None)
        expected = applied.weights.num_bits if applied is not None and applied.weights is not None else None
        ours = weights_args(qc, module_name, classes_of(module))
        assert (ours["num_bits"] if ours else None) == expected, module_name


def test_an_nn_linear_answers_to_linear_and_module():
    assert classes_of(torch.nn.Linear(2, 2)) == LINEAR
    assert classes_of(Tiny()) == ("Tiny", "Module")


def test_with_classes_unknown_a_camel_case_target_matches_after_names_and_patterns():
    qc = config((["Linear"], 4), (["re:.*down_proj"], 8), (["lm_head"], 2))
    assert group_for(qc, DOWN, classes=None)[0] == "group_1"
    assert group_for(qc, "lm_head", classes=None)[0] == "group_2"
    assert group_for(qc, UP, classes=None)[0] == "group_0"
    assert group_for(config((["re:Linear"], 4)), UP, classes=None) is None  # a pattern never names a class
    assert group_for(config((["lm_head"], 4)), UP, classes=None) is None  # lower case: a module name, not a class


def test_names_alone_leave_class_entries_out():
    assert not is_ignored(config(ignore=["Linear"]), DOWN, classes=())
    assert is_ignored(config(ignore=["Linear"]), DOWN)
    assert is_ignored(config(ignore=[DOWN]), DOWN, classes=())


@pytest.mark.parametrize("qc", [
    {}, None, [], {"config_groups": None}, {"config_groups": ["Linear"]}, {"config_groups": {"g": "Linear"}},
    {"config_groups": {"g": {"targets": "Linear", "weights": weights(4)}}},
    {"config_groups": {"g": {"targets": [4, None], "weights": weights(4)}}},
    {"config_groups": {"g": {"targets": ["Linear"], "weights": "int4"}}},
    {"config_groups": {"g": {"targets": ["Linear"], "weights": None}}},
])
def test_malformed_groups_target_nothing(qc):
    assert weights_args(qc, DOWN) is None


def test_a_malformed_entry_is_skipped_not_the_whole_list():
    assert weights_args({"config_groups": {"g": {"targets": [4, "Linear"], "weights": weights(4)}}}, DOWN)
    assert weights_args(config((["Linear"], 4), ignore=[None, DOWN]), DOWN) is None
    qc = config((["Linear"], 4))
    qc["ignore"] = "down_proj"  # ignore must be a list
    assert weights_args(qc, DOWN)["num_bits"] == 4


def test_patterns_from_the_config_are_checked_and_errors_name_the_key():
    with pytest.raises(InputError, match=r"config.json: quantization_config: pattern '\(' is not a valid regular"):
        weights_args(config((["re:("], 4)), DOWN)
    with pytest.raises(InputError, match="exponential backtracking"):
        weights_args(config((["Linear"], 4), ignore=["re:(a+)+$"]), DOWN)
