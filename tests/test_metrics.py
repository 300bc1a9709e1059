"""Quality metrics on inputs whose scores are known."""

import math

import numpy as np
import pytest

from evaluation.metrics import luma, ms_ssim_scales, psnr_rgb, psnr_y, score, structural, vmaf_available

from .conftest import moving_square_clip


@pytest.fixture(scope="module")
def frames() -> np.ndarray:
    return moving_square_clip(4, 64)


def test_psnr_of_known_errors(frames):
    off_by_one = frames.astype(np.int16) + np.where(frames < 255, 1, -1)
    assert psnr_rgb(frames, off_by_one.astype(np.uint8)) == pytest.approx(20 * math.log10(255), abs=1e-9)  # MSE 1
    flat = np.full((1, 8, 8, 3), 100, np.uint8)
    assert psnr_rgb(flat, flat + 10)[0] == pytest.approx(10 * math.log10(255 ** 2 / 100))  # MSE 100: 28.13 dB
    assert psnr_rgb(frames, frames).tolist() == [100.0] * 4  # identical frames: capped, not infinite


def test_luma_is_bt601_studio_range():
    rgb = np.array([[[0, 0, 0], [255, 255, 255], [255, 0, 0], [0, 255, 0], [0, 0, 255]]], np.uint8)
    assert luma(rgb)[0] == pytest.approx([16.0, 235.0, 81.481, 144.553, 40.966])
    # a pure chroma change that keeps luma fixed does not move PSNR-Y
    a, b = np.full((1, 4, 4, 3), 128, np.uint8), np.full((1, 4, 4, 3), 128, np.uint8)
    b[..., 1] += 1  # green +1 changes Y by 128.553/255
    assert psnr_y(a, b)[0] == pytest.approx(10 * math.log10(255 ** 2 / (128.553 / 255) ** 2))


def test_structural_scores_identical_and_degraded(frames):
    s, ms, g = structural(frames, frames)
    # identical frames score exactly 1 (and GMSD 0) up to float32 rounding in the filtered means
    assert np.allclose(s, 1, atol=1e-5) and np.allclose(ms, 1, atol=1e-5) and np.allclose(g, 0, atol=1e-6)
    noisy = np.clip(frames.astype(int) + np.random.default_rng(0).integers(-30, 31, frames.shape), 0, 255).astype(np.uint8)
    s2, ms2, g2 = structural(frames, noisy)
    assert (s2 < 0.95).all() and (ms2 < 1).all() and (g2 > 0.01).all()


def test_ms_ssim_scales():
    assert ms_ssim_scales(256) == 5 and ms_ssim_scales(161) == 5 and ms_ssim_scales(160) == 4
    assert ms_ssim_scales(64) == 3 and ms_ssim_scales(8) == 1


@pytest.mark.skipif(not vmaf_available(), reason="no FFmpeg with libvmaf (imageio-ffmpeg)")
def test_vmaf_orders_quality(frames):
    """VMAF of a clip against itself is high, and drops for a degraded copy."""
    clean = score(frames, frames)
    blurred = frames.copy()
    blurred[:, :, :] = frames.astype(np.float32).mean(axis=(1, 2), keepdims=True).astype(np.uint8)
    worse = score(frames, blurred)
    assert clean.vmaf.shape == (4,) and worse.vmaf.shape == (4,)
    assert clean.vmaf.mean() > 90 and worse.vmaf.mean() < clean.vmaf.mean() - 30


def test_score_rejects_mismatched_inputs(frames):
    with pytest.raises(ValueError):
        score(frames, frames[:2], with_vmaf=False)
