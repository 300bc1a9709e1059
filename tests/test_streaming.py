"""Sender/Receiver over a simulated impaired link: loss, reordering, keyframe requests, fuzzing."""

import random
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from codec.receiver import Receiver
from codec.sender import FrameKind, Sender, SenderSettings
from entropy import packet as pk
from rtc.impairment import Link, LinkConfig
from rtc.playout import Outcome
from rtc.simulate import simulate_call
from tests.test_packet import feedback as feedback_packets
from tests.test_packet import packets as any_packets

# quality floor 1 dB: never triggers with the untrained tiny model, but makes the sender compute
# its closed-loop picture, so tests can check that the receiver shows exactly that
CHECKED = SenderSettings(quality_floor=1.0, max_keyframe_interval=15)


def assert_exact_where_shown(call):
    """Every frame the receiver showed as decoded is bit-exactly the sender's closed-loop picture."""
    for p in call.played:
        if p.outcome in (Outcome.KEYFRAME, Outcome.TOKEN):
            assert np.array_equal(p.image, call.recon[p.frame]), f"frame {p.frame} differs"


def test_lossless_call_equals_closed_loop(model, frames):
    call = simulate_call(model, frames, 25, CHECKED, LinkConfig(delay=0.03), LinkConfig(delay=0.03))
    assert [p.frame for p in call.played] == list(range(40))
    assert all(p.outcome in (Outcome.KEYFRAME, Outcome.TOKEN) for p in call.played)
    assert [i for i, k in enumerate(call.sent) if k == FrameKind.KEYFRAME] == [0, 15, 30]
    assert_exact_where_shown(call)


def test_call_with_coarse_keyframes_equals_closed_loop(model, frames):
    settings = replace(CHECKED, keyframe_step=3.0)
    call = simulate_call(model, frames[:16], 25, settings, LinkConfig(delay=0.03), LinkConfig(delay=0.03))
    assert all(p.outcome in (Outcome.KEYFRAME, Outcome.TOKEN) for p in call.played)
    assert_exact_where_shown(call)


def test_rate_cap_defers_the_floors_keyframes(model, frames):
    """A floor every token frame misses asks for a keyframe each frame; a cap that pays for one every
    4 frames lets only some through, the media stays within cap x duration + the 2 s bucket, and
    the call stays exact."""
    fps = 5.0  # the 40 frames outlast the 2 s bucket
    first = Sender(model, SenderSettings(quality_floor=99.0), fps).encode(frames[0])
    kbps = 8 * sum(map(len, first.packets)) * fps / 4 / 1000
    settings = SenderSettings(quality_floor=99.0, max_keyframe_interval=250, max_kbps=kbps)
    call = simulate_call(model, frames, fps, settings, LinkConfig(delay=0.03), LinkConfig(delay=0.03))
    keyframes = call.sent.count(FrameKind.KEYFRAME)
    uncapped = simulate_call(model, frames, fps, SenderSettings(quality_floor=99.0, max_keyframe_interval=250),
                             LinkConfig(delay=0.03), LinkConfig(delay=0.03))
    assert 1 < keyframes < uncapped.sent.count(FrameKind.KEYFRAME)
    assert call.media_bytes * 8 <= 1000 * kbps * (len(frames) / fps + 2.0)
    assert_exact_where_shown(call)


@pytest.mark.parametrize("seed", range(3))
def test_twenty_percent_loss_every_frame_accounted_for(model, frames, seed):
    """Loss both ways, jitter (so reordering), keyframes in 3 fragments: the call completes, the
    output has exactly one picture per source frame, and whatever was decoded is exact."""
    link = dict(loss=0.2, delay=0.02, jitter=0.06)
    s = SenderSettings(quality_floor=1.0, max_keyframe_interval=15, max_packet=300)
    call = simulate_call(model, frames, 25, s, LinkConfig(**link, seed=seed), LinkConfig(**link, seed=seed + 100))
    assert [p.frame for p in call.played] == list(range(40))
    assert call.forward.stats.dropped > 0
    shown = sum(p.outcome != Outcome.HELD for p in call.played)
    assert shown >= 20
    assert_exact_where_shown(call)


