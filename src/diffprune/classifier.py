"""The shipped MNIST digit classifier: the offline feature extractor for domain FID on bundled MNIST.

A small CNN on 1x16x16 digits in [-1, 1]; its 128-d penultimate activations are the FID features. It is
trained by ``tools/train_classifier.py`` on the 9,000-image train split and shipped as safetensors + JSON.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import DiffPruneError, require

CLASSIFIER_WEIGHTS = "model.safetensors"
CLASSIFIER_CONFIG = "config.json"


@dataclass(frozen=True)
class ClassifierConfig:
    input_size: int = 16
    in_channels: int = 1
    width: int = 32
    feature_dim: int = 128
    num_classes: int = 10


class DigitClassifier(nn.Module):
    def __init__(self, config: ClassifierConfig = ClassifierConfig()):
        super().__init__()
        self.config = config
        w = config.width
        self.body = nn.Sequential(
            nn.Conv2d(config.in_channels, w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * w * (config.input_size // 4) ** 2, config.feature_dim), nn.ReLU(),
        )
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(config.feature_dim, config.num_classes)

    @property
    def input_size(self) -> int:
        return self.config.input_size

    @property
    def in_channels(self) -> int:
        return self.config.in_channels

    def _fit(self, x: torch.Tensor) -> torch.Tensor:
        require(x.ndim == 4 and x.shape[1] == self.in_channels,
                f"classifier input must be [N, {self.in_channels}, H, W], got {tuple(x.shape)}")
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", antialias=True,
                              align_corners=False)
        return x

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] in [-1, 1] (resized to ``input_size``) -> [N, feature_dim] penultimate activations."""
        return self.body(self._fit(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))


def save_classifier(model: DigitClassifier, folder: str | Path) -> None:
    from ._fs import write_safetensors

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_safetensors(folder / CLASSIFIER_WEIGHTS,
                      {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()})
    (folder / CLASSIFIER_CONFIG).write_text(json.dumps(asdict(model.config), indent=2) + "\n")


def load_classifier(name_or_path: str | Path = "mnist-classifier") -> DigitClassifier:
    """Load a classifier folder (config.json + model.safetensors) or the shipped ``mnist-classifier``."""
    from safetensors.torch import load_file

    from .assets import shipped_model_path

    folder = shipped_model_path(str(name_or_path)) or Path(name_or_path)
    if not (folder / CLASSIFIER_WEIGHTS).is_file() or not (folder / CLASSIFIER_CONFIG).is_file():
        raise DiffPruneError(f"classifier {str(name_or_path)!r} has no {CLASSIFIER_CONFIG} + {CLASSIFIER_WEIGHTS}; "
                             "pass 'mnist-classifier' or a folder written by save_classifier")
    from ._config import config_from_dict

    config = config_from_dict(ClassifierConfig, json.loads((folder / CLASSIFIER_CONFIG).read_text()),
                              section=str(folder / CLASSIFIER_CONFIG))
    model = DigitClassifier(config)
    model.load_state_dict(load_file(folder / CLASSIFIER_WEIGHTS))
    return model.eval()


def train_classifier(images: torch.Tensor, labels: torch.Tensor, *, epochs: int = 12, batch_size: int = 128,
                     lr: float = 1e-3, seed: int = 0, config: ClassifierConfig = ClassifierConfig(),
                     progress: bool = True) -> DigitClassifier:
    """Train on uint8 images [N, 1, S, S] with ±1-pixel random shifts as augmentation."""
    from tqdm.auto import tqdm

    from .data import to_model_range

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = DigitClassifier(config)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * -(-len(images) // batch_size))
    x_all = to_model_range(images)
    model.train()
    for _ in tqdm(range(epochs), desc="classifier epochs", disable=not progress):
        perm = torch.randperm(len(images), generator=g)
        for i in range(0, len(images), batch_size):
            idx = perm[i:i + batch_size]
            x = F.pad(x_all[idx], (1, 1, 1, 1), value=-1.0)
            dy, dx = torch.randint(0, 3, (2,), generator=g).tolist()
            x = x[:, :, dy:dy + config.input_size, dx:dx + config.input_size]
            loss = F.cross_entropy(model(x), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


@torch.no_grad()
def predict(model: DigitClassifier, x: torch.Tensor, batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels, confidences) for images in [-1, 1]."""
    probs = torch.cat([F.softmax(model(x[i:i + batch_size]), dim=1) for i in range(0, len(x), batch_size)])
    conf, label = probs.max(dim=1)
    return label, conf
