"""Multi-scale patch discriminator and hinge losses for the optional sharpening stage.

L1 and MS-SSIM reward the average of the plausible frames, which is blurry wherever the token
cannot say exactly where an edge went (hair, teeth, eyes). A patch discriminator asks instead
whether each local patch looks like a real frame. Three copies look at the frame at full, half and
quarter size (pix2pixHD's layout), so both fine texture and larger structure are judged. Spectral
normalisation keeps the discriminator Lipschitz, which the hinge loss needs to stay stable without
tuning. Perceptual losses (LPIPS, VGG features) are not used: they need downloaded weights.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm


class PatchDiscriminator(nn.Module):
    """One scale: strided 4x4 convolutions down to a map of real/fake scores, one per patch (each
    score sees a 54x54 window of its input); 3x3 at the end so 16x16 inputs (tiny tests) still fit."""

    def __init__(self, channels: int = 32, layers: int = 3):
        super().__init__()
        blocks: list[nn.Module] = []
        c_in, c = 3, channels
        for _ in range(layers):
            blocks += [spectral_norm(nn.Conv2d(c_in, c, 4, stride=2, padding=1)), nn.LeakyReLU(0.2)]
            c_in, c = c, min(c * 2, channels * 8)
        blocks += [spectral_norm(nn.Conv2d(c_in, c_in, 3, padding=1)), nn.LeakyReLU(0.2),
                   spectral_norm(nn.Conv2d(c_in, 1, 3, padding=1))]
        self.net = nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x * 2 - 1)  # frames in [0, 1] -> [-1, 1]


class MultiScaleDiscriminator(nn.Module):
    def __init__(self, scales: int = 3, channels: int = 32):
        super().__init__()
        self.scales = nn.ModuleList(PatchDiscriminator(channels) for _ in range(scales))

    def forward(self, x: Tensor) -> list[Tensor]:
        """-> one score map per scale, finest first."""
        out = []
        for i, d in enumerate(self.scales):
            if i:
                x = F.avg_pool2d(x, 3, stride=2, padding=1, count_include_pad=False)
            out.append(d(x))
        return out


def hinge_d_loss(real: list[Tensor], fake: list[Tensor]) -> Tensor:
    """Discriminator: push real scores above +1 and fake scores below -1, averaged over scales."""
    return sum(F.relu(1 - r).mean() + F.relu(1 + f).mean() for r, f in zip(real, fake)) / len(real)


def hinge_g_loss(fake: list[Tensor]) -> Tensor:
    """Generator: raise the discriminator's scores of its frames."""
    return -sum(f.mean() for f in fake) / len(fake)
