"""One clear line and a non-zero exit code for every error a user can cause; never a traceback."""

from __future__ import annotations

import sys
from typing import Callable

from codec.video_io import VideoError
from codec.nn.weights import WeightsError
from entropy.bitstream import BitstreamError
from entropy.coding import CoderNotReady

USER_ERRORS = (VideoError, BitstreamError, WeightsError, CoderNotReady, OSError)


def run(prog: str, action: Callable[[], int]) -> int:
    try:
        return action()
    except USER_ERRORS as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
