"""imfc prepare-data: crop clips around the face, resize and cache them for training."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from codec.video_io import VideoError
from train.prepare import list_videos, prepare_clip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="imfc prepare-data", description=__doc__)
    parser.add_argument("src", type=Path, help="folder of video files")
    parser.add_argument("out", type=Path, help="cache folder for <clip>.npy / <clip>.json")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--center", action="store_true", help="center-crop instead of face-crop")
    args = parser.parse_args(argv)
    if not args.src.is_dir():
        print(f"imfc prepare-data: {args.src}: not a folder", file=sys.stderr)
        return 2
    videos = list_videos(args.src)
    faces = 0
    for path in tqdm(videos, desc="clips", unit="clip"):
        if (args.out / f"{path.stem}.npy").exists() and (args.out / f"{path.stem}.json").exists():
            continue
        try:
            meta = prepare_clip(path, args.out, args.size, face=not args.center)
            faces += meta.crop == "face"
        except VideoError as e:
            print(f"imfc prepare-data: skipped: {e}", file=sys.stderr)
    print(f"{len(videos)} clips in {args.out} ({faces} face-cropped in this run)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
