"""imfc stats: parameter count, fp16 weight size and per-frame decode FLOPs of each preset."""

from __future__ import annotations

import argparse
import sys

from codec.nn.config import PRESETS, get_config
from codec.nn.model import build_model
from evaluation.stats import model_stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="imfc stats", description=__doc__)
    # checked by hand: this Python's argparse tests an empty nargs="*" list against choices and fails
    parser.add_argument("presets", nargs="*", metavar="PRESET", help=f"one of {sorted(PRESETS)} (default: all)")
    args = parser.parse_args(argv)
    unknown = [p for p in args.presets if p not in PRESETS]
    if unknown:
        parser.error(f"unknown preset {unknown[0]!r}; choose from {sorted(PRESETS)}")
    print(f"{'preset':<8} {'resolution':>10} {'params':>10} {'fp16 MB':>8} {'GFLOPs/frame':>13} {'GFLOPs/keyframe':>16} "
          f"{'GFLOPs/restored reference':>26}")
    for name in args.presets or sorted(PRESETS):
        s = model_stats(build_model(get_config(name)))
        print(f"{s.preset:<8} {s.resolution:>10} {s.parameters:>10,} {s.fp16_megabytes:>8.2f} "
              f"{s.decode_gflops:>13.3f} {s.keyframe_gflops:>16.3f} {s.restoration_gflops:>26.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
