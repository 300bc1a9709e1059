from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import settings

# Every run of the suite draws the same examples: hypothesis derives them from each test's name
# (derandomize) instead of a fresh seed, keeps no example database between runs, and has no
# per-example deadline (a slow machine must not fail a test). No test depends on chance or timing.
settings.register_profile("deterministic", derandomize=True, database=None, deadline=None)
settings.load_profile("deterministic")

SHARED_VIDEOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "videos"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)


@pytest.fixture
def shared_clip() -> Path:
    """A short real talking-head clip from ../shared/data/videos (skipped where the corpus is absent)."""
    path = SHARED_VIDEOS / "edtalk_mouth_source.mp4"
    if not path.exists():
        pytest.skip(f"shared video corpus not found at {SHARED_VIDEOS}")
    return path


def moving_square_clip(frames: int, size: int, seed: int = 0) -> np.ndarray:
    """(T, S, S, 3) uint8: a textured square drifting over a gradient background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    background = np.stack([xx, yy, (xx + yy) // 2], -1) * (200 / size)
    patch = rng.integers(40, 255, size=(size // 3, size // 3, 3))
    out = []
    for t in range(frames):
        img = background.copy()
        oy, ox = size // 4 + t % 5, size // 4 + (2 * t) % 7
        img[oy:oy + size // 3, ox:ox + size // 3] = patch
        out.append(img)
    return np.array(out).clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> Path:
    """An untrained tiny model with its coder tables built, saved like a shipped model."""
    from codec.nn.config import get_config
    from codec.nn.model import build_model
    from codec.nn.weights import save_weights

    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_weights(build_model(get_config("tiny")), path)
    return path


@pytest.fixture(scope="session")
def restoring_weights(tmp_path_factory) -> Path:
    """The tiny model with a restoration that visibly changes a picture (trained ones start as the identity)."""
    from codec.nn.config import get_config
    from codec.nn.model import build_model
    from codec.nn.weights import save_weights

    torch.manual_seed(1)
    model = build_model(get_config("tiny", restoration=(8, 2)))
    with torch.no_grad():
        for p in model.restoration.parameters():
            p.normal_(0, 0.05)
    path = tmp_path_factory.mktemp("weights") / "restoring.safetensors"
    save_weights(model, path)
    return path


# The streaming tests' model and clip (tests/test_streaming.py, tests/test_streaming_av1.py); a
# module that defines its own fixture of the same name uses that one.
@pytest.fixture(scope="module")
def model(tiny_weights):
    from codec.nn.weights import load_weights

    return load_weights(tiny_weights)


@pytest.fixture(scope="module")
def frames():
    from codec.video_io import to_tensor

    return [to_tensor(f) for f in moving_square_clip(40, 64)]


@pytest.fixture(scope="session")
def synthetic_video(tmp_path_factory) -> Path:
    """A 12-frame 80x64 mp4 of a drifting textured square."""
    from fractions import Fraction

    from codec.video_io import FrameWriter

    path = tmp_path_factory.mktemp("video") / "square.mp4"
    writer = FrameWriter(path, Fraction(25))
    for frame in moving_square_clip(12, 80):
        writer.write(frame[8:72])  # 80 wide, 64 high: not square
    writer.close()
    return path


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tests run single-threaded: reproducible, and they leave a core to other work."""
    torch.set_num_threads(1)
