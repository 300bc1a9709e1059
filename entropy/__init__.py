"""Quantization, entropy coding and the .imfc bitstream container. Knows nothing of the model."""

from entropy.lean_compressai import import_compressai

import_compressai()  # before any module of the project imports compressai
