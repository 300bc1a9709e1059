"""What the viewer sees: exactly one picture per source frame, in order.

Frames the receiver showed are kept; every frame id it skipped (lost, late, not sent, or not
rendered for lack of time) repeats the previous picture, so the output lines up frame for frame
with the source and every frame is accounted for.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np

from codec.receiver import Shown


class Outcome(IntEnum):
    KEYFRAME = 1
    TOKEN = 2  # synthesized from exactly the sender's references
    CONCEALED = 3  # synthesized from part of them
    HELD = 4  # nothing new for this frame: the previous picture again


OUTCOME = {Shown.KEYFRAME: Outcome.KEYFRAME, Shown.TOKEN: Outcome.TOKEN, Shown.CONCEALED: Outcome.CONCEALED}


@dataclass
class PlayedFrame:
    frame: int
    outcome: Outcome
    image: np.ndarray  # (R, R, 3) uint8
    shown_at: float | None  # clock time the picture was ready (None: held)


class Playout:
    def __init__(self, resolution: int, max_gap: int = 10_000):
        self.next = 0  # next frame id to emit
        self.last = np.full((resolution, resolution, 3), 128, np.uint8)  # grey until the first picture
        self.max_gap = max_gap  # a jump further than this (garbage) is not filled frame by frame

    def show(self, frame: int, outcome: Outcome, image: np.ndarray, now: float) -> list[PlayedFrame]:
        """A picture for ``frame`` -> the frames emitted: held ones for any gap, then it."""
        if frame < self.next or frame - self.next > self.max_gap:
            return []
        out = self._hold(frame)
        self.last = image
        self.next = frame + 1
        return out + [PlayedFrame(frame, outcome, image, now)]

    def finish(self, total: int) -> list[PlayedFrame]:
        """The end of the call after ``total`` source frames: hold through any missing tail."""
        return self._hold(min(total, self.next + self.max_gap))

    def _hold(self, upto: int) -> list[PlayedFrame]:
        out = [PlayedFrame(f, Outcome.HELD, self.last, None) for f in range(self.next, upto)]
        self.next = max(self.next, upto)
        return out
