"""Evaluation metrics: feature extractors -> feature statistics -> pure metric functions.

* :func:`frechet_distance` is the Fréchet distance between two Gaussians, computed as pytorch-fid does
  (``scipy.linalg.sqrtm`` of the covariance product, with its ``eps`` diagonal fallback when the product is
  singular), so Inception-FID values are comparable with pytorch-fid's.
* :data:`EXTRACTORS` names the feature extractors. ``mnist-classifier`` (the shipped digit classifier's 128-d
  penultimate features; offline; the default for bundled MNIST) and ``inception`` (pytorch-fid's InceptionV3
  2048-d pool features with the TF-ported ``pt_inception-2015-12-05`` weights; needs ``diffprune[inception]``).
* :func:`paired_consistency` compares teacher and student images generated from the same seeds: SSIM, MS-SSIM
  (only where the image is large enough) and MSE, through pytorch-msssim.
* :func:`reference_statistics` caches a data set's feature statistics under a key made of everything that changes
  them (:func:`stats_cache_key`), through the one verified cache (:mod:`diffprune._cache`; safetensors, never
  pickles).

Sample sets and their folders are :mod:`diffprune.samples`.

Images enter every function as uint8 ``[N, C, H, W]``.
"""
from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ._cache import cache_dir, cached
from ._hashing import content_sha256, file_sha256, json_sha256
from ._torch import eval_mode
from .errors import DiffPruneError, require
from .registry import Registry

__all__ = [
    "EXTRACTORS", "FeatureExtractor", "FeatureStats", "INCEPTION_WEIGHTS_NAME", "cache_dir", "class_accuracy",
    "compute_features", "feature_statistics", "frechet_distance", "fid_from_features", "load_extractor",
    "paired_consistency", "reference_statistics", "resolve_inception_weights", "stats_cache_key",
]

STATS_FORMAT = 1  # bump when the way statistics are computed changes: old cache entries then stop matching
INCEPTION_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_INSTALL_HINT = ("the 'inception' extractor needs pytorch-fid (and a torchvision matching your torch): "
                          "pip install 'diffprune[inception]'; offline, use --extractor mnist-classifier for MNIST")


# --- Fréchet distance ------------------------------------------------------------------------------------------

