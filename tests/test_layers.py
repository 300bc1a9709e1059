"""Reusable layers. Tolerances say what they allow: 1e-6 where an operation is exact up to the
float32 rounding of a handful of operations (bilinear weights of 0 or 1, a zero flow); 1e-5 where
two fractional sample positions are composed (their coordinates round twice); 1e-3 to 1e-4 where a
softmax leaves a tiny share (about e^-8) to keys other than the intended one. Each is far below
the 1e-2 that the negative checks use to tell a wrong result."""

import math

import torch

import pytest

from codec.nn.layers import window_tiles
from codec.nn.layers.attention import (CrossAttention, DenseKV, DenseReady, TransformerBlock, WindowKV, WindowReady,
                                       attend_dense, bank, warp_shared_pixels)
from codec.nn.layers.warp import resize_flow, warp


def test_warp_by_zero_is_identity_and_by_whole_pixels_is_a_shift():
    maps = torch.rand(2, 3, 8, 10)
    assert torch.allclose(warp(maps, torch.zeros(2, 2, 8, 10)), maps, atol=1e-6)
    flow = torch.zeros(2, 2, 8, 10)
    flow[:, 0], flow[:, 1] = 1.0, -2.0  # every position reads one row down, two columns left
    out = warp(maps, flow)
    assert torch.allclose(out[..., :-1, 2:], maps[..., 1:, :-2], atol=1e-6)
    assert torch.allclose(out[..., -1, 2:], maps[..., -1, :-2], atol=1e-6)  # reads past the edge are clamped to it


def test_resize_flow_rescales_units_with_the_grid():
    flow = torch.ones(1, 2, 4, 6)
    up = resize_flow(flow, (8, 18))
    assert up.shape == (1, 2, 8, 18)
    assert torch.allclose(up[:, 0], torch.full((1, 8, 18), 2.0))
    assert torch.allclose(up[:, 1], torch.full((1, 8, 18), 3.0))


def test_dense_attention_reports_the_attended_position():
    torch.manual_seed(0)
    attn = CrossAttention(8, 4, None, locality=1.0, extra_tokens=2)
    h, y, x = 2, 4, 4
    k = torch.zeros(1, h, y * x, 4)
    kv = DenseKV.from_tokens(k, torch.rand(1, h, y * x, 4), (y, x))
    # a query that matches only key (2, 3) strongly, everywhere: the attended position is (2, 3)
    k[..., 2 * x + 3, :] = 10.0
    q = torch.ones(1, h, y * x, 4) * 10.0
    out, pos = attend_dense(q, kv, torch.full((h,), math.log(1e-4)), attn.extra)
    assert out.shape == (1, h, y * x, 4)
    assert torch.allclose(pos, torch.tensor([2.0, 3.0]).expand(1, y * x, 2), atol=1e-3)
    # with a strong locality prior and uninformative keys, every query attends to itself: no motion
    _, pos = attend_dense(torch.zeros_like(q), kv, torch.full((h,), math.log(50.0)), attn.extra)
    grid = torch.stack(torch.meshgrid(torch.arange(y), torch.arange(x), indexing="ij"), -1).reshape(-1, 2)
    assert torch.allclose(pos[0], grid.float(), atol=1e-4)


def test_guided_window_attention_follows_the_flow():
    """A whole-pixel flow moves the windowed attention's output (features and pixels) with it."""
    torch.manual_seed(0)
    attn = CrossAttention(8, 4, window=3, locality=50.0, extra_tokens=1, pixel_stride=2).eval()
    m_r, f_r = torch.zeros(1, 8, 6, 6), torch.rand(1, 8, 6, 6)
    pixels = torch.nn.functional.pixel_unshuffle(torch.rand(1, 3, 12, 12), 2)
    kv = attn.prepare(m_r, f_r, pixels)
    assert isinstance(kv, WindowKV)
    flow = torch.zeros(1, 2, 6, 6)
    flow[:, 1] = 1.0  # read one column to the right
    with torch.no_grad():
        still, still_px, _ = attn(torch.zeros(1, 8, 6, 6), kv)
        moved, moved_px, _ = attn(torch.zeros(1, 8, 6, 6), kv, flow)
    # (up to the learned extra tokens' ~e^-8 share, which sees slightly different keys)
    assert torch.allclose(moved[..., 1:-1, :-2], still[..., 1:-1, 1:-1], atol=1e-3)
    assert torch.allclose(moved_px[..., 1:-1, :-2], still_px[..., 1:-1, 1:-1], atol=1e-3)
    assert not torch.allclose(moved, still, atol=1e-2)


