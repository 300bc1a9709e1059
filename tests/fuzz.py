"""Structure-aware fuzzing of what imfc reads from strangers: .imfc files and call packets.

Random bytes stop at the first CRC. These mutants are rebuilt from the parts of real streams and
calls (header fields, chunk types, run lengths, varints, keyframe steps, rANS payloads, packet ids,
fragment counts, references) and framed again with valid CRCs and packet checks, so they reach the
decoders behind them. A case ends in one of:

    decoded   the stream decoded (to a real .y4m file), or the call ran to its end
    refused   one clean error, as the command line reports it (tools.errors.is_user_error), and
              no output file left behind
    crashed   any other exception: what `imfc decode` would show as a traceback

A long run (BENCHMARKS.md, "Hostile input"), from a checkout:

    python -m tests.fuzz --cases 10000 --seed 1 [--weights codec/weights/default.safetensors]

The test suite runs a few thousand cases of each kind (tests/test_fuzz.py).
"""

from __future__ import annotations

import argparse
import random
import resource
import struct
import sys
import tempfile
import time
import traceback
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from codec.files import decode_stream
from codec.nn.config import get_config
from codec.nn.model import IMFCodec, build_model
from codec.nn.weights import load_weights, model_id
from codec.pipeline import Encoder, EncoderSettings, pack_token_runs
from codec.receiver import HISTORY, MAX_PARTIAL, SEQ_WINDOW, Receiver
from codec.sender import Sender, SenderSettings
from codec.video_io import to_tensor
from entropy import bitstream
from entropy import packet as pk
from entropy.bitstream import (
    KEYFRAME_STEP_SINCE, LAZY_REFERENCE_TOKENS_SINCE, MAX_FRAMES, MAX_RUN_FRAMES, RESTORATION_SINCE, SELF_DELIMITING_SINCE, VERSION, Av1ReferencesPayload, ChunkType, Header,
    KeyframePayload, read_file, read_stream, write_stream,
)
from tests.conftest import moving_square_clip
from tools.errors import is_user_error

SLOW_SECONDS = 5.0  # a case over this much CPU time counts as a hang in the long run's report
# (CPU time, not wall clock: the long run shares its machine, and a case runs on one thread)


# -- seeds: real streams and calls of a model ----------------------------------------------------
def fuzz_model(seed: int = 1) -> IMFCodec:
    """The tiny preset, untrained, with its coder tables and a restoration: what the suite fuzzes with."""
    torch.manual_seed(seed)
    model = build_model(get_config("tiny", restoration=(8, 2)))
    model.build_entropy_tables()
    return model.eval()


def seed_streams(model: IMFCodec, frames: int = 10) -> list[bytes]:
    """Real .imfc streams of a drifting square: with and without repeats, keyframe steps 2 and 1,
    token runs and (unpacked) single token frames, and AV1 references (packed and one a frame, shown
    restored as format 8, packed with each packet's length as format 6 wrote them, and with every
    reference's token as format 5)."""
    r = model.cfg.resolution
    clip = [to_tensor(f) for f in moving_square_clip(frames, r, seed=3)]
    out = []
    av1 = EncoderSettings(keyframe_codec="av1", reference_interval=3, av1_crf=55)
    plain = RESTORATION_SINCE - 1  # references shown as decoded
    for settings, packed, version in (
            (EncoderSettings(quality_floor=0, max_keyframe_interval=4, max_kbps=0), True, plain),
            (EncoderSettings(quality_floor=0, max_keyframe_interval=6, max_kbps=0, repeat_keyframe=False,
                             keyframe_step=1.0, bank_size=3), True, plain),
            (EncoderSettings(quality_floor=0, max_keyframe_interval=5, max_kbps=0), False, plain),
            (av1, True, plain),
            (replace(av1, restore=True), True, RESTORATION_SINCE),
            (av1, True, SELF_DELIMITING_SINCE - 1),  # packets with their lengths
            (EncoderSettings(keyframe_codec="av1", reference_interval=4, av1_crf=60), False, plain),
            (replace(av1, lmbda=0.0), True, LAZY_REFERENCE_TOKENS_SINCE - 1)):  # every reference's token
        encoder = Encoder(model, settings, lazy_reference_tokens=version >= LAZY_REFERENCE_TOKENS_SINCE)
        chunks = [encoder.encode(x).chunk for x in clip]
        encoder.close()
        header = Header(model.cfg.name, model_id(model, version), r, r, 25, 1, frames,
                        settings.bank_size, 320, 240, 40, 0, 240, version=version)
        out.append(write_stream(header, pack_token_runs(model, chunks, header.version) if packed else chunks))
    return out


