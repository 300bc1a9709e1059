"""Encoder and decoder pipelines: frames in, chunks out, and back.

The encoder runs the decoder on its own output (closed loop): every frame's reconstruction is
exactly what a decoder will produce, and a frame whose reconstruction falls below the quality
floor, or comes after ``max_keyframe_interval`` frames, is sent as a keyframe instead. A frame
that the newest keyframe's picture matches better than its synthesis is sent as a repeat of
that picture (no token). Keyframes join a bank of at most ``bank_size`` references (oldest
evicted) that the decoder mirrors. With a rate cap (``max_kbps``) the floor's keyframes also
wait until a `KeyframeBudget` can pay for them.

With ``keyframe_codec="av1"`` the references are instead one continuous AV1 stream
(`codec.av1_reference`): a new reference every ``reference_interval`` frames, or, with a rate
target (``kbps``), as soon as a `RateControl` bucket can pay for one. Every frame in between is a
token frame or a repeat of the newest reference's picture, whichever costs less in distortion
(MSE) + ``lmbda`` * bits; the synthesis is never shown where the held picture is closer.

For files, `pack_token_runs` then recodes each run of token frames between keyframes as one
rANS stream, and merges each run of repeats into one chunk; an AV1 reference takes the frames
after it into its own chunk (the per-frame chunks stay, for the streaming path that sends frames
one by one).

Frames are (1, 3, R, R) floats in [0, 1] at the model's resolution. Reconstructions are rounded
to the 8-bit grid before they are used as references, so both sides keep identical references.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from fractions import Fraction
from typing import Iterator

import numpy as np
import torch
from torch import Tensor

from codec.av1_reference import (CALL_PRESET, DEFAULT_PRESET, FIXED_OFFSETS_BELOW_KBPS, MAX_CRF, MAX_PRESET, MIN_CRF,
                                 MIN_PRESET, Quantizer, ReferenceDecoder, ReferenceEncoder, quantizers_for_kbps)
from codec.nn.model import IMFCodec, Reference
from codec.nn.keyframe_codec import KEYFRAME_STEPS, step_index
from codec.video_io import to_tensor, to_uint8
from entropy.bitstream import (
    KEYFRAME_STEP_SINCE, LAZY_REFERENCE_TOKENS_SINCE, MAX_BANK, MAX_RUN_FRAMES, RESTORATION_SINCE, SELF_DELIMITING_SINCE,
    VERSION,
    Av1ReferencesPayload, BitstreamError, Chunk, ChunkType, KeyframePayload, RepeatPayload, TokenRunPayload,
    has_sequence_header,
)

KEYFRAME_CODECS = ("learned", "av1")


def to_8bit(x: Tensor) -> Tensor:
    return x.clamp(0, 1).mul(255).round().div(255)


def psnr(x_hat: Tensor, x: Tensor) -> float:
    mse = (x_hat - x).square().mean().item()
    return 10 * torch.log10(torch.tensor(1 / max(mse, 1e-10))).item()


def check_reference_settings(s) -> None:
    """The knobs that `EncoderSettings` and the streaming `SenderSettings` share: ValueError if out of range."""
    step_index(s.keyframe_step)
    if s.keyframe_codec not in KEYFRAME_CODECS:
        raise ValueError(f"keyframe codec must be one of {', '.join(KEYFRAME_CODECS)}, not {s.keyframe_codec!r}")
    if not MIN_CRF <= s.av1_crf <= MAX_CRF:
        raise ValueError(f"AV1 CRF must be {MIN_CRF} to {MAX_CRF}, not {s.av1_crf}")
    if not MIN_PRESET <= s.av1_preset <= MAX_PRESET:
        raise ValueError(f"SVT-AV1 preset must be {MIN_PRESET} to {MAX_PRESET}, not {s.av1_preset}")
    if s.reference_interval < 1 or s.intra_interval < 0 or s.kbps < 0 or s.lmbda < 0 or s.probe_interval < 0:
        raise ValueError("reference interval must be at least 1; intra interval, kbps, lambda and probe interval "
                         "not negative")


# References the decoder keeps, by keyframe codec. AV1 references come every few frames, and the
# older one of two adds nothing: measured with the shipped model on the 12 validation clips (100
# frames, --kbps 3 and 8), a bank of 1 gave 22.42 / 26.19 dB, MS-SSIM 0.7157 / 0.8388, VMAF 16.1 /
# 32.2, against a bank of 2's 22.38 / 26.13, 0.7139 / 0.8355, 16.0 / 32.1, and synthesizes a frame
# 17% faster (66 against 80 ms, 1 thread).
DEFAULT_BANK_SIZE = {"learned": 2, "av1": 1}

# Frames between a closed loop's syntheses made only to learn whether the model beats holding
# (`SynthesisGate`'s probes).
PROBE_INTERVAL = 25


def resolve_bank_size(settings) -> None:
    """A settings object's bank_size None -> its keyframe codec's default (frozen dataclasses)."""
    if settings.bank_size is None:
        object.__setattr__(settings, "bank_size", DEFAULT_BANK_SIZE[settings.keyframe_codec])


@dataclass(frozen=True)
class EncoderSettings:
    # The defaults (24 dB floor, 11 kbps cap, keyframe step 2) were chosen on 12 training clips, not
    # on the validation clips: see MODEL.md, "Default encoder settings".
    quality_floor: float = 24.0  # PSNR (dB) below which a frame is sent as a keyframe instead
    max_keyframe_interval: int = 250  # frames; 10 s at 25 fps
    bank_size: int | None = None  # references the decoder keeps; None: DEFAULT_BANK_SIZE of the keyframe codec
    max_kbps: float = 11.0  # 0: no cap; else the floor's keyframes wait for a KeyframeBudget at this rate
    repeat_keyframe: bool = True  # a frame closer to the newest keyframe's picture than to its synthesis repeats it
    keyframe_step: float = 2.0  # quantization step of keyframe images, one of KEYFRAME_STEPS: coarser, fewer bits
    keyframe_codec: str = "learned"  # or "av1": references as one AV1 stream
    # -- the AV1 reference stream
    kbps: float = 0.0  # rate target: 0 for none (a reference every reference_interval frames at av1_crf)
    reference_interval: int = 6  # frames from one AV1 reference to the next, without a rate target
    av1_crf: int = 58  # SVT-AV1 CRF of the references, without a rate target
    av1_preset: int = DEFAULT_PRESET  # SVT-AV1 preset of the references (the encoder's search; not in the stream)
    intra_interval: int = 1500  # frames between AV1 intra frames (60 s at 25 fps); 0: only the first
    lmbda: float = 1e-6  # MSE per bit in the token-or-repeat decision
    # A token frame is shown only where this times its MSE (plus lambda * bits) is below holding's.
    # Chosen on 12 training clips (100 frames, --kbps 4 and 8, MS-SSIM / VMAF): 1.0 gave 0.7986 /
    # 21.5 and 0.8921 / 42.5, 1.25 0.8033 / 22.5 and 0.8958 / 42.9, 1.5 0.8068 / 23.3 and 0.8900 /
    # 42.4 (a lambda of 1e-5 instead: 0.8003 / 22.7 and 0.8892 / 42.5). A synthesis barely closer
    # than the held picture costs its token's bits, and the first after a reference that
    # reference's token, which a later reference would have used better; and it is softer, which
    # VMAF penalizes (on the validation clips at --kbps 4, no token frames at all: VMAF 21.9, against
    # 20.5 with a margin of 1.0).
    synthesis_margin: float = 1.25
    # Under a rate target, an inter reference is sent only where holding the newest one is more than
    # this times as far (MSE) from the frame as the references sent so far were from theirs (a
    # running mean), the factor falling to 1 as the bucket fills (a full bucket spills what it does
    # not spend): where the picture is still, a new reference at qindex 255 costs its bytes and
    # adds coding noise of its own. On the 12 training clips (100 frames, --kbps 2, 3 and 4; kbps /
    # MS-SSIM / VMAF) 2.5 gave 1.6 / 0.7730 / 11.6, 2.4 / 0.8161 / 20.4 and 3.1 / 0.8454 / 24.6;
    # 1.6 gave 1.7 / 0.7690 / 11.3, 2.5 / 0.8185 / 21.4 and 3.2 / 0.8424 / 25.3; 0 (a reference
    # whenever the rate affords one) 1.7 / 0.7689 / 11.4, 2.6 / 0.8142 / 21.1 and 3.6 / 0.8448 /
    # 24.9: as good or better for 10-15% fewer bits. A fixed factor (not falling) left more unspent.
    reference_gain: float = 2.5
    probe_interval: int = PROBE_INTERVAL  # 0: no limit
    # Show AV1 inter references restored by the model's restoration (format 8), where it has one.
    # None: below FIXED_OFFSETS_BELOW_KBPS, where the references are SVT-AV1's coarsest; on the 12
    # validation clips it gained there and lost on CRF mode's finer references (MODEL.md, "Restoration").
    restore: bool | None = None

    def __post_init__(self) -> None:
        check_reference_settings(self)
        if self.synthesis_margin <= 0:
            raise ValueError(f"synthesis margin must be positive, not {self.synthesis_margin}")
        if self.reference_gain < 0:
            raise ValueError(f"reference gain must not be negative, not {self.reference_gain}")
        resolve_bank_size(self)
        if not 1 <= self.bank_size <= MAX_BANK:
            raise ValueError(f"bank size must be 1 to {MAX_BANK}, not {self.bank_size}")
        if self.max_keyframe_interval < 1:
            raise ValueError(f"max keyframe interval must be at least 1, not {self.max_keyframe_interval}")


class KeyframeBudget:
    """A leaky bucket of bits for rate-capped encoding: it fills at the cap's rate, holds at most
    ``window`` seconds of it, and pays for every frame sent. A keyframe that the quality floor
    asks for is sent only when the bucket holds as many bits as the previous keyframe cost;
    otherwise the frame goes out as tokens at lower quality. Keyframes that must be sent (the
    first, and the forced interval) are paid for even if that leaves a debt. Token frames are
    counted at their own chunk's size, a little more than they cost once a file packs them.
    ``kbps`` 0 means no cap: every keyframe is affordable."""

    def __init__(self, kbps: float, fps: float, window: float = 2.0):
        self.capped = kbps > 0
        self.fill = 1000 * kbps / fps  # bits per frame
        self.capacity = 1000 * kbps * window
        self.level = self.capacity
        self.keyframe_bits = 0

    def next_frame(self) -> None:
        self.level = min(self.capacity, self.level + self.fill)

    def affords_keyframe(self) -> bool:
        return not self.capped or self.level >= self.keyframe_bits

    def pay(self, bits: int, keyframe: bool) -> None:
        self.level -= bits
        if keyframe:
            self.keyframe_bits = bits


@dataclass
class UnsentToken:
    """The newest AV1 reference's token, which waits for the first token frame after it (format 6)."""

    delta: Tensor  # (1, d) quantized, from `base`
    base: Tensor | None  # the last token sent before it, where the chain resumes if it is never sent


