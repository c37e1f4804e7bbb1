"""The cache of a teacher's evaluation samples: its key (everything the images depend on) and the check an entry
must pass; :func:`diffprune.evaluate.evaluate` reads and writes it through :func:`diffprune._cache.cached`."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ._hashing import Hasher, source_sha256

TEACHER_SAMPLES_FORMAT = 1


def teacher_key(model, run) -> str:
    """The cache key of ``model``'s samples under ``run`` (the evaluation's sampling setup, ``evaluate._Sampling``).
    It covers everything the teacher's images depend on: the weights (and the codec's), the model class, the
    scheduler's config, the seeds, steps, skip, guidance, batch size, labels and text context (each tensor of a dict
    context), the device type, diffprune's source files (cached samples never outlive a change to the code that made
    them) and the torch and diffusers versions; so a hit is bitwise what sampling would give."""
    import diffusers

    config, codec = run.config, run.codec
    h = Hasher()
    for prefix, module in (("model", model), ("codec", getattr(codec, "autoencoder", None))):
        if module is not None:
            for name, t in module.state_dict().items():
                h.tensor(f"{prefix}.{name}", t)
    conds = (("labels", run.labels), *((f"context{i}", c) for i, c in enumerate(run.context or ())))
    for name, t in ((f"{n}.{k}", v) for n, c in conds for k, v in (c.items() if isinstance(c, dict) else [("", c)])):
        if isinstance(t, torch.Tensor):  # a dict context (SDXL, PixArt, SD3, Flux): each of its tensors
            h.tensor(name, t)
    h.text(json.dumps({"format": TEACHER_SAMPLES_FORMAT, "code": source_sha256(Path(__file__).parent),
                       "class": type(model).__name__,
                       "scheduler": {k: v for k, v in dict(run.scheduler.config).items() if not k.startswith("_")},
                       "seeds": config.seeds, "steps": config.steps, "skip": config.skip,
                       "guidance": config.guidance_scale, "batch": config.batch_size,
                       "codec_scale": getattr(codec, "scale", None), "device": torch.device(run.device).type,
                       "torch": torch.__version__, "diffusers": diffusers.__version__}, sort_keys=True, default=str))
    return h.hexdigest()


def samples_check(config):
    """What a cached teacher-sample entry must hold for ``config``: uint8 images ``[n, C, H, W]`` and its seeds."""
    def check(t: dict) -> str | None:
        images, seeds = t.get("images"), t.get("seeds")
        if images is None or images.dtype != torch.uint8 or images.ndim != 4 or len(images) != config.n:
            return f"it holds no uint8 images [{config.n}, C, H, W]"
        return None if seeds is not None and seeds.tolist() == config.seeds else "its seeds are not the ones asked for"

    return check
