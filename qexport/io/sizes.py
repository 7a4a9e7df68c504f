"""Byte sizes written the way transformers' `max_shard_size` is: `5GB`, `500MB`, `400KB`, `2GiB` or bytes."""

from qexport.errors import InputError

_UNITS = {"GIB": 2**30, "MIB": 2**20, "KIB": 2**10, "GB": 10**9, "MB": 10**6, "KB": 10**3, "B": 1}


def parse_size(text: str | int, option: str = "--max-shard-size") -> int:
    """Return the size in bytes; raise InputError naming `option` when the text is not a size."""
    if isinstance(text, int):
        value = text
    else:
        stripped = text.strip()
        for unit, factor in _UNITS.items():
            if stripped.upper().endswith(unit):
                number = stripped[: -len(unit)].strip()
                break
        else:
            number, factor = stripped, 1
        try:
            value = int(float(number) * factor) if "." in number else int(number) * factor
        except (ValueError, OverflowError):  # OverflowError: 1e400GB is infinite
            raise InputError(f"{option}: {text!r} is not a size (write e.g. 5GB, 500MB, 400KB or a byte count)")
    if value <= 0:
        raise InputError(f"{option}: {text!r} must be a positive size")
    return value


# ---------------------------------------------------------------------------------------------------------------
# Ratios vs fp16: the one definition behind the export table, the manifest, the model card, `inspect`, `verify`,
# the pytest gate and every report. Headers and side files are left out: they are the same few KB in any format.

FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})


def fp16_bytes(dtype: str, shape, stored_bytes: int) -> int:
    """What a dense tensor would take in a float16 copy of the model: 2 bytes per element if it holds floating
    point values, its stored bytes otherwise (integer buffers stay what they are)."""
    import math

    return 2 * math.prod(shape) if dtype in FLOAT_DTYPES else stored_bytes


def size_summary(dense: list[tuple[str, list[int], int]], quantized_weights: int, quantized_bytes: int) -> dict:
    """Bytes and ratios vs fp16 of a model's tensors.

    `dense`: (dtype, shape, stored bytes) of every tensor that is not part of a quantized module;
    `quantized_weights`: the number of weights of the quantized modules (out x in of each);
    `quantized_bytes`: every byte those modules store (codes, scales, zero points, shapes).
    ratio_vs_fp16 = bytes of all tensors in float16 / bytes of all tensors as stored ("ratio (whole model)");
    quantized_ratio_vs_fp16 = 2 * quantized weights / quantized bytes ("ratio (quantized)").
    """
    dense_bytes = sum(b for _, _, b in dense)
    tensor_bytes = dense_bytes + quantized_bytes
    fp16_tensor_bytes = sum(fp16_bytes(d, s, b) for d, s, b in dense) + 2 * quantized_weights
    return {
        "tensor_bytes": tensor_bytes,
        "fp16_tensor_bytes": fp16_tensor_bytes,
        "ratio_vs_fp16": fp16_tensor_bytes / tensor_bytes if tensor_bytes else None,
        "quantized_weights": quantized_weights,
        "quantized_bytes": quantized_bytes,
        "quantized_ratio_vs_fp16": 2 * quantized_weights / quantized_bytes if quantized_bytes else None,
        "bits_per_quantized_weight": 8 * quantized_bytes / quantized_weights if quantized_weights else None,
    }
