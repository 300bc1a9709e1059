"""The IMF model, its building blocks, and the encode/decode pipeline."""
