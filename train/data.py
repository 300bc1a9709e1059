"""Training data: cached clips (see train/prepare.py), a by-clip train/validation split, and
(reference, previous, current) frame triplets sampled within one clip with consistent augmentation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class Split:
    train: tuple[str, ...]
    val: tuple[str, ...]

    @staticmethod
    def load(path: Path) -> "Split":
        d = json.loads(Path(path).read_text())
        return Split(tuple(d["train"]), tuple(d["val"]))

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps({"train": list(self.train), "val": list(self.val)}, indent=1) + "\n")


def make_split(names: list[str], every: int = 12, offset: int = 5) -> Split:
    """Deterministic by-clip split: every ``every``-th clip of the sorted names is held out."""
    names = sorted(names)
    val = tuple(n for i, n in enumerate(names) if i % every == offset)
    return Split(tuple(n for n in names if n not in val), val)


class ClipCache:
    """Memory-mapped uint8 clips (T, S, S, 3) named by clip."""

    def __init__(self, root: Path, names: tuple[str, ...]):
        missing = [n for n in names if not (Path(root) / f"{n}.npy").exists()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} clips missing from {root} (first: {missing[0]}); "
                                    "run `imfc prepare-data` first")
        self.names = names
        self.clips = [np.load(Path(root) / f"{n}.npy", mmap_mode="r") for n in names]

    def __len__(self) -> int:
        return len(self.clips)

    @property
    def weights(self) -> np.ndarray:
        """How often samplers draw each clip: in proportion to the square root of its length."""
        lengths = np.sqrt(np.array([len(c) for c in self.clips], dtype=np.float64))
        return lengths / lengths.sum()


class SeededSampler:
    """A sampler's random stream, saved and restored with training checkpoints."""

    rng: np.random.Generator

    def state(self) -> dict:
        return self.rng.bit_generator.state

    def load_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state