def test_lost_token_packets_are_concealed_and_the_next_one_decodes(model, frames):
    sizes = {}

    def drop(i, data):
        p = pk.from_bytes(data)
        sizes[p.frame] = isinstance(p, pk.TokenPacket)
        return isinstance(p, pk.TokenPacket) and p.frame in (5, 6, 20)

    call = simulate_call(model, frames, 25, CHECKED, drop=drop)
    held = [p.frame for p in call.played if p.outcome == Outcome.HELD]
    assert held == [5, 6, 20]
    assert np.array_equal(call.played[5].image, call.played[4].image)  # hold
    assert call.played[7].outcome == Outcome.TOKEN
    assert_exact_where_shown(call)


def test_lost_keyframe_fragment_keeps_old_reference_and_requests_keyframe(model, frames):
    """One fragment of the keyframe at frame 15 is lost: the receiver keeps decoding exactly with
    its last complete reference, asks for a keyframe, and gets one within a bounded number of frames."""
    s = SenderSettings(quality_floor=1.0, max_keyframe_interval=15, max_packet=200)

    def drop(i, data):
        p = pk.from_bytes(data)
        return isinstance(p, pk.KeyframeFragment) and p.frame == 15 and p.index == 1

    call = simulate_call(model, frames, 25, s, LinkConfig(delay=0.02), LinkConfig(delay=0.02), drop=drop)
    assert call.receiver.stats.keyframes_lost == 1 and call.receiver.stats.keyframe_requests == 1
    keyframes = [i for i, k in enumerate(call.sent) if k == FrameKind.KEYFRAME]
    assert keyframes[:2] == [0, 15] and 16 <= keyframes[2] <= 18  # answered after one round trip
    outcomes = [p.outcome for p in call.played]
    assert outcomes[15] == Outcome.HELD
    assert all(o == Outcome.TOKEN for o in outcomes[16:keyframes[2]])  # old reference, exact
    assert outcomes[keyframes[2]] == Outcome.KEYFRAME
    assert_exact_where_shown(call)


def test_wholly_lost_keyframe_is_noticed_from_the_next_token(model, frames):
    """All of the keyframe at frame 15 is lost: the next token packet says a newer keyframe is
    pending, the receiver has no trace of it and asks again, without waiting for the timeout."""
    def drop(i, data):
        p = pk.from_bytes(data)
        return isinstance(p, pk.KeyframeFragment) and p.frame == 15

    call = simulate_call(model, frames, 25, CHECKED, LinkConfig(delay=0.02), LinkConfig(delay=0.02), drop=drop)
    assert call.receiver.stats.keyframe_requests == 1
    keyframes = [i for i, k in enumerate(call.sent) if k == FrameKind.KEYFRAME]
    assert 16 <= keyframes[2] <= 18
    assert_exact_where_shown(call)


def test_keyframe_request_round_trip(model, frames):
    call = simulate_call(model, frames[:20], 25, SenderSettings(quality_floor=0), requests=[8])
    keyframes = [i for i, k in enumerate(call.sent) if k == FrameKind.KEYFRAME]
    assert keyframes == [0, 8] or keyframes == [0, 9]
    assert call.played[keyframes[1]].outcome == Outcome.KEYFRAME


def test_first_keyframe_lost(model, frames):
    call = simulate_call(model, frames[:20], 25, CHECKED, drop=lambda i, data: i == 0)
    keyframes = [i for i, k in enumerate(call.sent) if k == FrameKind.KEYFRAME]
    assert keyframes[:2] == [0, 2]  # frame 1 names a reference the receiver never saw: it asks at once
    assert [p.outcome for p in call.played[:3]] == [Outcome.HELD, Outcome.HELD, Outcome.KEYFRAME]
    assert_exact_where_shown(call)


def test_bandwidth_cap_queues_and_drops():
    link = Link(LinkConfig(kbps=8, max_queue=0.5))  # 1000 bytes/s
    times = [link.schedule(0.0, 100) for _ in range(10)]
    assert times[:5] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])
    assert None in times and link.stats.dropped >= 3


def recorded_stream(model, frames) -> list[bytes]:
    sender = Sender(model, SenderSettings(quality_floor=0, max_keyframe_interval=6, max_packet=150))
    out = []
    for x in frames[:14]:
        out += sender.encode(x).packets
        sender.on_feedback(receiver_ack(sender))
    return out


