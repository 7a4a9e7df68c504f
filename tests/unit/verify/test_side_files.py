"""side_files and tokenizer_files on hand-edited copies of one export (verify with that check only; about a second
each): a side file passes only with the reference's content, a qexport model card only while it embeds the
reference's README unchanged, and the details name the file."""

from __future__ import annotations

import json
import shutil

import pytest

from qexport.report.card import README_BEGIN, README_END
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


def test_an_export_tokenizer_that_does_not_load_fails_the_tokenizer_check(readme_export, tmp_path):
    src, export = readme_export
    folder = copy(tmp_path, export)
    (folder / "tokenizer.json").write_text("{not json")
    result = only(folder, src, "tokenizer")
    assert not result.passed and result.detail.startswith("AutoTokenizer.from_pretrained(export) fails: ")


def test_a_good_export_tokenizer_encodes_every_text_as_the_reference(readme_export):
    src, export = readme_export
    result = only(export, src, "tokenizer")
    assert result.passed and not result.skipped and result.detail.endswith("encodes 8 texts as the reference does")


def test_a_reference_without_tokenizer_or_side_files_skips_those_checks(readme_export, tmp_path):
    src, export = readme_export
    ref = tmp_path / "ref"
    ref.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(src / name, ref / name)
    checks = {c.name: c for c in verify(export, ref, only=["tokenizer", "tokenizer_files", "side_files"]).checks}
    assert all(c.passed and c.skipped for c in checks.values()), [(c.name, c.detail) for c in checks.values()]
    assert checks["tokenizer"].detail == "the reference has no tokenizer"
    assert checks["side_files"].detail == checks["tokenizer_files"].detail == "the reference has none"


def test_hidden_files_weights_and_the_manifest_are_not_side_files(readme_export, tmp_path):
    src, export = readme_export
    ref = tmp_path / "ref"
    shutil.copytree(src, ref)
    for name in (".cache", "extra.bin", "old.pt", "qexport.json"):
        (ref / name).write_text("not compared")
    (ref / "sub").mkdir()
    (ref / "sub" / "note.txt").write_text("compared")
    result = only(copy(tmp_path, export), ref, "side_files")
    assert result.metrics["missing"] == ["sub/note.txt"], result.detail


def test_a_card_with_bytes_that_are_not_utf8_is_still_read(readme_export, tmp_path):
    # another tool appended a Latin-1 line to the card: the check still reads the embedded README (and passes)
    src, export = readme_export
    folder = copy(tmp_path, export)
    card = folder / "README.md"
    card.write_bytes(card.read_bytes() + "\nEdited by caf\xe9 tool\n".encode("latin-1"))
    assert only(folder, src, "side_files").passed
