"""The shipped default model: loads offline, codes with its stored tables, decodes a real clip."""

import pytest
import torch

from codec.nn.config import get_config
from codec.files import decode_file, encode_file
from codec.pipeline import EncoderSettings
from codec.video_io import read_frames
from codec.nn.weights import DEFAULT_WEIGHTS, load_weights, model_id


def test_default_weights_load_with_coder_tables():
    model = load_weights()
    assert model.cfg == get_config("default")
    assert model.token_prior._offset.numel() == model.cfg.token_dim  # CDF tables came with the file
    assert DEFAULT_WEIGHTS.stat().st_size < 20e6
    assert model_id(model) == model_id(load_weights())


@pytest.mark.slow
def test_default_model_round_trip_on_a_real_clip(shared_clip, tmp_path):
    torch.set_num_threads(2)
    model = load_weights()
    stream = tmp_path / "clip.imfc"
    s = encode_file(shared_clip, stream, model, EncoderSettings(), max_frames=8, progress=False)
    assert s.frames == 8 and s.keyframes >= 1 and s.psnr > 15
    decode_file(stream, tmp_path / "clip.mp4", model, progress=False)
    assert len(list(read_frames(tmp_path / "clip.mp4"))) == 8
