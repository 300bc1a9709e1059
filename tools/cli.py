"""The `imfc` command: one subcommand per tool module, each exposing main(argv)."""

from __future__ import annotations

import importlib
import sys
import warnings

SUBCOMMANDS = {
    "encode": ("tools.encode", "compress a video file to .imfc"),
    "decode": ("tools.decode", "decode .imfc to a video file or PNG frames"),
    "info": ("tools.info", "header and per-chunk statistics of an .imfc file"),
    "prepare-data": ("tools.prepare_data", "crop clips around the face and cache them for training"),
    "train": ("tools.train", "train a model"),
    "export": ("tools.export", "export a training run's checkpoint as weights (+ training curve)"),
    "stats": ("tools.stats", "parameters, weight size and decode FLOPs of the model presets"),
    "call": ("tools.call", "a real-time call over WebRTC: `call recv --out FILE`, then `call send SOURCE`"),
    "eval": ("tools.eval", "rate-distortion of imfc against x264, x265 and SVT-AV1 (CSV, plots, BD-rates)"),
    "bench": ("tools.bench", "encode/decode speed, latency and memory of imfc, with libx264 as a ratio"),
}


def usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    lines = [f"  {name:<{width}}  {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    return "usage: imfc COMMAND [ARGS...]  (imfc COMMAND --help for its options)\n\ncommands:\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if not argv or argv[0] not in SUBCOMMANDS:
        print(usage(), file=sys.stderr)
        if argv:
            print(f"imfc: unknown command {argv[0]!r}", file=sys.stderr)
        return 2
    # compressai scripts a helper at import time, which torch now reports as deprecated
    warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
    module = importlib.import_module(SUBCOMMANDS[argv[0]][0])
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
