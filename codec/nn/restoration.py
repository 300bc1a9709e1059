"""The decoder's restoration of AV1 reference pictures before they are shown.

Below 5 kbps the references are AV1 pictures at SVT-AV1's coarsest quantizer (qindex 255), each
shown and then held for 2-12 frames. A small residual CNN, trained on such pictures against their
own frames (`train.restoration`), takes some of the coding artifacts out before they are shown
(MODEL.md, "Restoration"). Trained against the frames they are held for, it learned to soften,
which VMAF penalized.

It runs at half resolution (pixel-unshuffled: 4 RGB phases as 12 channels), once per reference;
its output is only ever shown, never predicted from, so references stay bit-exact AV1 pictures.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class Restoration(nn.Module):
    def __init__(self, channels: int = 32, layers: int = 6):
        super().__init__()
        self.head = nn.Conv2d(12, channels, 3, padding=1)
        self.body = nn.Sequential(*[m for _ in range(layers) for m in (nn.Conv2d(channels, channels, 3, padding=1),
                                                                          nn.ReLU())])
        self.tail = nn.Conv2d(channels, 12, 3, padding=1)
        nn.init.zeros_(self.tail.weight)  # starts as the identity: the picture as decoded
        nn.init.zeros_(self.tail.bias)

    def forward(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1], H and W even -> the restored picture, same shape, not clamped."""
        residual = self.tail(self.body(F.relu(self.head(F.pixel_unshuffle(x, 2)))))
        return x + F.pixel_shuffle(residual, 2)
