import pytest
import torch

from codec.nn.config import PRESETS, get_config
from codec.nn.model import build_model
from evaluation.stats import model_stats


def frames(cfg, batch=1):
    r = cfg.resolution
    return [torch.rand(batch, 3, r, r) for _ in range(3)]


def total_loss(model, out):
    rate = sum(torch.log2(l).sum() for l in (out.token_likelihoods, out.ref_token_likelihoods, out.keyframe_likelihoods))
    return out.x_hat.mean() + out.x_ref_hat.mean() - 1e-4 * rate + model.aux_loss()


@pytest.mark.parametrize("preset, overrides", [(p, {}) for p in sorted(PRESETS)]
                         + [("tiny", {"pixel_warp": "flow"}), ("tiny", {"hold_mask": True})])
def test_forward_backward_reaches_every_parameter(preset, overrides):
    cfg = get_config(preset, **overrides)
    model = build_model(cfg)
    x = frames(cfg)
    out = model(*x)
    assert out.x_hat.shape == x[0].shape
    assert out.token_likelihoods.shape == (1, cfg.token_dim)
    # zero-initialised residual branches and output layer pass gradients on only after a few steps
    sgd = torch.optim.SGD(model.parameters(), lr=1e-2)
    for _ in range(3):
        sgd.zero_grad()
        total_loss(model, model(*x)).backward()
        sgd.step()
    model.zero_grad()
    total_loss(model, model(*x)).backward()
    dead = [n for n, p in model.named_parameters()  # the restoration trains on its own (train.restoration)
            if (p.grad is None or not p.grad.abs().sum() > 0) and not n.startswith("restoration.")]
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not dead, f"no gradient reaches {dead}"
    assert not bad, f"non-finite gradient in {bad}"


def test_keyframe_steps_train_the_keyframe_codec():
    """With per-sample keyframe steps, gradients reach the analysis transform and the density, and a
    coarser step means fewer estimated bits."""
    cfg = get_config("tiny")
    model = build_model(cfg)
    x = frames(cfg, batch=2)
    with torch.no_grad():
        model.keyframe_codec.g_a[-1].weight.mul_(20)
    out = model(*x, key_step=torch.tensor([1.0, 4.0]))
    bits = -torch.log2(out.keyframe_likelihoods).flatten(1).sum(1)
    assert bits[1] < bits[0]
    (bits.sum() + out.x_ref_hat.mean()).backward()
    codec = model.keyframe_codec
    assert codec.g_a[0].weight.grad.abs().sum() > 0 and codec.entropy_bottleneck.matrices[0].grad.abs().sum() > 0


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_output_range(preset):
    cfg = get_config(preset)
    model = build_model(cfg).eval()
    with torch.no_grad():
        out = model(*frames(cfg))
    for x in (out.x_hat, out.x_ref_hat):
        assert torch.isfinite(x).all() and x.min() >= 0 and x.max() <= 1


def tiny_reference(**overrides):
    cfg = get_config("tiny", **overrides)
    model = build_model(cfg).eval()
    x_ref, _, x_cur = frames(cfg)
    u_ref = model.token_symbols(x_ref).round()
    u_cur = model.token_symbols(x_cur).round()
    return model, x_ref, u_ref, u_cur


@torch.no_grad()
def test_cached_reference_matches_uncached():
    model, x_ref, u_ref, u_cur = tiny_reference()
    ref = model.reference(x_ref, u_ref)
    cached = [model.synthesize(u_cur + k, [ref]) for k in range(3)]
    uncached = [model.synthesize(u_cur + k, [model.reference(x_ref, u_ref)]) for k in range(3)]
    for a, b in zip(cached, uncached):
        assert torch.equal(a, b)


