"""Each way config.json can be wrong fails its check with a detail naming what is wrong: one planted fault per row on
a copy of one int4 export, verified with that check only (about a second a row). Found by mutation testing of
qexport/verify/config_checks.py (bench/MUTATION.md): branches no planted defect reached."""

from __future__ import annotations

import shutil

import pytest

from qexport.verify import verify
from tests.support import defects


def qc(change):
    return lambda c: change(c["quantization_config"])


def group(change):
    return lambda c: change(c["quantization_config"]["config_groups"]["group_0"])


def weights(change):
    return lambda c: change(c["quantization_config"]["config_groups"]["group_0"]["weights"])


CONFIG_FAULTS = [
    # (id, change to config.json, check, phrase in the detail)
    ("no_model_type", lambda c: c.pop("model_type"), "model_type", "config.json has no model_type"),
    ("model_type_empty", lambda c: c.update(model_type=""), "model_type", "the reference has 'qwen3'"),
    ("model_type_other", lambda c: c.update(model_type="llama"), "model_type",
     "config.json model_type is 'llama', the reference has 'qwen3'"),
    ("key_missing", lambda c: c.pop("rms_norm_eps"), "config_keys", "missing rms_norm_eps"),
    ("key_changed", lambda c: c.update(vocab_size=c["vocab_size"] + 1), "config_keys", "changed vocab_size"),
    ("unknown_model_type_for_autoconfig", lambda c: c.update(model_type="no-such-model"), "config_keys",
     "changed model_type"),
    ("quant_method", qc(lambda q: q.update(quant_method="gptq")), "quantization_config",
     "quant_method is 'gptq', not 'compressed-tensors'"),
    ("format_unknown", qc(lambda q: q.update(format="marlin-24")), "quantization_config",
     "format 'marlin-24' is not one of"),
    ("status_missing", qc(lambda q: q.pop("quantization_status")), "quantization_config",
     "quantization_status is None, must be 'compressed'"),
    ("groups_empty", qc(lambda q: q.update(config_groups={})), "quantization_config", "config_groups is missing or empty"),
    ("groups_not_object", qc(lambda q: q.update(config_groups=[1])), "quantization_config",
     "config_groups is missing or empty"),
    ("group_not_object", qc(lambda q: q["config_groups"].update(group_0="x")), "quantization_config",
     "config_groups.group_0 is not an object"),
    ("no_targets", group(lambda g: g.update(targets=[])), "quantization_config", "config_groups.group_0 has no targets"),
    ("group_format_differs", group(lambda g: g.update(format="int-quantized")), "quantization_config",
     "config_groups.group_0.format 'int-quantized' differs from format 'pack-quantized'"),
    ("no_weights", group(lambda g: g.pop("weights")), "quantization_config", "config_groups.group_0 has no weights args"),
    ("num_bits", weights(lambda w: w.update(num_bits=2)), "quantization_config",
     "config_groups.group_0.weights.num_bits 2 is not 4 or 8"),
    ("type_float", weights(lambda w: w.update(type="float")), "quantization_config",
     "config_groups.group_0.weights.type 'float' is not 'int'"),
    ("strategy", weights(lambda w: w.update(strategy="block")), "quantization_config",
     "weights.strategy 'block' is not channel, group or tensor"),
    ("group_size_zero", weights(lambda w: w.update(group_size=0)), "quantization_config",
     "weights.group_size 0 is not positive"),
    ("group_size_text", weights(lambda w: w.update(group_size="128")), "quantization_config",
     "weights.group_size '128' is not positive"),
    ("ignore_not_list", qc(lambda q: q.update(ignore="lm_head")), "quantization_config", "ignore is not a list"),
    ("no_quantization_config", lambda c: c.pop("quantization_config"), "quantization_config",
     "config.json has no quantization_config but the shards hold integer weights"),
    ("quantization_config_not_object", lambda c: c.update(quantization_config=[]), "quantization_config",
     "quantization_config is not an object"),
]


@pytest.fixture(scope="module")
def int4_export(qwen3_src, export_model):
    out, _ = export_model(qwen3_src)
    return out


@pytest.mark.parametrize("fault_id,change,check,phrase", CONFIG_FAULTS, ids=[f[0] for f in CONFIG_FAULTS])
def test_config_fault_fails_its_check_naming_it(tmp_path, qwen3_src, int4_export, fault_id, change, check, phrase):
    folder = tmp_path / "int4"
    shutil.copytree(int4_export / "int4", folder)
    (folder / "qexport.json").unlink()
    defects.edit_json(folder / "config.json", change)
    [result] = verify(folder, qwen3_src, only=[check]).checks
    assert not result.passed and phrase in result.detail, result.detail


def test_a_config_json_that_is_not_json_fails_every_config_check_naming_it(tmp_path, qwen3_src, int4_export):
    folder = tmp_path / "int4"
    shutil.copytree(int4_export / "int4", folder)
    (folder / "config.json").write_text("{")
    for result in verify(folder, qwen3_src, only=["model_type", "config_keys", "quantization_config"]).checks:
        assert not result.passed and result.detail.startswith("config.json: "), (result.name, result.detail)


@pytest.mark.parametrize("fmt,detail", [("int4", "compressed-tensors pack-quantized, status compressed, 1 config "
                                                 "group(s)"),
                                        ("fp16", "dense export: no quantization_config, no integer weights")])
def test_good_exports_pass_the_config_checks_saying_what_they_saw(qwen3_src, int4_export, fmt, detail):
    checks = {c.name: c for c in verify(int4_export / fmt, qwen3_src,
                                        only=["model_type", "config_keys", "quantization_config"]).checks}
    assert all(c.passed for c in checks.values()), [(c.name, c.detail) for c in checks.values()]
    assert checks["quantization_config"].detail == detail
    assert checks["model_type"].detail == "model_type 'qwen3' as in the reference"
    assert checks["config_keys"].detail.endswith("source keys kept; AutoConfig round trip ok")
    assert checks["config_keys"].metrics == {"missing_keys": [], "changed_keys": []}
