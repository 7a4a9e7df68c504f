"""Builders for the unit tests of verify's file checks (tests/test_unit_verify_*.py): a reference and an export
written by hand in tmp_path (a config dict, a few tensors, side files, a manifest), and the real verify Context on
them. No model is built, exported or loaded: the architecture comes from the config on the meta device
(milliseconds once transformers is imported), and the reference holds only the tensors a test names."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from qexport.verify.context import Context
from tests import support

# A one-layer qwen3 small enough to write by hand: Linears [64, 32] (q_proj, gate_proj, up_proj), [16, 32]
# (k_proj, v_proj), [32, 32] (o_proj), [32, 64] (down_proj); lm_head [64, 32].
CONFIG = {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 16, "vocab_size": 64,
              "max_position_embeddings": 64, "tie_word_embeddings": False, "rms_norm_eps": 1e-6, "dtype": "float16"}
DOWN = "model.layers.0.mlp.down_proj"
UP = "model.layers.0.mlp.up_proj"
NORM = "model.norm.weight"


def qc(num_bits=4, strategy="group", group_size=16, fmt="pack-quantized", **weights) -> dict:
    """A compressed-tensors quantization_config as docs/design.md gives it (group_size small enough for the tiny
    Linears)."""
    w = {"num_bits": num_bits, "type": "int", "strategy": strategy, "symmetric": True, "dynamic": False, **weights}
    if strategy == "group":
        w["group_size"] = group_size
    return {"quant_method": "compressed-tensors", "format": fmt, "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "format": fmt, "weights": w}},
            "ignore": ["lm_head"]}


def write_folder(folder: Path, tensors: dict[str, torch.Tensor] | None = None, config: dict | None = None,
                 files: dict[str, str | bytes] | None = None) -> Path:
    """support.write_folder with this module's one-layer qwen3 CONFIG by default (config=False: no config.json)."""
    return support.write_folder(folder, tensors, CONFIG if config is None else (None if config is False else config), files)


def config_with(**changes) -> dict:
    """CONFIG with keys changed (a value of ... removes the key)."""
    config = copy.deepcopy(CONFIG)
    for key, value in changes.items():
        if value is ...:
            config.pop(key, None)
        else:
            config[key] = value
    return config


def reference_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    """Two Linear weights and a norm in bf16, the dtype of a typical source."""
    g = torch.Generator().manual_seed(seed)
    return {f"{DOWN}.weight": (torch.randn(32, 64, generator=g) * 0.05).bfloat16(),
            f"{UP}.weight": (torch.randn(64, 32, generator=g) * 0.05).bfloat16(),
            NORM: (1 + 0.1 * torch.randn(32, generator=g)).bfloat16()}


_ARCHITECTURES: dict = {}


def context(export: Path, reference: Path, thresholds: dict | None = None) -> Context:
    """verify's Context on the two folders. The reference's architecture (a meta-device model built from its
    config, 80 ms) is built once per config text: qexport.model.architecture is not what these tests check."""
    from qexport.model import architecture
    real = architecture.inspect_architecture
    key = (Path(reference) / "config.json").read_text()

    def cached(config, config_path="config.json"):
        if key not in _ARCHITECTURES:
            _ARCHITECTURES[key] = real(config, config_path)
        return _ARCHITECTURES[key]

    architecture.inspect_architecture = cached
    try:
        return Context(export, reference, thresholds)
    finally:
        architecture.inspect_architecture = real


def int4_module(module: str, w: torch.Tensor, group_size: int = 16) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(what an int4 pack-quantized export stores for `module`, the float32 weight it dequantizes to), from qexport's
    quantization primitives (scale = absmax / 7.5 in fp16, codes packed 8 per int32); the dequantized weight is
    computed here as codes x scales in float32 (exact: a 4-bit code times an fp16 scale fits float32)."""
    from qexport.quant import primitives as quant
    scales = quant.compute_scales(w.float(), 4, group_size, torch.float16)
    q = quant.quantize(w.float(), scales, 4, group_size)
    w_hat = (q.float().reshape(q.shape[0], -1, group_size) * scales.float().unsqueeze(-1)).reshape(q.shape)
    return {f"{module}.weight_packed": quant.pack_int4(q), f"{module}.weight_scale": scales,
            f"{module}.weight_shape": torch.tensor(list(w.shape))}, w_hat


def sqnr(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """20 log10(||w|| / ||w - w_hat||), docs/design.md's definition, in float64."""
    import math

    w, w_hat = w.double(), w_hat.double()
    return 20 * math.log10(w.norm().item() / (w - w_hat).norm().item())


def manifest_of(folder: Path, predicted: bool = True) -> dict:
    """A qexport.json as an honest exporter writes it for `folder` as it is now: each *.safetensors file with its
    size and sha256 (and predicted size = its size), each tensor with dtype, shape and bytes from the file header."""
    import hashlib
    import struct

    files, tensors = [], {}
    for path in sorted(folder.glob("*.safetensors")):
        data = path.read_bytes()
        record = {"name": path.name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        files.append(record | ({"predicted_bytes": len(data)} if predicted else {}))
        (n,) = struct.unpack("<Q", data[:8])
        for name, info in json.loads(data[8:8 + n]).items():
            if name != "__metadata__":
                start, end = info["data_offsets"]
                tensors[name] = {"dtype": info["dtype"], "shape": info["shape"]} | (
                    {"predicted_bytes": end - start} if predicted else {})
    return {"format": "int4", "files": files, "tensors": tensors}


def write_manifest(folder: Path, manifest: dict | None = None) -> Path:
    (folder / "qexport.json").write_text(json.dumps(manifest_of(folder) if manifest is None else manifest))
    return folder


def named(check, name: str):
    """`check` that also asserts its result carries `name` (the name verify's --only, reports and baselines use)."""

    def run(ctx):
        result = check(ctx)
        assert result.name == name, result.name
        return result

    return run


def reference_folder(tmp_path_factory) -> Path:
    """The reference folder every check compares with; each test module makes it its module-scoped `ref` fixture
    (`ref = pytest.fixture(scope="module", name="ref")(reference_folder)`). Tests never write to it."""
    return write_folder(tmp_path_factory.mktemp("ref") / "ref", reference_weights())
