"""qexport: streaming FP16 / INT8 / INT4 export of Hugging Face checkpoints, and the checks that prove it."""

__version__ = "0.1.0"