def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """d² = ‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2 (Σ₁ Σ₂)^½), as pytorch-fid's ``calculate_frechet_distance``.

    If the product is singular (``sqrtm`` not finite), ``eps`` is added to both diagonals; a small imaginary part
    from numerical error is dropped, a large one raises.
    """
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    require(mu1.shape == mu2.shape, f"mean vectors differ in length: {mu1.shape} vs {mu2.shape}")
    require(sigma1.shape == sigma2.shape, f"covariances differ in shape: {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns on near-singular products; handled below
        covmean = linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise DiffPruneError(f"Fréchet distance: sqrtm has an imaginary component "
                                 f"{np.max(np.abs(covmean.imag)):.3g} (near-singular covariances); use more images "
                                 "than feature dimensions, or a larger eps")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


@dataclass(frozen=True)
class FeatureStats:
    """Mean and covariance (float64) of ``n`` feature vectors."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int


def feature_statistics(features) -> FeatureStats:
    """Mean and unbiased covariance of features ``[N, D]`` (N >= 2)."""
    f = features.detach().cpu().double().numpy() if isinstance(features, torch.Tensor) else np.asarray(features, np.float64)
    require(f.ndim == 2 and f.shape[0] >= 2, f"features must be [N >= 2, D], got shape {f.shape}; use more images")
    return FeatureStats(mu=f.mean(axis=0), sigma=np.atleast_2d(np.cov(f, rowvar=False)), n=int(f.shape[0]))


def fid_from_features(a, b) -> float:
    """Fréchet distance between the Gaussians fitted to two feature sets."""
    sa, sb = feature_statistics(a), feature_statistics(b)
    return frechet_distance(sa.mu, sa.sigma, sb.mu, sb.sigma)


# --- feature extractors ----------------------------------------------------------------------------------------

@dataclass
class FeatureExtractor:
    """A feature network and what identifies its output: ``name``, ``weights_sha256``, ``preprocessing``."""

    name: str
    module: torch.nn.Module
    dim: int
    weights_sha256: str
    preprocessing: str
    transform: Callable[[torch.Tensor], torch.Tensor]  # uint8 [N, C, H, W] -> the module's input (float)
    forward: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]  # (module, input) -> [N, dim]

    def to(self, device) -> "FeatureExtractor":
        self.module.to(device)
        return self

    def identity(self) -> dict:
        return {"extractor": self.name, "weights_sha256": self.weights_sha256, "preprocessing": self.preprocessing,
                "dim": self.dim}


EXTRACTORS: Registry[Callable[..., FeatureExtractor]] = Registry("feature extractor")


def load_extractor(name: str, weights: str | os.PathLike | None = None, *, cache: str | os.PathLike | None = None
                   ) -> FeatureExtractor:
    """Build a registered extractor on the CPU (move it with ``.to(device)``). ``weights``: a file or folder."""
    return EXTRACTORS.get(name)(weights=weights, cache=cache)


@EXTRACTORS.register("mnist-classifier")
def _mnist_classifier(weights=None, cache=None) -> FeatureExtractor:
    """Penultimate (128-d) features of the shipped digit classifier; ``weights``: a classifier folder."""
    from .classifier import CLASSIFIER_WEIGHTS, load_classifier
    from .data import to_grey, to_model_range

    source = "mnist-classifier" if weights is None else str(weights)
    model = load_classifier(source)
    from .assets import shipped_model_path

    folder = shipped_model_path(source) or Path(source)
    dim = int(model.config.feature_dim)
    return FeatureExtractor(
        name="mnist-classifier", module=model, dim=dim, weights_sha256=file_sha256(folder / CLASSIFIER_WEIGHTS),
        preprocessing=f"uint8->[-1,1]; RGB->grey (BT.601); bilinear antialias resize to {model.input_size}",
        transform=lambda x: to_grey(to_model_range(x)),
        forward=lambda m, x: m.features(x),
    )


def resolve_inception_weights(weights: str | os.PathLike | None = None) -> Path:
    """The ``pt_inception-2015-12-05`` weights file: ``weights`` if given, else pytorch-fid's download cache.

    pytorch-fid downloads the file once into torch's hub cache (``$TORCH_HOME/hub/checkpoints``); offline, with
    neither, this raises a :class:`DiffPruneError` that says how to supply the file.
    """
    if weights is not None:
        p = Path(weights)
        require(p.is_file(), f"inception weights {str(p)!r} do not exist; pass the path of {INCEPTION_WEIGHTS_NAME} "
                             "(or a .safetensors copy of it) with --inception-weights")
        return p
    downloaded = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_NAME
    if downloaded.is_file():
        return downloaded
    raise DiffPruneError(
        f"Inception FID weights not found: no --inception-weights given and no {str(downloaded)!r}; download "
        f"{INCEPTION_WEIGHTS_NAME} from pytorch-fid's GitHub release 'fid_weights' on a connected machine and pass "
        f"it with --inception-weights FILE (or copy it to {str(downloaded.parent)!r}); offline on MNIST, use "
        "--extractor mnist-classifier"
    )


def _load_state_dict(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a pickle of anything but tensors is refused by weights_only
        raise DiffPruneError(f"cannot load inception weights {str(path)!r} as a plain state dict ({e}); "
                             "pass the original pt_inception-2015-12-05 .pth or a .safetensors file") from None
    require(isinstance(state, dict), f"inception weights {str(path)!r} hold {type(state).__name__}, not a state dict")
    return state


@EXTRACTORS.register("inception")
def _inception(weights=None, cache=None) -> FeatureExtractor:
    """pytorch-fid's InceptionV3, 2048-d pool3 features, with the TF-ported FID weights."""
    try:
        from pytorch_fid import inception as pfi
    except Exception:  # ImportError, or torchvision failing to import beside this torch
        raise DiffPruneError(INCEPTION_INSTALL_HINT) from None
    path = resolve_inception_weights(weights)
    state = _load_state_dict(path)
    # pytorch-fid's FID Inception fetches its weights through ``load_state_dict_from_url``; hand it the state dict
    # we loaded (weights_only) instead, so nothing is downloaded and the user's file is what runs.
    original = pfi.load_state_dict_from_url
    pfi.load_state_dict_from_url = lambda *a, **k: state
    try:
        model = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]], resize_input=True, normalize_input=True,
                                use_fid_inception=True)
    except RuntimeError as e:
        raise DiffPruneError(f"inception weights {str(path)!r} do not fit pytorch-fid's FID Inception ({e}); "
                             f"pass {INCEPTION_WEIGHTS_NAME}") from None
    finally:
        pfi.load_state_dict_from_url = original
    return FeatureExtractor(
        name="inception", module=model.eval(), dim=2048, weights_sha256=file_sha256(path),
        preprocessing="uint8->[0,1]; grey->RGB; pytorch-fid InceptionV3 (bilinear resize to 299, [0,1]->[-1,1])",
        transform=lambda x: (x.float() / 255.0).expand(-1, 3, -1, -1) if x.shape[1] == 1 else x.float() / 255.0,
        forward=lambda m, x: m(x)[0].flatten(1),
    )


