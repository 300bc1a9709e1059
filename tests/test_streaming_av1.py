"""Calls with AV1 references: the chain of inter references, its breaks under loss, intra refresh."""

import random
from dataclasses import replace

import numpy as np
import pytest

from codec.receiver import Receiver
from codec.sender import RESEND_TIMEOUT, FrameKind, Sender, SenderSettings
from codec.video_io import to_tensor
from entropy import packet as pk
from entropy.bitstream import Av1ReferenceUnit, BitstreamError
from rtc.impairment import LinkConfig
from rtc.playout import Outcome
from rtc.simulate import simulate_call
from tests.conftest import moving_square_clip
from tests.test_streaming import assert_exact_where_shown, mutate

# a reference every 4 frames at CRF 50; lambda 0: a token wherever it beats holding at all
# probe_interval 0: these tests are about references and losses, with the tiny model sending tokens wherever
# they win, not about how seldom a busy sender looks for them
AV1 = SenderSettings(keyframe_codec="av1", reference_interval=4, av1_crf=50, lmbda=0.0, probe_interval=0)
LINK = LinkConfig(delay=0.02)


def av1_refs(call) -> list[int]:
    return [i for i, k in enumerate(call.sent) if k == FrameKind.KEYFRAME]


def assert_holds_exact(call):
    """A frame the sender held shows at the receiver exactly what the sender believed it showed."""
    for p in call.played:
        if call.sent[p.frame] == FrameKind.HOLD and p.outcome == Outcome.HELD:
            assert np.array_equal(p.image, call.recon[p.frame]), f"held frame {p.frame} differs"


def test_unit_round_trip_and_malformed():
    unit = Av1ReferenceUnit(True, 3, b"tok", b"\x12\x00av1")
    assert Av1ReferenceUnit.from_bytes(unit.to_bytes()) == unit
    for bad in (b"", b"\x00\x00", b"\x02\x00\x00a", b"\x00\x00\x05abc", b"\x00\x00\x03tok"):
        with pytest.raises(BitstreamError):
            Av1ReferenceUnit.from_bytes(bad)
    fragment = pk.Av1ReferenceFragment(1, 2, 3, 0, 1, unit.to_bytes())
    parsed = pk.from_bytes(pk.to_bytes(fragment))
    assert parsed == fragment and type(parsed) is pk.Av1ReferenceFragment
    assert parsed != pk.KeyframeFragment(1, 2, 3, 0, 1, unit.to_bytes())


def test_lossless_av1_call_equals_closed_loop(model, frames):
    call = simulate_call(model, frames, 25, AV1, LINK, LINK)
    assert [p.frame for p in call.played] == list(range(40))
    assert av1_refs(call) == list(range(0, 40, 4))
    assert call.receiver.stats.keyframes == 10 and call.receiver.stats.av1_breaks == 0
    assert call.receiver.stats.keyframe_requests == 0
    assert {FrameKind.TOKEN, FrameKind.HOLD} <= set(call.sent)  # both decisions happen on this clip
    assert_exact_where_shown(call)
    assert_holds_exact(call)


def lose_reference_at(frame: int, times: int):
    """A ``drop`` rule: the first ``times`` transmissions of the AV1 reference of ``frame``."""
    seen = []

    def drop(i, data):
        p = pk.from_bytes(data)
        if isinstance(p, pk.Av1ReferenceFragment) and p.frame == frame and len(seen) < times:
            seen.append(i)
            return True
        return False
    return drop


def test_lost_inter_reference_is_sent_again(model, frames):
    """The inter reference at frame 8 is lost once. The next token packet says a newer reference is
    pending, the receiver has no trace of it and asks; the sender sends it again (tens of bytes,
    not an intra frame), and the chain goes on. Meanwhile the receiver shows token frames made
    exactly from the references it holds."""
    call = simulate_call(model, frames, 25, replace(AV1, reference_copies=1), LINK, LINK, drop=lose_reference_at(8, 1))
    assert call.receiver.stats.keyframe_requests == 1
    assert call.sender.state.last_keyframe == 0 and av1_refs(call) == list(range(0, 40, 4))
    assert sorted(call.receiver.state.refs)[-1] == 9  # every reference made it
    assert call.played[8].outcome == Outcome.HELD and call.played[9].outcome == Outcome.TOKEN
    assert_exact_where_shown(call)


def test_reference_lost_for_good_keeps_the_last_good_one_and_gets_an_intra_frame(model, frames):
    """Every transmission of the reference at frame 8 is lost: after RESEND_TRIES resends the sender
    sends an intra frame, which restarts the chain; the receiver shows token frames from the
    references it holds until then."""
    call = simulate_call(model, frames, 25, replace(AV1, reference_copies=1), LINK, LINK, drop=lose_reference_at(8, 99))
    intra = call.sender.state.last_keyframe
    assert 8 < intra < 30 and intra in av1_refs(call)
    assert call.played[intra].outcome == Outcome.KEYFRAME
    assert any(p.outcome == Outcome.TOKEN for p in call.played[9:intra])
    assert [p.outcome for p in call.played[intra + 1:]].count(Outcome.KEYFRAME) >= 2  # the new chain goes on
    assert_exact_where_shown(call)


def test_reordered_reference_waits_for_its_predecessor(model, frames):
    sender = Sender(model, AV1)
    packets = {}
    for i, x in enumerate(frames[:9]):
        packets[i] = sender.encode(x).packets
    sender.close()
    receiver = Receiver(model, (64, 64))
    for i in range(4):
        for data in packets[i]:
            receiver.receive(data)
    for data in packets[8]:  # reference 2 before reference 1: it cannot be decoded yet
        receiver.receive(data)
    assert sorted(receiver.state.refs) == [0] and receiver.stats.av1_breaks == 1
    assert pk.from_bytes(receiver.feedback()).flags & pk.Flags.KEYFRAME_REQUEST
    for data in packets[4]:
        receiver.receive(data)
    assert sorted(receiver.state.refs) == [0, 1, 2]
    assert receiver.state.av1_chain == 2 and not receiver.state.av1_waiting


