"""Regular expressions from a downloaded folder: bounded before any library compiles one (issue 26, class 6).

Laws: a quantization_config whose targets / ignores would make compressed-tensors' matcher (re.match of every entry
against every module, without a time limit) run for long is refused with exit 2 naming config.json, by verify and
inspect alike, and LoRA pattern keys the same way by merge; a tokenizer.json whose regular expression panics the
Rust tokenizers library or runs past the time limit is a failed check naming the file in verify, and exit 2 in
export. Runs that hung before are real processes with the 600 s hang guard.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from qexport.errors import InputError
from qexport.io import tokenizer_probe, untrusted_regex
from tests.acceptance.test_hostile_inputs import (assert_refused, make_adapter_files, run_main, run_process)

POLYNOMIAL = ".*" * 16 + "X"  # no nested repeat, 257**16 backtracking paths: hung compressed-tensors' reload
PANICS = r"(\w+\s?)+$"  # Oniguruma gives up on the evaluation text: the Rust tokenizer panics


@pytest.fixture
def export(int4_copy):
    return int4_copy


@pytest.fixture
def src(mini, tmp_path):
    folder = tmp_path / "src"
    shutil.copytree(mini, folder)
    return folder


def set_ignore(folder, ignore: list) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["ignore"] = ignore
    (folder / "config.json").write_text(json.dumps(config))


# ---------------------------------------------------------------------------------------------------------------
# The bound, as a function


REAL_PATTERNS = [  # from published compressed-tensors configs and peft adapters
    "re:.*lm_head", r"re:.*self_attn\.(q|k|v)_proj$", r"re:.*mlp\.gate$", r"re:.*\.(q|k|v|o)_proj.*",
    r"re:model\.layers\.\d+\.mlp\.experts\.\d+\.(gate|up)_proj", r"re:.*visual\..*", "re:.*block_sparse_moe.gate",
    r"re:vision_tower.*", r"re:multi_modal_projector.*", r"re:.*\.shared_expert_gate$",
]


def test_real_patterns_and_a_long_ignore_list_pass_the_bound():
    untrusted_regex.check_pattern_list(REAL_PATTERNS + [f"model.layers.{i}.mlp.gate" for i in range(200)], "x")


@pytest.mark.parametrize("pattern", [POLYNOMIAL, ".*.*.*X", "(.*)(.*)(.*)X", "a?" * 30 + "a" * 30,
                                     "(.*)(.*)(.|.|.|.|.|.)(.|.|.|.|.|.)(.|.|.|.|.|.)(.|.|.|.|.|.)X"])
def test_a_pattern_with_too_many_backtracking_paths_is_refused_naming_it(pattern):
    with pytest.raises(InputError, match="backtracking paths"):
        untrusted_regex.check_pattern_list(["re:" + pattern], "config.json: quantization_config")


def test_the_paths_of_all_patterns_add_up():
    one = "re:(.*)(.*)X"  # 257**2 paths: fine alone, 64 of them are past the total
    untrusted_regex.check_pattern_list([one], "x")
    with pytest.raises(InputError, match="backtracking paths"):
        untrusted_regex.check_pattern_list([one] * 64, "x")


@pytest.mark.parametrize("entries, phrase", [
    ([f"m{i}" for i in range(untrusted_regex.MAX_LIST_ENTRIES + 1)], "names and patterns, above the limit"),
    ([f"re:m{i}" for i in range(untrusted_regex.MAX_REGEX_PATTERNS + 1)], "re: patterns, above the limit"),
    (["m" * 1000] * 200, "characters in all"),
])
def test_a_list_past_its_count_or_length_is_refused(entries, phrase):
    with pytest.raises(InputError, match=phrase):
        untrusted_regex.check_pattern_list(entries, "x")


# ---------------------------------------------------------------------------------------------------------------
# The commands


def test_polynomial_ignore_pattern_is_refused_by_verify_before_reload(export, mini):
    set_ignore(export, ["lm_head", "re:" + POLYNOMIAL])
    result = run_process("verify", str(export), "--reference", str(mini), "--quiet")
    assert_refused(result.returncode, result.stderr, "config.json", "backtracking paths")


def test_polynomial_ignore_pattern_is_refused_by_inspect(export):
    set_ignore(export, ["lm_head", "re:" + POLYNOMIAL])
    result = run_process("inspect", str(export))
    assert_refused(result.returncode, result.stderr, "config.json", "backtracking paths")


@pytest.mark.parametrize("command", ["inspect", "verify"])
def test_600_000_short_ignore_patterns_are_refused_quickly(command, export, mini):
    set_ignore(export, ["lm_head"] + [f"re:x{i}" for i in range(600_000)])  # an 11 MiB config.json
    args = ("verify", str(export), "--reference", str(mini)) if command == "verify" else ("inspect", str(export))
    result = run_process(*args)
    assert_refused(result.returncode, result.stderr, "config.json", "above the limit")


def test_polynomial_rank_pattern_key_is_refused_by_merge(src, tmp_path):
    adapter = make_adapter_files(src, tmp_path / "adapter", {"rank_pattern": {".*.*.*q_proj": 4}})
    rc, err = run_main("merge", "--base", str(src), "--lora", str(adapter), "--out", str(tmp_path / "m"), "--quiet")
    assert_refused(rc, err, "adapter_config.json", "rank_pattern", "backtracking paths")
    assert not (tmp_path / "m").exists()


# ---------------------------------------------------------------------------------------------------------------
# tokenizer.json


def set_split_regex(folder, regex: str) -> None:
    path = folder / "tokenizer.json"
    tokenizer = json.loads(path.read_text())
    tokenizer["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
        tokenizer["pre_tokenizer"]]}
    path.write_text(json.dumps(tokenizer))


def test_the_rust_panic_is_real_and_not_an_exception(export):
    """The premise: loaded in this process, the tokenizer raises a BaseException that `except Exception` misses."""
    set_split_regex(export, PANICS)
    script = ("import sys\nfrom tokenizers import Tokenizer\n"
              "t = Tokenizer.from_file(sys.argv[1])\n"
              "try:\n    t.encode(open(sys.argv[2]).read())\nexcept Exception:\n    sys.exit(3)\n")
    run = subprocess.run([sys.executable, "-c", script, str(export / "tokenizer.json"),
                          str(tokenizer_probe.EVAL_TEXT)], capture_output=True, text=True, timeout=600)
    assert run.returncode not in (0, 3) and "PanicException" in run.stderr


def test_a_panicking_tokenizer_in_the_export_fails_the_tokenizer_checks_naming_the_file(export, mini):
    from qexport.verify import verify

    set_split_regex(export, PANICS)
    result = verify(export, mini, only=["tokenizer", "functional"])
    assert [c.passed for c in result.checks] == [False, False]
    for check in result.checks:
        assert "tokenizer.json" in check.detail and "PanicException" in check.detail, check.detail


def test_a_panicking_tokenizer_fails_verify_with_exit_1_and_no_traceback(export, mini):
    set_split_regex(export, PANICS)
    result = run_process("verify", str(export), "--reference", str(mini), "--quiet")
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr and "panicked" not in result.stderr
    assert "tokenizer.json" in result.stdout


def test_a_tokenizer_past_the_time_limit_fails_the_check_naming_the_file(export, mini, monkeypatch):
    from qexport.verify import verify

    set_split_regex(export, r"\s+")  # a harmless regex; no child starts and finishes within the limit below
    monkeypatch.setattr(tokenizer_probe, "SECONDS", 0.001)
    [check] = verify(export, mini, only=["tokenizer"]).checks
    assert not check.passed and "tokenizer.json" in check.detail and "more than" in check.detail


def test_a_harmless_split_regex_is_run_and_passes(export, src):
    from qexport.verify import verify

    set_split_regex(export, r"\s+")
    set_split_regex(src, r"\s+")
    assert tokenizer_probe.problem(export) is None
    [check] = verify(export, src, only=["tokenizer"]).checks
    assert check.passed, check.detail


def test_export_refuses_a_source_whose_tokenizer_panics(src, tmp_path):
    set_split_regex(src, PANICS)
    rc, err = run_main("export", str(src), "--out", str(tmp_path / "out"), "--formats", "int4", "--quiet")
    assert_refused(rc, err, "tokenizer.json", "PanicException")
    assert not (tmp_path / "out").exists()
