"""Model weights as safetensors (no pickle): save, load, and the shipped default model.

A weights file holds the state dict (parameters in fp16; buffers as they are: the entropy coder's
integer CDF tables, and float constants such as CompressAI's likelihood bound of 1e-9, which fp16
would round to 0) and, as metadata, the preset name and the full config. ``model_id`` is a hash
of the tensors; bitstreams record it so decoding with another model fails clearly.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from safetensors import safe_open

from codec.nn.config import IMFConfig, config_from_dict
from codec.nn.model import IMFCodec, build_model
from entropy.bitstream import RESTORATION_SINCE, VERSION

SHIPPED_DIR = Path(__file__).parents[1] / "weights"  # package data of codec/: one file per shipped model
DEFAULT_WEIGHTS = SHIPPED_DIR / "default.safetensors"  # the model a plain `imfc encode` uses


class WeightsError(Exception):
    pass


def model_id(model: IMFCodec, version: int = VERSION) -> bytes:
    """8-byte hash of every tensor of the state dict, in name order, as a stream of format ``version``
    names its model: before format 8, which restores, without the restoration's tensors, so a model
    that gains a restoration still decodes older streams."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if version < RESTORATION_SINCE and name.startswith("restoration."):
            continue
        h.update(name.encode())
        h.update(t.detach().contiguous().cpu().numpy().tobytes())
    return h.digest()[:8]


def save_weights(model: IMFCodec, path: Path) -> None:
    """fp16 export. The model is rounded to fp16 first and its CDF tables rebuilt from the rounded
    parameters, so the saved tables match the saved weights exactly."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    model.build_entropy_tables()
    params = {n for n, _ in model.named_parameters()}
    tensors = {k: (v.half() if k in params else v).contiguous() for k, v in model.state_dict().items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"preset": model.cfg.name, "config": json.dumps(asdict(model.cfg))})
    tmp.replace(path)


def read_config(path: Path) -> IMFConfig:
    """The model config stored in a weights file's metadata."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return config_from_dict(json.loads(meta["config"]))
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise WeightsError(f"{path}: not an imfc weights file ({e.__class__.__name__}: {e})") from None


def shipped_models() -> list[str]:
    """Names of the models that ship with the package ("default", "fast")."""
    return sorted(p.stem for p in SHIPPED_DIR.glob("*.safetensors"))


def _shipped(name: str) -> Path:
    return SHIPPED_DIR / f"{name}.safetensors"


def weights_path(name_or_path: str | Path | None) -> Path:
    """A weights file: None is the default model, a shipped model's name is its file (where no file
    of that name exists), anything else a path."""
    if name_or_path is None:
        return _shipped("default")
    path = Path(name_or_path)
    return _shipped(str(name_or_path)) if not path.exists() and str(name_or_path) in shipped_models() else path


def shipped_or_default(preset: str) -> Path:
    """The shipped model a stream's header names, where one ships under that name, else the default
    (whose model check then says which weights the stream needs). Never a path the header spells."""
    return _shipped(preset if preset in shipped_models() else "default")


def load_weights(path: str | Path | None = None, strict: bool = True) -> IMFCodec:
    """Load a weights file, or a shipped model by name (default: the default model), into a fresh
    fp32 model in eval mode. ``strict=False`` is for training only: modules the file lacks keep
    their initialisation."""
    path = weights_path(path)
    if not path.exists():
        raise WeightsError(f"{path}: no such weights file (nor a shipped model: {', '.join(shipped_models())})")
    cfg = read_config(path)
    try:
        state = load_file(str(path))
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise WeightsError(f"{path}: not an imfc weights file ({e.__class__.__name__}: {e})") from None
    model = build_model(cfg)
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    try:
        missing, unexpected = model.load_state_dict(state, strict=strict)
    except RuntimeError as e:
        raise WeightsError(f"{path}: does not fit the model of its config ({str(e).splitlines()[0]})") from None
    if missing or unexpected:
        print(f"{path}: initialised anew: {missing}; ignored: {unexpected}")
    # channels-last weights make oneDNN run every convolution channels-last: synthesis 9-12% faster
    # on this CPU, and the fast model's output the same at 1 and 2 threads (BENCHMARKS.md, "Session 15")
    return model.to(memory_format=torch.channels_last).eval()
