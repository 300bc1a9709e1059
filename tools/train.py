"""imfc train PRESET [--field value ...]: train a model (see train/config.py for the fields)."""

from __future__ import annotations

import sys

from train.config import parse_config
from train.loop import train


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(argv)
    try:
        train(cfg)
    except FileNotFoundError as e:
        print(f"imfc train: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
