"""IMF_D, the latent token decoder of IMF (CVPR 2024): a StyleGAN2-style generator.

A learned constant, upsampled to 1/32 resolution, is refined by modulated convolutions with weight
demodulation, the mapped token being the style, and upsampled scale by scale into motion features
m at strides 32, 16, 8, 4. No noise injection: motion features must be a function of the token.

Added to the constant, as in StyleGAN3's input layer, are Fourier features of the image plane seen
through an affine transform that the token sets (identity at init). A head that moves moves these features with it, and a
query then matches the reference key where the head was: the token controls geometry directly,
instead of only through per-channel styles, which in 6,000 CPU steps never learned to move
anything (the reconstructions stayed a blurred reference).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from codec.nn.layers.mlp import Mlp
from torch import Tensor, nn

from codec.nn.config import STRIDES, IMFConfig
from codec.nn.layers.modulated_conv import ModulatedConv2d
from codec.nn.layers.warp import pixel_centres

CONST_SIZE = 4


class AffineFourierFeatures(nn.Module):
    """sin/cos of fixed 2D frequencies over the image plane, after an affine map set by the style.

    Coordinates are normalised to [-1, 1] and frequencies lie in a disc of radius ``bandlimit``
    cycles per unit, below the Nyquist rate of the 4x4 grid of a 128x128 frame, so the features mean
    the same at every resolution."""

    def __init__(self, style_dim: int, channels: int, bandlimit: float = 1.0):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        radius = bandlimit * torch.rand(channels // 2, generator=g).sqrt()
        angle = 2 * math.pi * torch.rand(channels // 2, generator=g)
        self.register_buffer("freqs", torch.stack([radius * angle.sin(), radius * angle.cos()], 1))  # (f, 2) as (y, x)
        self.to_affine = nn.Linear(style_dim, 6)  # 2x2 matrix offset from identity, and a translation
        nn.init.zeros_(self.to_affine.weight)
        nn.init.zeros_(self.to_affine.bias)
        self.proj = nn.Conv2d(channels, channels, 1)  # default init: ~0.4 RMS against the constant's ~1

    def forward(self, w: Tensor, grid: tuple[int, int]) -> Tensor:
        """w (B, style_dim), grid (y, x) -> (B, channels, y, x)."""
        coords = pixel_centres(*grid, w.device)  # (y, x, 2)
        a = self.to_affine(w)
        matrix = torch.eye(2, device=w.device) + a[:, :4].view(-1, 2, 2)
        moved = torch.einsum("bij,yxj->byxi", matrix, coords) + a[:, None, None, 4:]  # (B, y, x, 2)
        phase = 2 * math.pi * moved @ self.freqs.T  # (B, y, x, f)
        features = torch.cat([phase.sin(), phase.cos()], -1).permute(0, 3, 1, 2)
        return self.proj(features)


class TokenDecoder(nn.Module):
    def __init__(self, cfg: IMFConfig):
        super().__init__()
        c = cfg.channels
        self.mapping = Mlp(cfg.token_dim, cfg.style_dim, cfg.style_dim, act_layer=nn.GELU)
        # a fixed 4x4 constant, resized to the frame's 1/32 grid: a model trained at 128x128 (4x4)
        # uses exactly the same smooth input at 256x256 (8x8), so training resolutions can change
        self.const = nn.Parameter(torch.randn(1, c[-1], CONST_SIZE, CONST_SIZE))
        self.plane = AffineFourierFeatures(cfg.style_dim, c[-1])
        self.convs = nn.ModuleList()
        ins = (c[-1],) + tuple(reversed(c))[:-1]
        for i, (cin, cout) in enumerate(zip(ins, reversed(c))):
            self.convs.append(nn.ModuleList([
                ModulatedConv2d(cin, cout, cfg.style_dim, upsample=i > 0),
                ModulatedConv2d(cout, cout, cfg.style_dim),
            ]))
        self.act = nn.LeakyReLU(0.2)

    def forward(self, t: Tensor, size: tuple[int, int]) -> list[Tensor]:
        """t (B, token_dim), frame size (H, W) -> m, fine to coarse: (B, C_s, H/stride_s, W/stride_s)."""
        w = self.mapping(t)
        grid = (size[0] // STRIDES[-1], size[1] // STRIDES[-1])
        h = self.const if self.const.shape[-2:] == grid else F.interpolate(
            self.const, size=grid, mode="bilinear", align_corners=False)
        h = h + self.plane(w, grid)
        m = []
        for conv_a, conv_b in self.convs:
            h = self.act(conv_b(self.act(conv_a(h, w)), w))
            m.append(h)
        return m[::-1]
