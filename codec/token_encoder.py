"""E_T, the latent token encoder of IMF (CVPR 2024).

Residual downsampling to 1/32, a global squeeze (average pool) and an MLP: one latent token of
``token_dim`` numbers per frame. The token is nearly all of the bitrate, so it is small by design.
"""

from __future__ import annotations

from timm.layers import Mlp
from torch import Tensor, nn

from codec.config import IMFConfig
from codec.layers.resblock import Pyramid


class TokenEncoder(nn.Module):
    def __init__(self, cfg: IMFConfig):
        super().__init__()
        self.pyramid = Pyramid(cfg.token_channels)
        c = cfg.token_channels[-1]
        self.head = Mlp(c, 2 * c, cfg.token_dim, act_layer=nn.GELU)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, 3, H, W) in [0, 1] -> t (B, token_dim)."""
        h = self.pyramid(x)[-1]  # (B, C, H/32, W/32)
        return self.head(h.mean((2, 3)))
