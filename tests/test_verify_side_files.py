"""side_files and tokenizer_files on hand-edited copies of one export (verify with that check only; about a second
each): a side file passes only with the reference's content, a qexport model card only while it embeds the
reference's README unchanged, and the details name the file."""

from __future__ import annotations

import json
import shutil

import pytest

from qexport.card import README_BEGIN, README_END
from qexport.verify import verify

SOURCE_README = "# The source model\n\nIt answers questions.\n"


def only(folder, ref, name):
    [result] = verify(folder, ref, only=[name]).checks
    return result


@pytest.fixture(scope="module")
def readme_export(tmp_path_factory, qwen3_src, export_model):
    """A reference with a README and its int8 export (whose README.md is qexport's card embedding it)."""
    src = tmp_path_factory.mktemp("readme") / "src"
    shutil.copytree(qwen3_src, src)
    (src / "README.md").write_text(SOURCE_README)
    out, _ = export_model(src, formats=("int8",))
    return src, out / "int8"


def copy(tmp_path, folder):
    target = tmp_path / "export"
    shutil.copytree(folder, target)
    (target / "qexport.json").unlink()
    return target


def test_qexport_card_embedding_the_reference_readme_passes_side_files(readme_export):
    src, export = readme_export
    result = only(export, src, "side_files")
    assert result.passed and result.metrics["allowed_to_differ"] == ["README.md"], result.detail
    assert "README.md may be rewritten" in result.detail


def test_qexport_card_whose_embedded_readme_changed_fails_side_files(readme_export, tmp_path):
    src, export = readme_export
    folder = copy(tmp_path, export)
    card = folder / "README.md"
    card.write_text(card.read_text().replace("It answers questions.", "It answers nothing."))
    result = only(folder, src, "side_files")
    assert not result.passed and result.metrics["changed"] == ["README.md"], result.detail
    assert "content differs from the reference: README.md" in result.detail


def test_qexport_card_that_lost_the_embedded_readme_fails_side_files(readme_export, tmp_path):
    src, export = readme_export
    folder = copy(tmp_path, export)
    card = folder / "README.md"
    text = card.read_text()
    card.write_text(text[:text.index(README_BEGIN)] + text[text.rindex(README_END) + len(README_END):])
    assert only(folder, src, "side_files").metrics["changed"] == ["README.md"]


def test_a_missing_side_file_fails_naming_it(readme_export, tmp_path):
    src, export = readme_export
    folder = copy(tmp_path, export)
    (folder / "generation_config.json").unlink()
    result = only(folder, src, "side_files")
    assert not result.passed and result.metrics["missing"] == ["generation_config.json"]
    assert "missing generation_config.json" in result.detail


def test_a_json_side_file_that_is_not_json_in_the_export_fails(readme_export, tmp_path):
    src, export = readme_export
    folder = copy(tmp_path, export)
    (folder / "generation_config.json").write_text("{not json")
    assert only(folder, src, "side_files").metrics["changed"] == ["generation_config.json"]


def test_same_json_content_with_another_transformers_version_and_layout_passes(readme_export, tmp_path):
    src, export = readme_export
    folder = copy(tmp_path, export)
    path = folder / "tokenizer_config.json"
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "transformers_version": "0.0.1"}, indent=3, sort_keys=True))
    assert only(folder, src, "tokenizer_files").passed


def test_a_json_list_instead_of_the_object_fails(readme_export, tmp_path):
    src, export = readme_export
    folder = copy(tmp_path, export)
    (folder / "generation_config.json").write_text("[]")
    assert not only(folder, src, "side_files").passed
