"""Size and cost of a model: parameter count, weight bytes, per-frame decode FLOPs."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from codec.nn.model import IMFCodec


@dataclass
class ModelStats:
    preset: str
    resolution: int
    parameters: int
    fp16_megabytes: float
    decode_gflops: float  # one token frame, reference cached (what every non-key frame costs)
    keyframe_gflops: float  # once per keyframe: keyframe synthesis + reference features
    restoration_gflops: float  # once per AV1 inter reference shown (format 8), 0 without a restoration


def model_stats(model: IMFCodec) -> ModelStats:
    cfg = model.cfg
    r = cfg.resolution
    model.eval()  # FlopCounterMode tracks modules with autograd hooks, so no no_grad here
    u = torch.zeros(1, cfg.token_dim)
    y = torch.zeros(1, cfg.keyframe_channels[1], r // 16, r // 16)
    with FlopCounterMode(display=False) as key_flops:
        x_ref = model.keyframe_codec._synthesize(y)
        ref = model.reference(x_ref, u)
    with FlopCounterMode(display=False) as frame_flops:
        model.synthesize(u, [ref])
    with FlopCounterMode(display=False) as restoration_flops:
        if model.restoration is not None:
            model.restoration(x_ref)
    params = sum(p.numel() for p in model.parameters())
    return ModelStats(
        preset=cfg.name,
        resolution=r,
        parameters=params,
        fp16_megabytes=params * 2 / 1e6,
        decode_gflops=frame_flops.get_total_flops() / 1e9,
        keyframe_gflops=key_flops.get_total_flops() / 1e9,
        restoration_gflops=restoration_flops.get_total_flops() / 1e9,
    )
