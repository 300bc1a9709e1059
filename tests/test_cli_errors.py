"""Every bad input ends with one clear line on stderr, a non-zero exit code and no output file."""

import os
import signal
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from codec.nn.config import get_config
from codec.nn.model import build_model
from codec.video_io import FrameWriter
from codec.nn.weights import save_weights
from tools import decode, encode, info


def check_error(capsys, code, pattern, out: Path | None = None):
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert pattern in err, err
    if out is not None:
        assert not out.exists()
        assert not list(out.parent.glob(f".{out.name}.part*"))


@pytest.fixture
def stream(tiny_weights, synthetic_video, tmp_path) -> Path:
    path = tmp_path / "s.imfc"
    assert encode.main([str(synthetic_video), "-o", str(path), "--weights", str(tiny_weights), "-q",
                        "--keyframe-codec", "learned", "--quality-floor", "0"]) == 0
    return path


def test_encode_missing_file(capsys, tiny_weights, tmp_path):
    out = tmp_path / "o.imfc"
    check_error(capsys, encode.main([str(tmp_path / "nope.mp4"), "-o", str(out), "--weights", str(tiny_weights)]),
                "no such file", out)


def test_encode_not_a_video(capsys, tiny_weights, tmp_path):
    bad = tmp_path / "notes.mp4"
    bad.write_text("hello, this is text")
    out = tmp_path / "o.imfc"
    check_error(capsys, encode.main([str(bad), "-o", str(out), "--weights", str(tiny_weights)]), "not a video", out)


def test_encode_zero_frames(capsys, tiny_weights, tmp_path):
    empty = tmp_path / "empty.y4m"
    empty.write_bytes(b"YUV4MPEG2 W64 H64 F25:1 Ip A1:1 C420jpeg\n")  # a video stream with no frame
    out = tmp_path / "o.imfc"
    check_error(capsys, encode.main([str(empty), "-o", str(out), "--weights", str(tiny_weights)]), "no frames", out)


@pytest.mark.parametrize("width, height, frames", [(64, 48, 1), (17, 9, 3), (2, 2, 2)])
def test_encode_odd_tiny_and_single_frame_videos(capsys, tiny_weights, tmp_path, width, height, frames):
    src = tmp_path / "odd.y4m"
    w = FrameWriter(src, Fraction(25))
    for i in range(frames):
        w.write(np.full((height, width, 3), 40 * i, np.uint8))
    w.close()
    out = tmp_path / "o.imfc"
    assert encode.main([str(src), "-o", str(out), "--weights", str(tiny_weights), "-q"]) == 0
    assert f"{frames} frames" in capsys.readouterr().out
    assert decode.main([str(out), "-o", str(tmp_path / "d.mp4"), "--weights", str(tiny_weights), "-q"]) == 0


def test_encode_unwritable_output(capsys, tiny_weights, synthetic_video, tmp_path):
    out = tmp_path / "missing-folder" / "o.imfc"
    check_error(capsys, encode.main([str(synthetic_video), "-o", str(out), "--weights", str(tiny_weights)]),
                "does not exist", out)


def test_missing_weights(capsys, synthetic_video, tmp_path):
    out = tmp_path / "o.imfc"
    check_error(capsys, encode.main([str(synthetic_video), "-o", str(out), "--weights", str(tmp_path / "w.safetensors")]),
                "no such weights file", out)


