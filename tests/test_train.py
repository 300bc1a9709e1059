import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from codec.nn.model import build_model
from codec.nn.weights import load_weights, save_weights
from train.config import PRESETS, parse_config
from train.data import ClipCache, Split, TripletSampler, camera_motion, make_split
from train.discriminator import MultiScaleDiscriminator, hinge_d_loss, hinge_g_loss
from train.loop import _append_csv, build_state, load_checkpoint, save_checkpoint, train, train_step

from .conftest import moving_square_clip


@pytest.fixture
def cache_dir(tmp_path) -> Path:
    root = tmp_path / "cache"
    root.mkdir()
    names = [f"clip{i}" for i in range(6)]
    for i, n in enumerate(names):
        np.save(root / f"{n}.npy", moving_square_clip(10 + i, 96, seed=i))
    make_split(names, every=3, offset=1).save(root / "split.json")
    return root


def tiny_cfg(cache_dir: Path, tmp_path: Path, **kw):
    return replace(PRESETS["tiny"], data=str(cache_dir), split=str(cache_dir / "split.json"),
                   out=str(tmp_path / "run"), **kw)


def test_split_is_by_clip_and_loader_stays_inside(cache_dir):
    split = Split.load(cache_dir / "split.json")
    assert set(split.train).isdisjoint(split.val) and split.val
    # make each training clip's frames carry its clip index, then check every triplet
    marked = cache_dir.parent / "marked"
    marked.mkdir()
    for i, n in enumerate(split.train):
        np.save(marked / f"{n}.npy", np.full((8 + i, 32, 32, 3), 10 * (i + 1), np.uint8))
    sampler = TripletSampler(ClipCache(marked, split.train), 32, 4, seed=0)
    assert sampler.cache.names == split.train
    for _ in range(20):
        batch = sampler.sample()  # (3, B, 3, R, R)
        for b in range(batch.shape[1]):
            # each clip has its own flat colour: a triplet's three frames come from one clip
            assert torch.allclose(batch[0, b], batch[1, b]) and torch.allclose(batch[0, b], batch[2, b])
    # validation clips are not in the training cache at all
    with pytest.raises(FileNotFoundError, match="prepare-data"):
        ClipCache(marked, split.val)


def test_near_share_keeps_current_frames_close_to_their_reference(cache_dir):
    cache = ClipCache(cache_dir, Split.load(cache_dir / "split.json").train)
    near = TripletSampler(cache, 32, 4, seed=0, near_share=1.0, near_distance=3)
    picks = [near.pick(40) for _ in range(200)]
    assert all(1 <= cur - ref <= 3 and 0 <= ref and cur < 40 for ref, cur in picks)
    assert {cur - ref for ref, cur in picks} == {1, 2, 3}
    # half near, half anywhere in the clip
    mixed = TripletSampler(cache, 32, 4, seed=0, near_share=0.5, near_distance=3)
    far = sum(abs(cur - ref) > 3 for ref, cur in (mixed.pick(40) for _ in range(400)))
    assert 100 < far < 200
    # off: the sampler draws exactly what it drew before the option existed
    plain, rng = TripletSampler(cache, 32, 4, seed=0), np.random.default_rng(0)
    assert [plain.pick(40) for _ in range(5)] == [tuple(int(i) for i in rng.integers(0, 40, size=2)) for _ in range(5)]


def test_camera_motion_moves_previous_and_current_together(cache_dir):
    clip = torch.from_numpy(moving_square_clip(3, 64, seed=0)).permute(0, 3, 1, 2).float() / 255
    moved = camera_motion(clip, np.random.default_rng(1))
    assert torch.equal(moved[0], clip[0])  # the reference stays
    assert not torch.allclose(moved[2], clip[2], atol=0.05)  # the current frame moved
    # previous and current share one transform: a frame moved alone equals its moved copy
    alone = camera_motion(torch.stack([clip[0], clip[2], clip[2]]), np.random.default_rng(1))
    assert torch.allclose(alone[1], moved[2], atol=1e-6)
    # off by default, and then the sampler's random stream is the one it always was
    split = Split.load(cache_dir / "split.json")
    plain = TripletSampler(ClipCache(cache_dir, split.train), 32, 4, seed=0).sample()
    off = TripletSampler(ClipCache(cache_dir, split.train), 32, 4, seed=0, camera_motion=0.0).sample()
    on = TripletSampler(ClipCache(cache_dir, split.train), 32, 4, seed=0, camera_motion=1.0).sample()
    assert torch.equal(plain, off)
    # the first triplet is drawn before the motion's draws: same reference, moved current frame
    assert torch.equal(on[0, 0], plain[0, 0]) and not torch.equal(on[2, 0], plain[2, 0])


