"""Byte sizes written the way transformers' `max_shard_size` is: `5GB`, `500MB`, `400KB`, `2GiB` or bytes."""

from .errors import InputError

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