@dataclass
class CodecState:
    """What encoder and decoder both keep between frames."""

    bank: list[Reference] = field(default_factory=list)
    u_prev_hat: Tensor | None = None  # the last token sent: the next token frame's delta starts here
    since_keyframe: int = 0
    picture: Tensor | None = None  # the newest keyframe's decoded image: the model's reference
    shown: Tensor | None = None  # what a repeat shows: the picture, restored (format 8) if an AV1 one
    # Format 6 sends an AV1 reference's token just before the first token frame after it, and never
    # if a reference comes first: a decoder's reference joins its bank only with its token, so one
    # whose token was never sent leaves the encoder's bank too.
    unsent: UnsentToken | None = None  # the encoder's
    token_due: bool = False  # the decoder's: the next token frame's deltas start with its reference's
    # The encoder's newest AV1 reference (picture, token) before E_F and IMF_D make its bank entry
    # (a third of a synthesis): made at its first synthesis, which most references never see.
    unbuilt: tuple[Tensor, Tensor] | None = None


def drop_unsent_reference(state: CodecState) -> None:
    """A new reference comes while the newest one's token was never sent: no decoder holds that one."""
    if state.unsent is not None:
        if state.unbuilt is not None:
            state.unbuilt = None  # never synthesized from, so never in the bank
        else:
            state.bank = state.bank[:-1]
        state.u_prev_hat, state.unsent = state.unsent.base, None


