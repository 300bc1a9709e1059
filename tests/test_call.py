"""Calls between two processes over WebRTC (aiortc) on loopback: the receiver runs as
`imfc call recv` in a subprocess, the sender in this process."""

import json
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest

from codec.video_io import FrameWriter, read_frames
from tests.conftest import moving_square_clip
from tools.call import main as call_main

REPO = Path(__file__).parents[1]
FRAMES = 24


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("call") / "clip.mp4"
    writer = FrameWriter(path, Fraction(25))
    for frame in moving_square_clip(FRAMES, 64, seed=3):
        writer.write(frame)
    writer.close()
    return path


def start_receiver(tmp_path: Path, weights: Path, *extra: str) -> tuple[subprocess.Popen, int]:
    cmd = [sys.executable, "-m", "tools.cli", "call", "recv", "--out", str(tmp_path / "out.mp4"), "--weights",
           str(weights), "--port", "0", "--timeout", "60", "--json", str(tmp_path / "recv.json"), *extra]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.startswith("listening on"), line + proc.stderr.read()
    return proc, int(line.rsplit(":", 1)[1])


def call(tmp_path, weights, clip, send_args=(), recv_args=()) -> dict:
    proc, port = start_receiver(tmp_path, weights, "--compare", str(clip), *recv_args)
    try:
        rc = call_main(["send", str(clip), "--weights", str(weights), "--port", str(port), "--timeout", "60",
                        "--fps", "12", "--json", str(tmp_path / "send.json"), *send_args])
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert rc == 0 and proc.returncode == 0, err
    report = json.loads((tmp_path / "recv.json").read_text())
    sent = json.loads((tmp_path / "send.json").read_text())
    assert sent.pop("sender_wire_kbps") > sent["kbps"]  # framing costs something
    assert sent == report  # the sender got the same report
    # every source frame is accounted for, and the output has one picture per source frame
    assert report["frames"] == FRAMES
    assert report["keyframes"] + report["tokens"] + report["concealed"] + report["held"] == FRAMES
    assert len(list(read_frames(tmp_path / "out.mp4"))) == FRAMES
    return report


def test_loopback_call(tiny_weights, clip, tmp_path):
    r = call(tmp_path, tiny_weights, clip, ["--keyframe-codec", "learned", "--quality-floor", "0"])
    assert r["keyframes"] >= 1 and r["tokens"] >= 1
    assert r["kbps"] > 0 and r["latency_ms_p50"] is not None and r["psnr"] > 0


@pytest.mark.slow
def test_call_survives_twenty_percent_loss(tiny_weights, clip, tmp_path):
    impair = ["--loss", "20", "--delay", "20", "--jitter", "30"]
    r = call(tmp_path, tiny_weights, clip, ["--keyframe-codec", "learned", "--quality-floor", "0",
                                            "--max-keyframe-interval", "8", *impair],
             impair + ["--seed", "7"])
    assert r["keyframes"] + r["tokens"] + r["concealed"] >= 1


@pytest.mark.slow
def test_keyframe_request_round_trip(tiny_weights, clip, tmp_path):
    """Seed 14 at 20% loss drops the sender's first datagram (the first keyframe) and none of the
    next seven: the receiver sees token frames naming a reference it never got, asks for a
    keyframe, and the sender's answer arrives."""
    r = call(tmp_path, tiny_weights, clip, ["--keyframe-codec", "learned", "--quality-floor", "0", "--loss", "20",
                                            "--seed", "14"])
    assert r["keyframe_requests"] >= 1 and r["keyframes_sent"] >= 2 and r["keyframes"] >= 1


@pytest.mark.slow
def test_receiver_refuses_another_model(tiny_weights, clip, tmp_path):
    import torch

    from codec.nn.config import get_config
    from codec.nn.model import build_model
    from codec.nn.weights import save_weights

    torch.manual_seed(5)
    other = tmp_path / "other.safetensors"
    save_weights(build_model(get_config("tiny")), other)
    proc, port = start_receiver(tmp_path, tiny_weights)
    try:
        rc = call_main(["send", str(clip), "--weights", str(other), "--port", str(port), "--timeout", "30"])
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert rc == 1 and proc.returncode == 1
    assert "same --weights" in err and err.count("\n") == 1


