"""verify's side-file and tokenizer checks (qexport/verify/file_checks.py) called directly on hand-written folders:
a few tensors and side files in tmp_path, no model built or exported. docs/design.md: every tokenizer / generation /
chat-template file of the source is copied into the export; README.md is the one file an export may rewrite (a
qexport card embeds the source README unchanged; another tool's README may say anything)."""

from __future__ import annotations

import json

import pytest

from qexport.report.card import CARD_MARK, README_BEGIN, README_END
from qexport.verify import file_checks
from qexport.verify.file_checks import same_content
from tests.support.unit_verify import context, named, reference_weights, write_folder

# each check reports under the name `verify --only`, reports and baselines know it by
check_side_files = named(file_checks.check_side_files, "side_files")
check_tokenizer_files = named(file_checks.check_tokenizer_files, "tokenizer_files")
check_tokenizer = named(file_checks.check_tokenizer, "tokenizer")

GENERATION = json.dumps({"bos_token_id": 1, "eos_token_id": 2, "transformers_version": "4.51.0"}, indent=2)
SIDE = {"generation_config.json": GENERATION, "modules.json": '[{"idx": 0, "type": "Transformer"}]',
        "1_Pooling/config.json": '{"pooling_mode_mean_tokens": true}'}


def folders(tmp_path, ref_files: dict, export_files: dict | None = None):
    ref = write_folder(tmp_path / "ref", reference_weights(), files=ref_files)
    export = write_folder(tmp_path / "export", reference_weights(), files=ref_files if export_files is None
                          else export_files)
    return context(export, ref)


def card(embedded: str) -> str:
    """A qexport model card (as card.py writes one) embedding `embedded` as the source README."""
    return f"{CARD_MARK}: generated from qexport.json -->\n\n# Model\n\n{README_BEGIN}\n{embedded}\n{README_END}\n"


# ---------------------------------------------------------------------------------------------------------------
# side_files


def test_side_files_with_the_reference_content_pass_counting_them(tmp_path):
    result = check_side_files(folders(tmp_path, SIDE))
    assert result.passed and result.detail == "all 3 reference files present with the reference's content"
    assert result.metrics == {"missing": [], "changed": [], "allowed_to_differ": []}


def test_a_reference_without_side_files_skips(tmp_path):
    result = check_side_files(folders(tmp_path, {}))
    assert result.skipped and result.passed and result.detail == "the reference has none"


def test_weights_config_manifest_and_hidden_files_are_not_side_files(tmp_path):
    # Llama repositories ship original/consolidated.00.pth; every repository has .gitattributes
    ignored = {".gitattributes": "*.safetensors filter=lfs", "original/consolidated.00.pth": "x",
               "original/params.bin": "x", "a.pt": "x", "b.ckpt": "x", "sub/c.safetensors": "x",
               "qexport.json": "{}"}
    ctx = folders(tmp_path, ignored | {"generation_config.json": GENERATION}, {"generation_config.json": GENERATION})
    result = check_side_files(ctx)
    assert result.passed and result.detail == "all 1 reference files present with the reference's content"


def test_a_missing_side_file_fails_naming_it(tmp_path):
    result = check_side_files(folders(tmp_path, SIDE, {k: v for k, v in SIDE.items() if k != "modules.json"}))
    assert not result.passed and result.detail == "missing modules.json"
    assert result.metrics == {"missing": ["modules.json"], "changed": [], "allowed_to_differ": []}


def test_a_side_file_in_a_subfolder_is_compared_too(tmp_path):
    result = check_side_files(folders(tmp_path, SIDE, SIDE | {"1_Pooling/config.json": '{"pooling_mode_cls_token": true}'}))
    assert not result.passed and result.detail == "content differs from the reference: 1_Pooling/config.json"


def test_a_side_file_linking_to_a_file_elsewhere_in_its_folder_is_compared_by_content(tmp_path):
    # links to files inside the model folder are followed (safe_fs.walk_files), also from a subfolder to a file
    # outside that subfolder: its target is what is compared
    ctx = folders(tmp_path, {"pooling.json": SIDE["1_Pooling/config.json"]})
    for folder in (ctx.reference.folder, ctx.export):
        (folder / "1_Pooling").mkdir()
        (folder / "1_Pooling" / "config.json").symlink_to("../pooling.json")
    result = check_side_files(ctx)
    assert result.passed and result.detail == "all 2 reference files present with the reference's content"


def test_a_folder_of_the_same_name_is_not_the_file(tmp_path):
    ctx = folders(tmp_path, SIDE, {k: v for k, v in SIDE.items() if k != "modules.json"})
    (ctx.export / "modules.json").mkdir()
    (ctx.export / "modules.json" / "x").write_text("{{ messages }}")
    assert check_side_files(ctx).metrics["missing"] == ["modules.json"]


