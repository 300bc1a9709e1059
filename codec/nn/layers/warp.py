"""Backward warping of feature maps by a dense displacement field."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def pixel_centres(height: int, width: int, device: torch.device) -> Tensor:
    """(y, x) of each pixel centre in [-1, 1] coordinates (align_corners=False) -> (height, width, 2)."""
    ys = (torch.arange(height, device=device) + 0.5) / height * 2 - 1
    xs = (torch.arange(width, device=device) + 0.5) / width * 2 - 1
    return torch.stack(torch.meshgrid(ys, xs, indexing="ij"), -1)


def warp(maps: Tensor, flow: Tensor) -> Tensor:
    """Sample maps (b, c, y, x) at every position plus flow (b, 2, y, x), given as (dy, dx) in pixels
    of the map: bilinear, with positions beyond the edge clamped to it."""
    b, _, y, x = maps.shape
    ys = torch.arange(y, device=maps.device, dtype=maps.dtype)
    xs = torch.arange(x, device=maps.device, dtype=maps.dtype)
    base = torch.stack(torch.meshgrid(ys, xs, indexing="ij"))  # (2, y, x)
    pos = base + flow
    size = torch.tensor([y, x], device=maps.device, dtype=maps.dtype)[:, None, None]
    norm = (2 * pos + 1) / size - 1  # pixel centres -> [-1, 1], as align_corners=False expects
    return F.grid_sample(maps, norm.flip(1).permute(0, 2, 3, 1), mode="bilinear", padding_mode="border",
                         align_corners=False)


def resize_flow(flow: Tensor, size: tuple[int, int]) -> Tensor:
    """A displacement field (b, 2, y, x) resampled to another grid, with its units rescaled to it."""
    scale = torch.tensor([size[0] / flow.shape[-2], size[1] / flow.shape[-1]], device=flow.device, dtype=flow.dtype)
    return F.interpolate(flow, size=size, mode="bilinear", align_corners=False) * scale[:, None, None]
