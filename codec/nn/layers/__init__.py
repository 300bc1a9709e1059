"""Reusable building blocks: residual blocks, modulated convolutions, attention."""
