"""A compact training pack: the cached clips re-encoded small, with their AV1 references, in one
folder of at most 48 MiB that can travel with the work tree to an accelerator (`train.burst`).

The cache of `imfc prepare-data` is 6.6 GB of raw frames; its AV1 references another 3.4 GB.
The pack keeps, for every clip of the split, its first ``frames`` frames as H.264 (libx264,
4:2:0, the CRF raised until the pack fits, by default 16 MiB) and its AV1 reference streams (every ``every``-th
frame of the *packed* frames, coded with the coding path's own `codec.av1_reference` encoder at
each CRF) as raw packets, which unpack with libdav1d to exactly the pictures the codec holds:

    PACK/manifest.json        {"version", "every", "crfs", "crf_h264", "split", "clips": {name: {"fps", "frames"}}}
    PACK/{clip}.mp4           the frames
    PACK/{clip}_crf{C}.av1    varint length + packet, per reference picture

The clips stay out of the project (their licenses, ../shared/data/SOURCES.md): a pack is built
into an ignored folder (`.pack/` by default) and carried, never committed.

    python -m train.pack ~/.cache/imfc/data/faces256 .pack
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from tqdm import tqdm

from codec.av1_reference import Quantizer, ReferenceDecoder, ReferenceEncoder
from codec.video_io import read_frames
from entropy.bitstream import _read_varint, _varint
from train.av1_refs import RefsMeta, clip_fps, refs_path
from train.data import Split

PACK_VERSION = 1
MAX_PACK_BYTES = 48 << 20  # the bound
# What the default aims under: an accelerator's image lacks PyAV and CompressAI, whose wheels
# (36 MB) travel with the work tree (12 MB) and the pack within the device tool's 64 MiB.
DEFAULT_PACK_BYTES = 16 << 20


def write_h264(path: Path, frames: np.ndarray, fps: float, crf: int) -> None:
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf), "preset": "slow"}
        for f in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")))
        out.mux(stream.encode(None))


def code_references(frames: np.ndarray, every: int, crf: int, fps: float) -> bytes:
    """Frames 0, K, 2K, ... as one AV1 stream (one intra frame), packets framed by their length."""
    encoder = ReferenceEncoder(frames.shape[1], Fraction(fps / every).limit_denominator(1001), Quantizer(crf))
    out = bytearray()
    for i in range(0, len(frames), every):
        packet, _ = encoder.code(frames[i], intra=i == 0)
        out += _varint(len(packet)) + packet
    encoder.close()
    return bytes(out)


def build(cache_dir: Path, pack_dir: Path, split: Split, frames: int = 200, every: int = 6,
          crfs: tuple[int, ...] = (50, 58, 63), crf_h264: int = 22, progress: bool = True,
          max_bytes: int = DEFAULT_PACK_BYTES) -> int:
    """-> the pack's size in bytes; raises the H.264 CRF by 2 and rebuilds until it fits ``max_bytes``."""
    if max_bytes > MAX_PACK_BYTES:
        raise ValueError(f"a pack holds at most {MAX_PACK_BYTES >> 20} MiB")
    cache_dir, pack_dir = Path(cache_dir), Path(pack_dir)
    pack_dir.mkdir(parents=True, exist_ok=True)
    names = split.train + split.val
    while True:
        clips = {}
        for name in tqdm(names, desc=f"pack (h264 crf {crf_h264})", unit="clip", disable=not progress):
            fps = clip_fps(cache_dir, name)
            write_h264(pack_dir / f"{name}.mp4", np.load(cache_dir / f"{name}.npy", mmap_mode="r")[:frames], fps, crf_h264)
            packed = np.array(list(read_frames(pack_dir / f"{name}.mp4")))  # the references code what training sees
            for crf in crfs:
                (pack_dir / f"{name}_crf{crf}.av1").write_bytes(code_references(packed, every, crf, fps))
            clips[name] = {"fps": fps, "frames": len(packed)}
        manifest = {"version": PACK_VERSION, "every": every, "crfs": list(crfs), "crf_h264": crf_h264,
                    "split": {"train": list(split.train), "val": list(split.val)}, "clips": clips}
        (pack_dir / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        size = sum(p.stat().st_size for p in pack_dir.iterdir())
        if size <= max_bytes or crf_h264 >= 51:
            return size
        crf_h264 = min(51, crf_h264 + 2)


def unpack(pack_dir: Path, cache_dir: Path, refs_dir: Path) -> Split:
    """A pack -> a clip cache (as `imfc prepare-data` writes it) and AV1 references (as
    `train.av1_refs` writes them), decoded here; returns the pack's split."""
    pack_dir, cache_dir, refs_dir = Path(pack_dir), Path(cache_dir), Path(refs_dir)
    manifest = json.loads((pack_dir / "manifest.json").read_text())
    if manifest.get("version") != PACK_VERSION:
        raise ValueError(f"{pack_dir}: pack version {manifest.get('version')}, this imfc reads {PACK_VERSION}")
    cache_dir.mkdir(parents=True, exist_ok=True)
    refs_dir.mkdir(parents=True, exist_ok=True)
    every = manifest["every"]
    for name, clip in manifest["clips"].items():
        frames = np.array(list(read_frames(pack_dir / f"{name}.mp4")))
        np.save(cache_dir / f"{name}.npy", frames)
        (cache_dir / f"{name}.json").write_text(json.dumps({"name": name, "frames": len(frames), "fps": clip["fps"]}))
        for crf in manifest["crfs"]:
            data = (pack_dir / f"{name}_crf{crf}.av1").read_bytes()
            decoder, pictures, pos = ReferenceDecoder(frames.shape[1]), [], 0
            while pos < len(data):
                n, pos = _read_varint(data, pos)
                pictures.append(decoder.decode(data[pos:pos + n]))
                pos += n
            indices = tuple(range(0, len(frames), every))[:len(pictures)]
            np.save(refs_path(refs_dir, name, crf), np.stack(pictures))
            meta = RefsMeta(name, crf, every, indices, len(data))
            refs_path(refs_dir, name, crf).with_suffix(".json").write_text(json.dumps(asdict(meta)))
    return Split(tuple(manifest["split"]["train"]), tuple(manifest["split"]["val"]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.pack", description=__doc__.split("\n\n")[0])
    parser.add_argument("cache_dir", type=Path, help="clips cached by `imfc prepare-data`")
    parser.add_argument("pack_dir", type=Path, nargs="?", default=Path(".pack"))
    parser.add_argument("--split", type=Path, default=Path("train/split.json"))
    parser.add_argument("--frames", type=int, default=200, help="frames per clip, from the start (default %(default)s)")
    parser.add_argument("--max-mib", type=float, default=DEFAULT_PACK_BYTES / 2**20,
                        help=f"size to fit, at most {MAX_PACK_BYTES >> 20} (default %(default)g)")
    args = parser.parse_args(argv)
    size = build(args.cache_dir.expanduser(), args.pack_dir, Split.load(args.split), args.frames,
                 max_bytes=int(args.max_mib * 2**20))
    manifest = json.loads((args.pack_dir / "manifest.json").read_text())
    print(f"{args.pack_dir}: {len(manifest['clips'])} clips, {size / 2**20:.1f} MiB (H.264 CRF {manifest['crf_h264']})")
    return 0 if size <= args.max_mib * 2**20 else 1


if __name__ == "__main__":
    sys.exit(main())
