"""The training pack and the training burst that runs from it (train/pack.py, train/burst.py)."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from codec.av1_reference import Quantizer, ReferenceEncoder
from codec.nn.weights import load_weights
from codec.video_io import read_frames
from tests.conftest import moving_square_clip
from train import burst
from train.av1_refs import refs_path
from train.data import Av1RefCache, ClipCache, Split
from train.pack import build, unpack


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    root = tmp_path_factory.mktemp("pack")
    cache = root / "cache"
    cache.mkdir()
    for i, name in enumerate(["a", "b", "c"]):
        np.save(cache / f"{name}.npy", moving_square_clip(40, 64, seed=i))
        (cache / f"{name}.json").write_text(json.dumps({"name": name, "fps": 25.0}))
    size = build(cache, root / "pack", Split(("a", "b"), ("c",)), frames=30, progress=False)
    return root / "pack", size


def test_pack_unpacks_to_a_cache_and_the_codecs_own_references(pack, tmp_path):
    pack_dir, size = pack
    assert size == sum(p.stat().st_size for p in pack_dir.iterdir())
    split = unpack(pack_dir, tmp_path / "cache", tmp_path / "refs")
    assert split == Split(("a", "b"), ("c",))
    clips = ClipCache(tmp_path / "cache", split.train + split.val)
    assert [len(c) for c in clips.clips] == [30, 30, 30]
    refs = Av1RefCache(tmp_path / "refs", split.train + split.val)
    assert refs.crfs == (50, 58, 63) and list(refs.indices[0]) == [0, 6, 12, 18, 24]
    # the pictures are what the coding path's encoder holds for the packed frames
    frames = np.array(list(read_frames(pack_dir / "a.mp4")))
    encoder = ReferenceEncoder(64, 25 / 6, Quantizer(58))
    held = [encoder.code(frames[i], intra=i == 0)[1] for i in range(0, 30, 6)]
    encoder.close()
    assert np.array_equal(np.load(refs_path(tmp_path / "refs", "a", 58)), np.stack(held))


def test_burst_trains_for_its_budget_and_writes_weights(pack, tiny_weights, tmp_path):
    """A budget spent before the first step ends: the step, then the weights, the logs, no frames."""
    pack_dir, _ = pack
    out = tmp_path / "burst"
    assert burst.main(["--pack", str(pack_dir), "--out", str(out), "--minutes", "0.001", "--init", str(tiny_weights),
                       "--preset", "tiny", "--batch-size", "2"]) == 0
    info = json.loads((out / "burst.json").read_text())
    assert info["steps"] >= 1 and info["config"]["max_minutes"] > 0  # how many more is the clock's business
    model = load_weights(out / "default.safetensors")
    before = load_file(tiny_weights)
    assert any(not torch.equal(t.float(), before[k].float()) for k, t in load_file(out / "default.safetensors").items()
               if k in before and t.is_floating_point())
    assert model.cfg.name == "tiny"
    assert (out / "run" / "val.csv").exists() and not (out / "data").exists() and not (out / "av1refs").exists()


def test_burst_refuses_a_folder_that_is_not_a_pack(tmp_path):
    with pytest.raises(SystemExit):
        burst.main(["--pack", str(tmp_path), "--out", str(tmp_path / "out")])
