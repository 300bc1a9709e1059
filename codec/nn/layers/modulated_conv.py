"""StyleGAN2 modulated convolution with weight demodulation (Karras et al., CVPR 2020).

Implemented in the non-fused form (scale the input per channel, shared convolution, scale the output
per channel), which is mathematically the same as modulating the weights and runs as one ordinary
convolution for the whole batch, much faster on CPU than a grouped convolution per sample.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ModulatedConv2d(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, style_dim: int, kernel_size: int = 3, upsample: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_ch, in_ch, kernel_size, kernel_size))
        self.gain = 1 / math.sqrt(in_ch * kernel_size**2)  # equalized learning rate
        self.affine = nn.Linear(style_dim, in_ch)
        nn.init.ones_(self.affine.bias)  # styles start at 1: an unmodulated convolution
        self.bias = nn.Parameter(torch.zeros(out_ch))
        self.upsample = upsample
        self.padding = kernel_size // 2

    def forward(self, x: Tensor, w: Tensor) -> Tensor:
        """x (B, in, H, W), w (B, style_dim) -> (B, out, H', W'), H' = 2H when upsampling."""
        s = self.affine(w)  # (B, in)
        weight = self.weight * self.gain
        # demodulation: 1 / ||W * s|| per (sample, output channel)
        demod = torch.rsqrt(s.square() @ weight.square().sum((2, 3)).t() + 1e-8)  # (B, out)
        if self.upsample:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        x = F.conv2d(x * s[:, :, None, None], weight, padding=self.padding)
        return x * demod[:, :, None, None] + self.bias[None, :, None, None]
