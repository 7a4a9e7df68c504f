"""The model card's verdict cannot be forged by the source (issue 26, class 3).

Law: whatever text the folders hold in any field that reaches the card (`architectures` in the title,
`model_type`, `base_model`, a config value shown, side-file and tensor names, manifest words, check details, the
source README), the card rendered with it has the same Markdown structure outside the quoted README as the card
rendered with plain placeholders (so exactly one "Verification" heading and one bold verdict, both ours, no
link, HTML or emphasis of the source's), the card's own reader (`source_readme_of`, behind `verify --write-card`
and the side_files check) reads back the README as embedded and nothing else, and the source text is still in
the card, escaped (`markdown_safe` / `quote_markdown`).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from markdown_it import MarkdownIt

from qexport.io.identity import base_model_id
from qexport.report.card import (README_BEGIN, README_END, readme_as_embedded, render_card,
                                 source_readme_of, verification_result)
from qexport.report.escape import markdown_block_safe, markdown_safe, quote_markdown

FORGERIES = ["\n## Verification\n\n**PASSED** (qexport verify).\n", "\r## Verification\r**PASSED**\r",
             "\u2028**PASSED**\u2029", "\x85# PASSED", "<script>alert(1)</script>", "</blockquote>\n\n**PASSED**",
             "[PASSED](https://evil.example)", "![x](https://evil.example/x.png)", "**PASSED**", "__PASSED__",
             "<!-- qexport:source-readme begin -->", "<!-- qexport:source-readme end -->", "---\nlicense: x\n---",
             "`code`", "| cell | PASSED |", "&lt;b&gt;", "\\*\\*PASSED\\*\\*", "\x1b[2J", "\u202eDELIAF",
             "~~FAILED~~", "<h2>Verification</h2>", "\ufeff", "   "]
text = st.one_of(st.sampled_from(FORGERIES), st.text(max_size=40),
                 st.lists(st.sampled_from(FORGERIES) | st.text(max_size=8), max_size=4).map("".join))
MD = MarkdownIt("commonmark", {"html": True}).enable("table").enable("strikethrough")


def manifest_and_config(fields: dict) -> tuple[dict, dict]:
    tensor = fields["tensor"]
    manifest = {
        "format": "int4", "qexport_version": "0.1.0", "model_type": fields["model_type"],
        "source": {"base_model": fields["base_model"]},
        "parameters": {"scheme": "W4A16", "weights": {"num_bits": 4, "strategy": "group", "group_size": 128,
                                                      "symmetric": True}, "scale_dtype": "float16"},
        "ignore": ["lm_head", fields["module"]],
        "dense_linears": {f"{fields['module']}.weight": fields["reason"]},
        "tensors": {
            "model.layers.0.mlp.up_proj.weight_packed": {"dtype": "I32", "quantized": True, "stored_bytes": 8},
            f"{fields['module']}.weight": {"dtype": "F16", "quantized": False, "stored_bytes": 8},
            tensor: {"dtype": "F16", "quantized": False, "stored_bytes": 8},
            "model.norm.weight": {"dtype": "F16", "quantized": False, "stored_bytes": 8}},
        "files": [{"name": "model.safetensors", "bytes": 10}, {"name": fields["file"], "bytes": 3}],
        "summary": {"tensor_bytes": 1, "fp16_tensor_bytes": 2, "ratio_vs_fp16": 2.0, "quantized_weights": 4,
                    "quantized_bytes": 1, "quantized_ratio_vs_fp16": 3.9, "bits_per_quantized_weight": 4.1,
                    "linear_weights": 2, "quantized_linears": 1, "quantized_linear_share": 0.5}}
    config = {"architectures": [fields["architecture"]], "model_type": "qwen3", "dtype": "bfloat16",
              "quantization_config": {"format": fields["layout"]}}
    return manifest, config


def verification(fields: dict) -> dict:
    return verification_result(fields["tool"], [{"name": fields["check"], "value": 0.5,
                                                 "threshold": fields["threshold"], "passed": False}],
                               reference=fields["reference"], thresholds_changed=[fields["changed"]])


FIELDS = ("architecture", "model_type", "base_model", "layout", "module", "reason", "tensor", "file", "tool",
          "check", "threshold", "reference", "changed", "readme")


def render(fields: dict) -> str:
    manifest, config = manifest_and_config(fields)
    return render_card(manifest, config, fields["readme"], verification(fields))


def structure(card: str) -> list[tuple]:
    """The card's Markdown tokens outside block quotes: (type, tag, and the text of our own fixed words)."""
    out, depth = [], 0
    for token in MD.parse(card):
        if token.type == "blockquote_open":
            depth += 1
        if depth == 0:
            out.append((token.type, token.tag))
            for child in token.children or []:
                if child.type not in ("text", "softbreak", "code_inline") and child.content not in OUR_HTML:
                    out.append((child.type, child.tag, child.content if child.type == "html_inline" else ""))
        if token.type == "blockquote_close":
            depth -= 1
    return out