@pytest.mark.parametrize("seed", range(3))
def test_twenty_percent_loss_every_frame_accounted_for(model, frames, seed):
    link = dict(loss=0.2, delay=0.02, jitter=0.06)
    call = simulate_call(model, frames, 25, AV1, LinkConfig(**link, seed=seed), LinkConfig(**link, seed=seed + 100))
    assert [p.frame for p in call.played] == list(range(40))
    assert call.forward.stats.dropped > 0
    assert sum(p.outcome == Outcome.KEYFRAME for p in call.played) >= 3
    assert_exact_where_shown(call)


def test_rate_target_holds_over_four_seconds(model):
    clip = [to_tensor(f) for f in moving_square_clip(100, 64)]
    s = SenderSettings(keyframe_codec="av1", kbps=6.0)
    call = simulate_call(model, clip, 25, s, LINK, LINK)
    kbps = 8 * call.media_bytes / 1000 / 4.0
    assert 0.5 * 6.0 < kbps <= 1.1 * 6.0
    assert len(av1_refs(call)) > 3
    assert_exact_where_shown(call)


def test_receiver_survives_a_mutated_av1_stream(model, frames):
    """Every packet of a real AV1 call, mutated behind a valid check, in random order: no exception,
    only newer frames, bounded state; the clean stream then still decodes from its intra frame."""
    sender = Sender(model, AV1)
    stream = [data for x in frames[:12] for data in sender.encode(x).packets]
    sender.close()
    rng = random.Random(3)
    receiver = Receiver(model, (64, 64))
    last = -1
    for _ in range(300):
        data = stream[rng.randrange(len(stream))]
        data = mutate(data, rng) if rng.random() < 0.7 else data
        for f in receiver.receive(data):
            assert f.frame > last
            last = f.frame
            assert receiver.render(f).shape[-2:] == (64, 64)
    assert len(receiver.state.refs) <= pk.REF_WINDOW and len(receiver.state.av1_waiting) <= 4
    fresh = Receiver(model, (64, 64))
    shown = [f.frame for data in stream for f in fresh.receive(data)]
    assert shown[:1] == [0] and len(shown) >= 3


def test_unacknowledged_intra_frame_is_sent_again_without_a_request(model, frames):
    """The first intra frame is lost and nothing follows it (every other frame held): no packet
    tells the receiver it lacks a picture, so after RESEND_TIMEOUT frames without an
    acknowledgement the sender sends it again."""
    s = replace(AV1, reference_interval=100, lmbda=1e9)  # one reference, then only holds
    call = simulate_call(model, frames[:20], 25, s, LINK, LINK, drop=lambda i, data: i == 0)
    assert call.sent[1:] == [FrameKind.HOLD] * 19
    shown = [p for p in call.played if p.outcome == Outcome.KEYFRAME]
    assert [p.frame for p in shown] == [0] and call.receiver.stats.keyframe_requests == 0
    assert shown[0].shown_at == pytest.approx(RESEND_TIMEOUT / 25 + LINK.delay)  # late, but there
    assert np.array_equal(shown[0].image, call.recon[0])


def test_intra_refresh_under_a_rate_target_starts_a_new_stream(model):
    """With --kbps, the intra frame that answers a reference lost for good comes from a new AV1
    stream (cheap enough for 1 s of the rate); the receiver decodes it on a fresh decoder, exactly."""
    clip = [to_tensor(f) for f in moving_square_clip(60, 64)]
    s = SenderSettings(keyframe_codec="av1", kbps=12.0, reference_copies=1, lmbda=0.0)
    first = simulate_call(model, clip, 25, s, LINK, LINK)
    lost = av1_refs(first)[2]
    call = simulate_call(model, clip, 25, s, LINK, LINK, drop=lose_reference_at(lost, 99))
    intra = call.sender.state.last_keyframe
    assert intra > lost and call.played[intra].outcome == Outcome.KEYFRAME
    refs_since = sum(1 for f in av1_refs(call) if f >= intra)
    assert call.sender.av1._pts == refs_since < len(av1_refs(call))  # the stream began at the refresh
    assert_exact_where_shown(call)


def test_a_live_sender_holds_where_it_has_no_time_to_synthesize(model, frames):
    """Real time: once a synthesis took longer than a frame, a live sender holds where it would have
    synthesized (the frames behind would be late and skipped), and times a synthesis again after
    RETIME_SECONDS. A simulated sender (no frame period) decides as before: timing never changes a
    file or a simulated call."""
    def kinds(sender: Sender, xs) -> list[FrameKind]:
        return [sender.encode(x).kind for x in xs]

    plain = Sender(model, AV1)
    plain_kinds = kinds(plain, frames[:8])
    assert FrameKind.TOKEN in plain_kinds and plain.syntheses_left_out == 0
    live = Sender(model, AV1)
    live.frame_period = 0.04
    kinds(live, frames[:1])
    live.synthesis_seconds = 1.0  # a synthesis that took 25 frames
    assert kinds(live, frames[1:8]) == [FrameKind.KEYFRAME if k == FrameKind.KEYFRAME else FrameKind.HOLD
                                        for k in plain_kinds[1:]]
    assert live.syntheses_left_out >= plain_kinds.count(FrameKind.TOKEN) > 0
    live.timed_at = -1000  # RETIME_SECONDS later: a synthesis is timed again
    assert FrameKind.TOKEN in kinds(live, frames[8:16])
    plain.close(), live.close()
