"""One clear line and a non-zero exit code for every error a user can cause; never a traceback."""

from __future__ import annotations

import os
import signal
import sys
from typing import Callable

from entropy.bitstream import BitstreamError

# Error classes of modules that pull in torch, named rather than imported, so a tool can refuse
# a bad stream before it pays for loading them (an exception of a module not loaded cannot occur).
_LAZY_USER_ERRORS = (("codec.video_io", "VideoError"), ("codec.nn.weights", "WeightsError"),
                     ("entropy.coding", "CoderNotReady"))


def is_user_error(e: BaseException) -> bool:
    if isinstance(e, (BitstreamError, OSError)):
        return True
    return any(module in sys.modules and isinstance(e, getattr(sys.modules[module], name))
               for module, name in _LAZY_USER_ERRORS)


def run(prog: str, action: Callable[[], int]) -> int:
    try:
        return action()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader of our output went away (`imfc info X | head -1`): stop quietly, as a shell
        # tool killed by SIGPIPE would, and keep the interpreter's last flush from failing again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except Exception as e:
        if not is_user_error(e):
            raise
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
