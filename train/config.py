"""Training configuration: a frozen dataclass, named presets, and command-line overrides."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields, replace
from pathlib import Path


@dataclass(frozen=True)
class TrainConfig:
    model: str = "default"  # model preset (codec/nn/config.py)
    data: str = "~/.cache/imfc/data/faces256"  # cache made by `imfc prepare-data`
    split: str = "train/split.json"
    out: str = "~/.cache/imfc/runs/default"
    init: str = ""  # weights (.safetensors) to start from, e.g. a lower-resolution stage
    resolution: int = 128  # training crops; the model is convolutional
    batch_size: int = 8
    steps: int = 20000
    max_minutes: float = 0.0  # wall clock after which training stops as if at its last step; 0 = none
    lr: float = 4e-4
    aux_lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup: int = 200
    lmbda_token: float = 0.5  # weight of the frame token's bits per pixel
    lmbda_key: float = 0.05  # weight of the keyframe's bits per pixel
    rate_start: int = 1000  # reconstruction only before this step, then the keyframe rate weight ramps in
    rate_ramp: int = 1000
    token_rate_start: int = 4000  # the token rate later: first the tokens must learn to carry motion
    msssim_weight: float = 0.3  # MS-SSIM share of the distortion, ramped in with the rate weights
    camera_motion: float = 0.0  # share of samples whose current frame is also moved by a random similarity
    near_share: float = 0.0  # share of samples whose current frame is at most near_distance after the reference
    near_distance: int = 25
    key_step_max: float = 1.0  # keyframes train at steps of KEYFRAME_STEPS up to this, drawn per sample
    # AV1-reference regime (train/av1_refs.py): references are AV1-decoded pictures from this folder,
    # with no learned keyframe; "" = the learned keyframe codec, as before
    av1_refs: str = ""
    av1_distance: int = 25  # current frames 1..av1_distance after the newest AV1 reference
    av1_near_power: float = 0.0  # draw that distance d with probability proportional to d ** -power (0: uniform)
    hold_softmin: float = 0.0  # > 0: the frame's distortion is a soft minimum of synthesis and holding (losses.rd_loss)
    av1_val_crf: int = 0  # the CRF of the AV1 validation; 0 = the middle of those precomputed
    # distillation (the fast preset, MODEL.md): the frame also learns the teacher's synthesis of the
    # same sample, L1 weighted by distill_weight; modules named in freeze (comma-separated prefixes
    # of parameter names) keep their weights, e.g. E_T and the token priors, so the tokens stay the teacher's
    teacher: str = ""
    distill_weight: float = 1.0
    freeze: str = ""
    gan_weight: float = 0.0  # weight of the patch discriminator's hinge loss on the frame; 0 = no discriminator
    gan_start: int = 0  # the discriminator trains from step 0, the frame feels it from this step
    d_lr: float = 1e-4
    grad_clip: float = 1.0
    seed: int = 0
    threads: int = 2
    log_every: int = 20
    val_every: int = 500
    ckpt_every: int = 250

    @property
    def out_dir(self) -> Path:
        return Path(self.out).expanduser()

    @property
    def data_dir(self) -> Path:
        return Path(self.data).expanduser()

    @property
    def av1_refs_dir(self) -> Path | None:
        return Path(self.av1_refs).expanduser() if self.av1_refs else None


PRESETS: dict[str, TrainConfig] = {
    "default": TrainConfig(),
    # tests and smoke runs: tiny model, a few steps
    "tiny": TrainConfig(model="tiny", resolution=64, batch_size=2, steps=4, warmup=1, rate_start=2, rate_ramp=1,
                        token_rate_start=2,
                        log_every=1, val_every=2, ckpt_every=2, out="~/.cache/imfc/runs/tiny"),
}


def parse_config(argv: list[str] | None = None, prog: str = "imfc train") -> TrainConfig:
    """`PRESET [--field value ...]`: a preset with any field overridden."""
    parser = argparse.ArgumentParser(prog=prog, description="Train an imfc model.")
    parser.add_argument("preset", choices=sorted(PRESETS))
    for f in fields(TrainConfig):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=None, dest=f.name)
    args = parser.parse_args(argv)
    overrides = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name) is not None}
    return replace(PRESETS[args.preset], **overrides)