def test_training_reduces_loss_on_a_fixed_batch(cache_dir, tmp_path):
    cfg = tiny_cfg(cache_dir, tmp_path, rate_start=10**6, lr=2e-3, warmup=1, steps=30)
    state = build_state(cfg)
    split = Split.load(cache_dir / "split.json")
    batch = TripletSampler(ClipCache(cache_dir, split.train), 64, 4, seed=0).sample()
    losses = [train_step(state, batch, cfg).loss for _ in range(30)]
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])


@pytest.mark.parametrize("gan_weight", [0.0, 0.1])
def test_resume_gives_the_same_next_step(cache_dir, tmp_path, gan_weight):
    cfg = tiny_cfg(cache_dir, tmp_path, gan_weight=gan_weight)
    split = Split.load(cache_dir / "split.json")

    def fresh():
        torch.manual_seed(0)
        return build_state(cfg), TripletSampler(ClipCache(cache_dir, split.train), 64, 2, seed=0)

    state, sampler = fresh()
    for _ in range(2):
        train_step(state, sampler.sample(), cfg)
    cfg.out_dir.mkdir(parents=True)
    save_checkpoint(state, sampler, cfg)
    expected = train_step(state, sampler.sample(), cfg)

    resumed, resumed_sampler = fresh()
    load_checkpoint(resumed, resumed_sampler, cfg.out_dir / "checkpoint.pt")
    got = train_step(resumed, resumed_sampler.sample(), cfg)
    assert got.step == expected.step == 3
    assert (got.loss, got.gan_d) == (expected.loss, expected.gan_d)
    for a, b in zip(state.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)
    if gan_weight:
        for (n, a), (_, b) in zip(state.disc.state_dict().items(), resumed.disc.state_dict().items()):
            assert torch.equal(a, b), n


