"""imfc info IN.imfc: the header and per-chunk statistics of a bitstream."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from collections import Counter

from codec.files import read_bitstream
from codec.nn.keyframe_codec import KEYFRAME_STEPS
from entropy.bitstream import (KEYFRAME_STEP_SINCE, LAZY_REFERENCE_TOKENS_SINCE, SELF_DELIMITING_SINCE,
                               Av1ReferencesPayload, ChunkType, KeyframePayload, has_sequence_header)
from entropy.coding import bits_to_kbps
from tools.errors import run


def step_name(index: int) -> str:
    return f"{KEYFRAME_STEPS[index]:g}" if index < len(KEYFRAME_STEPS) else f"index {index} (unknown)"


def av1_split(chunks: list, version: int) -> list[str]:
    """The AV1_REFERENCES chunks' bytes: pictures, tokens, and the rest (framing, positions, modes),
    in a stream of format ``version``."""
    lazy = version >= LAZY_REFERENCE_TOKENS_SINCE
    payloads = [Av1ReferencesPayload.from_bytes(c.payload, lazy, version >= SELF_DELIMITING_SINCE) for c in chunks]
    packets = [p for payload in payloads for _, p in payload.references]
    total = sum(len(c.to_bytes()) for c in chunks)
    pictures = sum(map(len, packets))
    tokens = sum(len(p.tokens) for p in payloads)
    intra = sum(map(has_sequence_header, packets))
    token_frames = sum(sum(p.modes) for p in payloads)
    sent = sum(p.token_count(lazy) for p in payloads) - token_frames
    repeats = sum(len(p.modes) - sum(p.modes) for p in payloads)
    return [f"AV1 references: {len(packets)} pictures ({intra} intra), {pictures} bytes"
            + (f" ({pictures / len(packets):.0f} per picture)" if packets else ""),
            f"  tokens of {sent} references and {token_frames} token frames: {tokens} bytes; "
            f"{repeats} repeats; framing, positions and frame modes: {total - pictures - tokens} bytes"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="imfc info", description=__doc__)
    parser.add_argument("input", type=Path)
    parser.add_argument("--chunks", action="store_true", help="one line per chunk")
    args = parser.parse_args(argv)

    def action() -> int:
        h, chunks = read_bitstream(args.input)
        size = args.input.stat().st_size
        fps = h.fps_num / max(h.fps_den, 1)
        key = [c for c in chunks if c.type == ChunkType.KEYFRAME]
        frame = [c for c in chunks if c.type in (ChunkType.FRAME, ChunkType.TOKEN_RUN)]
        repeat = [c for c in chunks if c.type == ChunkType.REPEAT]
        token_frames = sum(c.frames for c in frame)
        print(f"format version {h.version}, model {h.preset} ({h.model_id.hex()})")
        print(f"{h.width}x{h.height} at {fps:.3f} fps, {h.frames} frames ({h.frames / fps:.2f} s), bank of {h.bank_size}")
        print(f"source {h.source_width}x{h.source_height}, crop {h.crop_size}x{h.crop_size} at ({h.crop_left}, {h.crop_top})")
        key_bytes = sum(len(c.to_bytes()) for c in key)
        frame_bytes = sum(len(c.to_bytes()) for c in frame)
        steps = Counter(KeyframePayload.from_bytes(c.payload, h.version >= KEYFRAME_STEP_SINCE).step for c in key)
        av1 = [c for c in chunks if c.type == ChunkType.AV1_REFERENCES]
        if key or not av1:
            print(f"keyframes: {len(key)}, {key_bytes} bytes" + (f" ({key_bytes / len(key):.0f} per keyframe)" if key else "")
                  + "".join(f", {n} at step {step_name(i)}" for i, n in sorted(steps.items())))
        runs = sum(c.type == ChunkType.TOKEN_RUN for c in frame)
        if frame or not av1:
            print(f"token frames: {token_frames}" + (f" in {runs} run{'s' if runs > 1 else ''}" if runs else "")
                  + f", {frame_bytes} bytes" + (f" ({frame_bytes / token_frames:.1f} per frame)" if frame else ""))
        if av1:
            print("\n".join(av1_split(av1, h.version)))
        if repeat:
            print(f"repeats of a keyframe's picture: {sum(c.frames for c in repeat)} frames in {len(repeat)} "
                  f"run{'s' if len(repeat) > 1 else ''}, {sum(len(c.to_bytes()) for c in repeat)} bytes")
        print(f"total: {size} bytes, {bits_to_kbps(8 * size, h.frames, fps):.2f} kbps"
              + (f" (token frames alone {bits_to_kbps(8 * frame_bytes, h.frames, fps):.2f} kbps)" if frame else ""))
        if args.chunks:
            for i, c in enumerate(chunks):
                print(f"{i:6d} {c.type.name:<14} {c.frames:5d} frames {len(c.to_bytes()):7d} bytes")
        return 0

    return run("imfc info", action)


if __name__ == "__main__":
    sys.exit(main())
