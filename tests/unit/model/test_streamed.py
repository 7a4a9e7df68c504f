"""Layer-streamed model runs (qexport/model/streamed.py and the verify sources in qexport/verify/functional.py):
the architecture on `meta`, each module's (decoder block's) parameters read just before its forward and dropped
after; outputs bit for bit those of the model loaded whole; a whole-model load where streaming is not possible;
reload's loading info from a `from_pretrained` onto `meta` equal to a full load's. On a two-layer qwen3 of hidden
32 (no tokenizer: 4 x 64 seeded random ids), built and exported to int4 once per module."""

from __future__ import annotations

import pytest
import torch

from qexport.export.pipeline import ExportOptions, export_folder
from qexport.io.checkpoint import Checkpoint
from qexport.model.streamed import NotStreamable, WeightSource, streamed_model
from qexport.verify import functional
from qexport.verify import context as context_module
from qexport.verify.context import Context
from tests.support import defects


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(reference folder, its int4 export): qwen3, 2 layers, hidden 128, bf16, no tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    root = tmp_path_factory.mktemp("streamed")
    config = AutoConfig.for_model("qwen3", hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                  num_attention_heads=2, num_key_value_heads=1, head_dim=64, vocab_size=64,
                                  max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(root / "ref")
    export_folder(root / "ref", root / "out", ExportOptions(formats=("int4",), progress=False))
    return root / "ref", root / "out" / "int4"


def ids():
    return functional.fixed_token_ids(64)


def logits(model):
    return torch.stack(list(functional.window_logits(model, ids())))


def test_streamed_reference_logits_equal_the_whole_model_bit_for_bit(tiny):
    ckpt = Checkpoint.open(tiny[0])
    whole = logits(functional.load_streamed(tiny[0]))
    assert torch.equal(logits(streamed_model(ckpt.config, functional.reference_source(ckpt))), whole)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streamed_export_equals_transformers_load_bit_for_bit(tiny, dtype):
    ckpt = Checkpoint.open(tiny[1])
    model, _ = functional.load_model(tiny[1], dtype)
    streamed = streamed_model(ckpt.config, functional.transformers_source(ckpt, dtype), dtype)
    assert torch.equal(logits(streamed), logits(model))


def test_each_weight_is_read_once_per_run_with_all_windows_in_one_pass(tiny):
    ckpt = Checkpoint.open(tiny[0])
    model = streamed_model(ckpt.config, functional.reference_source(ckpt))
    logits(model)
    assert model.weights_map.reads == len(ckpt.names)


def test_at_most_one_decoder_block_or_one_other_module_holds_parameters_at_a_time(tiny):
    ckpt = Checkpoint.open(tiny[0])
    model = streamed_model(ckpt.config, functional.reference_source(ckpt))
    owners = {name: (name.split(".")[:3] if ".layers." in name else name.rsplit(".", 1)[:1])
              for name, _ in model.named_parameters()}

    def live():
        return {tuple(owners[n]) for n, p in model.named_parameters() if p.device.type != "meta"}

    seen, during_down_proj = [], []
    handles = [m.register_forward_hook(lambda m, a, o: seen.append(live())) for m in model.modules()]
    model.model.layers[1].mlp.down_proj.register_forward_pre_hook(lambda m, a: during_down_proj.append(live()))
    logits(model)
    for handle in handles:
        handle.remove()
    assert max(len(owners_now) for owners_now in seen) == 1
    assert during_down_proj == [{("model", "layers", "1")}]
    assert live() == set()  # all dropped after the run


def test_a_checkpoint_name_the_model_does_not_have_is_not_streamable(tiny):
    ckpt = Checkpoint.open(tiny[0])
    renamed = WeightSource([n.replace("model.", "base.") for n in ckpt.names], ckpt.read)
    with pytest.raises(NotStreamable, match="not in the checkpoint"):
        streamed_model(ckpt.config, renamed)


def test_a_module_reading_a_weight_outside_its_forward_falls_back_to_the_whole_model(tiny, monkeypatch):
    from transformers.models.qwen3 import modeling_qwen3

    real = modeling_qwen3.Qwen3Model.forward

    def forward(self, *args, **kwargs):
        self.norm.weight.sum().item()  # the final norm's weight, read outside the norm's own forward
        return real(self, *args, **kwargs)

    monkeypatch.setattr(modeling_qwen3.Qwen3Model, "forward", forward)
    monkeypatch.setattr(context_module, "_REFERENCE_OUTPUTS", {})  # outputs cached here stay with this test
    from qexport.verify import functional_checks

    ctx = Context(tiny[1], tiny[0])
    result = functional_checks.check_functional(ctx)
    assert result.passed, result.detail
    assert "reference: whole-model load: RuntimeError" in result.detail
    assert "export bfloat16: whole-model load: RuntimeError" in result.detail


def test_a_streamed_run_says_nothing_in_the_detail(tiny):
    from qexport.verify import functional_checks

    result = functional_checks.check_functional(Context(tiny[1], tiny[0]))
    assert result.passed and "whole-model" not in result.detail


def info(folder, meta):
    return functional.load_model(folder, torch.float32, meta=meta)[1]


def test_loading_info_on_meta_equals_a_full_load_on_a_good_export(tiny):
    assert info(tiny[1], True) == info(tiny[1], False) == {"missing_keys": [], "unexpected_keys": [],
                                                           "mismatched_keys": []}


def test_loading_info_on_meta_equals_a_full_load_without_quantization_status(tiny, tmp_path):
    import shutil

    folder = tmp_path / "int4"
    shutil.copytree(tiny[1], folder)
    defects.edit_json(folder / "config.json", lambda c: c["quantization_config"].pop("quantization_status"))
    full = info(folder, False)
    assert any(full.values()) and info(folder, True) == full


def test_loading_on_meta_refuses_a_tensor_of_the_wrong_shape_as_a_full_load_does(tiny, tmp_path):
    import shutil

    folder = tmp_path / "int4"
    shutil.copytree(tiny[1], folder)
    name = "model.layers.0.mlp.down_proj.weight_scale"
    defects.edit_tensors(folder, lambda t: t.update({name: t[name][:, :1].contiguous()}))
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes") as full:
        info(folder, False)
    with pytest.raises(RuntimeError) as meta:
        info(folder, True)
    assert str(meta.value) == str(full.value)
