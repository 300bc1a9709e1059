"""Residual convolution block and the downsampling pyramid built from it."""

from __future__ import annotations

from typing import Callable

from torch import Tensor, nn


class ResBlock(nn.Module):
    """Pre-activation residual block; the residual branch starts at zero so the block starts as its skip."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, act_layer: Callable[[], nn.Module] = nn.GELU):
        super().__init__()
        self.act = act_layer()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        if in_ch == out_ch and stride == 1:
            self.skip: nn.Module = nn.Identity()
        else:
            pool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
            self.skip = nn.Sequential(pool, nn.Conv2d(in_ch, out_ch, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.skip(x) + self.conv2(self.act(self.conv1(self.act(x))))


class Pyramid(nn.Module):
    """Stride-2 stem to 1/2 resolution, then one downsampling ResBlock per scale (1/4, 1/8, 1/16, 1/32)."""

    def __init__(self, channels: tuple[int, ...]):
        super().__init__()
        self.stem = nn.Conv2d(3, channels[0] // 2, 3, 2, 1)
        ins = (channels[0] // 2,) + tuple(channels[:-1])
        self.stages = nn.ModuleList(ResBlock(i, o, stride=2) for i, o in zip(ins, channels))

    def forward(self, x: Tensor) -> list[Tensor]:
        """x (B, 3, H, W) in [0, 1] -> features fine to coarse, [(B, C_s, H/4, W/4), ..., (B, C_3, H/32, W/32)]."""
        h = self.stem(x * 2 - 1)
        features = []
        for stage in self.stages:
            h = stage(h)
            features.append(h)
        return features
