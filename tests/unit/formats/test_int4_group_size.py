"""INT4 group size: by default the largest of 128, 64, 32 that every Linear's input divides by (no silently dense
Linears); `--group-size N` is taken as given. Every export says how much of its Linears is quantized."""

from __future__ import annotations

import logging

import pytest

from qexport.io.checkpoint import load_config
from qexport.export.pipeline import ExportOptions, choose_group_size, export_folder
from qexport.verify.functional import load_model

# hidden 576 (SmolLM2-135M's width): 576 = 4.5 x 128 = 9 x 64, so group 128 fits no attention / up / gate input.
HIDDEN_576 = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                  head_dim=64)


@pytest.fixture(scope="module")
def hidden576_src(build_model):
    return build_model("llama", **HIDDEN_576)


@pytest.fixture(scope="module")
def hidden576_int4(hidden576_src, export_model):
    out, manifests = export_model(hidden576_src, formats=("int4",))
    return out / "int4", manifests["int4"]


@pytest.mark.parametrize("inputs,expected", [
    ([256, 768], 128),       # every input divides by 128
    ([576, 1536], 64),       # SmolLM2-135M: 576 divides by 64, not 128
    ([576, 1536, 96], 32),   # one input of 96 only divides by 32
    ([100, 256], 128),       # nothing divides every input: the size that quantizes most weights
])
def test_default_group_size_is_the_largest_that_divides_every_linear_input(inputs, expected):
    assert choose_group_size([(64, cols) for cols in inputs]) == expected


def test_hidden_576_int4_quantizes_every_linear_at_group_64(hidden576_int4):
    folder, manifest = hidden576_int4
    summary = manifest["summary"]
    assert manifest["dense_linears"] == {}
    assert summary["quantized_linears"] == summary["linear_weights"] == 2 * 7  # 2 layers x (q k v o gate up down)
    assert summary["quantized_linear_share"] == 1.0
    assert manifest["parameters"]["group_size_choice"] == "auto"
    weights = load_config(folder)["quantization_config"]["config_groups"]["group_0"]["weights"]
    assert weights["group_size"] == 64


def test_hidden_576_card_names_group_64_and_the_quantized_share(hidden576_int4):
    folder, _ = hidden576_int4
    card = (folder / "README.md").read_text()
    assert "(group 64)" in card
    assert "one float16 scale per group of 64 input columns" in card or "per group of 64 input columns" in card
    assert "14 of 14 targeted `nn.Linear` weights, 100.0% of their bytes" in card


def test_hidden_576_int4_reloads_in_transformers_with_empty_loading_info(hidden576_int4):
    folder, _ = hidden576_int4
    _, info = load_model(folder)
    assert not any(info.values()), info


def test_hidden_576_int4_passes_verify_and_reports_the_share(hidden576_int4, hidden576_src):
    from qexport.verify import verify

    result = verify(hidden576_int4[0], hidden576_src)
    assert result.passed, [(c.name, c.detail) for c in result.failures]
    assert result.metrics["quantized_linear_share"] == 1.0
    assert "14/14 Linears quantized" in next(c.detail for c in result.checks if c.name == "bytes")


def test_given_group_size_is_strict_and_the_share_says_what_stayed_dense(hidden576_src, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="qexport"):
        manifest = export_folder(hidden576_src, tmp_path / "out",
                                 ExportOptions(formats=("int4",), group_size=128, progress=False))["int4"]
    summary = manifest["summary"]
    # Only down_proj (input 1536 = 12 x 128) divides: 2 of 14 Linears, 1536*576 of each layer's 7*... weights.
    assert summary["quantized_linears"] == 2
    mlp, attn = 3 * 576 * 1536, 2 * 576 * 576 + 2 * 576 * 192  # q, o: 576x576; k, v: 192x576
    assert summary["quantized_linear_share"] == pytest.approx(576 * 1536 / (mlp + attn))
    assert manifest["parameters"]["group_size_choice"] == "given"
    dense = [r.getMessage() for r in caplog.records if "stay dense" in r.getMessage()]
    assert len(dense) == 1 and "int4: 12 Linear weight(s) stay dense" in dense[0]  # one line, not one per Linear
    assert "2 of 14 targeted `nn.Linear` weights" in (tmp_path / "out" / "int4" / "README.md").read_text()


def test_export_summary_table_shows_linears_quantized(hidden576_int4):
    from qexport.report.terminal import export_rows

    row = export_rows({"int4": hidden576_int4[1]})[0]
    assert row["linears_quantized"] == "14/14 (100% of bytes), g64"
