"""imfc decode IN.imfc -o OUT: decode to .mp4/.mkv/.mov (H.264 near-lossless), .y4m (lossless) or a folder of PNGs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from entropy.bitstream import DEFAULT_MAX_FRAMES, read_file
from tools.errors import run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="imfc decode", description=__doc__)
    parser.add_argument("input", type=Path, help="an .imfc bitstream")
    parser.add_argument("-o", "--output", type=Path, required=True,
                        help="output video (.mp4, .mkv, .mov, .y4m) or a folder for PNG frames")
    parser.add_argument("--weights", type=Path, default=None, help="model weights: a file, or a shipped model by name "
                        "(default: the shipped model the stream names, default or fast)")
    parser.add_argument("--upscale", action="store_true", help="resize back to the size of the source crop")
    parser.add_argument("--max-frames", type=int, default=DEFAULT_MAX_FRAMES,
                        help=f"refuse streams of more frames than this (default {DEFAULT_MAX_FRAMES}, "
                             "20 minutes at 25 fps), before decoding any")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for the model (default: torch's)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    def action() -> int:
        # The whole stream is parsed and checked first, in plain Python: a stream that lies is
        # refused in well under a second, before torch and the model are loaded.
        stream = read_file(args.input, args.max_frames)
        import torch

        from codec.files import decode_stream
        from codec.nn.weights import load_weights, shipped_or_default
        if args.threads is not None:
            torch.set_num_threads(max(1, args.threads))
        header = stream[0]
        model = load_weights(args.weights if args.weights is not None else shipped_or_default(header.preset))
        s = decode_stream(args.input, stream, args.output, model, upscale=args.upscale, progress=not args.quiet)
        print(f"{args.output}: {s.frames} frames, {s.width}x{s.height}, {s.fps:.1f} fps")
        return 0

    return run("imfc decode", action)


if __name__ == "__main__":
    sys.exit(main())
