"""Attention over feature maps, global (all pairs) or in a local window, with a locality bias.

Axis letters used throughout: b batch, h heads, n query positions (y x), s key positions,
d channels per head of queries and keys, e channels per head of values.

The locality bias subtracts ``exp(log_locality[h]) * squared distance`` (in feature pixels) from the
logits. Initialised strong, it makes a fresh model's attention a near-identity warp of the reference,
which on CPU trains about 2.5x faster than plain attention (measured with a probe, see the issue
"The IMF model and the package it lives in"); training can then relax it per head.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from codec.nn.layers.mlp import Mlp
from torch import Tensor, nn

from codec.nn.layers import window_tiles
from codec.nn.layers.warp import resize_flow, warp


def sinusoidal_positions(height: int, width: int, num_freqs: int, device: torch.device) -> Tensor:
    """Fixed 2D sinusoidal embedding of normalised coordinates in [-1, 1] -> (y*x, 4*num_freqs)."""
    ys = torch.linspace(-1, 1, height, device=device)
    xs = torch.linspace(-1, 1, width, device=device)
    grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), -1).reshape(-1, 2, 1)  # (n, 2, 1)
    angles = grid * (2.0 ** torch.arange(num_freqs, device=device) * math.pi)  # (n, 2, f)
    return torch.cat([angles.sin(), angles.cos()], -1).flatten(1)


def _grid(height: int, width: int, device: torch.device) -> Tensor:
    ys, xs = torch.meshgrid(
        torch.arange(height, device=device, dtype=torch.float32),
        torch.arange(width, device=device, dtype=torch.float32),
        indexing="ij",
    )
    return torch.stack([ys, xs], -1).reshape(-1, 2)  # (n, 2)


@dataclass
class DenseKV:
    """Keys and values for all-pairs attention: k (b, h, s, d), v (b, h, s, e); dist2 (n, s) is the
    squared query-key distance; ``log_prior`` is added to every reference logit (-log R for a bank
    of R references, so a bank of identical references behaves exactly like one)."""

    k: Tensor
    v: Tensor
    dist2: Tensor
    pos: Tensor  # (s, 2) each key's (y, x) position
    size: tuple[int, int]  # (y, x) of one reference's map
    log_prior: float = 0.0

    @staticmethod
    def from_tokens(k: Tensor, v: Tensor, size: tuple[int, int]) -> "DenseKV":
        grid = _grid(*size, k.device)
        return DenseKV(k, v, torch.cdist(grid, grid).square(), grid, tuple(size))

    @staticmethod
    def bank(items: list["DenseKV"]) -> "DenseKV":
        if len(items) == 1:
            return items[0]
        return DenseKV(
            torch.cat([i.k for i in items], 2),
            torch.cat([i.v for i in items], 2),
            torch.cat([i.dist2 for i in items], 1),
            torch.cat([i.pos for i in items]),
            items[0].size,
            -math.log(len(items)),
        )


@dataclass
class WindowKV:
    """Keys and values for windowed attention, kept as zero-padded maps (no unfolded copies):
    per reference k (b, h, d, y+2p, x+2p), v (b, h, e, y+2p, x+2p) and optional values ``shared``
    by all heads (b, c, y+2p, x+2p), which are weighted by the head-averaged attention."""

    k: list[Tensor]
    v: list[Tensor]
    shared: list[Tensor] | None
    window: int
    shared_flow: Tensor | None = None  # (b, 2, H, W) full-resolution move still owed by the shared pixels

    @staticmethod
    def from_maps(k: Tensor, v: Tensor, shared: Tensor | None, window: int) -> "WindowKV":
        pad = (window // 2,) * 4
        return WindowKV([F.pad(k, pad)], [F.pad(v, pad)], None if shared is None else [F.pad(shared, pad)], window)

    @staticmethod
    def bank(items: list["WindowKV"]) -> "WindowKV":
        if len(items) == 1:
            return items[0]
        shared = None if items[0].shared is None else [t for i in items for t in i.shared]
        return WindowKV([t for i in items for t in i.k], [t for i in items for t in i.v], shared, items[0].window)

    def warped(self, flow: Tensor, pixel_stride: int, defer_shared: bool = False) -> "WindowKV":
        """The same references moved by flow (b, 2, y, x), in pixels of this map, so that each query's
        window is centred where the flow points; shared pixels are warped at full resolution, or with
        ``defer_shared`` keep the move as ``shared_flow`` for `warp_shared_pixels` to compose with its
        own, so that the pixels are resampled once."""
        p = self.window // 2

        def inner(maps: Tensor) -> Tensor:
            return maps[..., p:maps.shape[-2] - p, p:maps.shape[-1] - p]

        # every reference's keys and values in one sampling call: the sample positions are shared
        maps = [inner(m) for m in self.k + self.v]  # (b, h, c, y, x) each
        channels = [m.shape[1] * m.shape[2] for m in maps]
        moved = warp(torch.cat([m.flatten(1, 2) for m in maps], 1), flow).split(channels, 1)
        moved = [F.pad(t.reshape(m.shape), (p,) * 4) for t, m in zip(moved, maps)]

        shared, shared_flow = self.shared, None
        if self.shared is not None:
            full = resize_flow(flow, (flow.shape[-2] * pixel_stride, flow.shape[-1] * pixel_stride))
            if defer_shared:
                shared_flow = full
            else:
                shared = [F.pad(F.pixel_unshuffle(warp(F.pixel_shuffle(inner(s), pixel_stride), full), pixel_stride),
                                (p,) * 4) for s in self.shared]
        return WindowKV(moved[:len(self.k)], moved[len(self.k):], shared, self.window, shared_flow)

    def dist2(self, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """Squared offset of each window position (y, x, s), and an additive mask (y, x, s) that is
        -inf where the window runs off the map (kept apart so no gradient meets an inf)."""
        w, pad = self.window, self.window // 2
        offsets = _grid(w, w, self.k[0].device) - pad  # (s, 2)
        pos = _grid(*size, self.k[0].device)[:, None] + offsets  # (n, s, 2)
        inside = ((pos >= 0) & (pos < torch.tensor(size, device=pos.device))).all(-1)
        d2 = offsets.square().sum(-1).expand(inside.shape)
        mask = torch.zeros(inside.shape, device=pos.device).masked_fill(~inside, -torch.inf)
        return d2.reshape(*size, -1), mask.reshape(*size, -1)


KeyValue = DenseKV | WindowKV


def versions(module: nn.Module) -> tuple[int, ...]:
    """The version counters of a module's parameters: what a cache made from them is valid for (an
    optimizer step or a load_state_dict bumps them)."""
    return tuple(p._version for p in module.parameters())


def cached(cache: dict[tuple, Tensor], key: tuple, make: Callable[[], Tensor], keep: int = 4) -> Tensor:
    """A tensor for coding that depends on geometry and parameters, not on the references (position
    embeddings, locality biases), made once for ``key`` (which names the parameters' versions); the
    last ``keep`` are kept. Measured: the biases were most of the time a new bank took to make ready."""
    if key not in cache:
        if len(cache) >= keep:
            cache.pop(next(iter(cache)))
        cache[key] = make()
    return cache[key]


@dataclass
class DenseReady:
    """A bank's operands at a dense scale for coding, extra tokens appended, made once per bank:
    what `attend_dense` rebuilds on every call (the bias alone is heads x n x s) is made here once.
    ``tiled``: keys farther than the learned locality lets carry any weight are dropped and the
    rest attended by tiles (`window_tiles`; keys do not move at a dense scale, so their tiles are
    made once too); B = b*h*tiles and n = T*T then, else B = b*h."""

    k_t: Tensor  # (B, d, keys+E) keys, transposed for the product
    v: Tensor  # (B, keys+E, e+3) values, then each key's (y, x, 1) (extra tokens: zeros)
    bias: Tensor  # (B, n, keys+E)
    tiled: bool


@dataclass
class WindowReady:
    """A bank at a windowed scale for coding: its keys and values (moved per frame by the coarse
    flow) and the tiled locality bias of `window_tiles`, extra tokens' logits appended."""

    kv: WindowKV
    bias: Tensor  # (h*tiles, T*T, R*K+E)


Ready = DenseReady | WindowReady

# A key whose locality bias is below -FAR_LOGIT is left out of a dense scale's attention when coding.
# Measured with the shipped model on real frames (bank of 2), the attention mass beyond a radius of
# 7 at stride 8 (bias -33 and below) was at most 4.6e-14, beyond 6 7.6e-11: below float32 rounding.
FAR_LOGIT = 32.0


def bank(items: list[KeyValue]) -> KeyValue:
    """Keys and values of several references at one scale, attended to as one set."""
    return type(items[0]).bank(items)


class ExtraTokens(nn.Module):
    """Learned keys and values every query can attend to, so a query with no good match has
    somewhere to go. Their logits start well below a matching key's."""

    def __init__(self, heads: int, count: int, head_dim: int, value_dim: int):
        super().__init__()
        self.k = nn.Parameter(torch.randn(heads, count, head_dim))
        self.v = nn.Parameter(torch.zeros(heads, count, value_dim))
        # far below a matching key (logit ~0): at -3 four extra tokens took 17% of the attention
        # mass of a fresh model and darkened its output
        self.logit = nn.Parameter(torch.full((heads, count), -8.0))


def _with_positions(kv: DenseKV, extra: ExtraTokens) -> tuple[Tensor, Tensor]:
    """A dense bank's values with each key's (y, x, 1) appended (b, h, s, e+3), and the extra
    tokens' values with zeros there (h, E, e+3): the same product then gives the attended position."""
    b, h, s, _ = kv.v.shape
    where = torch.cat([kv.pos, kv.pos.new_ones(s, 1)], -1).expand(b, h, s, 3)
    return torch.cat([kv.v, where], -1), F.pad(extra.v, (0, 3))


def attend_dense(q: Tensor, kv: DenseKV, log_locality: Tensor, extra: ExtraTokens) -> tuple[Tensor, Tensor]:
    """q (b, h, n, d) -> values (b, h, n, e) and the key position the queries attend to, averaged over
    heads (b, n, 2), by scaled_dot_product_attention with the locality bias."""
    b = q.shape[0]
    k = torch.cat([kv.k, extra.k.expand(b, -1, -1, -1)], 2)
    values, extra_v = _with_positions(kv, extra)
    v = torch.cat([values, extra_v.expand(b, -1, -1, -1)], 2)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=dense_bias(kv, log_locality, extra).to(q.dtype))
    return _values_and_position(out)


