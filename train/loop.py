"""The training loop: ``train(cfg)``, read top to bottom.

Stages: reconstruction first (rate weights at zero, quantization noise on), then the rate weights
ramp in, then optionally a sharpening stage (``gan_weight > 0``) where a multi-scale patch
discriminator with hinge loss judges the frame (`train/discriminator.py`). Two optimizers as
CompressAI prescribes: AdamW for the network, Adam for the entropy bottlenecks' quantiles (their
auxiliary loss), plus Adam for the discriminator. A checkpoint holds everything needed for an exact
resume: model, optimizers, scheduler, step, every replica's data sampler and noise RNG, and the
discriminator when there is one.

Under torchrun the network trains with DistributedDataParallel (each replica draws its own share
of the batch); the entropy bottlenecks' quantiles, which only the auxiliary loss trains, are kept
out of DDP and averaged by hand, and so are the discriminator's gradients. Metrics go to CSV and
TensorBoard (``tb/`` in the run folder).
"""

from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from compressai.entropy_models import EntropyBottleneck
from PIL import Image
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from codec.nn.config import get_config
from codec.nn.keyframe_codec import KEYFRAME_STEPS
from codec.nn.model import IMFCodec, build_model
from codec.nn.weights import load_weights, save_weights
from entropy.coding import bits
from train.config import TrainConfig
from train.data import (Av1RefCache, Av1TripletSampler, ClipCache, Split, TripletSampler, av1_validation_triplets,
                        near_validation_triplets, validation_triplets)
from train.discriminator import MultiScaleDiscriminator, hinge_d_loss, hinge_g_loss
from train.distributed import (World, all_average, assert_replicas_equal, broadcast_from_main, close_world, gather,
                               init_world)
from train.losses import msssim, psnr, rd_loss

SINGLE = World(0, 1, torch.device("cpu"))
AV1_VAL_DISTANCES = (1, 4, 12, 25)  # frames after the newest AV1 reference, in the AV1 validation


@dataclass
class TrainState:
    model: IMFCodec
    optimizer: torch.optim.Optimizer
    aux_optimizer: torch.optim.Optimizer | None  # None where every entropy bottleneck is frozen
    scheduler: torch.optim.lr_scheduler.LambdaLR
    step: int = 0
    world: World = SINGLE
    net: nn.Module | None = None  # what the forward pass calls: the model, or its DDP wrapper
    disc: MultiScaleDiscriminator | None = None  # the sharpening stage's discriminator, if any
    d_optimizer: torch.optim.Optimizer | None = None
    teacher: IMFCodec | None = None  # distillation's teacher, frozen, in eval mode

    def __post_init__(self) -> None:
        if self.net is None:
            self.net = self.model


