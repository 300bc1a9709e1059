"""IMFCodec: the Implicit Motion Function model (Gao et al., CVPR 2024) as a video codec.

    keyframe x_r --KeyframeCodec--> x_r_hat --E_F--> f_r ----------------------------+ V
                 --E_T--> t_r --Q--> t_r_hat --IMF_D--> m_r -------------------------+ K
    frame x_c    --E_T--> t_c --Q(t_c - t_prev_hat)--> t_c_hat --IMF_D--> m_c -------+ Q
                                                                                     v
                              IMF_A (cross-attention + transformer blocks, per scale)
                                      | aligned features, warped x_r_hat
                                      v
                                     D_F --> x_c_hat

Tokens are coded as integer-lattice deltas from the previous decoded token (the token of the
keyframe starts each chain, coded on its own), with a learned quantization step per dimension.
Everything that depends only on the reference (f_r, m_r, keys and values) lives in a
``Reference`` made once per keyframe; ``synthesize`` takes a bank of them.

The references may also be pictures decoded by another codec (AV1, see `train/av1_refs.py`):
``forward(..., decoded_refs=[...])`` then skips the learned keyframe codec, and each reference's
token is E_T of its decoded picture, which the decoder computes itself (no bits).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from compressai.entropy_models import EntropyBottleneck
from compressai.models import CompressionModel
from torch import Tensor, nn

from codec.nn.alignment import ImplicitMotionAlignment
from codec.nn.config import IMFConfig
from codec.nn.feature_encoder import FeatureEncoder
from codec.nn.frame_decoder import FrameDecoder
from codec.nn.keyframe_codec import KeyframeCodec
from codec.nn.restoration import Restoration
from codec.nn.layers.attention import KeyValue, bank as kv_bank, versions
from codec.nn.token_decoder import TokenDecoder
from codec.nn.token_encoder import TokenEncoder
from entropy.coding import decode_symbols, encode_symbols, quantize_noise


READY_BANKS = 2  # banks whose ready operands a model keeps for coding (about 45 MB each, default preset)


@dataclass
class RDOutput:
    """What a training step needs: reconstructions and the likelihoods that give the rate."""

    x_hat: Tensor  # (B, 3, H, W) current frame
    x_ref_hat: Tensor  # (B, 3, H, W) decoded keyframe (with decoded_refs: the newest of them, as given)
    token_likelihoods: Tensor  # (B, d) current token, coded as a delta from the previous one
    # None with decoded_refs: the references are not coded by this model
    ref_token_likelihoods: Tensor | None  # (B, d) keyframe token, coded on its own
    keyframe_likelihoods: Tensor | None  # (B, M, H/16, W/16)


@dataclass
class Reference:
    """Everything the decoder keeps of one keyframe."""

    x_hat: Tensor  # (B, 3, H, W) the decoded keyframe
    t_hat: Tensor  # (B, d) its token
    kv: list[KeyValue]  # per scale, fine to coarse
    motion: Tensor  # (B, C, H/4, W/4) its finest motion features m_r (for D_F's hold mask)


class IMFCodec(CompressionModel):
    def __init__(self, cfg: IMFConfig):
        super().__init__()
        self.cfg = cfg
        self.feature_encoder = FeatureEncoder(cfg)  # E_F
        self.token_encoder = TokenEncoder(cfg)  # E_T
        self.token_decoder = TokenDecoder(cfg)  # IMF_D
        self.alignment = ImplicitMotionAlignment(cfg)  # IMF_A
        self.frame_decoder = FrameDecoder(cfg)  # D_F
        self.keyframe_codec = KeyframeCodec(*cfg.keyframe_channels)
        self.restoration = Restoration(*cfg.restoration) if cfg.restoration else None
        # quantization step of each token dimension (learned). It starts small: measured on the
        # default preset, E_T's tokens vary with std 0.001 across frames at init and 0.24 after
        # 2,500 steps, while a unit step's quantization noise has std 0.29, so with step 1 the
        # tokens carried almost no information and the model never learned motion.
        self.token_log_step = nn.Parameter(torch.full((cfg.token_dim,), math.log(0.02)))
        self.token_prior = EntropyBottleneck(cfg.token_dim)  # keyframe tokens
        self.token_delta_prior = EntropyBottleneck(cfg.token_dim)  # frame-to-frame token deltas
        # the last READY_BANKS banks coded from, newest last: (bank, parameter versions, ready operands)
        self._ready_banks: list[tuple[list[Reference], tuple, list]] = []

    # -- building blocks ----------------------------------------------------------------------
    def token_symbols(self, x: Tensor) -> Tensor:
        """x (B, 3, H, W) -> t / step (B, d): the token on the unit quantization lattice."""
        return self.token_encoder(x) / self.token_log_step.exp()

    def reference(self, x_ref_hat: Tensor, u_ref_hat: Tensor) -> Reference:
        """Decoded keyframe and its quantized token symbols -> cached Reference."""
        t_hat = u_ref_hat * self.token_log_step.exp()
        f_r = self.feature_encoder(x_ref_hat)
        m_r = self.token_decoder(t_hat, x_ref_hat.shape[-2:])
        return Reference(x_ref_hat, t_hat, self.alignment.prepare(x_ref_hat, f_r, m_r), m_r[0])

    def reference_from_picture(self, x_hat: Tensor) -> Reference:
        """A reference picture decoded by another codec (AV1) (B, 3, H, W) -> Reference, its token E_T
        of the picture rounded to the lattice (as `forward_decoded_refs` does in eval): both sides of
        a call hold the picture, so the token is computed, not sent."""
        return self.reference(x_hat, self.token_symbols(x_hat).round())

    def synthesize(self, u_hat: Tensor, bank: Sequence[Reference]) -> Tensor:
        """Quantized token symbols (B, d) and a bank of references, oldest first -> x_hat (B, 3, H, W)."""
        t_hat = u_hat * self.token_log_step.exp()
        m_c = self.token_decoder(t_hat, bank[0].x_hat.shape[-2:])
        aligned, warped = self.alignment(m_c, self._attention_bank(bank, u_hat.shape[0]))
        if not self.cfg.hold_mask:
            return self.frame_decoder(aligned, warped)
        # log of the RMS difference: it spans 1e-3 (token unchanged) to ~0.5, which a log keeps in reach
        change = (m_c[0] - bank[-1].motion).square().mean(1, keepdim=True).add(1e-6).log() / 2
        return self.frame_decoder(aligned, warped, bank[-1].x_hat, change)

    def _attention_bank(self, bank: Sequence[Reference], batch: int) -> list:
        """The bank's keys and values per scale. Coding (no gradients) makes them ready once per bank
        (`CrossAttention.ready`) and keeps the last READY_BANKS banks': consecutive frames share a bank,
        and an encoder and a decoder in one process (a simulated call) each have theirs."""
        kv = lambda: [kv_bank([r.kv[s] for r in bank]) for s in range(len(bank[0].kv))]
        if torch.is_grad_enabled() or batch != bank[0].x_hat.shape[0]:
            return kv()
        version = versions(self.alignment.cross)
        for i, (refs, made_with, ready) in enumerate(self._ready_banks):
            if made_with == version and len(refs) == len(bank) and all(a is b for a, b in zip(refs, bank)):
                self._ready_banks.append(self._ready_banks.pop(i))
                return ready
        self._ready_banks = [c for c in self._ready_banks if c[1] == version]
        while len(self._ready_banks) >= READY_BANKS:  # the oldest go before the new one is made (memory)
            self._ready_banks.pop(0)
        self._ready_banks.append((list(bank), version, self.alignment.ready(kv())))
        return self._ready_banks[-1][2]

    # -- training -------------------------------------------------------------------------------
    def forward(self, x_ref: Tensor | None, x_prev: Tensor, x_cur: Tensor, key_step: Tensor | None = None,
                decoded_refs: Sequence[Tensor] | None = None) -> RDOutput:
        """Frames (B, 3, H, W) in [0, 1]: a keyframe, the frame before the current one, the current one.
        ``key_step`` (B,): the keyframes' quantization steps (default: the unit step).
        ``decoded_refs``: instead of a keyframe (``x_ref`` None), a bank of reference pictures already
        decoded by another codec (e.g. AV1), oldest first, each (B, 3, H, W); see `forward_decoded_refs`.

        Quantization is replaced by additive uniform noise (the EntropyBottleneck's training mode).
        """
        if decoded_refs is not None:
            if x_ref is not None:
                raise ValueError("give either a keyframe x_ref or decoded_refs, not both")
            return self.forward_decoded_refs(decoded_refs, x_prev, x_cur)
        key = self.keyframe_codec(x_ref, key_step)
        u_ref, u_prev, u_cur = self.token_symbols(torch.cat([x_ref, x_prev, x_cur])).chunk(3)
        u_ref_hat, ref_token_likelihoods = self.token_prior(u_ref[..., None])
        u_prev_hat = quantize_noise(u_prev) if self.training else u_prev.round()
        delta_hat, token_likelihoods = self.token_delta_prior((u_cur - u_prev_hat)[..., None])
        u_cur_hat = u_prev_hat + delta_hat[..., 0]
        ref = self.reference(key.x_hat, u_ref_hat[..., 0])
        return RDOutput(
            x_hat=self.synthesize(u_cur_hat, [ref]),
            x_ref_hat=key.x_hat,
            token_likelihoods=token_likelihoods[..., 0],
            ref_token_likelihoods=ref_token_likelihoods[..., 0],
            keyframe_likelihoods=key.likelihoods,
        )

    def forward_decoded_refs(self, refs: Sequence[Tensor], x_prev: Tensor, x_cur: Tensor) -> RDOutput:
        """The AV1-reference regime: ``refs`` are decoded pictures (B, 3, H, W), oldest first, used as
        the bank as they are. No keyframe is coded here, so there is no keyframe rate and no keyframe
        reconstruction; each reference's token is E_T of its picture (quantized like any token, so
        the token decoder sees what it was trained on), computed by the decoder itself, so it costs
        no bits either. The current token is coded as a delta from the previous one, as in `forward`.
        A sample with fewer real references can repeat one: a bank of two equal references attends
        as one does (each reference's logits carry -log(bank size)), up to rounding."""
        *u_refs, u_prev, u_cur = self.token_symbols(torch.cat([*refs, x_prev, x_cur])).chunk(len(refs) + 2)
        u_refs_hat = [quantize_noise(r) if self.training else r.round() for r in u_refs]
        u_prev_hat = quantize_noise(u_prev) if self.training else u_prev.round()
        delta_hat, token_likelihoods = self.token_delta_prior((u_cur - u_prev_hat)[..., None])
        u_cur_hat = u_prev_hat + delta_hat[..., 0]
        bank = [self.reference(x, u_hat) for x, u_hat in zip(refs, u_refs_hat)]
        return RDOutput(
            x_hat=self.synthesize(u_cur_hat, bank),
            x_ref_hat=refs[-1],
            token_likelihoods=token_likelihoods[..., 0],
            ref_token_likelihoods=None,
            keyframe_likelihoods=None,
        )

    # -- coding ---------------------------------------------------------------------------------
    def build_entropy_tables(self) -> None:
        """Build the integer CDF tables the rANS coder uses. Call once after training; they are saved
        with the weights, and a loaded model uses them as they are."""
        self.update(force=True)
        self.keyframe_codec.step_tables.build(self.keyframe_codec.entropy_bottleneck)

    def compress_token(self, u: Tensor, u_prev_hat: Tensor | None) -> tuple[bytes, Tensor]:
        """Token symbols (1, d) -> (bytes, u_hat). Without u_prev_hat the token is coded on its own."""
        if u_prev_hat is None:
            data = encode_symbols(self.token_prior, u[..., None])
        else:
            data = self.compress_deltas(u - u_prev_hat)
        return data, self.decompress_token(data, u_prev_hat)

    def decompress_token(self, data: bytes, u_prev_hat: Tensor | None) -> Tensor:
        if u_prev_hat is None:
            return decode_symbols(self.token_prior, data, (1,))[..., 0]
        return u_prev_hat + self.decompress_deltas(data, 1)[0]

    # A run of token deltas in one rANS stream pays the coder's flush (8 bytes) once, not per frame.
    def compress_deltas(self, deltas: Tensor) -> bytes:
        """Quantized token deltas (n, d) -> one rANS stream."""
        return encode_symbols(self.token_delta_prior, deltas.T[None])

    def decompress_deltas(self, data: bytes, n: int) -> Tensor:
        """Inverse of compress_deltas -> (n, d)."""
        return decode_symbols(self.token_delta_prior, data, (n,))[0].T


def build_model(cfg: IMFConfig) -> IMFCodec:
    return IMFCodec(cfg)
