"""Where imfc's time goes: the encoder's closed loop and the decoder, one frame at a time as in a
call, broken down by step and module of the IMF networks and by torch op (torch.profiler).

Steps are the model's entry points (E_T, the reference side, synthesis, entropy coding, the
keyframe codec) and the AV1 reference stream's encode and decode; modules are the networks inside
synthesis and each cross-attention scale. Their times are inclusive CPU time (a step contains its
modules), summed over the frames, so the table reads as "of this much time per frame, so much
went here".
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

from codec.av1_reference import ReferenceDecoder, ReferenceEncoder
from codec.files import stream_version
from codec.nn.model import IMFCodec
from codec.pipeline import Decoder, Encoder, EncoderSettings
from codec.video_io import to_tensor

STEPS = {  # label: (object attribute path, method) of the model's entry points
    "step: E_T (token_symbols)": ("", "token_symbols"),
    "step: reference side (E_F + keys/values)": ("", "reference"),
    "step: synthesis (IMF_D + IMF_A + D_F)": ("", "synthesize"),
    "step: token entropy coding": ("", "compress_deltas"),
    "step: token entropy decoding": ("", "decompress_deltas"),
    "step: keyframe codec encode": ("keyframe_codec", "compress"),
    "step: keyframe codec decode": ("keyframe_codec", "decompress"),
}
CLASS_STEPS = {  # label: (class, method) of the AV1 reference stream, outside the model
    "step: AV1 reference encode (SVT-AV1 + its own decode)": (ReferenceEncoder, "code"),
    "step: AV1 reference decode (libdav1d)": (ReferenceDecoder, "decode"),
}
PREFIXES = ("step: ", "module: ")


@dataclass(frozen=True)
class Row:
    name: str
    calls: int
    ms_per_frame: float  # CPU time, inclusive
    share: float  # of the whole run's CPU time


def _modules(model: IMFCodec) -> dict[str, nn.Module]:
    named = {"IMF_D token decoder": model.token_decoder, "IMF_A alignment": model.alignment,
             "D_F frame decoder": model.frame_decoder, "E_F feature encoder": model.feature_encoder}
    for i, m in enumerate(model.alignment.cross):
        named[f"IMF_A cross-attention, scale {i}"] = m
    for i, m in enumerate(model.alignment.blocks):
        named[f"IMF_A transformer blocks, scale {i}"] = m
    return named


@contextlib.contextmanager
def labelled(model: IMFCodec) -> Iterator[None]:
    """Label the model's steps and modules as profiler ranges for the duration (instance-level
    wrappers and forward hooks, all removed afterwards)."""
    patched, hooks = [], []

    def wrap(owner: object, method: str, label: str) -> None:
        original = getattr(owner, method)

        def timed(*args, **kwargs):
            with record_function(label):
                return original(*args, **kwargs)

        setattr(owner, method, timed)
        patched.append((owner, method, original))

    for label, (path, method) in STEPS.items():
        wrap(getattr(model, path) if path else model, method, label)
    for label, (cls, method) in CLASS_STEPS.items():
        wrap(cls, method, label)
    for name, module in _modules(model).items():
        ranges: list[record_function] = []

        def pre(_m, _inputs, label=f"module: {name}", ranges=ranges):
            ranges.append(record_function(label).__enter__())

        def post(_m, _inputs, _output, ranges=ranges):
            ranges.pop().__exit__(None, None, None)

        hooks += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    try:
        yield
    finally:
        for owner, method, original in patched:
            if isinstance(owner, type):
                setattr(owner, method, original)
            else:
                delattr(owner, method)  # the instance attribute goes; the class's method shows again
        for h in hooks:
            h.remove()


def _rows(prof: profile, frames: int, ops: int) -> tuple[list[Row], list[Row]]:
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    labelled_rows = sorted((Row(e.key, e.count, e.cpu_time_total / 1000 / frames, e.cpu_time_total / total)
                            for e in events if e.key.startswith(PREFIXES)), key=lambda r: (r.name[:4], -r.share))
    op_rows = sorted((Row(e.key, e.count, e.self_cpu_time_total / 1000 / frames, e.self_cpu_time_total / total)
                      for e in events if e.key.startswith("aten::")), key=lambda r: -r.share)[:ops]
    return labelled_rows, op_rows


@dataclass(frozen=True)
class Profile:
    frames: int
    encode_ms_per_frame: float
    decode_ms_per_frame: float
    encode: list[Row]  # steps and modules
    encode_ops: list[Row]
    decode: list[Row]
    decode_ops: list[Row]


def profile_coding(model: IMFCodec, frames: np.ndarray, settings: EncoderSettings = EncoderSettings(),
                   threads: int = 1, ops: int = 15, fps: float = 25.0) -> Profile:
    """Encode then decode (T, R, R, 3) uint8 frames under the profiler (after one warm-up frame)."""
    torch.set_num_threads(threads)
    x = [to_tensor(f) for f in frames]
    warm = Encoder(model, settings, fps, len(x))  # first calls pay for allocator and kernel setup
    warm.encode(x[0])
    warm.close()
    encoder = Encoder(model, settings, fps, len(x))
    with labelled(model), profile(activities=[ProfilerActivity.CPU]) as enc_prof:
        chunks = [encoder.encode(f).chunk for f in x]
    encoder.close()
    r = model.cfg.resolution
    decoder = Decoder(model, (r, r), settings.bank_size, stream_version(chunks, encoder.restore))
    with labelled(model), profile(activities=[ProfilerActivity.CPU]) as dec_prof:
        for c in chunks:
            decoder.decode(c)
    enc, enc_ops = _rows(enc_prof, len(x), ops)
    dec, dec_ops = _rows(dec_prof, len(x), ops)

    def per_frame(prof: profile) -> float:
        return sum(e.self_cpu_time_total for e in prof.key_averages()) / 1000 / len(x)

    return Profile(len(x), per_frame(enc_prof), per_frame(dec_prof), enc, enc_ops, dec, dec_ops)


def profile_tables(p: Profile) -> list[str]:
    def table(title: str, rows: list[Row]) -> list[str]:
        out = [f"| {title} | calls | CPU ms per frame | share |", "|---|---|---|---|"]
        out += [f"| {r.name} | {r.calls} | {r.ms_per_frame:.1f} | {r.share:.1%} |" for r in rows]
        return out + [""]

    return ([f"Encoder (closed loop): {p.encode_ms_per_frame:.1f} CPU ms per frame over {p.frames} frames", ""]
            + table("encoder step / module", p.encode) + table("encoder op (self time)", p.encode_ops)
            + [f"Decoder: {p.decode_ms_per_frame:.1f} CPU ms per frame", ""]
            + table("decoder step / module", p.decode) + table("decoder op (self time)", p.decode_ops))