CALL_SEEDS = {  # a learned call, and one with AV1 references (lambda 0: tokens wherever they beat holding)
    "learned": SenderSettings(quality_floor=0, max_keyframe_interval=4, max_packet=60),
    "av1": SenderSettings(keyframe_codec="av1", reference_interval=3, av1_crf=50, lmbda=0.0, max_packet=60),
}


def seed_call(model: IMFCodec, frames: int = 10, settings: SenderSettings = CALL_SEEDS["learned"]) -> list[bytes]:
    """The packets of a clean call: references in several fragments, tokens against acknowledged bases."""
    sender = Sender(model, settings)
    out = []
    for f in moving_square_clip(frames, model.cfg.resolution, seed=4):
        out += sender.encode(to_tensor(f)).packets
        st = sender.state
        ref, mask = pk.ref_set(sorted(st.refs)[-pk.REF_WINDOW:])
        sender.on_feedback(pk.to_bytes(pk.Feedback(0, st.frame - 1, ref, mask, pk.Flags.HAS_ACK | pk.Flags.HAS_REFS)))
    sender.close()
    return out


# -- mutation helpers -----------------------------------------------------------------------------
def varint(n: int, rng: random.Random) -> bytes:
    """n as LEB128: usually canonical, sometimes overlong or longer than a reader accepts."""
    out = bytearray(bitstream._varint(n))
    roll = rng.random()
    if roll < 0.05:  # overlong: same value, padded
        out[-1] |= 0x80
        out.append(0)
    elif roll < 0.08:  # five bytes or more
        out = bytearray([0xFF] * rng.randint(5, 7)) + b"\x01"
    return bytes(out)


def interesting(rng: random.Random, original: int, bits: int) -> int:
    """A value that tends to break parsers: limits, their neighbours, near the original, random."""
    top = (1 << bits) - 1
    pool = [0, 1, 2, original - 1, original + 1, 2 * original, 7, 8, 9, 255, 256, MAX_RUN_FRAMES,
            MAX_RUN_FRAMES + 1, 4095, 4097, 65535, 1 << 20, MAX_FRAMES, MAX_FRAMES + 1, top, rng.randint(0, top)]
    return min(max(rng.choice(pool), 0), top)


def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    buf = bytearray(data)
    op = rng.choice(["flip", "set", "cut", "extend", "zero", "random", "empty", "insert"])
    if op == "flip" and buf:
        for _ in range(rng.randint(1, 4)):
            buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
    elif op == "set" and buf:
        buf[rng.randrange(len(buf))] = rng.choice([0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)])
    elif op == "cut" and buf:
        del buf[rng.randrange(len(buf)):]
    elif op == "extend":
        buf += rng.randbytes(rng.randint(1, 64))
    elif op == "zero":
        buf = bytearray(len(buf))
    elif op == "random":
        buf = bytearray(rng.randbytes(rng.randint(0, 2 * len(buf) + 8)))
    elif op == "empty":
        buf = bytearray()
    elif op == "insert":
        i = rng.randint(0, len(buf))
        buf[i:i] = rng.randbytes(rng.randint(1, 16))
    return bytes(buf)


