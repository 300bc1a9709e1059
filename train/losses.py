"""Training objective: distortion (L1 + MS-SSIM) on the frame and the keyframe, plus lambda * rate
from the entropy models' likelihoods. No perceptual network: those need downloaded weights."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from pytorch_msssim import ms_ssim
from torch import Tensor

from codec.nn.model import RDOutput
from entropy.coding import bits


def msssim(x_hat: Tensor, x: Tensor) -> Tensor:
    """MS-SSIM per sample (B,), with the largest Gaussian window (<= 11) that five scales allow."""
    side = min(x.shape[-2:])
    win = 11
    while win > 3 and side <= (win - 1) * 16:
        win -= 2
    return ms_ssim(x_hat, x, data_range=1.0, win_size=win, size_average=False)


def psnr(x_hat: Tensor, x: Tensor) -> Tensor:
    mse = (x_hat - x).square().flatten(1).mean(1)
    return -10 * torch.log10(mse.clamp_min(1e-10))


@dataclass
class LossTerms:
    loss: Tensor
    distortion: Tensor
    psnr: float
    msssim: float
    key_psnr: float
    bpp_token: float  # current frame's token
    bpp_key: float  # keyframe image + its token


def rd_loss(out: RDOutput, x_cur: Tensor, x_ref: Tensor, lmbda_token: float, lmbda_key: float,
            msssim_weight: float, key_step: Tensor | None = None, hold_softmin: float = 0.0) -> LossTerms:
    """D(frame) + D(keyframe) + lmbda_token * bpp_token + lmbda_key * bpp_key,
    D = (1 - w) * L1 + w * (1 - MS-SSIM). Keep w at 0 until the networks reconstruct decently:
    measured here, MS-SSIM from step 0 drives a fresh keyframe codec to 7 dB (it ignores
    brightness and colour at first), where L1 alone reaches 22.5 dB in 150 steps.

    A keyframe quantized with step s (``key_step``, (B,)) has its bits weighted by s: the slope of an
    L1 rate-distortion curve grows in proportion to the step, so each step is then the best point
    for its own slope, and the encoder has no reason to inflate its latent to serve coarse steps
    (with one weight for all steps it did: 250 steps raised the unit step's bpp from 0.104 to 0.132).

    With references decoded by another codec (``out.keyframe_likelihoods`` None) only the frame's
    distortion and its token's rate remain: the reference is given, not learned. There
    ``hold_softmin`` T > 0 scores each sample by a soft minimum of the synthesis' distortion and that
    of holding ``x_ref`` (the newest reference) instead, -T log(e^(-D_syn/T) + e^(-D_hold/T)): the
    encoder shows whichever is closer, so a sample's synthesis is weighted by sigmoid((D_hold -
    D_syn) / T), its chance of being shown, and the model need not hedge where holding wins anyway."""
    pixels = x_cur.shape[-2] * x_cur.shape[-1]

    def per_sample(x_hat: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        s = msssim(x_hat, x)
        return (1 - msssim_weight) * (x_hat - x).abs().flatten(1).mean(1) + msssim_weight * (1 - s), s

    d_syn, s_cur = per_sample(out.x_hat, x_cur)
    d_cur = d_syn.mean()
    bpp_token = bits(out.token_likelihoods).mean() / pixels
    if out.keyframe_likelihoods is None:  # references decoded by another codec (AV1): nothing to code here
        if hold_softmin > 0:
            with torch.no_grad():
                d_hold, _ = per_sample(x_ref, x_cur)
            t = hold_softmin
            d_cur = (-t * torch.logaddexp(-d_syn / t, -d_hold / t)).mean()
        return LossTerms(
            loss=d_cur + lmbda_token * bpp_token,
            distortion=d_cur.detach(),
            psnr=psnr(out.x_hat.detach(), x_cur).mean().item(),
            msssim=s_cur.detach().mean().item(),
            key_psnr=math.nan,  # not measured: no keyframe is decoded by the model
            bpp_token=bpp_token.item(),
            bpp_key=0.0,
        )
    d_key = per_sample(out.x_ref_hat, x_ref)[0].mean()
    key_bits = bits(out.keyframe_likelihoods) + bits(out.ref_token_likelihoods)
    bpp_key = key_bits.mean() / pixels
    key_rate = bpp_key if key_step is None else (key_bits * key_step).mean() / pixels
    d = d_cur + d_key
    loss = d + lmbda_token * bpp_token + lmbda_key * key_rate
    return LossTerms(
        loss=loss,
        distortion=d.detach(),
        psnr=psnr(out.x_hat.detach(), x_cur).mean().item(),
        msssim=s_cur.detach().mean().item(),
        key_psnr=psnr(out.x_ref_hat.detach(), x_ref).mean().item(),
        bpp_token=bpp_token.item(),
        bpp_key=bpp_key.item(),
    )