@torch.no_grad()
def compute_features(extractor: FeatureExtractor, images: torch.Tensor, *, batch_size: int = 256,
                     device=None) -> np.ndarray:
    """Features ``[N, dim]`` (float64) of uint8 images ``[N, C, H, W]``; runs on ``device`` (default: CPU)."""
    require(images.dtype == torch.uint8 and images.ndim == 4, f"images must be uint8 [N, C, H, W], got "
                                                               f"{images.dtype} {tuple(images.shape)}")
    module = extractor.module
    dev = torch.device(device) if device is not None else next(module.parameters()).device
    out = []
    with eval_mode(module):
        for i in range(0, len(images), batch_size):
            x = extractor.transform(images[i:i + batch_size].to(dev))
            out.append(extractor.forward(module, x).double().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, extractor.dim))


# --- class-conditional models: does the sample show the class that was asked for? -----------------------------

def class_accuracy(images: torch.Tensor, requested: torch.Tensor, classifier, *, num_classes: int,
                   threshold: float = 0.9) -> dict:
    """Agreement between requested and classified labels of uint8 images ``[N, C, H, W]``.

    ``accuracy``: share classified as requested; ``confident_accuracy``: share classified as requested with
    confidence >= ``threshold``; ``per_class``: accuracy of each requested class (None where it was not requested).
    """
    from .classifier import predict
    from .data import to_grey, to_model_range

    requested = torch.as_tensor(requested, dtype=torch.long)
    require(len(requested) == len(images), f"{len(images)} images but {len(requested)} requested labels")
    label, conf = predict(classifier, to_grey(to_model_range(images)))
    ok = label == requested
    per_class = [float(ok[requested == c].float().mean()) if bool((requested == c).any()) else None
                 for c in range(num_classes)]
    return {"accuracy": float(ok.float().mean()), "confident_accuracy": float((ok & (conf >= threshold)).float().mean()),
            "per_class": per_class, "threshold": threshold, "n": len(images)}


