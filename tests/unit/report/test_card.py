"""The README.md model card of every export folder: written, accounted in the manifest, faithful to it, loadable."""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml


from hypothesis import given, settings, strategies as st

from qexport.report.card import (PATH_PLACEHOLDER, README_BEGIN, README_END, embed_readme, source_readme_of,
                          unembed_readme, update_card_verification, verification_result)
from qexport.io.checkpoint import load_config
from qexport.io.identity import base_model_id
from qexport.export.pipeline import ExportOptions, export_folder
from qexport.report.values import format_value
from qexport.io.safetensors_file import sha256_file

FORMATS = ("fp16", "int8", "int4")
SOURCE_README = "---\nlicense: apache-2.0\nlanguage:\n- en\ntags:\n- tiny\n---\n\n# Tiny source\n\nWritten by hand.\n"


@pytest.fixture(scope="module")
def qwen3_export(export_model, qwen3_src):
    out, manifests = export_model(qwen3_src)
    return out, manifests


def card_of(folder: Path) -> str:
    return (folder / "README.md").read_text(encoding="utf-8")


def front_matter(card: str) -> dict:
    match = re.match(r"---\n(.*?)\n---\n", card, re.DOTALL)
    assert match, "card does not start with YAML front matter"
    return yaml.safe_load(match.group(1))


def table_rows(card: str, header: str) -> dict[str, str]:
    """First-column -> second-column of the markdown table whose header row starts with `header`."""
    lines = card.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {header} |"))
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1]
    return rows


def integer(cell: str) -> int:
    return int(cell.replace(",", ""))


def python_block(card: str) -> str:
    return re.search(r"```python\n(.*?)```", card, re.DOTALL).group(1)


def copy_export(out: Path, fmt: str, tmp_path: Path) -> Path:
    """A private copy of a session-cached export folder, for tests that change it."""
    return Path(shutil.copytree(out / fmt, tmp_path / fmt))


@pytest.mark.parametrize("fmt", FORMATS)
def test_card_is_written_and_accounted_in_manifest(qwen3_export, fmt):
    out, manifests = qwen3_export
    entry = next(f for f in manifests[fmt]["files"] if f["name"] == "README.md")
    assert entry["bytes"] == (out / fmt / "README.md").stat().st_size
    assert entry["sha256"] == sha256_file(out / fmt / "README.md")
    assert manifests[fmt]["summary"]["total_bytes"] == sum(f["bytes"] for f in manifests[fmt]["files"])


@pytest.mark.parametrize("fmt", FORMATS)
def test_card_front_matter_is_model_card_metadata(qwen3_export, fmt):
    meta = front_matter(card_of(qwen3_export[0] / fmt))
    assert meta["library_name"] == "transformers"
    assert "qexport" in meta["tags"]
    assert ("compressed-tensors" in meta["tags"]) == (fmt != "fp16")
    assert fmt in meta["tags"]
    assert "base_model" not in meta  # a folder outside the Hugging Face cache has no known repo id


@pytest.mark.parametrize("fmt", FORMATS)
def test_card_size_table_equals_manifest_files(qwen3_export, fmt):
    out, manifests = qwen3_export
    rows = table_rows(card_of(out / fmt), "file")
    expected = {f["name"]: f["bytes"] for f in manifests[fmt]["files"] if f["name"] != "README.md"}
    assert {name: integer(cell) for name, cell in rows.items()} == expected


@pytest.mark.parametrize("fmt", FORMATS)
def test_card_summary_equals_manifest_summary(qwen3_export, qwen3_src, fmt):
    out, manifests = qwen3_export
    s = manifests[fmt]["summary"]
    rows = table_rows(card_of(out / fmt), "measure")
    # The manifest's numbers, recomputed without qexport's export code: headers on disk and the architecture.
    from qexport.model.architecture import inspect_architecture
    from qexport.io.safetensors_file import read_header

    entries = read_header(out / fmt / "model.safetensors")[0]
    linears = [n for n in inspect_architecture(load_config(qwen3_src)).linear_weights if n != "lm_head.weight"]
    quantized = [e for n, e in entries.items() if n.endswith((".weight_packed", ".weight_scale", ".weight_shape"))]
    assert s["tensor_bytes"] == sum(e.nbytes for e in entries.values())
    assert s["quantized_bytes"] == sum(e.nbytes for e in quantized)
    source = read_header(qwen3_src / "model.safetensors")[0]
    assert s["quantized_weights"] == (0 if fmt == "fp16" else sum(math.prod(source[n].shape) for n in linears))
    assert integer(rows["bytes of all tensors"]) == s["tensor_bytes"]
    assert integer(rows["the same tensors in float16"]) == s["fp16_tensor_bytes"]
    assert rows["ratio vs fp16, whole model"] == f"{format_value(s['ratio_vs_fp16'])}×"
    assert integer(rows["quantized weights"]) == s["quantized_weights"]
    assert integer(rows["bytes of quantized weights (with scales and shapes)"]) == s["quantized_bytes"]
    if fmt == "fp16":
        assert rows["bits per quantized weight"] == "–"
    else:
        assert rows["bits per quantized weight"] == format_value(s["bits_per_quantized_weight"])
        assert rows["ratio vs fp16, quantized weights"] == f"{format_value(s['quantized_ratio_vs_fp16'])}×"


