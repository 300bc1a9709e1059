"""The streaming receiver: datagrams in (lost, duplicated, reordered, damaged), frames out.

It mirrors ``codec.sender``: keyframes are reassembled from fragments and become references only
when every fragment arrived; a token packet is decoded against the token and references it names,
which the receiver acknowledged before the sender used them. What cannot be decoded is concealed
(the caller holds the last frame) and never stops the stream. ``feedback()`` returns the datagram
that tells the sender what arrived; send it back after every ``receive``.

AV1 references (`codec.sender`, ``keyframe_codec="av1"``) form one chain, each predicted from the
one before it: a reference whose predecessor never arrived cannot be decoded, so it waits (it may
be only reordered) while the receiver asks for an intra frame and keeps showing frames made from
the references it holds.

Decoding is split in two so a real-time caller can skip stale frames: ``receive`` does the cheap
part in arrival order (token decoding, keyframe reassembly, references), ``render`` the expensive
synthesis, for the frames the caller actually shows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

import torch
from torch import Tensor

from codec.av1_reference import ReferenceDecoder
from codec.nn.model import IMFCodec, Reference
from codec.pipeline import decode_keyframe, render
from codec.video_io import to_tensor
from entropy import packet as pk
from entropy.bitstream import Av1ReferenceUnit, BitstreamError, KeyframePayload

HISTORY = 256  # frames of decoded tokens kept (the sender reaches back at most 255)
MAX_PARTIAL = 4  # keyframes being reassembled at once
SEQ_WINDOW = 4096  # sequence numbers remembered for duplicates; older packets are dropped (bounds the set)


class Shown(IntEnum):
    KEYFRAME = 1  # a decoded keyframe
    TOKEN = 2  # a token frame synthesized from exactly the sender's bank
    CONCEALED = 3  # a token frame from part of its bank (the rest was lost): approximate


@dataclass
class ReceivedFrame:
    frame: int
    kind: Shown
    x_hat: Tensor | None = None  # keyframes: the image
    u_hat: Tensor | None = None  # token frames: what ``render`` synthesizes from
    bank: list[Reference] = field(default_factory=list)


@dataclass
class ReceiverStats:
    packets: int = 0
    bytes: int = 0
    damaged: int = 0  # not an imfc packet, or its check failed
    duplicates: int = 0
    late: int = 0  # arrived after a newer frame was shown
    undecodable: int = 0  # valid packets whose token base or references were missing
    keyframes: int = 0  # reassembled completely
    keyframes_lost: int = 0  # given up on: a newer frame arrived before all fragments
    av1_breaks: int = 0  # AV1 references that arrived without the one they are predicted from
    keyframe_requests: int = 0
    highest_seq: int = -1


@dataclass
class Partial:
    frame: int
    count: int
    pieces: dict[int, bytes] = field(default_factory=dict)
    given_up: bool = False
    av1: bool = False  # fragments of an Av1ReferenceUnit, not of a KeyframePayload


@dataclass
class ReceiverState:
    refs: dict[int, Reference] = field(default_factory=dict)  # complete keyframes, REF_WINDOW newest
    partial: dict[int, Partial] = field(default_factory=dict)
    tokens: dict[int, Tensor] = field(default_factory=dict)  # frame -> u_hat decoded exactly
    newest_ref: int = -1  # newest reference id seen (complete or not), for unwrapping
    newest_frame: int = -1  # newest frame id seen, for unwrapping
    shown: int = -1  # newest frame returned for display
    acked: int | None = None  # newest frame decoded exactly
    want_keyframe_after: int | None = None  # request a keyframe until a reference newer than this completes
    seqs: set[int] = field(default_factory=set)  # recent sequence numbers, for duplicates
    feedback_seq: int = 0
    av1: ReferenceDecoder | None = None  # the AV1 chain's decoder, from its last intra frame
    av1_chain: int = -1  # the newest AV1 reference it decoded
    av1_waiting: dict[int, tuple[int, Av1ReferenceUnit]] = field(default_factory=dict)  # ref -> (frame, unit),
    # complete references that arrived before the one they are predicted from


class Receiver:
    def __init__(self, model: IMFCodec, resolution: tuple[int, int]):
        self.model = model.eval()
        self.resolution = resolution
        self.state = ReceiverState()
        self.stats = ReceiverStats()

    @torch.no_grad()
    def receive(self, data: bytes) -> list[ReceivedFrame]:
        """One datagram -> the frames it makes showable (0 or 1), newer than any shown before."""
        self.stats.packets += 1
        self.stats.bytes += len(data)
        try:
            p = pk.from_bytes(data)
        except pk.PacketError:
            self.stats.damaged += 1
            return []
        if isinstance(p, pk.Feedback):
            self.stats.damaged += 1  # feedback travels the other way
            return []
        st = self.state
        seq = pk.unwrap(p.seq, 16, max(self.stats.highest_seq, 0))
        if seq in st.seqs or seq <= self.stats.highest_seq - SEQ_WINDOW:
            self.stats.duplicates += 1  # or too old to tell: either way nothing to use
            return []
        st.seqs.add(seq)
        if seq > self.stats.highest_seq:
            self.stats.highest_seq = seq
            st.seqs = {s for s in st.seqs if s > seq - SEQ_WINDOW}
        frame = pk.unwrap(p.frame, 16, max(st.newest_frame, 0))
        st.newest_frame = max(st.newest_frame, frame)
        self._give_up_keyframes(frame)
        if isinstance(p, pk.KeyframeFragment):
            return self._fragment(p, frame)
        return self._token(p, frame)

    def render(self, f: ReceivedFrame) -> Tensor:
        """The (1, 3, R, R) image of a frame ``receive`` returned."""
        if f.x_hat is not None:
            return f.x_hat
        with torch.no_grad():
            return render(self.model, f.u_hat, f.bank)

    def request_keyframe(self) -> None:
        """Ask the sender for a fresh keyframe (sent with the next feedback), like RTCP PLI."""
        st = self.state
        st.want_keyframe_after = max(st.refs, default=-1)
        self.stats.keyframe_requests += 1

    def feedback(self) -> bytes:
        """The datagram for the sender: newest exact frame, references held, keyframe request."""
        st = self.state
        flags, ref, mask, frame = 0, 0, 0, 0
        if st.acked is not None:
            flags |= pk.Flags.HAS_ACK
            frame = st.acked
        if st.refs:
            flags |= pk.Flags.HAS_REFS
            ref, mask = pk.ref_set(sorted(st.refs))
        if st.want_keyframe_after is not None:
            flags |= pk.Flags.KEYFRAME_REQUEST
        st.feedback_seq += 1
        return pk.to_bytes(pk.Feedback(st.feedback_seq - 1, frame, ref, mask, flags))

    # -- keyframes ----------------------------------------------------------------------------
    def _fragment(self, p: pk.KeyframeFragment, frame: int) -> list[ReceivedFrame]:
        st = self.state
        ref = pk.unwrap(p.ref, 8, max(st.newest_ref, 0))
        if ref in st.refs or ref <= max(st.refs, default=-1) - pk.REF_WINDOW:
            self.stats.duplicates += 1
            return []
        st.newest_ref = max(st.newest_ref, ref)
        av1 = isinstance(p, pk.Av1ReferenceFragment)
        part = st.partial.setdefault(ref, Partial(frame, p.count, av1=av1))
        if (part.frame, part.count, part.av1) != (frame, p.count, av1):
            self.stats.damaged += 1
            return []
        part.pieces[p.index] = p.data
        for r in sorted(st.partial)[:-MAX_PARTIAL]:
            del st.partial[r]
        if len(part.pieces) < part.count:
            return []
        del st.partial[ref]
        if av1:
            return self._av1_reference(ref, frame, b"".join(part.pieces[i] for i in range(part.count)))
        try:
            payload = KeyframePayload.from_bytes(b"".join(part.pieces[i] for i in range(part.count)))
            u_hat, x_hat = decode_keyframe(self.model, payload, self.resolution)
        except (BitstreamError, ValueError, RuntimeError, IndexError, OverflowError):
            self.stats.damaged += 1
            return []
        if not torch.isfinite(u_hat).all():
            self.stats.damaged += 1
            return []
        return self._new_reference(ref, frame, x_hat, u_hat)

    def _new_reference(self, ref: int, frame: int, x_hat: Tensor, u_hat: Tensor) -> list[ReceivedFrame]:
        st = self.state
        st.refs[ref] = self.model.reference(x_hat, u_hat)
        for r in [r for r in st.refs if r <= max(st.refs) - pk.REF_WINDOW]:
            del st.refs[r]  # the feedback (and the sender) can name only the REF_WINDOW newest ids
        self.stats.keyframes += 1
        if st.want_keyframe_after is not None and ref > st.want_keyframe_after:
            st.want_keyframe_after = None
        self._remember(frame, u_hat)
        return self._show(ReceivedFrame(frame, Shown.KEYFRAME, x_hat=x_hat))

    # -- AV1 references -------------------------------------------------------------------------
    def _av1_reference(self, ref: int, frame: int, data: bytes) -> list[ReceivedFrame]:
        """A complete AV1 reference unit: decoded now if it is intra or the chain's next, else kept
        until its predecessor arrives (while an intra frame is asked for)."""
        st = self.state
        try:
            unit = Av1ReferenceUnit.from_bytes(data)
        except BitstreamError:
            self.stats.damaged += 1
            return []
        if ref <= st.av1_chain:  # older than what the decoder has moved past: it can no longer be decoded
            self.stats.late += 1
            return []
        if not unit.intra and (st.av1 is None or ref != st.av1_chain + 1):
            st.av1_waiting[ref] = (frame, unit)
            for r in sorted(st.av1_waiting)[:-MAX_PARTIAL]:
                del st.av1_waiting[r]
            self.stats.av1_breaks += 1
            if st.want_keyframe_after is None:
                self.request_keyframe()
            return []
        shown = self._av1_decode(ref, frame, unit)
        while st.av1 is not None and st.av1_chain + 1 in st.av1_waiting:  # references that were waiting for it
            shown += self._av1_decode(st.av1_chain + 1, *st.av1_waiting.pop(st.av1_chain + 1))
        st.av1_waiting = {r: w for r, w in st.av1_waiting.items() if r > st.av1_chain}
        return shown[-1:]

    def _av1_decode(self, ref: int, frame: int, unit: Av1ReferenceUnit) -> list[ReceivedFrame]:
        st = self.state
        if unit.intra:
            st.av1 = ReferenceDecoder(self.resolution[0])  # an intra frame starts the chain anew
        try:
            picture = st.av1.decode(unit.packet)
        except BitstreamError:
            self.stats.damaged += 1
            st.av1 = None  # the decoder's state is no longer the sender's: wait for an intra frame
            if st.want_keyframe_after is None:
                self.request_keyframe()
            return []
        st.av1_chain = ref
        u_hat = self._decode_token(frame, unit.base, unit.token)
        if u_hat is None:  # the chain goes on, but without its token this picture is no reference
            return []
        return self._new_reference(ref, frame, to_tensor(picture), u_hat)

    def _give_up_keyframes(self, frame: int) -> None:
        """A packet of a later frame arrived while a keyframe is incomplete: count it lost and
        ask for a new one (a late fragment can still complete it)."""
        st = self.state
        for ref, part in st.partial.items():
            if frame > part.frame and not part.given_up:
                part.given_up = True
                self.stats.keyframes_lost += 1
                if st.want_keyframe_after is None:
                    self.request_keyframe()

    # -- token frames -------------------------------------------------------------------------
    def _token(self, p: pk.TokenPacket, frame: int) -> list[ReceivedFrame]:
        st = self.state
        if frame in st.tokens:
            self.stats.duplicates += 1
            return []
        u_hat = self._decode_token(frame, p.base, p.data)
        if u_hat is None:
            return []
        self._remember(frame, u_hat)
        wanted = pk.read_ref_set(p.ref, p.ref_mask & ~pk.PENDING, max(st.newest_ref, 0))
        bank = [st.refs[r] for r in wanted if r in st.refs]
        # a whole keyframe went missing (a partly received one would be in ``partial``): the one
        # this frame names, or a newer one the sender says it sent
        named_missing = wanted[-1] > max(st.refs, default=-1) and wanted[-1] not in st.partial
        newer_missing = (p.ref_mask & pk.PENDING
                         and max([*st.refs, *st.partial, *st.av1_waiting], default=-1) <= wanted[-1])
        if (named_missing or newer_missing) and st.want_keyframe_after is None:
            self.request_keyframe()
        if not bank:
            self.stats.undecodable += 1
            return []
        kind = Shown.TOKEN if len(bank) == len(wanted) else Shown.CONCEALED
        return self._show(ReceivedFrame(frame, kind, u_hat=u_hat, bank=bank))

    def _decode_token(self, frame: int, base: int, data: bytes) -> Tensor | None:
        """A token coded as a delta from the token ``base`` frames back (0: on its own) -> u_hat, or
        None (counted) if that token is missing or the bytes do not decode to a sane token."""
        prev = None if base == 0 else self.state.tokens.get(frame - base)
        if base and prev is None:
            self.stats.undecodable += 1
            return None
        try:
            u_hat = self.model.decompress_token(data, prev)
        except (ValueError, RuntimeError, IndexError, OverflowError):
            self.stats.damaged += 1
            return None
        if not torch.isfinite(u_hat).all() or u_hat.abs().max() > 1e6:
            self.stats.damaged += 1
            return None
        return u_hat

    def _remember(self, frame: int, u_hat: Tensor) -> None:
        st = self.state
        st.tokens[frame] = u_hat
        st.acked = frame if st.acked is None else max(st.acked, frame)
        for f in [f for f in st.tokens if f <= st.acked - HISTORY]:
            del st.tokens[f]

    def _show(self, f: ReceivedFrame) -> list[ReceivedFrame]:
        if f.frame <= self.state.shown:
            self.stats.late += 1
            return []
        self.state.shown = f.frame
        return [f]
