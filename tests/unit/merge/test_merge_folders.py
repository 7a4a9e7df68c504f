"""Checkpoint merges: a LoRA adapter folded into its base (checked against peft's own merge), a weighted average
(checked against torch), merged folders, one-pass merge + export, and the bad inputs they refuse."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from qexport.io.checkpoint import Checkpoint, load_config
from qexport.cli.main import main
from qexport.quant.dequant import dequantized_state_dict
from qexport.export.pipeline import ExportOptions, export, export_folder
from qexport.verify.functional import fixed_token_ids, load_model, model_from_state_dict, model_outputs
from qexport.model.quiet import quiet
from qexport.merge.sources import merge_folder, open_source

QWEN3_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_CASES = {
    "all-linear": dict(r=8, lora_alpha=16, target_modules=QWEN3_LINEARS),
    # Per-module ranks and alphas (peft's regex-suffix lookup) and rank-stabilised scaling alpha / sqrt(r).
    "patterns-rslora": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=True,
                            rank_pattern={"layers.1.self_attn.q_proj": 4, "v_proj": 2},
                            alpha_pattern={"down_proj": 3}),
    "embedding": dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]),
}


def ulp(x: torch.Tensor, dtype=torch.bfloat16) -> torch.Tensor:
    """Spacing of `dtype` numbers at |x|: 2^(e - p) for x = m * 2^e, 0.5 <= |m| < 1, p significant bits (bf16: 8)."""
    bits = 1 - int(math.log2(torch.finfo(dtype).eps))  # eps = 2^(1 - p)
    return torch.ldexp(torch.ones_like(x, dtype=torch.float64), torch.frexp(x.double()).exponent - bits)


def make_adapter(base: Path, out: Path, seed: int = 0, **lora) -> Path:
    """A peft LoRA adapter with random A and B (init_lora_weights=False), so that B @ A is nonzero."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    with quiet():
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
        torch.manual_seed(seed)
        get_peft_model(model, LoraConfig(init_lora_weights=False, **lora)).save_pretrained(out)
    return out


