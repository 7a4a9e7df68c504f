"""Quantization arithmetic: integer primitives, dequantization of every compressed-tensors layout, clip search."""