@pytest.mark.parametrize("pixel_warp", ["blend", "flow"])
def test_coding_path_matches_the_training_path(pixel_warp):
    """Without gradients synthesis runs on operands made ready once per bank (tiled windows); with
    them, on the training path. The same frames, and switching banks never reuses stale operands."""
    model, x_ref, u_ref, u_cur = tiny_reference(pixel_warp=pixel_warp)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
        a = model.reference(x_ref, u_ref)
        b = model.reference(torch.rand(x_ref.shape, generator=g), u_ref + 1)
    banks = [[a], [a, b], [b, a], [a, b], [a]]
    with torch.no_grad():
        coded = [model.synthesize(u_cur, bank) for bank in banks]
    for bank, x_hat in zip(banks, coded):
        torch.testing.assert_close(x_hat, model.synthesize(u_cur, bank).detach(), atol=1e-5, rtol=0)
    assert not torch.allclose(coded[0], coded[1], atol=1e-3)  # a second reference changes the frame
    with torch.no_grad():  # as an optimizer step between two validations would
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
        after = model.synthesize(u_cur, [a, b])
    torch.testing.assert_close(after, model.synthesize(u_cur, [a, b]).detach(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("pixel_warp", ["blend", "flow"])
@torch.no_grad()
def test_bank_of_identical_references_equals_one(pixel_warp):
    model, x_ref, u_ref, u_cur = tiny_reference(pixel_warp=pixel_warp)
    # make attention non-trivial: random values for the learned extra tokens (own generator, so
    # the draw does not depend on what ran before)
    g = torch.Generator().manual_seed(7)
    for p in model.parameters():
        p.add_(torch.randn(p.shape, generator=g) * 0.01)
    ref = model.reference(x_ref, u_ref)
    one = model.synthesize(u_cur, [ref])
    two = model.synthesize(u_cur, [ref, ref])
    # Duplicated keys give the same softmax average in exact arithmetic; in float32 the sums run
    # in another order (seen: 1.2e-5 on one machine). 1e-4 is 40x below one 8-bit level (3.9e-3),
    # so a bank that weighted its references wrongly would still fail by orders of magnitude.
    torch.testing.assert_close(one, two, atol=1e-4, rtol=0)


@torch.no_grad()
def test_hold_mask_shows_the_newest_reference_where_it_opens():
    """The mask blends toward the newest reference of the bank (its last), never an older one; a
    fresh mask starts almost closed (5% hold), so adding it to trained weights barely moves them."""
    torch.manual_seed(0)
    model, x_ref, u_ref, u_cur = tiny_reference(hold_mask=True)
    older = model.reference(torch.rand_like(x_ref), u_ref + 1)
    newest = model.reference(x_ref, u_ref)
    plain = build_model(model.cfg.__class__(**{**model.cfg.__dict__, "hold_mask": False})).eval()
    plain.load_state_dict(model.state_dict(), strict=False)
    without = plain.synthesize(u_cur, [older, newest])
    fresh = model.synthesize(u_cur, [older, newest])
    torch.testing.assert_close(fresh, 0.95 * without + 0.05 * x_ref, atol=2e-3, rtol=0)
    model.frame_decoder.to_mask.bias.fill_(10.0)  # fully open: the newest picture itself
    torch.testing.assert_close(model.synthesize(u_cur, [older, newest]), x_ref, atol=1e-6, rtol=0)


@torch.no_grad()
def test_bank_of_different_references_runs():
    model, x_ref, u_ref, u_cur = tiny_reference()
    other = model.reference(torch.rand_like(x_ref), u_ref + 1)
    x_hat = model.synthesize(u_cur, [model.reference(x_ref, u_ref), other])
    assert x_hat.shape == x_ref.shape and torch.isfinite(x_hat).all()


@torch.no_grad()
def test_eval_is_deterministic():
    cfg = get_config("tiny")
    model = build_model(cfg).eval()
    x = frames(cfg, batch=2)
    a, b = model(*x), model(*x)
    assert torch.equal(a.x_hat, b.x_hat) and torch.equal(a.token_likelihoods, b.token_likelihoods)


def test_non_square_frames():
    cfg = get_config("tiny")
    model = build_model(cfg).eval()
    x = [torch.rand(1, 3, 64, 96) for _ in range(3)]
    with torch.no_grad():
        assert model(*x).x_hat.shape == (1, 3, 64, 96)


def test_default_preset_within_budget():
    s = model_stats(build_model(get_config("default")))
    assert s.resolution == 256
    assert s.fp16_megabytes <= 20
    assert s.decode_gflops <= 5
    assert 0 < s.restoration_gflops <= 2.5  # once per inter reference: about one token frame's worth


def test_config_validation():
    with pytest.raises(ValueError):
        get_config("tiny", resolution=100)
    with pytest.raises(KeyError):
        get_config("no-such-preset")
    with pytest.raises(ValueError, match="pixel_warp"):
        get_config("tiny", pixel_warp="nearest")
