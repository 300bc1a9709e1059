"""imfc decode IN.imfc -o OUT: decode to .mp4/.mkv/.mov (H.264 near-lossless), .y4m (lossless) or a folder of PNGs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from codec.files import decode_file
from codec.nn.weights import load_weights
from tools.errors import run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="imfc decode", description=__doc__)
    parser.add_argument("input", type=Path, help="an .imfc bitstream")
    parser.add_argument("-o", "--output", type=Path, required=True,
                        help="output video (.mp4, .mkv, .mov, .y4m) or a folder for PNG frames")
    parser.add_argument("--weights", type=Path, default=None, help="model weights (default: the shipped model)")
    parser.add_argument("--upscale", action="store_true", help="resize back to the size of the source crop")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for the model (default: torch's)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(max(1, args.threads))

    def action() -> int:
        model = load_weights(args.weights)
        s = decode_file(args.input, args.output, model, upscale=args.upscale, progress=not args.quiet)
        print(f"{args.output}: {s.frames} frames, {s.width}x{s.height}, {s.fps:.1f} fps")
        return 0

    return run("imfc decode", action)


if __name__ == "__main__":
    sys.exit(main())