def build_newest_reference(model: IMFCodec, state: CodecState, bank_size: int) -> None:
    """The encoder's unbuilt newest reference joins the bank (before a synthesis needs it)."""
    if state.unbuilt is not None:
        state.bank = (state.bank + [model.reference(*state.unbuilt)])[-bank_size:]
        state.unbuilt = None


@dataclass
class EncodedFrame:
    chunk: Chunk
    x_hat: Tensor  # (1, 3, R, R), exactly what the decoder will output
    psnr: float


# -- per-frame steps, shared by the file pipeline below and the streaming Sender/Receiver -------
def render(model: IMFCodec, u_hat: Tensor, bank: list[Reference]) -> Tensor:
    """A token frame's reconstruction, on the 8-bit grid: what encoder and decoder both show."""
    return to_8bit(model.synthesize(u_hat, bank))


def encode_keyframe(model: IMFCodec, x: Tensor, step: int = 0) -> tuple[KeyframePayload, Tensor, Tensor]:
    """x (1, 3, R, R) -> (payload, u_hat, x_hat): its token coded on its own, and its image at the
    quantization step KEYFRAME_STEPS[step]."""
    token, u_hat = model.compress_token(model.token_symbols(x), None)
    image, x_hat = model.keyframe_codec.compress(x, step)
    return KeyframePayload(token, image, step), u_hat, to_8bit(x_hat)


