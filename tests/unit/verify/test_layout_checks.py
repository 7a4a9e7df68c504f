"""verify's checks of the stored files (qexport/verify/layout_checks.py: shards, manifest, tensor_names, layout,
bytes) called directly on hand-written folders: a few tensors, a manifest and a config in tmp_path, no model built
or exported. docs/design.md: a quantized Linear stores weight_packed I32 [out, in*bits/32], weight_scale [out, 1] or
[out, in/group] and weight_shape I64 [2]; every reference tensor is stored once (tied ones once); bytes are
accounted: stored equals predicted per tensor and per file."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from qexport.verify import layout_checks
from tests.support.unit_verify import (
    DOWN,
    NORM,
    UP,
    config_with,
    context,
    int4_module,
    manifest_of,
    named,
    qc,
    reference_folder,
    reference_weights,
    write_folder,
    write_manifest,
)

# each check reports under the name `verify --only`, reports and baselines know it by
check_shards = named(layout_checks.check_shards, "shards")
check_manifest = named(layout_checks.check_manifest, "manifest")
check_tensor_names = named(layout_checks.check_tensor_names, "tensor_names")
check_layout = named(layout_checks.check_layout, "layout")
check_bytes = named(layout_checks.check_bytes, "bytes")


ref = pytest.fixture(scope="module", name="ref")(reference_folder)


def int4_tensors(group_size: int = 16) -> dict[str, torch.Tensor]:
    w = reference_weights()
    tensors = {NORM: w[NORM].half()}
    for module in (DOWN, UP):
        tensors |= int4_module(module, w[f"{module}.weight"], group_size)[0]
    return tensors


def int4_export(tmp_path, tensors=None, config=None, manifest=True):
    folder = write_folder(tmp_path / "int4", int4_tensors() if tensors is None else tensors,
                          config_with(quantization_config=qc()) if config is None else config)
    return write_manifest(folder) if manifest else folder


# ---------------------------------------------------------------------------------------------------------------
# shards


def test_a_single_file_export_passes_shards_naming_its_file(tmp_path, ref):
    result = check_shards(context(int4_export(tmp_path), ref))
    assert result.passed and result.detail == "1 file(s), 7 stored tensors; single file"
    assert result.metrics == {"files": ["model.safetensors"]}


def test_unreadable_shards_fail_shards_with_the_reason(tmp_path, ref):
    folder = int4_export(tmp_path, manifest=False)
    (folder / "model.safetensors").write_bytes(b"\x00" * 4)
    result = check_shards(context(folder, ref))
    assert not result.passed and "model.safetensors" in result.detail


# ---------------------------------------------------------------------------------------------------------------
# manifest


def test_files_matching_the_manifest_pass_counting_them(tmp_path, ref):
    result = check_manifest(context(int4_export(tmp_path), ref))
    assert result.passed and result.detail == "1 files match their recorded size and sha256"
    assert result.metrics == {"files_checked": 1}


def test_no_manifest_skips_saying_hashes_are_not_checked(tmp_path, ref):
    result = check_manifest(context(int4_export(tmp_path, manifest=False), ref))
    assert result.skipped and result.detail == "no qexport.json (not written by qexport): file hashes not checked"


def test_an_unreadable_manifest_fails_naming_why(tmp_path, ref):
    folder = int4_export(tmp_path)
    (folder / "qexport.json").write_text("[]")
    result = check_manifest(context(folder, ref))
    assert not result.passed and result.detail == "qexport.json: qexport.json is not a JSON object"


def edited_manifest(tmp_path, change):
    folder = int4_export(tmp_path, manifest=False)
    manifest = manifest_of(folder)
    change(manifest)
    return write_manifest(folder, manifest)


MANIFEST_FAULTS = [
    # (id, change to the manifest, the check's whole detail)
    ("file_missing", lambda m: m["files"].append({"name": "model-2.safetensors", "bytes": 8, "sha256": "0"}),
     "model-2.safetensors is listed but missing"),
    ("size", lambda m: m["files"][0].update(bytes=m["files"][0]["bytes"] + 1), None),
    ("sha256", lambda m: m["files"][0].update(sha256="0" * 64),
     "model.safetensors sha256 differs from the manifest (changed after export)"),
    ("file_not_listed", lambda m: m.update(files=[]), "model.safetensors is not in the manifest"),
    ("tensor_not_stored", lambda m: m["tensors"].update({"model.gone": {"dtype": "F16", "shape": [2]}}),
     "tensor 'model.gone' is in the manifest but not in the shards"),
    ("tensor_dtype", lambda m: m["tensors"][NORM].update(dtype="F32"),
     f"tensor '{NORM}' is F16 [32], manifest says F32 [32]"),
    ("tensor_shape", lambda m: m["tensors"][NORM].update(shape=[2, 16]),
     f"tensor '{NORM}' is F16 [32], manifest says F16 [2, 16]"),
]


@pytest.mark.parametrize("change,detail", [f[1:] for f in MANIFEST_FAULTS], ids=[f[0] for f in MANIFEST_FAULTS])
def test_a_file_or_tensor_disagreeing_with_the_manifest_fails_naming_it(tmp_path, ref, change, detail):
    folder = edited_manifest(tmp_path, change)
    size = (folder / "model.safetensors").stat().st_size
    detail = detail or f"model.safetensors is {size} bytes, manifest says {size + 1}"
    result = check_manifest(context(folder, ref))
    assert not result.passed and result.detail == detail
    assert result.metrics == {"problems": [detail]}


def test_a_byte_changed_after_export_fails_the_manifest(tmp_path, ref):
    folder = int4_export(tmp_path)
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (folder / "model.safetensors").write_bytes(bytes(data))
    assert check_manifest(context(folder, ref)).detail == ("model.safetensors sha256 differs from the manifest "
                                                          "(changed after export)")


def test_every_listed_file_is_checked_not_only_shards(tmp_path, ref):
    folder = int4_export(tmp_path, manifest=False)
    manifest = manifest_of(folder)
    config = (folder / "config.json").read_bytes()
    manifest["files"].append({"name": "config.json", "bytes": len(config),
                              "sha256": hashlib.sha256(config).hexdigest()})
    write_manifest(folder, manifest)
    assert check_manifest(context(folder, ref)).detail == "2 files match their recorded size and sha256"
    (folder / "config.json").write_bytes(config.replace(b'"qwen3"', b'"qwen4"'))
    assert check_manifest(context(folder, ref)).detail == ("config.json sha256 differs from the manifest (changed "
                                                           "after export)")


@pytest.mark.parametrize("count,more", [(5, ""), (6, "; and 1 more"), (7, "; and 2 more")])
def test_five_manifest_problems_are_named_and_the_rest_counted(tmp_path, ref, count, more):
    def change(m):
        for i in range(count):
            m["files"].append({"name": f"gone-{i}.safetensors", "bytes": 1, "sha256": "0"})

    result = check_manifest(context(edited_manifest(tmp_path, change), ref))
    named = "; ".join(f"gone-{i}.safetensors is listed but missing" for i in range(5))
    assert not result.passed and result.detail == named + more
    assert len(result.metrics["problems"]) == count


def test_a_manifest_without_tensors_checks_the_files_only(tmp_path, ref):
    result = check_manifest(context(edited_manifest(tmp_path, lambda m: m.pop("tensors")), ref))
    assert result.passed


def test_with_unreadable_shards_the_manifest_still_checks_files(tmp_path, ref):
    folder = int4_export(tmp_path)
    (folder / "model.safetensors").write_bytes(b"\x00" * 4)
    result = check_manifest(context(folder, ref))
    size = len(b"\x00" * 4)
    assert not result.passed and result.detail.startswith(f"model.safetensors is {size} bytes, manifest says ")


# ---------------------------------------------------------------------------------------------------------------
# tensor_names


def test_every_reference_tensor_stored_once_passes(tmp_path, ref):
    result = check_tensor_names(context(int4_export(tmp_path), ref))
    assert result.passed and result.detail == "3 tensors by reference name (2 quantized), as in the reference"
    assert result.metrics == {"missing": [], "extra": [], "tied_stored_twice": []}


def test_a_missing_and_an_extra_tensor_fail_naming_them(tmp_path, ref):
    tensors = int4_tensors()
    del tensors[NORM]
    tensors["model.extra"] = torch.ones(2)
    result = check_tensor_names(context(int4_export(tmp_path, tensors), ref))
    assert not result.passed and result.detail == f"missing {NORM}; not in the reference: model.extra"
    assert result.metrics == {"missing": [NORM], "extra": ["model.extra"], "tied_stored_twice": []}


def test_a_quantized_module_the_reference_lacks_is_extra(tmp_path, ref):
    tensors = int4_tensors() | int4_module("model.layers.0.mlp.gate_proj", torch.randn(64, 32))[0]
    result = check_tensor_names(context(int4_export(tmp_path, tensors), ref))
    assert not result.passed and result.metrics["extra"] == ["model.layers.0.mlp.gate_proj.weight"]


TIED = config_with(tie_word_embeddings=True)


@pytest.fixture(scope="module")
def tied_ref(tmp_path_factory):
    # a tied checkpoint stores the shared embedding once, under embed_tokens
    return write_folder(tmp_path_factory.mktemp("tied") / "ref",
                        reference_weights() | {"model.embed_tokens.weight": torch.randn(64, 32).bfloat16()}, TIED)


def tied_export(tmp_path, lm_head: bool):
    tensors = int4_tensors() | {"model.embed_tokens.weight": torch.randn(64, 32).half()}
    if lm_head:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    return int4_export(tmp_path, tensors, config_with(tie_word_embeddings=True, quantization_config=qc())), \
        check_tensor_names


def test_a_tied_tensor_stored_once_passes_saying_so(tmp_path, tied_ref):
    folder, check = tied_export(tmp_path, lm_head=False)
    result = check(context(folder, tied_ref))
    assert result.passed and result.detail == "4 tensors by reference name (2 quantized), as in the reference; 1 tied stored once"


def test_a_tied_tensor_stored_again_fails(tmp_path, tied_ref):
    folder, check = tied_export(tmp_path, lm_head=True)
    result = check(context(folder, tied_ref))
    assert not result.passed
    assert result.detail == "tied tensor(s) lm_head.weight stored again (tie_word_embeddings: store once)"
    assert result.metrics == {"missing": [], "extra": [], "tied_stored_twice": ["lm_head.weight"]}


def test_tensor_names_skips_unreadable_shards(tmp_path, ref):
    folder = int4_export(tmp_path, manifest=False)
    (folder / "model.safetensors").write_bytes(b"\x00" * 4)
    for check in (check_tensor_names, check_layout, check_bytes):
        result = check(context(folder, ref))
        assert result.skipped and result.detail == "shards unreadable"


# ---------------------------------------------------------------------------------------------------------------
# layout


def layout(folder, ref):
    return check_layout(context(folder, ref))


def test_an_int4_export_as_its_config_says_passes(tmp_path, ref):
    result = layout(int4_export(tmp_path), ref)
    assert result.passed and result.detail == "2 quantized modules match the config"


def test_a_dense_export_without_a_quantization_config_passes(tmp_path, ref):
    folder = write_folder(tmp_path / "fp16", {k: v.half() for k, v in reference_weights().items()})
    result = layout(folder, ref)
    assert result.passed and result.detail == "dense export: no quantized modules"


def test_a_dense_export_with_a_quantization_config_fails(tmp_path, ref):
    folder = write_folder(tmp_path / "fp16", {k: v.half() for k, v in reference_weights().items()},
                          config_with(quantization_config=qc()))
    result = layout(folder, ref)
    assert not result.passed and result.detail == "quantization_config present but no module is stored quantized"


@pytest.mark.parametrize("quantization_config", [..., ["compressed-tensors"]], ids=["none", "a_list"])
def test_quantized_modules_without_a_quantization_config_object_fail(tmp_path, ref, quantization_config):
    folder = int4_export(tmp_path, config=config_with(quantization_config=quantization_config))
    result = layout(folder, ref)
    assert not result.passed
    assert result.detail == "2 modules stored quantized but config.json has no quantization_config"


def int8_naive(module: str, w: torch.Tensor, packed: bool = False) -> dict[str, torch.Tensor]:
    from qexport.quant import primitives as quant
    scales = quant.compute_scales(w.float(), 8, None, torch.float16)
    q = quant.quantize(w.float(), scales, 8, None)
    if packed:
        return {f"{module}.weight_packed": quant.pack_int8(q), f"{module}.weight_scale": scales,
                f"{module}.weight_shape": torch.tensor(list(w.shape))}
    return {f"{module}.weight": q, f"{module}.weight_scale": scales}


def int8_tensors(packed=False, **kw):
    w = reference_weights()
    return {NORM: w[NORM].half(), **int8_naive(DOWN, w[f"{DOWN}.weight"], packed),
            **int8_naive(UP, w[f"{UP}.weight"], packed)}


@pytest.mark.parametrize("fmt,packed", [("naive-quantized", False), ("int-quantized", False),
                                        ("pack-quantized", True)])
def test_int8_per_channel_exports_in_each_layout_pass(tmp_path, ref, fmt, packed):
    folder = int4_export(tmp_path, int8_tensors(packed), config_with(quantization_config=qc(8, "channel", fmt=fmt)))
    result = layout(folder, ref)
    assert result.passed, result.detail


def test_int8_per_tensor_scale_of_one_element_passes_in_either_shape(tmp_path, ref):
    for shape in ((1,), (1, 1)):
        tensors = int8_tensors()
        for module in (DOWN, UP):
            tensors[f"{module}.weight_scale"] = torch.ones(shape, dtype=torch.float16)
        folder = int4_export(tmp_path / str(len(shape)), tensors,
                             config_with(quantization_config=qc(8, "tensor", fmt="naive-quantized")))
        assert layout(folder, ref).passed


def bad_layout(tmp_path, ref, change, config=None, tensors=None):
    tensors = int4_tensors() if tensors is None else tensors
    change(tensors)
    folder = int4_export(tmp_path, tensors, config)
    return layout(folder, ref)


D = DOWN
LAYOUT_FAULTS = [
    # (id, change to the int4 g16 tensors (down_proj [32, 64]), config (None: int4 g16 pack-quantized), problem)
    ("packed_dtype", lambda t: t.update({f"{D}.weight_packed": t[f"{D}.weight_packed"].view(torch.float32)}), None,
     f"{D}.weight_packed is F32 [32, 8], 4-bit packing of [32, 64] is I32 [32, 8]"),
    ("packed_shape", lambda t: t.update({f"{D}.weight_packed": t[f"{D}.weight_packed"][:, :4]}), None,
     f"{D}.weight_packed is I32 [32, 4], 4-bit packing of [32, 64] is I32 [32, 8]"),
    ("packed_rows", lambda t: t.update({f"{D}.weight_packed": t[f"{D}.weight_packed"][:16]}), None,
     f"{D}.weight_packed is I32 [16, 8], 4-bit packing of [32, 64] is I32 [32, 8]"),
    ("no_weight_shape", lambda t: t.pop(f"{D}.weight_shape"), None, f"{D}: weight_packed without weight_shape"),
    ("weight_shape_swapped", lambda t: t.update({f"{D}.weight_shape": torch.tensor([64, 32])}), None,
     f"{D}.weight_shape is [64, 32], the reference weight is [32, 64]"),
    ("scale_per_channel_for_group", lambda t: t.update({f"{D}.weight_scale": t[f"{D}.weight_scale"][:, :1]}), None,
     f"{D}.weight_scale is [32, 1], group strategy needs [32, 4]"),
    ("scale_transposed", lambda t: t.update({f"{D}.weight_scale": t[f"{D}.weight_scale"].T}), None,
     f"{D}.weight_scale is [4, 32], group strategy needs [32, 4]"),
    ("scale_integer", lambda t: t.update({f"{D}.weight_scale": t[f"{D}.weight_scale"].view(torch.int16)}), None,
     f"{D}.weight_scale has dtype I16, not floating point"),
    ("scale_only", lambda t: (t.pop(f"{D}.weight_packed"), t.pop(f"{D}.weight_shape")), None,
     f"{D}: weight_scale without weight or weight_packed"),
]


@pytest.mark.parametrize("change,config,problem", [f[1:] for f in LAYOUT_FAULTS], ids=[f[0] for f in LAYOUT_FAULTS])
def test_a_module_stored_unlike_its_config_fails_naming_it(tmp_path, ref, change, config, problem):
    result = bad_layout(tmp_path, ref, change, config)
    assert not result.passed and result.detail == f"1 problem(s): {problem}"
    assert result.metrics == {"problems": [problem]}


def test_packed_weights_under_an_unpacked_format_fail(tmp_path, ref):
    result = bad_layout(tmp_path, ref, lambda t: None, config_with(quantization_config=qc(fmt="naive-quantized")))
    assert result.metrics["problems"] == [f"{D}: packed weights but the config format is 'naive-quantized'",
                                          f"{UP}: packed weights but the config format is 'naive-quantized'"]


def test_bf16_scales_are_floating_point(tmp_path, ref):
    result = bad_layout(tmp_path, ref, lambda t: t.update(
        {f"{D}.weight_scale": t[f"{D}.weight_scale"].bfloat16(), f"{UP}.weight_scale": t[f"{UP}.weight_scale"].float()}))
    assert result.passed


def test_a_group_size_the_input_does_not_divide_by_fails(tmp_path, ref):
    # up_proj's input is 32: group 24 leaves a remainder (down_proj's 64 does not divide either)
    result = bad_layout(tmp_path, ref, lambda t: None, config_with(quantization_config=qc(group_size=24)))
    assert not result.passed
    assert result.metrics["problems"] == [f"{D}: input size 64 does not divide by group_size 24",
                                          f"{UP}: input size 32 does not divide by group_size 24"]


def test_a_group_strategy_without_group_size_needs_per_channel_scales(tmp_path, ref):
    config = qc()
    del config["config_groups"]["group_0"]["weights"]["group_size"]
    result = bad_layout(tmp_path, ref, lambda t: None, config_with(quantization_config=config))
    assert result.metrics["problems"][0] == f"{D}.weight_scale is [32, 4], group strategy needs [32, 1]"


def test_int8_codes_of_the_wrong_shape_or_dtype_fail(tmp_path, ref):
    naive = config_with(quantization_config=qc(8, "channel", fmt="naive-quantized"))
    for i, bad in enumerate((torch.zeros(32, 32, dtype=torch.int8), torch.zeros(32, 64, dtype=torch.int16))):
        result = bad_layout(tmp_path / str(i), ref, lambda t, bad=bad: t.update({f"{D}.weight": bad}), naive,
                            int8_tensors())
        dtype = "I8" if i == 0 else "I16"
        assert result.metrics["problems"] == [f"{D}.weight is {dtype} {list(bad.shape)}, expected I8 [32, 64]"]


def test_int8_codes_under_pack_quantized_fail(tmp_path, ref):
    result = bad_layout(tmp_path, ref, lambda t: None, config_with(quantization_config=qc(8, "channel")),
                        int8_tensors())
    assert result.metrics["problems"] == [f"{D}: unpacked int8 codes but the config format is 'pack-quantized'",
                                          f"{UP}: unpacked int8 codes but the config format is 'pack-quantized'"]


def test_4_bit_codes_stored_one_per_byte_fail(tmp_path, ref):
    # what a naive-quantized int4 export looks like: codes in [-8, 7] in int8 storage, per-group scales
    from qexport.quant import primitives as quant
    w = reference_weights()
    scales = quant.compute_scales(w[f"{DOWN}.weight"].float(), 4, 16, torch.float16)
    codes = quant.quantize(w[f"{DOWN}.weight"].float(), scales, 4, 16)
    tensors = {NORM: w[NORM].half(), f"{D}.weight": codes, f"{D}.weight_scale": scales,
               **int8_naive(UP, w[f"{UP}.weight"])}
    config = qc(fmt="naive-quantized")
    config["ignore"].append(UP)
    result = bad_layout(tmp_path, ref, lambda t: None, config_with(quantization_config=config), tensors)
    assert f"{D}: 4-bit codes stored unpacked, one per byte (8 bits per weight); use pack-quantized" in \
        result.metrics["problems"]


def test_a_module_stored_quantized_but_ignored_fails(tmp_path, ref):
    config = qc()
    config["ignore"].append(UP)
    result = bad_layout(tmp_path, ref, lambda t: None, config_with(quantization_config=config))
    assert result.metrics["problems"] == [f"{UP}: stored quantized but no config group targets it (or it is ignored)"]


def test_a_quantized_module_the_reference_has_no_matrix_for_fails(tmp_path, ref):
    extra = int4_module("model.layers.0.mlp.gate_proj", torch.randn(64, 32))[0]
    result = bad_layout(tmp_path, ref, lambda t: t.update(extra))
    assert result.metrics["problems"] == [("model.layers.0.mlp.gate_proj: quantized but the reference has no 2-D "
                                          "model.layers.0.mlp.gate_proj.weight")]


def test_a_quantized_module_whose_reference_is_not_a_matrix_fails(tmp_path, ref):
    extra = int4_module("model.norm", torch.randn(1, 32))[0]
    result = bad_layout(tmp_path, ref, lambda t: (t.pop(NORM), t.update(extra)))
    assert result.metrics["problems"] == ["model.norm: quantized but the reference has no 2-D model.norm.weight"]


def test_bytes_leaves_a_quantized_module_without_a_reference_matrix_to_layout(tmp_path, ref):
    # It used to raise ValueError (unpacking a 1-D shape), reported as "check raised"; layout names the problem.
    tensors = int4_tensors()
    tensors.pop(NORM)
    tensors.update(int4_module("model.norm", torch.randn(1, 32))[0])
    result = check_bytes(context(int4_export(tmp_path, tensors), ref))
    assert result.passed and result.metrics["quantized_weights"] == 4096  # the two real Linears only

def test_a_targeted_linear_stored_dense_fails(tmp_path, ref):
    def dense_up(t):
        for leaf in ("weight_packed", "weight_scale", "weight_shape"):
            t.pop(f"{UP}.{leaf}")
        t[f"{UP}.weight"] = reference_weights()[f"{UP}.weight"].half()

    result = bad_layout(tmp_path, ref, dense_up)
    assert result.metrics["problems"] == [f"{UP}: a targeted Linear stored dense and not in ignore"]


def test_a_linear_stored_dense_and_ignored_passes(tmp_path, ref):
    def dense_up(t):
        for leaf in ("weight_packed", "weight_scale", "weight_shape"):
            t.pop(f"{UP}.{leaf}")
        t[f"{UP}.weight"] = reference_weights()[f"{UP}.weight"].half()

    config = qc()
    config["ignore"].append("re:.*up_proj$")
    result = bad_layout(tmp_path, ref, dense_up, config_with(quantization_config=config))
    assert result.passed and result.detail == "1 quantized modules match the config"


@pytest.mark.parametrize("modules,ellipsis", [((D,), ""), ((D, UP), "; ...")], ids=["two", "four"])
def test_three_layout_problems_are_named_and_more_cut_with_an_ellipsis(tmp_path, ref, modules, ellipsis):
    def change(t):
        for m in modules:
            t.pop(f"{m}.weight_shape")
            t[f"{m}.weight_scale"] = t[f"{m}.weight_scale"][:, :1]

    result = bad_layout(tmp_path, ref, change)
    problems = result.metrics["problems"]
    assert not result.passed and len(problems) == 2 * len(modules)
    assert result.detail == f"{len(problems)} problem(s): " + "; ".join(problems[:3]) + ellipsis


def test_three_layout_problems_are_all_named(tmp_path, ref):
    def change(t):
        t.pop(f"{D}.weight_shape")
        t[f"{D}.weight_scale"] = t[f"{D}.weight_scale"][:, :1]
        t.pop(f"{UP}.weight_shape")

    result = bad_layout(tmp_path, ref, change)
    problems = result.metrics["problems"]
    assert len(problems) == 3 and result.detail == "3 problem(s): " + "; ".join(problems)


# ---------------------------------------------------------------------------------------------------------------
# asymmetric layouts (symmetric: false): zero points


def asym_config(fmt="pack-quantized"):
    return config_with(quantization_config=qc(fmt=fmt, symmetric=False))


def with_zero_points(zp_shape, dtype=torch.int32):
    def change(t):
        for m in (D, UP):
            t[f"{m}.weight_zero_point"] = torch.zeros(zp_shape(m), dtype=dtype)
    return change


def test_packed_asymmetric_zero_points_packed_along_the_output_dimension_pass(tmp_path, ref):
    # down_proj [32, 64] g16: 4 groups, 32 rows x 4 bits = 4 int32 words; up_proj [64, 32]: 2 groups, 8 words
    shapes = {D: (4, 4), UP: (8, 2)}
    result = bad_layout(tmp_path, ref, with_zero_points(shapes.get), asym_config())
    assert result.passed, result.detail


def test_asymmetric_without_zero_points_fails(tmp_path, ref):
    result = bad_layout(tmp_path, ref, lambda t: None, asym_config())
    assert result.metrics["problems"] == [f"{D}: asymmetric (symmetric: false) but no weight_zero_point",
                                          f"{UP}: asymmetric (symmetric: false) but no weight_zero_point"]


def test_packed_zero_points_of_the_wrong_shape_or_dtype_fail(tmp_path, ref):
    shapes = {D: (32, 4), UP: (8, 2)}
    result = bad_layout(tmp_path, ref, with_zero_points(shapes.get), asym_config())
    assert result.metrics["problems"] == [f"{D}.weight_zero_point is I32 [32, 4], expected I32 [4, 4]"]
    shapes = {D: (4, 4), UP: (8, 2)}
    result = bad_layout(tmp_path / "b", ref, with_zero_points(shapes.get, torch.int8), asym_config())
    assert result.metrics["problems"] == [f"{D}.weight_zero_point is I8 [4, 4], expected I32 [4, 4]",
                                          f"{UP}.weight_zero_point is I8 [8, 2], expected I32 [8, 2]"]


def test_unpacked_asymmetric_zero_points_are_one_per_group_of_any_dtype(tmp_path, ref):
    from qexport.quant import primitives as quant
    w = reference_weights()
    tensors = {NORM: w[NORM].half()}
    for m, (rows, cols) in ((D, (32, 64)), (UP, (64, 32))):
        scales = quant.compute_scales(w[f"{m}.weight"].float(), 8, 16, torch.float16)
        tensors |= {f"{m}.weight": quant.quantize(w[f"{m}.weight"].float(), scales, 8, 16),
                    f"{m}.weight_scale": scales, f"{m}.weight_zero_point": torch.zeros(rows, cols // 16,
                                                                                      dtype=torch.int8)}
    config = config_with(quantization_config=qc(8, fmt="naive-quantized", symmetric=False))
    assert bad_layout(tmp_path, ref, lambda t: None, config, tensors).passed
    tensors[f"{D}.weight_zero_point"] = torch.zeros(4, 4, dtype=torch.int8)
    result = bad_layout(tmp_path / "b", ref, lambda t: None, config, tensors)
    assert result.metrics["problems"] == [f"{D}.weight_zero_point is I8 [4, 4], expected [32, 4]"]


def test_symmetric_layouts_need_no_zero_points(tmp_path, ref):
    assert bad_layout(tmp_path, ref, lambda t: None, config_with(quantization_config=qc(symmetric=True))).passed


# ---------------------------------------------------------------------------------------------------------------
# bytes: stored == predicted per tensor and file; a quantized module no larger than its declared scheme needs

# int4 g16 of down_proj [32, 64] and up_proj [64, 32] with fp16 scales, each: codes 32 x 64 x 4 bits = 1024 bytes,
# weight_shape 16, scales 128 x 2 = 256 -> 1296 bytes; 4096 weights in 2592 bytes: 5.0625 bits a weight,
# 2 x 4096 / 2592 = 3.16x vs fp16. The norm (32 fp16 = 64 bytes) stays dense: whole model 8256 / 2656 = 3.108x.
INT4_MODULE_BYTES = 1296


def test_an_int4_export_stores_what_its_config_predicts(tmp_path, ref):
    from qexport.report.values import format_ratio

    folder = int4_export(tmp_path)
    result = check_bytes(context(folder, ref))
    assert result.passed
    assert result.metrics == {
        "linear_weights": 2, "quantized_linears": 2, "quantized_linear_share": 1.0,
        "weight_bytes": (folder / "model.safetensors").stat().st_size, "file_ratio": 8256 / 2656,
        "quantized_weights": 4096, "quantized_bytes": 2 * INT4_MODULE_BYTES,
        "quantized_ratio": 8192 / (2 * INT4_MODULE_BYTES), "bits_per_quantized_weight": 5.0625,
        "predicted_quantized_ratio": 8192 / (2 * INT4_MODULE_BYTES)}
    assert result.detail == (f"stored == predicted; 2/2 Linears quantized (100.0% of their bytes), quantized "
                             f"{format_ratio(8192 / 2592)}, whole model {format_ratio(8256 / 2656)} vs fp16")


def test_a_dense_export_reports_the_whole_model_ratio_only(tmp_path, ref):
    from qexport.report.values import format_ratio

    folder = write_folder(tmp_path / "fp16", {k: v.half() for k, v in reference_weights().items()})
    result = check_bytes(context(folder, ref))
    assert result.passed and result.detail == f"stored == predicted; whole model {format_ratio(1.0)} vs fp16"
    assert result.metrics["quantized_linears"] == 0 and result.metrics["quantized_linear_share"] == 0.0
    assert result.metrics["quantized_ratio"] is None and "predicted_quantized_ratio" not in result.metrics


def test_share_counts_only_the_body_linears_not_lm_head_nor_tied(tmp_path):
    # half of the body's Linear weights quantized (by count and bytes: both [32, 64]-sized); lm_head is not body
    w = reference_weights() | {"lm_head.weight": torch.randn(64, 32).bfloat16()}
    ref = write_folder(tmp_path / "ref", w)
    tensors = {NORM: w[NORM].half(), f"{UP}.weight": w[f"{UP}.weight"].half(), "lm_head.weight": w["lm_head.weight"].half(),
               **int4_module(DOWN, w[f"{DOWN}.weight"])[0]}
    config = qc()
    config["ignore"].append(UP)
    folder = int4_export(tmp_path, tensors, config_with(quantization_config=config))
    result = check_bytes(context(folder, ref))
    assert result.passed and result.metrics["linear_weights"] == 2 and result.metrics["quantized_linears"] == 1
    assert result.metrics["quantized_linear_share"] == 0.5
    assert result.detail.startswith("stored == predicted; 1/2 Linears quantized (50.0% of their bytes), quantized ")


def test_float32_scales_where_the_model_dtype_is_fp16_store_more_than_predicted(tmp_path, ref):
    tensors = int4_tensors()
    tensors[f"{DOWN}.weight_scale"] = tensors[f"{DOWN}.weight_scale"].float()
    result = check_bytes(context(int4_export(tmp_path, tensors, manifest=False), ref))
    assert not result.passed
    assert result.detail == f"{DOWN}: stores {INT4_MODULE_BYTES + 256} bytes, its config predicts {INT4_MODULE_BYTES}"
    # a failed bytes check still reports what it measured
    assert result.metrics["quantized_bytes"] == 2 * INT4_MODULE_BYTES + 256
    assert result.metrics["quantized_linears"] == 2


def test_float32_scales_in_a_float32_model_are_predicted(tmp_path, ref):
    tensors = int4_tensors()
    for m in (DOWN, UP):
        tensors[f"{m}.weight_scale"] = tensors[f"{m}.weight_scale"].float()
    folder = int4_export(tmp_path, tensors, config_with(dtype="float32", quantization_config=qc()), manifest=False)
    result = check_bytes(context(folder, ref))
    assert result.passed and result.metrics["quantized_bytes"] == 2 * (INT4_MODULE_BYTES + 256)


def test_fp16_scales_in_a_float32_model_store_less_than_predicted_and_pass(tmp_path, ref):
    folder = int4_export(tmp_path, config=config_with(dtype="float32", quantization_config=qc()), manifest=False)
    result = check_bytes(context(folder, ref))
    assert result.passed and result.metrics["predicted_quantized_ratio"] == 8192 / (2 * (INT4_MODULE_BYTES + 256))


@pytest.mark.parametrize("fmt,packed,module_bytes", [
    ("naive-quantized", False, 2048 + 64),  # one byte a code, 32 fp16 scales
    ("pack-quantized", True, 2048 + 16 + 64),  # codes in int32 words, weight_shape, scales
], ids=["naive", "packed"])
def test_int8_per_channel_is_predicted_at_8_bits_plus_a_scale_a_row(tmp_path, ref, fmt, packed, module_bytes):
    folder = int4_export(tmp_path, int8_tensors(packed), config_with(quantization_config=qc(8, "channel", fmt=fmt)),
                         manifest=False)
    result = check_bytes(context(folder, ref))
    # down_proj has 32 rows, up_proj 64: 32 more scale bytes
    assert result.passed and result.metrics["quantized_bytes"] == 2 * module_bytes + 64


def test_per_tensor_scales_are_predicted_as_one(tmp_path, ref):
    config = config_with(quantization_config=qc(8, "tensor", fmt="naive-quantized"))
    tensors = int8_tensors()
    for m in (DOWN, UP):
        tensors[f"{m}.weight_scale"] = torch.ones(1, dtype=torch.float16)
    assert check_bytes(context(int4_export(tmp_path, tensors, config, manifest=False), ref)).passed
    tensors = int8_tensors()  # a scale per row is more than one per tensor
    result = check_bytes(context(int4_export(tmp_path / "b", tensors, config, manifest=False), ref))
    assert not result.passed and result.detail.startswith(f"{DOWN}: stores {2048 + 64} bytes, its config predicts "
                                                          f"{2048 + 2}")


def test_4_bit_codes_one_per_byte_store_more_than_packed(tmp_path, ref):
    from qexport.quant import primitives as quant
    w = reference_weights()
    scales = quant.compute_scales(w[f"{DOWN}.weight"].float(), 4, 16, torch.float16)
    tensors = int4_tensors()
    for leaf in ("weight_packed", "weight_shape"):
        tensors.pop(f"{DOWN}.{leaf}")
    tensors[f"{DOWN}.weight"] = quant.quantize(w[f"{DOWN}.weight"].float(), scales, 4, 16)
    result = check_bytes(context(int4_export(tmp_path, tensors, config_with(quantization_config=qc(
        fmt="naive-quantized")), manifest=False), ref))
    # 2048 codes + 256 scale bytes, predicted packed: 1024 + 256
    assert not result.passed and result.detail == f"{DOWN}: stores 2304 bytes, its config predicts 1280"


def test_zero_points_and_g_idx_are_predicted_as_stored(tmp_path, ref):
    tensors = int4_tensors()
    tensors[f"{DOWN}.weight_zero_point"] = torch.zeros(4, 4, dtype=torch.int32)
    tensors[f"{DOWN}.weight_g_idx"] = torch.zeros(64, dtype=torch.int32)
    result = check_bytes(context(int4_export(tmp_path, tensors, manifest=False), ref))
    assert result.passed and result.metrics["quantized_bytes"] == 2 * INT4_MODULE_BYTES + 64 + 256


def test_a_quantized_module_the_reference_lacks_is_left_to_layout(tmp_path, ref):
    tensors = int4_tensors() | int4_module("model.layers.0.mlp.gate_proj", torch.randn(64, 32))[0]
    result = check_bytes(context(int4_export(tmp_path, tensors, manifest=False), ref))
    assert result.passed and result.metrics["quantized_bytes"] == 2 * INT4_MODULE_BYTES


def test_a_file_of_other_size_than_the_manifest_predicts_fails(tmp_path, ref):
    folder = int4_export(tmp_path, manifest=False)
    manifest = manifest_of(folder)
    size = manifest["files"][0]["bytes"]
    manifest["files"][0]["predicted_bytes"] = size - 8
    result = check_bytes(context(write_manifest(folder, manifest), ref))
    assert not result.passed and result.detail == f"model.safetensors is {size} bytes, predicted {size - 8}"


def test_a_tensor_of_other_size_than_the_manifest_predicts_fails(tmp_path, ref):
    folder = int4_export(tmp_path, manifest=False)
    manifest = manifest_of(folder)
    manifest["tensors"][NORM]["predicted_bytes"] = 128
    manifest["tensors"]["model.gone"] = {"predicted_bytes": 4}  # not stored: tensor_names and manifest report it
    result = check_bytes(context(write_manifest(folder, manifest), ref))
    assert not result.passed and result.detail == f"tensor '{NORM}' stores 64 bytes, predicted 128"
    assert result.metrics["problems"] == [result.detail]


def test_a_manifest_without_predictions_predicts_nothing_per_file(tmp_path, ref):
    folder = int4_export(tmp_path, manifest=False)
    write_manifest(folder, {"files": manifest_of(folder, predicted=False)["files"]})
    assert check_bytes(context(folder, ref)).passed


def test_the_opt_in_ratio_floor_fails_a_scheme_that_compresses_less(tmp_path, ref):
    from qexport.report.values import format_ratio, format_value

    folder = int4_export(tmp_path)
    ratio = 8192 / 2592
    result = check_bytes(context(folder, ref, {"min_quantized_ratio": 3.2}))
    assert not result.passed
    assert result.detail == (f"quantized tensors compress {format_ratio(ratio)} vs fp16, need >= {format_ratio(3.2)} "
                             f"({format_value(5.0625)} bits per weight)")
    assert check_bytes(context(folder, ref, {"min_quantized_ratio": ratio})).passed  # at the floor passes


@pytest.mark.parametrize("tensors,ellipsis", [(4, ""), (5, "; ...")])
def test_four_byte_problems_are_named_and_more_cut_with_an_ellipsis(tmp_path, ref, tensors, ellipsis):
    folder = int4_export(tmp_path, manifest=False)
    manifest = manifest_of(folder)
    for name in sorted(manifest["tensors"])[:tensors]:
        manifest["tensors"][name]["predicted_bytes"] += 1
    result = check_bytes(context(write_manifest(folder, manifest), ref))
    problems = result.metrics["problems"]
    assert not result.passed and len(problems) == tensors
    assert result.detail == "; ".join(problems[:4]) + ellipsis


# ---------------------------------------------------------------------------------------------------------------
# found by mutation testing (bench/MUTATION.md)


def test_a_sharded_export_passes_shards_naming_its_files(tmp_path, ref):
    from safetensors.torch import save_file

    tensors = int4_tensors()
    folder = int4_export(tmp_path, {NORM: tensors.pop(NORM)}, manifest=False)
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    save_file(tensors, str(folder / "model-00002-of-00002.safetensors"))
    weight_map = {n: "model-00002-of-00002.safetensors" for n in tensors} | {NORM: "model-00001-of-00002.safetensors"}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    result = check_shards(context(folder, ref))
    assert result.passed and result.detail == "2 file(s), 7 stored tensors; index and shards agree both ways"
    assert result.metrics == {"files": ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]}


def test_a_manifest_listing_no_files_fails_naming_the_shard(tmp_path, ref):
    result = check_manifest(context(edited_manifest(tmp_path, lambda m: m.pop("files")), ref))
    assert not result.passed and result.detail == "model.safetensors is not in the manifest"


def test_a_listed_file_linking_elsewhere_in_the_export_is_hashed_through_the_link(tmp_path, ref):
    # links to files inside the model folder are followed (safe_fs.walk_files), from a subfolder too
    folder = int4_export(tmp_path, manifest=False)
    (folder / "pooling.json").write_text('{"pooling_mode_mean_tokens": true}')
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").symlink_to("../pooling.json")
    manifest = manifest_of(folder)
    data = (folder / "pooling.json").read_bytes()
    manifest["files"].append({"name": "1_Pooling/config.json", "bytes": len(data),
                              "sha256": hashlib.sha256(data).hexdigest()})
    result = check_manifest(context(write_manifest(folder, manifest), ref))
    assert result.passed and result.detail == "2 files match their recorded size and sha256"


def predicted_bytes(result) -> int:
    """The bytes check_bytes predicted for the quantized modules, from the ratio it reports (2 x weights / bytes)."""
    m = result.metrics
    return round(2 * m["quantized_weights"] / m["predicted_quantized_ratio"])


def odd_export(tmp_path, w: torch.Tensor, config: dict, packed: bool):
    """A reference holding one Linear weight `w` and its int8 per-channel export (naive or packed)."""
    ref = write_folder(tmp_path / "ref", {f"{DOWN}.weight": w.bfloat16(), NORM: torch.ones(32).bfloat16()})
    folder = int4_export(tmp_path, {NORM: torch.ones(32).half(), **int8_naive(DOWN, w, packed)},
                         config_with(quantization_config=config), manifest=False)
    return check_bytes(context(folder, ref))


@pytest.mark.parametrize("fmt,packed,codes", [
    ("naive-quantized", False, 32 * 30),  # one byte a code: 30 inputs are 30 bytes a row
    ("pack-quantized", True, 32 * 8 * 4 + 16),  # 30 codes in 8 int32 words a row, then weight_shape
], ids=["naive", "packed"])
def test_int8_codes_of_an_input_not_divisible_by_4_are_predicted_exactly(tmp_path, fmt, packed, codes):
    result = odd_export(tmp_path, torch.randn(32, 30), qc(8, "channel", fmt=fmt), packed)
    assert result.passed and predicted_bytes(result) == codes + 32 * 2  # one fp16 scale a row


def test_int8_without_num_bits_is_predicted_at_8_bits(tmp_path):
    config = qc(8, "channel")
    del config["config_groups"]["group_0"]["weights"]["num_bits"]
    result = odd_export(tmp_path, torch.randn(32, 64), config, packed=True)
    assert result.passed and predicted_bytes(result) == 32 * 16 * 4 + 16 + 32 * 2


def test_per_channel_scales_are_predicted_one_a_row_whatever_group_size_says(tmp_path):
    config = qc(8, "channel")
    config["config_groups"]["group_0"]["weights"]["group_size"] = 16
    result = odd_export(tmp_path, torch.randn(32, 64), config, packed=False)
    assert result.passed and predicted_bytes(result) == 32 * 64 + 32 * 2


def test_int4_codes_of_a_wide_input_are_predicted_exactly(tmp_path):
    # 512 inputs x 4 bits = 64 int32 words a row (a word fewer would be 33 codes a word)
    w = torch.randn(32, 512)
    ref = write_folder(tmp_path / "ref", {f"{DOWN}.weight": w.bfloat16(), NORM: torch.ones(32).bfloat16()})
    folder = int4_export(tmp_path, {NORM: torch.ones(32).half(), **int4_module(DOWN, w, 128)[0]},
                         config_with(quantization_config=qc(group_size=128)), manifest=False)
    result = check_bytes(context(folder, ref))
    assert result.passed and predicted_bytes(result) == 32 * 64 * 4 + 16 + 32 * 4 * 2
    assert layout(folder, ref).passed  # weight_packed [32, 64]


def test_the_int4_export_is_predicted_exactly(tmp_path, ref):
    result = check_bytes(context(int4_export(tmp_path, manifest=False), ref))
    assert predicted_bytes(result) == 2 * INT4_MODULE_BYTES


def test_a_config_that_does_not_say_symmetric_means_symmetric(tmp_path, ref):
    config = qc()
    del config["config_groups"]["group_0"]["weights"]["symmetric"]
    assert bad_layout(tmp_path, ref, lambda t: None, config_with(quantization_config=config)).passed


def test_a_model_without_linear_weights_has_no_quantized_share(tmp_path):
    norm = "model.layers.0.input_layernorm.weight"
    ref = write_folder(tmp_path / "ref", {norm: torch.ones(32).bfloat16()})
    folder = write_folder(tmp_path / "fp16", {norm: torch.ones(32).half()})
    result = check_bytes(context(folder, ref))
    assert result.passed and result.metrics["linear_weights"] == 0
    assert result.metrics["quantized_linear_share"] is None


def test_asymmetric_zero_points_of_many_rows_are_packed_into_whole_words(tmp_path):
    # 264 rows x 4 bits = 33 int32 words of zero points per group column
    w = torch.randn(264, 32)
    ref = write_folder(tmp_path / "ref", {f"{UP}.weight": w.bfloat16(), NORM: torch.ones(32).bfloat16()})
    tensors = {NORM: torch.ones(32).half(), **int4_module(UP, w)[0],
               f"{UP}.weight_zero_point": torch.zeros(33, 2, dtype=torch.int32)}
    assert layout(int4_export(tmp_path, tensors, asym_config(), manifest=False), ref).passed


def test_an_embedding_stored_quantized_is_not_targeted_by_linear(tmp_path):
    # targets ["Linear"] match nn.Linear modules only: a quantized embedding is a module no group targets
    w = reference_weights() | {"model.embed_tokens.weight": torch.randn(64, 32).bfloat16()}
    ref = write_folder(tmp_path / "ref", w)
    tensors = int4_tensors() | int4_module("model.embed_tokens", w["model.embed_tokens.weight"])[0]
    result = layout(int4_export(tmp_path, tensors, manifest=False), ref)
    assert result.metrics["problems"] == [("model.embed_tokens: stored quantized but no config group targets it (or "
                                           "it is ignored)")]


def test_an_output_head_inside_a_submodule_is_not_body(tmp_path):
    # a vision-language model's head sits at language_model.lm_head: it stays dense by convention, like lm_head
    import dataclasses

    head = "language_model.lm_head.weight"
    ref = write_folder(tmp_path / "ref", reference_weights() | {head: torch.randn(64, 32).bfloat16()})
    folder = int4_export(tmp_path, int4_tensors() | {head: torch.randn(64, 32).half()}, manifest=False)
    ctx = context(folder, ref)
    ctx.arch = dataclasses.replace(ctx.arch, linear_weights=ctx.arch.linear_weights | {head})
    result = check_bytes(ctx)
    assert result.passed and result.metrics["linear_weights"] == 2 and result.metrics["quantized_linear_share"] == 1.0