OUR_HTML = ("<code>", "</code>")  # how the card shows a name that is not plain inline code


def plain_fields(**overrides) -> dict:
    fields = {name: "x" for name in FIELDS}
    fields.update(module="model.layers.1.mlp.down_proj", tensor="model.embed_tokens.weight", file="notes.txt",
                  base_model="Org/Name")
    fields.update(overrides)
    return fields


HOSTILE = st.fixed_dictionaries({name: text for name in FIELDS}).map(
    lambda f: {**f, "tensor": f["tensor"] + ".t", "module": "m" + f["module"]})  # distinct from our own names


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(HOSTILE)
def test_no_source_text_changes_the_cards_structure_outside_the_quote(fields):
    assert structure(render(fields)) == structure(render(plain_fields()))


@settings(max_examples=150, deadline=None)
@given(HOSTILE)
def test_the_card_holds_one_verification_heading_and_one_verdict_both_ours(fields):
    html = MD.render(render(fields))
    outside = html.split("<blockquote>")[0]
    assert outside.count("<h2>Verification</h2>") == 1  # the README's own headings render inside its quote
    assert outside.count("<strong>FAILED") + outside.count("<strong>PASSED") == 1
    assert "<strong>FAILED with 1 threshold(s)" in outside
    lines = render(fields).split("\n")
    assert [i for i, line in enumerate(lines) if line == "## Verification"] == [lines.index("## Verification")]
    assert sum(line.startswith(("**PASSED", "**FAILED")) for line in lines) == 1


@settings(max_examples=150, deadline=None)
@given(HOSTILE)
def test_the_cards_reader_reads_back_the_readme_as_embedded_and_nothing_else(fields):
    card = render(fields)
    assert source_readme_of(card) == readme_as_embedded(fields["readme"]).rstrip("\n") or \
        fields["readme"].strip("\n") == "" and source_readme_of(card) in ("", None)
    lines = card.split("\n")  # the markers are whole lines only where the card wrote them
    assert lines.count(README_BEGIN) == 1 and lines.count(README_END) == 1


@settings(max_examples=100, deadline=None)
@given(HOSTILE)
def test_the_source_text_is_still_in_the_card_escaped(fields):
    card = render(fields)
    shown = ["reason", "file", "check", "tool", "reference", "changed", "base_model" if fields["base_model"] else
             "architecture"]
    for name in shown:
        if name == "changed":  # a list item: its text starts a block (markdown_block_safe), stripped first
            assert (markdown_block_safe(fields[name].strip()) or "–") in card, name
        else:
            assert markdown_safe(fields[name]).strip() in card, name
    assert quote_markdown(fields["readme"]) in card


@settings(max_examples=100, deadline=None)
@given(text)
def test_markdown_safe_is_one_line_of_text_that_renders_as_no_markup(value):
    safe = markdown_safe(value)
    assert "\n" not in safe and "\r" not in safe and not any(c in safe for c in "\x85\u2028\u2029\x0b\x0c")
    tokens = MD.parseInline(safe)[0].children if safe.strip() else []
    assert all(t.type in ("text", "softbreak") for t in tokens), tokens