def test_pixel_flow_warps_by_the_mean_offset():
    """Shared pixels (stride 2, window 3): attention wholly on the window's right neighbour reads the
    image one map pixel (2 image pixels) to the right; attention split half and half between the
    centre and that neighbour warps by half of it, where blending would average two whole blocks."""
    torch.manual_seed(0)
    image = torch.rand(1, 3, 12, 12)
    kv = WindowKV.from_maps(torch.zeros(1, 1, 1, 6, 6), torch.zeros(1, 1, 1, 6, 6),
                            torch.nn.functional.pixel_unshuffle(image, 2), 3)
    offsets = [(i, j) for i in range(3) for j in range(3)]
    centre, right = offsets.index((1, 1)), offsets.index((1, 2))

    def warped_by(weights: dict[int, float]) -> torch.Tensor:
        mean_w = torch.zeros(1, 6, 6, 9)
        for a, w in weights.items():
            mean_w[..., a] = w
        return torch.nn.functional.pixel_shuffle(warp_shared_pixels(kv, mean_w, offsets, (6, 6)), 2)

    assert torch.allclose(warped_by({centre: 1.0}), image, atol=1e-6)
    assert torch.allclose(warped_by({right: 1.0})[..., :-2], image[..., 2:], atol=1e-6)
    flow = torch.zeros(1, 2, 12, 12)
    flow[:, 1] = 1.0
    assert torch.allclose(warped_by({centre: 0.5, right: 0.5}), warp(image, flow), atol=1e-5)
    # attention mass that went to extra tokens is not a reference's: its pixels are scaled by the rest
    assert torch.allclose(warped_by({centre: 0.25}), 0.25 * image, atol=1e-6)



def test_pixel_flow_samples_the_reference_once():
    """A coarse flow of half an image pixel, then a window offset of another half: composed, that is a
    whole-pixel shift, exact; warping twice would blur through two half-pixel bilinear samples."""
    torch.manual_seed(0)
    image = torch.rand(1, 3, 12, 12)
    kv = WindowKV.from_maps(torch.zeros(1, 1, 1, 6, 6), torch.zeros(1, 1, 1, 6, 6),
                            torch.nn.functional.pixel_unshuffle(image, 2), 3)
    coarse = torch.zeros(1, 2, 6, 6)
    coarse[:, 1] = 0.25  # map pixels: half an image pixel at stride 2
    offsets = [(i, j) for i in range(3) for j in range(3)]
    mean_w = torch.zeros(1, 6, 6, 9)
    mean_w[..., offsets.index((1, 1))] = 0.75
    mean_w[..., offsets.index((1, 2))] = 0.25  # mean offset a quarter map pixel: another half image pixel
    moved = kv.warped(coarse, 2, defer_shared=True)
    out = torch.nn.functional.pixel_shuffle(warp_shared_pixels(moved, mean_w, offsets, (6, 6)), 2)
    assert torch.allclose(out[..., :-1], image[..., 1:], atol=1e-5)
    twice = torch.nn.functional.pixel_shuffle(warp_shared_pixels(kv.warped(coarse, 2), mean_w, offsets, (6, 6)), 2)
    assert not torch.allclose(twice[..., :-1], image[..., 1:], atol=1e-2)

