"""Model configuration: one frozen dataclass and the named presets.

Scales follow the IMF paper: four feature scales at strides 4, 8, 16, 32 of the
frame (64, 32, 16, 8 pixels for a 256x256 frame). Index 0 is the finest.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

STRIDES = (4, 8, 16, 32)


@dataclass(frozen=True)
class IMFConfig:
    name: str
    resolution: int = 256  # square frames; the model is convolutional but the learned constant is sized for this
    channels: tuple[int, int, int, int] = (32, 64, 96, 128)  # dense/motion features per scale, fine -> coarse
    token_channels: tuple[int, int, int, int] = (16, 32, 48, 64)  # E_T trunk, fine -> coarse
    token_dim: int = 32  # d_m, the per-frame latent token
    style_dim: int = 128  # w, the mapped token that modulates IMF_D
    head_dim: int = 16
    window: int = 7  # local attention window (in feature pixels) at the finest scale
    locality: float = 4.0  # initial locality bias: logits -= locality * squared distance (feature pixels);
    # 4.0 puts ~93% of each query's attention on its own position: a fresh model is a near-identity
    # warp (46.7 dB on a real frame), where 1.0 blurs it (25 dB) and trains to a blurry model
    extra_tokens: int = 4  # learned key/value tokens a query without a good match can attend to
    transformer_depth: int = 1
    ff_mult: int = 2
    decoder_channels: int = 16  # frame decoder width at 1/2 resolution
    keyframe_channels: tuple[int, int] = (64, 96)  # (N, M) of the keyframe transform codec
    max_references: int = 2  # reference bank size
    pixel_warp: str = "blend"  # finest scale's reference pixels: "blend" 4x4 blocks by attention, or "flow":
    # warp them by the attention's mean offset (sharper; see codec/nn/layers/attention.py)
    hold_mask: bool = False  # D_F blends its output with the newest reference picture by a mask it predicts,
    # so a frame that barely moved can be held exactly where synthesis would soften it (MODEL.md, stage 11)
    restoration: tuple[int, int] | None = None  # (channels, layers) of the decoder's restoration of AV1
    # references before they are shown (codec/nn/restoration.py; format 8), or None: shown as decoded

    def __post_init__(self) -> None:
        if self.pixel_warp not in ("blend", "flow"):
            raise ValueError(f"pixel_warp must be 'blend' or 'flow', got {self.pixel_warp!r}")
        if self.resolution % STRIDES[-1]:
            raise ValueError(f"resolution must be a multiple of {STRIDES[-1]}, got {self.resolution}")
        for c in self.channels:
            if c % self.head_dim:
                raise ValueError(f"channels {self.channels} must be multiples of head_dim {self.head_dim}")


def config_from_dict(d: dict) -> IMFConfig:
    """The inverse of ``dataclasses.asdict`` (JSON turns the tuples into lists)."""
    return IMFConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


PRESETS: dict[str, IMFConfig] = {
    # tests: forward+backward in well under a second
    "tiny": IMFConfig(
        name="tiny",
        resolution=64,
        channels=(16, 16, 32, 32),
        token_channels=(8, 8, 16, 16),
        token_dim=8,
        style_dim=32,
        head_dim=8,
        window=3,
        extra_tokens=2,
        ff_mult=1,
        decoder_channels=8,
        keyframe_channels=(16, 24),
    ),
    # the shipped model; its stages 1-7 trained with pixel_warp="blend", stage 8 with "flow" (MODEL.md)
    "default": IMFConfig(name="default", pixel_warp="flow", restoration=(32, 6)),
    # the default narrowed to half the finest scale's channels and distilled from it (MODEL.md,
    # "The fast preset"): synthesis about a third cheaper, the same E_T and tokens
    "fast": IMFConfig(name="fast", pixel_warp="flow", channels=(16, 32, 64, 96), restoration=(32, 6)),
}


def get_config(name: str, **overrides) -> IMFConfig:
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return replace(PRESETS[name], **overrides)