def test_missing_and_changed_side_files_are_both_listed(tmp_path):
    ctx = folders(tmp_path, SIDE, {"generation_config.json": GENERATION.replace('"eos_token_id": 2', '"eos_token_id": 3'),
                                   "1_Pooling/config.json": SIDE["1_Pooling/config.json"]})
    result = check_side_files(ctx)
    assert not result.passed
    assert result.detail == "missing modules.json; content differs from the reference: generation_config.json"
    assert result.metrics == {"missing": ["modules.json"], "changed": ["generation_config.json"],
                              "allowed_to_differ": []}


def test_a_changed_text_file_fails(tmp_path):
    result = check_side_files(folders(tmp_path, SIDE, SIDE | {"modules.json": "{{ messages }}\n"}))
    assert not result.passed and result.detail == "content differs from the reference: modules.json"


def test_json_reserialised_with_another_transformers_version_passes(tmp_path):
    # another tool's save_pretrained rewrites generation_config.json: other layout, its own version stamp
    rewritten = json.dumps({"eos_token_id": 2, "bos_token_id": 1, "transformers_version": "5.0.0"})
    assert check_side_files(folders(tmp_path, SIDE, SIDE | {"generation_config.json": rewritten})).passed


@pytest.mark.parametrize("ours", [
    json.dumps({"bos_token_id": 1, "transformers_version": "4.51.0"}),
    json.dumps({"bos_token_id": 1, "eos_token_id": 2, "transformers_version": "4.51.0", "do_sample": True}),
    json.dumps([{"bos_token_id": 1, "eos_token_id": 2, "transformers_version": "4.51.0"}]),  # not an object
    '{"bos_token_id": 1, "eos_token_id": 2,',  # not JSON
    b'{"bos_token_id": 1, "eos_token_id": 2, "note": "\xff"}',  # not UTF-8
], ids=["key_dropped", "key_added", "a_list", "truncated", "not_utf8"])
def test_a_json_side_file_with_other_content_fails(tmp_path, ours):
    result = check_side_files(folders(tmp_path, SIDE, SIDE | {"generation_config.json": ours}))
    assert not result.passed and result.detail == "content differs from the reference: generation_config.json"


def test_same_content_compares_json_values_only_for_json_files(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    for folder, text in ((a, '{"x": 1}'), (b, '{ "x": 1 }')):
        (folder / "f.json").write_text(text)
        (folder / "f.txt").write_text(text)
    assert same_content(a / "f.json", b / "f.json")
    assert not same_content(a / "f.txt", b / "f.txt")


def test_same_content_needs_both_sides_to_be_objects(tmp_path):
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "list2.json").write_text("[1,2]")
    (tmp_path / "obj.json").write_text('{"a": 1}')
    assert not same_content(tmp_path / "list.json", tmp_path / "list2.json")
    assert not same_content(tmp_path / "list.json", tmp_path / "obj.json")
    assert not same_content(tmp_path / "obj.json", tmp_path / "list.json")


# ---------------------------------------------------------------------------------------------------------------
# README.md: the model card


def test_any_readme_of_another_tool_passes_side_files(tmp_path):
    result = check_side_files(folders(tmp_path, {"README.md": "# Source\n"}, {"README.md": "# Someone's quant\n"}))
    assert result.passed
    assert result.detail == ("all 1 reference files present with the reference's content (README.md may be "
                             "rewritten: the model card)")
    assert result.metrics == {"missing": [], "changed": [], "allowed_to_differ": ["README.md"]}


def test_a_missing_readme_fails_side_files(tmp_path):
    result = check_side_files(folders(tmp_path, {"README.md": "# Source\n"}, {}))
    assert not result.passed and result.metrics["missing"] == ["README.md"]


def test_a_qexport_card_embedding_the_source_readme_passes(tmp_path):
    # the card ends the embedded README at its last line: trailing newlines are not kept
    assert check_side_files(folders(tmp_path, {"README.md": "# Source\n\nIt answers.\n\n"},
                                    {"README.md": card("# Source\n\nIt answers.")})).passed


@pytest.mark.parametrize("readme", [card("# Source\n\nIt answers nothing."), f"{CARD_MARK} -->\n# Model\n"],
                         ids=["edited", "not_embedded"])
def test_a_qexport_card_that_changed_or_dropped_the_source_readme_fails(tmp_path, readme):
    result = check_side_files(folders(tmp_path, {"README.md": "# Source\n\nIt answers.\n"}, {"README.md": readme}))
    assert not result.passed and result.detail == "content differs from the reference: README.md"
    assert result.metrics == {"missing": [], "changed": ["README.md"], "allowed_to_differ": ["README.md"]}


@pytest.mark.parametrize("source", [
    "# Source\n\nEnds in a Markdown line break  \n",  # trailing spaces are content
    "\n\n# Source after two blank lines\n",  # leading blank lines are content
    "# Source\n\nBuilt for macOS X\n",  # so is a last character that is not a newline
], ids=["trailing_spaces", "leading_blank_lines", "ends_in_x"])
def test_a_card_embedding_the_readme_verbatim_but_its_trailing_newlines_passes(tmp_path, source):
    assert check_side_files(folders(tmp_path, {"README.md": source}, {"README.md": card(source.rstrip("\n"))})).passed


