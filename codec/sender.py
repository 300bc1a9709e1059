"""The streaming sender: frames in one at a time, packets out, feedback from the receiver in.

Loss resilience comes from two rules that keep sender and receiver in step without any
retransmission (docs/streaming.md):

- **References are used only once acknowledged** (except before the first acknowledgement). A keyframe becomes a reference on the sender
  only when the receiver's feedback says it holds all of it. Every token packet names the
  references it was coded with, so the receiver synthesizes from exactly the same bank. A lost
  keyframe fragment therefore never puts the two banks out of step: the sender keeps coding
  against the older references the receiver has, and sends a fresh keyframe when the receiver
  asks (keyframe request) or when the lost one goes unacknowledged for ``keyframe_timeout`` frames.
- **Tokens are deltas from an acknowledged token.** Each token packet is coded against the newest
  frame the receiver reported decoding exactly (``base`` frames back), not against the previous
  frame. A lost token packet costs the receiver only that frame (it holds the last one); the
  next packet that arrives decodes exactly. Measured on a validation clip with the shipped model,
  this costs 0-0.1 bytes per frame at 1-3 frames of lag against chaining from the previous frame
  (8.0 bytes), where coding tokens on their own would cost 17.8.

With ``keyframe_codec="av1"`` the references are one continuous AV1 stream (`codec.av1_reference`),
as in a file: a new reference when a `RateControl` bucket at ``kbps`` can pay for one (or every
``reference_interval`` frames without a rate target), each predicted from the reference sent
before it. Between references a frame is a token packet or nothing at all (the receiver holds its
picture), whichever costs less in MSE + ``lmbda`` * bits against what the receiver shows, so a
held frame costs no bytes. An AV1 reference is acknowledged like a keyframe; one lost makes every
later inter reference undecodable, so the receiver keeps its last good references (the sender
codes tokens only against acknowledged ones) and asks for an intra frame, which the sender sends
as soon as the rate control is out of debt.

State lives in the Sender object (reference store, token history, counters) and nowhere else.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import IntEnum
from fractions import Fraction

import torch
from torch import Tensor

from codec.av1_reference import CALL_PRESET, ReferenceEncoder
from codec.nn.model import IMFCodec, Reference
from codec.nn.keyframe_codec import step_index
from codec.pipeline import (PROBE_INTERVAL, KeyframeBudget, RateControl, check_reference_settings, encode_keyframe,
                            mse, psnr, render, resolve_bank_size, start_reference_stream, SynthesisGate)
from codec.video_io import to_tensor, to_uint8
from entropy import packet as pk
from entropy.bitstream import Av1ReferenceUnit

HISTORY = 255  # frames of tokens kept: the farthest a TOKEN packet's 8-bit ``base`` reaches
LOSS_MEMORY = 10.0  # seconds after an intra request during which AV1 inter references are sent in copies
RESEND_MAX = 5  # references from the receiver's newest on, at most, for a resend to mend the chain: it keeps
# 4 waiting for a missing one
RESEND_KEEP = 8  # AV1 references whose packets the sender keeps for resending
RESEND_GAP = 3  # frames between two resends (about a round trip at 25 fps on a regional link)
RESEND_TRIES = 3  # resends without progress before an intra frame instead
RESEND_TIMEOUT = 6  # frames without an acknowledgement of a reference after which it is sent again unasked
REFRESH_SECONDS = 1.0  # of the rate target: the most an AV1 intra refresh may cost, where a cheaper one exists
RETIME_SECONDS = 10.0  # a live call's sender without time to synthesize times a synthesis again this often


@dataclass(frozen=True)
class SenderSettings:
    quality_floor: float = 20.0  # PSNR (dB) under which a new keyframe is sent; 0 skips the check
    # (and the sender's synthesis, which is most of its cost)
    max_keyframe_interval: int = 250  # frames between keyframes
    bank_size: int | None = None  # references a token frame is coded with; None: DEFAULT_BANK_SIZE of the keyframe codec
    max_packet: int = pk.MAX_PACKET
    keyframe_timeout: int = 12  # frames without acknowledgement after which a keyframe counts as lost
    # (about half a second: well above a loopback or regional round trip plus a keyframe decode)
    min_keyframe_gap: int = 2  # frames: keyframe requests are answered at most this often
    max_kbps: float = 0.0  # 0: no cap; else the quality floor's keyframes wait for a KeyframeBudget
    # (keyframes the receiver asks for, and the first, are sent regardless: they end a frozen picture)
    keyframe_step: float = 1.0  # quantization step of keyframe images, one of KEYFRAME_STEPS
    keyframe_codec: str = "learned"  # or "av1": references as one AV1 stream; the fields below are its
    kbps: float = 0.0  # rate target of the media packets, headers included; 0: a reference every reference_interval
    reference_interval: int = 6  # frames from one AV1 reference to the next, without a rate target
    av1_crf: int = 58  # SVT-AV1 CRF of the references, without a rate target
    av1_preset: int = CALL_PRESET  # SVT-AV1 preset of the references: real time, not a file's (CALL_PRESET)
    intra_interval: int = 1500  # frames between AV1 intra frames; 0: only the first and those asked for
    lmbda: float = 1e-6  # MSE per bit in the token-or-hold decision
    reference_copies: int = 2  # after a loss, each AV1 inter reference's packets go out this many times (same
    # sequence numbers): a lost one breaks the chain until an intra frame, so on a lossy link a copy is cheap
    # insurance; on a clean one it would halve the references, so copies are sent only for LOSS_MEMORY
    # seconds after the receiver last asked for an intra frame
    probe_interval: int = PROBE_INTERVAL  # 0: no limit

    def __post_init__(self) -> None:
        check_reference_settings(self)
        resolve_bank_size(self)
        if not 1 <= self.bank_size < pk.REF_WINDOW:
            raise ValueError(f"bank_size must be in 1..{pk.REF_WINDOW - 1}")
        if not 1 <= self.reference_copies <= 3:
            raise ValueError(f"reference copies must be 1 to 3, not {self.reference_copies}")


class FrameKind(IntEnum):
    KEYFRAME = 1  # a new reference: a learned keyframe or an AV1 reference
    TOKEN = 2
    HOLD = 3  # nothing sent: the receiver keeps showing its picture (AV1 references only)


@dataclass
class SentFrame:
    frame: int
    kind: FrameKind
    packets: list[bytes]
    x_hat: Tensor | None  # the reconstruction the receiver will show, when the sender computed it
    psnr: float | None


@dataclass
class SentReference:
    frame: int
    u_hat: Tensor
    x_hat: Tensor
    acked: bool = False
    reference: Reference | None = None  # features, made when first needed


@dataclass
class SenderState:
    frame: int = 0  # next frame id
    seq: int = 0  # next packet sequence number
    next_ref: int = 0
    refs: dict[int, SentReference] = field(default_factory=dict)
    tokens: dict[int, Tensor] = field(default_factory=dict)  # frame -> u_hat, frames sent
    acked_frame: int = -1  # newest frame the receiver decoded exactly
    keyframe_requested: bool = False
    last_keyframe: int | None = None  # frame id of the newest keyframe sent


class Sender:
    def __init__(self, model: IMFCodec, settings: SenderSettings = SenderSettings(), fps: float = 25.0):
        """``fps`` (the capture rate) turns kbps into bits per frame and times the AV1 stream."""
        self.model = model.eval()
        self.settings = settings
        self.state = SenderState()
        self.budget = KeyframeBudget(settings.max_kbps, fps)
        # -- the AV1 reference stream
        self.av1: ReferenceEncoder | None = None
        self.av1_fps = Fraction(fps).limit_denominator(1001) / settings.reference_interval
        self.rate = RateControl(settings.kbps, fps, stream_overhead_bits=0) if settings.kbps else None
        self.gate = SynthesisGate(settings.probe_interval)
        # Real time (issue 16): a live call sets frame_period (seconds between captured frames). A
        # synthesis that takes longer than that makes the frames behind it late, and a late frame is
        # skipped; so where the last synthesis took longer than a frame, the sender holds instead
        # (the receiver shows the same picture either way, and references keep coming on time),
        # timing a synthesis again every RETIME_SECONDS in case the machine has sped up. Files and
        # simulated calls leave it None: their streams must not depend on timing.
        self.frame_period: float | None = None
        self.synthesis_seconds: float | None = None  # the last synthesis's wall time (a live call times one first)
        self.timed_at = 0  # the frame it was made for
        self.syntheses_left_out = 0  # syntheses the gate asked for that there was no time for
        self.shown: Tensor | None = None  # what the receiver shows now, as far as the sender knows
        self.fps = fps
        self.last_request: int | None = None  # frame at which the receiver last asked for an intra frame
        self.receiver_newest: int | None = None  # the newest reference the receiver said it holds
        self.request_newest: int | None = None  # ... in the feedback that made the last request
        self.intra_ref = 0  # the reference id of the newest intra frame
        self.ref_packets: dict[int, list[bytes]] = {}  # the newest AV1 references' packets, for resending
        self.last_resend: int | None = None
        self.resend_tries = 0  # resends since the receiver's newest reference last moved

    # -- frames -------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, x: Tensor) -> SentFrame:
        """One frame (1, 3, R, R) in [0, 1] -> the packets to send now."""
        if self.settings.keyframe_codec == "av1":
            return self._encode_av1(x)
        self.budget.next_frame()
        sent = self._encode(x)
        self.budget.pay(8 * sum(len(p) for p in sent.packets), sent.kind == FrameKind.KEYFRAME)
        return sent

    def close(self) -> None:
        """End the AV1 reference stream, if any (no frame may follow)."""
        if self.av1 is not None:
            self.av1.close()

    def _encode(self, x: Tensor) -> SentFrame:
        s, st = self.settings, self.state
        fid = st.frame
        st.frame += 1
        u = self.model.token_symbols(x)
        bank_ids = self._bank()
        token = self._token_frame(fid, u, x, bank_ids) if bank_ids else None
        since = fid - st.last_keyframe if st.last_keyframe is not None else None
        newest = st.refs.get(st.next_ref - 1)
        in_flight = newest is not None and not newest.acked and since < s.keyframe_timeout
        acked = any(st.refs[r].acked for r in bank_ids)
        below_floor = token is not None and token.psnr is not None and token.psnr < s.quality_floor
        affordable = self.budget.affords_keyframe()
        want = (since is None
                or (st.keyframe_requested and since >= s.min_keyframe_gap)
                or (not in_flight and (not acked or since >= s.max_keyframe_interval
                                       or (below_floor and affordable))))
        if want:
            return self._keyframe(fid, x)
        return token

    def skip(self) -> None:
        """Let a frame go unsent (a busy sender drops it at capture); frame ids stay source indices."""
        self.state.frame += 1
        self.budget.next_frame()
        self.gate.next_frame()
        if self.rate:
            self.rate.next_frame()

    # -- the AV1 reference stream ---------------------------------------------------------------
    def _encode_av1(self, x: Tensor) -> SentFrame:
        s, st, rate = self.settings, self.state, self.rate
        fid = st.frame
        st.frame += 1
        if rate:
            rate.next_frame()
        self.gate.next_frame()
        known = -1 if self.receiver_newest is None else self.receiver_newest
        pending = [r for r in sorted(st.refs) if r > known and not st.refs[r].acked]
        if (pending and fid - st.refs[pending[0]].frame >= RESEND_TIMEOUT
                and (self.last_resend is None or fid - self.last_resend >= RESEND_TIMEOUT)):
            # no word of a reference: with holds the receiver may see no later packet to notice its
            # loss by for seconds (or, if it was the first intra frame, hold no picture at all)
            st.keyframe_requested, self.request_newest = True, self.receiver_newest
        resent = self._resend(fid) if st.keyframe_requested else []
        # where resending cannot mend the chain, an intra frame: it waits until the bucket is out of
        # debt (under heavy loss requests would otherwise take the whole rate), unless the receiver
        # has no picture at all
        requested = (resent is None and fid - st.last_keyframe >= s.min_keyframe_gap
                     and (rate is None or rate.affords(0) or self.receiver_newest is None))
        intra = self.av1 is None or requested or bool(s.intra_interval and fid - st.last_keyframe >= s.intra_interval)
        bank_ids = self._bank()
        since = fid - st.refs[st.next_ref - 1].frame if st.refs else None
        if rate:
            due = since is not None and since >= 1 and rate.affords(rate.reference_bits)
        else:
            due = since is not None and since >= s.reference_interval
        due = due and resent is not None  # while an intra frame is due, inter references would be wasted
        if resent:
            if rate:  # an intra frame sent again is paid like one, over 3 s
                newest = self.request_newest
                rate.pay(8 * sum(map(len, resent)), intra=newest is None or newest < self.intra_ref)
            st.keyframe_requested = False
        out = self._av1_frame(fid, x, bank_ids, intra or due or not bank_ids, intra)
        out.packets[:0] = resent or []
        return out

    def _resend(self, fid: int) -> list[bytes] | None:
        """The packets of the reference after the receiver's newest one, to send again (a NACK
        answered: tens of bytes where an intra frame costs hundreds; the receiver keeps the later
        ones waiting, and asks again if one of those is missing too); [] if it went out less than
        RESEND_GAP frames ago; None if resending cannot mend the chain (that reference no longer
        kept, or tried RESEND_TRIES times): then an intra frame is due."""
        st = self.state
        if self.resend_tries >= RESEND_TRIES:
            return None
        if self.last_resend is not None and fid - self.last_resend < RESEND_GAP:
            return []
        newest = self.request_newest
        start = self.intra_ref if newest is None or newest >= st.next_ref else max(newest + 1, self.intra_ref)
        if start >= st.next_ref:  # it holds our newest reference: the request is stale
            st.keyframe_requested = False
            return []
        if start not in self.ref_packets or st.next_ref - start > RESEND_MAX:
            return None
        self.last_resend = fid
        self.resend_tries += 1
        return list(self.ref_packets[start])

    def _av1_frame(self, fid: int, x: Tensor, bank_ids: list[int], reference: bool, intra: bool) -> SentFrame:
        s, st, rate = self.settings, self.state, self.rate
        if reference:
            return self._av1_reference(fid, x, intra)
        hold_cost = mse(self.shown, x)
        worth = self.gate.worth_synthesizing(hold_cost)
        if worth and not self._has_time_to_synthesize(fid):
            self.syntheses_left_out += 1
            worth = False
        if worth:  # the token only here: E_T is a third of a held frame's time
            base = self._token_base(fid)
            data, u_hat = self.model.compress_token(self.model.token_symbols(x),
                                                    st.tokens[base] if base is not None else None)
            bits = 8 * (pk.OVERHEAD + len(data))  # the token packet's size
            if rate is None or rate.affords(bits):
                bank = [self._reference(i) for i in bank_ids]
                start = time.perf_counter()
                x_hat = render(self.model, u_hat, bank)
                self.synthesis_seconds, self.timed_at = time.perf_counter() - start, fid
                synthesis_mse = mse(x_hat, x)
                won = synthesis_mse + s.lmbda * bits < hold_cost
                self.gate.synthesized(synthesis_mse, won)
                if won:
                    st.tokens[fid] = u_hat
                    self._forget(fid)
                    self.shown = x_hat
                    if rate:
                        rate.pay(bits)
                    return SentFrame(fid, FrameKind.TOKEN, [self._token_packet(fid, base, bank_ids, data)], x_hat,
                                     psnr(x_hat, x))
        return SentFrame(fid, FrameKind.HOLD, [], self.shown, psnr(self.shown, x))

    def _av1_reference(self, fid: int, x: Tensor, intra: bool) -> SentFrame:
        s, st = self.settings, self.state
        if self.av1 is None or (intra and self.rate):
            # a refresh starts a new stream, whose intra frame fits REFRESH_SECONDS of the rate: it
            # answers a loss, and the first intra frame's INTRA_SECONDS would take the whole rate again
            refresh = self.av1 is not None
            if refresh:
                self.av1.close()
            budget = None
            if self.rate:
                budget = 1000 * s.kbps * REFRESH_SECONDS if refresh else self.rate.intra_budget
            self.av1, av1_packet, picture = start_reference_stream(
                self.model.cfg.resolution, self.av1_fps, to_uint8(x), s.av1_crf, s.kbps, budget, s.av1_preset)
        else:
            av1_packet, picture = self.av1.code(to_uint8(x), intra)
        x_hat = to_tensor(picture)
        base = self._token_base(fid)
        u = self.model.token_symbols(x_hat)  # the token of the picture both sides hold, as in training
        data, u_hat = self.model.compress_token(u, st.tokens[base] if base is not None else None)
        unit = Av1ReferenceUnit(intra, fid - base if base is not None else 0, data, av1_packet)
        ref = st.next_ref
        st.next_ref += 1
        st.refs[ref] = SentReference(fid, u_hat, x_hat)
        st.tokens[fid] = u_hat
        if intra:
            st.last_keyframe = fid  # in an AV1 call the newest intra frame
            st.keyframe_requested = False
            self.intra_ref = ref
        pieces = pk.fragment(unit.to_bytes(), s.max_packet)
        packets = [pk.to_bytes(pk.Av1ReferenceFragment(self._seq(), fid, ref & 0xFF, i, len(pieces), piece))
                   for i, piece in enumerate(pieces)]
        self.ref_packets[ref] = list(packets)
        for r in [r for r in self.ref_packets if r < ref - RESEND_KEEP]:
            del self.ref_packets[r]
        lossy = self.last_request is not None and fid - self.last_request < LOSS_MEMORY * self.fps
        if lossy and not intra:  # an intra frame is dear, and a lost one is asked for again
            packets *= s.reference_copies
        if self.rate:
            self.rate.pay(8 * sum(map(len, packets)), reference=True, intra=intra)
        self._forget(fid)
        self.shown = x_hat
        self.gate.new_reference()
        return SentFrame(fid, FrameKind.KEYFRAME, packets, x_hat, psnr(x_hat, x))

    def _token_frame(self, fid: int, u: Tensor, x: Tensor, bank_ids: list[int]) -> SentFrame:
        st = self.state
        base = self._token_base(fid)
        data, u_hat = self.model.compress_token(u, st.tokens[base] if base is not None else None)
        st.tokens[fid] = u_hat
        x_hat = quality = None
        if self.settings.quality_floor > 0:
            x_hat = render(self.model, u_hat, [self._reference(i) for i in bank_ids])
            quality = psnr(x_hat, x)
        packet = self._token_packet(fid, base, bank_ids, data)
        self._forget(fid)
        return SentFrame(fid, FrameKind.TOKEN, [packet], x_hat, quality)

    def _has_time_to_synthesize(self, fid: int) -> bool:
        if self.frame_period is None or self.synthesis_seconds is None or self.synthesis_seconds <= self.frame_period:
            return True
        return (fid - self.timed_at) * self.frame_period >= RETIME_SECONDS

    def _token_base(self, fid: int) -> int | None:
        """The frame whose token the next one is a delta from: the newest the receiver decoded exactly."""
        st = self.state
        return st.acked_frame if 0 < fid - st.acked_frame <= HISTORY and st.acked_frame in st.tokens else None

    def _token_packet(self, fid: int, base: int | None, bank_ids: list[int], data: bytes) -> bytes:
        st = self.state
        ref, mask = pk.ref_set(bank_ids)
        if any(not r.acked for i, r in st.refs.items() if i > bank_ids[-1]):
            mask |= pk.PENDING
        return pk.to_bytes(pk.TokenPacket(self._seq(), fid, fid - base if base is not None else 0, ref, mask, data))

    def _keyframe(self, fid: int, x: Tensor) -> SentFrame:
        st = self.state
        payload, u_hat, x_hat = encode_keyframe(self.model, x, step_index(self.settings.keyframe_step))
        ref = st.next_ref
        st.next_ref += 1
        st.refs[ref] = SentReference(fid, u_hat, x_hat)
        st.tokens[fid] = u_hat
        st.last_keyframe = fid
        st.keyframe_requested = False
        pieces = pk.fragment(payload.to_bytes(), self.settings.max_packet)
        packets = [pk.to_bytes(pk.KeyframeFragment(self._seq(), fid, ref & 0xFF, i, len(pieces), piece))
                   for i, piece in enumerate(pieces)]
        self._forget(fid)
        return SentFrame(fid, FrameKind.KEYFRAME, packets, x_hat, psnr(x_hat, x))

    # -- feedback -----------------------------------------------------------------------------
    def on_feedback(self, data: bytes) -> bool:
        """A datagram from the receiver. False (and no change) if it is not valid feedback."""
        try:
            fb = pk.from_bytes(data)
        except pk.PacketError:
            return False
        if not isinstance(fb, pk.Feedback):
            return False
        st = self.state
        if fb.flags & pk.Flags.HAS_ACK:
            frame = pk.unwrap(fb.frame, 16, st.frame - 1)
            if frame < st.frame and frame in st.tokens:
                st.acked_frame = max(st.acked_frame, frame)
        if fb.flags & pk.Flags.HAS_REFS and st.next_ref:
            held = pk.read_ref_set(fb.ref, fb.ref_mask, st.next_ref - 1)
            if max(held) < st.next_ref and (self.receiver_newest is None or max(held) > self.receiver_newest):
                self.receiver_newest = max(held)
                self.resend_tries = 0
            for r in held:
                if r in st.refs:
                    st.refs[r].acked = True
            # the receiver keeps the REF_WINDOW newest references; older ones are gone there
            for r in [r for r in st.refs if r <= max(held) - pk.REF_WINDOW]:
                del st.refs[r]
        if fb.flags & pk.Flags.KEYFRAME_REQUEST:
            # a request made before the receiver got anything past our newest keyframe may be
            # answered by that keyframe already; one made after it means that keyframe was lost too
            after = fb.flags & pk.Flags.HAS_ACK and st.last_keyframe is not None and frame >= st.last_keyframe
            if after or not fb.flags & pk.Flags.HAS_ACK or st.last_keyframe is None:
                st.keyframe_requested = True
                self.last_request = st.frame
                # what the receiver holds as it asks: a resend starts after its newest reference
                self.request_newest = max(held) if fb.flags & pk.Flags.HAS_REFS and st.next_ref else None
        return True

    # -- state helpers ------------------------------------------------------------------------
    def _bank(self) -> list[int]:
        """The newest acknowledged references that fit one packet's reference window, oldest first.
        Before the first acknowledgement: the newest reference sent, optimistically (a receiver
        without it holds its picture and asks for a keyframe; there is no older bank to fall back on)."""
        acked = sorted(r for r, ref in self.state.refs.items() if ref.acked)
        if not acked:
            return [max(self.state.refs)] if self.state.refs else []
        return [r for r in acked if r > acked[-1] - pk.REF_WINDOW][-self.settings.bank_size:]

    def _reference(self, ref: int) -> Reference:
        r = self.state.refs[ref]
        if r.reference is None:
            r.reference = self.model.reference(r.x_hat, r.u_hat)
        return r.reference

    def _seq(self) -> int:
        self.state.seq += 1
        return self.state.seq - 1

    def _forget(self, fid: int) -> None:
        st = self.state
        for f in [f for f in st.tokens if f <= fid - HISTORY]:
            del st.tokens[f]
        # unacknowledged references older than the window can never be used
        for r in [r for r, ref in st.refs.items() if r <= st.next_ref - 1 - 2 * pk.REF_WINDOW]:
            del st.refs[r]