@dataclass
class StepMetrics:
    step: int
    lr: float
    loss: float
    psnr: float
    msssim: float
    key_psnr: float
    bpp_token: float
    bpp_key: float
    aux: float
    gan_g: float  # the frame's adversarial loss (0 without a discriminator)
    gan_d: float  # the discriminator's hinge loss
    distill: float  # L1 between the frame and the teacher's (0 without a teacher)
    seconds: float


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(network parameters, entropy-bottleneck quantiles), chosen by module type; frozen ones left out."""
    aux = [m.quantiles for m in model.modules() if isinstance(m, EntropyBottleneck)]
    aux_ids = {id(p) for p in aux}
    return ([p for p in model.parameters() if id(p) not in aux_ids and p.requires_grad],
            [p for p in aux if p.requires_grad])


def freeze(model: nn.Module, prefixes: str) -> None:
    """Stop training the parameters whose names start with one of the comma-separated ``prefixes``.
    A prefix that names nothing is an error, not a silent no-op."""
    wanted = tuple(p.strip() for p in prefixes.split(",") if p.strip())
    names = [n for n, _ in model.named_parameters()]
    for prefix in wanted:
        if not any(n.startswith(prefix) for n in names):
            raise ValueError(f"freeze: no parameter starts with {prefix!r}")
    for n, p in model.named_parameters():
        if wanted and n.startswith(wanted):
            p.requires_grad_(False)


def build_state(cfg: TrainConfig, world: World = SINGLE) -> TrainState:
    model = load_weights(Path(cfg.init).expanduser(), strict=False) if cfg.init else build_model(get_config(cfg.model))
    model.to(world.device).train()
    freeze(model, cfg.freeze)
    params, aux = split_parameters(model)
    net = model
    if world.size > 1:  # DDP broadcasts rank 0's parameters, so replicas start equal
        ignored = {id(p) for p in aux}
        if cfg.av1_refs:  # no keyframe is coded: DDP must not wait for gradients that never come
            ignored |= {id(p) for m in (model.keyframe_codec, model.token_prior) for p in m.parameters()}
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            model, [n for n, p in model.named_parameters() if id(p) in ignored])
        net = DistributedDataParallel(model, device_ids=[world.device] if world.device.type == "cuda" else None,
                                      broadcast_buffers=False)
        broadcast_from_main([p.data for p in model.parameters() if id(p) in ignored], world)  # DDP skipped them
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    aux_optimizer = torch.optim.Adam(aux, lr=cfg.aux_lr) if aux else None

    def lr_lambda(step: int) -> float:  # linear warmup, cosine decay to 10%
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    disc = d_optimizer = None
    if cfg.gan_weight > 0:
        disc = MultiScaleDiscriminator().to(world.device).train()
        broadcast_from_main(list(disc.state_dict().values()), world)  # weights and power-iteration vectors
        d_optimizer = torch.optim.Adam(disc.parameters(), lr=cfg.d_lr, betas=(0.5, 0.999))
    teacher = None
    if cfg.teacher:
        teacher = load_weights(Path(cfg.teacher).expanduser()).to(world.device).requires_grad_(False)
    return TrainState(model, optimizer, aux_optimizer, scheduler, world=world, net=net, disc=disc,
                      d_optimizer=d_optimizer, teacher=teacher)


def ramp(start: int, length: int, step: int) -> float:
    """0 before ``start``, then linear to 1 over ``length`` steps."""
    return min(1.0, max(0.0, (step - start) / max(1, length)))


def key_steps(step_max: float, batch: int) -> Tensor | None:
    """Each sample's keyframe quantization step, uniform over KEYFRAME_STEPS up to step_max (None:
    all at the unit step), so the model learns every rate the encoder may pick."""
    steps = torch.tensor([s for s in KEYFRAME_STEPS if s <= step_max])
    return steps[torch.randint(len(steps), (batch,))] if len(steps) > 1 else None


def train_step(state: TrainState, batch: Tensor, cfg: TrainConfig) -> StepMetrics:
    """One update on ``batch``: (reference, previous, current) frames (3, B, 3, R, R), or with
    ``cfg.av1_refs`` `Av1TripletSampler`'s (4, B, 3, R, R), whose references are AV1-decoded
    pictures: a bank of two, no keyframe coded by the model."""
    t0 = time.perf_counter()
    x_ref, x_prev, x_cur = batch[:3]
    model = state.model
    w_key = ramp(cfg.rate_start, cfg.rate_ramp, state.step)
    w_token = ramp(cfg.token_rate_start, cfg.rate_ramp, state.step)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=state.world.device.type == "cuda"):
        if cfg.av1_refs:
            key_step = None
            inputs = dict(x_ref=None, x_prev=x_prev, x_cur=x_cur, decoded_refs=[batch[3], x_ref])  # oldest first
        else:
            key_step = key_steps(cfg.key_step_max, x_ref.shape[0])
            inputs = dict(x_ref=x_ref, x_prev=x_prev, x_cur=x_cur, key_step=key_step)
        out = state.net(**inputs)
        if state.teacher is not None:
            with torch.no_grad():
                target = state.teacher(**inputs).x_hat
    terms = rd_loss(out, x_cur, x_ref, w_token * cfg.lmbda_token, w_key * cfg.lmbda_key, w_key * cfg.msssim_weight,
                    key_step, cfg.hold_softmin if cfg.av1_refs else 0.0)
    loss, gan_g, distill = terms.loss, torch.zeros(()), torch.zeros(())
    if state.teacher is not None:
        distill = (out.x_hat - target).abs().mean()
        loss = loss + cfg.distill_weight * distill
    if state.disc is not None and state.step >= cfg.gan_start:
        state.disc.requires_grad_(False)  # the frame's adversarial gradient must not train the discriminator
        gan_g = hinge_g_loss(state.disc(out.x_hat))
        state.disc.requires_grad_(True)
        loss = loss + cfg.gan_weight * gan_g
    if not torch.isfinite(loss):  # stop here: one step of inf gradients turns every weight into NaN
        raise FloatingPointError(f"non-finite loss at step {state.step + 1}: {terms}, adversarial {gan_g.item()}")
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(state.optimizer.param_groups[0]["params"], cfg.grad_clip)
    state.optimizer.step()
    state.scheduler.step()
    aux = model.aux_loss()
    if state.aux_optimizer is not None:
        state.aux_optimizer.zero_grad(set_to_none=True)
        aux.backward()
        all_average([p.grad for p in state.aux_optimizer.param_groups[0]["params"]], state.world)
        state.aux_optimizer.step()
    gan_d = discriminator_step(state, x_cur, out.x_hat.detach()) if state.disc is not None else 0.0
    state.step += 1
    return StepMetrics(state.step, state.scheduler.get_last_lr()[0], loss.item(), terms.psnr, terms.msssim,
                       terms.key_psnr, terms.bpp_token, terms.bpp_key, aux.item(), gan_g.item(), gan_d,
                       distill.item(), time.perf_counter() - t0)


def discriminator_step(state: TrainState, real: Tensor, fake: Tensor) -> float:
    """One hinge-loss update of the discriminator on this batch's frames and their reconstructions."""
    d_loss = hinge_d_loss(state.disc(real), state.disc(fake))
    state.d_optimizer.zero_grad(set_to_none=True)
    d_loss.backward()
    all_average([p.grad for p in state.disc.parameters()], state.world)
    state.d_optimizer.step()
    return d_loss.item()


