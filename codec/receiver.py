"""The streaming receiver: datagrams in (lost, duplicated, reordered, damaged), frames out.

It mirrors ``codec.sender``: keyframes are reassembled from fragments and become references only
when every fragment arrived; a token packet is decoded against the token and references it names,
which the receiver acknowledged before the sender used them. What cannot be decoded is concealed
(the caller holds the last frame) and never stops the stream. ``feedback()`` returns the datagram
that tells the sender what arrived; send it back after every ``receive``.

Decoding is split in two so a real-time caller can skip stale frames: ``receive`` does the cheap
part in arrival order (token decoding, keyframe reassembly, references), ``render`` the expensive
synthesis, for the frames the caller actually shows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

import torch
from torch import Tensor

from codec.nn.model import IMFCodec, Reference
from codec.pipeline import decode_keyframe, render
from entropy import packet as pk
from entropy.bitstream import BitstreamError, KeyframePayload

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
    keyframe_requests: int = 0
    highest_seq: int = -1


@dataclass
class Partial:
    frame: int
    count: int
    pieces: dict[int, bytes] = field(default_factory=dict)
    given_up: bool = False


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
        part = st.partial.setdefault(ref, Partial(frame, p.count))
        if (part.frame, part.count) != (frame, p.count):
            self.stats.damaged += 1
            return []
        part.pieces[p.index] = p.data
        for r in sorted(st.partial)[:-MAX_PARTIAL]:
            del st.partial[r]
        if len(part.pieces) < part.count:
            return []
        del st.partial[ref]
        try:
            payload = KeyframePayload.from_bytes(b"".join(part.pieces[i] for i in range(part.count)))
            u_hat, x_hat = decode_keyframe(self.model, payload, self.resolution)
        except (BitstreamError, ValueError, RuntimeError, IndexError, OverflowError):
            self.stats.damaged += 1
            return []
        if not torch.isfinite(u_hat).all():
            self.stats.damaged += 1
            return []
        st.refs[ref] = self.model.reference(x_hat, u_hat)
        for r in [r for r in st.refs if r <= max(st.refs) - pk.REF_WINDOW]:
            del st.refs[r]  # the feedback (and the sender) can name only the REF_WINDOW newest ids
        self.stats.keyframes += 1
        if st.want_keyframe_after is not None and ref > st.want_keyframe_after:
            st.want_keyframe_after = None
        self._remember(frame, u_hat)
        return self._show(ReceivedFrame(frame, Shown.KEYFRAME, x_hat=x_hat))

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
        base = None if p.base == 0 else st.tokens.get(frame - p.base)
        if p.base and base is None:
            self.stats.undecodable += 1
            return []
        try:
            u_hat = self.model.decompress_token(p.data, base)
        except (ValueError, RuntimeError, IndexError, OverflowError):
            self.stats.damaged += 1
            return []
        if not torch.isfinite(u_hat).all() or u_hat.abs().max() > 1e6:
            self.stats.damaged += 1
            return []
        self._remember(frame, u_hat)
        wanted = pk.read_ref_set(p.ref, p.ref_mask & ~pk.PENDING, max(st.newest_ref, 0))
        bank = [st.refs[r] for r in wanted if r in st.refs]
        # a whole keyframe went missing (a partly received one would be in ``partial``): the one
        # this frame names, or a newer one the sender says it sent
        named_missing = wanted[-1] > max(st.refs, default=-1) and wanted[-1] not in st.partial
        newer_missing = p.ref_mask & pk.PENDING and max([*st.refs, *st.partial], default=-1) <= wanted[-1]
        if (named_missing or newer_missing) and st.want_keyframe_after is None:
            self.request_keyframe()
        if not bank:
            self.stats.undecodable += 1
            return []
        kind = Shown.TOKEN if len(bank) == len(wanted) else Shown.CONCEALED
        return self._show(ReceivedFrame(frame, kind, u_hat=u_hat, bank=bank))

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
