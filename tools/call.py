"""imfc call send SOURCE / imfc call recv --out FILE: a real-time call over WebRTC.

Start the receiver first; it listens for the sender's offer on a localhost port (signalling),
then both talk over WebRTC data channels. Each side can impair what it sends (loss, delay,
jitter, bandwidth cap) to play a bad network.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from dataclasses import asdict, replace
from fractions import Fraction
from pathlib import Path

import torch

from codec.nn.keyframe_codec import KEYFRAME_STEPS
from codec.pipeline import KEYFRAME_CODECS
from codec.sender import FrameKind, SenderSettings
from codec.video_io import to_tensor
from codec.nn.weights import load_weights
from rtc.impairment import LinkConfig
from rtc.recovery import measure_recovery
from rtc.report import summarize
from rtc.session import CallConfig, CallError, compare_with, run_receiver, run_sender
from rtc.signalling import SignallingError
from rtc.simulate import simulate_call
from rtc.source import open_source
from tools.encode import DEFAULT_KBPS, parse_crop
from tools.errors import run


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="signalling address (default %(default)s)")
    p.add_argument("--port", type=int, default=8765, help="signalling TCP port (default %(default)s)")
    # fast by default: the default model's synthesis does not fit a 25 fps frame on 2 cores (BENCHMARKS.md, "Session 15")
    p.add_argument("--weights", type=Path, default="fast", help="model weights: a file, or a shipped model by name, "
                   "default or fast (default: %(default)s, which keeps up with 25 fps on 2 cores); both sides need the same")
    p.add_argument("--loss", type=float, default=0.0, help="percent of this side's datagrams to drop")
    p.add_argument("--delay", type=float, default=0.0, help="one-way delay added to this side's datagrams, ms")
    p.add_argument("--jitter", type=float, default=0.0, help="extra random delay in [0, JITTER) ms per datagram")
    p.add_argument("--link-kbps", type=float, default=0.0, help="bandwidth cap on this side's datagrams (0: none)")
    p.add_argument("--seed", type=int, default=0, help="seed of the impairment layer")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the other side")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for the model (default %(default)s)")


def call_config(args: argparse.Namespace) -> CallConfig:
    link = LinkConfig(args.loss / 100, args.delay / 1000, args.jitter / 1000, args.link_kbps, seed=args.seed)
    return CallConfig(args.host, args.port, link, args.timeout)


def add_coding(p: argparse.ArgumentParser, defaults: SenderSettings) -> None:
    # the defaults of `imfc encode`: AV1 references at 8 kbps (BENCHMARKS.md, "AV1 references in calls")
    p.add_argument("--keyframe-codec", choices=KEYFRAME_CODECS, default="av1",
                   help="references: one AV1 stream, or learned keyframes, whose knobs are --quality-floor, "
                        "--max-kbps, --keyframe-step and --max-keyframe-interval (default %(default)s)")
    p.add_argument("--kbps", type=float, default=DEFAULT_KBPS,
                   help="AV1 references: rate target of the media packets, headers included; 0: a reference "
                        "every --reference-interval frames at --av1-crf (default %(default)g)")
    p.add_argument("--av1-crf", type=int, default=defaults.av1_crf, help="AV1 references without --kbps: "
                   "their SVT-AV1 CRF, 1-63 (default %(default)s)")
    p.add_argument("--av1-preset", type=int, default=defaults.av1_preset,
                   help="AV1 references: SVT-AV1's preset, 0 (slowest, fewest bytes) to 13 (default %(default)s)")
    p.add_argument("--reference-interval", type=int, default=defaults.reference_interval,
                   help="AV1 references without --kbps: frames from one to the next (default %(default)s)")
    p.add_argument("--intra-interval", type=int, default=defaults.intra_interval,
                   help="AV1 references: frames between intra frames, 0 for only the first and those the "
                        "receiver asks for (default %(default)s)")
    p.add_argument("--probe-interval", type=int, default=defaults.probe_interval,
                   help="AV1 references: frames between syntheses made only to learn whether the model beats "
                        "holding; 0 tries every frame (default %(default)s)")


def sender_settings(args: argparse.Namespace) -> SenderSettings:
    return SenderSettings(args.quality_floor, args.max_keyframe_interval, args.bank_size, max_kbps=args.max_kbps,
                          keyframe_step=args.keyframe_step, keyframe_codec=args.keyframe_codec, kbps=args.kbps,
                          reference_interval=args.reference_interval, av1_crf=args.av1_crf,
                          av1_preset=args.av1_preset, intra_interval=args.intra_interval, probe_interval=args.probe_interval)


def main(argv: list[str] | None = None) -> int:
    defaults = SenderSettings()
    parser = argparse.ArgumentParser(prog="imfc call", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="role", required=True)
    send = sub.add_parser("send", help="call a receiver and send a video file or camera")
    send.add_argument("source", help="a video file, or a camera (/dev/video0; camera:NAME on macOS)")
    send.add_argument("--frames", type=int, default=None, help="send at most this many frames")
    send.add_argument("--fps", type=float, default=None,
                      help="pace a video file at this rate instead of its own (for machines too slow for real time)")
    send.add_argument("--crop", type=parse_crop, default=None, help="square crop LEFT,TOP,SIZE (default: centered)")
    send.add_argument("--quality-floor", type=float, default=defaults.quality_floor,
                      help="PSNR (dB) under which a keyframe is sent; 0 turns the check (and the sender's "
                           "synthesis) off (default %(default)s)")
    send.add_argument("--max-keyframe-interval", type=int, default=defaults.max_keyframe_interval)
    send.add_argument("--bank-size", type=int, default=None, help="references a token frame is coded with "
                      "(default: 1 with AV1 references, 2 with learned keyframes)")
    send.add_argument("--max-kbps", type=float, default=defaults.max_kbps,
                      help="rate cap: a keyframe the quality floor asks for waits until the last 2 s stay under "
                           "it (keyframes the receiver asks for do not wait); 0 = no cap (default %(default)s)")
    send.add_argument("--keyframe-step", type=float, default=defaults.keyframe_step, choices=KEYFRAME_STEPS,
                      help="quantization step of keyframe images: coarser is cheaper and blurrier (default %(default)s)")
    send.add_argument("--json", type=Path, default=None, help="write the receiver's report here as JSON")
    add_coding(send, defaults)
    add_common(send)
    recv = sub.add_parser("recv", help="wait for a call and write what it shows to a video file")
    recv.add_argument("--out", type=Path, required=True, help="output video (.mp4, .mkv, .y4m, or a folder of PNGs)")
    recv.add_argument("--compare", default=None, help="the source video, to measure PSNR/MS-SSIM against")
    recv.add_argument("--json", type=Path, default=None, help="write the call's report here as JSON")
    add_common(recv)
    sim = sub.add_parser("simulate", help="the same call in one process on a simulated clock (no CPU time), "
                         "to measure quality under loss and recovery after a lost keyframe")
    sim.add_argument("source", help="a video file")
    sim.add_argument("--frames", type=int, default=None)
    sim.add_argument("--quality-floor", type=float, default=defaults.quality_floor)
    sim.add_argument("--max-keyframe-interval", type=int, default=defaults.max_keyframe_interval)
    sim.add_argument("--bank-size", type=int, default=None)
    sim.add_argument("--max-kbps", type=float, default=defaults.max_kbps)
    sim.add_argument("--keyframe-step", type=float, default=defaults.keyframe_step, choices=KEYFRAME_STEPS)
    sim.add_argument("--lose-keyframe", type=int, default=None, metavar="K",
                     help="also run the call with the first fragment of keyframe K (0: the first) dropped, "
                          "and report how long it takes to recover")
    sim.add_argument("--json", type=Path, default=None, help="write the report here as JSON")
    add_coding(sim, defaults)
    add_common(sim)
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    if not 0 <= args.loss <= 100:
        parser.error("--loss is a percentage in 0..100")
    if getattr(args, "max_kbps", 0) < 0 or getattr(args, "kbps", 0) < 0 or args.link_kbps < 0:
        parser.error("--max-kbps, --kbps and --link-kbps must be 0 (none) or positive")
    if args.role != "recv":
        try:
            sender_settings(args)
        except ValueError as e:
            parser.error(str(e))
    if args.role == "send" and args.fps is not None and args.fps <= 0:
        parser.error("--fps must be positive")

    def action() -> int:
        model = load_weights(args.weights)
        try:
            if args.role == "simulate":
                return simulate(model, args)
            if args.role == "send":
                settings = sender_settings(args)
                source = open_source(args.source, model.cfg.resolution, args.frames, args.crop)
                if args.fps:
                    source.fps = Fraction(args.fps).limit_denominator(1001)
                summary, report = asyncio.run(run_sender(model, source, settings, call_config(args), args.frames))
                # the wire rate on the same time base as the report's kbps: the source's duration
                seconds = max(summary.frames, 1) / float(source.fps)
                wire = summary.wire_bytes and 8 * summary.wire_bytes / 1000 / seconds
                print(f"sent {summary.frames} frames ({summary.not_sent} skipped for time, "
                      f"{summary.syntheses_left_out} syntheses left out for time), "
                      f"{summary.keyframes_sent} keyframes, {summary.packets_sent} packets, "
                      f"{summary.media_bytes} bytes, {summary.wire_bytes} bytes on the wire "
                      "(SCTP/DTLS/UDP/IP included); receiver's report:")
                report = {**report, "sender_wire_kbps": wire}
            else:
                compare = compare_with(args.compare) if args.compare else None
                report = asdict(asyncio.run(run_receiver(
                    model, args.out, call_config(args), compare,
                    lambda port: print(f"listening on {args.host}:{port}", flush=True))))
                print(f"{args.out}: call ended; report:")
        except (CallError, SignallingError) as e:
            print(f"imfc call {args.role}: error: {e}", file=sys.stderr)
            return 1
        print("\n".join(f"  {k}: {v:.3f}" if isinstance(v, float) else f"  {k}: {v}" for k, v in report.items()))
        if args.json:
            args.json.write_text(json.dumps(report, indent=1))
        return 0

    return run(f"imfc call {args.role}", action)


def simulate(model, args: argparse.Namespace) -> int:
    settings = sender_settings(args)
    source = open_source(args.source, model.cfg.resolution, args.frames)
    images = list(source.frames)
    frames = [to_tensor(f) for f in images]
    link = call_config(args).link
    fps = float(source.fps)
    result: dict = {}
    if args.lose_keyframe is not None:
        recovery, _, call = measure_recovery(model, frames, fps, settings, link, args.lose_keyframe)
        result["recovery"] = asdict(recovery)
    else:
        call = simulate_call(model, frames, fps, settings, link, replace(link, seed=link.seed + 1))
    report = summarize(
        call.played, images, fps, call.captured, not_sent=0, sender_holds=call.sent.count(FrameKind.HOLD),
        keyframes_sent=sum(k == FrameKind.KEYFRAME for k in call.sent),
        keyframe_requests=call.receiver.stats.keyframe_requests, packets_sent=call.forward.stats.sent,
        packets_lost=call.forward.stats.dropped, media_bytes=call.media_bytes, feedback_bytes=call.feedback_bytes)
    result = {**asdict(report), **result}
    print(f"{args.source}: simulated call of {report.frames} frames")
    print("\n".join(f"  {k}: {v:.3f}" if isinstance(v, float) else f"  {k}: {v}" for k, v in result.items()))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