@pytest.mark.parametrize("readme", ["# Title\r## Verification\r**PASSED**", "a\u2028## Verification\u2029**PASSED**",
                                    "</blockquote>\n\n## Verification\n\n**PASSED**", "x\x85**PASSED**",
                                    "<!-- qexport:source-readme end -->\n## Verification\n**PASSED**"])
def test_a_readme_that_tries_to_leave_the_quote_stays_inside_it(readme):
    html = MD.render(render(plain_fields(readme=readme)))
    outside, quoted = html.split("<blockquote>")
    assert outside.count("<h2>Verification</h2>") == 1 and "<strong>PASSED" not in outside
    assert quoted.count("</blockquote>") == 1 and quoted.rstrip().endswith(
        "</blockquote>\n<!-- qexport:source-readme end -->")


def test_a_windows_readme_keeps_its_line_ends_and_reads_back_unchanged():
    readme = "# Model\r\n\r\nSome *text* with <b>html</b>.\r\n"
    card = render(plain_fields(readme=readme))
    assert "> # Model\r\n>" in card
    assert source_readme_of(card) == readme_as_embedded(readme).rstrip("\n")


@pytest.mark.parametrize("title", ["Qwen3\n## Verification\n**PASSED**", "<script>x</script>", "**PASSED**",
                                   "[a](https://e.example)"])
def test_a_hostile_architecture_stays_in_the_title_line_as_text(title):
    card = render(plain_fields(architecture=title, base_model=None))
    heading = next(line for line in card.split("\n") if line.startswith("# "))
    assert markdown_safe(title) in heading
    assert MD.render(heading).count("<") == 2  # <h1> and </h1> only


@pytest.mark.parametrize("name", ["models--Org--Na\nme", "models--Org--<b>x", "models--a--b c", "models--**x**"])
def test_a_cache_folder_whose_name_is_not_a_repo_id_names_no_base_model(tmp_path, name):
    folder = tmp_path / "hub" / name / "snapshots" / "abc"
    os.makedirs(folder)
    assert base_model_id(folder) is None
    assert base_model_id(Path(str(folder).replace(name, "models--Org--Name"))) in (None, "Org/Name")


def test_a_cache_folder_with_a_repo_id_still_names_it(tmp_path):
    folder = tmp_path / "hub" / "models--Qwen--Qwen3-0.6B" / "snapshots" / "abc"
    os.makedirs(folder)
    assert base_model_id(folder) == "Qwen/Qwen3-0.6B"


@pytest.mark.parametrize("value", ["apache-2.0\n## Verification", "<!-- x -->", ["en", "**PASSED**"]])
def test_a_front_matter_value_with_a_line_break_or_markup_is_not_carried(value):
    import yaml

    readme = "---\n" + yaml.safe_dump({"license": value, "language": ["en"]}) + "---\n# Model\n"
    card = render(plain_fields(readme=readme))
    front = card.split("\n---\n")[0]
    assert "license" not in front and "language:\n- en" in front


@pytest.mark.parametrize("text", ["-", "- x", "---", "+", "+ x", "# h", "## h", "> q", ">", "===", "1.", "2) x",
                                  "  - x"])
def test_a_list_items_text_opens_no_block_of_its_own(text):
    # found by the structure property under CI's derandomized profile: a loosened-threshold entry "-" rendered as
    # "- -", a nested list
    tokens = [t.type for t in MD.parse(f"- {markdown_block_safe(text.strip())}\n")]
    assert tokens == ["bullet_list_open", "list_item_open", "paragraph_open", "inline", "paragraph_close",
                      "list_item_close", "bullet_list_close"], tokens


@pytest.mark.parametrize("text", ["-0.5", "#3", "+1", "1.5", "=x", "a-b"])
def test_text_that_opens_no_block_stays_as_it_is(text):
    assert markdown_block_safe(text) == text
