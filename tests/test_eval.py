"""imfc eval and imfc bench end to end on a tiny synthetic clip with the tiny model, and the anchors."""

import argparse
import csv
import json
from fractions import Fraction

import numpy as np
import pytest

from evaluation.anchors import Anchor, Reduced, reduced_round_trip, round_trip
from codec.files import encode_file
from evaluation.metrics import vmaf_available
from codec.pipeline import EncoderSettings
from codec.nn.weights import load_weights
from evaluation.rd_eval import load_clip
from tools import bench
from tools import eval as eval_tool

from .conftest import moving_square_clip
from .test_cli_errors import check_error

FRAMES = 6


@pytest.mark.parametrize("anchor", list(Anchor))
def test_anchor_round_trip(anchor):
    frames = list(moving_square_clip(FRAMES, 64))
    low, high = (63 if anchor is Anchor.SVTAV1 else 51), 20
    coarse = round_trip(anchor, frames, Fraction(25), low)
    fine = round_trip(anchor, frames, Fraction(25), high)
    assert len(coarse.frames) == len(fine.frames) == FRAMES
    assert coarse.frames[0].shape == (64, 64, 3) and coarse.frames[0].dtype == np.uint8
    assert 0 < coarse.bytes < fine.bytes
    err = [np.abs(a.astype(int) - b).mean() for a, b in zip(frames, fine.frames)]
    assert max(err) < 8  # a fine CRF decodes close to the source: frames are neither lost nor reordered


