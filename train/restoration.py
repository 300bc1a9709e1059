"""Train the decoder's restoration of AV1 references (codec/nn/restoration.py), then attach it to a model.

A sample is an inter AV1 picture of `train.av1_refs` (any of the folders given, any CRF) and the
clip's own frame ``d`` frames after it, d from 0 to ``--max-distance`` (0, the shipped restoration's,
by default: its own frame; further, the frames it is held for, taught it to soften, which cost VMAF,
MODEL.md "Restoration"). The loss is L1, or ``--loss ms-ssim``: 1 - MS-SSIM + 0.1 L1.

    python -m train.restoration train ~/.cache/imfc/data/faces256 --refs REFS [REFS ...] --out RUN --minutes 20
    python -m train.restoration attach RUN codec/weights/default.safetensors   # in place

A run resumes from RUN/checkpoint.pt. ``attach`` adds the restoration to a weights file; the
model's own tensors are unchanged, so streams of format 7 and older, whose model id does not count
the restoration, still decode with it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from codec.nn.restoration import Restoration
from codec.pipeline import to_8bit
from entropy.bitstream import RESTORATION_SINCE
from train.data import Av1RefCache, ClipCache, Split, to_float
from train.losses import msssim, psnr

SPLIT = Path(__file__).with_name("split.json")
VAL_DISTANCES = (0, 1, 2, 3, 5, 7)
VAL_PICTURES = 10  # per clip and folder: its pictures 1-10 (inter pictures; the first is intra)


class Samples:
    """(picture, frame d after it) pairs over several folders of AV1 references of the same clips."""

    def __init__(self, cache: ClipCache, folders: list[Av1RefCache], max_distance: int):
        self.cache, self.folders = cache, folders
        self.items = [(f, crf, c, j, d) for f, refs in enumerate(folders) for crf in refs.crfs
                      for c, clip in enumerate(cache.clips) for j, i in enumerate(refs.indices[c])
                      for d in range(max_distance + 1) if j > 0 and i + d < len(clip)]  # inter pictures only

    def batch(self, items) -> tuple[torch.Tensor, torch.Tensor]:
        pictures = np.stack([self.folders[f].pictures[c][crf][j] for f, crf, c, j, _ in items])
        frames = np.stack([self.cache.clips[c][self.folders[f].indices[c][j] + d] for f, crf, c, j, d in items])
        return to_float(pictures), to_float(frames)


def validation_items(samples: Samples) -> list[tuple]:
    """Each validation clip's pictures 1-10 of every folder and CRF, at the distances VAL_DISTANCES."""
    return [it for it in samples.items if it[3] <= VAL_PICTURES and it[4] in VAL_DISTANCES]


@torch.no_grad()
def evaluate(net: Restoration | None, samples: Samples, items: list[tuple]) -> dict[str, tuple[float, float]]:
    """PSNR and MS-SSIM of the pictures shown (8-bit) per distance."""
    rows = []
    for i in range(0, len(items), 16):
        part = items[i:i + 16]
        x, y = samples.batch(part)
        shown = to_8bit(net(x) if net is not None else x)
        for k, (p, m) in enumerate(zip(psnr(shown, y), msssim(shown, y))):
            rows.append((f"d{part[k][4]}", p.item(), m.item()))
    keys = [f"d{d}" for d in VAL_DISTANCES]
    return {k: (float(np.mean([p for kk, p, _ in rows if kk == k])), float(np.mean([m for kk, _, m in rows if kk == k])))
            for k in keys if any(kk == k for kk, _, _ in rows)}