def peft_merged(base: Path, adapter: Path, dtype) -> dict[str, torch.Tensor]:
    """peft's merge_and_unload() of the adapter into the base loaded in `dtype`."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with quiet():
        model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
        return PeftModel.from_pretrained(model, adapter).merge_and_unload().state_dict()


@pytest.fixture(scope="module")
def gpt2_src(tmp_path_factory):
    """GPT-2 stores its projections as transformers Conv1D, [in, out]: the transposed (fan_in_fan_out) case."""
    from transformers import GPT2Config, GPT2LMHeadModel

    out = tmp_path_factory.mktemp("gpt2") / "model"
    torch.manual_seed(0)
    config = GPT2Config(n_embd=128, n_layer=2, n_head=2, vocab_size=512, n_positions=128)
    GPT2LMHeadModel(config).to(torch.bfloat16).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, qwen3_src, gpt2_src, build_model):
    cache = {}

    def get(case: str):
        if case not in cache:
            folder = tmp_path_factory.mktemp(f"lora-{case}") / "adapter"
            if case == "fp32-base":
                base = build_model("qwen3", dtype="float32")
                cache[case] = (base, make_adapter(base, folder, **LORA_CASES["all-linear"]))
            elif case == "gpt2-conv1d":
                cache[case] = (gpt2_src, make_adapter(gpt2_src, folder, r=8, lora_alpha=16,
                                                      target_modules=["c_attn", "c_fc"], fan_in_fan_out=True))
            else:
                cache[case] = (qwen3_src, make_adapter(qwen3_src, folder, **LORA_CASES[case]))
        return cache[case]

    return get


# --- LoRA against peft -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", [*LORA_CASES, "gpt2-conv1d", "fp32-base"])
def test_lora_merge_equals_peft_fp32_merge_rounded_to_base_dtype_within_one_ulp(adapters, case):
    # Both compute W + (B @ A) * scale in fp32 (peft on the base loaded in fp32) and round once to the base dtype.
    # The only possible difference is the fp32 matmul's summation order (a few fp32 ulps of B @ A), which can move
    # the final rounding by at most one ulp (of the base dtype) of the merged value. Measured: 0, bit-identical,
    # in every case.
    base, adapter = adapters(case)
    ours = open_source(base, lora=adapter)
    reference = peft_merged(base, adapter, torch.float32)
    assert ours.lora, "the adapter must adapt at least one module"
    for name in ours.names:
        dtype = ours.base.read(name).dtype
        mine, theirs = ours.read(name), reference[name].to(dtype)
        assert mine.dtype == dtype
        assert ((mine.double() - theirs.double()).abs() <= ulp(mine, dtype)).all(), name


@pytest.mark.parametrize("case", ["all-linear", "embedding"])
def test_lora_merge_equals_peft_bf16_merge_within_peft_double_rounding(adapters, case):
    # On a bf16 base peft adds fp32 Linear deltas in fp32 (same result as ours) but rounds an Embedding's delta to
    # bf16 before adding it (two roundings). Elementwise bound, with m our merged value, p peft's, d the delta:
    # |m - p| <= ulp(m)/2 (our rounding) + ulp(d)/2 (peft rounds d) + ulp(p)/2 (peft rounds the sum).
    base, adapter = adapters(case)
    ours = open_source(base, lora=adapter)
    reference = peft_merged(base, adapter, torch.bfloat16)
    for name in ours.names:
        mine, theirs = ours.read(name).double(), reference[name].double()
        delta = mine - ours.base.read(name).double()
        bound = (ulp(mine) + ulp(theirs) + ulp(delta)) / 2
        assert ((mine - theirs).abs() <= bound).all(), name


def test_lora_merge_changes_exactly_the_adapted_tensors(adapters):
    base, adapter = adapters("patterns-rslora")
    source = open_source(base, lora=adapter)
    changed = {n for n in source.names if not torch.equal(source.read(n), source.base.read(n))}
    assert changed == set(source.lora) and len(changed) == 2 * 3  # q, v, down in each of 2 layers


def test_rank_and_alpha_patterns_set_each_modules_scale_like_peft(adapters):
    base, adapter = adapters("patterns-rslora")
    modules = open_source(base, lora=adapter).merge["modules"]
    assert modules["model.layers.1.self_attn.q_proj"] == {"rank": 4, "alpha": 16, "scale": 16 / 4 ** 0.5}
    assert modules["model.layers.0.self_attn.q_proj"] == {"rank": 8, "alpha": 16, "scale": 16 / 8 ** 0.5}
    assert modules["model.layers.0.self_attn.v_proj"] == {"rank": 2, "alpha": 16, "scale": 16 / 2 ** 0.5}
    assert modules["model.layers.0.mlp.down_proj"] == {"rank": 8, "alpha": 3, "scale": 3 / 8 ** 0.5}


# --- the merged folder -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def merged_lora(adapters, tmp_path_factory):
    base, adapter = adapters("all-linear")
    out = tmp_path_factory.mktemp("merged") / "model"
    merge_folder(open_source(base, lora=adapter), out, progress=False)
    return base, adapter, out


def test_merged_folder_holds_the_merged_tensors_in_the_base_dtype(merged_lora):
    # Against peft's merge in fp32 (independent of qexport), rounded to bf16: at most one bf16 ulp apart.
    base, adapter, out = merged_lora
    stored = load_file(out / "model.safetensors")
    expected = peft_merged(base, adapter, torch.float32)
    assert stored.keys() == set(load_file(base / "model.safetensors"))
    for name, t in stored.items():
        assert t.dtype == torch.bfloat16, name
        reference = expected[name].double()
        assert ((t.double() - reference).abs() <= ulp(reference)).all(), name


def test_merged_folder_keeps_the_base_config_and_tokenizer_files(merged_lora):
    base, _, out = merged_lora
    assert load_config(out) == load_config(base)
    for side in Checkpoint.open(base).side_files():
        assert (out / side.name).read_bytes() == side.read_bytes()


def test_merged_folder_reloads_in_transformers_with_empty_loading_info(merged_lora):
    _, info = load_model(merged_lora[2])
    assert info == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": []}


def test_merged_folder_manifest_records_the_merge_inputs_with_sha256(merged_lora):
    base, adapter, out = merged_lora
    source = json.loads((out / "qexport.json").read_text())["source"]
    assert source["merge"]["method"] == "lora" and source["merge"]["adapter"] == str(adapter.absolute())
    assert {f["name"] for f in source["files"]} == {
        "base/config.json", "base/model.safetensors", "adapter/adapter_config.json", "adapter/adapter_model.safetensors"
    }


# --- averaging ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seeds,weights,dtype", [((0, 1), None, "bfloat16"), ((0, 1, 2), [1.0, 2.0, 3.0], "bfloat16"),
                                                ((0, 1), [1.0, 3.0], "float32")])
def test_average_equals_normalised_weighted_sum_computed_in_torch(build_model, seeds, weights, dtype):
    folders = [build_model("qwen3", dtype=dtype, seed=s) for s in seeds]
    source = open_source(models=folders, weights=weights)
    given = weights or [1.0] * len(folders)
    norm = [w / sum(given) for w in given]
    state_dicts = [load_file(f / "model.safetensors") for f in folders]
    for name in source.names:
        # The same fp32 sum in the same order, rounded once to bf16: bit-identical by construction of the definition.
        expected = sum(w * sd[name].float() for w, sd in zip(norm, state_dicts)).to(getattr(torch, dtype))
        assert torch.equal(source.read(name), expected), name


def test_average_weights_are_normalised_so_scaling_them_changes_nothing(build_model, tmp_path):
    folders = [build_model("qwen3", seed=s) for s in (0, 1)]
    a = merge_folder(open_source(models=folders), tmp_path / "a", progress=False)
    b = merge_folder(open_source(models=folders, weights=[2.5, 2.5]), tmp_path / "b", progress=False)
    assert a["files"][0]["sha256"] == b["files"][0]["sha256"]


# --- one pass: merge and export ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_pass_and_two_step(adapters, build_model, tmp_path_factory):
    """For a LoRA merge and a 2-way average: export in one pass, and merge to a folder then export that folder."""
    base, adapter = adapters("all-linear")
    inputs = {"lora": dict(src=base, lora=adapter),
              "average": dict(models=[build_model("qwen3", seed=0), build_model("qwen3", seed=1)])}
    options = ExportOptions(formats=("fp16", "int8", "int4"), progress=False)
    results = {}
    for kind, kwargs in inputs.items():
        root = tmp_path_factory.mktemp(f"onepass-{kind}")
        one = export(open_source(**kwargs), root / "one", options)
        merge_folder(open_source(**kwargs), root / "merged", progress=False)
        two = export_folder(root / "merged", root / "two", options)
        results[kind] = (root, one, two)
    return results


# Decision: weights, index, config and tokenizer files are byte-identical either way. What describes the source
# differs: the one-pass manifest's "source" lists every merge input file (base/..., adapter/... or model1/...) with
# sha256 plus a "merge" entry (method, inputs, weights or per-module LoRA rank/alpha/scale), and its README.md card
# says the source is a merge; the two-step export's source is the merged folder, whose own qexport.json records
# the merge.
CARD = "README.md"


@pytest.mark.parametrize("kind", ["lora", "average"])
@pytest.mark.parametrize("fmt", ["fp16", "int8", "int4"])
def test_one_pass_export_writes_the_same_bytes_as_merge_then_export(one_pass_and_two_step, kind, fmt):
    _, one, two = one_pass_and_two_step[kind]
    files_one = [(f["name"], f["sha256"]) for f in one[fmt]["files"] if f["name"] != CARD]
    files_two = [(f["name"], f["sha256"]) for f in two[fmt]["files"] if f["name"] != CARD]
    assert files_one == files_two and any(name.endswith(".safetensors") for name, _ in files_one)


@pytest.mark.parametrize("kind", ["lora", "average"])
def test_one_pass_manifest_differs_from_two_step_only_where_it_describes_the_source(one_pass_and_two_step, kind):
    _, one, two = one_pass_and_two_step[kind]

    def without_source(manifest: dict) -> dict:
        card_bytes = sum(f["bytes"] for f in manifest["files"] if f["name"] == CARD)
        files = [f for f in manifest["files"] if f["name"] != CARD]
        summary = {**manifest["summary"], "total_bytes": manifest["summary"]["total_bytes"] - card_bytes}
        return {**{k: v for k, v in manifest.items() if k != "source"}, "files": files, "summary": summary}

    for fmt in one:
        assert without_source(one[fmt]) == without_source(two[fmt])
        assert one[fmt]["source"]["merge"]["method"] == kind and "merge" not in two[fmt]["source"]


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_one_pass_merged_export_reloads_with_empty_loading_info_and_logits_equal_our_dequantization(
        one_pass_and_two_step, fmt):
    root, _, _ = one_pass_and_two_step["lora"]
    model, info = load_model(root / "one" / fmt, dtype=torch.float32)
    assert info == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": []}
    ours = model_from_state_dict(load_config(root / "one" / fmt), dequantized_state_dict(root / "one" / fmt))
    ids = fixed_token_ids(model.config.vocab_size, batch=2, length=32)
    assert torch.equal(model_outputs(model, ids), model_outputs(ours, ids))


# --- bad input: exit 2, one line naming the problem, nothing written ---------------------------------------------


def copy_folder(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def rename_key(path: Path, old_part: str, new_part: str) -> None:
    tensors = load_file(path)
    save_file({k.replace(old_part, new_part): v for k, v in tensors.items()}, path)


def run_cli(capsys, *args) -> tuple[int, str]:
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


BAD_ADAPTERS = {
    "dora": (lambda a: edit_json(a / "adapter_config.json", use_dora=True), "use_dora"),
    "bias": (lambda a: edit_json(a / "adapter_config.json", bias="all"), "bias"),
    "modules_to_save": (lambda a: edit_json(a / "adapter_config.json", modules_to_save=["lm_head"]), "modules_to_save"),
    "not-lora": (lambda a: edit_json(a / "adapter_config.json", peft_type="IA3"), "peft_type"),
    "unknown-module": (lambda a: rename_key(a / "adapter_model.safetensors", "layers.1.", "layers.7."),
                       "model.layers.7."),
    "rank-mismatch": (lambda a: edit_json(a / "adapter_config.json", rank_pattern={"q_proj": 4}), "rank 4"),
    "unpaired": (lambda a: save_file({k: v for k, v in load_file(a / "adapter_model.safetensors").items()
                                      if "layers.0.mlp.up_proj.lora_B" not in k}, a / "adapter_model.safetensors"),
                 "layers.0.mlp.up_proj.lora_A"),
}


@pytest.mark.parametrize("command", ["merge", "export"])
@pytest.mark.parametrize("case", BAD_ADAPTERS)
def test_bad_adapter_exits_2_naming_the_key_and_writes_nothing(adapters, tmp_path, capsys, command, case):
    base, good = adapters("all-linear")
    adapter = copy_folder(good, tmp_path / "adapter")
    damage, named = BAD_ADAPTERS[case]
    damage(adapter)
    args = ["merge", "--base", base] if command == "merge" else ["export", base]
    code, err = run_cli(capsys, *args, "--lora", adapter, "--out", tmp_path / "out")
    assert code == 2 and err.count("\n") == 1 and named in err, err
    assert not (tmp_path / "out").exists()


def drop_tensor(folder: Path, name: str) -> None:
    tensors = load_file(folder / "model.safetensors")
    del tensors[name]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("case", ["architecture", "shape", "missing-tensor", "negative-weight", "zero-weights",
                                  "weight-count"])
def test_bad_average_exits_2_with_one_line_naming_it_and_writes_nothing(build_model, tmp_path, capsys, case):
    first = build_model("qwen3", seed=0)
    second, extra, named = build_model("qwen3", seed=1), [], None
    if case == "architecture":
        second, named = build_model("llama"), "model_type"
    elif case == "shape":
        second, named = build_model("qwen3", intermediate_size=512), "'model.layers.0.mlp."
    elif case == "missing-tensor":
        second = copy_folder(second, tmp_path / "second")
        drop_tensor(second, "model.norm.weight")
        named = "'model.norm.weight'"
    elif case == "negative-weight":
        extra, named = ["--weights", "1", "-1"], "--weights"
    elif case == "zero-weights":
        extra, named = ["--weights", "0", "0"], "--weights"
    elif case == "weight-count":
        extra, named = ["--weights", "1", "2", "3"], "--weights"
    capsys.readouterr()  # building the models above may print progress
    for command in (["merge"], ["export"]):
        code, err = run_cli(capsys, *command, "--models", first, second, *extra, "--out", tmp_path / "out")
        assert code == 2 and err.count("\n") == 1 and named in err, err
        assert not (tmp_path / "out").exists()


def test_merge_refuses_to_write_over_its_input(adapters, capsys):
    base, adapter = adapters("all-linear")
    before = sorted(p.name for p in base.iterdir())
    code, err = run_cli(capsys, "merge", "--base", base, "--lora", adapter, "--out", base, "--overwrite")
    assert code == 2 and "input" in err
    assert sorted(p.name for p in base.iterdir()) == before


def test_merge_cli_writes_a_folder_that_exports(adapters, tmp_path, capsys):
    base, adapter = adapters("all-linear")
    code, _ = run_cli(capsys, "merge", "--base", base, "--lora", adapter, "--out", tmp_path / "merged", "--quiet")
    assert code == 0 and (tmp_path / "merged" / "model.safetensors").is_file()
    code, _ = run_cli(capsys, "export", tmp_path / "merged", "--out", tmp_path / "out", "--formats", "int4", "--quiet")
    assert code == 0 and (tmp_path / "out" / "int4" / "model.safetensors").is_file()


def test_nan_in_one_averaged_model_is_blamed_on_that_models_file(build_model, tmp_path, capsys):
    first = build_model("qwen3", seed=0)
    second = copy_folder(build_model("qwen3", seed=1), tmp_path / "second")
    tensors = load_file(second / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(tensors, second / "model.safetensors", metadata={"format": "pt"})
    capsys.readouterr()
    code, err = run_cli(capsys, "export", "--models", first, second, "--out", tmp_path / "out", "--formats", "int8")
    assert code == 2 and err.count("\n") == 1, err
    assert str(second / "model.safetensors") in err and str(first) not in err, err
    assert "model.layers.1.mlp.up_proj.weight" in err