def receiver_ack(sender: Sender) -> bytes:
    """Feedback acknowledging everything sent so far (what a perfect receiver would say)."""
    st = sender.state
    ref, mask = pk.ref_set(sorted(st.refs)[-pk.REF_WINDOW:])
    return pk.to_bytes(pk.Feedback(0, st.frame - 1, ref, mask, pk.Flags.HAS_ACK | pk.Flags.HAS_REFS))


@pytest.fixture(scope="module")
def stream(model, frames):
    return recorded_stream(model, frames)


def mutate(data: bytes, rng: random.Random) -> bytes:
    """Change some bytes and fix the check, so the packet parses and reaches the decoder."""
    raw = bytearray(data[:-2])
    for _ in range(rng.randint(1, 4)):
        raw[rng.randrange(len(raw))] = rng.randrange(256)
    return pk.to_bytes(pk.from_bytes(bytes(raw) + pk._check(bytes(raw)))) if _parses(raw) else bytes(raw)


def _parses(raw: bytearray) -> bool:
    try:
        pk.from_bytes(bytes(raw) + pk._check(bytes(raw)))
        return True
    except pk.PacketError:
        return False


@settings(deadline=None, max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(["packet", "mutated", "random", "dup", "made"]), st.integers(0, 10**9)),
                max_size=40), st.lists(any_packets, min_size=1, max_size=5))
def test_receiver_survives_any_packet_sequence(model, stream, ops, made):
    """Real packets in any order, duplicated, mutated (with a valid check) or replaced by garbage:
    the receiver never raises, returns only frames newer than the last, and its state stays bounded."""
    receiver = Receiver(model, (model.cfg.resolution,) * 2)
    last = -1
    for op, n in ops:
        rng = random.Random(n)
        data = stream[n % len(stream)]
        if op == "mutated":
            data = mutate(data, rng)
        elif op == "random":
            data = rng.randbytes(rng.randint(0, 1300))
        elif op == "made":  # any valid packet: arbitrary ids, fragment counts, bases, references
            data = pk.to_bytes(made[n % len(made)])
        for f in receiver.receive(data) + (receiver.receive(data) if op == "dup" else []):
            assert f.frame > last
            last = f.frame
            img = receiver.render(f)
            assert img.shape[-2:] == (model.cfg.resolution,) * 2
        pk.from_bytes(receiver.feedback())
    st_ = receiver.state
    assert len(st_.refs) <= pk.REF_WINDOW and len(st_.partial) <= 4


@settings(deadline=None, max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(st.binary(max_size=64), feedback_packets.map(pk.to_bytes)), max_size=5))
def test_sender_survives_any_feedback(model, frames, datagrams):
    sender = Sender(model, SenderSettings(quality_floor=0))
    sender.encode(frames[0])
    for data in datagrams:
        sender.on_feedback(data)
        out = sender.encode(frames[1])
        assert out.packets and all(len(p) <= pk.MAX_PACKET for p in out.packets)


def test_receiver_decodes_clean_stream_after_garbage(model, stream):
    receiver = Receiver(model, (model.cfg.resolution,) * 2)
    rng = random.Random(0)
    for _ in range(200):
        receiver.receive(rng.randbytes(rng.randint(0, 200)))
    shown = [f.frame for data in stream for f in receiver.receive(data)]
    assert shown == list(range(14))


def test_playout_holds_gaps_and_fills_the_tail():
    from rtc.playout import Playout

    playout = Playout(4)
    a, b = np.zeros((4, 4, 3), np.uint8), np.ones((4, 4, 3), np.uint8)
    out = playout.show(1, Outcome.KEYFRAME, a, 0.0) + playout.show(3, Outcome.TOKEN, b, 0.1)
    out += playout.show(2, Outcome.TOKEN, a, 0.2)  # late: already held
    out += playout.finish(6)
    assert [(p.frame, p.outcome) for p in out] == [
        (0, Outcome.HELD), (1, Outcome.KEYFRAME), (2, Outcome.HELD), (3, Outcome.TOKEN), (4, Outcome.HELD),
        (5, Outcome.HELD)]
    assert np.array_equal(out[2].image, a) and np.array_equal(out[5].image, b)
    assert playout.show(10**6, Outcome.TOKEN, a, 1.0) == []  # a garbage jump is not filled frame by frame
