"""A training burst: from shipped weights, on whatever device there is, for a fixed wall-clock
budget, in the AV1-reference regime, from a training pack (`train.pack`); the new weights and
the run's logs go to one folder. Made for an accelerator lent for minutes (CUDA with bf16
autocast, `train.loop`), but it runs anywhere:

    python -m train.burst --pack .pack --minutes 8 --out burst/

writes burst/default.safetensors (fp16, coder tables built), burst/run/ (config, train.csv,
val.csv with the AV1 validation, checkpoint) and burst/burst.json (what ran, for how long).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from train.config import PRESETS, TrainConfig
from train.pack import unpack

SHIPPED = Path(__file__).resolve().parents[1] / "codec" / "weights" / "default.safetensors"
# The regime of MODEL.md's stages 10-11, from shipped weights: AV1 references 1-25 frames back
# (distance d drawn with probability proportional to 1/d), no keyframe codec in the loss, a small
# token rate weight, camera motion on 30% of samples.
BURST = replace(PRESETS["default"], resolution=256, steps=1_000_000, warmup=50, rate_start=0, rate_ramp=1,
                token_rate_start=0, lmbda_token=0.1, lr=1e-4, camera_motion=0.3, av1_distance=25, av1_near_power=1.0,
                val_every=1_000_000, ckpt_every=500, log_every=20)


def burst_config(pack_dir: Path, out: Path, minutes: float, init: Path, batch_size: int, preset: str) -> TrainConfig:
    base = BURST if preset == "default" else replace(PRESETS[preset], av1_distance=4, steps=1_000_000,
                                                      val_every=1_000_000)
    threads = max(1, torch.get_num_threads())
    return replace(base, data=str(out / "data"), av1_refs=str(out / "av1refs"), split=str(out / "split.json"),
                   out=str(out / "run"), init=str(init), batch_size=batch_size or base.batch_size,
                   max_minutes=minutes, threads=threads)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.burst", description=__doc__.split("\n\n")[0])
    parser.add_argument("--pack", type=Path, default=Path(".pack"), help="a training pack (python -m train.pack)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the weights and the run (new or empty)")
    parser.add_argument("--minutes", type=float, default=8.0, help="wall clock for the whole command (default %(default)s)")
    parser.add_argument("--init", type=Path, default=SHIPPED, help="weights to start from (default: the shipped model)")
    parser.add_argument("--batch-size", type=int, default=16, help="samples per step (default %(default)s)")
    parser.add_argument("--preset", default="default", choices=sorted(PRESETS), help="training preset (tests: tiny)")
    args = parser.parse_args(argv)
    start = time.monotonic()
    out = args.out
    if out.exists() and any(out.iterdir()):
        parser.error(f"{out}: exists and is not empty")
    if not (args.pack / "manifest.json").exists():
        parser.error(f"{args.pack}: not a training pack (no manifest.json); make one with python -m train.pack")
    out.mkdir(parents=True, exist_ok=True)
    split = unpack(args.pack, out / "data", out / "av1refs")
    split.save(out / "split.json")
    unpacked = time.monotonic() - start
    # what is left of the budget, less a margin for the last validation and the export
    minutes = max(1e-6, args.minutes - unpacked / 60 - 0.75)  # at least one step runs, whatever is left
    cfg = burst_config(args.pack, out, minutes, args.init, args.batch_size, args.preset)
    from train.loop import train  # torch's training stack only once the pack is known to be good

    state = train(cfg)
    shutil.copy(out / "run" / "weights.safetensors", out / "default.safetensors")
    shutil.rmtree(out / "data")  # the pack's frames: not ours to keep
    shutil.rmtree(out / "av1refs")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    info = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "steps": state.step,
            "seconds": round(time.monotonic() - start, 1), "unpack_seconds": round(unpacked, 1),
            "init": str(args.init), "config": asdict(cfg)}
    (out / "burst.json").write_text(json.dumps(info, indent=1) + "\n")
    print(f"{out / 'default.safetensors'}: {state.step} steps on {info['device']} in {info['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