def test_sharpening_stage_trains_both_sides(cache_dir, tmp_path):
    """The discriminator learns from its hinge loss from step 0; the frame feels its adversarial loss
    only from gan_start, and that gradient reaches the networks but never the discriminator."""
    cfg = tiny_cfg(cache_dir, tmp_path, gan_weight=0.5, gan_start=1)
    state = build_state(cfg)
    assert build_state(tiny_cfg(cache_dir, tmp_path)).disc is None  # off by default
    split = Split.load(cache_dir / "split.json")
    batch = TripletSampler(ClipCache(cache_dir, split.train), 64, 2, seed=0).sample()
    before = {n: t.clone() for n, t in state.disc.state_dict().items()}
    first = train_step(state, batch, cfg)
    assert first.gan_g == 0 and first.gan_d > 0
    changed = [n for n, t in state.disc.state_dict().items() if not torch.equal(t, before[n])]
    assert any(n.endswith("original") for n in changed)

    second = train_step(state, batch, cfg)
    assert second.gan_g != 0 and np.isfinite(second.gan_d)
    # gradient of the adversarial term alone: into the codec, not into the discriminator
    state.disc.requires_grad_(False)
    x_ref, x_prev, x_cur = batch
    state.model.zero_grad(set_to_none=True)
    state.disc.zero_grad(set_to_none=True)
    hinge_g_loss(state.disc(state.model(x_ref, x_prev, x_cur).x_hat)).backward()
    state.disc.requires_grad_(True)
    reached = [n for n, p in state.model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert any(n.startswith("frame_decoder") for n in reached) and any(n.startswith("token_encoder") for n in reached)
    assert all(p.grad is None for p in state.disc.parameters())


def test_discriminator_scores_patches_at_three_scales():
    d = MultiScaleDiscriminator()
    maps = d(torch.rand(2, 3, 128, 96))
    assert [m.shape[:2] for m in maps] == [(2, 1)] * 3
    assert maps[0].shape[-2] > maps[1].shape[-2] > maps[2].shape[-2]  # finer scale, more patches
    real, fake = [torch.full((1, 1, 2, 2), 2.0)], [torch.full((1, 1, 2, 2), -2.0)]
    assert hinge_d_loss(real, fake).item() == 0  # both beyond the margin
    assert hinge_g_loss(fake).item() == 2.0


def test_train_end_to_end_and_export(cache_dir, tmp_path):
    cfg = tiny_cfg(cache_dir, tmp_path)
    state = train(cfg)
    out = cfg.out_dir
    assert (out / "train.csv").exists() and (out / "val.csv").exists() and list(out.glob("val_*.png"))
    assert list((out / "tb").glob("events.out.tfevents.*")), "no TensorBoard events"
    model = load_weights(out / "weights.safetensors")
    # the exported weights reproduce the (fp16-rounded) trained model's outputs
    reference = state.model
    with torch.no_grad():
        for p in reference.parameters():
            p.copy_(p.half().float())
    reference.to(memory_format=torch.channels_last).eval()  # as load_weights lays a model out
    x = [torch.rand(1, 3, 64, 64) for _ in range(3)]
    with torch.no_grad():
        assert torch.equal(model(*x).x_hat, reference(*x).x_hat)
    # constants survive the fp16 export (CompressAI's likelihood bound, 1e-9, is 0 in fp16)
    for (n, a), (_, b) in zip(model.state_dict().items(), build_model(model.cfg).state_dict().items()):
        if n.endswith("likelihood_lower_bound.bound") or n.endswith("pedestal"):
            assert torch.equal(a, b) and a.item() > 0, n
    # a second export of the loaded model is byte-identical in its tensors
    save_weights(model, tmp_path / "again.safetensors")
    again = load_weights(tmp_path / "again.safetensors")
    for (n, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), n



def test_export_keeps_the_model_of_the_init_weights(cache_dir, tmp_path, tiny_weights):
    """A run started from weights switched to pixel_warp="flow" trains a flow model, so its export
    (and a surgery on its checkpoint) must be one too, not its preset's with the same parameters.
    Checkpoints that predate the recorded model config take it from the init file."""
    from train.export import export_checkpoint
    from train.surgery import main as surgery

    init = tmp_path / "flow.safetensors"
    surgery([str(tiny_weights), str(init), "--pixel-warp", "flow"])
    cfg = tiny_cfg(cache_dir, tmp_path, init=str(init), steps=2, val_every=100)
    state = train(cfg)
    exported = load_weights(cfg.out_dir / "weights.safetensors")
    assert state.model.cfg.pixel_warp == exported.cfg.pixel_warp == "flow"
    ckpt = torch.load(cfg.out_dir / "checkpoint.pt", weights_only=True)
    del ckpt["model_config"]
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    torch.save(ckpt, legacy / "checkpoint.pt")
    export_checkpoint(legacy, tmp_path / "legacy.safetensors")
    assert load_weights(tmp_path / "legacy.safetensors").cfg == exported.cfg
    # so does a next stage's surgery on the run's checkpoint
    surgery([str(cfg.out_dir / "checkpoint.pt"), str(tmp_path / "next.safetensors")])
    assert load_weights(tmp_path / "next.safetensors").cfg == exported.cfg

def test_cli_overrides():
    cfg = parse_config(["tiny", "--steps", "7", "--lr", "0.01", "--out", "/tmp/x"])
    assert (cfg.steps, cfg.lr, cfg.out, cfg.model) == (7, 0.01, "/tmp/x", "tiny")


def test_data_parallel_under_torchrun_keeps_replicas_identical(cache_dir, tmp_path):
    """Two gloo processes train the tiny preset; the loop compares the replicas' parameters at every
    checkpoint and fails the run if they differ. Then the run resumes on two processes, with the
    patch discriminator switched on."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "train", "tiny",
           "--data", str(cache_dir), "--split", str(cache_dir / "split.json"), "--out", str(out), "--threads", "1"]
    done = subprocess.run(cmd + ["--steps", "4"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 4 and len(ckpt["sampler"]) == 2
    assert ckpt["sampler"][0] != ckpt["sampler"][1], "replicas must draw different samples"
    # resume into the sharpening stage: a fresh discriminator, broadcast and averaged across replicas
    done = subprocess.run(cmd + ["--steps", "6", "--gan-weight", "0.1"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert "resumed" in done.stdout and ckpt["step"] == 6 and "discriminator" in ckpt


def test_metrics_csv_keeps_its_columns_when_newer_code_adds_metrics(tmp_path):
    """A run resumed by code that logs more metrics appends under the file's own header."""
    path = tmp_path / "train.csv"
    _append_csv(path, {"step": 1, "loss": 0.5})
    _append_csv(path, {"step": 2, "loss": 0.4, "gan_g": 0.1})
    assert path.read_text().splitlines() == ["step,loss", "1,0.5", "2,0.4"]


def test_surgery_switches_pixel_warp_and_keeps_parameters(tiny_weights, tmp_path):
    from train.surgery import main as surgery

    out = tmp_path / "flow.safetensors"
    surgery([str(tiny_weights), str(out), "--pixel-warp", "flow"])
    before, after = load_weights(tiny_weights), load_weights(out)
    assert before.cfg.pixel_warp == "blend" and after.cfg.pixel_warp == "flow"
    a, b = before.state_dict(), after.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_surgery_adds_the_hold_mask_and_keeps_every_other_parameter(tiny_weights, tmp_path):
    from train.surgery import main as surgery

    out = tmp_path / "hold.safetensors"
    surgery([str(tiny_weights), str(out), "--hold-mask"])
    before, after = load_weights(tiny_weights), load_weights(out)
    assert not before.cfg.hold_mask and after.cfg.hold_mask
    a, b = before.state_dict(), after.state_dict()
    assert set(b) - set(a) == {"frame_decoder.to_mask.weight", "frame_decoder.to_mask.bias"}
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_surgery_narrows_channels_keeping_each_scales_first_channels(tiny_weights, tmp_path):
    from train.surgery import main as surgery

    out = tmp_path / "narrow.safetensors"
    surgery([str(tiny_weights), str(out), "--channels", "8,8,16,16", "--name", "tiny-narrow"])
    wide, narrow = load_weights(tiny_weights), load_weights(out)
    assert narrow.cfg.name == "tiny-narrow" and narrow.cfg.channels == (8, 8, 16, 16)
    assert narrow.cfg.token_channels == wide.cfg.token_channels
    w, n = wide.state_dict(), narrow.state_dict()
    assert all(torch.equal(w[k], n[k]) for k in n if k.startswith(("token_encoder", "token_prior", "keyframe_codec")))
    # the packed query/key/value keeps each projection's first channels, not the first rows
    qkv = w["alignment.blocks.3.0.qkv.weight"].unflatten(0, (3, 32))[:, :16, :16].flatten(0, 1)
    assert torch.equal(n["alignment.blocks.3.0.qkv.weight"], qkv)
    # D_F's merge at scale 1 concatenates scale 2's 32 channels and its own 16: cut part by part
    merge = w["frame_decoder.merge.1.weight"]
    assert torch.equal(n["frame_decoder.merge.1.weight"], torch.cat([merge[:8, :16], merge[:8, 32:40]], 1))
    merge = w["frame_decoder.merge.0.weight"]  # scale 2: 32 + 32 wide
    assert torch.equal(n["frame_decoder.merge.0.weight"], torch.cat([merge[:16, :16], merge[:16, 32:48]], 1))
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = narrow(None, x, x, decoded_refs=[x])
    assert out.x_hat.shape == x.shape and torch.isfinite(out.x_hat).all()


def test_narrowing_to_the_same_channels_changes_nothing(tiny_weights):
    from train.shrink import shrink

    wide = load_weights(tiny_weights)
    same = shrink(wide, wide.cfg.channels, wide.cfg.name)
    a, b = wide.state_dict(), same.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="narrow"):
        shrink(wide, (32, 16, 32, 32), "wider")