# --- text-to-image models: does the sample show what the prompt says? ---------------------------------------------

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's image normalisation (OpenAI)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def load_clip(folder: str | os.PathLike):
    """``(CLIPModel, tokenizer)`` from a local folder holding a transformers ``CLIPModel`` (``model.safetensors``)
    and its tokenizer, e.g. a copy of openai/clip-vit-large-patch14. Never downloads."""
    from .components import require_transformers

    folder = Path(folder)
    require(folder.is_dir() and (folder / "config.json").is_file(),
            f"CLIP model {str(folder)!r} is not a local transformers model folder (config.json); CLIP score needs "
            "its weights on disk: download a CLIP model (e.g. openai/clip-vit-large-patch14) once and pass its folder")
    require((folder / "model.safetensors").is_file(),
            f"{str(folder)!r} has no model.safetensors; diffprune never loads pickles (save it with "
            "safe_serialization=True)")
    transformers = require_transformers()
    try:
        kind = type(transformers.AutoConfig.from_pretrained(folder, local_files_only=True)).__name__
    except (OSError, ValueError, KeyError):
        kind = "unknown"
    require(kind == "CLIPConfig", f"{str(folder)!r} does not hold a CLIP model (its config.json is a {kind}); pass a "
                                  "CLIP model folder with its tokenizer (--clip-model)")
    require((folder / "tokenizer.json").is_file() or ((folder / "vocab.json").is_file() and (folder / "merges.txt")
                                                       .is_file()),
            f"{str(folder)!r} has no tokenizer files (tokenizer.json, or vocab.json and merges.txt); transformers would "
            "build an empty tokenizer and score every prompt alike: save the CLIP model's tokenizer beside it")
    try:
        model = transformers.CLIPModel.from_pretrained(folder, use_safetensors=True, local_files_only=True)
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise DiffPruneError(f"cannot load a CLIP model and its tokenizer from {str(folder)!r} ({first}); pass a "
                             "folder saved by CLIPModel.save_pretrained with its tokenizer files") from None
    return model.eval().requires_grad_(False), tokenizer


@torch.no_grad()
def clip_score(images: torch.Tensor, prompts: Sequence[str], clip, *, batch_size: int = 64) -> dict:
    """CLIP score of uint8 images ``[N, C, H, W]`` against their prompts: ``100 * max(cos(image, text), 0)``
    averaged (Hessel et al. 2021, as torchmetrics' ``CLIPScore``). ``clip``: :func:`load_clip`'s pair. Images are
    resized (bicubic) to the model's input size and normalised with CLIP's mean and std; prompts are truncated to
    the tokenizer's length."""
    import torch.nn.functional as F

    model, tokenizer = clip
    require(len(prompts) == len(images), f"{len(images)} images but {len(prompts)} prompts")
    p = next(model.parameters())
    size = int(model.config.vision_config.image_size)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    scores = []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].float() / 255
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
        tok = tokenizer(list(prompts[i:i + batch_size]), padding=True, truncation=True, return_tensors="pt")
        img = model.get_image_features(pixel_values=((x - mean) / std).to(p.device, p.dtype))
        txt = model.get_text_features(input_ids=tok.input_ids.to(p.device),
                                      attention_mask=tok.attention_mask.to(p.device))
        img, txt = (getattr(f, "pooler_output", f) for f in (img, txt))
        scores.append((100 * F.cosine_similarity(img.float(), txt.float()).clamp(min=0)).cpu())
    per_image = torch.cat(scores)
    return {"clip_score": float(per_image.mean()), "n": len(per_image), "per_image": per_image.tolist()}


# --- reference statistics, cached ------------------------------------------------------------------------------

def stats_cache_key(*, dataset: str, split: str, count: int, resolution: int, channels: int, data_sha256: str,
                    extractor: str, weights_sha256: str, preprocessing: str) -> str:
    """A hash of everything that changes a data set's feature statistics (never just a folder name)."""
    fields = dict(format=STATS_FORMAT, dataset=dataset, split=split, count=int(count), resolution=int(resolution),
                  channels=int(channels), data_sha256=data_sha256, extractor=extractor,
                  weights_sha256=weights_sha256, preprocessing=preprocessing)
    return json_sha256(fields)


def _stats_check(dim: int) -> Callable[[dict], str | None]:
    """What a cached entry must be to stand for ``dim``-wide features: ``mu`` ``[dim]``, ``sigma`` ``[dim, dim]``,
    both float64 and finite (the cache's checksum finds damage; this finds an entry that was never right)."""
    def check(t: dict) -> str | None:
        mu, sigma = t.get("mu"), t.get("sigma")
        if mu is None or sigma is None or tuple(mu.shape) != (dim,) or tuple(sigma.shape) != (dim, dim):
            return f"it holds no mean [{dim}] and covariance [{dim}, {dim}]"
        if mu.dtype != torch.float64 or sigma.dtype != torch.float64:
            return "its statistics are not float64"
        return None if bool(torch.isfinite(mu).all() and torch.isfinite(sigma).all()) else "its statistics are not finite"

    return check


