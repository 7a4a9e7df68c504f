"""Which tensors are nn.Linear weights, decided from the model's structure on the `meta` device (no memory)."""

from __future__ import annotations

import logging
import re
import warnings
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

from qexport.errors import InputError
from qexport.io.forked import can_fork, die_with, no_gc


@dataclass(frozen=True)
class Architecture:
    model_class: str
    shapes: dict[str, tuple[int, ...]]  # every parameter and persistent buffer of the meta model
    linear_weights: frozenset[str]  # names of nn.Linear weights (module name + ".weight")
    tied_names: frozenset[str]  # parameters that share storage with another (stored once)
    is_causal_lm: bool
    # regexes of checkpoint tensors the class drops when loading (transformers' _keys_to_ignore_on_load_unexpected)
    ignored_unexpected: tuple[str, ...] = ()


def build_config(config: dict, config_path: Path | str = "config.json"):
    """A transformers config from a config.json dict; unknown model types are an InputError naming them."""
    from transformers import CONFIG_MAPPING, AutoConfig

    if config["model_type"] not in CONFIG_MAPPING:
        raise InputError(f"{config_path}: model_type {config['model_type']!r} is not known to this transformers")
    kwargs = {k: v for k, v in config.items() if k not in ("model_type", "quantization_config")}
    try:
        return AutoConfig.for_model(config["model_type"], **kwargs)
    except Exception as e:  # transformers validates fields with its own error types (e.g. a bool given as 0)
        message = " ".join(str(e).split())
        raise InputError(f"{config_path}: transformers rejects this {config['model_type']} config "
                         f"({type(e).__name__}: {message})")


def model_class(hf_config):
    """The class named by `architectures`, else AutoModelForCausalLM if it knows the config, else AutoModel."""
    import transformers

    for name in getattr(hf_config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    from transformers import AutoModel, AutoModelForCausalLM

    for auto in (AutoModelForCausalLM, AutoModel):
        if type(hf_config) in auto._model_mapping:
            return auto._model_mapping[type(hf_config)]
    raise InputError(f"config.json: no model class for model_type {hf_config.model_type!r}")


def meta_model(hf_config):
    """The architecture instantiated on the meta device: shapes only, no memory."""
    import torch

    cls = model_class(hf_config)
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("transformers").setLevel(logging.ERROR)
        try:
            return cls._from_config(hf_config)
        except Exception as e:
            raise InputError(f"config.json: cannot build {cls.__name__} from it ({type(e).__name__}: {e})")


def inspect_architecture(config: dict, config_path: Path | str = "config.json") -> Architecture:
    import torch

    hf_config = build_config(config, config_path)
    model = meta_model(hf_config)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    linear = frozenset(
        f"{name}.weight" for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)
    )
    seen: dict[int, str] = {}
    tied = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            tied.add(name)
        else:
            seen[id(param)] = name
    is_causal = type(model).__name__.endswith("ForCausalLM")
    ignored = tuple(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())
    # non-persistent buffers (position_ids, inv_freq) that older checkpoints still store: transformers drops them
    ignored += tuple(f"^{re.escape(name)}$" for name, _ in model.named_buffers() if name not in shapes)
    return Architecture(type(model).__name__, shapes, linear, frozenset(tied), is_causal, ignored)


# ---------------------------------------------------------------------------------------------------------------
# Discovery off the critical path. Importing transformers' modeling code costs 2-3 s in a fresh process (torch
# distributed, dynamo, sympy ...), longer than reading and encoding a 1B model. In such a process the meta model is
# built in a child process that runs on the other core while the export reads, hashes and encodes from a
# prediction (`predict_architecture`); the export compares its plan against the real architecture's before
# anything is renamed into place. Where the modeling code is already imported (a test session, a notebook), the
# meta model costs milliseconds and is built in-process.

# These modules loaded means the expensive part of building a meta model is paid already.
_HEAVY_MODULES = ("transformers.modeling_utils",)
_prefetched: dict[str, Future] = {}


def _to_json(arch: Architecture) -> dict:
    return {"model_class": arch.model_class, "shapes": {n: list(s) for n, s in arch.shapes.items()},
            "linear_weights": sorted(arch.linear_weights), "tied_names": sorted(arch.tied_names),
            "is_causal_lm": arch.is_causal_lm, "ignored_unexpected": list(arch.ignored_unexpected)}


def _from_json(data: dict) -> Architecture:
    return Architecture(data["model_class"], {n: tuple(s) for n, s in data["shapes"].items()},
                        frozenset(data["linear_weights"]), frozenset(data["tied_names"]), data["is_causal_lm"],
                        tuple(data["ignored_unexpected"]))


def _config_key(config: dict, config_path) -> str:
    import json

    return json.dumps([config, str(config_path)], sort_keys=True)


# Below this much tensor data the export is over before a child could import torch a second time: building the meta
# model in-process costs less CPU and no more time. $QEXPORT_DISCOVERY_CHILD_MIN_BYTES overrides it (tests: 0).
CHILD_MIN_BYTES = 64 * 2**20


