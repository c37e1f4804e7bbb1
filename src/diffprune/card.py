"""Model cards: the ``README.md`` of every pruned, fine-tuned or evaluated output folder, in the Hugging Face card
format (YAML metadata through ``huggingface_hub.ModelCardData``, then Markdown).

A card says what the model is (base model, method and settings, parameters and MACs before -> after, metrics when
evaluated, a sample grid when there is one), how to load it, and — because a pruned folder *looks* like a stock
diffusers folder but its widths are not the ones its ``config.json`` builds — that it needs diffprune to load
(``diffprune.load_pipeline`` / ``load_model``), and why. The license is copied from the input's own card when it has
one (never guessed).
"""
from __future__ import annotations

import os
from pathlib import Path

from ._fs import atomic_write_text
from ._units import si

CARD_NAME = "README.md"
PIPELINE_TAGS = {"text": "text-to-image", "class": "image-generation", None: "unconditional-image-generation"}


def input_license(path) -> str | None:
    """The ``license`` of the card at ``path`` (a folder's ``README.md``, or the file), or None."""
    from huggingface_hub import ModelCard

    card = Path(path)
    card = card / CARD_NAME if card.is_dir() else card
    if not card.is_file():
        return None
    try:
        return ModelCard.load(str(card)).data.to_dict().get("license")
    except Exception:  # a README that is not a card: no license to copy
        return None


def _metadata(record: dict, base: str | None, license: str | None, conditioning: str | None) -> str:
    from huggingface_hub import ModelCardData

    hub_base = base if base and "/" in base and not Path(base).exists() else None  # a hub id, not a local folder
    data = ModelCardData(library_name="diffusers", license=license, base_model=hub_base,
                         pipeline_tag=PIPELINE_TAGS.get(conditioning, PIPELINE_TAGS[None]),
                         tags=["diffprune", "pruned", "structural-pruning", str(record.get("family", ""))])
    return data.to_yaml()


def _settings(record: dict) -> str:
    cfg = record.get("config") or {}
    keys = ("target_macs", "ratio", "target_latency", "allocation", "conditioning_floor", "timesteps", "thr",
            "calib_batch", "noise_draws", "seed")
    shown = [f"`{k}={cfg[k]}`" for k in keys if cfg.get(k) is not None]
    return ", ".join(shown) or "—"


def _figures(record: dict, metrics: dict | None) -> list[str]:
    p0, p1, m0, m1 = (record.get(k) for k in ("base_params", "params", "base_macs", "macs"))
    rows = ["| | base | this model |", "| --- | ---: | ---: |"]
    if p0 and p1:
        rows.append(f"| parameters | {si(p0)} | {si(p1, like=p0)} ({p1 / p0:.1%}) |")
    if m0 and m1:
        rows.append(f"| MACs per denoiser call (batch 1) | {si(m0)} | {si(m1, like=m0)} ({m1 / m0:.1%}) |")
    m = metrics or {}
    for key, label in (("fid", "FID"), ("class_accuracy", "class accuracy"), ("clip_score", "CLIP score")):
        if m.get(key) is not None:
            base_value = m.get(f"{key}_teacher")
            rows.append(f"| {label} | {'—' if base_value is None else f'{base_value:.4g}'} | {m[key]:.4g} |")
    if m.get("ssim") is not None:
        rows.append(f"| SSIM to the base model (same starting noise) | 1 | {m['ssim']:.3f} |")
    if m.get("speedup") is not None:
        rows.append(f"| measured sampler speedup ({m.get('device', '?')}, {m.get('threads', '?')} threads) | 1× | "
                    f"{m['speedup']:.2f}× |")
    return rows


def model_card(record: dict, *, stage: str, base: str | None = None, metrics: dict | None = None,
               grid: str | None = None, license: str | None = None, conditioning: str | None = None,
               name: str = "this folder") -> str:
    """The card's text. ``record``: the folder's ``pruning.json``; ``stage``: "pruned", "fine-tuned" or "evaluated";
    ``base``: the model it was pruned from; ``metrics``: ``metrics.json`` when evaluated; ``grid``: a sample grid's
    path relative to the card; ``conditioning``: "text", "class" or None (the pipeline tag)."""
    source = base or record.get("model_source") or "a diffusers model"
    lines = [
        "---", _metadata(record, base or record.get("model_source"), license, conditioning).rstrip(), "---", "",
        f"# A pruned `{record.get('family', 'diffusion')}` model ({stage} with diffprune)", "",
        f"Structurally pruned from **{source}** with diffprune "
        f"(method `{record.get('method')}`: {_settings(record)}). Channels were removed for real: the tensors are "
        "smaller, not masked.", "", *_figures(record, metrics), "",
    ]
    if grid:
        lines += [f"![samples]({grid})", ""]
    lines += ["## How to load", "", *(_stock_load(record, name) if record.get("layout") == "stock" else
                                       _diffprune_load(record, name))]
    return "\n".join(lines)