def to_float(frames: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float().div(255)


def augment(frames: Tensor, rng: np.random.Generator, resolution: int) -> Tensor:
    """The same flip, scale/shift crop and colour jitter for all frames of a triplet (T, 3, S, S)."""
    s = frames.shape[-1]
    if rng.random() < 0.5:
        frames = frames.flip(-1)
    crop = int(s * rng.uniform(0.85, 1.0))
    top, left = rng.integers(0, s - crop + 1, size=2)
    frames = frames[..., top:top + crop, left:left + crop]
    frames = F.interpolate(frames, size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False)
    brightness, contrast, saturation = rng.uniform(-0.1, 0.1, size=3)
    mean = frames.mean((1, 2, 3), keepdim=True)
    gray = frames.mean(1, keepdim=True)
    frames = gray + (frames - gray) * (1 + saturation)
    frames = mean + (frames - mean) * (1 + contrast) + brightness
    return frames.clamp(0, 1)


def camera_motion(frames: Tensor, rng: np.random.Generator, shift: float = 0.1, scale: float = 0.1,
                  degrees: float = 8.0, still: int = 1) -> Tensor:
    """Move the previous and current frames of a triplet (3, 3, R, R) by one random similarity
    transform (as if the camera had moved), leaving the reference as it is (the first ``still``
    frames: a bank of references stays together).

    Synthetic motion whose every pixel follows one known map: the easiest motion there is for the
    token to describe and for the alignment to follow, mixed into real pairs to teach both."""
    angle = np.deg2rad(rng.uniform(-degrees, degrees))
    s = rng.uniform(1 - scale, 1 + scale)
    tx, ty = rng.uniform(-shift, shift, size=2) * 2  # grid units: the frame spans [-1, 1]
    theta = torch.tensor([[s * np.cos(angle), -s * np.sin(angle), tx],
                          [s * np.sin(angle), s * np.cos(angle), ty]], dtype=frames.dtype)
    moving = frames[still:]
    grid = F.affine_grid(theta.expand(len(moving), 2, 3), list(moving.shape), align_corners=False)
    moved = F.grid_sample(moving, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    return torch.cat([frames[:still], moved])


def resize(frames: Tensor, resolution: int) -> Tensor:
    if frames.shape[-1] == resolution:
        return frames
    return F.interpolate(frames, size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False)


class TripletSampler(SeededSampler):
    """Random (reference, previous, current) triplets: a random clip (weighted by sqrt of its length),
    a random reference frame and a current frame at a random distance; previous = current - 1.
    With probability ``near_share`` the current frame is at most ``near_distance`` frames after the
    reference, as most frames are after their keyframe when coding; with probability ``camera_motion``,
    previous and current are also moved by `camera_motion`."""

    def __init__(self, cache: ClipCache, resolution: int, batch_size: int, seed: int, camera_motion: float = 0.0,
                 near_share: float = 0.0, near_distance: int = 25):
        self.cache = cache
        self.resolution = resolution
        self.batch_size = batch_size
        self.camera_motion = camera_motion
        self.near_share = near_share
        self.near_distance = near_distance
        self.rng = np.random.default_rng(seed)
        self.weights = cache.weights

    def sample(self) -> Tensor:
        """-> (3, B, 3, R, R): reference, previous, current frames in [0, 1]."""
        out = []
        for _ in range(self.batch_size):
            clip = self.cache.clips[self.rng.choice(len(self.cache), p=self.weights)]
            ref, cur = self.pick(len(clip))
            prev = max(cur - 1, 0)
            frames = augment(to_float(clip[[ref, prev, cur]]), self.rng, self.resolution)
            # no draw when off, so runs without it keep their random streams
            if self.camera_motion > 0 and self.rng.random() < self.camera_motion:
                frames = camera_motion(frames, self.rng)
            out.append(frames)
        return torch.stack(out, 1)

    def pick(self, length: int) -> tuple[int, int]:
        """(reference, current) frame indices in a clip of ``length`` frames."""
        # no extra draw when near_share is 0, so runs without it keep their random streams
        if self.near_share > 0 and self.rng.random() < self.near_share:
            distance = int(self.rng.integers(min(1, length - 1), min(self.near_distance, length - 1) + 1))
            ref = int(self.rng.integers(0, length - distance))
            return ref, ref + distance
        ref, cur = self.rng.integers(0, length, size=2)
        return int(ref), int(cur)


def _first_frame_triplets(cache: ClipCache, resolution: int, currents) -> Tensor:
    """Per clip, reference = first frame and current at each index ``currents(len(clip))`` gives."""
    return torch.stack([resize(to_float(clip[[0, max(cur - 1, 0), cur]]), resolution)
                        for clip in cache.clips for cur in currents(len(clip))], 1)


def validation_triplets(cache: ClipCache, resolution: int, per_clip: int = 4) -> Tensor:
    """A fixed set: per clip, reference = first frame, current at evenly spaced later frames."""
    return _first_frame_triplets(cache, resolution,
                                 lambda n: np.linspace(n // per_clip, n - 1, per_clip).astype(int))


def near_validation_triplets(cache: ClipCache, resolution: int, distances: tuple[int, ...] = (2, 8, 25)) -> Tensor:
    """A fixed set of frames close to their reference (the first frame), as after a keyframe."""
    return _first_frame_triplets(cache, resolution, lambda n: [min(d, n - 1) for d in distances])


# -- AV1-decoded references (train/av1_refs.py) ------------------------------------------------------


class Av1RefCache:
    """The AV1-decoded references `train.av1_refs` precomputed for the clips of a ClipCache: per
    clip and CRF, memory-mapped pictures (N, S, S, 3) uint8 and the clip frame each one is."""

    def __init__(self, root: Path, names: tuple[str, ...], crfs: tuple[int, ...] | None = None):
        root = Path(root)
        if crfs is None:  # the CRFs that every clip has
            have = [{int(p.stem.rsplit("_crf", 1)[1]) for p in root.glob(f"{n}_crf*.json")} for n in names]
            crfs = tuple(sorted(set.intersection(*have))) if have else ()
        if not crfs:
            raise FileNotFoundError(f"no AV1 references common to all {len(names)} clips in {root}; "
                                    "run `python -m train.av1_refs` first")
        missing = [f"{n}_crf{c}" for n in names for c in crfs if not (root / f"{n}_crf{c}.npy").exists()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} AV1 reference files missing from {root} (first: {missing[0]}); "
                                    "run `python -m train.av1_refs` first")
        self.names = names
        self.crfs = crfs
        self.pictures = [{c: np.load(root / f"{n}_crf{c}.npy", mmap_mode="r") for c in crfs} for n in names]
        metas = [json.loads((root / f"{n}_crf{crfs[0]}.json").read_text()) for n in names]
        self.indices = [np.array(m["indices"]) for m in metas]
        self.every = metas[0]["every"] if metas else 0


class Av1TripletSampler(SeededSampler):
    """Random samples of the AV1-reference regime: a clip (weighted by sqrt of its length), a CRF
    and one of its AV1-decoded pictures as the newest reference; the current frame 1 to
    ``max_distance`` frames after it, previous = current - 1 (the source frames); and the AV1
    picture before the newest (K frames earlier) as the older reference of a bank of two. The first
    picture of a clip has none: the newest stands in, a bank of two equal references being one
    reference to the attention. One augmentation for all four frames; camera motion, if drawn, moves
    previous and current only. ``near_power`` p draws the distance d with probability proportional
    to d ** -p instead of uniformly.

    ``sample()`` -> (4, B, 3, R, R): newest reference, previous, current, older reference (the
    first three in the order of `TripletSampler`'s triplets)."""

    def __init__(self, cache: ClipCache, refs: Av1RefCache, resolution: int, batch_size: int, seed: int,
                 camera_motion: float = 0.0, max_distance: int = 25, near_power: float = 0.0):
        if refs.names != cache.names:
            raise ValueError("the AV1 references must be of the cache's clips, in its order")
        self.cache = cache
        self.refs = refs
        self.resolution = resolution
        self.batch_size = batch_size
        self.camera_motion = camera_motion
        self.max_distance = max_distance
        self.near_power = near_power
        self.rng = np.random.default_rng(seed)
        self.weights = cache.weights

    def sample(self) -> Tensor:
        out = []
        for _ in range(self.batch_size):
            c = int(self.rng.choice(len(self.cache), p=self.weights))
            clip = self.cache.clips[c]
            pictures = self.refs.pictures[c][self.refs.crfs[int(self.rng.integers(len(self.refs.crfs)))]]
            j, cur = self.pick(self.refs.indices[c], len(clip))
            refs = to_float(pictures[[j, max(j - 1, 0)]])
            frames = augment(torch.cat([refs, to_float(clip[[cur - 1, cur]])]), self.rng, self.resolution)
            if self.camera_motion > 0 and self.rng.random() < self.camera_motion:
                frames = camera_motion(frames, self.rng, still=2)
            out.append(frames[[0, 2, 3, 1]])
        return torch.stack(out, 1)

    def pick(self, indices: np.ndarray, length: int) -> tuple[int, int]:
        """(which AV1 picture is the newest reference, current frame index) in a clip of ``length``."""
        usable = np.flatnonzero(indices + 1 < length)
        j = int(usable[self.rng.integers(len(usable))])
        reach = min(self.max_distance, length - 1 - int(indices[j]))
        if self.near_power:  # the frames just after a reference are most of what the encoder codes
            p = np.arange(1, reach + 1, dtype=float) ** -self.near_power
            distance = 1 + int(self.rng.choice(reach, p=p / p.sum()))
        else:  # uniform (kept separate: resumed runs draw the same sequence as before)
            distance = int(self.rng.integers(1, reach + 1))
        return j, int(indices[j]) + distance


def av1_validation_triplets(cache: ClipCache, refs: Av1RefCache, resolution: int, crf: int,
                            distances: tuple[int, ...] = (1, 4, 12, 25)) -> Tensor:
    """A fixed set for the AV1-reference regime: per clip, the AV1 picture (at ``crf``) nearest the
    clip's middle that has an older one before it and room for the farthest distance after it, and
    the current frame at each distance after it -> (4, clips * len(distances), 3, R, R), in
    `Av1TripletSampler`'s order, clip by clip, distances in the order given."""
    if crf not in refs.crfs:
        raise ValueError(f"no AV1 references at CRF {crf} (precomputed: {refs.crfs})")
    out = []
    for c, clip in enumerate(cache.clips):
        indices, n = refs.indices[c], len(clip)
        fits = np.flatnonzero((indices + max(distances) < n) & (np.arange(len(indices)) >= 1))
        if not len(fits):  # a short clip: the latest picture that leaves room, or the first
            fits = np.flatnonzero(indices + max(distances) < n)[-1:] if (indices + max(distances) < n).any() else [0]
        j = int(min(fits, key=lambda k: abs(int(indices[k]) - n // 2)))
        pictures = refs.pictures[c][crf]
        r = int(indices[j])
        for d in distances:
            cur = max(min(r + d, n - 1), 1)
            frames = torch.cat([to_float(pictures[[j]]), to_float(clip[[cur - 1, cur]]),
                                to_float(pictures[[max(j - 1, 0)]])])
            out.append(resize(frames, resolution))
    return torch.stack(out, 1)
