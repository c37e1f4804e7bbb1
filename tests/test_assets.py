import json
import shutil

import pytest
import torch

import diffprune.assets as assets
from diffprune._hashing import file_sha256 as sha256_file
from diffprune.assets import shipped_model_path
from diffprune.classifier import load_classifier, predict
from diffprune.assets import bundled_path
from diffprune.data import load_images, mnist_labels, to_model_range
from diffprune.errors import DiffPruneError


def test_manifest_covers_every_shipped_file():
    root = bundled_path("")
    manifest = json.loads((root / "manifest.json").read_text())
    files = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name != "manifest.json"}
    assert set(manifest) == files
    assert all(sha256_file(root / rel) == digest for rel, digest in manifest.items())


def test_tampered_asset_is_refused(tmp_path, monkeypatch):
    root = tmp_path / "assets"
    shutil.copytree(bundled_path(""), root)
    monkeypatch.setattr(assets, "bundled_path", lambda name: root / name)
    assert shipped_model_path("mnist-classifier") == root / "mnist-classifier"
    weights = root / "mnist-classifier" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    with pytest.raises(DiffPruneError, match="sha256 differs from the manifest"):
        shipped_model_path("mnist-classifier")
    assert shipped_model_path("not-shipped") is None


def test_shipped_classifier_accuracy():
    x = to_model_range(load_images("mnist", resolution=16, channels=1, split="test"))
    labels, conf = predict(load_classifier("mnist-classifier"), x)
    acc = (labels == mnist_labels("test")).float().mean().item()
    recorded = json.loads((bundled_path("mnist-classifier") / "metrics.json").read_text())["test_accuracy"]
    assert acc >= 0.98 and acc == pytest.approx(recorded, abs=1e-6)
    assert conf.shape == (1000,) and torch.all((conf > 0) & (conf <= 1))


def test_classifier_folder_with_an_unknown_config_key_is_refused(tmp_path):
    shutil.copytree(bundled_path("mnist-classifier"), tmp_path / "clf")
    cfg = json.loads((tmp_path / "clf" / "config.json").read_text()) | {"widht": 32}
    (tmp_path / "clf" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(DiffPruneError, match=r"unknown key .*clf/config.json.widht; allowed: \['feature_dim', "):
        load_classifier(tmp_path / "clf")
