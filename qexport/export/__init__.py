"""The streaming export pipeline."""
