"""The AV1-reference regime: precomputed AV1-decoded references (train/av1_refs.py), their sampler
and validation (train/data.py, train/loop.py) and the model's forward with decoded references."""

import json
from dataclasses import replace
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from torch import Tensor

from codec.nn.config import get_config
from codec.nn.model import build_model
from entropy.coding import quantize_noise
from train.av1_refs import main as av1_refs_main
from train.config import PRESETS
from train.data import Av1RefCache, Av1TripletSampler, ClipCache, Split, av1_validation_triplets, make_split
from train.loop import build_state, train, train_step, validate_av1
from train.losses import psnr

from .conftest import moving_square_clip

EVERY = 4
CRFS = (50, 63)
needs_av1 = pytest.mark.skipif(not {"libsvtav1", "libdav1d"} <= av.codecs_available,
                               reason="PyAV has no SVT-AV1 encoder (libsvtav1) or libdav1d decoder")


def write_fake_refs(cache_dir: Path, out_dir: Path, every: int = EVERY, crfs: tuple[int, ...] = CRFS) -> None:
    """Reference files in `train.av1_refs`' layout without an AV1 encoder: the clip's own frames at
    0, K, 2K, ..., darkened by a CRF-dependent amount so that a test can tell them from the source."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in sorted(cache_dir.glob("*.npy")):
        clip = np.load(path)
        indices = list(range(0, len(clip), every))
        for crf in crfs:
            np.save(out_dir / f"{path.stem}_crf{crf}.npy", (clip[indices] // 2 + crf).astype(np.uint8))
            (out_dir / f"{path.stem}_crf{crf}.json").write_text(json.dumps(
                {"clip": path.stem, "crf": crf, "every": every, "indices": indices, "bytes": 0}))


@pytest.fixture
def cache_dir(tmp_path) -> Path:
    root = tmp_path / "cache"
    root.mkdir()
    names = [f"clip{i}" for i in range(6)]
    for i, n in enumerate(names):
        np.save(root / f"{n}.npy", moving_square_clip(10 + 3 * i, 64, seed=i))
    make_split(names, every=3, offset=1).save(root / "split.json")
    return root


@pytest.fixture
def refs_dir(cache_dir, tmp_path) -> Path:
    out = tmp_path / "av1refs"
    write_fake_refs(cache_dir, out)
    return out


def tiny_cfg(cache_dir: Path, refs_dir: Path, tmp_path: Path, **kw):
    return replace(PRESETS["tiny"], data=str(cache_dir), split=str(cache_dir / "split.json"), out=str(tmp_path / "run"),
                   av1_refs=str(refs_dir), rate_start=0, token_rate_start=0, **kw)


@needs_av1
def test_precompute_codes_every_kth_frame_as_one_stream(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    clip = moving_square_clip(11, 64)
    np.save(cache / "square.npy", clip)
    out = tmp_path / "refs"
    assert av1_refs_main([str(cache), str(out), "--every", "4", "--crf", "40", "63"]) == 0
    for crf in (40, 63):
        decoded = np.load(out / f"square_crf{crf}.npy")
        meta = json.loads((out / f"square_crf{crf}.json").read_text())
        assert decoded.shape == (3, 64, 64, 3) and decoded.dtype == np.uint8
        assert meta["indices"] == [0, 4, 8] and meta["every"] == 4 and meta["crf"] == crf and meta["bytes"] > 0
        # decoded pictures of the frames named, not of others
        mse = [[np.square(decoded[j].astype(float) - clip[i]).mean() for i in range(11)] for j in range(3)]
        assert [int(np.argmin(row)) for row in mse] == [0, 4, 8] or crf == 63
    assert json.loads((out / "square_crf63.json").read_text())["bytes"] < json.loads(
        (out / "square_crf40.json").read_text())["bytes"]
    # a second run keeps the files; another K in the same folder is refused
    stamp = (out / "square_crf40.npy").stat().st_mtime_ns
    assert av1_refs_main([str(cache), str(out), "--every", "4", "--crf", "40"]) == 0
    assert (out / "square_crf40.npy").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="every 4"):
        av1_refs_main([str(cache), str(out), "--every", "6", "--crf", "40"])
    with pytest.raises(ValueError, match="intra offset None"):  # fixed qindex offsets want their own folder
        av1_refs_main([str(cache), str(out), "--every", "4", "--crf", "63", "--intra-offset", "-32"])
    fixed = tmp_path / "fixed"
    assert av1_refs_main([str(cache), str(fixed), "--every", "4", "--crf", "63", "--intra-offset", "-32"]) == 0
    assert json.loads((fixed / "square_crf63.json").read_text())["intra_offset"] == -32


def test_sampler_draws_current_frames_after_the_newest_reference(cache_dir, refs_dir):
    split = Split.load(cache_dir / "split.json")
    cache = ClipCache(cache_dir, split.train)
    refs = Av1RefCache(refs_dir, split.train)
    assert refs.crfs == CRFS and refs.every == EVERY
    sampler = Av1TripletSampler(cache, refs, 32, 3, seed=0, camera_motion=0.5, max_distance=6)
    batch = sampler.sample()
    assert batch.shape == (4, 3, 3, 32, 32) and 0 <= batch.min() and batch.max() <= 1
    indices = np.arange(0, 40, EVERY)
    picks = [sampler.pick(indices, 40) for _ in range(300)]
    assert all(1 <= cur - indices[j] <= 6 and cur < 40 for j, cur in picks)
    assert {int(indices[j]) for j, _ in picks} == set(indices[indices + 1 < 40].tolist())
    # clip 0's last picture (frame 8 of 10) leaves one frame after it
    assert all(cur == 9 for j, cur in (sampler.pick(np.array([0, 4, 8]), 10) for _ in range(50)) if j == 2)


def test_sampler_near_power_draws_near_distances_more_often(cache_dir, refs_dir):
    """d ** -1 over 1..24: distance 1 has probability 1 / H(24) = 0.264, distance 24 0.011."""
    split = Split.load(cache_dir / "split.json")
    cache, refs = ClipCache(cache_dir, split.train), Av1RefCache(refs_dir, split.train)
    indices = np.array([0])
    near = Av1TripletSampler(cache, refs, 32, 1, seed=3, max_distance=24, near_power=1.0)
    flat = Av1TripletSampler(cache, refs, 32, 1, seed=3, max_distance=24)
    d_near = np.array([near.pick(indices, 100)[1] for _ in range(2000)])
    d_flat = np.array([flat.pick(indices, 100)[1] for _ in range(2000)])
    assert d_near.min() >= 1 and d_near.max() <= 24 and d_flat.max() <= 24
    assert 0.23 < (d_near == 1).mean() < 0.30 and 0.02 < (d_flat == 1).mean() < 0.07
    assert 5.5 < d_near.mean() < 7.5 and 11 < d_flat.mean() < 14  # 24 / H(24) = 6.36 and 12.5


def test_sampler_pairs_each_reference_with_the_picture_before_it(tmp_path):
    """Flat clips whose frame t has value 40 + 4t, and "decoded" pictures equal to their frames: the
    augmentation then only adds one brightness to all four frames, so the differences between them
    tell which frames they are: current = previous + 1 = newest reference + 1..max_distance, older
    reference = newest - K (or the newest itself, for the clip's first picture)."""
    flat, refs = tmp_path / "flat", tmp_path / "flat_refs"
    flat.mkdir()
    refs.mkdir()
    names = ("a", "b")
    for n in names:
        clip = (40 + 4 * np.arange(30, dtype=np.uint8))[:, None, None, None].repeat(16, 1).repeat(16, 2).repeat(3, 3)
        np.save(flat / f"{n}.npy", clip)
        np.save(refs / f"{n}_crf10.npy", clip[::EVERY])
        (refs / f"{n}_crf10.json").write_text(json.dumps(
            {"clip": n, "crf": 10, "every": EVERY, "indices": list(range(0, 30, EVERY)), "bytes": 0}))
    sampler = Av1TripletSampler(ClipCache(flat, names), Av1RefCache(refs, names), 16, 64, seed=1, max_distance=5)
    ref, prev, cur, older = (sampler.sample().mean((2, 3, 4)) * 255 / 4).round()  # (B,) each, in frames
    assert torch.all(cur - prev == 1)
    assert torch.all((cur - ref >= 1) & (cur - ref <= 5))
    assert set((ref - older).tolist()) == {0, EVERY}


def test_train_step_with_av1_references(cache_dir, refs_dir, tmp_path):
    cfg = tiny_cfg(cache_dir, refs_dir, tmp_path)
    state = build_state(cfg)
    split = Split.load(cache_dir / "split.json")
    sampler = Av1TripletSampler(ClipCache(cache_dir, split.train), Av1RefCache(refs_dir, split.train), 64, 2, seed=0)
    batch = sampler.sample()
    x_ref, x_prev, x_cur, x_older = batch
    out = state.model(None, x_prev, x_cur, decoded_refs=[x_older, x_ref])
    assert out.keyframe_likelihoods is None and out.ref_token_likelihoods is None and out.x_ref_hat is x_ref
    (out.x_hat - x_cur).abs().mean().backward()
    grads = {n: p.grad for n, p in state.model.named_parameters()}
    reached = [n for n, g in grads.items() if g is not None and g.abs().sum() > 0]
    assert any(n.startswith("token_encoder") for n in reached) and any(n.startswith("token_decoder") for n in reached)
    assert any(n.startswith("frame_decoder") for n in reached)
    # E_F is in the graph (a fresh model's zero-initialised paths give it zero gradients at first)
    assert all(g is not None for n, g in grads.items() if n.startswith("feature_encoder"))
    assert all(g is None for n, g in grads.items() if n.startswith("keyframe_codec"))  # skipped, not trained
    state.model.zero_grad(set_to_none=True)
    key_before = {n: p.clone() for n, p in state.model.keyframe_codec.named_parameters()}
    m = train_step(state, batch, cfg)
    assert np.isfinite(m.loss) and np.isfinite(m.psnr) and m.bpp_key == 0 and m.bpp_token > 0
    # only the entropy bottleneck's quantiles move (their own auxiliary loss): no weight decay either
    assert all(torch.equal(p, key_before[n]) for n, p in state.model.keyframe_codec.named_parameters()
               if not n.endswith("quantiles"))
    with pytest.raises(ValueError, match="not both"):
        state.model(x_ref, x_prev, x_cur, decoded_refs=[x_ref])


def test_default_forward_is_the_keyframe_path_it_always_was():
    """Without decoded_refs the forward is the learned-keyframe path, step for step (the same
    computation written out from the building blocks, same noise draws, bit-identical)."""
    torch.manual_seed(0)
    model = build_model(get_config("tiny"))
    x_ref, x_prev, x_cur = torch.rand(3, 2, 3, 64, 64)
    for training in (True, False):
        model.train(training)
        torch.manual_seed(5)
        out = model(x_ref, x_prev, x_cur)
        torch.manual_seed(5)
        key = model.keyframe_codec(x_ref, None)
        u_ref, u_prev, u_cur = model.token_symbols(torch.cat([x_ref, x_prev, x_cur])).chunk(3)
        u_ref_hat, ref_lik = model.token_prior(u_ref[..., None])
        u_prev_hat = quantize_noise(u_prev) if training else u_prev.round()
        delta_hat, lik = model.token_delta_prior((u_cur - u_prev_hat)[..., None])
        x_hat = model.synthesize(u_prev_hat + delta_hat[..., 0], [model.reference(key.x_hat, u_ref_hat[..., 0])])
        assert torch.equal(out.x_hat, x_hat) and torch.equal(out.x_ref_hat, key.x_hat)
        assert torch.equal(out.token_likelihoods, lik[..., 0]) and torch.equal(out.ref_token_likelihoods, ref_lik[..., 0])
        assert torch.equal(out.keyframe_likelihoods, key.likelihoods)


def test_decoded_references_in_eval_are_the_coding_paths_references():
    """In eval each decoded picture's reference is `reference_from_picture` (its rounded E_T token),
    and a bank of the same picture twice synthesizes what that one reference does."""
    torch.manual_seed(0)
    model = build_model(get_config("tiny")).eval()
    x_ref, x_old, x_prev, x_cur = torch.rand(4, 2, 3, 64, 64)
    with torch.no_grad():
        out = model(None, x_prev, x_cur, decoded_refs=[x_old, x_ref])
        u_hat = model.token_symbols(x_prev).round() + (model.token_symbols(x_cur) - model.token_symbols(x_prev).round()).round()
        bank = [model.reference_from_picture(x) for x in (x_old, x_ref)]
        assert torch.allclose(out.x_hat, model.synthesize(u_hat, bank), atol=1e-5)
        one = model(None, x_prev, x_cur, decoded_refs=[x_ref])
        twice = model(None, x_prev, x_cur, decoded_refs=[x_ref, x_ref])
        assert torch.allclose(one.x_hat, twice.x_hat, atol=1e-5)


def test_av1_validation_reports_synthesis_and_holding(cache_dir, refs_dir):
    split = Split.load(cache_dir / "split.json")
    cache = ClipCache(cache_dir, split.val)
    samples = av1_validation_triplets(cache, Av1RefCache(refs_dir, split.val), 64, 63, distances=(1, 4))
    assert samples.shape == (4, 2 * len(split.val), 3, 64, 64)
    torch.manual_seed(0)
    model = build_model(get_config("tiny"))
    v = validate_av1(model, samples, distances=(1, 4))
    assert model.training  # left as it was found
    hold = psnr(samples[0], samples[2])
    assert v["av1_hold_psnr"] == pytest.approx(hold.mean().item(), rel=1e-5)
    assert v["av1_d1_hold_psnr"] == pytest.approx(hold[0::2].mean().item(), rel=1e-5)
    assert all(np.isfinite(v[f"av1_d{d}_{k}"]) for d in (1, 4) for k in ("psnr", "msssim", "hold_psnr", "hold_msssim"))


def test_train_end_to_end_with_av1_references(cache_dir, refs_dir, tmp_path):
    cfg = tiny_cfg(cache_dir, refs_dir, tmp_path, steps=2, val_every=2)
    state = train(cfg)
    assert state.step == 2
    header = (cfg.out_dir / "val.csv").read_text().splitlines()[0].split(",")
    assert {"av1_d1_psnr", "av1_d25_hold_msssim", "near_psnr"} <= set(header)
    assert (cfg.out_dir / "val_av1_000002.png").exists()
    with pytest.raises(FileNotFoundError, match="av1_refs"):
        train(replace(cfg, av1_refs=str(tmp_path / "nowhere"), out=str(tmp_path / "run2")))


def test_data_parallel_with_av1_references(cache_dir, refs_dir, tmp_path):
    """Under torchrun the keyframe codec, unused here, must be kept out of DDP's gradient reduction."""
    import subprocess
    import sys

    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "train", "tiny",
           "--data", str(cache_dir), "--split", str(cache_dir / "split.json"), "--out", str(out), "--threads", "1",
           "--av1-refs", str(refs_dir), "--steps", "3", "--val-every", "100"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 3


def test_hold_softmin_trains_the_synthesis_only_where_it_can_beat_holding():
    """Two samples: in one the held reference is the frame itself (the encoder would hold it), in the
    other the reference is far off. The soft minimum leaves the first sample's synthesis nearly
    untouched and trains the second at full weight; the plain loss trains both alike."""
    from codec.nn.model import RDOutput
    from train.losses import rd_loss

    g = torch.Generator().manual_seed(0)
    x_cur = torch.rand(2, 3, 64, 64, generator=g)
    x_ref = torch.stack([x_cur[0], torch.rand(3, 64, 64, generator=g)])
    x_hat = (x_cur + 0.1 * torch.randn(2, 3, 64, 64, generator=g)).clamp(0, 1).requires_grad_()
    likelihoods = torch.full((2, 32), 0.5)

    def grads(t: float) -> Tensor:
        x_hat.grad = None
        out = RDOutput(x_hat, x_ref, likelihoods, None, None)
        rd_loss(out, x_cur, x_ref, 0.1, 0.0, 0.3, hold_softmin=t).loss.backward()
        return x_hat.grad.flatten(1).norm(dim=1)

    plain, soft = grads(0.0), grads(0.01)
    assert soft[0] < 1e-2 * plain[0]  # holding is exact there: the synthesis would never be shown
    assert torch.allclose(soft[1], plain[1], rtol=1e-3)  # holding is hopeless there: trained as before
