"""An independent reference quantization of the scheme an export declares: round-to-nearest (RTN).

The export's `quantization_config` says which Linears are quantized and how (bits, symmetric or not, per
channel / group / tensor). `rtn_model` loads the REFERENCE (source) model and replaces each of those Linears'
weights, one at a time, by its round-to-nearest fake quantization computed with compressed-tensors' own
functions (`calculate_qparams` for the scale and zero point, `fake_quantize` for quantize-then-dequantize), in
float32. Its outputs say how close to the source that scheme gets with no cleverness at all: an export as close
as that is as good as its scheme allows (or better: GPTQ/AWQ-style tools beat RTN); an export much further away
is broken, whatever the model and whatever its absolute numbers.

Nothing here reads the export's tensors: the reference quantization shares no code path with the export.
"""

from __future__ import annotations

import torch

from qexport.quant.scheme import classes_of, weights_args


class UnsupportedScheme(ValueError):
    """The declared scheme has no round-to-nearest reference here (e.g. float or block quantization)."""


def quantization_args(weights: dict):
    """compressed-tensors QuantizationArgs from a config group's `weights` dict."""
    from compressed_tensors.quantization import QuantizationArgs
    from pydantic import ValidationError

    try:
        args = QuantizationArgs(**weights)
    except ValidationError as e:  # e.g. GPTQ's actorder "group", which compressed-tensors 0.20 removed
        reasons = "; ".join(": ".join([*map(str, err["loc"]), err["msg"].removeprefix("Value error, ")])
                            for err in e.errors())  # "field: why", or "why" for the model as a whole
        raise UnsupportedScheme(f"compressed-tensors refuses its weights args ({reasons})") from None
    if args.type != "int":
        raise UnsupportedScheme(f"type {args.type}")
    strategy = getattr(args.strategy, "value", args.strategy)
    # (group without a positive group_size is refused by compressed-tensors itself, above)
    if strategy not in ("channel", "group", "tensor"):
        raise UnsupportedScheme(f"strategy {strategy}")
    return args


@torch.no_grad()
def rtn_fake_quantize(weight: torch.Tensor, args) -> torch.Tensor:
    """quantize-then-dequantize `weight` [out, in] by round-to-nearest, in float32, with min/max scales.

    Per channel: one scale per output row (min/max over `in`); per group: one per `group_size` columns of a row;
    per tensor: one. The scale and zero point are compressed-tensors' `calculate_qparams` of those min/max
    (symmetric int: absmax / ((2^bits - 1) / 2), i.e. absmax / 7.5 for int4, absmax / 127.5 for int8).
    """
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    w = weight.float()
    strategy = getattr(args.strategy, "value", args.strategy)
    if strategy == "channel":
        lo, hi = w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
    elif strategy == "group":
        if w.shape[1] % args.group_size:
            raise UnsupportedScheme(f"in features {w.shape[1]} not divisible by group_size {args.group_size}")
        grouped = w.unflatten(-1, (w.shape[1] // args.group_size, args.group_size))
        lo, hi = grouped.amin(dim=-1), grouped.amax(dim=-1)
    else:
        lo, hi = w.amin().reshape(1), w.amax().reshape(1)
    scale, zero_point = calculate_qparams(lo, hi, args)
    return fake_quantize(w, scale, zero_point, args)


@torch.no_grad()
def apply_rtn(model: torch.nn.Module, quantization_config: dict) -> list[str]:
    """Fake-quantize, in place and one Linear at a time, every Linear the config targets; returns their names.

    Each gets a new Parameter, so a tied lm_head is untied from the input embedding (an export that quantizes
    lm_head stores it separately too).
    """
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        weights = weights_args(quantization_config, name, classes_of(module))
        if not weights:
            continue
        args = quantization_args(weights)
        dtype = module.weight.dtype
        module.weight = torch.nn.Parameter(rtn_fake_quantize(module.weight, args).to(dtype), requires_grad=False)
        names.append(name)
    if not names:
        raise UnsupportedScheme("the quantization_config targets no Linear of the reference architecture")
    return names


def rtn_transform(quantization_config: dict, arch, dtype=torch.float32):
    """`transform(name, tensor)` for a streamed reference (model.streamed): the weight of every Linear the config
    targets, cast to `dtype` and fake-quantized as `apply_rtn` does; other tensors unchanged. `arch` (the
    reference's Architecture) names the Linears and their shapes; every targeted one is checked here, before any
    model runs. Raises UnsupportedScheme as `apply_rtn` does."""
    targeted = {}
    for weight in sorted(arch.linear_weights):
        weights = weights_args(quantization_config, weight.removesuffix(".weight"))  # an nn.Linear: LINEAR
        if weights:
            args = quantization_args(weights)
            columns = arch.shapes[weight][1] if len(arch.shapes[weight]) == 2 else None
            strategy = getattr(args.strategy, "value", args.strategy)
            if strategy == "group" and columns is not None and columns % args.group_size:
                raise UnsupportedScheme(f"in features {columns} not divisible by group_size {args.group_size}")
            targeted[weight] = args
    if not targeted:
        raise UnsupportedScheme("the quantization_config targets no Linear of the reference architecture")

    def transform(name: str, tensor: torch.Tensor) -> torch.Tensor:
        args = targeted.get(name)
        if args is None:
            return tensor
        return rtn_fake_quantize(tensor.to(dtype), args).to(dtype)

    return transform


def rtn_model(reference_folder, quantization_config: dict, dtype=torch.float32):
    """The reference model with the declared scheme applied by round-to-nearest (see module docstring)."""
    from qexport.verify.functional import load_streamed

    model = load_streamed(reference_folder, dtype=dtype)  # tensor by tensor: one model in memory
    apply_rtn(model, quantization_config)
    return model
