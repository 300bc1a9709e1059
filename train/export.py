"""Export a training run's checkpoint as shipped weights, and plot its training curve."""

from __future__ import annotations

import csv
from pathlib import Path

import torch

from codec.nn.config import IMFConfig, config_from_dict, get_config
from codec.nn.model import build_model
from codec.nn.weights import read_config, save_weights


def checkpoint_model_config(ckpt: dict) -> IMFConfig:
    """The model a checkpoint's parameters belong to. A run started from ``--init`` weights trains
    that file's model (e.g. one switched by train.surgery), not its preset's; checkpoints written
    before they recorded it fall back to the init file's config."""
    if "model_config" in ckpt:
        return config_from_dict(ckpt["model_config"])
    init = ckpt["config"].get("init")
    return read_config(Path(init).expanduser()) if init else get_config(ckpt["config"]["model"])


def export_checkpoint(run_dir: Path, out: Path) -> int:
    """checkpoint.pt of a run -> fp16 safetensors with coder tables. Returns the checkpoint's step."""
    ckpt = torch.load(Path(run_dir) / "checkpoint.pt", weights_only=True)
    model = build_model(checkpoint_model_config(ckpt))
    model.load_state_dict(ckpt["model"])
    save_weights(model, out)
    return ckpt["step"]


def _read(path: Path) -> dict[str, list[float]]:
    with path.open() as f:
        rows = list(csv.DictReader(f))
    return {k: [float(r[k]) for r in rows] for k in rows[0]} if rows else {}


def plot_curves(run_dir: Path, out: Path, smooth: int = 10) -> None:
    """Training PSNR and rate (moving average) with validation PSNR / MS-SSIM, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = _read(Path(run_dir) / "train.csv")
    val = _read(Path(run_dir) / "val.csv") if (Path(run_dir) / "val.csv").exists() else {}

    def avg(v: list[float]) -> list[float]:
        return [sum(v[max(0, i - smooth + 1):i + 1]) / len(v[max(0, i - smooth + 1):i + 1]) for i in range(len(v))]

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].plot(train["step"], avg(train["psnr"]), label="train frame PSNR")
    axes[0].plot(train["step"], avg(train["key_psnr"]), label="train keyframe PSNR")
    if val:
        axes[0].plot(val["step"], val["psnr"], "o-", label="val frame PSNR")
        axes[0].plot(val["step"], val["copy_ref_psnr"], "--", label="val: copy the reference")
    axes[0].set_ylabel("dB")
    axes[1].plot(train["step"], avg(train["bpp_key"]), label="keyframe bpp")
    axes[1].set_yscale("log")
    ax = axes[1].twinx()
    ax.plot(train["step"], [b * train_pixels(run_dir) for b in avg(train["bpp_token"])], color="C1", label="token bits/frame")
    ax.set_ylabel("token bits per frame")
    axes[1].set_ylabel("bpp")
    if val:
        axes[2].plot(val["step"], val["msssim"], "o-", label="val MS-SSIM")
    axes[2].plot(train["step"], avg(train["msssim"]), label="train MS-SSIM")
    for a in axes:
        a.set_xlabel("step")
        a.legend(loc="lower right")
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)


def train_pixels(run_dir: Path) -> int:
    import json

    r = json.loads((Path(run_dir) / "config.json").read_text())["resolution"]
    return r * r