def loss_fn(kind: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    l1 = (out - y).abs().mean()
    if kind == "l1":
        return l1
    return 1 - msssim(out.clamp(0, 1), y).mean() + 0.1 * l1


def train(args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    split = Split.load(args.split)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def data(names):
        cache = ClipCache(args.cache, names)
        return Samples(cache, [Av1RefCache(r, names) for r in args.refs], args.max_distance)

    train_set, val_set = data(split.train), data(split.val)
    val_items = validation_items(val_set)
    net = Restoration(args.channels, args.layers)
    opt = torch.optim.Adam(net.parameters(), args.lr)
    rng = np.random.default_rng(args.seed)
    step, log = 0, out / "log.jsonl"
    checkpoint = out / "checkpoint.pt"
    if checkpoint.exists():
        state = torch.load(checkpoint, weights_only=False)
        net.load_state_dict(state["net"])
        opt.load_state_dict(state["opt"])
        rng.bit_generator.state, step = state["rng"], state["step"]
        print(f"resumed at step {step}", flush=True)
    else:
        base = evaluate(None, val_set, val_items)
        print("as decoded: " + " ".join(f"{k} {p:.2f}/{m:.4f}" for k, (p, m) in base.items()), flush=True)
        with log.open("a") as f:
            f.write(json.dumps({"step": 0, "as_decoded": base, "args": {k: str(v) for k, v in vars(args).items()}}) + "\n")
    start = time.time()
    while time.time() - start < args.minutes * 60 and (args.steps is None or step < args.steps):
        x, y = train_set.batch([train_set.items[i] for i in rng.integers(0, len(train_set.items), args.batch_size)])
        if rng.random() < 0.5:  # faces are near symmetric: a mirrored sample is as real as the sample
            x, y = x.flip(3), y.flip(3)
        loss = loss_fn(args.loss, net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if step % args.val_every == 0:
            val = evaluate(net, val_set, val_items)
            print(f"step {step} loss {loss.item():.4f} " + " ".join(f"{k} {p:.2f}/{m:.4f}" for k, (p, m) in val.items()),
                  flush=True)
            with log.open("a") as f:
                f.write(json.dumps({"step": step, "loss": loss.item(), "val": val}) + "\n")
            # written aside, then renamed: a session that ends mid-write leaves the last good pair
            torch.save({"net": net.state_dict(), "opt": opt.state_dict(), "rng": rng.bit_generator.state, "step": step},
                       out / "checkpoint.tmp")
            save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out / "restoration.tmp"),
                      metadata={"step": str(step)})
            (out / "checkpoint.tmp").replace(checkpoint)
            (out / "restoration.tmp").replace(out / "restoration.safetensors")


def attach(args: argparse.Namespace) -> None:
    """RUN's restoration into the weights file ``weights`` (in place, or to --to)."""
    from codec.nn.weights import load_weights, model_id, save_weights
    from codec.nn.model import build_model

    model = load_weights(args.weights)
    core = model_id(model, RESTORATION_SINCE - 1)
    path = Path(args.run) / "restoration.safetensors"
    state = load_file(str(path))
    channels, layers = state["head.weight"].shape[0], sum(k.endswith(".weight") for k in state) - 2
    with_restoration = build_model(replace(model.cfg, restoration=(channels, layers)))
    with_restoration.load_state_dict({**model.state_dict(), **{f"restoration.{k}": v for k, v in state.items()}})
    save_weights(with_restoration, Path(args.to or args.weights))
    if model_id(load_weights(args.to or args.weights), RESTORATION_SINCE - 1) != core:
        sys.exit("attach: the model's own tensors changed")
    print(f"{args.to or args.weights}: restoration {channels}x{layers} attached (model id without it {core.hex()})")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m train.restoration", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train")
    t.add_argument("cache", type=Path, help="clips cached by `imfc prepare-data`")
    t.add_argument("--refs", type=Path, nargs="+", required=True, help="folders written by `train.av1_refs`")
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--minutes", type=float, default=60, help="stop after this long (or --steps)")
    t.add_argument("--steps", type=int, help="stop at this step")
    t.add_argument("--split", type=Path, default=SPLIT, help="the clips' train/validation split")
    t.add_argument("--channels", type=int, default=32)
    t.add_argument("--layers", type=int, default=6)
    t.add_argument("--max-distance", type=int, default=0, help="frames after its picture a target may be")
    t.add_argument("--loss", choices=("l1", "ms-ssim"), default="l1")
    t.add_argument("--batch-size", type=int, default=4)
    t.add_argument("--lr", type=float, default=5e-4)
    t.add_argument("--val-every", type=int, default=1000)
    t.add_argument("--threads", type=int, default=1)
    t.add_argument("--seed", type=int, default=0)
    a = sub.add_parser("attach")
    a.add_argument("run", type=Path)
    a.add_argument("weights", type=Path)
    a.add_argument("--to", type=Path, help="write here instead of in place")
    args = p.parse_args(argv)
    train(args) if args.command == "train" else attach(args)


if __name__ == "__main__":
    main()
