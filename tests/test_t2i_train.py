"""Fine-tuning and evaluating the text-to-image families with dict conditioning (SDXL, PixArt: DDPM family; SD3,
Flux: flow matching) on in-memory latents and text embeddings: distillation from the unpruned model, caption
dropout to the empty prompt's dict, EMA, a run interrupted and resumed ends bitwise equal to an uninterrupted one,
and the end-of-run sample grid is drawn with the family's conditioning; then teacher vs student evaluation on the
same start noise and prompts, with FID against a small image folder."""
import copy
import json

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler
from PIL import Image
from safetensors.torch import load_file

from diffprune.components import LatentCodec
from diffprune.inputs import DenoiserData
from diffprune.prune import PruneConfig, prune_
from diffprune.train import TrainConfig, list_checkpoints, train
from test_family_pixart import CAPTION, build_pixart
from test_family_sdxl import CONTEXT as SDXL_CONTEXT, POOLED as SDXL_POOLED, build_sdxl_unet
from test_t2i_sampling import build_flux, build_sd3, tiny_vae

N = 8


def _text(n, length, dim, pooled, g):
    out = {"context": torch.randn(n, length, dim, generator=g)}
    if pooled:
        out["pooled"] = torch.randn(n, pooled, generator=g)
    return out


def family(name):
    """``(build, scheduler, cond of N rows, null cond of one row)`` of a tiny model of the family ``name``."""
    g = torch.Generator().manual_seed(7)
    if name == "sdxl":
        ids = torch.tensor([[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]])
        cond, null = _text(N, 6, SDXL_CONTEXT, SDXL_POOLED, g), _text(1, 6, SDXL_CONTEXT, SDXL_POOLED, g)
        return (build_sdxl_unet, DDPMScheduler(num_train_timesteps=100, clip_sample=False),
                {**cond, "time_ids": ids.repeat(N, 1)}, {**null, "time_ids": ids})
    if name == "pixart":
        mask = torch.ones(N + 1, 6, dtype=torch.long)
        mask[:, 4:] = 0
        cond, null = _text(N, 6, CAPTION, None, g), _text(1, 6, CAPTION, None, g)
        return (build_pixart, DDPMScheduler(num_train_timesteps=100, clip_sample=False),
                {**cond, "mask": mask[:N]}, {**null, "mask": mask[:1]})
    flow = FlowMatchEulerDiscreteScheduler(num_train_timesteps=100, shift=3.0,
                                           use_dynamic_shifting=name == "flux")
    return (build_sd3 if name == "sd3" else build_flux, flow, _text(N, 6, 32, 16, g), _text(1, 6, 32, 16, g))


