"""Inference engines other than transformers, run on an export to check that it works where users deploy it.

`vllm_child.py` runs inside vLLM's own interpreter and imports nothing from qexport; `runner.py` runs it.
"""