def discover(config: dict, config_path: Path | str = "config.json", source_bytes: int | None = None,
             fork: bool = False) -> Future:
    """A future of `inspect_architecture(config)`: done already when the modeling code is imported in this
    process or the checkpoint is small (`source_bytes`), else computed by a child process (started by `prefetch`
    or now). `fork`: the caller imported torch itself and has run nothing on it since (see `_in_fork`). InputError
    passes through."""
    import os
    import sys

    future = _prefetched.pop(_config_key(config, config_path), None)
    if future is not None:
        return future
    threshold = int(os.environ.get("QEXPORT_DISCOVERY_CHILD_MIN_BYTES", CHILD_MIN_BYTES))
    if any(m in sys.modules for m in _HEAVY_MODULES) or (source_bytes is not None and source_bytes < threshold):
        future = Future()
        try:
            future.set_result(inspect_architecture(config, config_path))
        except BaseException as e:
            future.set_exception(e)
        return future
    return _in_fork(config, config_path) if fork and can_fork() else _in_child(config, config_path)


def prefetch(config: dict, config_path: Path | str = "config.json", source_bytes: int | None = None,
             fork: bool = False) -> None:
    """Start `discover` now (a command line calls it as early as it can) for a later `discover` to pick up;
    nothing where it would run in-process anyway."""
    import os

    threshold = int(os.environ.get("QEXPORT_DISCOVERY_CHILD_MIN_BYTES", CHILD_MIN_BYTES))
    if source_bytes is not None and source_bytes < threshold:
        return
    if not _prefetched:
        import atexit

        atexit.register(lambda: [cancel(f) for f in _prefetched.values()])  # one an early error left unused
    _prefetched[_config_key(config, config_path)] = discover(config, config_path, source_bytes, fork)


def _in_child(config: dict, config_path) -> Future:
    import json
    import os
    import subprocess
    import sys
    import threading

    package_root = str(Path(__file__).resolve().parent.parent)  # this qexport, wherever it is imported from
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen([sys.executable, "-c", "from qexport.model.architecture import _child_main; _child_main()"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    future: Future = Future()

    def wait():
        try:
            request = {"config": config, "config_path": str(config_path), "parent": os.getpid()}
            out, err = proc.communicate(json.dumps(request).encode())
            if proc.returncode != 0:
                raise RuntimeError(f"architecture discovery failed (exit {proc.returncode}): "
                                   f"{err.decode(errors='replace').strip()[-2000:]}")
            answer = json.loads(out)
            if "error" in answer:
                future.set_exception(InputError(answer["error"]))
            else:
                future.set_result(_from_json(answer))
        except BaseException as e:
            if not future.done():
                future.set_exception(e)

    threading.Thread(target=wait, daemon=True, name="qexport-discovery").start()
    future.process = proc  # so that an export stopping early can end it
    return future


def cancel(future) -> None:
    """End the child process behind a `discover` future, if it has one still running."""
    proc = getattr(future, "process", None)
    if proc is not None and proc.poll() is None:
        proc.kill()


def _child_main() -> None:
    import json
    import sys

    request = json.loads(sys.stdin.buffer.read())
    die_with(request["parent"])
    try:
        with no_gc():
            answer = _to_json(inspect_architecture(request["config"], request["config_path"]))
    except InputError as e:
        answer = {"error": str(e.args[0] if e.args else e)}
    sys.stdout.write(json.dumps(answer))
    sys.stdout.flush()


def _in_fork(config: dict, config_path) -> Future:
    """`inspect_architecture` in a child forked from this process (see qexport.io.forked: only where that is safe).
    It starts with torch already imported here: its python start and torch import, about 1.2 s CPU of the ~4.5 s
    a spawned child costs, are saved."""
    import threading

    from qexport.io.forked import ForkedCall

    call = ForkedCall(lambda: _to_json(inspect_architecture(config, config_path)), "architecture discovery")
    future: Future = Future()

    def wait():
        try:
            future.set_result(_from_json(call.result()))
        except BaseException as e:
            future.set_exception(e)

    threading.Thread(target=wait, daemon=True, name="qexport-discovery").start()
    future.process = call  # so that an export stopping early can end it
    return future


EMBEDDING_PARTS = ("embed", "wte", "wpe", "shared")


def predict_architecture(config: dict, entries: dict) -> Architecture:
    """What the meta model most likely is, from the checkpoint's own names and shapes: every tensor as stored, and
    every 2-D `*.weight` whose module is not an embedding an nn.Linear. Only a guess to start work on: an export
    confirms its plan against `inspect_architecture` before renaming anything into place."""
    linear = frozenset(
        name for name, e in entries.items()
        if name.endswith(".weight") and len(e.shape) == 2
        and not any(part in name.removesuffix(".weight").rsplit(".", 1)[-1] for part in EMBEDDING_PARTS))
    architectures = config.get("architectures") or [str(config.get("model_type"))]
    return Architecture(architectures[0], {n: tuple(e.shape) for n, e in entries.items()}, linear, frozenset(),
                        architectures[0].endswith("ForCausalLM"))
