"""Encoder and decoder pipelines: frames in, chunks out, and back.

The encoder runs the decoder on its own output (closed loop): every frame's reconstruction is
exactly what a decoder will produce, and a frame whose reconstruction falls below the quality
floor, or comes after ``max_keyframe_interval`` frames, is sent as a keyframe instead. A frame
that the newest keyframe's picture matches better than its synthesis is sent as a repeat of
that picture (no token). Keyframes join a bank of at most ``bank_size`` references (oldest
evicted) that the decoder mirrors. With a rate cap (``max_kbps``) the floor's keyframes also
wait until a `KeyframeBudget` can pay for them.

For files, `pack_token_runs` then recodes each run of token frames between keyframes as one
rANS stream, and merges each run of repeats into one chunk (the per-frame chunks stay, for the
streaming path that sends frames one by one).

Frames are (1, 3, R, R) floats in [0, 1] at the model's resolution. Reconstructions are rounded
to the 8-bit grid before they are used as references, so both sides keep identical references.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import Tensor

from codec.nn.model import IMFCodec, Reference
from codec.nn.keyframe_codec import KEYFRAME_STEPS, step_index
from entropy.bitstream import (
    KEYFRAME_STEP_SINCE, MAX_BANK, MAX_RUN_FRAMES, VERSION, BitstreamError, Chunk, ChunkType, KeyframePayload,
    RepeatPayload, TokenRunPayload,
)


def to_8bit(x: Tensor) -> Tensor:
    return x.clamp(0, 1).mul(255).round().div(255)


def psnr(x_hat: Tensor, x: Tensor) -> float:
    mse = (x_hat - x).square().mean().item()
    return 10 * torch.log10(torch.tensor(1 / max(mse, 1e-10))).item()


@dataclass(frozen=True)
class EncoderSettings:
    # The defaults (24 dB floor, 11 kbps cap, keyframe step 2) were chosen on 12 training clips, not
    # on the validation clips: see MODEL.md, "Default encoder settings".
    quality_floor: float = 24.0  # PSNR (dB) below which a frame is sent as a keyframe instead
    max_keyframe_interval: int = 250  # frames; 10 s at 25 fps
    bank_size: int = 2
    max_kbps: float = 11.0  # 0: no cap; else the floor's keyframes wait for a KeyframeBudget at this rate
    repeat_keyframe: bool = True  # a frame closer to the newest keyframe's picture than to its synthesis repeats it
    keyframe_step: float = 2.0  # quantization step of keyframe images, one of KEYFRAME_STEPS: coarser, fewer bits

    def __post_init__(self) -> None:
        step_index(self.keyframe_step)
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
class CodecState:
    """What encoder and decoder both keep between frames."""

    bank: list[Reference] = field(default_factory=list)
    u_prev_hat: Tensor | None = None  # the last token sent: the next token frame's delta starts here
    since_keyframe: int = 0
    picture: Tensor | None = None  # the newest keyframe's decoded image, which a repeat shows


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


class Encoder:
    def __init__(self, model: IMFCodec, settings: EncoderSettings, fps: float = 25.0):
        """``fps`` only matters with a rate cap: it turns kbps into bits per frame."""
        self.model = model.eval()
        self.settings = settings
        self.state = CodecState()
        self.budget = KeyframeBudget(settings.max_kbps, fps)

    @torch.no_grad()
    def encode(self, x: Tensor) -> EncodedFrame:
        out = self._encode(x)
        self.budget.pay(8 * len(out.chunk.payload), out.chunk.type == ChunkType.KEYFRAME)
        return out

    def _encode(self, x: Tensor) -> EncodedFrame:
        s, st = self.settings, self.state
        self.budget.next_frame()
        u = self.model.token_symbols(x)
        if st.bank and st.since_keyframe < s.max_keyframe_interval:
            data, u_hat = self.model.compress_token(u, st.u_prev_hat)
            x_hat = render(self.model, u_hat, st.bank)
            quality = psnr(x_hat, x)
            repeat = psnr(st.picture, x) if s.repeat_keyframe else -torch.inf
            if max(quality, repeat) >= s.quality_floor or not self.budget.affords_keyframe():
                st.since_keyframe += 1
                if repeat > quality:
                    return EncodedFrame(Chunk(ChunkType.REPEAT, RepeatPayload(1).to_bytes()), st.picture, repeat)
                st.u_prev_hat = u_hat
                return EncodedFrame(Chunk(ChunkType.FRAME, data), x_hat, quality)
        payload, u_hat, x_hat = encode_keyframe(self.model, x, step_index(s.keyframe_step))
        add_reference(self.model, st, x_hat, u_hat, s.bank_size)
        return EncodedFrame(Chunk(ChunkType.KEYFRAME, payload.to_bytes()), x_hat, psnr(x_hat, x))


def pack_token_runs(model: IMFCodec, chunks: list[Chunk]) -> list[Chunk]:
    """Each run of FRAME chunks -> one TOKEN_RUN chunk with the same token deltas, so the run pays
    the rANS flush and the chunk framing once (a token frame's ~2 bytes of information came with
    ~12 bytes of both); each run of REPEAT chunks -> one REPEAT of all their frames. Runs longer
    than MAX_RUN_FRAMES (only with a keyframe interval above it) continue in a new chunk."""
    out: list[Chunk] = []
    run: list[Tensor] = []

    def flush() -> None:
        if run:
            payload = TokenRunPayload(len(run), model.compress_deltas(torch.cat(run)))
            out.append(Chunk(ChunkType.TOKEN_RUN, payload.to_bytes()))
            run.clear()

    for chunk in chunks:
        if chunk.type == ChunkType.FRAME:
            run.append(model.decompress_deltas(chunk.payload, 1))  # the exact quantized delta
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
        self.resolution = resolution
        self.bank_size = bank_size
        self.state = CodecState()

    def decode_frames(self, chunk: Chunk) -> Iterator[Tensor]:
        """Any chunk -> its frames, (1, 3, R, R) each, one at a time (a run of 250 frames held at once
        would be ~200 MB at 256x256). Raises BitstreamError on a payload that cannot be decoded."""
        if chunk.type == ChunkType.REPEAT:
            for _ in range(chunk.frames):
                yield self._repeat()
            return
        if chunk.type != ChunkType.TOKEN_RUN:
            yield self.decode(chunk)
            return
        run = TokenRunPayload.from_bytes(chunk.payload)
        if not self.state.bank:
            raise BitstreamError("a frame before any keyframe")
        with torch.no_grad():
            deltas = self.model.decompress_deltas(run.tokens, run.frames)
        for delta in deltas:
            with torch.no_grad():
                yield self._token_frame(delta[None])

    @torch.no_grad()
    def decode(self, chunk: Chunk) -> Tensor:
        """A keyframe or token frame chunk -> (1, 3, R, R) frame. Raises BitstreamError on a payload that
        cannot be decoded."""
        st = self.state
        if chunk.type == ChunkType.TOKEN_RUN or (chunk.type == ChunkType.REPEAT and chunk.frames > 1):
            raise BitstreamError("a run holds several frames: decode it with decode_frames")
        if chunk.type == ChunkType.REPEAT:
            return self._repeat()
        if chunk.type == ChunkType.KEYFRAME:
            u_hat, x_hat = decode_keyframe(self.model, KeyframePayload.from_bytes(chunk.payload, self.keyframe_steps), self.resolution)
            add_reference(self.model, st, x_hat, u_hat, self.bank_size)
            return x_hat
        if not st.bank:
            raise BitstreamError("a frame before any keyframe")
        return self._token_frame(self.model.decompress_deltas(chunk.payload, 1))

    def _repeat(self) -> Tensor:
        st = self.state
        if st.picture is None:
            raise BitstreamError("a frame before any keyframe")
        st.since_keyframe += 1
        return st.picture

    def _token_frame(self, delta: Tensor) -> Tensor:
        st = self.state
        st.u_prev_hat = st.u_prev_hat + delta
        st.since_keyframe += 1
        return render(self.model, st.u_prev_hat, st.bank)
