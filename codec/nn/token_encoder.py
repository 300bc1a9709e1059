"""E_T, the latent token encoder of IMF (CVPR 2024).

Residual downsampling to 1/32, a global squeeze (average pool) and an MLP: one latent token of
``token_dim`` numbers per frame. The token is nearly all of the bitrate, so it is small by design.

Average pooling forgets where things are: a head that moves shifts the features and leaves their
mean almost unchanged, so a pooled token can say what a face does but hardly where it is. Soft
keypoints restore that: learned heatmaps at 1/8 resolution, each reduced by a spatial softmax to
its expected (y, x) position, are projected into the token too (projection zero at init).
"""

from __future__ import annotations

from codec.nn.layers.mlp import Mlp
from torch import Tensor, nn

from codec.nn.config import STRIDES, IMFConfig
from codec.nn.layers.resblock import Pyramid
from codec.nn.layers.warp import pixel_centres

KEYPOINTS = 8
KEYPOINT_SCALE = STRIDES.index(8)


class SoftKeypoints(nn.Module):
    """Feature map -> expected (y, x) of ``count`` learned heatmaps, coordinates in [-1, 1]."""

    def __init__(self, channels: int, count: int):
        super().__init__()
        self.heatmaps = nn.Conv2d(channels, count, 3, 1, 1)

    def forward(self, h: Tensor) -> Tensor:
        """h (B, C, y, x) -> (B, count, 2)."""
        grid = pixel_centres(*h.shape[-2:], h.device).reshape(-1, 2)  # (y*x, 2)
        weights = self.heatmaps(h).flatten(2).softmax(-1)  # (B, count, y*x)
        return weights @ grid


class TokenEncoder(nn.Module):
    def __init__(self, cfg: IMFConfig):
        super().__init__()
        self.pyramid = Pyramid(cfg.token_channels)
        c = cfg.token_channels[-1]
        self.head = Mlp(c, 2 * c, cfg.token_dim, act_layer=nn.GELU)
        self.keypoints = SoftKeypoints(cfg.token_channels[KEYPOINT_SCALE], KEYPOINTS)
        self.from_keypoints = nn.Linear(2 * KEYPOINTS, cfg.token_dim)
        nn.init.zeros_(self.from_keypoints.weight)
        nn.init.zeros_(self.from_keypoints.bias)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, 3, H, W) in [0, 1] -> t (B, token_dim)."""
        features = self.pyramid(x)
        h = features[-1]  # (B, C, H/32, W/32)
        where = self.keypoints(features[KEYPOINT_SCALE]).flatten(1)  # (B, 2K)
        return self.head(h.mean((2, 3))) + self.from_keypoints(where)