@torch.no_grad()
def validate(model: IMFCodec, triplets: Tensor, grid_path: Path | None = None, batch: int = 8) -> dict[str, float]:
    """PSNR, MS-SSIM (frame and keyframe) and bpp with real rounding, on fixed held-out triplets."""
    model.eval()
    rows = []
    first = None
    pixels = triplets.shape[-1] * triplets.shape[-2]
    for i in range(0, triplets.shape[1], batch):
        x_ref, x_prev, x_cur = triplets[:, i:i + batch]
        out = model(x_ref, x_prev, x_cur)
        token_bits = bits(out.token_likelihoods)
        key_bits = bits(out.keyframe_likelihoods) + bits(out.ref_token_likelihoods)
        rows.append(torch.stack([psnr(out.x_hat, x_cur), msssim(out.x_hat, x_cur), psnr(out.x_ref_hat, x_ref),
                                 psnr(x_ref, x_cur), token_bits / pixels, key_bits / pixels], 1))
        if first is None:
            first = (x_ref, x_cur, out.x_hat, out.x_ref_hat)
    model.train()
    m = torch.cat(rows).mean(0).tolist()
    if grid_path is not None:
        save_grid(first, grid_path)
    return dict(psnr=m[0], msssim=m[1], key_psnr=m[2], copy_ref_psnr=m[3], bpp_token=m[4], bpp_key=m[5])


@torch.no_grad()
def validate_av1(model: IMFCodec, samples: Tensor, distances: tuple[int, ...] = AV1_VAL_DISTANCES,
                 grid_path: Path | None = None, batch: int = 8) -> dict[str, float]:
    """The AV1-reference regime on `av1_validation_triplets` (4, clips * len(distances), 3, R, R):
    PSNR and MS-SSIM of the synthesis at each distance after the newest AV1 reference (bank of the
    two newest, real rounding), and of holding that reference instead (showing the AV1 picture),
    which the synthesis has to beat to be worth its token."""
    model.eval()
    rows = []
    for i in range(0, samples.shape[1], batch):
        x_ref, x_prev, x_cur, x_older = samples[:, i:i + batch]
        out = model(None, x_prev, x_cur, decoded_refs=[x_older, x_ref])
        rows.append(torch.stack([psnr(out.x_hat, x_cur), msssim(out.x_hat, x_cur), psnr(x_ref, x_cur),
                                 msssim(x_ref, x_cur)], 1))
        if i == 0 and grid_path is not None:
            save_grid((x_ref, x_cur, out.x_hat, x_older), grid_path, rows=len(distances))
    model.train()
    m = torch.cat(rows).unflatten(0, (-1, len(distances)))  # (clips, distances, 4)
    v = dict(zip(("av1_psnr", "av1_msssim", "av1_hold_psnr", "av1_hold_msssim"), m.mean((0, 1)).tolist()))
    for d, per in zip(distances, m.mean(0).tolist()):
        v |= {f"av1_d{d}_psnr": per[0], f"av1_d{d}_msssim": per[1], f"av1_d{d}_hold_psnr": per[2],
              f"av1_d{d}_hold_msssim": per[3]}
    return v


