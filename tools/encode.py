"""imfc encode VIDEO -o OUT.imfc: compress a video file with the imfc model."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from codec.files import encode_file
from codec.nn.keyframe_codec import KEYFRAME_STEPS
from codec.pipeline import KEYFRAME_CODECS, EncoderSettings
from codec.video_io import Box
from codec.nn.weights import load_weights
from tools.errors import run


# imfc encode's default: AV1 references at 8 kbps. On the 12 held-out clips (BENCHMARKS.md, "AV1
# references") 7.7 kbps for MS-SSIM 0.836 and VMAF 32.1; the learned defaults 11.3 for 0.851 and 17.6.
DEFAULT_KBPS = 8.0


def parse_crop(text: str) -> Box:
    try:
        left, top, size = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError("crop must be LEFT,TOP,SIZE in source pixels") from None
    if size <= 0:
        raise argparse.ArgumentTypeError("crop size must be positive")
    return Box(left, top, size)


def main(argv: list[str] | None = None) -> int:
    defaults = EncoderSettings()
    parser = argparse.ArgumentParser(prog="imfc encode", description=__doc__)
    parser.add_argument("input", type=Path, help="any video file PyAV can open (mp4, mkv, webm, y4m, mov...)")
    parser.add_argument("-o", "--output", type=Path, required=True, help="the .imfc bitstream to write")
    parser.add_argument("--weights", type=Path, default=None, help="model weights: a file, or a shipped model by name, default or fast (default: default)")
    parser.add_argument("--quality-floor", type=float, default=defaults.quality_floor,
                        help="PSNR (dB) below which a frame is sent as a new keyframe (default %(default)s)")
    parser.add_argument("--max-keyframe-interval", type=int, default=defaults.max_keyframe_interval,
                        help="frames between forced keyframes (default %(default)s)")
    parser.add_argument("--max-kbps", type=float, default=defaults.max_kbps,
                        help="rate cap: a keyframe the floor asks for waits until the last 2 s stay under "
                             "this rate (default %(default)s: no cap)")
    parser.add_argument("--keyframe-step", type=float, default=defaults.keyframe_step, choices=KEYFRAME_STEPS,
                        help="quantization step of keyframe images: coarser is cheaper and blurrier (default %(default)s)")
    parser.add_argument("--no-repeat", action="store_true",
                        help="synthesize every token frame, even where repeating the newest keyframe's picture is closer")
    parser.add_argument("--keyframe-codec", choices=KEYFRAME_CODECS, default="av1",
                        help="how references are coded: one AV1 stream (SVT-AV1 low delay, decoded by libdav1d), "
                             "or the learned keyframe codec, whose knobs are --quality-floor, --max-kbps, "
                             "--keyframe-step and --max-keyframe-interval (default %(default)s: it measures better, "
                             "BENCHMARKS.md)")
    parser.add_argument("--kbps", type=float, default=None,
                        help=f"rate target in kbps, every byte counted (AV1 references: a rate control spends it, "
                             f"default {DEFAULT_KBPS:g}; 0 for --av1-crf and --reference-interval instead; learned "
                             f"keyframes: the --max-kbps cap)")
    parser.add_argument("--av1-crf", type=int, default=defaults.av1_crf,
                        help="AV1 references without --kbps: their SVT-AV1 CRF, 1-63 (default %(default)s)")
    parser.add_argument("--av1-preset", type=int, default=defaults.av1_preset,
                        help="AV1 references: SVT-AV1's preset, 0 (slowest search, fewest bytes) to 13; the "
                             "stream decodes the same whichever (default %(default)s)")
    parser.add_argument("--reference-interval", type=int, default=defaults.reference_interval,
                        help="AV1 references without --kbps: frames from one to the next (default %(default)s)")
    parser.add_argument("--intra-interval", type=int, default=defaults.intra_interval,
                        help="AV1 references: frames between intra frames, 0 for only the first (default %(default)s)")
    parser.add_argument("--probe-interval", type=int, default=defaults.probe_interval,
                        help="AV1 references: frames between syntheses made only to learn whether the model beats "
                             "holding (after one that wins, every frame is tried); 0 tries every frame: slower, "
                             "not better on the validation clips (default %(default)s)")
    parser.add_argument("--restore", choices=("auto", "on", "off"), default="auto",
                        help="AV1 references: show inter references restored by the model's restoration (format 8); "
                             "auto: below 5 kbps, where they are coarsest (default %(default)s)")
    parser.add_argument("--bank-size", type=int, default=None,
                        help="reference frames the decoder keeps (default: 1 with AV1 references, 2 with learned keyframes)")
    parser.add_argument("--frames", type=int, default=None, help="encode at most this many frames")
    parser.add_argument("--crop", type=parse_crop, default=None,
                        help="square crop LEFT,TOP,SIZE in source pixels (default: the centered square)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for the model (default: torch's)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(max(1, args.threads))
    if (args.max_keyframe_interval < 1 or args.max_kbps < 0
            or (args.kbps is not None and args.kbps < 0)):
        parser.error("--max-keyframe-interval must be >= 1, --max-kbps and --kbps >= 0")
    codec = args.keyframe_codec
    kbps = DEFAULT_KBPS if args.kbps is None else args.kbps
    try:
        settings = EncoderSettings(
            args.quality_floor, args.max_keyframe_interval, args.bank_size,
            args.kbps if args.kbps is not None and codec == "learned" else args.max_kbps,
            repeat_keyframe=not args.no_repeat, keyframe_step=args.keyframe_step, keyframe_codec=codec,
            kbps=kbps if codec == "av1" else 0.0, reference_interval=args.reference_interval,
            av1_crf=args.av1_crf, av1_preset=args.av1_preset, intra_interval=args.intra_interval,
            probe_interval=args.probe_interval, restore={"auto": None, "on": True, "off": False}[args.restore])
    except ValueError as e:
        parser.error(str(e))

    def action() -> int:
        model = load_weights(args.weights)
        s = encode_file(args.input, args.output, model, settings, args.crop, args.frames, progress=not args.quiet)
        print(f"{args.output}: {s.frames} frames, {s.keyframes} {'references' if codec == 'av1' else 'keyframes'}, {s.bytes} bytes, {s.kbps:.2f} kbps, "
              f"PSNR {s.psnr:.2f} dB, {s.fps:.1f} fps")
        return 0

    return run("imfc encode", action)


if __name__ == "__main__":
    sys.exit(main())
