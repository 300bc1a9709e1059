"""Keyframe codec: a learned transform codec with a factorized prior (Balle et al., "End-to-end
optimized image compression", ICLR 2017), built from CompressAI's GDN layers and EntropyBottleneck.

    x --g_a--> y --Q--> y_hat --g_s--> x_hat        y (B, M, H/16, W/16), coded with a fixed
                         |                          per-channel CDF (EntropyBottleneck)
                       rANS

Why a factorized prior rather than a scale hyperprior: with a hyperprior the decoder picks each
symbol's CDF from a float network output, and one ulp of difference between machines or thread
counts can pick another CDF and derail the whole stream. Here the CDF tables are integer buffers
fixed at export time (``IMFCodec.build_entropy_tables``), so decoding is exact everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

from compressai.entropy_models import EntropyBottleneck
from compressai.layers import GDN
from compressai.models.utils import conv, deconv
from torch import Tensor, nn

from entropy.coding import decode_symbols, encode_symbols

KEYFRAME_STRIDE = 16


@dataclass
class KeyframeOutput:
    x_hat: Tensor  # (B, 3, H, W)
    likelihoods: Tensor  # (B, M, H/16, W/16)


class KeyframeCodec(nn.Module):
    def __init__(self, n: int, m: int):
        super().__init__()
        self.g_a = nn.Sequential(conv(3, n), GDN(n), conv(n, n), GDN(n), conv(n, n), GDN(n), conv(n, m))
        self.g_s = nn.Sequential(
            deconv(m, n), GDN(n, inverse=True), deconv(n, n), GDN(n, inverse=True),
            deconv(n, n), GDN(n, inverse=True), deconv(n, 3),
        )
        self.entropy_bottleneck = EntropyBottleneck(m)

    def forward(self, x: Tensor) -> KeyframeOutput:
        """x (B, 3, H, W) in [0, 1], H and W multiples of 16."""
        y_hat, likelihoods = self.entropy_bottleneck(self.g_a(x * 2 - 1))
        return KeyframeOutput(self._synthesize(y_hat), likelihoods)

    def _synthesize(self, y_hat: Tensor) -> Tensor:
        x_hat = (self.g_s(y_hat) + 1) / 2
        return x_hat + (x_hat.clamp(0, 1) - x_hat).detach()

    def compress(self, x: Tensor) -> tuple[bytes, Tensor]:
        """One frame (1, 3, H, W) -> (bytes, x_hat exactly as the decoder will see it)."""
        y = self.g_a(x * 2 - 1)
        data = encode_symbols(self.entropy_bottleneck, y)
        return data, self.decompress(data, x.shape[-2:])

    def decompress(self, data: bytes, size: tuple[int, int]) -> Tensor:
        latent = (size[0] // KEYFRAME_STRIDE, size[1] // KEYFRAME_STRIDE)
        return self._synthesize(decode_symbols(self.entropy_bottleneck, data, latent)).clamp(0, 1)
