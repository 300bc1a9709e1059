"""IMF_D, the latent token decoder of IMF (CVPR 2024): a StyleGAN2-style generator.

A learned constant, upsampled to 1/32 resolution, is refined by modulated convolutions with weight
demodulation, the mapped token being the style, and upsampled scale by scale into motion features
m at strides 32, 16, 8, 4. No noise injection: motion features must be a function of the token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import Tensor, nn

from codec.config import STRIDES, IMFConfig
from codec.layers.modulated_conv import ModulatedConv2d

CONST_SIZE = 4


class TokenDecoder(nn.Module):
    def __init__(self, cfg: IMFConfig):
        super().__init__()
        c = cfg.channels
        self.mapping = Mlp(cfg.token_dim, cfg.style_dim, cfg.style_dim, act_layer=nn.GELU)
        # a fixed 4x4 constant, resized to the frame's 1/32 grid: a model trained at 128x128 (4x4)
        # uses exactly the same smooth input at 256x256 (8x8), so training resolutions can change
        self.const = nn.Parameter(torch.randn(1, c[-1], CONST_SIZE, CONST_SIZE))
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
        h = h.expand(t.shape[0], -1, -1, -1)
        m = []
        for conv_a, conv_b in self.convs:
            h = self.act(conv_b(self.act(conv_a(h, w)), w))
            m.append(h)
        return m[::-1]