def save_grid(images: tuple[Tensor, ...], path: Path, rows: int = 4) -> None:
    """Columns: reference, target, reconstruction, decoded keyframe (AV1 validation: the older
    reference); one row per sample."""
    cols = [t[:rows] for t in images]
    grid = torch.cat([torch.cat(list(c), 1) for c in cols], 2)  # (3, rows*H, cols*W)
    Image.fromarray(grid.clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).numpy()).save(path)


def save_checkpoint(state: TrainState, sampler: TripletSampler, cfg: TrainConfig) -> None:
    """Every replica calls this (RNG states are gathered); the main one writes."""
    samplers, rngs = gather(sampler.state(), state.world), gather(torch.get_rng_state(), state.world)
    if not state.world.is_main:
        return
    path = cfg.out_dir / "checkpoint.pt"
    torch.save({
        "model": state.model.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "aux_optimizer": state.aux_optimizer.state_dict() if state.aux_optimizer is not None else {},
        "scheduler": state.scheduler.state_dict(),
        **({"discriminator": state.disc.state_dict(), "d_optimizer": state.d_optimizer.state_dict()}
           if state.disc is not None else {}),
        "step": state.step,
        "sampler": samplers,  # one per replica, in rank order
        "torch_rng": rngs,
        "config": asdict(cfg),
        "model_config": asdict(state.model.cfg),  # the preset's, or that of the --init weights
    }, path.with_suffix(".tmp"))
    path.with_suffix(".tmp").replace(path)


def load_checkpoint(state: TrainState, sampler: TripletSampler, path: Path) -> None:
    ckpt = torch.load(path, weights_only=True, map_location=state.world.device)
    state.model.load_state_dict(ckpt["model"])
    state.optimizer.load_state_dict(ckpt["optimizer"])
    if state.aux_optimizer is not None:
        state.aux_optimizer.load_state_dict(ckpt["aux_optimizer"])
    state.scheduler.load_state_dict(ckpt["scheduler"])
    if state.disc is not None and "discriminator" in ckpt:  # else the sharpening stage starts here: a fresh one
        state.disc.load_state_dict(ckpt["discriminator"])
        state.d_optimizer.load_state_dict(ckpt["d_optimizer"])
    state.step = ckpt["step"]
    # checkpoints before data-parallel training held one state, not a list
    samplers = ckpt["sampler"] if isinstance(ckpt["sampler"], list) else [ckpt["sampler"]]
    rngs = ckpt["torch_rng"] if isinstance(ckpt["torch_rng"], list) else [ckpt["torch_rng"]]
    if len(samplers) == state.world.size:  # same world: continue each replica's streams exactly
        sampler.load_state(samplers[state.world.rank])
        torch.set_rng_state(rngs[state.world.rank].cpu())


def _append_csv(path: Path, row: dict) -> None:
    """Append under the file's own header: a run resumed by newer code with more metrics keeps its
    columns aligned (the new ones go to TensorBoard only)."""
    new = not path.exists()
    if new:
        fields = list(row)
    else:
        with path.open(newline="") as f:
            fields = next(csv.reader(f))
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow(row)


def train(cfg: TrainConfig) -> TrainState:
    world = init_world()
    try:
        return _train(cfg, world)
    finally:
        close_world(world)


