"""Terminal escapes (issue 26, class 4): names from a folder never reach stdout / stderr as raw control characters.

Law: whatever file, tensor or config names a folder holds (ESC sequences, CR, NEL, line separators, bidi
overrides, BEL), no character a terminal acts on reaches stdout or stderr of export, verify or inspect except the
line breaks qexport writes itself, and `inspect` prints its "problems: none found" line only for a folder without
problems, exactly once, as its own line.
"""

from __future__ import annotations

import json
import shutil
import unicodedata

import pytest
from safetensors.torch import load_file, save_file

from qexport.cli.main import main
from qexport.report.escape import terminal_safe

MINI = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, vocab_size=256)
FORGED = "problems: none found"
NASTY = ["\x1b[2J\x1b[H", f"\n{FORGED}\n", f"\r{FORGED}", "\x1b]0;title\x07", "\u202eevil", "\x85",
         "\u2028", "\u2029", "\x9b31m", "\x7f", "\u200d"]
UNSHOWN = {"Cc", "Cf", "Zl", "Zp", "Cs", "Co"}


def raw_controls(text: str) -> list[str]:
    return [ch for ch in text if unicodedata.category(ch) in UNSHOWN and ch != "\n"]


def with_extra_tensor(folder, name):
    tensors = load_file(str(folder / "model.safetensors"))
    tensors[name] = tensors["model.norm.weight"].clone()
    save_file(tensors, str(folder / "model.safetensors"))


@pytest.mark.parametrize("text", ["abc", "é 日本 🙂", "a b"])
def test_printable_text_is_left_as_it_is(text):
    assert terminal_safe(text) == text


@pytest.mark.parametrize("nasty", NASTY)
def test_terminal_safe_leaves_no_character_a_terminal_acts_on_and_keeps_the_rest_readable(nasty):
    shown = terminal_safe(f"name{nasty}end")
    assert not raw_controls(shown) and "\n" not in shown
    assert shown.startswith("name") and shown.endswith("end")


def test_keep_newlines_keeps_only_qexports_own_line_breaks():
    assert terminal_safe("a\nb\x1b\r", keep_newlines=True) == "a\nb\\x1b\\r"


@pytest.mark.parametrize("nasty", NASTY)
def test_inspect_of_a_folder_with_a_hostile_tensor_name_prints_no_raw_control_and_no_forged_line(
        mini, tmp_path, capsys, nasty):
    src = tmp_path / "src"
    shutil.copytree(mini, src)
    with_extra_tensor(src, f"model.extra{nasty}.weight")
    code = main(["inspect", str(src), "--tensors"])
    out, err = capsys.readouterr()
    assert not raw_controls(out + err)
    lines = out.splitlines()
    assert sum(line.strip() == FORGED for line in lines) == (1 if code == 0 else 0)
    assert lines[-1] == FORGED or lines[-1].startswith("  - ")  # our verdict line is last


@pytest.mark.parametrize("nasty", NASTY[:6])
def test_inspect_of_a_folder_with_a_hostile_file_and_architecture_name_prints_no_raw_control(
        mini, tmp_path, capsys, nasty):
    src = tmp_path / "src"
    shutil.copytree(mini, src)
    (src / f"notes{nasty}.txt").write_text("x")
    config = json.loads((src / "config.json").read_text())
    config["architectures"] = [f"Qwen3ForCausalLM{nasty}"]
    (src / "config.json").write_text(json.dumps(config))
    main(["inspect", str(src)])
    out, err = capsys.readouterr()
    assert not raw_controls(out + err)
    assert sum(line.strip() == FORGED for line in out.splitlines()) <= 1


@pytest.mark.parametrize("nasty", NASTY[:6])
def test_export_refusing_a_hostile_tensor_name_prints_one_escaped_line(mini, tmp_path, capsys, nasty):
    src = tmp_path / "src"
    shutil.copytree(mini, src)
    with_extra_tensor(src, f"model.layers.0.stray{nasty}.weight")
    code = main(["export", str(src), "--out", str(tmp_path / "out"), "--formats", "int4", "--quiet"])
    out, err = capsys.readouterr()
    assert not raw_controls(out + err)
    if code == 2:
        assert len(err.strip().splitlines()) == 1 and err.startswith("qexport: error:")


@pytest.mark.parametrize("nasty", NASTY[:6])
def test_an_error_naming_a_hostile_source_path_is_escaped(tmp_path, capsys, nasty):
    missing = tmp_path / f"model{nasty}"
    missing.mkdir()
    code = main(["export", str(missing), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and not raw_controls(err) and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("nasty", NASTY[:4])
def test_export_of_a_folder_with_hostile_side_file_names_prints_no_raw_control(mini, tmp_path, capsys, nasty):
    src = tmp_path / "src"
    shutil.copytree(mini, src)
    (src / f"notes{nasty}.md").write_text("x")
    out_dir = tmp_path / f"out{nasty}"
    code = main(["export", str(src), "--out", str(out_dir), "--formats", "int4", "--quiet"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert not raw_controls(out + err)


@pytest.mark.parametrize("nasty", NASTY[:4])
def test_verify_of_an_export_with_a_hostile_stray_file_prints_no_raw_control(int4_export, mini, tmp_path, capsys,
                                                                            nasty):
    export = tmp_path / "int4"
    shutil.copytree(int4_export, export)
    (export / f"stray{nasty}.json").write_text("{}")
    main(["verify", str(export), "--reference", str(mini)])
    out, err = capsys.readouterr()
    assert not raw_controls(out + err)


def test_a_usage_error_quoting_a_hostile_argument_is_escaped(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["export", "--out", "x", "--formats", "int4", "--int4-method", "\x1b[2Jbad"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and not raw_controls(err)