@pytest.mark.parametrize("fmt", FORMATS)
def test_card_loading_snippet_loads_the_folder(qwen3_export, fmt):
    from qexport.quant.dequant import dequantized_state_dict

    folder = qwen3_export[0] / fmt
    code = python_block(card_of(folder))
    assert PATH_PLACEHOLDER in code
    namespace: dict = {}
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(io.StringIO()):
        exec(compile(code.replace(PATH_PLACEHOLDER, str(folder)), "README.md", "exec"), namespace)
    assert stdout.getvalue().startswith("The quick brown fox")  # the snippet generated from the prompt
    # What the snippet loaded is the folder's weights: equal to qexport's own dequantization, bit for bit.
    loaded = namespace["model"].state_dict()
    expected = dequantized_state_dict(folder, dtype=getattr(torch, load_config(folder)["dtype"]))
    assert loaded.keys() >= expected.keys()
    assert all(torch.equal(loaded[name], t) for name, t in expected.items())


def test_card_is_deterministic(qwen3_export, qwen3_src, tmp_path):
    again = export_folder(qwen3_src, tmp_path / "again", ExportOptions(formats=("int4",), progress=False))
    assert card_of(tmp_path / "again" / "int4") == card_of(qwen3_export[0] / "int4")
    assert again["int4"]["files"][-1] == qwen3_export[1]["int4"]["files"][-1]


def test_card_says_what_stayed_dense_and_why(qwen3_export):
    card = card_of(qwen3_export[0] / "int4")
    dense = card[card.index("**Kept dense"):card.index("## Size")]
    assert "`lm_head`: the output projection stays 16-bit" in dense
    assert "`model.embed_tokens.weight`" in dense and "`model.norm.weight`" in dense


def test_card_of_tied_model_says_lm_head_is_tied(export_model, qwen3_tied_src):
    out, _ = export_model(qwen3_tied_src, formats=("int4",))
    assert "`lm_head`: tied to the input embedding" in card_of(out / "int4")


@pytest.fixture(scope="module")
def minilm_int4(export_model, minilm_src):
    out, _ = export_model(minilm_src, formats=("int4",))
    return out / "int4"


def test_encoder_card_does_not_mention_absent_lm_head(minilm_int4):
    card = card_of(minilm_int4)
    assert "lm_head" not in card[:card.index("## Size")]
    assert front_matter(card)["pipeline_tag"] == "sentence-similarity"  # carried over from the source's card


def test_encoder_card_snippet_embeds_a_sentence(minilm_int4):
    code = python_block(card_of(minilm_int4))
    assert "AutoModel.from_pretrained" in code
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(io.StringIO()):
        exec(compile(code.replace(PATH_PLACEHOLDER, str(minilm_int4)), "README.md", "exec"), {})
    assert stdout.getvalue().strip() == "torch.Size([1, 384])"  # one sentence, MiniLM's hidden size


def test_card_embeds_source_readme_under_heading(qwen3_src, tmp_path):
    src = Path(shutil.copytree(qwen3_src, tmp_path / "src"))
    (src / "README.md").write_text(SOURCE_README)
    export_folder(src, tmp_path / "out", ExportOptions(formats=("int8",), progress=False))
    card = card_of(tmp_path / "out" / "int8")
    outside_code = re.sub(r"```.*?```", "", card, flags=re.DOTALL)
    assert outside_code.count("\n---\n") == 1  # only the card's own front matter; the source's is quoted
    assert "## Original model card" in card
    assert source_readme_of(card) == SOURCE_README.rstrip("\n")
    assert front_matter(card)["license"] == "apache-2.0"  # the license of the source applies to the export


def test_card_base_model_from_hugging_face_cache_path(qwen3_src, tmp_path):
    snapshot = tmp_path / "hub" / "models--Org--Tiny-Qwen3" / "snapshots" / "0123abcd"
    shutil.copytree(qwen3_src, snapshot)
    assert base_model_id(snapshot) == "Org/Tiny-Qwen3"
    export_folder(snapshot, tmp_path / "out", ExportOptions(formats=("int4",), progress=False))
    meta = front_matter(card_of(tmp_path / "out" / "int4"))
    assert meta["base_model"] == "Org/Tiny-Qwen3"
    assert meta["base_model_relation"] == "quantized"


def test_base_model_unknown_outside_hugging_face_cache(tmp_path):
    assert base_model_id(tmp_path / "models--Org--Name") is None


RESULTS = verification_result("qexport verify", [
    {"name": "KLD mean", "value": 0.0123, "threshold": "<= 0.1", "passed": True},
    {"name": "top-1", "value": 0.61, "threshold": ">= 0.8", "passed": False},
    {"name": "max |Δlogit|", "value": 0.5},
], reference="the source folder", inputs="4 x 64 fixed token ids")