def test_sender_without_receiver_fails_in_one_line(tiny_weights, clip, capsys):
    rc = call_main(["send", str(clip), "--weights", str(tiny_weights), "--port", "1", "--timeout", "1"])
    err = capsys.readouterr().err
    assert rc == 1 and "nobody is listening" in err and err.count("\n") == 1


def test_simulated_call_with_rate_cap(tiny_weights, clip, tmp_path, capsys):
    """`imfc call simulate --max-kbps`: the floor (99 dB, missed by every token frame) asks for a
    keyframe each frame; the cap lets through fewer than without it."""
    def keyframes(*extra: str) -> int:
        out = tmp_path / "report.json"
        args = ["simulate", str(clip), "--weights", str(tiny_weights), "--keyframe-codec", "learned",
                "--quality-floor", "99", "--json", str(out)]
        assert call_main([*args, *extra]) == 0
        return json.loads(out.read_text())["keyframes_sent"]

    assert 1 <= keyframes("--max-kbps", "5") < keyframes()
    with pytest.raises(SystemExit) as exit_info:
        call_main(["simulate", str(clip), "--max-kbps", "-1"])
    assert exit_info.value.code == 2 and "--max-kbps" in capsys.readouterr().err


def test_loopback_call_with_av1_references(tiny_weights, clip, tmp_path):
    """A real call whose references are one AV1 stream: each decoded, frames held where the sender
    chose to hold (no packet), the report counting those holds."""
    r = call(tmp_path, tiny_weights, clip, ["--kbps", "0", "--reference-interval", "4"])
    # a reference every 4 coded frames; on a loaded machine the real-time sender skips some frames
    # (reported as not_sent), and with them some references
    if r["not_sent"] == 0:
        assert r["keyframes_sent"] == FRAMES // 4
    assert 1 <= r["keyframes_sent"] <= FRAMES // 4 and r["keyframes"] >= 1
    assert r["sender_holds"] <= r["held"] and r["psnr"] > 0


def test_default_call_uses_av1_references(tiny_weights, clip, tmp_path):
    """`imfc call send` without options: AV1 references at --kbps 8 (the clip is 1 s, shorter than
    the 3 s its intra frame is paid over, so its rate is not the target's: test_streaming_av1)."""
    r = call(tmp_path, tiny_weights, clip)
    assert r["keyframes"] >= 1 and r["kbps"] > 0 and r["sender_holds"] + r["tokens"] + r["keyframes"] >= FRAMES // 2


def test_simulated_av1_call_and_its_bad_options(tiny_weights, clip, tmp_path, capsys):
    out = tmp_path / "report.json"
    args = ["simulate", str(clip), "--weights", str(tiny_weights), "--keyframe-codec", "av1", "--kbps", "20"]
    assert call_main([*args, "--loss", "20", "--seed", "3", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["frames"] == FRAMES and r["keyframes_sent"] >= 1 and r["kbps"] > 0
    # the sender's own holds count as shown as sent; lost or late frames do not
    seconds = FRAMES / 25
    shown_as_sent = r["frames"] - r["held"] + min(r["sender_holds"], r["held"])
    assert r["as_sent_fps"] == pytest.approx(shown_as_sent / seconds) and r["as_sent_fps"] >= r["delivered_fps"]
    for bad in (["--av1-crf", "70"], ["--kbps", "-1"], ["--reference-interval", "0"], ["--probe-interval", "-1"],
                ["--av1-preset", "14"]):
        with pytest.raises(SystemExit) as exit_info:
            call_main([*args, *bad])
        assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "AV1 CRF" in err and "--kbps" in err and "SVT-AV1 preset must be 0 to 13" in err