def _perturbed(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random extra tokens and localities, so that every path of the attention carries weight."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return module.eval()


@pytest.mark.parametrize("refs", [1, 2])
def test_ready_dense_attention_matches_attend_dense(refs):
    """The coding path's operands, made once per bank, give what the per-frame path gives."""
    torch.manual_seed(0)
    attn = _perturbed(CrossAttention(16, 8, None, locality=0.5, extra_tokens=2), 1)
    kv = bank([attn.prepare(torch.randn(1, 16, 6, 5), torch.randn(1, 16, 6, 5)) for _ in range(refs)])
    m_c = torch.randn(1, 16, 6, 5)
    with torch.no_grad():
        ready = attn.ready(kv)
        assert isinstance(ready, DenseReady) and not ready.tiled
        for want, got in zip(attn(m_c, kv), attn(m_c, ready)):
            if want is not None:
                torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("refs", [1, 2])
def test_dense_attention_by_tiles_drops_only_keys_without_weight(refs):
    """Where the learned locality leaves no weight beyond a radius (bias below -FAR_LOGIT), a dense
    scale is attended by tiles within it when coding: the same features and attended positions."""
    torch.manual_seed(0)
    attn = _perturbed(CrossAttention(16, 8, None, locality=4.0, extra_tokens=2), 4)
    with torch.no_grad():
        attn.log_locality.copy_(torch.tensor([math.log(4.0), math.log(5.0)]))
    kv = bank([attn.prepare(torch.randn(1, 16, 16, 24), torch.randn(1, 16, 16, 24)) for _ in range(refs)])
    m_c = torch.randn(1, 16, 16, 24)
    with torch.no_grad():
        ready = attn.ready(kv)
        assert isinstance(ready, DenseReady) and ready.tiled
        (want, _, want_flow), (got, _, got_flow) = attn(m_c, kv), attn(m_c, ready)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(got_flow, want_flow, atol=1e-5, rtol=0)


@pytest.mark.parametrize("pixel_flow", [False, True])
@pytest.mark.parametrize("refs", [1, 2])
@pytest.mark.parametrize("window", [3, 7])
def test_tiled_window_attention_matches_the_offset_loop(pixel_flow, refs, window):
    """By tiles of queries (the coding path) or by a loop over window offsets (training), the same
    attention: features, shared pixels (warped or blended), extra tokens, a coarse flow guide, and
    windows that run off the map at its edges."""
    torch.manual_seed(0)
    attn = _perturbed(CrossAttention(16, 8, window, locality=0.5, extra_tokens=2, pixel_stride=2,
                                     pixel_flow=pixel_flow), 2)
    size = (16, 24)
    kv = bank([attn.prepare(torch.randn(1, 16, *size), torch.randn(1, 16, *size),
                            torch.nn.functional.pixel_unshuffle(torch.rand(1, 3, 32, 48), 2)) for _ in range(refs)])
    m_c, flow = torch.randn(1, 16, *size), torch.randn(1, 2, *size)
    with torch.no_grad():
        ready = attn.ready(kv)
        assert isinstance(ready, WindowReady)
        (want, want_px, _), (got, got_px, _) = attn(m_c, kv, flow), attn(m_c, ready, flow)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # warped pixels: the mean offset is a sum divided by a reference's mass, then a bilinear sample
    # position, so the sums' rounding order shows in it (seen: 1.3e-5)
    torch.testing.assert_close(got_px, want_px, atol=1e-4, rtol=0)


def test_windowed_self_attention_is_the_same_by_tiles():
    torch.manual_seed(0)
    block = _perturbed(TransformerBlock(16, 8, window=7, ff_mult=1), 3)
    x = torch.randn(1, 16, 16, 8)
    with torch.no_grad():
        tiled = block(x)
    torch.testing.assert_close(tiled, block(x), atol=1e-5, rtol=0)  # with gradients: the offset loop


def test_attention_chunks_do_not_change_the_result(monkeypatch):
    torch.manual_seed(0)
    q, k_t, v = torch.randn(6, 40, 4), torch.randn(6, 4, 30), torch.randn(6, 30, 5)
    bias = torch.randn(6, 40, 30)
    whole = window_tiles.attend(q, k_t, v, bias, 0.5)
    torch.testing.assert_close(whole, torch.softmax(0.5 * q @ k_t + bias, -1) @ v, atol=1e-6, rtol=0)
    for chunk in (30 * 40 * 2, 30 * 7):  # by batches, then by queries
        monkeypatch.setattr(window_tiles, "CHUNK", chunk)
        torch.testing.assert_close(window_tiles.attend(q, k_t, v, bias, 0.5), whole, atol=1e-6, rtol=0)


def test_soft_keypoints_find_a_peak():
    from codec.nn.token_encoder import SoftKeypoints

    kp = SoftKeypoints(4, 2)
    with torch.no_grad():
        kp.heatmaps.weight.zero_()
        kp.heatmaps.bias.zero_()
        kp.heatmaps.weight[0, 0, 1, 1] = 50.0  # heatmap 0 = 50 * channel 0; heatmap 1 flat
    h = torch.zeros(1, 4, 8, 8)
    h[0, 0, 2, 5] = 1.0
    where = kp(h)
    # pixel (2, 5) of an 8x8 grid has its centre at ((2.5 / 8) * 2 - 1, (5.5 / 8) * 2 - 1)
    assert torch.allclose(where[0, 0], torch.tensor([-0.375, 0.375]), atol=1e-3)
    assert torch.allclose(where[0, 1], torch.zeros(2), atol=1e-6)  # a flat heatmap points at the centre


def test_token_translation_shifts_the_fourier_plane():
    from codec.nn.token_decoder import AffineFourierFeatures

    plane = AffineFourierFeatures(style_dim=4, channels=16)
    w = torch.zeros(1, 4)
    still = plane(w, (6, 6))
    with torch.no_grad():
        plane.to_affine.bias[4] = 2 / 6  # one grid cell down, in [-1, 1] units
    moved = plane(w, (6, 6))
    assert torch.allclose(moved[..., :-1, :], still[..., 1:, :], atol=1e-5)
    assert not torch.allclose(moved, still, atol=1e-2)