def test_a_card_that_dropped_trailing_spaces_of_the_readme_fails(tmp_path):
    source = "# Source\n\nEnds in a Markdown line break  \n"
    result = check_side_files(folders(tmp_path, {"README.md": source}, {"README.md": card(source.rstrip())}))
    assert not result.passed and result.metrics["changed"] == ["README.md"]


def test_readmes_that_are_not_utf8_are_compared_not_refused(tmp_path):
    # a Latin-1 README: both sides read with replacement characters
    ctx = folders(tmp_path, {"README.md": b"caf\xe9\n"}, {"README.md": card("caf\ufffd")})
    assert check_side_files(ctx).passed
    ctx = folders(tmp_path / "other", {"README.md": "# Source\n"}, {"README.md": b"# caf\xe9 quant\n"})
    assert check_side_files(ctx).passed


# ---------------------------------------------------------------------------------------------------------------
# tokenizer_files


def test_tokenizer_files_are_checked_apart_from_side_files(tmp_path):
    files = {"tokenizer.json": "{}", "tokenizer_config.json": "{}", "vocab.txt": "a\nb\n", "merges.txt": "a b\n",
             "tokenizer.model.v3": "x", "generation_config.json": GENERATION}
    ctx = folders(tmp_path, files, {k: v for k, v in files.items() if k == "generation_config.json"})
    tok, side = check_tokenizer_files(ctx), check_side_files(ctx)
    assert not tok.passed and tok.metrics["missing"] == ["merges.txt", "tokenizer.json", "tokenizer.model.v3",
                                                         "tokenizer_config.json", "vocab.txt"]
    assert tok.detail == ("missing merges.txt, tokenizer.json, tokenizer.model.v3, tokenizer_config.json and 1 more")
    assert side.passed and side.detail == "all 1 reference files present with the reference's content"


def test_a_reference_without_tokenizer_files_skips_tokenizer_files(tmp_path):
    result = check_tokenizer_files(folders(tmp_path, {"generation_config.json": GENERATION}))
    assert result.skipped and result.detail == "the reference has none"


# ---------------------------------------------------------------------------------------------------------------
# tokenizer: loads and encodes as the reference's does


@pytest.fixture(scope="module")
def tokenizer():
    from qexport.model.tiny import build_tokenizer

    return build_tokenizer(256)


def with_tokenizer(tmp_path, tokenizer, change=None):
    import copy

    ref = write_folder(tmp_path / "ref", reference_weights())
    export = write_folder(tmp_path / "export", reference_weights())
    tokenizer.save_pretrained(ref)
    theirs = copy.deepcopy(tokenizer)
    if change:
        change(theirs)
    theirs.save_pretrained(export)
    return context(export, ref)


def test_a_tokenizer_encoding_as_the_reference_passes_counting_the_texts(tmp_path, tokenizer):
    result = check_tokenizer(with_tokenizer(tmp_path, tokenizer))
    # six English sentences, one with accents, a dash, CJK and an emoji, one with leading spaces and tabs
    assert result.passed and result.detail == "TokenizersBackend encodes 8 texts as the reference does"


def test_a_reference_without_a_tokenizer_skips(tmp_path):
    ctx = folders(tmp_path, {"generation_config.json": GENERATION})
    result = check_tokenizer(ctx)
    assert result.skipped and result.detail == "the reference has no tokenizer"


def test_an_export_tokenizer_that_does_not_load_fails_with_its_error(tmp_path, tokenizer):
    ctx = with_tokenizer(tmp_path, tokenizer)
    (ctx.export / "tokenizer.json").write_text("{")
    result = check_tokenizer(ctx)
    assert not result.passed
    assert result.detail.startswith("AutoTokenizer.from_pretrained(export) fails: JSONDecodeError: "), result.detail


@pytest.mark.parametrize("token,text", [
    ("Paris", "Paris is the capital and most populous city of France."),
    ("東京", "Unicode: naïve café — 東京 🙂"),
    ("\t", "  leading spaces\tand\ttabs\n"),
], ids=["english", "unicode", "tabs"])
def test_a_tokenizer_that_encodes_one_text_differently_fails_naming_it(tmp_path, tokenizer, token, text):
    # an exporter that added a token: only the texts holding it encode differently
    result = check_tokenizer(with_tokenizer(tmp_path, tokenizer, lambda t: t.add_tokens([token])))
    assert not result.passed and result.detail == f"encodes {text!r} differently from the reference"


def test_the_reference_chat_template_kept_passes(tmp_path, tokenizer):
    def template(t):
        t.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"

    template(tokenizer)
    try:
        assert check_tokenizer(with_tokenizer(tmp_path, tokenizer)).passed
    finally:
        tokenizer.chat_template = None


def test_a_changed_chat_template_fails(tmp_path, tokenizer):
    def template(t):
        t.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"

    result = check_tokenizer(with_tokenizer(tmp_path, tokenizer, template))
    assert not result.passed and result.detail == "chat template differs from the reference"
