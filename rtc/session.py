"""Both ends of a real-time call over WebRTC: ``run_sender`` and ``run_receiver``.

    sender process                                         receiver process
    source -> Sender.encode -> ImpairedChannel ~~ media ~~> queue -> Receiver.receive -> render -> Playout -> file
              Sender.on_feedback <~~~~~~~~~~~~~~~~~~ media ~~ ImpairedChannel <- Receiver.feedback
    hello, bye (capture clock) ----------------- control ----------------> report (printed by both)

The model runs on one worker thread per process (``run_in_executor``), never on the event loop,
so aiortc keeps servicing its sockets while a frame is encoded or synthesized. The sender paces
frames at the source rate and skips the ones it has no time for; the receiver decodes every
datagram in arrival order but synthesizes only the newest frame each time it gets to it, so a
slow machine shows fewer frames rather than older ones. Latency is capture (the frame's slot
on the sender's clock) to display (its picture ready on the receiver), on the same machine clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from aiortc import RTCDataChannel

from codec.nn.model import IMFCodec
from codec.receiver import ReceivedFrame, Receiver
from codec.sender import FrameKind, SentFrame, Sender, SenderSettings
from codec.video_io import Box, FrameWriter, to_tensor, to_uint8
from codec.nn.weights import model_id
from entropy.bitstream import MAX_FPS, MAX_SIDE, MIN_FPS
from rtc.impairment import LinkConfig
from rtc.peer import (
    CONTROL, MEDIA, UDP_IP_OVERHEAD, ImpairedChannel, open_channels, peer_connection, wait_open, wire_counters,
)
from rtc.playout import OUTCOME, PlayedFrame, Playout
from rtc.report import CallReport, summarize
from rtc.signalling import SignallingError, answer_one, offer_to
from rtc.source import Source, open_source

STRAGGLERS = 0.3  # seconds the receiver keeps listening after the sender says bye
CLOCK_SLACK = 10.0  # seconds a sender's frame ids may run ahead of the receiver's clock since the hello
REPORT_GRACE = 10.0  # seconds the receiver waits for the sender to hang up after the report


class CallError(Exception):
    pass


@dataclass(frozen=True)
class CallConfig:
    host: str = "127.0.0.1"
    port: int = 8765
    link: LinkConfig = LinkConfig()  # impairment of what this side sends
    timeout: float = 60.0  # seconds to connect, and to hear the far side's report


@dataclass
class SenderSummary:
    frames: int = 0
    not_sent: int = 0
    sender_holds: int = 0
    keyframes_sent: int = 0
    packets_sent: int = 0
    packets_dropped: int = 0  # by this side's impairment layer
    media_bytes: int = 0
    wire_bytes: int | None = None  # everything this side sent while frames flowed, on the wire
    # (imfc packets + SCTP/DTLS framing and acks + IP/UDP headers); None if aiortc hides it
    captured: list[float] = field(default_factory=list)  # clock time of each frame's capture slot
    syntheses_left_out: int = 0  # the sender had no time for them (a synthesis took longer than a frame)


# -- sender ------------------------------------------------------------------------------------
async def run_sender(model: IMFCodec, source: Source, settings: SenderSettings, call: CallConfig,
                     max_frames: int | None = None) -> tuple[SenderSummary, dict]:
    """Call the receiver listening on call.host:call.port and send ``source`` -> (what we sent,
    the receiver's report as it sent it)."""
    loop = asyncio.get_running_loop()
    pc = peer_connection()
    media, control = open_channels(pc)
    feedback: deque[bytes] = deque()
    report: asyncio.Future = loop.create_future()
    media.on("message", lambda m: feedback.append(m) if isinstance(m, bytes) else None)

    def on_control(message: str) -> None:
        msg = _control(message)
        if "report" in msg and not report.done():
            report.set_result(msg["report"])
        elif "error" in msg and not report.done():
            report.set_exception(CallError(f"receiver: {msg['error']}"))

    control.on("message", on_control)

    @pc.on("connectionstatechange")
    def on_state() -> None:
        if pc.connectionState in ("failed", "closed") and not report.done():
            report.set_exception(CallError("the receiver hung up before sending its report"))

    sender = Sender(model, settings, float(source.fps))
    pool = ThreadPoolExecutor(1)  # the model's thread: Sender state is touched by it only
    try:
        # before calling: the first frames should not pay for warm-up or for filling the reader
        # ... and the sender knows from the start whether a synthesis fits a frame
        sender.synthesis_seconds = await loop.run_in_executor(pool, warm_up, model)
        # a file is read up to 4 s ahead; a camera's frames are taken as they come (no stale queue)
        reader = Prefetch(iter(source.frames), depth=1 if source.live else max(int(4 * float(source.fps)), 1))
        if not source.live:
            await loop.run_in_executor(None, reader.wait_full)
        await pc.setLocalDescription(await pc.createOffer())
        await pc.setRemoteDescription(await offer_to(call.host, call.port, pc.localDescription, call.timeout))
        await asyncio.wait_for(asyncio.gather(wait_open(media, call.timeout), wait_open(control, call.timeout)),
                               call.timeout)
        r = model.cfg.resolution
        control.send(json.dumps({"hello": {
            "preset": model.cfg.name, "model_id": model_id(model).hex(), "resolution": r,
            "fps": [source.fps.numerator, source.fps.denominator], "crop": [source.box.left, source.box.top, source.box.size],
        }}))
        out = ImpairedChannel(media, call.link)
        wire0 = wire_counters(pc)
        summary = await _send_frames(sender, pool, reader, source, out, feedback, max_frames, report)
        await out.drain()
        wire1 = wire_counters(pc)
        if wire0 is not None and wire1 is not None:
            summary.wire_bytes = wire1[0] - wire0[0] + UDP_IP_OVERHEAD * (wire1[1] - wire0[1])
        summary.packets_dropped, summary.media_bytes = out.link.stats.dropped, out.bytes
        if report.done():  # the receiver gave up on us (e.g. another model): its error
            return summary, report.result()
        if control.readyState != "open":
            raise CallError("the receiver hung up before the end of the call")
        control.send(json.dumps({"bye": asdict(summary)}))
        return summary, await asyncio.wait_for(report, call.timeout)
    except asyncio.TimeoutError:
        raise CallError("the call timed out (is the receiver running, with the same model?)") from None
    finally:
        pool.submit(sender.close)  # on the model's thread, after any frame still being coded
        pool.shutdown(wait=True)
        await pc.close()


async def _send_frames(sender: Sender, pool: ThreadPoolExecutor, reader: "Prefetch", source: Source,
                       out: ImpairedChannel, feedback: deque[bytes], max_frames: int | None,
                       stop: asyncio.Future) -> SenderSummary:
    loop = asyncio.get_running_loop()
    summary = SenderSummary()
    period = 1 / float(source.fps)
    sender.frame_period = period  # real time: no synthesis that would make the next frames late

    def step(frame: np.ndarray) -> SentFrame:
        while feedback:  # applied on the model's thread: Sender state is touched by one thread only
            sender.on_feedback(feedback.popleft())
        return sender.encode(to_tensor(frame))

    start = time.time() + 0.05
    i = 0
    while (max_frames is None or i < max_frames) and not stop.done():
        slot = start + i * period
        if not source.live:
            await asyncio.sleep(max(slot - time.time(), 0))
        frame = await loop.run_in_executor(None, reader.get)
        if frame is None:
            break
        summary.captured.append(time.time() if source.live else slot)
        if not source.live and time.time() > slot + period:
            # more than a frame late: drop this one, as a camera pipeline would
            await loop.run_in_executor(pool, sender.skip)
            summary.not_sent += 1
        else:
            sent = await loop.run_in_executor(pool, step, frame)
            summary.keyframes_sent += sent.kind == FrameKind.KEYFRAME
            summary.sender_holds += sent.kind == FrameKind.HOLD
            summary.packets_sent += len(sent.packets)
            for p in sent.packets:
                out.send(p)
        i += 1
    summary.frames = i
    summary.syntheses_left_out = sender.syntheses_left_out
    return summary


class Prefetch:
    """Reads frames on a thread of its own, ahead of the sender, so that decoding and resizing a
    video file do not eat into the encoder's time (a camera delivers ready frames too)."""

    def __init__(self, frames: Iterator[np.ndarray], depth: int):
        self.queue: queue.Queue[np.ndarray | None] = queue.Queue(depth)
        self.thread = threading.Thread(target=self._fill, args=(frames,), daemon=True)
        self.thread.start()

    def _fill(self, frames: Iterator[np.ndarray]) -> None:
        try:
            for f in frames:
                self.queue.put(f)
        finally:
            self.queue.put(None)

    def wait_full(self) -> None:
        while not self.queue.full() and self.thread.is_alive():
            time.sleep(0.01)

    def get(self) -> np.ndarray | None:
        return self.queue.get()


def warm_up(model: IMFCodec) -> float:
    """Run every network once on a blank frame: the first call of each is several times slower
    (allocations, kernel selection) and would otherwise land on the first frames of the call.
    -> the wall time of one synthesis from a bank of 1, warm: what a sender has to fit in a frame."""
    r = model.cfg.resolution
    x = torch.zeros(1, 3, r, r)
    sender = Sender(model, SenderSettings(quality_floor=1.0))
    sender.encode(x)
    sender.state.refs[0].acked = True
    sender.encode(x)
    with torch.no_grad():
        bank, u = [model.reference_from_picture(x)], model.token_symbols(x).round()
        model.synthesize(u, bank)
        start = time.perf_counter()
        model.synthesize(u, bank)
        return time.perf_counter() - start


# -- receiver ----------------------------------------------------------------------------------
@dataclass
class Hello:
    preset: str
    model_id: str
    resolution: int
    fps: Fraction
    crop: Box


async def run_receiver(model: IMFCodec, out_path: Path, call: CallConfig,
                       compare: Callable[[Hello], list[np.ndarray]] | None = None,
                       listening: Callable[[int], None] | None = None) -> CallReport:
    """Wait for one call on call.host:call.port, write what it shows to ``out_path`` (one picture
    per source frame) -> the call's report. ``compare(hello)`` gives the source frames to measure
    quality against."""
    loop = asyncio.get_running_loop()
    pc = peer_connection()
    channels: dict[str, RTCDataChannel] = {}
    datagrams: asyncio.Queue[bytes] = asyncio.Queue()
    control_msgs: asyncio.Queue[dict] = asyncio.Queue()
    both = asyncio.Event()

    @pc.on("datachannel")
    def on_channel(channel: RTCDataChannel) -> None:
        channels[channel.label] = channel
        if channel.label == MEDIA:
            channel.on("message", lambda m: datagrams.put_nowait(m) if isinstance(m, bytes) else None)
        elif channel.label == CONTROL:
            channel.on("message", lambda m: control_msgs.put_nowait(_control(m)))
        if {MEDIA, CONTROL} <= channels.keys():
            both.set()

    hung_up = asyncio.Event()

    @pc.on("connectionstatechange")
    def on_state() -> None:
        if pc.connectionState in ("failed", "closed"):
            hung_up.set()
            control_msgs.put_nowait({"bye": {}})  # the sender is gone: end with what arrived

    async def answer(offer):
        await pc.setRemoteDescription(offer)
        await pc.setLocalDescription(await pc.createAnswer())
        return pc.localDescription

    try:
        await loop.run_in_executor(None, warm_up, model)
        await answer_one(call.host, call.port, answer, call.timeout, listening)
        await asyncio.wait_for(both.wait(), call.timeout)
        hello = _hello(await asyncio.wait_for(control_msgs.get(), call.timeout))
        msg = _hello_problem(hello, model)
        if msg:
            channels[CONTROL].send(json.dumps({"error": msg}))
            raise CallError(msg)
        session = _ReceiveSession(model, hello, out_path, ImpairedChannel(channels[MEDIA], call.link))
        bye = await session.run(datagrams, control_msgs, call.timeout)
        source = await loop.run_in_executor(None, compare, hello) if compare is not None else []
        captured = bye.get("captured", [])
        if not (isinstance(captured, list) and all(isinstance(t, (int, float)) for t in captured)):
            captured = []
        report = summarize(
            session.played, source, float(hello.fps), captured, not_sent=_count(bye, "not_sent"),
            sender_holds=_count(bye, "sender_holds"),
            keyframes_sent=_count(bye, "keyframes_sent"), keyframe_requests=session.receiver.stats.keyframe_requests,
            packets_sent=_count(bye, "packets_sent"), packets_lost=_count(bye, "packets_dropped"),
            media_bytes=_count(bye, "media_bytes"), feedback_bytes=session.feedback.bytes)
        channels[CONTROL].send(json.dumps({"report": asdict(report)}))
        # the sender hangs up once it has the report; closing first could lose it
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(hung_up.wait(), REPORT_GRACE)
        return report
    except asyncio.TimeoutError:
        raise CallError("the call timed out waiting for the sender") from None
    except SignallingError as e:
        raise CallError(str(e)) from None
    finally:
        await pc.close()


def _control(message: str | bytes) -> dict:
    """A control-channel message -> its JSON object; anything else reads as an empty one (ignored)."""
    try:
        msg = json.loads(message)
    except (ValueError, TypeError):
        return {}
    return msg if isinstance(msg, dict) else {}


def _count(msg: dict, key: str, default: int = 0) -> int:
    """A non-negative integer the peer reports, or ``default`` where it sent something else."""
    v = msg.get(key, default)
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else default


def _hello(msg: dict) -> Hello:
    try:
        h = msg["hello"]
        crop = Box(*(int(v) for v in h["crop"]))
        return Hello(str(h["preset"]), str(h["model_id"]), int(h["resolution"]), Fraction(*h["fps"]), crop)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        raise CallError("the sender did not introduce itself (not an imfc call?)") from None


def _hello_problem(hello: Hello, model: IMFCodec) -> str | None:
    """Why the receiver cannot take this call, or None. Everything the receiver allocates follows
    the hello, so each claim is checked against our model and the bitstream's limits."""
    if (hello.preset, hello.model_id) != (model.cfg.name, model_id(model).hex()):
        return (f"the sender's model (preset {hello.preset!r}, id {hello.model_id}) is not ours "
                f"({model.cfg.name!r}, id {model_id(model).hex()}): use the same --weights")
    if hello.resolution != model.cfg.resolution:
        return f"the sender codes {hello.resolution}x{hello.resolution}, our model {model.cfg.resolution}x{model.cfg.resolution}"
    if not MIN_FPS <= hello.fps <= MAX_FPS:
        return f"the sender's frame rate {float(hello.fps):g} is implausible ({float(MIN_FPS)} to {MAX_FPS} fps)"
    if not 1 <= hello.crop.size <= MAX_SIDE:
        return f"the sender's crop size {hello.crop.size} is implausible (1 to {MAX_SIDE})"
    return None


class _ReceiveSession:
    """The receiving loop's state: codec receiver, playout, output file, worker thread."""

    def __init__(self, model: IMFCodec, hello: Hello, out_path: Path, feedback: ImpairedChannel):
        self.receiver = Receiver(model, (hello.resolution, hello.resolution))
        self.playout = Playout(hello.resolution)
        self.writer = FrameWriter(out_path, hello.fps)
        self.feedback = feedback
        self.played: list[PlayedFrame] = []
        self.fps = hello.fps
        self.started = time.time()

    def plausible_frames(self) -> int:
        """Frames the sender can have captured by now (with CLOCK_SLACK): a packet or bye that
        claims a later frame is not played, so no claim makes the receiver write without end."""
        return int((time.time() - self.started + CLOCK_SLACK) * self.fps)

    async def run(self, datagrams: asyncio.Queue, control: asyncio.Queue, idle: float) -> dict:
        """Receive until the sender's bye, the connection dies, or ``idle`` seconds without a
        datagram -> the bye's contents."""
        loop = asyncio.get_running_loop()
        bye: dict | None = None
        bye_at = 0.0
        heard = time.time()
        with ThreadPoolExecutor(1) as pool:
            try:
                while True:
                    if bye is None and not control.empty():
                        bye = (await control.get()).get("bye", {})
                        bye = bye if isinstance(bye, dict) else {}
                        bye_at = time.time()
                    if datagrams.empty():
                        if bye is not None and time.time() > bye_at + STRAGGLERS:
                            break
                        if time.time() > heard + idle:
                            bye = {}
                            break
                        await asyncio.sleep(0.005)
                        continue
                    heard = time.time()
                    batch = [datagrams.get_nowait() for _ in range(datagrams.qsize())]
                    frames, fb = await loop.run_in_executor(pool, self._receive, batch)
                    self.feedback.send(fb)
                    frames = [f for f in frames if f.frame < self.plausible_frames()]
                    if frames:  # only the newest is worth the synthesis; the others are held
                        newest = frames[-1]
                        image = await loop.run_in_executor(pool, self._render, newest)
                        played = self.playout.show(newest.frame, OUTCOME[newest.kind], image, time.time())
                        await loop.run_in_executor(pool, self._play, played)  # video encoding: off the loop
                self._play(self.playout.finish(min(_count(bye, "frames", self.playout.next), self.plausible_frames())))
                self.writer.close()
            except BaseException:
                self.writer.abort()
                raise
        return bye

    def _receive(self, batch: list[bytes]) -> tuple[list[ReceivedFrame], bytes]:
        frames = [f for data in batch for f in self.receiver.receive(data)]
        return frames, self.receiver.feedback()

    def _render(self, f: ReceivedFrame) -> np.ndarray:
        return to_uint8(self.receiver.render(f))

    def _play(self, played: list[PlayedFrame]) -> None:
        for p in played:
            self.writer.write(p.image)
        self.played += played


def compare_with(path: str, limit: int | None = None) -> Callable[[Hello], list[np.ndarray]]:
    """Source frames of a video file, cropped as the sender announced, for quality measurement."""
    def frames(hello: Hello) -> list[np.ndarray]:
        return list(open_source(path, hello.resolution, limit, hello.crop).frames)
    return frames
