"""Which tensors are nn.Linear weights, decided from the model's structure on the `meta` device (no memory)."""

from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError


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
