"""Quantization, entropy coding and the .imfc bitstream container. Knows nothing of the model."""
