"""Encoder and decoder pipelines: frames in, chunks out, and back.

The encoder runs the decoder on its own output (closed loop): every frame's reconstruction is
exactly what a decoder will produce, and a frame whose reconstruction falls below the quality
floor, or comes after ``max_keyframe_interval`` frames, is sent as a keyframe instead. Keyframes
join a bank of at most ``bank_size`` references (oldest evicted) that the decoder mirrors.

Frames are (1, 3, R, R) floats in [0, 1] at the model's resolution. Reconstructions are rounded
to the 8-bit grid before they are used as references, so both sides keep identical references.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from codec.model import IMFCodec, Reference
from entropy.bitstream import BitstreamError, Chunk, ChunkType, KeyframePayload


def to_8bit(x: Tensor) -> Tensor:
    return x.clamp(0, 1).mul(255).round().div(255)


def psnr(x_hat: Tensor, x: Tensor) -> float:
    mse = (x_hat - x).square().mean().item()
    return 10 * torch.log10(torch.tensor(1 / max(mse, 1e-10))).item()


@dataclass(frozen=True)
class EncoderSettings:
    quality_floor: float = 20.0  # PSNR (dB) below which a frame is sent as a keyframe instead
    max_keyframe_interval: int = 250  # frames; 10 s at 25 fps
    bank_size: int = 2


@dataclass
class CodecState:
    """What encoder and decoder both keep between frames."""

    bank: list[Reference] = field(default_factory=list)
    u_prev_hat: Tensor | None = None
    since_keyframe: int = 0


@dataclass
class EncodedFrame:
    chunk: Chunk
    x_hat: Tensor  # (1, 3, R, R), exactly what the decoder will output
    psnr: float


class Encoder:
    def __init__(self, model: IMFCodec, settings: EncoderSettings):
        self.model = model.eval()
        self.settings = settings
        self.state = CodecState()

    @torch.no_grad()
    def encode(self, x: Tensor) -> EncodedFrame:
        s, st = self.settings, self.state
        u = self.model.token_symbols(x)
        if st.bank and st.since_keyframe < s.max_keyframe_interval:
            data, u_hat = self.model.compress_token(u, st.u_prev_hat)
            x_hat = to_8bit(self.model.synthesize(u_hat, st.bank))
            quality = psnr(x_hat, x)
            if quality >= s.quality_floor:
                st.u_prev_hat = u_hat
                st.since_keyframe += 1
                return EncodedFrame(Chunk(ChunkType.FRAME, data), x_hat, quality)
        token, u_hat = self.model.compress_token(u, None)
        image, x_hat = self.model.keyframe_codec.compress(x)
        x_hat = to_8bit(x_hat)
        add_reference(self.model, st, x_hat, u_hat, s.bank_size)
        payload = KeyframePayload(token, image).to_bytes()
        return EncodedFrame(Chunk(ChunkType.KEYFRAME, payload), x_hat, psnr(x_hat, x))


def add_reference(model: IMFCodec, state: CodecState, x_hat: Tensor, u_hat: Tensor, bank_size: int) -> None:
    state.bank = (state.bank + [model.reference(x_hat, u_hat)])[-bank_size:]
    state.u_prev_hat = u_hat
    state.since_keyframe = 0


class Decoder:
    def __init__(self, model: IMFCodec, resolution: tuple[int, int], bank_size: int):
        self.model = model.eval()
        self.resolution = resolution
        self.bank_size = bank_size
        self.state = CodecState()

    @torch.no_grad()
    def decode(self, chunk: Chunk) -> Tensor:
        """One chunk -> (1, 3, R, R) frame. Raises BitstreamError on a payload that cannot be decoded."""
        st = self.state
        if chunk.type == ChunkType.KEYFRAME:
            payload = KeyframePayload.from_bytes(chunk.payload)
            u_hat = self.model.decompress_token(payload.token, None)
            x_hat = to_8bit(self.model.keyframe_codec.decompress(payload.image, self.resolution))
            add_reference(self.model, st, x_hat, u_hat, self.bank_size)
            return x_hat
        if not st.bank:
            raise BitstreamError("a frame before any keyframe")
        st.u_prev_hat = self.model.decompress_token(chunk.payload, st.u_prev_hat)
        st.since_keyframe += 1
        return to_8bit(self.model.synthesize(st.u_prev_hat, st.bank))
