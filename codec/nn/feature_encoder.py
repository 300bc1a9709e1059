"""E_F, the dense feature encoder of IMF (Gao et al., "Implicit Motion Function", CVPR 2024).

Turns a reference frame into multi-scale features f_r at strides 4, 8, 16, 32; they are the values
that implicit motion alignment warps. Computed once per keyframe.
"""

from __future__ import annotations

from torch import Tensor, nn

from codec.nn.config import IMFConfig
from codec.nn.layers.resblock import Pyramid


class FeatureEncoder(nn.Module):
    def __init__(self, cfg: IMFConfig):
        super().__init__()
        self.pyramid = Pyramid(cfg.channels)

    def forward(self, x: Tensor) -> list[Tensor]:
        """x (B, 3, H, W) in [0, 1] -> f_r, fine to coarse: (B, C_s, H/stride_s, W/stride_s)."""
        return self.pyramid(x)
