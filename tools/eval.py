"""imfc eval CLIPS... --out DIR: rate-distortion of imfc against x264, x265 and SVT-AV1 on the same frames.

Writes to DIR: points.csv / points.json (every operating point of every codec on every clip, with
settings, BD-rates and the command), frames.csv (per-frame scores), rd_<metric>.png (all codecs,
averaged over clips, log-scaled kbps), side_by_side_<clip>.png (the same frames from the source,
imfc and each anchor at the closest rate) and summary.md (tables ready for BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

from evaluation.anchors import SPECS, Anchor, Reduced
from evaluation.metrics import MetricError, vmaf_available
from codec.av1_reference import CALL_PRESET, DEFAULT_PRESET, MAX_INTRA_OFFSET, MAX_PRESET, MIN_INTRA_OFFSET, MIN_PRESET
from codec.pipeline import MAX_BANK, EncoderSettings
from evaluation.rd_eval import EvalSettings, evaluate_clip, imfc_setting, load_clip
from evaluation.rd_report import read_anchor_points, side_by_side, write_report
from codec.video_io import VideoError, probe
from codec.nn.weights import load_weights, model_id
from tools.errors import run


def int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def float_list(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def imfc_point(text: str) -> EncoderSettings:
    floor, keyint, *rest = text.split(":")
    if len(rest) > 2:
        raise ValueError(text)
    cap, step = (rest + ["0", str(EncoderSettings().keyframe_step)][len(rest):])
    return EncoderSettings(float(floor), int(keyint), max_kbps=float(cap), keyframe_step=float(step))


def imfc_points(text: str) -> tuple[EncoderSettings, ...]:
    """"FLOOR:KEYINT[:KBPS[:STEP]],..." -> encoder settings (quality floor in dB, forced keyframe
    interval, rate cap (default 0: none), keyframe quantization step (default: EncoderSettings')).
    The default settings are therefore "24:250:11"."""
    try:
        points = tuple(imfc_point(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected FLOOR:KEYINT[:KBPS[:STEP]],... (e.g. 20:250,24:5:16,22:250:0:2), got {text!r}") from None
    if not points or any(p.max_keyframe_interval < 1 or p.max_kbps < 0 for p in points):
        raise argparse.ArgumentTypeError("need at least one FLOOR:KEYINT[:KBPS[:STEP]] with KEYINT >= 1 and KBPS >= 0")
    return points


def points_text(points: tuple[EncoderSettings, ...]) -> str:
    def text(p: EncoderSettings) -> str:
        step = f":{p.keyframe_step:g}" if p.keyframe_step != EncoderSettings().keyframe_step else ""
        return f"{p.quality_floor:g}:{p.max_keyframe_interval}" + (f":{p.max_kbps:g}" if p.max_kbps or step else "") + step
    return ",".join(text(p) for p in points)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    d = EvalSettings()
    crfs = dict(d.crfs)
    parser = argparse.ArgumentParser(prog="imfc eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("clips", type=Path, nargs="+", help="video files PyAV can open")
    parser.add_argument("-o", "--out", type=Path, default=Path("imfc-eval"), help="output folder, new or empty (default %(default)s)")
    parser.add_argument("--weights", type=Path, default=None, help="model weights: a file, or a shipped model by name, default or fast (default: default)")
    parser.add_argument("--frames", type=int, default=d.frames, help="frames per clip, from the start (default %(default)s)")
    parser.add_argument("--imfc-points", type=imfc_points, default=d.imfc,
                        help="imfc operating points as QUALITY_FLOOR_DB:MAX_KEYFRAME_INTERVAL[:MAX_KBPS[:KEYFRAME_STEP]],... "
                             f"(default {points_text(d.imfc)})")
    for anchor in Anchor:
        parser.add_argument(f"--{anchor.value}-crf", type=int_list, default=crfs[anchor],
                            help=f"{anchor.value} CRFs (default {','.join(map(str, crfs[anchor]))}; empty to skip)")
    held = sorted({r.every for _, r, _ in d.reduced if r.every > 1})
    small = next((r.size for _, r, _ in d.reduced if r.size), 0)
    held_crf = next(c for _, r, c in d.reduced if r.every > 1 and r.intra_offset is None)
    held_offsets = sorted({r.intra_offset for _, r, _ in d.reduced if r.intra_offset is not None})
    small_crf = next(c for _, r, c in d.reduced if r.size)
    parser.add_argument("--held", type=int_list, default=tuple(held),
                        help="SVT-AV1 on every K-th frame only, each decoded frame held until the next, for these K "
                             f"(default {','.join(map(str, held))}; empty to skip)")
    parser.add_argument("--held-crf", type=int_list, default=held_crf,
                        help=f"CRFs of the held anchors (default {','.join(map(str, held_crf))})")
    parser.add_argument("--held-offsets", type=int_list, default=tuple(held_offsets),
                        help="also the held anchors at CRF 63 with SVT-AV1's fixed qindex offsets (imfc's own "
                             "references below 5 kbps), the intra frame at each of these offsets "
                             f"(default {','.join(map(str, held_offsets))}; empty to skip)")
    parser.add_argument("--held-preset", type=int_list, default=(CALL_PRESET,),
                        help="SVT-AV1 presets of the held and small anchors, 0 (slowest) to 13; each adds a curve "
                             f"(default {CALL_PRESET}, a real-time setting; imfc's references use "
                             f"{DEFAULT_PRESET}, --av1-preset)")
    parser.add_argument("--small", type=int, default=small,
                        help=f"SVT-AV1 at this size, upscaled back (default {small}; 0 to skip)")
    parser.add_argument("--small-crf", type=int_list, default=small_crf,
                        help=f"CRFs of the small anchor (default {','.join(map(str, small_crf))})")
    parser.add_argument("--kbps", type=float_list, default=(),
                        help="imfc with AV1 references at these rate targets (imfc encode --kbps), instead of "
                             "--imfc-points, e.g. 1.5,2,3,4,6,8")
    parser.add_argument("--bank-size", type=int, default=None,
                        help="references the decoder keeps, for the --kbps points (default: AV1's, 1)")
    parser.add_argument("--av1-preset", type=int, default=DEFAULT_PRESET,
                        help="SVT-AV1 preset of imfc's references, for the --kbps points (default %(default)s)")
    parser.add_argument("--no-repeat", action="store_true",
                        help="imfc synthesizes every token frame, never repeating a keyframe's picture")
    parser.add_argument("--anchors-from", type=Path, default=None, metavar="POINTS_JSON",
                        help="the points.json of an earlier imfc eval of the same clips and frames: its anchors join "
                             "this report (BD-rates, plots) as measured there (combine with empty anchor CRFs)")
    parser.add_argument("--no-vmaf", action="store_true", help="skip VMAF (scored NaN)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default %(default)s)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.frames < 2:
        parser.error("--frames must be >= 2")
    for anchor in Anchor:
        lo, hi = SPECS[anchor].crf_range
        if any(not lo <= c <= hi for c in getattr(args, f"{anchor.value}_crf")):
            parser.error(f"--{anchor.value}-crf values must be in {lo}..{hi}")
    lo, hi = SPECS[Anchor.SVTAV1].crf_range
    if any(not lo <= c <= hi for c in args.held_crf + args.small_crf):
        parser.error(f"--held-crf and --small-crf values must be in {lo}..{hi}")
    if any(k < 2 for k in args.held) or args.small < 0 or args.small % 2:
        parser.error("--held values must be >= 2 and --small an even size (0 to skip)")
    if any(not MIN_INTRA_OFFSET <= o <= MAX_INTRA_OFFSET for o in args.held_offsets):
        parser.error(f"--held-offsets values must be in {MIN_INTRA_OFFSET}..{MAX_INTRA_OFFSET}")
    torch.set_num_threads(max(1, args.threads))
    anchors = [(a, getattr(args, f"{a.value}_crf")) for a in Anchor if getattr(args, f"{a.value}_crf")]
    if any(not MIN_PRESET <= p <= MAX_PRESET for p in args.held_preset + (args.av1_preset,)):
        parser.error(f"--held-preset and --av1-preset values must be in {MIN_PRESET}..{MAX_PRESET}")
    reduced = []
    for p in args.held_preset:
        reduced += [(Anchor.SVTAV1, Reduced(every=k, preset=p), args.held_crf) for k in args.held if args.held_crf]
        reduced += [(Anchor.SVTAV1, Reduced(every=k, intra_offset=o, preset=p), (63,))
                    for o in args.held_offsets for k in args.held]
        reduced += [(Anchor.SVTAV1, Reduced(size=args.small, preset=p), args.small_crf)] if args.small and args.small_crf else []
    if any(r <= 0 for r in args.kbps):
        parser.error("--kbps values must be positive")
    if args.bank_size is not None and not 1 <= args.bank_size <= MAX_BANK:
        parser.error(f"--bank-size must be 1 to {MAX_BANK}")
    points = [EncoderSettings(keyframe_codec="av1", kbps=r, bank_size=args.bank_size, av1_preset=args.av1_preset)
              for r in args.kbps] or args.imfc_points
    imfc = [replace(p, repeat_keyframe=not args.no_repeat) for p in points]

    def action() -> int:
        for clip in args.clips:  # every input checked before any work or output
            probe(clip)
        if args.anchors_from:
            try:
                read_anchor_points(args.anchors_from, {})
            except ValueError as e:
                raise VideoError(f"--anchors-from {e}") from None
        out = args.out
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise VideoError(f"{out}: exists and is not an empty folder")
        if not (out.parent if str(out.parent) else Path(".")).is_dir():
            raise VideoError(f"{out}: parent folder does not exist")
        with_vmaf = not args.no_vmaf
        if with_vmaf and not vmaf_available():
            raise MetricError("no FFmpeg with libvmaf (the imageio-ffmpeg package ships one); use --no-vmaf to skip VMAF")
        model = load_weights(args.weights)
        res = model.cfg.resolution
        tmp = out.with_name(f".{out.name}.part")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        # a long run is often stopped with `kill`: exit through the cleanup below, not around it
        previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        start = time.perf_counter()
        try:
            total = len(args.clips) * (len(imfc) + sum(len(c) for _, c in anchors) + sum(len(c) for *_, c in reduced))
            bar = tqdm(total=total, unit="point", desc="eval", disable=True if args.quiet else None)
            coded = []

            def after_point(label: str) -> None:
                bar.set_postfix_str(label, refresh=False)
                bar.update()

            for path in args.clips:
                clip = load_clip(path, res, args.frames)
                coded_clip = evaluate_clip(model, clip, imfc, anchors, with_vmaf, after_point, reduced)
                side_by_side(clip.frames, coded_clip, clip.samples, tmp / f"side_by_side_{clip.name}.png")
                coded += coded_clip
            bar.close()
            meta = {
                "command": "imfc eval " + shlex.join(argv),
                "frames": args.frames,
                "resolution": res,
                "model": f"{model.cfg.name} {model_id(model).hex()} ({args.weights or 'shipped default'})",
                "vmaf": with_vmaf,
                "imfc_settings": [imfc_setting(s) for s in imfc],
                "anchor_settings": {**{a.value: SPECS[a].settings for a, _ in anchors},
                                    **{r.codec(a): f"{r.codec(a)}: {SPECS[a].settings}, " + (
                                        f"1 in K frames coded (K = {', '.join(map(str, args.held))}; the stream at "
                                        "fps / K), each decoded frame held until the next" + (
                                            f"; fixed qindex offsets, the intra frame at {r.intra_offset}"
                                            if r.intra_offset is not None else "") if r.every > 1 else
                                        f"coded at {r.size}x{r.size} (antialiased bicubic down and up)") + (
                                        f"; preset {r.preset} (not {CALL_PRESET})" if r.preset != CALL_PRESET else "")
                                       for a, r, _ in reduced}},
                "seconds": round(time.perf_counter() - start, 1),
                "clips": [str(p) for p in args.clips],
            }
            earlier = []
            if args.anchors_from:
                clips = {p.point.clip: p.point.frames for p in coded}
                try:
                    earlier = read_anchor_points(args.anchors_from, clips)
                except ValueError as e:
                    raise VideoError(f"--anchors-from {e}") from None
                meta["anchors_from"] = str(args.anchors_from)
            write_report(tmp, coded, meta, with_vmaf, earlier)
            if out.exists():
                out.rmdir()  # empty, checked above
            tmp.replace(out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            signal.signal(signal.SIGTERM, previous)
        print((out / "summary.md").read_text())
        print(f"wrote {out}/ in {meta['seconds']:.0f} s")
        return 0

    def guarded() -> int:
        try:
            return action()
        except MetricError as e:  # a missing metric backend is a user-fixable setup problem
            print(f"imfc eval: error: {e}", file=sys.stderr)
            return 1

    return run("imfc eval", guarded)


if __name__ == "__main__":
    sys.exit(main())