# -- .imfc files ----------------------------------------------------------------------------------
_HEADER_INTS = {  # field: bits on the wire
    "width": 16, "height": 16, "fps_num": 32, "fps_den": 32, "frames": 32, "bank_size": 8, "source_width": 16,
    "source_height": 16, "crop_left": 16, "crop_top": 16, "crop_size": 16,
}


@dataclass
class Parts:
    """A stream taken apart: a header and (type, payload) chunks, types free to be unknown."""

    header: Header
    chunks: list[tuple[int, bytes]]

    @staticmethod
    def of(data: bytes) -> "Parts":
        header, chunks = read_stream(data)
        return Parts(header, [(int(c.type), c.payload) for c in chunks])

    def to_bytes(self) -> bytes:
        out = bytearray(self.header.pack())
        for kind, payload in self.chunks:
            head = bytes([kind]) + bitstream._varint(len(payload))  # framing stays canonical
            out += head + payload + struct.pack("<I", zlib.crc32(head + payload))
        return bytes(out)


def mutate_payload(kind: int, payload: bytes, version: int, rng: random.Random) -> bytes:
    try:
        if kind == ChunkType.KEYFRAME:
            p = KeyframePayload.from_bytes(payload, version >= KEYFRAME_STEP_SINCE)
            token, step, image = p.token, p.step, p.image
            part = rng.choice(["token", "step", "image", "length"])
            token = mutate_bytes(token, rng) if part == "token" else token
            image = mutate_bytes(image, rng) if part == "image" else image
            step = rng.choice([0, 1, 2, 7, 8, 9, 10, 128, 255, rng.randrange(256)]) if part == "step" else step
            length = interesting(rng, len(token), 28) if part == "length" else len(token)
            return varint(length, rng) + token + (bytes([step]) if version >= KEYFRAME_STEP_SINCE else b"") + image
        if kind in (ChunkType.TOKEN_RUN, ChunkType.REPEAT):
            n, rest = _split_varint(payload)
            if rng.random() < 0.6:
                return varint(interesting(rng, n, 28), rng) + rest
            return varint(n, rng) + mutate_bytes(rest, rng)
        if kind == ChunkType.AV1_REFERENCES:
            compact = version >= SELF_DELIMITING_SINCE
            return mutate_av1_references(Av1ReferencesPayload.from_bytes(payload, None, compact), rng, compact)
    except Exception:  # the payload is already damaged: damage it further as bytes
        pass
    return mutate_bytes(payload, rng)