def data_of(cond, null):
    x0 = torch.randn(N, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    return DenoiserData(x0=x0, cond=cond, null_cond=null, record={"source": "test", "sha256": "0" * 64})


def pruned_pair(build):
    teacher = build()
    student = copy.deepcopy(teacher)
    # one global-ranking pass (what a MACs target's search probes), no search: training is what these tests test
    prune_(student, PruneConfig(method="magnitude", ratio=0.3, ratio_mode="uniform", global_ranking=True),
           progress=False)
    return teacher.eval().requires_grad_(False), student


class Interrupt(Exception):
    """Stops a run after step 4, as a crash would."""


def _stop_at_4(step, loss):
    if step == 4:
        raise Interrupt


@pytest.mark.parametrize("name", ["sdxl", "pixart", "sd3", "flux"])
def test_distillation_with_caption_dropout_and_ema_resumes_bitwise(name, tmp_path):
    build, sched, cond, null = family(name)
    teacher, student = pruned_pair(build)
    init = copy.deepcopy(student.state_dict())
    cfg = TrainConfig(steps=6, batch_size=4, checkpoint_every=2, kd_weight=0.7, label_dropout=0.5, ema_decay=0.9,
                      sample_every=6, sample_steps=2, lr=1e-3)
    data, codec = data_of(cond, null), LatentCodec(tiny_vae())
    res = train(copy.deepcopy(student), sched, data, cfg, tmp_path / "a", teacher=teacher, codec=codec,
                progress=False)
    assert res.steps == 6 and np.isfinite(res.final_loss)
    with pytest.raises(Interrupt):
        train(copy.deepcopy(student), sched, data, cfg, tmp_path / "b", teacher=teacher, codec=codec, progress=False,
              on_step=_stop_at_4)
    assert [p.name for p in list_checkpoints(tmp_path / "b" / "checkpoints")] == ["step-0000002", "step-0000004"]
    again = copy.deepcopy(student)
    again.load_state_dict(init)
    train(again, sched, data, cfg, tmp_path / "b", teacher=teacher, codec=codec, progress=False, resume=True)
    for file in ("diffusion_pytorch_model.safetensors", "raw/diffusion_pytorch_model.safetensors"):
        a, b = load_file(tmp_path / "a" / file), load_file(tmp_path / "b" / file)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), file
    trained = load_file(tmp_path / "a" / "raw/diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(trained[k], init[k]) for k in init)  # it learned something
    record = json.loads((tmp_path / "a" / "train_config.json").read_text())
    assert record["train"]["label_dropout"] == 0.5 and record["train"]["kd_weight"] == 0.7
    with Image.open(tmp_path / "a" / "samples" / "step-0000006.png") as grid:  # 6x6 decoded 16x16 samples
        assert grid.size == (6 * 18 + 2, 6 * 18 + 2)


class DictPrompts:
    """Stands in for a family's text encoders (they land separately): each prompt's conditioning dict, given as is,
    with :meth:`~diffprune.components.TextEncoder.sampling_inputs`'s contract."""

    def __init__(self, cond: dict, null: dict, prompts: tuple):
        self.rows = {p: {k: v[i:i + 1] for k, v in cond.items()} for i, p in enumerate(prompts)}
        self.null = null

    def sampling_inputs(self, prompts, guidance_scale):
        rows = [self.rows[p] for p in prompts]
        return {k: torch.cat([r[k] for r in rows]) for k in rows[0]}, (self.null if guidance_scale != 1 else None)


def image_folder(folder, n=8):
    rng = np.random.default_rng(0)
    folder.mkdir()
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return str(folder)


@pytest.mark.parametrize("name, calls", [("sdxl", 4), ("flux", 2)])  # 2 steps; SDXL's guidance: 2 calls per step
def test_evaluate_teacher_and_student_on_the_same_noise_and_prompts(name, calls, tmp_path):
    from diffprune.evaluate import EvalConfig, evaluate

    build, sched, cond, null = family(name)
    teacher, student = pruned_pair(build)
    prompts = ("a", "b", "c")
    text = DictPrompts(cond, null, prompts)
    config = EvalConfig(n=4, steps=2, batch_size=4, data=image_folder(tmp_path / "ref"), extractor="mnist-classifier",
                        latency_batches=(), guidance_scale=2.0, prompts=prompts, cache_dir=str(tmp_path / "cache"),
                        grid_count=4)
    codec = LatentCodec(tiny_vae())
    run = dict(config=config, scheduler=sched, codec=codec, text_encoder=text, device="cpu")
    same = evaluate(copy.deepcopy(teacher), teacher, out_dir=tmp_path / "same", **run)
    assert same["ssim"] == pytest.approx(1.0) and same["mse"] == 0  # same noise, same prompts: the same images
    assert same["teacher_samples_cache"]["hit"] is False
    m = evaluate(student, teacher, out_dir=tmp_path / "pruned", **run)
    assert m["seeds"]["paired"] == 4 and -1 <= m["ssim"] < 1 and m["teacher_samples_cache"]["hit"] is True
    assert np.isfinite(m["fid"]) and np.isfinite(m["fid_teacher"]) and m["mac_ratio"] > 1
    assert m["latency"]["student"]["unet_calls_per_image"] == m["latency"]["teacher"]["unet_calls_per_image"] == calls
    other = DictPrompts({k: v.flip(0) for k, v in cond.items()}, null, prompts)  # other embeddings, same prompts
    again = evaluate(student, teacher, out_dir=tmp_path / "other", **{**run, "text_encoder": other})
    assert again["teacher_samples_cache"]["hit"] is False  # the cache key covers every tensor of the dict