def damage(stream: Path, tmp_path: Path, how: str) -> Path:
    data = bytearray(stream.read_bytes())
    if how == "truncated":
        data = data[:len(data) - 7]
    elif how == "flipped":
        data[len(data) // 2] ^= 0x10
    elif how == "magic":
        data[:4] = b"MP4\0"
    elif how == "version":
        data[4] = 99
    path = tmp_path / f"{how}.imfc"
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("how, message", [
    ("truncated", "truncated"), ("flipped", "CRC mismatch"), ("magic", "not an imfc bitstream"),
    ("version", "newer than this imfc reads"),
])
def test_decode_damaged_streams(capsys, tiny_weights, stream, tmp_path, how, message):
    capsys.readouterr()
    out = tmp_path / "d.mp4"
    check_error(capsys, decode.main([str(damage(stream, tmp_path, how)), "-o", str(out), "--weights", str(tiny_weights)]),
                message, out)


def test_decode_with_another_model(capsys, stream, tmp_path):
    import torch

    torch.manual_seed(123)
    other = tmp_path / "other.safetensors"
    save_weights(build_model(get_config("tiny")), other)
    capsys.readouterr()
    out = tmp_path / "d.mp4"
    check_error(capsys, decode.main([str(stream), "-o", str(out), "--weights", str(other)]), "made by another model", out)


def test_shipped_models_by_name_and_decode_picks_the_one_a_stream_names(capsys, tiny_weights, stream, tmp_path,
                                                                       monkeypatch):
    import shutil

    from codec.nn import weights

    shipped = tmp_path / "shipped"
    shipped.mkdir()
    shutil.copy(tiny_weights, shipped / "tiny.safetensors")  # a shipped model whose preset is "tiny"
    shutil.copy(tiny_weights, shipped / "default.safetensors")
    monkeypatch.setattr(weights, "SHIPPED_DIR", shipped)
    assert weights.shipped_models() == ["default", "tiny"]
    assert weights.load_weights("tiny").cfg.name == "tiny"
    out = tmp_path / "d.mp4"
    assert decode.main([str(stream), "-o", str(out), "-q"]) == 0 and out.exists()  # no --weights: the stream's
    # a hostile header cannot name a file outside the shipped folder; unknown names are the default
    assert weights.shipped_or_default("../shipped/tiny") == shipped / "default.safetensors"
    capsys.readouterr()
    check_error(capsys, encode.main([str(tmp_path / "x.mp4"), "-o", str(tmp_path / "o.imfc"), "--weights", "fastest"]),
                "nor a shipped model: default, tiny", tmp_path / "o.imfc")


def test_decode_missing_and_unwritable(capsys, tiny_weights, stream, tmp_path):
    capsys.readouterr()
    check_error(capsys, decode.main([str(tmp_path / "nope.imfc"), "-o", str(tmp_path / "d.mp4"), "--weights", str(tiny_weights)]),
                "no such file")
    out = tmp_path / "nofolder" / "d.mp4"
    check_error(capsys, decode.main([str(stream), "-o", str(out), "--weights", str(tiny_weights)]), "does not exist", out)
    check_error(capsys, decode.main([str(stream), "-o", str(tmp_path / "d.avi"), "--weights", str(tiny_weights)]),
                "unsupported output type")


def test_info(capsys, stream):
    capsys.readouterr()
    assert info.main([str(stream), "--chunks"]) == 0
    out = capsys.readouterr().out
    assert "12 frames" in out and "KEYFRAME" in out and "kbps" in out and " at step " in out
    check_error(capsys, info.main([str(stream.with_name("nope.imfc"))]), "no such file")


def test_info_into_a_closed_pipe_stops_quietly(stream):
    """`imfc info X | head -1`: the reader leaves early; no error line, the shell's SIGPIPE status."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        r = subprocess.run([sys.executable, "-m", "tools.cli", "info", str(stream), "--chunks"],
                           stdout=write_end, stderr=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1])
    finally:
        os.close(write_end)
    assert r.returncode == 128 + signal.SIGPIPE and r.stderr == "", r.stderr


def test_info_splits_an_av1_stream(capsys, tiny_weights, synthetic_video, tmp_path):
    """imfc encode's default: AV1 references at --kbps 8; info names pictures, intra ones, tokens, framing."""
    path = tmp_path / "a.imfc"
    assert encode.main([str(synthetic_video), "-o", str(path), "--weights", str(tiny_weights), "-q"]) == 0
    capsys.readouterr()
    assert info.main([str(path), "--chunks"]) == 0
    out = capsys.readouterr().out
    assert "format version 7" in out and "AV1 references: " in out and "(1 intra)" in out
    assert "AV1_REFERENCES" in out and "12 frames" in out
