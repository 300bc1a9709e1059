"""D_F, the frame decoder of IMF (CVPR 2024), made cheap at full resolution.

Residual blocks fuse the aligned features coarse to fine up to stride 4; two sub-pixel
convolutions (pixel shuffle) take them to full resolution as a residual added to the warped
reference frame. The last layer starts at zero, so an untrained decoder outputs the warp itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from codec.nn.config import IMFConfig
from codec.nn.layers.resblock import ResBlock


class FrameDecoder(nn.Module):
    def __init__(self, cfg: IMFConfig):
        super().__init__()
        c = cfg.channels
        dc = cfg.decoder_channels
        self.coarse = ResBlock(c[-1], c[-1])
        self.merge = nn.ModuleList(nn.Conv2d(c[s + 1] + c[s], c[s], 1) for s in reversed(range(len(c) - 1)))
        self.refine = nn.ModuleList(ResBlock(c[s], c[s]) for s in reversed(range(len(c) - 1)))
        self.to_half = nn.Conv2d(c[0], 4 * dc, 3, 1, 1)
        self.to_full = nn.Conv2d(dc, 3 * 4, 3, 1, 1)
        nn.init.zeros_(self.to_full.weight)
        nn.init.zeros_(self.to_full.bias)
        self.act = nn.GELU()

    def forward(self, aligned: list[Tensor], warped: Tensor) -> Tensor:
        """aligned fine to coarse, warped (B, 3, H, W) -> x_hat (B, 3, H, W), clamped to [0, 1]."""
        h = self.coarse(aligned[-1])
        for merge, refine, a in zip(self.merge, self.refine, reversed(aligned[:-1])):
            h = F.interpolate(h, scale_factor=2, mode="bilinear", align_corners=False)
            h = refine(merge(torch.cat([h, a], 1)))
        h = self.act(F.pixel_shuffle(self.to_half(self.act(h)), 2))  # (B, dc, H/2, W/2)
        x = warped + F.pixel_shuffle(self.to_full(h), 2)
        return x + (x.clamp(0, 1) - x).detach()  # clamp with a straight-through gradient
