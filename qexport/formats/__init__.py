"""Output formats by name. Importing this package registers fp16, int8, int4, int4-asym and original.

Names are case-insensitive (`--formats INT4` is int4). `original` (every tensor unchanged: what `qexport merge`
writes) is internal: accepted, but not offered in messages or help.
"""

from qexport.formats import fp16, int4, int4_asym, int8, original  # noqa: F401  (registration)
from qexport.formats.base import REGISTRY, Format

INTERNAL_FORMATS = ("original",)


def user_formats() -> list[str]:
    """The formats a user is offered (help, error messages), in the order the README lists them."""
    order = ("fp16", "int8", "int4")
    return sorted((n for n in REGISTRY if n not in INTERNAL_FORMATS), key=lambda n: (order + (n,)).index(n))


def format_name(name: str, option: str = "--formats") -> str:
    """The registered name for `name` in any case; InputError naming `option` and the known formats if none."""
    from qexport.errors import InputError

    canonical = str(name).lower()
    if canonical not in REGISTRY:
        raise InputError(f"{option}: unknown format {name!r} (known: {', '.join(user_formats())})")
    return canonical


def get_format(name: str, option: str = "--formats", **options) -> Format:
    return REGISTRY[format_name(name, option)](**options)


__all__ = ["INTERNAL_FORMATS", "REGISTRY", "Format", "format_name", "get_format", "user_formats"]