def test_update_card_verification_writes_results_into_card(qwen3_export, tmp_path):
    folder = copy_export(qwen3_export[0], "int4", tmp_path)
    update_card_verification(folder, RESULTS)
    card = card_of(folder)
    section = card[card.index("## Verification"):card.index("## How to load")]
    assert "**FAILED** (qexport verify; reference: the source folder" in section
    assert "| top-1 | 0.61 | >= 0.8 | **FAIL** |" in section
    assert "| KLD mean | 0.0123 | <= 0.1 | pass |" in section
    assert "| max \\|Δlogit\\| | 0.5 | – | reported |" in section  # pipes escaped: the table stays a table


def test_update_card_verification_keeps_manifest_consistent(qwen3_export, tmp_path):
    folder = copy_export(qwen3_export[0], "int4", tmp_path)
    returned = update_card_verification(folder, RESULTS)
    manifest = json.loads((folder / "qexport.json").read_text())
    assert manifest == returned
    assert manifest["verification"] == RESULTS
    entry = next(f for f in manifest["files"] if f["name"] == "README.md")
    assert entry["bytes"] == (folder / "README.md").stat().st_size
    assert entry["sha256"] == sha256_file(folder / "README.md")
    assert manifest["summary"]["total_bytes"] == sum(f["bytes"] for f in manifest["files"])
    assert {f["name"] for f in manifest["files"]} == {p.name for p in folder.iterdir()} - {"qexport.json"}


def test_update_card_verification_is_idempotent_and_keeps_source_readme(qwen3_src, tmp_path):
    src = Path(shutil.copytree(qwen3_src, tmp_path / "src"))
    (src / "README.md").write_text(SOURCE_README)
    export_folder(src, tmp_path / "out", ExportOptions(formats=("int8",), progress=False))
    folder = tmp_path / "out" / "int8"
    update_card_verification(folder, RESULTS)
    first = card_of(folder)
    update_card_verification(folder, RESULTS)
    assert card_of(folder) == first
    assert source_readme_of(first) == SOURCE_README.rstrip("\n")


def test_verification_result_passes_only_without_failed_checks():
    assert verification_result("t", [{"name": "a", "value": 1, "passed": True}, {"name": "b"}])["passed"]
    assert not verification_result("t", [{"name": "a", "passed": False}])["passed"]
    with pytest.raises(ValueError):
        verification_result("t", [{"name": "a", "limit": 3}])


def test_demo_records_its_checks_in_every_card(tmp_path):
    from qexport.cli.demo import run_demo

    with contextlib.redirect_stdout(io.StringIO()):
        assert run_demo(tmp_path, "qwen3") == 0
    for fmt in FORMATS:
        folder = tmp_path / "export" / fmt
        manifest = json.loads((folder / "qexport.json").read_text())
        assert manifest["verification"]["tool"] == "qexport demo" and manifest["verification"]["passed"]
        assert "**PASSED** (qexport demo" in card_of(folder)
        entry = next(f for f in manifest["files"] if f["name"] == "README.md")
        assert entry["sha256"] == sha256_file(folder / "README.md")


def test_source_readme_is_quoted_so_none_of_its_lines_reads_as_the_cards(qwen3_src, tmp_path):
    # A source README can claim anything ("## Verification ... PASSED"): in the card each of its lines is inside a
    # block quote, below the card's own verification section.
    fake = "# Model\n\n## Verification (qexport verify)\n\nPASSED: all 17 checks\n\n<!-- a comment -->\n"
    src = Path(shutil.copytree(qwen3_src, tmp_path / "src"))
    (src / "README.md").write_text(fake)
    export_folder(src, tmp_path / "out", ExportOptions(formats=("int8",), progress=False))
    card = card_of(tmp_path / "out" / "int8")
    region = card[card.index(README_BEGIN) + len(README_BEGIN):card.rindex(README_END)].strip("\n")
    assert all(line.startswith(">") for line in region.split("\n"))
    assert "\nPASSED: all 17 checks" not in card and "\n## Verification (qexport verify)" not in card
    assert source_readme_of(card) == fake.replace("<!--", "&lt;!--").rstrip("\n")  # HTML shown, not run


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(["a", " ", ">", "\n", "\r", "-", "`", "#"]), max_size=60))
def test_quoting_the_source_readme_loses_nothing_but_trailing_newlines(text):
    # a lone "\r" ends a Markdown line: it is kept as the character reference &#13; so that it cannot end the quote
    assert unembed_readme(embed_readme(text)) == text.replace("\r\n", "\n\0").replace("\r", "&#13;").replace(
        "\n\0", "\r\n").rstrip("\n")


def test_cards_written_before_the_quoting_still_give_back_their_source_readme():
    # Before the quoting, the README was embedded verbatim with its front matter fenced as a yaml code block.
    region = "```yaml\n---\nlicense: mit\n---\n```\n\n# Old source\n> a quote of its own\n"
    assert unembed_readme(region) == "---\nlicense: mit\n---\n\n# Old source\n> a quote of its own\n"