def test_reduced_anchors_hold_frames_and_cost_less():
    """1 in 4 frames coded and each held until the next; or coded at half size and resized back.
    Both give one frame per input frame at the input's size, for fewer bytes than the full stream."""
    frames = list(moving_square_clip(12, 64))
    full = round_trip(Anchor.SVTAV1, frames, Fraction(25), 40)
    held = reduced_round_trip(Anchor.SVTAV1, frames, Fraction(25), 40, Reduced(every=4))
    assert len(held.frames) == 12 and held.bytes < full.bytes
    for i in range(12):
        assert np.array_equal(held.frames[i], held.frames[4 * (i // 4)])
    assert not np.array_equal(held.frames[0], held.frames[4])  # the square moved
    small = reduced_round_trip(Anchor.SVTAV1, frames, Fraction(25), 40, Reduced(size=32))
    assert len(small.frames) == 12 and small.frames[0].shape == (64, 64, 3) and small.bytes < full.bytes
    assert Reduced(every=4).codec(Anchor.SVTAV1) == "svtav1 held" and Reduced(every=4).setting(63) == "1 in 4, crf 63"
    assert Reduced(size=128).codec(Anchor.SVTAV1) == "svtav1 at 128"
    with pytest.raises(ValueError):
        Reduced(every=0)


def test_fixed_qindex_offsets_make_the_inter_frames_cheaper():
    """The held anchor with SVT's fixed qindex offsets (imfc's references below 10 kbps): every
    inter frame at the CRF's own qindex, so a stream of them costs less than CRF mode's."""
    frames = list(moving_square_clip(16, 64))
    crf_mode = reduced_round_trip(Anchor.SVTAV1, frames, Fraction(25), 63, Reduced(every=2))
    fixed = reduced_round_trip(Anchor.SVTAV1, frames, Fraction(25), 63, Reduced(every=2, intra_offset=0))
    assert len(fixed.frames) == 16 and fixed.bytes < crf_mode.bytes
    assert Reduced(every=2, intra_offset=-32).codec(Anchor.SVTAV1) == "svtav1 held, intra offset -32"
    assert Reduced(every=2, preset=4).codec(Anchor.SVTAV1) == "svtav1 held, preset 4"
    for options in ({"intra_offset": 0}, {"preset": 4}):
        with pytest.raises(ValueError, match="SVT-AV1"):
            round_trip(Anchor.X264, frames, Fraction(25), 40, **options)


def test_eval_with_reduced_anchors(tiny_weights, synthetic_video, tmp_path):
    out = tmp_path / "result"
    args = [str(synthetic_video), "--out", str(out), "--weights", str(tiny_weights), "--frames", str(FRAMES),
            "--imfc-points", "0:250,0:2", "--x264-crf", "", "--x265-crf", "", "--svtav1-crf", "", "--held", "2,3",
            "--held-crf", "63,50", "--held-offsets", "-32", "--held-preset", "8,6", "--small", "32", "--small-crf", "63,50",
            "--no-vmaf", "-q"]
    assert eval_tool.main(args) == 0
    data = json.loads((out / "points.json").read_text())
    settings = {(p["codec"], p["setting"]) for p in data["points"] if p["codec"] != "imfc"}
    expected = {("svtav1 held", f"1 in {k}, crf {c}") for k in (2, 3) for c in (63, 50)} | {
        ("svtav1 at 32", f"crf {c}") for c in (63, 50)} | {("svtav1 held, intra offset -32", f"1 in {k}, crf 63") for k in (2, 3)}
    assert settings == expected | {(codec + ", preset 6", setting) for codec, setting in expected}
    assert {e["anchor"] for e in data["bd_rate"]} == {"svtav1 held", "svtav1 held, intra offset -32", "svtav1 at 32",
                                                      "svtav1 held, preset 6", "svtav1 held, intra offset -32, preset 6",
                                                      "svtav1 at 32, preset 6"}
    summary = (out / "summary.md").read_text()
    assert "1 in K frames coded (K = 2, 3" in summary and "preset 6 (not 8)" in summary
    with pytest.raises(SystemExit):
        eval_tool.main([*args, "--held-preset", "14"])


def test_anchor_rejects_bad_crf():
    with pytest.raises(ValueError, match="CRF"):
        round_trip(Anchor.X264, list(moving_square_clip(2, 64)), Fraction(25), 60)


@pytest.fixture(scope="module")
def eval_out(tiny_weights, synthetic_video, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "result"
    args = [str(synthetic_video), "--out", str(out), "--weights", str(tiny_weights), "--frames", str(FRAMES),
            "--imfc-points", "0:250,0:2", "--x264-crf", "51,35", "--x265-crf", "", "--svtav1-crf", "", "--held", "",
            "--small", "0", "-q"]
    if not vmaf_available():
        args.append("--no-vmaf")
    assert eval_tool.main(args) == 0
    return out


def test_eval_writes_every_output(eval_out):
    names = {p.name for p in eval_out.iterdir()}
    assert {"points.csv", "points.json", "frames.csv", "summary.md", "side_by_side_square.png",
            "rd_psnr_rgb.png", "rd_ms_ssim.png", "rd_gmsd.png"} <= names
    assert not list(eval_out.parent.glob(".*.part"))
    summary = (eval_out / "summary.md").read_text()
    assert "| x264 | PSNR RGB (dB) |" in summary and "imfc eval" in summary and "zerolatency" in summary


def test_eval_points_are_consistent(eval_out, tiny_weights, synthetic_video, tmp_path):
    data = json.loads((eval_out / "points.json").read_text())
    points = data["points"]
    assert {p["codec"] for p in points} == {"imfc", "x264"}
    assert len([p for p in points if p["codec"] == "imfc"]) == 2 and len(points) == 4
    for p in points:
        assert p["bytes"] > 0 and p["frames"] == FRAMES and p["fps"] == 25
        assert p["kbps"] == pytest.approx(p["bytes"] * 8 / (FRAMES / 25) / 1000)
        assert 5 < p["psnr_rgb"] < 100 and 0 < p["ms_ssim"] <= 1 and p["gmsd"] >= 0
    imfc = {p["setting"]: p for p in points if p["codec"] == "imfc"}
    # --max-keyframe-interval 2: two token frames between keyframes, so frames 0 and 3 are keyframes
    assert imfc["floor 0 dB, keyint 2, key step 2"]["keyframes"] == 2
    assert imfc["floor 0 dB, keyint 250, key step 2"]["keyframes"] == 1
    # imfc's bytes are exactly those of the file `imfc encode` writes for the same frames
    model = load_weights(tiny_weights)
    s = encode_file(synthetic_video, tmp_path / "c.imfc", model, EncoderSettings(0.0, 250), max_frames=FRAMES, progress=False)
    assert s.bytes == imfc["floor 0 dB, keyint 250, key step 2"]["bytes"]
    # the same 8-bit errors, averaged in float32 by the encoder and in float64 by eval
    assert s.psnr == pytest.approx(imfc["floor 0 dB, keyint 250, key step 2"]["psnr_rgb"], abs=0.01)
    x264 = sorted((p for p in points if p["codec"] == "x264"), key=lambda p: p["kbps"])
    assert x264[0]["setting"] == "crf 51" and x264[1]["psnr_rgb"] > x264[0]["psnr_rgb"]
    assert {(e["anchor"], e["metric"]) for e in data["bd_rate"]} == {("x264", m) for m in ("psnr_rgb", "ms_ssim", "vmaf")}
    with open(eval_out / "frames.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 * FRAMES
    mean = np.mean([float(r["psnr_rgb"]) for r in rows if r["codec"] == "x264" and r["setting"] == "crf 35"])
    assert mean == pytest.approx(x264[1]["psnr_rgb"], abs=1e-3)  # the same numbers, rounded for the CSV


def test_eval_takes_anchors_from_an_earlier_run(eval_out, tiny_weights, synthetic_video, tmp_path, capsys):
    """--anchors-from: the earlier run's x264 points join this imfc-only run's report, as measured
    there; an earlier run of other frames is refused with one line, before anything is written."""
    out = tmp_path / "imfc_only"
    base = [str(synthetic_video), "--weights", str(tiny_weights), "--imfc-points", "0:2", "--x264-crf", "",
            "--x265-crf", "", "--svtav1-crf", "", "--held", "", "--small", "0", "--no-vmaf", "-q"]
    assert eval_tool.main(base + ["--out", str(out), "--frames", str(FRAMES),
                                  "--anchors-from", str(eval_out / "points.json")]) == 0
    data = json.loads((out / "points.json").read_text())
    earlier = json.loads((eval_out / "points.json").read_text())
    assert [p for p in data["points"] if p["codec"] == "x264"] == [p for p in earlier["points"] if p["codec"] == "x264"]
    assert {e["anchor"] for e in data["bd_rate"]} == {"x264"} and data["anchors_from"] == str(eval_out / "points.json")
    capsys.readouterr()
    other = tmp_path / "other"
    code = eval_tool.main(base + ["--out", str(other), "--frames", str(FRAMES - 1),
                                  "--anchors-from", str(eval_out / "points.json")])
    check_error(capsys, code, f"clip square has {FRAMES} frames there, {FRAMES - 1} here", other)
    code = eval_tool.main(base + ["--out", str(other), "--anchors-from", str(eval_out / "summary.md")])
    check_error(capsys, code, "not an imfc eval points.json", other)


@pytest.mark.parametrize("bad", ["missing", "not_video"])
def test_eval_bad_input(capsys, tiny_weights, synthetic_video, tmp_path, bad):
    clip = tmp_path / "nope.mp4"
    if bad == "not_video":
        clip.write_text("hello")
    out = tmp_path / "result"
    code = eval_tool.main([str(synthetic_video), str(clip), "--out", str(out), "--weights", str(tiny_weights), "-q"])
    check_error(capsys, code, "no such file" if bad == "missing" else "not a video", out)


def test_eval_refuses_non_empty_out(capsys, tiny_weights, synthetic_video, tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    code = eval_tool.main([str(synthetic_video), "--out", str(tmp_path), "--weights", str(tiny_weights), "-q"])
    check_error(capsys, code, "not an empty folder")
    assert (tmp_path / "keep.txt").exists()


def test_bench_reports_imfc_and_x264(capsys, tiny_weights, synthetic_video, tmp_path):
    out = tmp_path / "bench.json"
    assert bench.main([str(synthetic_video), "--weights", str(tiny_weights), "--frames", "4", "--threads", "1",
                       "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| imfc | 1 |" in text and "| x264 | 1 |" in text and "peak resident memory" in text
    data = json.loads(out.read_text())
    assert {(r["codec"], r["threads"]) for r in data["rows"]} == {("imfc", 1), ("x264", 1)}
    for r in data["rows"]:
        assert r["frames"] == 4 and r["encode_fps"] > 0 and r["decode_fps"] > 0
        assert r["encode_p50_ms"] <= r["encode_p95_ms"] and r["encode_cpu_ms"] > 0
        assert (r["token_frames"] is None) == (r["codec"] == "x264")  # how often imfc's decoder synthesized
        assert r["codec"] == "x264" or 0 <= r["token_frames"] <= 4 - r["keyframes"]
        assert (r["token_decode_p95_ms"] is None) == (not r["token_frames"])
    assert data["peak_rss_mb"]["end"] >= data["peak_rss_mb"]["after_imports"] > 0
    assert "synthesis alone" in text and 0 < data["synthesis_ms"]["1"]["p50"] <= data["synthesis_ms"]["1"]["p95"]


def test_bench_bad_input(capsys, tiny_weights, tmp_path):
    check_error(capsys, bench.main([str(tmp_path / "nope.mp4"), "--weights", str(tiny_weights)]), "no such file")


def test_eval_rejects_out_of_range_crf(capsys, synthetic_video, tmp_path):
    with pytest.raises(SystemExit) as e:
        eval_tool.main([str(synthetic_video), "--out", str(tmp_path / "r"), "--x264-crf", "60"])
    assert e.value.code == 2 and "0..51" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_imfc_points_take_an_optional_rate_cap_and_keyframe_step():
    points = eval_tool.imfc_points("20:250,24:5:16,22:250:0:1,24:250:11")
    assert points == (EncoderSettings(20.0, 250, max_kbps=0.0), EncoderSettings(24.0, 5, max_kbps=16.0),
                      EncoderSettings(22.0, 250, max_kbps=0.0, keyframe_step=1.0), EncoderSettings())
    assert eval_tool.points_text(points) == "20:250,24:5:16,22:250:0:1,24:250:11"
    for bad in ("20", "20:250:16:1.1", "20:250:16:2:1", "20:0", "20:250:-1", "x:5"):
        with pytest.raises(argparse.ArgumentTypeError):
            eval_tool.imfc_points(bad)


def test_profile_names_steps_modules_and_ops(tiny_weights, synthetic_video):
    from evaluation.profile import labelled, profile_coding

    model = load_weights(tiny_weights)
    clip = load_clip(synthetic_video, model.cfg.resolution, 4)
    p = profile_coding(model, clip.frames, EncoderSettings(quality_floor=0, max_kbps=0, repeat_keyframe=False))
    names = {r.name for r in p.decode}
    assert {"step: synthesis (IMF_D + IMF_A + D_F)", "module: IMF_A alignment", "step: keyframe codec decode"} <= names
    synthesis = next(r for r in p.decode if r.name.startswith("step: synthesis"))
    assert synthesis.calls == 3 and 0 < synthesis.share <= 1  # one keyframe, three synthesized frames
    assert p.decode_ops and all(r.name.startswith("aten::") for r in p.decode_ops)
    with labelled(model):
        assert "reference" in vars(model)
    assert "reference" not in vars(model) and not model.alignment._forward_hooks  # all undone
