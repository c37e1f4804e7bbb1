import numpy as np
import pytest
import torch
from PIL import Image

from diffprune.data import fit_images, load_images, mnist_labels, to_model_range, to_uint8
from diffprune.errors import DiffPruneError


def test_bundled_mnist_split_and_fit():
    train = load_images("mnist", resolution=16, channels=1, split="train")
    test = load_images("mnist", resolution=16, channels=1, split="test")
    assert train.shape == (9000, 1, 16, 16) and test.shape == (1000, 1, 16, 16)
    assert train.dtype == torch.uint8
    assert mnist_labels("train").shape == (9000,) and set(mnist_labels("test").tolist()) == set(range(10))
    padded = load_images("mnist", resolution=32, channels=1, split="test", limit=5)
    raw = load_images("mnist", resolution=28, channels=1, split="test", limit=5)
    assert padded.shape == (5, 1, 32, 32)
    assert torch.equal(padded[:, :, 2:30, 2:30], raw) and padded[:, :, :2].sum() == 0


def test_range_round_trip():
    x = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    y = to_model_range(x)
    assert y.min() == -1 and y.max() == 1
    assert torch.equal(to_uint8(y), x)


def test_channel_conversion_and_bad_channels():
    grey = torch.full((2, 1, 8, 8), 100, dtype=torch.uint8)
    assert fit_images(grey, 8, 3).shape == (2, 3, 8, 8)
    rgb = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    rgb[:, 0] = 255
    assert fit_images(rgb, 8, 1)[0, 0, 0, 0].item() == 76  # 0.299 * 255
    with pytest.raises(DiffPruneError, match="2 channels but the model takes 1"):
        fit_images(torch.zeros(1, 2, 8, 8, dtype=torch.uint8), 8, 1)


def test_folder_loader(tmp_path):
    for i in range(3):
        Image.fromarray(np.full((10, 12, 3), 40 * i, dtype=np.uint8)).save(tmp_path / f"sub{i}.png")
    (tmp_path / "nested").mkdir()
    Image.fromarray(np.zeros((10, 12, 3), dtype=np.uint8)).save(tmp_path / "nested" / "x.jpg")
    x = load_images(tmp_path, resolution=8, channels=3)
    assert x.shape == (4, 3, 8, 8)


def test_folder_errors(tmp_path):
    with pytest.raises(DiffPruneError, match="holds no images"):
        load_images(tmp_path, resolution=8, channels=1)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(DiffPruneError, match="broken.png"):
        load_images(tmp_path, resolution=8, channels=1)


def test_unknown_data_lists_choices():
    with pytest.raises(DiffPruneError, match=r"not a folder, nor one of \['digits', 'mnist'\]"):
        load_images("no-such-thing", resolution=8, channels=1)


def test_optional_sources_give_install_hints():
    try:
        import sklearn  # noqa: F401
    except ImportError:
        with pytest.raises(DiffPruneError, match=r"pip install 'diffprune\[digits\]'"):
            load_images("digits", resolution=8, channels=1)
    else:
        assert load_images("digits", resolution=8, channels=1).shape == (1618, 1, 8, 8)
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(DiffPruneError, match=r"pip install 'diffprune\[datasets\]'"):
            load_images("someone/some-images", resolution=8, channels=1)
