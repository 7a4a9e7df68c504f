"""A model run with at most one decoder block's parameters in memory: the architecture on the `meta` device, each
module's parameters read from a lazy source just before its forward and dropped after it.

`streamed_model(config, source, dtype)` builds the architecture from config.json on `meta` (buffers such as rotary
frequencies are built for real: they are computed, not stored) and attaches accelerate's `AlignDevicesHook`
(`attach_align_device_hook(offload=True, weights_map=...)`) to every module: a decoder block (a class in the
model's `_no_split_modules`) loads all its parameters when its forward starts (a block may read a child's weight
without calling the child) and drops them when it ends; any other module with parameters (embeddings, final norm,
lm_head) does the same with its own. Run a forward pass with all input windows in one batch and each weight is
read once per run (tied embedding / lm_head: once per module that uses it).

The source is a `WeightSource`: the names it can give and `read(name)` -> tensor (any dtype; the hook casts it to
the parameter's dtype, as `load_state_dict` does). A name of the model that the source lacks resolves to a tied
alias the source has (lm_head.weight -> model.embed_tokens.weight); `transform(model_name, tensor)` then runs on
the tensor (e.g. round-to-nearest of one Linear's weight). Persistent buffers the source holds are copied in once.

`NotStreamable` (with the reason) where the architecture does not allow it: a module registered under two names,
a parameter neither the source nor a tied alias gives, a stored name the model does not have (transformers renames
or fuses those while loading), a shape that differs. A module that reads another module's parameter outside the
blocks raises when run (the parameter is on `meta`); callers fall back to a whole-model load then.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable, Collection

import torch

from qexport.model.architecture import build_config, model_class


class NotStreamable(Exception):
    """The architecture cannot run streamed from this source; the message says why."""


@dataclass(frozen=True)
class WeightSource:
    """Tensors by name, read on demand (a positioned read of a shard, a module decompressed, ...)."""

    names: Collection[str]
    read: Callable[[str], torch.Tensor]


class LazyWeights(Mapping):
    """The model's parameter names -> tensors, each read from the source when looked up (never cached)."""

    def __init__(self, source: WeightSource, stored_name: dict[str, str],
                 transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None):
        self.source, self.stored_name, self.transform = source, stored_name, transform
        self.reads = 0  # how many tensors were read: a test of "each weight once per run"

    def __getitem__(self, name: str) -> torch.Tensor:
        stored = self.stored_name[name]  # KeyError for a name the model does not have (accelerate probes some)
        tensor = self.source.read(stored)
        self.reads += 1
        return tensor if self.transform is None else self.transform(name, tensor)

    def __contains__(self, name) -> bool:
        return name in self.stored_name

    def __iter__(self):
        return iter(self.stored_name)

    def __len__(self) -> int:
        return len(self.stored_name)


def streamed_model(config: dict, source: WeightSource, dtype: torch.dtype = torch.float32,
                   transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
                   device: str | torch.device = "cpu"):
    """The architecture of `config` (a config.json dict) on `meta`, its parameters streamed from `source` one
    module (or decoder block) at a time during each forward pass, in `dtype`, computed on `device`. The returned
    model's `weights_map` (a LazyWeights) counts the reads. Raises NotStreamable (see the module docstring)."""
    from accelerate import init_empty_weights
    from accelerate.hooks import attach_align_device_hook
    from transformers.initialization import no_init_weights

    hf_config = build_config({k: v for k, v in config.items() if k != "quantization_config"})
    cls = model_class(hf_config)
    with init_empty_weights(include_buffers=False), no_init_weights():
        model = cls._from_config(hf_config, dtype=dtype)
    model.tie_weights()  # tied parameters share one object: lm_head.weight resolves to the embedding's name
    model.eval()
    _refuse_shared_modules(model)
    stored_name = _parameter_sources(model, source)
    _load_buffers(model, source)
    weights = LazyWeights(source, stored_name, transform)
    attach_align_device_hook(model, execution_device=torch.device(device), offload=True, weights_map=weights,
                             offload_buffers=False, preload_module_classes=block_classes(model))
    model.weights_map = weights
    return model


def block_classes(model) -> list[str]:
    """The decoder block classes (loaded whole at their forward): transformers' `_no_split_modules`."""
    return [name for name in (getattr(model, "_no_split_modules", None) or []) if isinstance(name, str)]


def _refuse_shared_modules(model) -> None:
    seen: dict[int, str] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        first = seen.setdefault(id(module), name)
        if first != name and any(True for _ in module.parameters(recurse=False)):
            raise NotStreamable(f"module {name} is also registered as {first} (shared modules)")


def _parameter_sources(model, source: WeightSource) -> dict[str, str]:
    """Each parameter name of the model -> the stored name to read it from (itself, or a tied alias)."""
    names = set(source.names)
    groups: dict[int, list[str]] = {}
    shapes: dict[str, torch.Size] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
        shapes[name] = param.shape
    stored_name: dict[str, str] = {}
    for group in groups.values():
        stored = next((n for n in group if n in names), None)
        if stored is None:
            raise NotStreamable(f"parameter {group[0]} is not in the checkpoint")
        stored_name.update((n, stored) for n in group)
    buffers = {name for name, _ in model.named_buffers()}
    unknown = sorted(names - set(stored_name) - buffers)
    if unknown:
        raise NotStreamable(f"checkpoint tensor {unknown[0]} is not a parameter of {type(model).__name__}")
    return stored_name


@torch.no_grad()
def _load_buffers(model, source: WeightSource) -> None:
    names = set(source.names)
    for name, buffer in model.named_buffers():
        if name in names:
            value = source.read(name)
            if value.shape != buffer.shape:
                raise NotStreamable(f"buffer {name}: stored shape {list(value.shape)}, model {list(buffer.shape)}")
            buffer.copy_(value)
