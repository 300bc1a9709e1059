"""IMF_A, implicit motion alignment (IMF, CVPR 2024; reference banks as in Implicit Warping,
Mallya et al., NeurIPS 2022).

Per scale: cross-attention with Q = m_c, K = m_r, V = f_r, then transformer blocks. At the finest
scale (stride 4) the values also carry the reference pixels, pixel-unshuffled 4x4, so the model can
output a warped reference frame that the frame decoder only has to correct.

Scales are attended coarse to fine. The global attention at stride 8 also yields where each query
attends (the attention-weighted key position), and the finest scale's windows are centred there:
the reference's keys, values and pixels are warped by that displacement before the local attention.
Without it a window of 7 at stride 4 reaches 12 pixels at most, so larger head motion could only be
painted by the decoder, as blur; with it, the loss reaches the coarse attention through a bilinear
warp of sharp pixels, a much stronger signal for learning to match than a blend of features.

Why the finest scale attends in a local window: at 256x256 it has 4096 positions, and dense
all-pairs attention there (4096^2 logits per head, for cross- and self-attention) alone would cost
more than the whole ~5 GFLOPs per-frame budget. The coarser scales attend densely (1024 positions at
most), so large motions are matched globally at coarse scales and refined locally at the finest.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from codec.nn.config import STRIDES, IMFConfig
from codec.nn.layers.attention import CrossAttention, KeyValue, TransformerBlock
from codec.nn.layers.warp import resize_flow


class ImplicitMotionAlignment(nn.Module):
    def __init__(self, cfg: IMFConfig):
        super().__init__()
        windows = [cfg.window] + [None] * (len(cfg.channels) - 1)
        self.cross = nn.ModuleList(
            CrossAttention(c, cfg.head_dim, win, cfg.locality, cfg.extra_tokens, STRIDES[0] if s == 0 else 0,
                           pixel_flow=cfg.pixel_warp == "flow")
            for s, (c, win) in enumerate(zip(cfg.channels, windows))
        )
        self.fuse = nn.ModuleList(nn.Conv2d(2 * c, c, 1) for c in cfg.channels)
        self.blocks = nn.ModuleList(
            nn.Sequential(*(TransformerBlock(c, cfg.head_dim, win, cfg.ff_mult) for _ in range(cfg.transformer_depth)))
            for c, win in zip(cfg.channels, windows)
        )

    def prepare(self, x_ref: Tensor, f_r: list[Tensor], m_r: list[Tensor]) -> list[KeyValue]:
        """Keys and values of one reference, per scale. x_ref (B, 3, H, W) is the decoded keyframe."""
        pixels = F.pixel_unshuffle(x_ref, STRIDES[0])  # (B, 48, H/4, W/4)
        return [cross.prepare(m, f, pixels if s == 0 else None)
                for s, (cross, m, f) in enumerate(zip(self.cross, m_r, f_r))]

    def ready(self, kv: list[KeyValue]) -> list:
        """A bank's keys and values per scale, made ready for coding (`CrossAttention.ready`)."""
        return [cross.ready(k) for cross, k in zip(self.cross, kv)]

    def forward(self, m_c: list[Tensor], kv: list) -> tuple[list[Tensor], Tensor]:
        """m_c fine to coarse, kv per scale (one reference or a bank) ->
        aligned features fine to coarse, warped reference frame (B, 3, H, W)."""
        aligned = [None] * len(m_c)
        warped = flow = None
        for s in reversed(range(len(m_c))):
            guide = None if flow is None else resize_flow(flow, m_c[s].shape[-2:])
            a, pixels, flow = self.cross[s](m_c[s], kv[s], guide)
            if pixels is not None:
                warped = F.pixel_shuffle(pixels, STRIDES[0])
            aligned[s] = self.blocks[s](self.fuse[s](torch.cat([a, m_c[s]], 1)))
        return aligned, warped