def reference_statistics(images: torch.Tensor, extractor: FeatureExtractor, *, dataset: str, split: str,
                         cache: str | os.PathLike | None = None, batch_size: int = 256, device=None,
                         use_cache: bool = True) -> tuple[FeatureStats, dict]:
    """Feature statistics of reference images (uint8 ``[N, C, H, W]``), read from or written to the cache.

    The key covers the data's name, split, count, resolution, channels and content hash, the extractor, its
    weights' sha256 and its preprocessing. Returns ``(stats, info)``; ``info`` says the key, file and cache hit
    (and ``replaced``: why a damaged entry was computed again).
    """
    n, c, h, _ = images.shape
    fields = dict(dataset=str(dataset), split=str(split), count=n, resolution=h, channels=c,
                  data_sha256=content_sha256(images), extractor=extractor.name,
                  weights_sha256=extractor.weights_sha256, preprocessing=extractor.preprocessing)
    key = stats_cache_key(**fields)
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{dataset}-{split}")[-40:]

    def compute() -> dict:
        stats = feature_statistics(compute_features(extractor, images, batch_size=batch_size, device=device))
        return {"mu": torch.from_numpy(stats.mu), "sigma": torch.from_numpy(stats.sigma)}

    t, info = cached("fid-stats", key, compute, root=cache, name=f"{extractor.name}-{slug}-{n}-{key[:20]}",
                     check=_stats_check(extractor.dim), enabled=use_cache)
    return FeatureStats(mu=t["mu"].numpy(), sigma=t["sigma"].numpy(), n=n), {**info, **fields}


# --- paired consistency ----------------------------------------------------------------------------------------

def _ssim_window(size: int) -> int:
    """pytorch-msssim's 11-px Gaussian window, shrunk to the largest odd size that fits smaller images."""
    return 11 if size >= 11 else max(1, size - 1 if size % 2 == 0 else size)


def paired_consistency(teacher: torch.Tensor, student: torch.Tensor) -> dict:
    """SSIM, MS-SSIM (where the size allows) and MSE between paired uint8 images ``[N, C, H, W]``.

    SSIM/MS-SSIM use pytorch-msssim with data_range 255; MS-SSIM's 5 scales need the smaller side to exceed
    ``(win_size - 1) * 2**4`` (160 px at the standard 11-px window), otherwise it is ``None`` and ``ms_ssim_note``
    says why. MSE is over pixels in [0, 1].
    """
    from pytorch_msssim import ms_ssim, ssim

    require(teacher.shape == student.shape, f"paired images differ in shape: {tuple(teacher.shape)} vs "
                                            f"{tuple(student.shape)}")
    require(teacher.ndim == 4 and len(teacher) > 0, f"need paired images [N, C, H, W], got {tuple(teacher.shape)}")
    x, y = teacher.double(), student.double()
    side = min(x.shape[-2:])
    win = _ssim_window(side)
    per_image = ssim(x, y, data_range=255, size_average=False, win_size=win)
    mse = ((x - y) / 255).pow(2).flatten(1).mean(1)
    out = {"ssim": float(per_image.mean()), "ssim_std": float(per_image.std()) if len(x) > 1 else 0.0,
           "ssim_win_size": win, "mse": float(mse.mean()), "pairs": len(x)}
    need = (11 - 1) * 2 ** 4
    if side > need:
        out["ms_ssim"] = float(ms_ssim(x, y, data_range=255, size_average=True, win_size=11))
        out["ms_ssim_note"] = "pytorch-msssim, 5 scales, win 11"
    else:
        out["ms_ssim"] = None
        out["ms_ssim_note"] = f"not computed: MS-SSIM needs images larger than {need} px per side, these are {side}"
    return out
