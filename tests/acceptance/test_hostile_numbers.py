"""Hostile numbers (issue 26, class 8): NaN and infinities never pass a comparison, JSON is standard, config sizes
that allocate are bounded by the checkpoint, and a source that changes while it is read is refused.

Laws: a baseline whose compared metrics are not finite numbers is malformed (exit 2 naming the key); a current
metric that is NaN or +-inf against a finite baseline is a regression (exit 1), never "within tolerance"; every
JSON qexport writes parses with `json.loads(text, parse_constant=refuse)` (no NaN / Infinity tokens); a config
size that transformers allocates for (num_labels, expert counts) above what the checkpoint holds is exit 2 naming
the key before anything is built; a source file replaced or rewritten after the export opened it is exit 2 naming
the file, with nothing written: the manifest never hashes other bytes than those exported.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from qexport.cli.main import main
from qexport.errors import InputError
from qexport.io.checkpoint import Checkpoint, check_layer_counts
from qexport.report.html import to_json, verification_html
from qexport.verify import check_baseline, load_baseline
from qexport.verify.context import CheckResult

MINI = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, vocab_size=256)


def refuse(token):
    raise ValueError(f"non-standard JSON token {token}")


def standard(text: str):
    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def mini(build_model):
    return build_model("qwen3", **MINI)


@pytest.fixture
def src(mini, tmp_path):
    folder = tmp_path / "src"
    shutil.copytree(mini, folder)
    return folder


# --- baselines -------------------------------------------------------------------------------------------------
def folders(tmp_path):
    """(export, reference) paths that exist: the command line refuses a missing folder before reading the baseline."""
    for name in ("export", "src"):
        (tmp_path / name).mkdir(exist_ok=True)
    return str(tmp_path / "export"), str(tmp_path / "src")


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", '"NaN"', '"Infinity"', "true", '"0.01"', "[1]"])
def test_a_baseline_metric_that_is_not_a_finite_number_is_exit_2_naming_the_key(tmp_path, capsys, value):
    baseline = tmp_path / "b.json"
    baseline.write_text('{"format": "int4", "metrics": {"top1": 0.9, "kld_mean": %s}}' % value)
    code = main(["verify", folders(tmp_path)[0], "--reference", folders(tmp_path)[1], "--baseline",
                 str(baseline)])
    err = capsys.readouterr().err
    assert code == 2 and "kld_mean" in err and "not a finite number" in err and len(err.strip().splitlines()) == 1


def test_a_baseline_without_the_metric_or_with_null_is_not_malformed(tmp_path):
    baseline = tmp_path / "b.json"
    baseline.write_text('{"metrics": {"top1": 0.9, "kld_mean": null}}')
    assert load_baseline(baseline) == {"top1": 0.9, "kld_mean": None}


@pytest.mark.parametrize("key,now", [("kld_mean", math.nan), ("kld_mean", math.inf), ("kld_mean", -math.inf),
                                     ("top1", math.nan), ("top1", math.inf), ("sqnr_min_db", math.inf)])
def test_a_non_finite_current_metric_against_a_finite_baseline_is_a_regression(key, now):
    result = check_baseline({"format": "int4", key: now}, {key: 0.5})
    assert not result.passed and key in result.detail and "not a finite number" in result.detail


def test_a_non_finite_baseline_given_as_a_dict_is_refused_not_skipped():
    with pytest.raises(InputError, match="'kld_mean'"):
        check_baseline({"format": "int4", "kld_mean": 0.1, "top1": 0.9}, {"kld_mean": math.nan, "top1": 0.9})


def fake_verification(tmp_path, metrics: dict):
    from qexport.verify import Verification
    from qexport.verify.thresholds import thresholds_for

    checks = [CheckResult("functional", True, "ok", metrics)]
    return Verification(tmp_path / "export", tmp_path / "src", "int4", thresholds_for("int4"), checks)


@pytest.mark.parametrize("now", [math.nan, math.inf])
def test_verify_with_a_nan_or_inf_metric_and_a_finite_baseline_exits_1_and_writes_standard_json(
        tmp_path, capsys, monkeypatch, now):
    import qexport.verify as verify_module

    monkeypatch.setattr(verify_module, "verify", lambda *a, **k: fake_verification(tmp_path, {"kld_mean": now,
                                                                                                "top1": 0.95}))
    baseline = tmp_path / "b.json"
    baseline.write_text('{"format": "int4", "metrics": {"kld_mean": 0.01, "top1": 0.95}}')
    report = tmp_path / "r.json"
    code = main(["verify", folders(tmp_path)[0], "--reference", folders(tmp_path)[1], "--baseline",
                 str(baseline), "--json", str(report), "--report", str(tmp_path / "r.html"), "--quiet"])
    out = capsys.readouterr().out
    assert code == 1 and "within tolerance" not in out
    data = standard(report.read_text())
    assert data["metrics"]["kld_mean"] == ("NaN" if math.isnan(now) else "Infinity")


def test_save_baseline_of_non_finite_metrics_is_standard_json_and_refused_when_read_back(tmp_path, capsys,
                                                                                        monkeypatch):
    import qexport.verify as verify_module

    monkeypatch.setattr(verify_module, "verify", lambda *a, **k: fake_verification(tmp_path, {"kld_mean": -math.inf}))
    saved = tmp_path / "b.json"
    main(["verify", folders(tmp_path)[0], "--reference", folders(tmp_path)[1], "--save-baseline", str(saved),
          "--quiet"])
    assert standard(saved.read_text())["metrics"]["kld_mean"] == "-Infinity"
    with pytest.raises(InputError, match="kld_mean"):
        load_baseline(saved)


# --- standard JSON -----------------------------------------------------------------------------------------------

def test_to_json_spells_nan_and_infinities_as_strings_at_any_depth():
    data = {"a": math.nan, "b": [1.0, math.inf, {"c": (-math.inf, 2)}], "d": Path("x"), "e": None}
    assert standard(to_json(data)) == {"a": "NaN", "b": [1.0, "Infinity", {"c": ["-Infinity", 2]}], "d": "x",
                                       "e": None}


def test_the_json_embedded_in_the_html_report_is_standard(tmp_path):
    import html

    result = {"model": "m", **fake_verification(tmp_path, {"kld_mean": math.nan, "top1": math.inf}).as_dict()}
    page = verification_html(result)
    embedded = page.split("id='qexport-json'>")[1].split("</script>")[0]
    assert standard(html.unescape(embedded))["metrics"]["top1"] == "Infinity"


def test_inspect_json_of_a_config_holding_nan_and_infinity_is_standard(src, capsys):
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "rope_theta": math.nan, "initializer_range": math.inf}))
    main(["inspect", str(src), "--json"])
    standard(capsys.readouterr().out)


# --- config sizes that allocate ----------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["top", "text_config"])
def test_num_labels_beyond_the_widest_tensor_is_refused_before_building(where):
    class Entry:
        shape = (256, 128)

    entries = {"model.layers.0.w": Entry()}
    config = {"num_labels": 257} if where == "top" else {"text_config": {"num_labels": 257}}
    with pytest.raises(InputError, match="num_labels=257 but the checkpoint's widest tensor dimension is 256"):
        check_layer_counts(config, entries, Path("config.json"))
    check_layer_counts({"num_labels": 256}, entries, Path("config.json"))


@pytest.mark.parametrize("key", ["num_experts", "num_local_experts", "n_routed_experts", "num_experts_per_tok"])
def test_more_experts_than_the_tensor_names_number_are_refused(key):
    entries = dict.fromkeys([f"model.layers.0.mlp.experts.{i}.w" for i in range(8)])
    check_layer_counts({key: 8}, entries, Path("config.json"))
    with pytest.raises(InputError, match=f"{key}=9"):
        check_layer_counts({key: 9}, entries, Path("config.json"))


def test_export_with_two_million_labels_is_exit_2_naming_num_labels_and_writes_nothing(src, tmp_path, capsys):
    # 2 * 10**6 labels: about 0.7 GB and 1-2 s of id2label on the unfixed code (10**8 would need 30 GB)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "num_labels": 2 * 10**6}))
    code = main(["export", str(src), "--out", str(tmp_path / "out"), "--formats", "int4", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "num_labels=2000000" in err and "config.json" in err
    assert not (tmp_path / "out").exists()


# --- a source that changes while it is read ------------------------------------------------------------------------

def replace_weights(folder: Path, scale: float = 2.0) -> None:
    """Another model.safetensors renamed over the first: same header, other bytes."""
    tensors = load_file(str(folder / "model.safetensors"))
    save_file({k: (v * scale if v.is_floating_point() else v) for k, v in tensors.items()},
              str(folder / "other.safetensors.tmp"))
    os.replace(folder / "other.safetensors.tmp", folder / "model.safetensors")


def rewrite_in_place(folder: Path) -> None:
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-2:] = bytes(b ^ 0xFF for b in data[-2:])
    st = os.stat(path)
    with open(path, "r+b") as f:
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # a later write's mtime, beyond the coarse clock


@pytest.mark.parametrize("change", [replace_weights, rewrite_in_place])
def test_a_weight_file_changed_after_open_is_refused_when_a_tensor_is_read(src, change):
    ckpt = Checkpoint.open(src)
    name = ckpt.names[0]
    ckpt.read(name)
    change(src)
    with pytest.raises(InputError, match="model.safetensors: was (replaced|modified) while qexport read it"):
        ckpt.read(name)


@pytest.mark.parametrize("change", [replace_weights, rewrite_in_place])
def test_a_weight_file_changed_after_its_tensors_were_read_is_refused_when_hashed(src, change):
    ckpt = Checkpoint.open(src)
    for name in ckpt.names[:2]:
        ckpt.hash_read(name, ckpt.read(name))
    change(src)
    with pytest.raises(InputError, match="model.safetensors: was (replaced|modified)"):
        ckpt.source_files()


def test_a_config_replaced_after_open_is_refused_when_hashed(src):
    ckpt = Checkpoint.open(src)
    text = (src / "config.json").read_text()
    (src / "config.json.new").write_text(text.replace('"qwen3"', '"qwen3" ', 1))
    os.replace(src / "config.json.new", src / "config.json")
    with pytest.raises(InputError, match="config.json: was replaced"):
        ckpt.source_files()


@pytest.mark.parametrize("workers", [1, 2])
def test_an_export_whose_source_is_swapped_midway_is_exit_2_and_writes_no_manifest(src, tmp_path, capsys,
                                                                                   monkeypatch, workers):
    real_read, swapped = Checkpoint.read, []

    def read_then_swap(self, name):
        tensor = real_read(self, name)
        if not swapped:
            swapped.append(name)
            replace_weights(self.folder)
        return tensor

    monkeypatch.setattr(Checkpoint, "read", read_then_swap)
    out = tmp_path / "out"
    code = main(["export", str(src), "--out", str(out), "--formats", "fp16", "int4", "--workers", str(workers),
                 "--quiet"])
    err = capsys.readouterr().err
    assert swapped and code == 2 and "model.safetensors: was replaced" in err, err
    assert not list(out.rglob("qexport.json")) if out.exists() else True