def mutate_av1_references(p: Av1ReferencesPayload, rng: random.Random, compact: bool) -> bytes:
    """One field of an AV1_REFERENCES payload: its frame count, a reference's gap or packet (its
    bytes, or one swapped for another's: a picture out of its place in the AV1 stream), the mode
    bits (and, ``compact``, version 7, their count) or the token stream; the rest written as it was."""
    refs = [list(r) for r in p.references]
    frames, modes, tokens = p.frames, list(p.modes), p.tokens
    part = rng.choice(["frames", "gap", "packet", "swap", "modes", "tokens"] + ["count"] * compact)
    k = rng.randrange(len(refs))
    if part == "packet":
        refs[k][1] = mutate_bytes(refs[k][1], rng)
    elif part == "swap":
        j = rng.randrange(len(refs))
        refs[k][1], refs[j][1] = refs[j][1], refs[k][1]
    elif part == "modes":
        modes = [rng.random() < 0.5 for _ in modes]
    elif part == "tokens":
        tokens = mutate_bytes(tokens, rng)
    frames = interesting(rng, frames, 13) if part == "frames" else frames
    gaps = [i - (refs[n - 1][0] if n else 0) for n, (i, _) in enumerate(refs)]
    if part == "gap":
        gaps[k] = interesting(rng, gaps[k], 13)
    out = bytearray(varint(frames, rng) + varint(len(refs), rng))
    for gap, (_, packet) in zip(gaps, refs):
        out += varint(gap, rng) + (b"" if compact else varint(len(packet), rng)) + packet
    bits = bytearray((len(modes) + 7) // 8)
    for i, token in enumerate(modes):
        bits[i // 8] |= token << (i % 8)
    if compact:
        count = interesting(rng, sum(modes), 13) if part == "count" else sum(modes)
        bits = varint(count, rng) + (bits if any(modes) or part == "count" else b"")
    return bytes(out + bits) + tokens


def _split_varint(data: bytes) -> tuple[int, bytes]:
    """A varint read leniently (overlong forms too, unlike the reader under test), so that a mutant
    whose run length was already made overlong can be mutated again."""
    value = 0
    for i, byte in enumerate(data[:4]):
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            return value, data[i + 1:]
    raise ValueError("no varint")


def chunk_frames(kind: int, payload: bytes) -> int:
    """How many frames a chunk claims (0 where it cannot say): to keep the header consistent."""
    try:
        if kind in (ChunkType.TOKEN_RUN, ChunkType.REPEAT, ChunkType.AV1_REFERENCES):
            return _split_varint(payload)[0]
        return 1 if kind in (ChunkType.KEYFRAME, ChunkType.FRAME) else 0
    except ValueError:
        return 0


def mutate_stream(seed: bytes, rng: random.Random) -> bytes:
    """One mutant: 1-3 structural changes, the header's frame count usually made consistent again,
    every CRC valid; now and then raw damage on top (which the CRCs must catch)."""
    parts = Parts.of(seed)
    for _ in range(rng.randint(1, 3)):
        op = rng.choices(["field", "version", "identity", "payload", "delete", "duplicate", "swap", "type", "insert"],
                         [4, 1, 0.5, 6, 1, 1, 1, 1, 1])[0]
        chunks = parts.chunks
        i = rng.randrange(len(chunks)) if chunks else 0
        if op == "field":
            name = rng.choice(list(_HEADER_INTS))
            value = interesting(rng, getattr(parts.header, name), _HEADER_INTS[name])
            parts.header = replace(parts.header, **{name: value})
        elif op == "version":
            parts.header = replace(parts.header, version=rng.randint(0, VERSION + 2))
        elif op == "identity":
            parts.header = replace(parts.header, model_id=rng.randbytes(8))
        elif op == "payload" and chunks:
            chunks[i] = (chunks[i][0], mutate_payload(chunks[i][0], chunks[i][1], parts.header.version, rng))
        elif op == "delete" and chunks:
            del chunks[i]
        elif op == "duplicate" and chunks:
            chunks.insert(i, chunks[i])
        elif op == "swap" and len(chunks) > 1:
            j = rng.randrange(len(chunks))
            chunks[i], chunks[j] = chunks[j], chunks[i]
        elif op == "type" and chunks:
            chunks[i] = (rng.choice([0, 1, 2, 3, 4, 5, 255]), chunks[i][1])
        elif op == "insert":
            chunks.insert(i, (rng.choice(list(ChunkType)), rng.randbytes(rng.randint(0, 80))))
    if rng.random() < 0.7:
        total = sum(chunk_frames(k, p) for k, p in parts.chunks)
        parts.header = replace(parts.header, frames=min(max(total, 0), (1 << 32) - 1))
    data = bytearray(parts.to_bytes())
    if rng.random() < 0.1 and data:
        for _ in range(rng.randint(1, 3)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    return bytes(data)


@dataclass
class Tally:
    cases: int = 0
    decoded: int = 0
    refused: int = 0
    crashed: list[str] = field(default_factory=list)  # tracebacks
    slow: list[tuple[int, float]] = field(default_factory=list)  # (case, CPU seconds)
    frames: int = 0  # frames decoded or shown over all cases
    slowest: float = 0.0  # CPU seconds
    slowest_wall: float = 0.0
    reasons: dict[str, int] = field(default_factory=dict)  # refusals by their first words

    def time(self, case: int, cpu: float, wall: float) -> None:
        self.slowest, self.slowest_wall = max(self.slowest, cpu), max(self.slowest_wall, wall)
        if cpu > SLOW_SECONDS:
            self.slow.append((case, cpu))

    def refuse(self, e: BaseException) -> None:
        self.refused += 1
        key = " ".join(str(e).split(": ")[-1].split()[:3])
        self.reasons[key] = self.reasons.get(key, 0) + 1


def decode_case(data: bytes, model: IMFCodec, workdir: Path, max_frames: int) -> tuple[str, int, str]:
    """What `imfc decode case.imfc -o out.y4m --max-frames N` does with ``data`` -> (outcome,
    frames written, detail). Refusals must leave no output behind."""
    src, dst = workdir / "case.imfc", workdir / "out.y4m"
    src.write_bytes(data)
    dst.unlink(missing_ok=True)
    try:
        s = decode_stream(src, read_file(src, max_frames), dst, model, progress=False)
        return "decoded", s.frames, ""
    except Exception as e:
        if not is_user_error(e):
            return "crashed", 0, traceback.format_exc()
        if dst.exists() or any(workdir.glob(".out.y4m*")):
            return "crashed", 0, f"refused ({e}) but left an output file behind"
        if "\n" in str(e):
            return "crashed", 0, f"refusal is not one line: {e!r}"
        return "refused", 0, str(e)


def fuzz_files(model: IMFCodec, cases: int, seed: int, max_frames: int = 64, tally: Tally | None = None) -> Tally:
    rng = random.Random(seed)
    seeds = seed_streams(model)
    tally = tally or Tally()
    with tempfile.TemporaryDirectory() as tmp:
        for case in range(cases):
            data = mutate_stream(rng.choice(seeds), rng)
            start, cpu = time.perf_counter(), time.process_time()
            outcome, frames, detail = decode_case(data, model, Path(tmp), max_frames)
            tally.time(case, time.process_time() - cpu, time.perf_counter() - start)
            tally.cases += 1
            tally.frames += frames
            if outcome == "decoded":
                tally.decoded += 1
            elif outcome == "refused":
                tally.refuse(Exception(detail))
            else:
                tally.crashed.append(f"file case {case} (seed {seed}):\n{detail}")
    return tally


# -- call packets ---------------------------------------------------------------------------------
def mutate_packet(data: bytes, rng: random.Random) -> bytes:
    """One datagram changed in a field or its payload, its check recomputed, or replaced by garbage."""
    roll = rng.random()
    if roll < 0.05:
        return rng.randbytes(rng.randint(0, 1300))
    p = pk.from_bytes(data)
    if roll < 0.35:
        payload = mutate_bytes(p.data, rng)[:pk.MAX_PACKET - pk.OVERHEAD]
        if isinstance(p, pk.Feedback):  # it has no payload field: append one behind a valid check
            raw = pk.to_bytes(p)[:-2] + payload
            return raw + pk._check(raw)
        return pk.to_bytes(replace(p, data=payload))
    names = [n for n in ("seq", "frame", "ref", "index", "count", "base", "ref_mask") if hasattr(p, n)]
    name = rng.choice(names)
    bits = 16 if name in ("seq", "frame") else 8
    old = getattr(p, name)
    value = rng.choice([old + 1, old - 1, old + (1 << (bits - 1)), old - (1 << (bits - 1)) + 1,
                        old + (1 << bits) - 1, 0, (1 << bits) - 1, rng.randrange(1 << bits)]) % (1 << bits)
    if name == "count":
        value = max(value, 1)
    if name == "index":
        value = min(value, p.count - 1)
    return pk.to_bytes(replace(p, **{name: value}))


def shift_ids(data: bytes, seq: int, frame: int, ref: int) -> bytes:
    """The same packet later in a long call: counters moved by an offset (so they wrap)."""
    p = pk.from_bytes(data)
    changes = {"seq": (p.seq + seq) & 0xFFFF, "frame": (p.frame + frame) & 0xFFFF}
    if not isinstance(p, pk.Feedback):
        changes["ref"] = (p.ref + ref) & 0xFF
    return pk.to_bytes(replace(p, **changes))


def mutate_call(seed: list[bytes], rng: random.Random) -> tuple[list[bytes], tuple[int, int, int]]:
    """A call as a hostile or broken network delivers it -> (packets, where the call's counters
    start): often late in a long call, so seq, frame and reference ids wrap in it; packets lost,
    duplicated, reordered, mutated behind a valid check, garbage in between."""
    start = (0, 0, 0)
    if rng.random() < 0.5:
        start = rng.choice([(65530, 65532, 254), (32760, 32767, 127), (70_000, 131_070, 511),
                            (rng.randrange(1 << 20), rng.randrange(1 << 20), rng.randrange(1 << 10))])
        seed = [shift_ids(d, *start) for d in seed]
    lose, damage, repeat = rng.choice([0, 0.02, 0.1, 0.3]), rng.choice([0.02, 0.05, 0.2]), rng.choice([0, 0.05, 0.3])
    out = []
    for d in seed:
        roll = rng.random()
        if roll < lose:
            continue
        out.append(mutate_packet(d, rng) if roll < lose + damage else d)
        if rng.random() < repeat:
            out.append(d)
    for _ in range(rng.randint(0, 6)):  # reordered
        i, j = rng.randrange(len(out)), rng.randrange(len(out))
        out[i], out[j] = out[j], out[i]
    if rng.random() < 0.2:
        out.reverse()
    return out, start


def receiver_at(model: IMFCodec, seq: int, frame: int, ref: int) -> Receiver:
    """A receiver whose counters stand where a long call has brought them (just before these ids),
    so ids that wrap on the wire unwrap as they would after an hour of call."""
    receiver = Receiver(model, (model.cfg.resolution,) * 2)
    receiver.stats.highest_seq = seq - 1
    receiver.state.newest_frame = receiver.state.shown = frame - 1
    receiver.state.newest_ref = ref - 1
    return receiver


def call_case(packets: list[bytes], model: IMFCodec, start: tuple[int, int, int] = (0, 0, 0)) -> tuple[str, int, str]:
    """The packets through a Receiver, each shown frame rendered, feedback made after each ->
    (outcome, frames shown, detail). The receiver may refuse nothing: it must never raise and its
    state must stay within its bounds."""
    receiver = receiver_at(model, *start)
    shown, last = 0, None
    try:
        for data in packets:
            for f in receiver.receive(data):
                if last is not None and f.frame <= last:
                    return "crashed", shown, f"frame {f.frame} shown after frame {last}"
                last = f.frame
                image = receiver.render(f)
                if image.shape[-2:] != (model.cfg.resolution,) * 2:
                    return "crashed", shown, f"rendered {tuple(image.shape)}"
                shown += 1
            pk.from_bytes(receiver.feedback())
        st = receiver.state
        bounds = {"refs": (len(st.refs), pk.REF_WINDOW), "partial": (len(st.partial), MAX_PARTIAL),
                  "tokens": (len(st.tokens), HISTORY), "seqs": (len(st.seqs), SEQ_WINDOW),
                  "av1_waiting": (len(st.av1_waiting), MAX_PARTIAL)}
        over = [f"{k} {n} > {limit}" for k, (n, limit) in bounds.items() if n > limit]
        return ("crashed", shown, "state over its bounds: " + ", ".join(over)) if over else ("decoded", shown, "")
    except Exception:
        return "crashed", shown, traceback.format_exc()


def feedback_case(datagrams: list[bytes], model: IMFCodec, frames: list, av1: bool = False) -> tuple[str, str]:
    """Hostile feedback to a Sender: it must keep sending valid packets (with AV1 references it may
    send none for a frame: a hold)."""
    settings = SenderSettings(quality_floor=0, max_packet=200)
    if av1:
        settings = replace(settings, keyframe_codec="av1", reference_interval=2, av1_crf=50)
    sender = Sender(model, settings)
    try:
        for x, data in zip(frames, datagrams):
            sender.on_feedback(data)
            out = sender.encode(x)
            if (not out.packets and not av1) or any(len(p) > 200 for p in out.packets):
                return "crashed", f"sent {[len(p) for p in out.packets]}"
            for p in out.packets:
                pk.from_bytes(p)
        return "decoded", ""
    except Exception:
        return "crashed", traceback.format_exc()
    finally:
        sender.close()


def fuzz_calls(model: IMFCodec, cases: int, seed: int, tally: Tally | None = None) -> Tally:
    rng = random.Random(seed)
    seeds = [seed_call(model, settings=s) for s in CALL_SEEDS.values()]
    frames = [to_tensor(f) for f in moving_square_clip(4, model.cfg.resolution, seed=5)]
    tally = tally or Tally()
    for case in range(cases):
        start, cpu = time.perf_counter(), time.process_time()
        av1 = rng.random() < 0.5
        if rng.random() < 0.85:
            mutant, start_ids = mutate_call(seeds[av1], rng)
            outcome, shown, detail = call_case(mutant, model, start_ids)
        else:
            ack = pk.to_bytes(pk.Feedback(0, 0, 0, 0, pk.Flags.HAS_ACK | pk.Flags.HAS_REFS))
            datagrams = [mutate_packet(ack, rng) for _ in frames]
            (outcome, detail), shown = feedback_case(datagrams, model, frames, av1), 0
        tally.time(case, time.process_time() - cpu, time.perf_counter() - start)
        tally.cases += 1
        tally.frames += shown
        if outcome == "decoded":
            tally.decoded += 1
        else:
            tally.crashed.append(f"call case {case} (seed {seed}):\n{detail}")
    return tally


# -- a long run -----------------------------------------------------------------------------------
def report(kind: str, t: Tally, seconds: float) -> str:
    top = ", ".join(f"{n} {k!r}" for k, n in sorted(t.reasons.items(), key=lambda kv: -kv[1])[:6])
    return (f"{kind}: {t.cases} cases in {seconds:.0f} s: {t.decoded} decoded ({t.frames} frames), {t.refused} refused, "
            f"{len(t.crashed)} crashed, {len(t.slow)} over {SLOW_SECONDS:g} s of CPU (slowest {t.slowest:.2f} s of CPU, "
            f"{t.slowest_wall:.2f} s wall clock)" + (f" {t.slow}" if t.slow else "")
            + (f"; most common refusals: {top}" if top else ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=10_000, help="cases of each kind (files, calls)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--weights", type=Path, default=None, help="a weights file (default: the tiny test model)")
    parser.add_argument("--max-frames", type=int, default=256, help="the decoder's --max-frames for file cases")
    parser.add_argument("--calls", type=int, default=None, help="call cases (default: --cases)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model = load_weights(args.weights) if args.weights else fuzz_model()
    start = time.perf_counter()
    files = fuzz_files(model, args.cases, args.seed, args.max_frames)
    print(report("files", files, time.perf_counter() - start), flush=True)
    start = time.perf_counter()
    calls = fuzz_calls(model, args.cases if args.calls is None else args.calls, args.seed)
    print(report("calls", calls, time.perf_counter() - start))
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    for c in (files.crashed + calls.crashed)[:5]:
        print(c, file=sys.stderr)
    return 1 if files.crashed or calls.crashed or files.slow or calls.slow else 0


if __name__ == "__main__":
    sys.exit(main())
