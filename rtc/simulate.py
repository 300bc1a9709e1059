"""A call in one process on a simulated clock: Sender -> impaired link -> Receiver, and feedback
back through a second impaired link. No CPU time is simulated (the model takes zero seconds), so
this isolates the codec's behaviour under loss from the machine's speed; ``rtc.session`` runs
the same Sender and Receiver over a real WebRTC connection in real time.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
from torch import Tensor

from codec.nn.model import IMFCodec
from codec.receiver import Receiver
from codec.sender import FrameKind, Sender, SenderSettings
from codec.video_io import to_uint8
from rtc.impairment import Link, LinkConfig
from rtc.playout import OUTCOME, PlayedFrame, Playout


@dataclass
class SimulatedCall:
    played: list[PlayedFrame]
    sent: list[FrameKind]  # per source frame
    recon: list[np.ndarray | None]  # per source frame: the sender's closed-loop picture, if it made one
    sender: Sender
    receiver: Receiver
    forward: Link
    backward: Link
    media_bytes: int = 0
    feedback_bytes: int = 0
    captured: list[float] = field(default_factory=list)


def simulate_call(model: IMFCodec, frames: Iterable[Tensor], fps: float, settings: SenderSettings = SenderSettings(),
                  forward: LinkConfig = LinkConfig(), backward: LinkConfig = LinkConfig(),
                  drop: Callable[[int, bytes], bool] | None = None,
                  requests: Iterable[int] = ()) -> SimulatedCall:
    """Run a call over ``frames`` captured at ``fps``. ``drop(index, datagram)`` can discard chosen
    media packets on top of the random loss; ``requests`` are frame ids at which the receiver asks
    for a keyframe on its own (as a viewer's client would after, say, a decoder reset)."""
    sender, receiver = Sender(model, settings, fps), Receiver(model, (model.cfg.resolution,) * 2)
    fwd, back = Link(forward), Link(backward)
    playout = Playout(model.cfg.resolution)
    call = SimulatedCall([], [], [], sender, receiver, fwd, back)
    events: list[tuple[float, int, bool, bytes]] = []  # (time, order, to the receiver?, datagram)
    order = 0
    requests = set(requests)

    def send(now: float, data: bytes, to_receiver: bool) -> None:
        nonlocal order
        at = (fwd if to_receiver else back).schedule(now, len(data))
        if at is not None:
            heapq.heappush(events, (at, order, to_receiver, data))
        order += 1

    def deliver_until(t: float) -> None:
        while events and events[0][0] <= t:
            now, _, to_receiver, data = heapq.heappop(events)
            if not to_receiver:
                sender.on_feedback(data)
                continue
            for f in receiver.receive(data):
                image = to_uint8(receiver.render(f))
                call.played += playout.show(f.frame, OUTCOME[f.kind], image, now)
            fb = receiver.feedback()
            call.feedback_bytes += len(fb)
            send(now, fb, False)

    packet_index = 0
    for i, x in enumerate(frames):
        now = i / fps
        deliver_until(now)
        if i in requests:
            receiver.request_keyframe()
            fb = receiver.feedback()
            call.feedback_bytes += len(fb)
            send(now, fb, False)
        out = sender.encode(x)
        call.sent.append(out.kind)
        call.recon.append(to_uint8(out.x_hat) if out.x_hat is not None else None)
        call.captured.append(now)
        for data in out.packets:
            call.media_bytes += len(data)
            if drop is None or not drop(packet_index, data):
                send(now, data, True)
            packet_index += 1
    sender.close()
    deliver_until(float("inf"))
    call.played += playout.finish(len(call.sent))
    return call
