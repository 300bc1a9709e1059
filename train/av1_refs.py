"""AV1-decoded references for training, precomputed once (issue: "A model trained for this regime").

In the planned coding path SVT-AV1 codes every K-th frame as one continuous low-delay stream (each
coded frame predicted from the previous coded one, K frames earlier in the video), libdav1d decodes
it, and the decoded pictures are the model's references. Coding is far slower than a training step,
so every cached clip is coded here once per CRF, with the anchors' own SVT-AV1 settings
(`evaluation.anchors`: preset 8, pred-struct 1, one keyframe, scd 0), and the decoded pictures are
saved next to the clips' cache:

    OUT_DIR/{clip}_crf{C}.npy   (N, S, S, 3) uint8, the decoded frames 0, K, 2K, ... of the clip
    OUT_DIR/{clip}_crf{C}.json  {"clip", "crf", "every", "indices", "bytes", "intra_offset"}

    python -m train.av1_refs ~/.cache/imfc/data/faces256 ~/.cache/imfc/data/av1refs --every 6 --crf 50 58 63

``--intra-offset O``: SVT's fixed qindex offsets instead of its CRF mode (the coding path's own
references below 5 kbps, `codec.av1_reference.quantizers_for_kbps`); a folder holds one kind.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, replace
from fractions import Fraction
from pathlib import Path

import numpy as np
from tqdm import tqdm

from codec.av1_reference import MAX_INTRA_OFFSET, MIN_INTRA_OFFSET
from evaluation.anchors import Anchor, round_trip


@dataclass(frozen=True)
class RefsMeta:
    clip: str
    crf: int
    every: int  # K: frames 0, K, 2K, ... of the clip are coded
    indices: tuple[int, ...]  # the clip's frame index of each decoded picture
    bytes: int  # the whole AV1 elementary stream
    intra_offset: int | None = None  # fixed qindex offsets, the intra frame's; None: CRF mode


def refs_path(out_dir: Path, clip: str, crf: int) -> Path:
    return Path(out_dir) / f"{clip}_crf{crf}.npy"


def code_references(frames: np.ndarray, every: int, crf: int, fps: Fraction,
                    intra_offset: int | None = None) -> tuple[np.ndarray, RefsMeta]:
    """Frames (T, S, S, 3) uint8 -> the decoded AV1 pictures of frames 0, K, 2K, ... (N, S, S, 3) and
    their metadata (clip name left empty). ``fps``: the coded stream's rate, the clip's divided by K,
    so the encoder sees the real time between its pictures."""
    indices = tuple(range(0, len(frames), every))
    result = round_trip(Anchor.SVTAV1, [np.ascontiguousarray(frames[i]) for i in indices], fps, crf,
                        intra_offset=intra_offset)
    return np.stack(result.frames), RefsMeta("", crf, every, indices, result.bytes, intra_offset)


def clip_fps(cache_dir: Path, clip: str, default: float = 25.0) -> float:
    """The source frame rate `imfc prepare-data` recorded beside the clip (``default`` where absent)."""
    meta = Path(cache_dir) / f"{clip}.json"
    return float(json.loads(meta.read_text()).get("fps", default)) if meta.exists() else default


def precompute(cache_dir: Path, out_dir: Path, every: int, crfs: tuple[int, ...], clips: tuple[str, ...] | None = None,
               progress: bool = True, intra_offset: int | None = None) -> list[RefsMeta]:
    """Code every clip of ``cache_dir`` (or just ``clips``) at each CRF; files already there are kept,
    so an interrupted run resumes. Each file is written under a temporary name and renamed, so a
    reader never sees half a file."""
    cache_dir, out_dir = Path(cache_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = clips if clips is not None else tuple(sorted(p.stem for p in cache_dir.glob("*.npy")))
    done = []
    for name in tqdm([(n, c) for n in names for c in crfs], desc="av1 refs", unit="stream", disable=not progress):
        clip, crf = name
        path = refs_path(out_dir, clip, crf)
        if path.exists() and path.with_suffix(".json").exists():
            d = json.loads(path.with_suffix(".json").read_text())
            if d["every"] != every or d.get("intra_offset") != intra_offset:
                raise ValueError(f"{path} holds every {d['every']}-th frame at intra offset {d.get('intra_offset')}, "
                                 f"asked for {every} at {intra_offset}: use another OUT_DIR")
            done.append(RefsMeta(d["clip"], d["crf"], d["every"], tuple(d["indices"]), d["bytes"], d.get("intra_offset")))
            continue
        frames = np.load(cache_dir / f"{clip}.npy", mmap_mode="r")
        fps = Fraction(clip_fps(cache_dir, clip) / every).limit_denominator(1001)
        decoded, meta = code_references(frames, every, crf, fps, intra_offset)
        meta = replace(meta, clip=clip)
        tmp = path.with_name(path.stem + ".tmp.npy")
        np.save(tmp, decoded)
        tmp.replace(path)
        path.with_suffix(".json").write_text(json.dumps(asdict(meta)))
        done.append(meta)
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.av1_refs", description=__doc__.split("\n\n")[0])
    parser.add_argument("cache_dir", type=Path, help="clips cached by `imfc prepare-data`")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--every", type=int, default=6, help="K: code frames 0, K, 2K, ...")
    parser.add_argument("--crf", type=int, nargs="+", default=[50, 58, 63])
    parser.add_argument("--clips", nargs="*", default=None, help="only these clips (default: all in cache_dir)")
    parser.add_argument("--intra-offset", type=int, default=None,
                        help="SVT's fixed qindex offsets, the intra frame at this one (default: CRF mode)")
    args = parser.parse_args(argv)
    if args.intra_offset is not None and not MIN_INTRA_OFFSET <= args.intra_offset <= MAX_INTRA_OFFSET:
        parser.error(f"--intra-offset must be in {MIN_INTRA_OFFSET}..{MAX_INTRA_OFFSET}")
    metas = precompute(args.cache_dir.expanduser(), args.out_dir.expanduser(), args.every, tuple(args.crf),
                       tuple(args.clips) if args.clips else None, intra_offset=args.intra_offset)
    for crf in args.crf:
        sel = [m for m in metas if m.crf == crf]
        pictures = sum(len(m.indices) for m in sel)
        print(f"CRF {crf}: {len(sel)} clips, {pictures} pictures, {sum(m.bytes for m in sel) / max(1, pictures):.0f} "
              "bytes per picture")
    return 0


if __name__ == "__main__":
    sys.exit(main())