def test_distillation_trains_the_student_towards_the_teacher_with_frozen_modules(cache_dir, tmp_path, tiny_weights):
    frozen = "token_encoder,token_prior,token_delta_prior,token_log_step,keyframe_codec"
    cfg = tiny_cfg(cache_dir, tmp_path, teacher=str(tiny_weights), freeze=frozen, rate_start=10**6, lr=2e-3,
                   warmup=1, steps=20)
    torch.manual_seed(0)
    state = build_state(cfg)
    assert state.teacher is not None and not any(p.requires_grad for p in state.teacher.parameters())
    assert state.aux_optimizer is None  # every entropy bottleneck is frozen
    before = {n: p.clone() for n, p in state.model.named_parameters()}
    split = Split.load(cache_dir / "split.json")
    batch = TripletSampler(ClipCache(cache_dir, split.train), 64, 4, seed=0).sample()
    metrics = [train_step(state, batch, cfg) for _ in range(20)]
    assert all(m.distill > 0 for m in metrics)
    assert np.mean([m.distill for m in metrics[-3:]]) < np.mean([m.distill for m in metrics[:3]])
    moved = {n for n, p in state.model.named_parameters() if not torch.equal(p, before[n])}
    assert not any(n.startswith(tuple(frozen.split(","))) for n in moved)
    assert any(n.startswith("frame_decoder") for n in moved) and any(n.startswith("alignment") for n in moved)
    cfg.out_dir.mkdir(parents=True)
    save_checkpoint(state, TripletSampler(ClipCache(cache_dir, split.train), 64, 4, seed=0), cfg)
    with pytest.raises(ValueError, match="no parameter starts with 'token_encodr'"):
        build_state(replace(cfg, freeze="token_encodr"))
