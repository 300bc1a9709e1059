"""Narrow a trained model to fewer channels per scale: the start of a distilled, faster preset.

Every tensor of the narrow model is cut from the wide one's by keeping, along each axis that
shrinks, the first channels of each scale. The same channels are kept everywhere a scale's
features flow (E_F, IMF_D, the attention's queries, keys and values, D_F), so each kept channel
still meets the weights it was trained with; heads beyond the narrow model's count are dropped
whole. Axes that concatenate several scales or projections (the packed query/key/value, the
fusion of attention output and motion features, D_F's merges) are cut part by part. The result
is not the wide model's function, only a far better start than random weights for distillation
(`train.loop` with ``teacher``).
"""

from __future__ import annotations

import re
from dataclasses import replace

import torch
from torch import Tensor

from codec.nn.model import IMFCodec, build_model


def _parts(name: str, axis: int, wide: tuple[int, ...], narrow: tuple[int, ...]) -> tuple[list[int], list[int]] | None:
    """The (wide, narrow) sizes of the parts that axis ``axis`` of parameter ``name`` concatenates,
    or None where it is one part."""
    if name.endswith((".qkv.weight", ".qkv.bias")) and axis == 0:
        s = int(re.search(r"blocks\.(\d+)\.", name).group(1))
        return [wide[s]] * 3, [narrow[s]] * 3
    if (m := re.fullmatch(r"alignment\.fuse\.(\d+)\.weight", name)) and axis == 1:
        s = int(m.group(1))
        return [wide[s]] * 2, [narrow[s]] * 2
    if (m := re.fullmatch(r"frame_decoder\.merge\.(\d+)\.weight", name)) and axis == 1:
        s = len(wide) - 2 - int(m.group(1))  # merges run coarse to fine: merge 0 is scale 2
        return [wide[s + 1], wide[s]], [narrow[s + 1], narrow[s]]
    return None


def _cut(name: str, t: Tensor, shape: torch.Size, wide: tuple[int, ...], narrow: tuple[int, ...]) -> Tensor:
    for axis, (w, n) in enumerate(zip(t.shape, shape)):
        if w == n:
            continue
        parts = _parts(name, axis, wide, narrow)
        if parts is None:
            t = t.narrow(axis, 0, n)
        else:
            pieces = t.split(parts[0], axis)
            t = torch.cat([p.narrow(axis, 0, k) for p, k in zip(pieces, parts[1])], axis)
        if t.shape[axis] != n:
            raise ValueError(f"{name}: axis {axis} cut to {t.shape[axis]}, the narrow model has {n}")
    return t


def shrink(model: IMFCodec, channels: tuple[int, int, int, int], name: str) -> IMFCodec:
    """A new model of config ``name`` with ``channels`` per scale (fine -> coarse), cut from ``model``."""
    if len(channels) != len(model.cfg.channels) or any(n > w for n, w in zip(channels, model.cfg.channels)):
        raise ValueError(f"channels {channels} must narrow {model.cfg.channels} scale by scale")
    narrow = build_model(replace(model.cfg, name=name, channels=tuple(channels)))
    wide_state = model.state_dict()
    state = {}
    for key, t in narrow.state_dict().items():
        # the entropy coders' tables are empty until built: taken whole (they code the unchanged tokens)
        wide = wide_state[key]
        state[key] = wide if t.numel() == 0 else _cut(key, wide, t.shape, model.cfg.channels, tuple(channels))
    narrow.load_state_dict(state)
    return narrow.eval()