def _stock_load(record: dict, name: str) -> list[str]:
    cls = (record.get("base_config") or {}).get("_class_name", "DiffusionPipeline")
    depth = (record.get("structure") or {}).get("meta", {}).get("removed_blocks") is not None
    kept = ("removed whole blocks" if depth else
            "kept one width per value of the stock config (e.g. per level of `block_out_channels`)")
    return [
        "```python",
        f"from diffusers import {cls}   # or DiffusionPipeline for a pipeline folder",
        f'model = {cls}.from_pretrained("{name}")',
        "```", "",
        f"**Stock layout: plain diffusers loads this folder.** Pruning {kept}, and `config.json` is the stock config "
        "of the pruned model (the unpruned one is `base_config` in `pruning.json`), so no diffprune is needed to load "
        "or run it.", "",
        "Weights are safetensors and everything else JSON: nothing here is a pickle.", "",
    ]


def _diffprune_load(record: dict, name: str) -> list[str]:
    return [
        "```python",
        "from diffprune import load_pipeline   # pip install diffprune",
        f'pipe = load_pipeline("{name}")        # the stock diffusers pipeline with the pruned denoiser',
        "```", "",
        "**This folder needs diffprune to load.** Its layer widths differ from the ones its `config.json` builds, so "
        "plain `from_pretrained` fails with a shape mismatch — and diffusers' suggested `ignore_mismatched_sizes=True` "
        "would silently load random weights: do not use it. diffprune rebuilds the model from `config.json`, replays "
        "the recorded pruning (`pruning.json`: the structure, Torch-Pruning "
        f"{record.get('torch_pruning_version', '?')}) and loads the safetensors weights, bitwise as saved.", "",
        "Weights are safetensors and everything else JSON: nothing here is a pickle.", "",
    ]


def write_eval_card(folder, metrics: dict, pruning: dict, *, grid: str | None, labelled: bool) -> str:
    """The card of an evaluation folder: the evaluated model's record with its metrics; returns the file name."""
    prompts = (metrics.get("config") or {}).get("prompts")
    kind = "text" if prompts else "class" if labelled else None
    student = (metrics.get("names") or {}).get("student")
    name = student if student and Path(student).exists() else "path/to/the/evaluated/model"
    return write_card(folder, pruning, stage="evaluated", metrics=metrics, grid=grid, conditioning=kind, name=name,
                      license=input_license(student) if student and Path(student).exists() else None).name


PUSH_PATTERNS = ["*.json", "*.safetensors", "*.md", "*.png", "*.txt", "*/*.json", "*/*.safetensors", "*/*.txt",
                 "*/*.model", "*/tokenizer.json"]  # safetensors + JSON (+ the card, grids, tokenizer files): no pickle


def push(folder: str | os.PathLike, repo_id: str, *, private: bool = False, token: str | None = None,
         api=None) -> str:
    """Upload ``folder`` (a diffprune output with its card) to the hub repository ``repo_id`` with huggingface_hub:
    only safetensors, JSON, the card, sample grids and tokenizer files (a pickle anywhere is refused first);
    checkpoints/ is left out. Returns the commit URL. ``api``: an ``HfApi`` (default: a new one with ``token``)."""
    from .errors import require
    from .layout import PICKLE_SUFFIXES

    folder = Path(folder)
    require(folder.is_dir(), f"{str(folder)!r} is not a folder; push takes a diffprune output folder")
    require(isinstance(repo_id, str) and repo_id.count("/") == 1 and all(repo_id.split("/")),
            f"repo id {repo_id!r} must be 'owner/name'")
    pickles = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.suffix in PICKLE_SUFFIXES)
    require(not pickles, f"{str(folder)!r} holds pickle files {pickles[:3]}; diffprune never uploads pickles: remove "
                         "them (diffprune writes safetensors only)")
    require((folder / CARD_NAME).is_file(), f"{str(folder)!r} has no {CARD_NAME} model card; push a folder that "
                                            "diffprune wrote (prune, finetune or eval)")
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                             allow_patterns=PUSH_PATTERNS, ignore_patterns=["checkpoints/*", ".*"],
                             commit_message="Upload a model pruned with diffprune")
    return str(getattr(info, "commit_url", info))


def write_card(folder: str | os.PathLike, record: dict, **kwargs) -> Path:
    """Write :func:`model_card` as ``folder/README.md`` (atomically); returns its path."""
    path = Path(folder) / CARD_NAME
    atomic_write_text(path, model_card(record, **kwargs))
    return path


__all__ = ["CARD_NAME", "PUSH_PATTERNS", "input_license", "model_card", "push", "write_card",
           "write_eval_card"]