def _train(cfg: TrainConfig, world: World) -> TrainState:
    if cfg.batch_size % world.size:
        raise ValueError(f"batch size {cfg.batch_size} does not split over {world.size} processes")
    if cfg.max_minutes > 0 and world.size > 1:  # each replica's clock would stop it at another step
        raise ValueError("max_minutes is for single-process runs")
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed + world.rank)
    out = cfg.out_dir
    main = world.is_main
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(asdict(cfg), indent=1))

    split = Split.load(Path(cfg.split))
    train_cache = ClipCache(cfg.data_dir, split.train)
    if cfg.av1_refs:
        sampler = Av1TripletSampler(train_cache, Av1RefCache(cfg.av1_refs_dir, split.train), cfg.resolution,
                                    cfg.batch_size // world.size, cfg.seed + world.rank, cfg.camera_motion,
                                    cfg.av1_distance, cfg.av1_near_power)
    else:
        sampler = TripletSampler(train_cache, cfg.resolution, cfg.batch_size // world.size, cfg.seed + world.rank,
                                 cfg.camera_motion, cfg.near_share, cfg.near_distance)
    val_cache = ClipCache(cfg.data_dir, split.val)
    val_triplets = validation_triplets(val_cache, cfg.resolution).to(world.device)
    near_triplets = near_validation_triplets(val_cache, cfg.resolution).to(world.device)
    av1_val = None
    if cfg.av1_refs and main:
        val_refs = Av1RefCache(cfg.av1_refs_dir, split.val)
        crf = cfg.av1_val_crf or val_refs.crfs[len(val_refs.crfs) // 2]
        av1_val = av1_validation_triplets(val_cache, val_refs, cfg.resolution, crf, AV1_VAL_DISTANCES).to(world.device)

    state = build_state(cfg, world)
    if (out / "checkpoint.pt").exists():
        load_checkpoint(state, sampler, out / "checkpoint.pt")
        if main:
            print(f"resumed from {out / 'checkpoint.pt'} at step {state.step}")

    tb = SummaryWriter(out / "tb", purge_step=state.step) if main else None
    bar = tqdm(total=cfg.steps, initial=state.step, desc="train", unit="step", dynamic_ncols=True, disable=not main)
    deadline = time.monotonic() + 60 * cfg.max_minutes if cfg.max_minutes > 0 else math.inf
    while state.step < cfg.steps:
        m = train_step(state, sampler.sample().to(world.device), cfg)
        last = m.step == cfg.steps or time.monotonic() >= deadline  # a time budget ends like the last step
        bar.update(1)
        bar.set_postfix(loss=f"{m.loss:.4f}", psnr=f"{m.psnr:.2f}", bpp=f"{m.bpp_token + m.bpp_key:.4f}")
        if main and m.step % cfg.log_every == 0:
            _append_csv(out / "train.csv", asdict(m))
            for k, x in asdict(m).items():
                if k != "step":
                    tb.add_scalar(f"train/{k}", x, m.step)
        if main and (m.step % cfg.val_every == 0 or last):
            v = validate(state.model, val_triplets, out / f"val_{m.step:06d}.png")
            near = validate(state.model, near_triplets)
            v |= {"near_psnr": near["psnr"], "near_msssim": near["msssim"]}
            if av1_val is not None:
                v |= validate_av1(state.model, av1_val, grid_path=out / f"val_av1_{m.step:06d}.png")
            _append_csv(out / "val.csv", {"step": m.step, **v})
            for k, x in v.items():
                tb.add_scalar(f"val/{k}", x, m.step)
            tb.add_image("val/ref_target_recon_key", np.asarray(Image.open(out / f"val_{m.step:06d}.png")), m.step,
                         dataformats="HWC")
            bar.write(f"step {m.step}: val " + " ".join(f"{k}={x:.4f}" for k, x in v.items()))
        if m.step % cfg.ckpt_every == 0 or last:
            assert_replicas_equal(state.model, world)
            if state.disc is not None:
                assert_replicas_equal(state.disc, world)
            save_checkpoint(state, sampler, cfg)
        if last:
            break
    bar.close()
    if main:
        tb.close()
        export = build_model(state.model.cfg)
        export.load_state_dict(state.model.state_dict())
        save_weights(export, out / "weights.safetensors")
        print(f"weights: {out / 'weights.safetensors'}")
    return state
