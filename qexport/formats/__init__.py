"""Output formats by name. Importing this package registers fp16, int8, int4, int4-asym and original."""

from . import fp16, int4, int4_asym, int8, original  # noqa: F401  (registration)
from .base import REGISTRY, Format


def get_format(name: str, **options) -> Format:
    from ..errors import InputError

    if name not in REGISTRY:
        raise InputError(f"--formats: unknown format {name!r} (known: {', '.join(sorted(REGISTRY))})")
    return REGISTRY[name](**options)


__all__ = ["REGISTRY", "Format", "get_format"]
