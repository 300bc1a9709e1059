"""The one wrapper around CompressAI's rANS coder, through its EntropyBottleneck.

An EntropyBottleneck codes with integer CDF tables (``_quantized_cdf``, ``_offset``,
``_cdf_length``) built by ``update()``. They are saved with the weights, so the encoder and every
decoder use the very same integers, whatever float rounding their machine does.
"""

from __future__ import annotations

import math

import torch
from compressai.entropy_models import EntropyBottleneck
from torch import Tensor


class CoderNotReady(RuntimeError):
    pass


def bits(likelihoods: Tensor) -> Tensor:
    """Information content in bits, summed over all but the batch axis -> (B,)."""
    return -torch.log2(likelihoods).flatten(1).sum(1)


def require_tables(bottleneck: EntropyBottleneck) -> None:
    if bottleneck._offset.numel() == 0:
        raise CoderNotReady(
            "entropy coder tables are not built: call model.build_entropy_tables() after training "
            "(exported weights include them)")


def encode_symbols(bottleneck: EntropyBottleneck, x: Tensor) -> bytes:
    """x (1, C, *spatial) -> rANS bytes of round(x - median) under the bottleneck's fixed CDFs."""
    require_tables(bottleneck)
    return bottleneck.compress(x)[0]


def decode_symbols(bottleneck: EntropyBottleneck, data: bytes, spatial: tuple[int, ...]) -> Tensor:
    """Inverse of encode_symbols -> (1, C, *spatial), the dequantized values.

    The rANS decoder reads its input without bounds checks; on damaged data it could run past the
    end. Zero padding (more than it can consume for this many symbols) keeps every read inside
    our buffer; a valid stream never reaches the padding.
    """
    require_tables(bottleneck)
    symbols = bottleneck._quantized_cdf.shape[0] * math.prod(spatial)
    return bottleneck.decompress([bytes(data) + rans_padding(symbols)], spatial)


def rans_padding(symbols: int) -> bytes:
    """Zeros to append to a rANS stream of this many symbols before decoding it (see decode_symbols)."""
    return bytes(8 * symbols + 64)


def quantize_noise(x: Tensor) -> Tensor:
    """Training proxy for rounding: additive uniform noise in [-0.5, 0.5)."""
    return x + torch.empty_like(x).uniform_(-0.5, 0.5)


def bits_to_kbps(total_bits: float, frames: int, fps: float) -> float:
    return total_bits / 1000 / max(frames / fps, math.ulp(1.0))
