"""Keyframe codec: a learned transform codec with a factorized prior (Balle et al., "End-to-end
optimized image compression", ICLR 2017), built from CompressAI's GDN layers and EntropyBottleneck.

    x --g_a--> y --Q--> y_hat --g_s--> x_hat        y (B, M, H/16, W/16), coded with a fixed
                         |                          per-channel CDF (EntropyBottleneck)
                       rANS

Why a factorized prior rather than a scale hyperprior: with a hyperprior the decoder picks each
symbol's CDF from a float network output, and one ulp of difference between machines or thread
counts can pick another CDF and derail the whole stream. Here the CDF tables are integer buffers
fixed at export time (``IMFCodec.build_entropy_tables``), so decoding is exact everywhere.

Variable rate: the encoder may quantize y with a coarser step s from ``KEYFRAME_STEPS``
(y_hat = s * round((y - median) / s) + median), which costs fewer bits at some loss of quality.
Each step has its own integer tables, built from the same learned density by integrating it over
bins of width s (``StepTables``), so one trained model covers a range of keyframe rates.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from compressai.entropy_models import EntropyBottleneck, EntropyModel
from compressai.layers import GDN
from compressai.models.utils import conv, deconv, update_registered_buffers
from torch import Tensor, nn

from entropy.coding import CoderNotReady, rans_padding

KEYFRAME_STRIDE = 16
# Quantization steps a keyframe may use, by index. Exact in binary, so every machine dequantizes
# alike. Index 0 is the unit step every stream before format 4 used.
KEYFRAME_STEPS = (1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0)


def step_index(step: float) -> int:
    """The index of a keyframe quantization step; ValueError for a step not in KEYFRAME_STEPS."""
    if step not in KEYFRAME_STEPS:
        raise ValueError(f"keyframe step {step}: choose one of {', '.join(map(str, KEYFRAME_STEPS))}")
    return KEYFRAME_STEPS.index(step)


@dataclass
class KeyframeOutput:
    x_hat: Tensor  # (B, 3, H, W)
    likelihoods: Tensor  # (B, M, H/16, W/16)


class StepTables(EntropyModel):
    """rANS tables of a factorized prior at every step of KEYFRAME_STEPS: row ``i * C + c`` codes
    channel c at step i. Built once from the float density (``build``) and then only read."""

    def build(self, bottleneck: EntropyBottleneck) -> None:
        quantiles = bottleneck.quantiles.detach()[:, 0]  # (C, 3): lower tail, median, upper tail
        median = quantiles[:, 1]
        tables, offsets, lengths = [], [], []
        for step in KEYFRAME_STEPS:
            minima = torch.ceil((median - quantiles[:, 0]) / step).int().clamp(min=0)
            maxima = torch.ceil((quantiles[:, 2] - median) / step).int().clamp(min=0)
            length = minima + maxima + 1
            width = int(length.max())
            # the same float operations as EntropyBottleneck.update(), so step 1 gives its very tables
            start = median - minima * step
            samples = (torch.arange(width) * step)[None, None, :] + start[:, None, None]
            lower = bottleneck._logits_cumulative(samples - step / 2, stop_gradient=True)
            upper = bottleneck._logits_cumulative(samples + step / 2, stop_gradient=True)
            pmf = (torch.sigmoid(upper) - torch.sigmoid(lower))[:, 0]
            tail = torch.sigmoid(lower[:, 0, :1]) + torch.sigmoid(-upper[:, 0, -1:])
            tables.append(self._pmf_to_cdf(pmf, tail, length, width))
            offsets.append(-minima)
            lengths.append(length + 2)
        width = max(t.shape[1] for t in tables)
        self._quantized_cdf = torch.cat([nn.functional.pad(t, (0, width - t.shape[1])) for t in tables])
        self._offset = torch.cat(offsets)
        self._cdf_length = torch.cat(lengths)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if prefix + "_offset" in state_dict:  # tables have no fixed shape: take the file's
            update_registered_buffers(self, prefix[:-1], ["_quantized_cdf", "_offset", "_cdf_length"], state_dict,
                                      policy="resize")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def indexes(self, step_index: int, shape: torch.Size) -> Tensor:
        if self._offset.numel() == 0:
            raise CoderNotReady("keyframe step tables are not built: call model.build_entropy_tables()")
        channels = torch.arange(shape[1], dtype=torch.int32)[None, :, None, None]
        return (channels + step_index * shape[1]).expand(shape)


class KeyframeCodec(nn.Module):
    def __init__(self, n: int, m: int):
        super().__init__()
        self.g_a = nn.Sequential(conv(3, n), GDN(n), conv(n, n), GDN(n), conv(n, n), GDN(n), conv(n, m))
        self.g_s = nn.Sequential(
            deconv(m, n), GDN(n, inverse=True), deconv(n, n), GDN(n, inverse=True),
            deconv(n, n), GDN(n, inverse=True), deconv(n, 3),
        )
        self.entropy_bottleneck = EntropyBottleneck(m)
        self.step_tables = StepTables(likelihood_bound=0)  # tables only: no likelihoods

    def forward(self, x: Tensor, step: Tensor | None = None) -> KeyframeOutput:
        """x (B, 3, H, W) in [0, 1], H and W multiples of 16; ``step`` (B,) quantization steps
        (default: the unit step)."""
        y = self.g_a(x * 2 - 1)
        step = (y.new_ones(()) if step is None else step.view(-1, 1, 1, 1)).expand_as(y)
        y_hat, likelihoods = self._quantize(y, step)
        return KeyframeOutput(self._synthesize(y_hat), likelihoods)

    def _quantize(self, y: Tensor, step: Tensor) -> tuple[Tensor, Tensor]:
        """EntropyBottleneck.forward with bins of width ``step`` (same shape as y); at step 1 the same
        operations as that forward."""
        eb = self.entropy_bottleneck
        median = eb._get_medians().view(1, -1, 1, 1)
        if self.training:
            y_hat = y + step * (torch.rand_like(y) - 0.5)
        else:
            y_hat = torch.round((y - median) / step) * step + median
        channels = y.shape[1]

        def per_channel(t: Tensor) -> Tensor:  # (B, C, H, W) -> (C, 1, B*H*W), the density's layout
            return t.transpose(0, 1).reshape(channels, 1, -1)

        values, half = per_channel(y_hat), per_channel(step / 2)
        lower = eb._logits_cumulative(values - half, stop_gradient=False)
        upper = eb._logits_cumulative(values + half, stop_gradient=False)
        likelihoods = eb.likelihood_lower_bound(torch.sigmoid(upper) - torch.sigmoid(lower))
        shape = y.transpose(0, 1).shape
        return y_hat, likelihoods.reshape(shape).transpose(0, 1)

    def _synthesize(self, y_hat: Tensor) -> Tensor:
        x_hat = (self.g_s(y_hat) + 1) / 2
        return x_hat + (x_hat.clamp(0, 1) - x_hat).detach()

    def compress(self, x: Tensor, step_index: int = 0) -> tuple[bytes, Tensor]:
        """One frame (1, 3, H, W) -> (bytes, x_hat exactly as the decoder will see it), its latent
        quantized with step KEYFRAME_STEPS[step_index]."""
        y = self.g_a(x * 2 - 1)
        step, median = KEYFRAME_STEPS[step_index], self.entropy_bottleneck._get_medians().view(1, -1, 1, 1)
        indexes = self.step_tables.indexes(step_index, y.shape)
        data = self.step_tables.compress((y - median) / step, indexes)[0]
        return data, self.decompress(data, x.shape[-2:], step_index)

    def decompress(self, data: bytes, size: tuple[int, int], step_index: int = 0) -> Tensor:
        channels = self.entropy_bottleneck.quantiles.shape[0]
        shape = torch.Size((1, channels, size[0] // KEYFRAME_STRIDE, size[1] // KEYFRAME_STRIDE))
        indexes = self.step_tables.indexes(step_index, shape)
        symbols = self.step_tables.decompress([bytes(data) + rans_padding(shape.numel())], indexes)
        y_hat = symbols * KEYFRAME_STEPS[step_index] + self.entropy_bottleneck._get_medians().view(1, -1, 1, 1)
        return self._synthesize(y_hat).clamp(0, 1)
