"""imfc export RUN_DIR -o WEIGHTS: a run's checkpoint as fp16 safetensors (+ --curve PNG)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from train.export import export_checkpoint, plot_curves


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="imfc export", description=__doc__)
    parser.add_argument("run", type=Path, help="training run folder (holds checkpoint.pt)")
    parser.add_argument("-o", "--output", type=Path, required=True)
    parser.add_argument("--curve", type=Path, default=None, help="also plot the training curve to this PNG")
    args = parser.parse_args(argv)
    if not (args.run / "checkpoint.pt").exists():
        print(f"imfc export: {args.run}: no checkpoint.pt", file=sys.stderr)
        return 1
    step = export_checkpoint(args.run, args.output)
    print(f"{args.output}: weights at step {step}")
    if args.curve:
        plot_curves(args.run, args.curve)
        print(f"{args.curve}: training curve")
    return 0


if __name__ == "__main__":
    sys.exit(main())
