"""Untrusted input and the operating system: files read with limits, safetensors headers, checkpoints, child processes."""