def decode_keyframe(model: IMFCodec, payload: KeyframePayload, resolution: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Inverse of encode_keyframe -> (u_hat, x_hat)."""
    if payload.step >= len(KEYFRAME_STEPS):
        raise BitstreamError(f"keyframe quantization step {payload.step} is unknown to this imfc")
    u_hat = model.decompress_token(payload.token, None)
    return u_hat, to_8bit(model.keyframe_codec.decompress(payload.image, resolution, payload.step))


class RateControl:
    """A leaky bucket for a rate target. It fills at ``kbps``, holds at most ``window`` seconds of
    it, and pays for every frame at its cost once packed in a file; what a file spends besides its
    frames (``STREAM_OVERHEAD_BITS``: header and chunk framing) is paid with its first intra frame.
    A token frame needs its token's bits; otherwise the frame repeats the picture.

    An intra frame is paid over the next ``horizon`` seconds, a share each frame, not at once: a
    bucket that paid it at once would send nothing but repeats until it had refilled (seconds,
    at a few kbps), where spreading the debt lets the references come evenly at what the rate
    leaves. In a call, over any stretch of ``horizon`` seconds from the start the total stays at
    the target. A file says how many ``frames`` it has and pays its first intra frame over 95% of
    them: its rate is judged over the whole file, and references then come evenly from start to
    end (on the 12 training clips, before the pacing below, --kbps 2, 3, 4: MS-SSIM 0.770, 0.813,
    0.846 and VMAF 11.9, 21.1, 24.9, against 0.762, 0.815, 0.844 and 11.0, 19.9, 23.7 over 3 s).
    The first intra frame costs at most ``INTRA_SECONDS`` of the rate (`Encoder` chooses the
    quantizer so). 1.5 s, not 3 as before the fixed qindex offsets
    (`quantizers_for_kbps`): on the 12 training clips at --kbps 2, 3 and 4, MS-SSIM 0.762, 0.815
    and 0.844 with 1.5 s, 0.696, 0.766 and 0.814 with 3 s, 0.762, 0.814 and 0.836 with 1 s: a
    cheaper intra frame leaves the rate to references that come more often.

    ``affords_reference`` paces the inter references of a file: one is affordable once the frames
    since the last have earned the running mean cost of a reference at the rate the intra debts
    leave, the bucket's level spread over the next ``window``. A bucket alone (a reference as soon
    as it holds the mean cost) sent a reference that cost more than the mean (motion) only after a
    longer wait, which made the next one dearer still, and then every other frame where the
    picture was still.

    A file's end leaves no time to repay a reference that costs more than expected, and some do
    (high motion since the last one; up to 7.6 times the running mean on 6 training clips). So a
    reference is due near the end only if the rest of the file could repay ``SURPRISE`` times the
    mean; one that came late on a 4 s clip had taken it to 3.46 kbps at --kbps 3. 2, not the 4 of
    the unpaced bucket: with the intra frame owed until the end, 4 stopped the references of short
    clips a third before their end (deepavsr_00008, 74 frames, none after frame 41 at --kbps 4).
    On the 12 training clips (--kbps 2, 3, 4, 6, 8; MS-SSIM, highest clip's kbps) 2 gave 0.7904,
    0.8361, 0.8556, 0.8810, 0.9045 (1.88, 2.89, 3.81, 6.10, 7.58 kbps), 4 0.7730, 0.8161, 0.8454,
    0.8690, 0.8998, 1 0.7926, 0.8378, 0.8563 (2.02, 2.95, 3.83 kbps)."""

    REFERENCE_GUESS = 440  # bits of an inter reference before one has been measured (qindex 255: ~52 bytes)
    SURPRISE = 2.0
    INTRA_SECONDS = 1.5
    FILE_HORIZON = 0.95  # of a file's frames, over which its first intra frame is paid
    STREAM_OVERHEAD_BITS = 8 * 66  # a 54-byte header, one chunk's 7 bytes of framing, its rANS flush

    def __init__(self, kbps: float, fps: float, window: float = 1.0, horizon: float = 3.0, frames: int | None = None,
                 stream_overhead_bits: int = STREAM_OVERHEAD_BITS):
        """``stream_overhead_bits``: 0 for a call, whose packets carry all their own framing."""
        self.fill = 1000 * kbps / fps  # bits per frame
        self.capacity = 1000 * kbps * window
        self.window_frames = window * fps
        self.level = 0.0
        self.overhead = float(stream_overhead_bits)  # paid with the first intra frame
        self.reference_bits = float(self.REFERENCE_GUESS)
        self.intra_budget = 1000 * kbps * self.INTRA_SECONDS
        self.horizon_frames = max(1, int(self.FILE_HORIZON * frames) if frames else round(horizon * fps))
        self.debts: list[list[float]] = []  # [bits per frame, frames left] of each intra frame
        self.frames_left = frames  # None: a stream without an end (a call)

    def next_frame(self) -> None:
        if self.frames_left is not None:
            self.frames_left -= 1  # those after this one
        self.level = min(self.capacity, self.level + self.fill - sum(d[0] for d in self.debts))
        for d in self.debts:
            d[1] -= 1
        self.debts = [d for d in self.debts if d[1] > 0]

    def affords(self, bits: float) -> bool:
        return self.level >= bits

    def affords_reference(self, frames_since: int) -> bool:
        """An inter reference ``frames_since`` frames after the last one (this frame counted), at
        the pace the rate allows (above), and near a file's end only if the rest of the file could
        repay SURPRISE times its mean cost."""
        spare = self.fill - sum(d[0] for d in self.debts) + self.level / self.window_frames
        if spare <= 0 or frames_since < self.reference_bits / spare:
            return False
        if self.frames_left is None:
            return True
        owed = sum(d[0] * min(d[1], self.frames_left) for d in self.debts)
        return self.level + self.fill * self.frames_left - owed >= self.SURPRISE * self.reference_bits

    def pay(self, bits: float, reference: bool = False, intra: bool = False) -> None:
        if intra:
            bits, self.overhead = bits + self.overhead, 0.0
            self.debts.append([bits / self.horizon_frames, self.horizon_frames])
            return
        self.level -= bits
        if reference:
            self.reference_bits = 0.7 * self.reference_bits + 0.3 * bits


# What an AV1 reference costs in a file besides its packet and token: its position in the
# AV1_REFERENCES chunk, one byte (whose own framing a file pays once per 4,096 frames; since format
# 7 a packet carries no length).
AV1_CHUNK_OVERHEAD_BITS = 8 * 1
RANS_FLUSH_BYTES = 6  # a token coded alone pays it; in a packed run it is paid once per chunk


def packed_token_bits(data: bytes) -> int:
    """Bits a token frame coded alone as ``data`` adds to a packed run of tokens (at least 1 byte)."""
    return 8 * max(1, len(data) - RANS_FLUSH_BYTES)


# Relative difference under which two MSEs count as equal: float rounding, not a picture.
SAME_MSE = 1e-3


def mse(x_hat: Tensor, x: Tensor) -> float:
    return (x_hat - x).square().mean().item()


class SynthesisGate:
    """Whether a frame between references is worth synthesizing to weigh its token against holding,
    where holding wins without asking. Measured with the shipped model on 12 training clips (100
    frames, AV1 references at --kbps 3 and 8; of 1,221 frames the encoder synthesized, 699 became
    token frames), each rule alone, none of its skipped frames would have been a token frame:
    - the held picture is within 30 dB of the frame (141 skipped);
    - the last synthesis since the newest reference lost to holding, and its error is more than
      LOSS_MARGIN times this frame's held error: synthesis changes slowly from frame to frame, the
      held error grows (220 skipped at 1.25).
    And a budget, for real time (issue 16): a synthesis is 40-55 ms on 2 cores, the first after a
    reference 70-75 ms (it makes the reference's bank entry), against 5-12 ms for a held frame or a
    reference. With the stage-8 weights on the same 12 clips at --kbps 3 and 8 (session 14), the
    closed loop synthesized 658 of 2,186 frames and 43 became token frames: 27 of 28 syntheses
    right after a synthesis that won did win, but only 16 of the 630 others, and 3 of the 327 made
    on the first frame after a reference, but 4 of 12 where the synthesis before that reference had
    won; of the 245 made after a loss, the 7 that won all came where the lost synthesis's error was
    below RETRY times this frame's held error (25 such). So a synthesis that follows a win, across a
    new reference too, is always allowed (a continuation), and one where the last loss would now win
    (a retry); any other (a probe) needs the reference to be at least PROBE_SINCE
    frames old and the last probe ``probe_interval`` frames back, so the encoder's per-frame time
    stays a held frame's on at least 19 frames in 20 wherever the model keeps losing (0: no probe
    budget, the rules above alone)."""

    HOLD_MSE = 1e-3  # 30 dB
    LOSS_MARGIN = 1.25
    RETRY = 0.8  # 1 / the encoder's synthesis margin: the last synthesis, unchanged, would win now
    PROBE_SINCE = 2

    def __init__(self, probe_interval: int = PROBE_INTERVAL) -> None:
        self.probe_interval = probe_interval
        self.lost_mse: float | None = None  # the last synthesis that lost to holding, since the newest reference
        self.won = False  # the last synthesis won: the next is a continuation
        self.since = 0  # frames since the newest reference
        self.since_probe = probe_interval  # frames since the last probe
        self.probing = False  # the synthesis asked for is a probe

    def next_frame(self) -> None:
        self.since += 1
        self.since_probe += 1

    def worth_synthesizing(self, hold_mse: float) -> bool:
        self.probing = False
        if hold_mse <= self.HOLD_MSE:
            return False
        if self.won or hold_mse == float("inf"):  # a continuation, or holding is no option
            return True
        if self.lost_mse is not None:
            if self.lost_mse <= self.RETRY * hold_mse:
                return True
            if self.lost_mse > self.LOSS_MARGIN * hold_mse:
                return False
        if not self.probe_interval:
            return True
        self.probing = self.since >= self.PROBE_SINCE and self.since_probe >= self.probe_interval
        return self.probing

    def synthesized(self, synthesis_mse: float, won: bool) -> None:
        if self.probing:
            self.since_probe = 0
        self.won = won
        self.lost_mse = None if won else synthesis_mse

    def new_reference(self) -> None:
        self.lost_mse, self.since = None, 0  # a win before it still makes the next synthesis a continuation


class Encoder:
    def __init__(self, model: IMFCodec, settings: EncoderSettings, fps: float = 25.0, frames: int | None = None,
                 lazy_reference_tokens: bool = True):
        """``fps`` turns kbps into bits per frame and times the AV1 reference stream; ``frames``,
        where known (a file), lets a rate target be kept over a clip shorter than 3 s.
        ``lazy_reference_tokens`` False: every AV1 reference carries its token, as format 5 did."""
        self.model = model.eval()
        self.lazy_reference_tokens = lazy_reference_tokens
        self.settings = settings
        self.state = CodecState()
        self.budget = KeyframeBudget(settings.max_kbps, fps)
        self.av1: ReferenceEncoder | None = None
        self.rate: RateControl | None = None
        self.since_intra = 0
        self.intra_requested = False  # set by a receiver's keyframe request: the next reference is intra
        self.reference_mse: float | None = None  # running mean of the AV1 references' own MSE
        # the reference stream's nominal rate (with a rate target references come when they can)
        self.av1_fps = Fraction(fps).limit_denominator(1001) / settings.reference_interval
        if settings.keyframe_codec == "av1" and settings.kbps:
            self.rate = RateControl(settings.kbps, fps, frames=frames)
        self.gate = SynthesisGate(settings.probe_interval)
        # format 8: inter references shown restored, where they are SVT-AV1's coarsest (fixed offsets,
        # below 5 kbps); finer ones the restoration softens (MODEL.md, "Restoration")
        self.restore = model.restoration is not None and settings.keyframe_codec == "av1" and (
            settings.restore if settings.restore is not None else 0 < settings.kbps < FIXED_OFFSETS_BELOW_KBPS)

    @torch.no_grad()
    def encode(self, x: Tensor) -> EncodedFrame:
        if self.settings.keyframe_codec == "av1":
            return self._encode_av1(x)
        out = self._encode(x)
        self.budget.pay(8 * len(out.chunk.payload), out.chunk.type == ChunkType.KEYFRAME)
        return out

    def close(self) -> None:
        """End the AV1 reference stream, if any (no frame may follow)."""
        if self.av1 is not None:
            self.av1.close()

    def _encode(self, x: Tensor) -> EncodedFrame:
        s, st = self.settings, self.state
        self.budget.next_frame()
        u = self.model.token_symbols(x)
        if st.bank and st.since_keyframe < s.max_keyframe_interval:
            data, u_hat = self.model.compress_token(u, st.u_prev_hat)
            x_hat = render(self.model, u_hat, st.bank)
            quality = psnr(x_hat, x)
            repeat = psnr(st.shown, x) if s.repeat_keyframe else -torch.inf
            if max(quality, repeat) >= s.quality_floor or not self.budget.affords_keyframe():
                st.since_keyframe += 1
                if repeat > quality:
                    return EncodedFrame(Chunk(ChunkType.REPEAT, RepeatPayload(1).to_bytes()), st.shown, repeat)
                st.u_prev_hat = u_hat
                return EncodedFrame(Chunk(ChunkType.FRAME, data), x_hat, quality)
        payload, u_hat, x_hat = encode_keyframe(self.model, x, step_index(s.keyframe_step))
        add_reference(self.model, st, x_hat, u_hat, s.bank_size)
        st.shown = x_hat  # a learned keyframe is shown as decoded
        return EncodedFrame(Chunk(ChunkType.KEYFRAME, payload.to_bytes()), x_hat, psnr(x_hat, x))

    # -- the AV1 reference stream ---------------------------------------------------------------
    def _encode_av1(self, x: Tensor) -> EncodedFrame:
        s, st, rate = self.settings, self.state, self.rate
        if rate:
            rate.next_frame()
        self.gate.next_frame()
        self.since_intra += 1
        intra = st.picture is None or self.intra_requested or (s.intra_interval and self.since_intra >= s.intra_interval)
        hold_mse = mse(st.shown, x) if st.shown is not None and s.repeat_keyframe else float("inf")
        if rate:
            gain = s.reference_gain
            if gain > 1:  # falls to 1 as the bucket fills: a full bucket spills what it does not spend
                gain = 1 + (gain - 1) * (1 - rate.level / rate.capacity)
            # "more than": beyond float rounding too, or a still picture (hold_mse the newest
            # reference's own, the running mean of equal values) would resend itself on a coin toss
            worth = self.reference_mse is None or hold_mse > gain * self.reference_mse * (1 + SAME_MSE)
            due = st.since_keyframe >= 1 and worth and rate.affords_reference(st.since_keyframe + 1)
        else:
            due = st.since_keyframe + 1 >= s.reference_interval
        if intra or due:
            out = self._av1_reference(x, bool(intra))
            ref_mse = 10 ** (-out.psnr / 10)  # its MSE, as psnr() found it
            self.reference_mse = ref_mse if self.reference_mse is None else 0.7 * self.reference_mse + 0.3 * ref_mse
            return out
        st.since_keyframe += 1
        if self.gate.worth_synthesizing(hold_mse):  # the token only here: E_T is a third of a held frame's time
            data, u_hat = self.model.compress_token(self.model.token_symbols(x), st.u_prev_hat)
            if st.unsent is not None:  # the reference's token goes first, in the same rANS stream
                data = self.model.compress_deltas(torch.cat([st.unsent.delta, self.model.decompress_deltas(data, 1)]))
            token_bits = packed_token_bits(data)
            if not rate or rate.affords(token_bits):
                build_newest_reference(self.model, st, s.bank_size)
                x_hat = render(self.model, u_hat, st.bank)
                synthesis_mse = mse(x_hat, x)
                repeat_cost = hold_mse + s.lmbda  # a repeat costs a bit
                won = s.synthesis_margin * synthesis_mse + s.lmbda * token_bits < repeat_cost
                self.gate.synthesized(synthesis_mse, won)
                if won:
                    st.u_prev_hat, st.unsent = u_hat, None
                    if rate:
                        rate.pay(token_bits)
                    return EncodedFrame(Chunk(ChunkType.FRAME, data), x_hat, psnr(x_hat, x))
        if rate:
            rate.pay(1)
        return EncodedFrame(Chunk(ChunkType.REPEAT, RepeatPayload(1).to_bytes()), st.shown, psnr(st.shown, x))

    def _av1_reference(self, x: Tensor, intra: bool) -> EncodedFrame:
        st = self.state
        if self.av1 is None:
            self.av1, packet, picture = start_reference_stream(
                self.model.cfg.resolution, self.av1_fps, to_uint8(x), self.settings.av1_crf, self.settings.kbps,
                self.rate.intra_budget if self.rate else None, self.settings.av1_preset)
        else:
            packet, picture = self.av1.code(to_uint8(x), intra)
        x_hat = to_tensor(picture)
        bank_size = self.settings.bank_size
        drop_unsent_reference(st)
        if bank_size > 1:  # an unbuilt reference whose token was sent (format 5) stays in a decoder's bank
            build_newest_reference(self.model, st, bank_size)
        u = self.model.token_symbols(x_hat)  # the token of the picture both sides hold, as in training
        base = st.u_prev_hat
        data, u_hat = self.model.compress_token(u, _chain_start(st, u))
        st.unbuilt, st.u_prev_hat, st.since_keyframe, st.picture = (x_hat, u_hat), u_hat, 0, x_hat
        st.shown = shown_picture(self.model, x_hat, packet, self.restore)
        token_bits = packed_token_bits(data)
        if self.lazy_reference_tokens:
            st.unsent = UnsentToken(self.model.decompress_deltas(data, 1), base)
            data, token_bits = b"", 0
        self.gate.new_reference()
        if intra:
            self.since_intra = 0
            self.intra_requested = False
        if self.rate:
            self.rate.pay(8 * len(packet) + token_bits + AV1_CHUNK_OVERHEAD_BITS, True, intra)
        payload = Av1ReferencesPayload(1, ((0, packet),), (), data)
        return EncodedFrame(Chunk(ChunkType.AV1_REFERENCES, payload.to_bytes()), st.shown, psnr(st.shown, x))


def start_reference_stream(size: int, fps: Fraction, picture: np.ndarray, crf: int, kbps: float,
                           budget_bits: float | None,
                           preset: int = DEFAULT_PRESET) -> tuple[ReferenceEncoder, bytes, np.ndarray]:
    """The AV1 stream and its first, intra reference -> (encoder, packet, decoded picture). Without
    a budget (no rate target), CRF mode at ``crf``; with one, the first of quantizers_for_kbps(kbps)
    whose intra frame fits ``budget_bits`` (the cheapest if none does). ``preset``: SVT-AV1's.

    The rungs are tried at the real-time preset (CALL_PRESET) where ``preset`` is slower: a slow
    preset takes 0.3-0.5 s to open a stream (256x256, 1 thread) against 0.03, and its intra frame
    is smaller (the first frames of the 12 validation clips at each rung: preset 2's 8-10% smaller
    on average, at most 1% larger), so the stream is opened once, on a rung that fits."""
    ladder = [Quantizer(crf, None, preset)] if budget_bits is None else list(quantizers_for_kbps(kbps, preset))
    chosen = ladder[-1]
    for quantizer in ladder[:-1]:
        trial = replace(quantizer, preset=max(preset, CALL_PRESET))
        encoder = ReferenceEncoder(size, fps, trial)
        packet, decoded = encoder.code(picture, intra=True)
        if 8 * len(packet) <= budget_bits:
            if trial == quantizer:
                return encoder, packet, decoded
            chosen = quantizer
            encoder.close()
            break
        encoder.close()
    encoder = ReferenceEncoder(size, fps, chosen)
    return encoder, *encoder.code(picture, intra=True)


def _chain_start(state: CodecState, u: Tensor) -> Tensor:
    """What an AV1 reference's token is coded from: the last token, or zero at a stream's start."""
    return state.u_prev_hat if state.u_prev_hat is not None else torch.zeros_like(u)


def pack_token_runs(model: IMFCodec, chunks: list[Chunk], version: int = VERSION) -> list[Chunk]:
    """Each run of FRAME chunks -> one TOKEN_RUN chunk with the same token deltas, so the run pays
    the rANS flush and the chunk framing once (a token frame's ~2 bytes of information came with
    ~12 bytes of both); each run of REPEAT chunks -> one REPEAT of all their frames. From an
    AV1_REFERENCES chunk on, the AV1 references and the FRAME and REPEAT chunks between them go
    into one AV1_REFERENCES chunk, their deltas into its one token stream. Runs longer than
    MAX_RUN_FRAMES continue in a new chunk. ``version``: the stream's format, which the Encoder's
    lazy_reference_tokens must match (False before version 6)."""
    lazy_reference_tokens = version >= LAZY_REFERENCE_TOKENS_SINCE
    out: list[Chunk] = []
    run: list[Tensor] = []  # the open TOKEN_RUN's deltas, one (1 or 2, d) entry per frame
    group: dict = {}  # the open AV1_REFERENCES chunk: frames, references, modes, deltas
    due = False  # a reference's token waits in the next token frame's payload

    def flush() -> None:
        if run:
            payload = TokenRunPayload(len(run), model.compress_deltas(torch.cat(run)))
            out.append(Chunk(ChunkType.TOKEN_RUN, payload.to_bytes()))
            run.clear()
        if group:
            deltas = model.compress_deltas(torch.cat(group["deltas"])) if group["deltas"] else b""
            payload = Av1ReferencesPayload(group["frames"], tuple(group["references"]), tuple(group["modes"]), deltas)
            out.append(Chunk(ChunkType.AV1_REFERENCES, payload.to_bytes(version >= SELF_DELIMITING_SINCE)))
            group.clear()

    for chunk in chunks:
        if chunk.type == ChunkType.AV1_REFERENCES:
            p = Av1ReferencesPayload.from_bytes(chunk.payload, lazy_reference_tokens, compact=True)  # the Encoder's
            if not group or group["frames"] + p.frames > MAX_RUN_FRAMES:
                flush()
                group.update(frames=0, references=[], modes=[], deltas=[])
            group["references"] += [(group["frames"] + i, packet) for i, packet in p.references]
            group["modes"] += p.modes
            if p.tokens:
                group["deltas"].append(model.decompress_deltas(p.tokens, p.token_count(lazy_reference_tokens)))
            group["frames"] += p.frames
            due = lazy_reference_tokens and len(p.references) - 1 not in p.used_references()
            continue
        deltas = model.decompress_deltas(chunk.payload, 1 + due) if chunk.type == ChunkType.FRAME else None
        if chunk.type in (ChunkType.FRAME, ChunkType.KEYFRAME):
            due = False
        if group and chunk.type in (ChunkType.FRAME, ChunkType.REPEAT) and group["frames"] + chunk.frames <= MAX_RUN_FRAMES:
            token = chunk.type == ChunkType.FRAME
            group["modes"] += [token] * chunk.frames
            if token:
                group["deltas"].append(deltas)
            group["frames"] += chunk.frames
            continue
        if chunk.type == ChunkType.FRAME:
            if group:
                flush()
            run.append(deltas)  # the exact quantized deltas
            if len(run) == MAX_RUN_FRAMES:
                flush()
            continue
        flush()
        if (chunk.type == ChunkType.REPEAT and out and out[-1].type == ChunkType.REPEAT
                and out[-1].frames + chunk.frames <= MAX_RUN_FRAMES):
            frames = out[-1].frames + chunk.frames
            out[-1] = Chunk(ChunkType.REPEAT, RepeatPayload(frames).to_bytes())
        else:
            out.append(chunk)
    flush()
    return out


def add_reference(model: IMFCodec, state: CodecState, x_hat: Tensor, u_hat: Tensor, bank_size: int) -> None:
    state.bank = (state.bank + [model.reference(x_hat, u_hat)])[-bank_size:]
    state.u_prev_hat = u_hat
    state.since_keyframe = 0
    state.picture = x_hat


@torch.no_grad()
def shown_picture(model: IMFCodec, picture: Tensor, packet: bytes, restore: bool) -> Tensor:
    """An AV1 reference picture and its packet -> what is shown for it and its repeats: where
    ``restore``, an inter picture restored by the model's restoration (format 8), in 8 bits as every
    shown frame (an intra picture, several times finer, is what it was not trained on); the picture
    itself is what both sides predict from."""
    return to_8bit(model.restoration(picture)) if restore and not has_sequence_header(packet) else picture


class Decoder:
    def __init__(self, model: IMFCodec, resolution: tuple[int, int], bank_size: int, version: int = VERSION):
        """``version``: the stream's format version (its header's). Raises BitstreamError where the
        header's resolution is not the model's or its bank size is out of range."""
        r = model.cfg.resolution
        if tuple(resolution) != (r, r):
            raise BitstreamError(f"coded size {resolution[1]}x{resolution[0]}, but the model codes {r}x{r}")
        if not 1 <= bank_size <= MAX_BANK:
            raise BitstreamError(f"bank size {bank_size} (1 to {MAX_BANK})")
        self.model = model.eval()
        self.keyframe_steps = version >= KEYFRAME_STEP_SINCE
        self.lazy_reference_tokens = version >= LAZY_REFERENCE_TOKENS_SINCE
        self.self_delimiting = version >= SELF_DELIMITING_SINCE
        self.restore = version >= RESTORATION_SINCE and model.restoration is not None
        self.resolution = resolution
        self.bank_size = bank_size
        self.state = CodecState()
        self.av1: ReferenceDecoder | None = None  # made at the first AV1 reference

    def decode_frames(self, chunk: Chunk) -> Iterator[Tensor]:
        """Any chunk -> its frames, (1, 3, R, R) each, one at a time (a run of 250 frames held at once
        would be ~200 MB at 256x256). Raises BitstreamError on a payload that cannot be decoded."""
        if chunk.type == ChunkType.REPEAT:
            for _ in range(chunk.frames):
                yield self._repeat()
            return
        if chunk.type == ChunkType.AV1_REFERENCES:
            yield from self._av1_references(Av1ReferencesPayload.from_bytes(chunk.payload, self.lazy_reference_tokens,
                                                                             self.self_delimiting))
            return
        if chunk.type != ChunkType.TOKEN_RUN:
            yield self.decode(chunk)
            return
        run = TokenRunPayload.from_bytes(chunk.payload)
        if not self.state.bank and not self.state.token_due:
            raise BitstreamError("a frame before any keyframe")
        with torch.no_grad():
            deltas = iter(self.model.decompress_deltas(run.tokens, run.frames + self.state.token_due))
        for _ in range(run.frames):
            with torch.no_grad():
                yield self._token_frame(deltas)

    @torch.no_grad()
    def decode(self, chunk: Chunk) -> Tensor:
        """A keyframe or token frame chunk -> (1, 3, R, R) frame. Raises BitstreamError on a payload that
        cannot be decoded."""
        st = self.state
        if chunk.type in (ChunkType.TOKEN_RUN, ChunkType.REPEAT, ChunkType.AV1_REFERENCES) and chunk.frames > 1:
            raise BitstreamError("a run holds several frames: decode it with decode_frames")
        if chunk.type == ChunkType.REPEAT:
            return self._repeat()
        if chunk.type == ChunkType.AV1_REFERENCES:
            return next(self.decode_frames(chunk))
        if chunk.type == ChunkType.KEYFRAME:
            u_hat, x_hat = decode_keyframe(self.model, KeyframePayload.from_bytes(chunk.payload, self.keyframe_steps), self.resolution)
            add_reference(self.model, st, x_hat, u_hat, self.bank_size)
            st.shown, st.token_due = x_hat, False
            return x_hat
        if not st.bank and not st.token_due:
            raise BitstreamError("a frame before any keyframe")
        return self._token_frame(iter(self.model.decompress_deltas(chunk.payload, 1 + st.token_due)))

    def _av1_references(self, payload: Av1ReferencesPayload) -> Iterator[Tensor]:
        st = self.state
        if self.av1 is None:
            self.av1 = ReferenceDecoder(self.resolution[0])
        count = payload.token_count(self.lazy_reference_tokens)
        with torch.no_grad():
            deltas = iter(self.model.decompress_deltas(payload.tokens, count) if count else ())
        references = dict(payload.references)
        modes = iter(payload.modes)
        for i in range(payload.frames):
            with torch.no_grad():
                if i not in references:
                    yield self._token_frame(deltas) if next(modes) else self._repeat()
                    continue
                x_hat = to_tensor(self.av1.decode(references[i]))
                if self.lazy_reference_tokens:  # its token comes with the first token frame after it, if any
                    st.picture, st.since_keyframe, st.token_due = x_hat, 0, True
                else:
                    self._reference_token(x_hat, next(deltas)[None])
                st.shown = shown_picture(self.model, x_hat, references[i], self.restore)
                yield st.shown

    def _repeat(self) -> Tensor:
        st = self.state
        if st.shown is None:
            raise BitstreamError("a frame before any keyframe")
        st.since_keyframe += 1
        return st.shown

    def _reference_token(self, x_hat: Tensor, delta: Tensor) -> None:
        """An AV1 reference joins the bank with its token, coded from the last token sent."""
        st = self.state
        since = st.since_keyframe
        add_reference(self.model, st, x_hat, _chain_start(st, delta) + delta, self.bank_size)
        st.since_keyframe, st.token_due = since, False

    def _token_frame(self, deltas: Iterator[Tensor]) -> Tensor:
        """The next token frame, its deltas (d,) from ``deltas``: first its reference's token where due."""
        st = self.state
        if st.token_due:
            self._reference_token(st.picture, next(deltas)[None])
        st.u_prev_hat = st.u_prev_hat + next(deltas)[None]
        st.since_keyframe += 1
        return render(self.model, st.u_prev_hat, st.bank)
