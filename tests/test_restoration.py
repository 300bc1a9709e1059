"""The decoder's restoration of AV1 references (format 8): what it shows, what it keeps, its training."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from codec.files import decode_file, encode_file, read_bitstream
from codec.nn.model import build_model
from codec.nn.restoration import Restoration
from codec.nn.weights import load_weights, model_id
from codec.pipeline import Encoder, EncoderSettings, pack_token_runs
from codec.video_io import to_uint8
from entropy.bitstream import RESTORATION_SINCE, BitstreamError, ChunkType, Header, read_file, write_stream
from train import restoration as train_restoration
from tests.conftest import moving_square_clip
from tests.test_av1_references import model_frames

AV1 = EncoderSettings(keyframe_codec="av1", reference_interval=4, av1_crf=50, restore=True)


def test_a_fresh_restoration_is_the_identity_and_every_layer_learns():
    torch.manual_seed(0)
    net = Restoration(8, 2)
    x, y = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    assert torch.equal(net(x), x)
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    for _ in range(2):  # the zero tail passes no gradient back on the first step
        opt.zero_grad()
        (net(x) - y).abs().mean().backward()
        opt.step()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


def test_references_and_their_repeats_show_the_restored_picture(restoring_weights, synthetic_video):
    model = load_weights(restoring_weights)
    encoder = Encoder(model, replace(AV1, lmbda=1e9))  # every frame between references a repeat
    frames = model_frames(synthetic_video, model.cfg.resolution)
    encoded = [encoder.encode(frames[0])]
    assert torch.equal(encoded[0].x_hat, encoder.state.picture)  # an intra picture is shown as decoded
    encoded += [encoder.encode(x) for x in frames[1:]]
    encoder.close()
    assert [e.chunk.type for e in encoded[:4]] == [ChunkType.AV1_REFERENCES] + [ChunkType.REPEAT] * 3
    picture = encoder.state.picture  # the newest reference as decoded: what both sides predict from
    assert not torch.equal(encoded[-1].x_hat, picture)
    assert torch.equal(encoded[-1].x_hat, torch.round(model.restoration(picture).clamp(0, 1) * 255) / 255)
    assert all(torch.equal(encoded[i].x_hat, encoded[8].x_hat) for i in range(9, len(encoded)))


def test_older_formats_decode_unrestored_by_a_model_that_gained_a_restoration(tiny_weights, synthetic_video,
                                                                             tmp_path):
    """A format 7 file of the tiny model decodes with the tiny model plus a restoration, frame for frame
    as without it; a format 8 file names the whole model, so the model without it is refused."""
    core = load_weights(tiny_weights)
    encoder = Encoder(core, AV1)
    encoded = [encoder.encode(x) for x in model_frames(synthetic_video, core.cfg.resolution)]
    encoder.close()
    r = core.cfg.resolution
    header = Header("tiny", model_id(core), r, r, 25, 1, len(encoded), AV1.bank_size, r, r, 0, 0, r, version=7)
    old = tmp_path / "old.imfc"
    old.write_bytes(write_stream(header, pack_token_runs(core, [e.chunk for e in encoded], version=7)))

    gained = build_model(replace(core.cfg, restoration=(8, 2)))
    gained.load_state_dict(core.state_dict(), strict=False)
    with torch.no_grad():
        for p in gained.restoration.parameters():
            p.normal_(0, 0.05)
    assert model_id(gained, RESTORATION_SINCE - 1) == model_id(core) != model_id(gained)
    decode_file(old, tmp_path / "old", gained.eval(), progress=False)
    decoded = [np.array(Image.open(p)) for p in sorted((tmp_path / "old").glob("*.png"))]
    assert all(np.array_equal(a, to_uint8(e.x_hat)) for a, e in zip(decoded, encoded))

    new = tmp_path / "new.imfc"
    new.write_bytes(write_stream(replace(header, version=RESTORATION_SINCE), pack_token_runs(core, [e.chunk for e in encoded])))
    with pytest.raises(BitstreamError, match="made by another model"):
        read_bitstream(new, gained)
    with pytest.raises(BitstreamError, match="has no restoration"):  # a format 8 header that lies
        read_bitstream(new, core)


def test_the_encoder_restores_only_its_coarsest_references_and_writes_the_oldest_format_that_holds_them(
        restoring_weights, tiny_weights, synthetic_video, tmp_path):
    model, core = load_weights(restoring_weights), load_weights(tiny_weights)
    at = lambda m, **kw: Encoder(m, EncoderSettings(keyframe_codec="av1", **kw)).restore
    assert at(model, kbps=3) and not at(model, kbps=8) and not at(model, reference_interval=4)
    assert at(model, kbps=8, restore=True) and not at(model, kbps=3, restore=False) and not at(core, kbps=3)
    for settings, version in ((AV1, RESTORATION_SINCE), (replace(AV1, restore=False), RESTORATION_SINCE - 1),
                              (EncoderSettings(quality_floor=0), 4)):
        path = tmp_path / f"{version}.imfc"
        encode_file(synthetic_video, path, model, settings, progress=False)
        header, _ = read_bitstream(path, model)  # the model id of its format
        assert header.version == version
        decode_file(path, tmp_path / f"{version}", model, progress=False)


def test_attach_adds_a_trained_restoration_and_keeps_the_models_own_tensors(tiny_weights, tmp_path):
    torch.manual_seed(2)
    run = tmp_path / "run"
    run.mkdir()
    net = Restoration(8, 3)
    save_file({k: v.normal_(0, 0.1).contiguous() for k, v in net.state_dict().items()}, str(run / "restoration.safetensors"))
    out = tmp_path / "with.safetensors"
    train_restoration.main(["attach", str(run), str(tiny_weights), "--to", str(out)])
    core, gained = load_weights(tiny_weights), load_weights(out)
    assert gained.cfg.restoration == (8, 3)
    assert model_id(gained, RESTORATION_SINCE - 1) == model_id(core)
    x = torch.rand(1, 3, 16, 16)
    assert torch.allclose(gained.restoration(x), net.half().float()(x), atol=1e-6)


def test_training_runs_validates_and_resumes(tmp_path):
    """Two tiny clips (one to train on, one to validate on) with AV1 references of every 4th frame."""
    cache, refs = tmp_path / "cache", tmp_path / "refs"
    cache.mkdir(), refs.mkdir()
    for name in ("a", "b"):
        frames = np.stack(moving_square_clip(12, 64))
        np.save(cache / f"{name}.npy", frames)
        indices = [0, 4, 8]
        np.save(refs / f"{name}_crf63.npy", np.clip(frames[indices].astype(int) + 3, 0, 255).astype(np.uint8))
        (refs / f"{name}_crf63.json").write_text(json.dumps({"clip": name, "crf": 63, "every": 4, "indices": indices,
                                                             "bytes": 0, "intra_offset": -32}))
    (tmp_path / "split.json").write_text(json.dumps({"train": ["a"], "val": ["b"]}))
    run = tmp_path / "run"
    args = ["train", str(cache), "--refs", str(refs), "--out", str(run), "--split", str(tmp_path / "split.json"),
            "--channels", "8", "--layers", "2", "--val-every", "1", "--max-distance", "3"]
    train_restoration.main(args + ["--steps", "2"])
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [0, 1, 2] and set(log[-1]["val"]) == {"d0", "d1", "d2", "d3"}
    train_restoration.main(args + ["--steps", "3", "--loss", "ms-ssim"])
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [0, 1, 2, 3]


def test_encode_cli_restores_on_request(restoring_weights, synthetic_video, tmp_path):
    from tools import encode
    for choice, version in (("on", RESTORATION_SINCE), ("auto", RESTORATION_SINCE - 1)):  # auto: the default 8 kbps
        path = tmp_path / f"{choice}.imfc"
        assert encode.main([str(synthetic_video), "-o", str(path), "--weights", str(restoring_weights), "-q",
                            "--restore", choice]) == 0
        assert read_file(path)[0].version == version