def dense_window(size: tuple[int, int], log_locality: Tensor) -> int | None:
    """The window within which a dense scale is attended when coding: the radius beyond which the
    locality bias is below -FAR_LOGIT for every head, where tiles of it leave at most 2/3 of the
    keys; else None (attended whole)."""
    radius = math.ceil(math.sqrt(FAR_LOGIT / log_locality.exp().min().item())) - 1
    span = window_tiles.TILE + 2 * radius
    if window_tiles.tileable(size) and span * span * 3 <= 2 * size[0] * size[1]:
        return 2 * radius + 1
    return None


def dense_bias(kv: DenseKV, log_locality: Tensor, extra: ExtraTokens) -> Tensor:
    """`attend_dense`'s bias, extra tokens' logits appended -> (h, n, s+E)."""
    h, n = len(log_locality), kv.dist2.shape[0]
    bias = kv.log_prior - log_locality.exp()[:, None, None] * kv.dist2
    return torch.cat([bias, extra.logit[:, None, :].expand(h, n, -1)], -1)


def dense_ready(kv: DenseKV, extra: ExtraTokens, bias: Tensor, window: int | None) -> DenseReady:
    """`attend_dense`'s operands, built once (for queries of the references' batch size): whole,
    with ``bias`` from `dense_bias`, or by tiles within ``window`` (`dense_window`), with ``bias``
    from `tiled_bias`."""
    b, h, s, _ = kv.v.shape
    values, extra_v = _with_positions(kv, extra)
    if window is None:  # one "tile": the whole map
        keys, values = [kv.k[:, :, None]], [values[:, :, None]]
    else:
        size, p = kv.size, window // 2

        def tiles(t: Tensor) -> list[Tensor]:  # (b, h, R*n, c) -> per reference (b, h, tiles, K, c)
            maps = rearrange(t, "b h (r y x) c -> r b h c y x", r=s // (size[0] * size[1]), y=size[0])
            return [window_tiles.tile_keys(F.pad(m, (p,) * 4), window).unflatten(0, (b, h, -1)) for m in maps]

        keys, values = tiles(kv.k), tiles(values)
    n = keys[0].shape[2]
    k = torch.cat([*keys, extra.k[None, :, None].expand(b, -1, n, -1, -1)], 3).flatten(0, 2)
    v = torch.cat([*values, extra_v[None, :, None].expand(b, -1, n, -1, -1)], 3).flatten(0, 2)
    return DenseReady(k.transpose(1, 2).contiguous(), v, bias if b == 1 else bias.repeat(b, 1, 1), window is not None)


def _values_and_position(out: Tensor) -> tuple[Tensor, Tensor]:
    """Attention output (b, h, n, e+3) with the (y, x, 1) channels -> values (b, h, n, e) and the
    attended position, averaged over heads and normalised by the mass on real keys (b, n, 2)."""
    e = out.shape[-1] - 3
    return out[..., :e], out[..., e:e + 2].sum(1) / out[..., e + 2:].sum(1).clamp_min(1e-6)


def attend_dense_ready(q: Tensor, ready: DenseReady, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """`attend_dense` on ready operands: q (b, h, n, d) -> the same outputs, up to float rounding."""
    b, h, _, d = q.shape
    if not ready.tiled:
        out = window_tiles.attend(q.flatten(0, 1), ready.k_t, ready.v, ready.bias, d ** -0.5).unflatten(0, (b, h))
        return _values_and_position(out)
    q = window_tiles.tile_queries(rearrange(q, "b h (y x) d -> b h d y x", y=size[0]))
    out = window_tiles.untile(window_tiles.attend(q, ready.k_t, ready.v, ready.bias, d ** -0.5), b, h, size)
    return _values_and_position(rearrange(out, "b h c y x -> b h (y x) c"))


def attend_window(q: Tensor, kv: WindowKV, log_locality: Tensor, extra: ExtraTokens | None,
                  pixel_flow: bool = False) -> tuple[Tensor, Tensor | None]:
    """q (b, h, d, y, x) -> (b, h, e, y, x) and shared values (b, c, y, x) or None.

    Shared values (pixel-unshuffled reference pixels) are either blended like the other values, or,
    with ``pixel_flow``, warped: each reference's pixels are sampled bilinearly at the attention's
    mean offset, and the references (and extra tokens) mixed by their share of the attention. A blend
    of whole 4x4 blocks softens even a frame that barely moved; a warp keeps it sharp.

    Written as a loop over window offsets on shifted views of the padded maps: unlike unfolding
    (im2col), it never materialises window-sized copies of keys and values, which made it 5x
    faster to train on CPU.
    """
    y, x = q.shape[-2:]
    w = kv.window
    offsets = [(i, j) for i in range(w) for j in range(w)]
    scale = q.shape[2] ** -0.5
    logits = torch.stack([(q * k[..., i:i + y, j:j + x]).sum(2) for k in kv.k for i, j in offsets], -1)
    d2, mask = kv.dist2((y, x))
    bias = (mask - log_locality.exp()[:, None, None, None] * d2).repeat(1, 1, 1, len(kv.k))  # (h, y, x, R*s)
    if len(kv.k) > 1:
        bias = bias - math.log(len(kv.k))
    logits = logits * scale + bias  # (b, h, y, x, R*s)
    if extra is not None:
        extra_logits = torch.einsum("bhdyx,hed->bhyxe", q, extra.k) * scale + extra.logit[:, None, None]
        logits = torch.cat([logits, extra_logits], -1)
    weights = logits.softmax(-1)
    shifted = [(r, i, j) for r in range(len(kv.k)) for i, j in offsets]
    out = sum(weights[..., a].unsqueeze(2) * kv.v[r][..., i:i + y, j:j + x] for a, (r, i, j) in enumerate(shifted))
    e = out.shape[2]
    w_extra = weights[..., len(shifted):]
    if extra is not None:
        out = out + torch.einsum("bhyxe,hef->bhfyx", w_extra, extra.v[..., :e])
    if kv.shared is None:
        return out, None
    mean_w = weights.mean(1)  # (b, y, x, R*s + E): shared values see the head-averaged attention
    if pixel_flow:
        shared = warp_shared_pixels(kv, mean_w[..., :len(shifted)], offsets, (y, x))
    else:
        shared = sum(mean_w[..., a].unsqueeze(1) * kv.shared[r][..., i:i + y, j:j + x]
                     for a, (r, i, j) in enumerate(shifted))
    if extra is not None:
        shared = shared + torch.einsum("bhyxe,hec->bcyx", w_extra, extra.v[..., e:]) / q.shape[1]
    return out, shared


def warp_shared_pixels(kv: WindowKV, mean_w: Tensor, offsets: list[tuple[int, int]], size: tuple[int, int]) -> Tensor:
    """mean_w (b, y, x, R*s) -> each reference's shared pixels warped by its mean window offset and
    weighted by its attention mass, summed (b, c, y, x)."""
    p = kv.window // 2
    off = torch.tensor(offsets, dtype=mean_w.dtype, device=mean_w.device) - p  # (s, 2) in map pixels
    per_ref = mean_w.unflatten(-1, (len(kv.shared), len(offsets)))  # (b, y, x, R, s)
    mass = per_ref.sum(-1).permute(0, 3, 1, 2)  # (b, R, y, x)
    flow = torch.einsum("byxrs,st->brtyx", per_ref, off) / mass.clamp_min(1e-6)[:, :, None]
    return move_shared_pixels(kv, mass, flow, size)


def move_shared_pixels(kv: WindowKV, mass: Tensor, flow: Tensor, size: tuple[int, int]) -> Tensor:
    """Each reference's mass (b, R, y, x) and mean offset (b, R, 2, y, x) -> its shared pixels warped
    by the offset, weighted by the mass, summed (b, c, y, x). A pending ``kv.shared_flow`` is composed
    with the offset (the flow field is resampled, not the pixels), so each pixel is sampled once."""
    p = kv.window // 2
    stride = math.isqrt(kv.shared[0].shape[1] // 3)
    full = (size[0] * stride, size[1] * stride)
    refs = len(kv.shared)
    # the references side by side in the batch, (R*b, ...), so that each step is one call
    images = torch.cat([F.pixel_shuffle(padded[..., p:p + size[0], p:p + size[1]], stride) for padded in kv.shared])
    move = resize_flow(flow.transpose(0, 1).flatten(0, 1), full)
    if kv.shared_flow is not None:  # first the window offset, then the coarse flow from there
        move = move + warp(kv.shared_flow.repeat(refs, 1, 1, 1), move)
    moved = F.pixel_unshuffle(warp(images, move), stride).unflatten(0, (refs, -1))  # (R, b, c, y, x)
    return (mass.transpose(0, 1).unsqueeze(2) * moved).sum(0)


def tiled_bias(size: tuple[int, int], window: int, refs: int, log_locality: Tensor, extra: ExtraTokens | None) -> Tensor:
    """`window_tiles.window_bias` for R references, the extra tokens' logits appended ->
    (h*tiles, T*T, R*K [+ E])."""
    bias = window_tiles.window_bias(size, window, log_locality, refs)
    if extra is None:
        return bias
    tiles = bias.shape[0] // len(log_locality)
    logit = extra.logit.repeat_interleave(tiles, 0)[:, None, :].expand(-1, bias.shape[1], -1)
    return torch.cat([bias, logit], -1)


def attend_window_tiled(q: Tensor, kv: WindowKV, bias: Tensor, extra: ExtraTokens | None,
                        pixel_flow: bool = False) -> tuple[Tensor, Tensor | None]:
    """`attend_window` by tiles of queries (`window_tiles`), the same outputs up to float rounding;
    ``bias`` from `tiled_bias` (made once, `CrossAttention.ready`). The values carry extra channels
    so that the one product also gives what the shared pixels need: the blended pixels themselves,
    or each reference's attention mass and mass-weighted key position (the mean offset, once the
    query's own position is taken off), and the extra tokens' weights."""
    b, h, d, y, x = q.shape
    refs, e, w = len(kv.k), kv.v[0].shape[2], kv.window
    span, p = window_tiles.TILE + w - 1, w // 2
    keys = [window_tiles.tile_keys(k, w) for k in kv.k]
    per_key = []  # (K, c) channels added to every reference's values
    if kv.shared is not None and pixel_flow:
        local = torch.stack(torch.meshgrid(torch.arange(span), torch.arange(span), indexing="ij"), -1)
        where = torch.cat([local.reshape(-1, 2).to(q) - p, q.new_ones(span * span, 1)], -1)  # (K, 3)
        per_key = [F.pad(where, (3 * r, 3 * (refs - r - 1))) for r in range(refs)]
    values = []
    for r, v in enumerate(kv.v):
        parts = [window_tiles.tile_keys(v, w)]
        if kv.shared is not None and not pixel_flow:
            parts.append(window_tiles.tile_keys(kv.shared[r].unsqueeze(1).expand(-1, h, -1, -1, -1), w))
        if per_key:
            parts.append(per_key[r].expand(parts[0].shape[0], -1, -1))
        values.append(torch.cat(parts, -1) if len(parts) > 1 else parts[0])
    c = values[0].shape[-1]
    if extra is not None:  # extra tokens: their own values, then a one-hot of which token
        count = extra.k.shape[1]
        tiles = keys[0].shape[0] // (b * h)
        keys.append(extra.k.expand(b, -1, -1, -1).repeat_interleave(tiles, 1).flatten(0, 1))
        ev = torch.cat([extra.v[..., :e], extra.v.new_zeros(h, count, c - e), torch.eye(count).expand(h, -1, -1).to(q)], -1)
        values = [F.pad(v, (0, count)) for v in values]
        values.append(ev.expand(b, -1, -1, -1).repeat_interleave(tiles, 1).flatten(0, 1))
    out = window_tiles.attend(window_tiles.tile_queries(q), torch.cat(keys, 1).transpose(1, 2), torch.cat(values, 1),
                              bias if b == 1 else bias.repeat(b, 1, 1), d ** -0.5)
    out = window_tiles.untile(out, b, h, (y, x))  # (b, h, c [+ E], y, x)
    shared = None
    if kv.shared is not None:
        if pixel_flow:
            sums = out[:, :, e:e + 3 * refs].mean(1).unflatten(1, (refs, 3))  # (b, R, 3, y, x)
            mass = sums[:, :, 2]
            local = (torch.arange(y, device=q.device) % window_tiles.TILE).to(q)
            own = torch.stack(torch.meshgrid(local, (torch.arange(x, device=q.device) % window_tiles.TILE).to(q),
                                             indexing="ij"))  # (2, y, x) each query's place in its tile
            flow = sums[:, :, :2] / mass.clamp_min(1e-6)[:, :, None] - own
            shared = move_shared_pixels(kv, mass, flow, (y, x))
        else:
            shared = out[:, :, e:c].mean(1)
        if extra is not None:
            shared = shared + torch.einsum("bheyx,hec->bcyx", out[:, :, c:], extra.v[..., e:]) / h
    return out[:, :, :e], shared


class CrossAttention(nn.Module):
    """Implicit motion alignment at one scale: Q = m_c, K = m_r, V = f_r (and reference pixels).

    Values are the reference's dense features split across heads, unprojected, so the output is a
    learned warp of f_r. With ``pixel_stride`` set, the reference frame, pixel-unshuffled to this
    scale, rides along as values shared by every head: a direct path for fine detail. With ``window``
    set, each query attends to a window x window neighbourhood of every reference (centred where a
    coarser scale's attention points, when given a flow); otherwise to all positions.
    """

    def __init__(self, dim: int, head_dim: int, window: int | None, locality: float, extra_tokens: int,
                 pixel_stride: int = 0, num_freqs: int = 8, pixel_flow: bool = False):
        super().__init__()
        if pixel_stride and window is None:
            raise ValueError("shared pixel values are only supported with windowed attention")
        self.pixel_flow = pixel_flow
        self.heads = dim // head_dim
        self.window = window
        self.num_freqs = num_freqs
        self.pixel_stride = pixel_stride
        pixel_dim = 3 * pixel_stride**2
        self.norm = nn.LayerNorm(dim)
        self.pos = nn.Linear(4 * num_freqs, dim)
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.log_locality = nn.Parameter(torch.full((self.heads,), math.log(locality)))
        self.extra = ExtraTokens(self.heads, extra_tokens, head_dim, dim // self.heads + pixel_dim)
        self._cache: dict[tuple, Tensor] = {}  # coding: position embeddings and biases (`cached`)

    def _positions(self, size: tuple[int, int], device: torch.device) -> Tensor:
        """The projected position embedding (n, c); without gradients (coding) made once per size."""
        make = lambda: self.pos(sinusoidal_positions(*size, self.num_freqs, device))
        return make() if torch.is_grad_enabled() else self._cached(("positions", size), make)

    def _embed(self, m: Tensor, proj: nn.Linear) -> Tensor:
        """(b, c, y, x) -> (b, h, n, d): normalised, position-embedded, projected."""
        tokens = self.norm(rearrange(m, "b c y x -> b (y x) c"))
        tokens = tokens + self._positions(tuple(m.shape[-2:]), m.device)
        return rearrange(proj(tokens), "b n (h d) -> b h n d", h=self.heads)

    def prepare(self, m_r: Tensor, f_r: Tensor, pixels: Tensor | None = None) -> DenseKV | WindowKV:
        """Reference side, computed once per keyframe. m_r, f_r (b, c, y, x); pixels (b, p, y, x)."""
        size = m_r.shape[-2:]
        k = self._embed(m_r, self.to_k)
        if self.window is None:
            return DenseKV.from_tokens(k, rearrange(f_r, "b (h e) y x -> b h (y x) e", h=self.heads), size)
        k = rearrange(k, "b h (y x) d -> b h d y x", y=size[0])
        v = rearrange(f_r, "b (h e) y x -> b h e y x", h=self.heads)
        return WindowKV.from_maps(k, v, pixels if self.pixel_stride else None, self.window)

    def ready(self, kv: DenseKV | WindowKV) -> DenseKV | WindowKV | Ready:
        """A bank's keys and values made ready for coding (no gradients), once per bank: the bias and
        concatenations `forward` would otherwise redo on every frame, and at a windowed scale the
        tiled form (`window_tiles`), where its map is tileable."""
        ll = self.log_locality
        if isinstance(kv, DenseKV):
            refs = kv.k.shape[2] // (kv.size[0] * kv.size[1])
            window = dense_window(kv.size, ll)
            if window is None:
                bias = self._cached(("dense", kv.size, refs), lambda: dense_bias(kv, ll, self.extra))
            else:
                bias = self._cached(("tiled", kv.size, window, refs), lambda: tiled_bias(kv.size, window, refs, ll, self.extra))
            return dense_ready(kv, self.extra, bias, window)
        size = tuple(n - 2 * (kv.window // 2) for n in kv.k[0].shape[-2:])
        if not window_tiles.tileable(size):
            return kv
        refs = len(kv.k)
        return WindowReady(kv, self._cached(("tiled", size, kv.window, refs),
                                            lambda: tiled_bias(size, kv.window, refs, ll, self.extra)))

    def _cached(self, key: tuple, make: Callable[[], Tensor]) -> Tensor:
        return cached(self._cache, (*key, self.log_locality.device, versions(self)), make)

    def forward(self, m_c: Tensor, kv: DenseKV | WindowKV | Ready, flow: Tensor | None = None
                ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """m_c (b, c, y, x) -> aligned features (b, c, y, x), aligned pixels (b, p, y, x) or None, and
        for global attention the displacement to the attended position (b, 2, y, x) in pixels of this
        map. A windowed scale takes such a displacement as ``flow`` and centres its windows there."""
        y, x = m_c.shape[-2:]
        q = self._embed(m_c, self.to_q)
        if isinstance(kv, (DenseKV, DenseReady)):
            if isinstance(kv, DenseKV):
                out, pos = attend_dense(q, kv, self.log_locality, self.extra)
            else:
                out, pos = attend_dense_ready(q, kv, (y, x))
            displacement = rearrange(pos - _grid(y, x, pos.device), "b (y x) t -> b t y x", y=y)
            return rearrange(out, "b h (y x) e -> b (h e) y x", y=y), None, displacement
        ready = kv if isinstance(kv, WindowReady) else None
        kv = ready.kv if ready else kv
        if flow is not None:
            kv = kv.warped(flow, self.pixel_stride, defer_shared=self.pixel_flow)
        q = rearrange(q, "b h (y x) d -> b h d y x", y=y)
        if ready:
            out, pixels = attend_window_tiled(q, kv, ready.bias, self.extra, self.pixel_flow)
        else:
            out, pixels = attend_window(q, kv, self.log_locality, self.extra, self.pixel_flow)
        return rearrange(out, "b h e y x -> b (h e) y x"), pixels, None


class TransformerBlock(nn.Module):
    """Pre-norm multi-head self-attention (global, or windowed with ``window``) + GELU feed-forward."""

    def __init__(self, dim: int, head_dim: int, window: int | None, ff_mult: int):
        super().__init__()
        self.heads = dim // head_dim
        self.window = window
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, dim * ff_mult, act_layer=nn.GELU)
        # windowed self-attention: no locality prior (exp(-30) ~ 0) and no extra tokens
        self.register_buffer("no_locality", torch.full((self.heads,), -30.0), persistent=False)
        self._cache: dict[tuple, Tensor] = {}  # coding: the tiled window mask (`cached`)

    def _window_attention(self, maps: list[Tensor]) -> Tensor:
        """q, k, v maps (b, h, d, y, x) -> (b, h, d, y, x). Without gradients (coding), by tiles."""
        size = maps[0].shape[-2:]
        kv = WindowKV.from_maps(maps[1], maps[2], None, self.window)
        if torch.is_grad_enabled() or not window_tiles.tileable(size):
            return attend_window(maps[0], kv, self.no_locality, None)[0]
        bias = cached(self._cache, (size, maps[0].device), lambda: window_tiles.window_bias(size, self.window, self.no_locality, 1))
        return attend_window_tiled(maps[0], kv, bias, None)[0]

    def forward(self, x: Tensor) -> Tensor:
        """x (b, c, y, x) -> (b, c, y, x)."""
        y = x.shape[-2]
        tokens = rearrange(x, "b c y x -> b (y x) c")
        q, k, v = rearrange(self.qkv(self.norm1(tokens)), "b n (t h d) -> t b h n d", t=3, h=self.heads)
        if self.window is None:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            out = self._window_attention([rearrange(t, "b h (y x) d -> b h d y x", y=y) for t in (q, k, v)])
            out = rearrange(out, "b h d y x -> b h (y x) d")
        tokens = tokens + self.proj(rearrange(out, "b h n d -> b n (h d)"))
        tokens = tokens + self.mlp(self.norm2(tokens))
        return rearrange(tokens, "b (y x) c -> b c y x", y=y)
