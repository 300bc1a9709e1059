"""D_F, the frame decoder of IMF (CVPR 2024), made cheap at full resolution.

Residual blocks fuse the aligned features coarse to fine up to stride 4; two sub-pixel
convolutions (pixel shuffle) take them to full resolution as a residual added to the warped
reference frame. The last layer starts at zero, so an untrained decoder outputs the warp itself.

With ``hold_mask`` the decoder also predicts, per pixel, how much of the newest reference picture
to show unchanged: x = m * hold + (1 - m) * synthesis. Measured on stage 10's validation (AV1
pictures at CRF 58), choosing the better of holding and synthesis per 8x8 block would beat holding
the whole frame by 0.6 dB one frame after the reference and by 2.0-2.2 dB at 4 to 8 frames, where
the synthesis alone loses by 4.4 dB and 1.0 dB: a warp never copies a still region exactly. The
mask sees the decoder's last features and where the current frame's motion features differ from
the reference's (zero where the token has not moved).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from codec.nn.config import IMFConfig
from codec.nn.layers.resblock import ResBlock

# The mask's logit is MASK_GAIN times its convolution: Adam moves each weight by about the learning
# rate per step, and a head added to trained weights at lr 1e-4 would otherwise need thousands of
# steps to open (StyleGAN's equalized learning rate, in one constant).
MASK_GAIN = 10.0
MASK_START = -3.0


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
        self.to_mask = None
        if cfg.hold_mask:
            self.to_mask = nn.Conv2d(dc + 1, 1, 3, 1, 1)
            nn.init.zeros_(self.to_mask.weight)  # starts as a nearly pure synthesis: sigmoid(-3) = 5% hold
            nn.init.constant_(self.to_mask.bias, MASK_START / MASK_GAIN)

    def forward(self, aligned: list[Tensor], warped: Tensor, hold: Tensor | None = None,
                change: Tensor | None = None) -> Tensor:
        """aligned fine to coarse, warped (B, 3, H, W) -> x_hat (B, 3, H, W), clamped to [0, 1].
        With ``hold_mask``: hold (B, 3, H, W), the newest reference picture, and change (B, 1, H/4, W/4),
        the log RMS difference between the current frame's finest motion features and the reference's."""
        h = self.coarse(aligned[-1])
        for merge, refine, a in zip(self.merge, self.refine, reversed(aligned[:-1])):
            h = F.interpolate(h, scale_factor=2, mode="bilinear", align_corners=False)
            h = refine(merge(torch.cat([h, a], 1)))
        h = self.act(F.pixel_shuffle(self.to_half(self.act(h)), 2))  # (B, dc, H/2, W/2)
        x = warped + F.pixel_shuffle(self.to_full(h), 2)
        if self.to_mask is not None:
            change = F.interpolate(change, size=h.shape[-2:], mode="bilinear", align_corners=False)
            logit = MASK_GAIN * self.to_mask(torch.cat([h, change], 1))
            m = torch.sigmoid(F.interpolate(logit, size=x.shape[-2:], mode="bilinear", align_corners=False))
            x = m * hold + (1 - m) * x
        return x + (x.clamp(0, 1) - x).detach()  # clamp with a straight-through gradient
