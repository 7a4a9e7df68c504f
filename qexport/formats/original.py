"""Original: every tensor stored unchanged, in its own dtype, and config.json left as it is.

What `qexport merge` writes (a merged model as a plain Hugging Face folder); as an export format, an unquantized
copy of the source with a manifest.
"""

from __future__ import annotations

import torch

from qexport.formats.base import Format, register


@register
class Original(Format):
    name = "original"

    def __init__(self, **_options):
        super().__init__()
        self.config_dtype = None  # keep the source's dtype in config.json

    def stored(self, name, dtype, shape, quantize):
        return [(name, dtype, shape)]

    def encode(self, name, w: torch.Tensor, quantize):
        return {name: w}
