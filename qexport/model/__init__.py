"""Model architectures: which tensors are Linear weights (meta device), tiny models, the SmolLM2 builder."""
