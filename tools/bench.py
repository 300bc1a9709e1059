"""imfc bench VIDEO: encode/decode speed of imfc at the model's resolution on this CPU, with libx264
on the same frames in the same run (so the result is also a ratio), model load time and peak memory.

Prints a markdown table ready for BENCHMARKS.md; --json writes the numbers too. Wall-clock numbers
depend on what else the machine runs: the table records the load average around the run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from codec.av1_reference import CALL_PRESET, DEFAULT_PRESET
from codec.pipeline import KEYFRAME_CODECS, EncoderSettings
from evaluation.profile import profile_coding, profile_tables
from evaluation.rd_eval import load_clip
from evaluation.speed import Speed, bench_imfc, bench_synthesis, bench_x264, peak_rss_mb
from codec.video_io import VideoError, probe
from codec.nn.weights import load_weights, model_id
from tools.encode import DEFAULT_KBPS
from tools.errors import run


PRESET_NAMES = {CALL_PRESET: ", a call's", DEFAULT_PRESET: ", imfc encode's"}


def int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def table(rows: list[Speed]) -> list[str]:
    out = [("| codec | threads | encode fps | decode fps | encode p50 / p95 ms | decode p50 / p95 ms | "
           "encode / decode CPU ms per frame | keyframes | token frames | kbps |"),
           "|---|---|---|---|---|---|---|---|---|---|"]
    for s in rows:
        out.append(f"| {s.codec} | {s.threads} | {s.encode_fps:.1f} | {s.decode_fps:.1f} | {s.encode_p50_ms:.1f} / "
                   f"{s.encode_p95_ms:.1f} | {s.decode_p50_ms:.1f} / {s.decode_p95_ms:.1f} | {s.encode_cpu_ms:.1f} / "
                   f"{s.decode_cpu_ms:.1f} | {s.keyframes} | {'n/a' if s.token_frames is None else s.token_frames} | "
                   f"{s.kbps:.1f} |")
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="imfc bench", description=__doc__)
    parser.add_argument("input", type=Path, help="a video file; its centered square, resized to the model's resolution")
    parser.add_argument("--frames", type=int, default=100, help="frames to code (default %(default)s)")
    parser.add_argument("--weights", type=Path, default=None, help="model weights: a file, or a shipped model by name, default or fast (default: default)")
    parser.add_argument("--threads", type=int_list, default=(1, 2), help="thread counts to measure (default 1,2)")
    parser.add_argument("--x264-crf", type=int, default=51, help="libx264 CRF (default %(default)s, its lowest rate)")
    parser.add_argument("--keyframe-codec", choices=KEYFRAME_CODECS, default="av1",
                        help="how references are coded, as in imfc encode (default %(default)s)")
    parser.add_argument("--kbps", type=float, default=DEFAULT_KBPS,
                        help="AV1 references: the rate target, as in imfc encode (default %(default)s)")
    parser.add_argument("--av1-preset", type=int, default=CALL_PRESET,
                        help=f"AV1 references: SVT-AV1's preset (default %(default)s, a call's; imfc encode's files "
                             f"use {DEFAULT_PRESET}, a slower search)")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    parser.add_argument("--profile", action="store_true",
                        help="also profile encode and decode (torch.profiler, at the first thread count): CPU time "
                             "per step, module and op")
    args = parser.parse_args(argv)
    if args.frames < 2 or not args.threads or min(args.threads) < 1:
        parser.error("--frames must be >= 2 and --threads positive")
    av1 = args.keyframe_codec == "av1"
    try:
        settings = EncoderSettings(keyframe_codec=args.keyframe_codec, kbps=args.kbps if av1 else 0.0,
                                   av1_preset=args.av1_preset)
    except ValueError as e:
        parser.error(str(e))

    def action() -> int:
        probe(args.input)
        if args.json is not None and not (args.json.parent if str(args.json.parent) else Path(".")).is_dir():
            raise VideoError(f"{args.json}: output folder does not exist")
        load_before = os.getloadavg()
        rss_before = peak_rss_mb()
        start = time.perf_counter()
        model = load_weights(args.weights)
        load_seconds = time.perf_counter() - start
        clip = load_clip(args.input, model.cfg.resolution, args.frames)
        rows = []
        for t in args.threads:
            rows.append(bench_imfc(model, clip.frames, clip.fps, t, settings))
        synthesis = {t: bench_synthesis(model, clip.frames, t, settings.bank_size) for t in args.threads}
        rss_imfc = peak_rss_mb()
        for t in args.threads:
            rows.append(bench_x264(clip.frames, clip.fps, t, args.x264_crf))
        load_after = os.getloadavg()
        r = model.cfg.resolution
        lines = [f"Command: `imfc bench {shlex.join(argv)}`", "",
                 (f"{len(clip.frames)} frames of {clip.name} at {r}x{r}, {float(clip.fps):g} fps; CPU: {cpu_name()}, "
                 f"{os.cpu_count()} logical cores; torch {torch.__version__}; load average {load_before[0]:.2f} before, "
                 f"{load_after[0]:.2f} after (other work on the machine slows every row alike only roughly)."), "",
                 (f"imfc model `{model.cfg.name}` {model_id(model).hex()}, "
                  + (f"AV1 references at --kbps {settings.kbps:g} (bank of {settings.bank_size}, SVT-AV1 preset "
                     f"{settings.av1_preset}{PRESET_NAMES.get(settings.av1_preset, '')})" if av1 else
                     f"learned keyframes (quality floor {settings.quality_floor:g} dB, keyframe cap "
                     f"{settings.max_kbps:g} kbps, keyframe step {settings.keyframe_step:g}, keyframe at most every "
                     f"{settings.max_keyframe_interval} frames)")
                  + f"; libx264 CRF {args.x264_crf}, preset medium, tune zerolatency, bf 0, slice-threaded decode."), ""]
        lines += table(rows)
        lines.append("")
        for t in args.threads:
            imfc = next(s for s in rows if s.codec == "imfc" and s.threads == t)
            x264 = next(s for s in rows if s.codec == "x264" and s.threads == t)
            lines.append(f"- {t} thread(s): imfc encodes at {imfc.encode_fps / x264.encode_fps:.3g}x and decodes at "
                         f"{imfc.decode_fps / x264.decode_fps:.3g}x the frame rate of libx264 (wall clock); per frame it "
                         f"takes {imfc.encode_cpu_ms / x264.encode_cpu_ms:.0f}x / {imfc.decode_cpu_ms / x264.decode_cpu_ms:.0f}x "
                         f"x264's CPU time to encode / decode.")
        for s in rows:
            if s.codec == "imfc" and s.token_frames:
                lines.append(f"- {s.threads} thread(s): imfc's decoder synthesized {s.token_frames} token frame(s), p95 "
                             f"{s.token_decode_p95_ms:.1f} ms each (the rest of its frames are AV1 references and holds)")
        for t, (p50, p95) in synthesis.items():
            lines.append(f"- synthesis alone (one token frame from a bank of {settings.bank_size} reference(s) made from "
                         f"this clip, as the bank of these settings), {t} "
                         f"thread(s): p50 {p50:.1f} ms, p95 {p95:.1f} ms")
        lines += [f"- model load (weights file to a ready model, imports excluded): {load_seconds * 1000:.0f} ms",
                  (f"- peak resident memory of the process: {rss_before:.0f} MB after imports, {rss_imfc:.0f} MB after "
                  f"the imfc runs, {peak_rss_mb():.0f} MB at the end")]
        if args.profile:
            lines += ["", f"Profile ({args.threads[0]} thread(s), the same frames and settings):", ""]
            lines += profile_tables(profile_coding(model, clip.frames, settings, args.threads[0], fps=float(clip.fps)))
        print("\n".join(lines))
        if args.json is not None:
            args.json.write_text(json.dumps({
                "command": f"imfc bench {shlex.join(argv)}", "cpu": cpu_name(), "model_id": model_id(model).hex(),
                "load_average": [load_before[0], load_after[0]], "model_load_ms": load_seconds * 1000,
                "peak_rss_mb": {"after_imports": rss_before, "after_imfc": rss_imfc, "end": peak_rss_mb()},
                "synthesis_ms": {str(t): {"p50": p50, "p95": p95} for t, (p50, p95) in synthesis.items()},
                "rows": [asdict(s) for s in rows]}, indent=1) + "\n")
        return 0

    return run("imfc bench", action)


if __name__ == "__main__":
    sys.exit(main())
