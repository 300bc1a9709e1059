"""A network impairment layer: random loss, delay, jitter and a bandwidth cap, per direction.

``Link.schedule`` decides one datagram's fate (dropped, or the time it arrives); the asyncio
transport (``rtc.peer``) and the in-process simulation (``rtc.simulate``) both drive it, so a
seed gives the same losses in either. Jitter is drawn per packet, so packets can be reordered.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class LinkConfig:
    loss: float = 0.0  # probability that a datagram is dropped
    delay: float = 0.0  # seconds, one way
    jitter: float = 0.0  # seconds: each datagram is delayed by a further uniform [0, jitter)
    kbps: float = 0.0  # bandwidth cap (0: none); datagrams queue behind each other
    max_queue: float = 0.5  # seconds of queue behind the cap after which datagrams are dropped
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.loss <= 1 or self.delay < 0 or self.jitter < 0 or self.kbps < 0:
            raise ValueError("loss must be in [0, 1]; delay, jitter and kbps non-negative")


@dataclass
class LinkStats:
    sent: int = 0
    dropped: int = 0
    bytes: int = 0  # offered to the link, dropped or not


class Link:
    def __init__(self, cfg: LinkConfig = LinkConfig()):
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        self.busy_until = 0.0
        self.stats = LinkStats()

    def schedule(self, now: float, size: int) -> float | None:
        """A datagram of ``size`` bytes offered at ``now`` (s) -> its arrival time, or None if lost."""
        c = self.cfg
        self.stats.sent += 1
        self.stats.bytes += size
        lost = self.rng.random() < c.loss
        extra = self.rng.uniform(0, c.jitter) if c.jitter else 0.0
        start = max(now, self.busy_until)
        if c.kbps:
            if start - now > c.max_queue:
                lost = True
            else:
                self.busy_until = start + size * 8 / (c.kbps * 1000)
                start = self.busy_until
        if lost:
            self.stats.dropped += 1
            return None
        return start + c.delay + extra
