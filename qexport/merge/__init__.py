"""Merged checkpoints: a LoRA adapter folded into its base, or a weighted average."""
