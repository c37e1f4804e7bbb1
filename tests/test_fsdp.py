"""Fine-tuning under accelerate's FSDP2 (issue 31): 2 CPU processes (gloo), a tiny class-conditional DiT distilled
from a tiny teacher, with EMA, gradient checkpointing, sample grids, checkpoints and a resume.

accelerate turns FSDP on only beside accelerators (on CPU, ``--use_fsdp`` becomes plain data parallelism), so the
worker builds the Accelerator with an FSDP2 plugin and sets the distributed type accelerate would set on GPUs; from
there accelerate's own FSDP2 preparation (``fully_shard`` over a gloo process group) runs as it would under
``accelerate launch --use_fsdp --fsdp_version 2``. One launch runs four jobs to keep the test short."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from diffprune.errors import DiffPruneError

WORKER = r'''
import json, sys
import torch
torch.set_num_threads(1)
from accelerate import Accelerator
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from diffusers import DDPMScheduler, DiTTransformer2DModel
from torch.distributed.tensor import DTensor
from diffprune.data import load_data
from diffprune.train import TrainConfig, train

root = sys.argv[1]
plugin = FullyShardedDataParallelPlugin(fsdp_version=2)  # one unit: diffusers' DiT calls block 0's embedder itself


def accelerator(kind):  # a fresh one per run (an Accelerator keeps what it prepared); the kind accelerate sets on
    acc = Accelerator(cpu=True, fsdp_plugin=plugin)  # GPUs for --use_fsdp, or MULTI_CPU (its data parallelism)
    acc.state.fsdp_plugin = plugin
    acc.state.distributed_type = kind
    PartialState._shared_state["distributed_type"] = kind
    return acc


def dit(seed):
    torch.manual_seed(seed)
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=1,
                                 num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10)


def local_share(model):  # the fraction of the parameters' elements this process holds
    local = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in model.parameters())
    return local / sum(p.numel() for p in model.parameters())


images = load_data("mnist", resolution=8, channels=1, limit=64)
shares = {}
jobs = [("ddp", DistributedType.MULTI_CPU, 4, False), ("fsdp", DistributedType.FSDP, 4, False),
        ("cut", DistributedType.FSDP, 2, False), ("cut", DistributedType.FSDP, 4, True)]
for name, kind, steps, resume in jobs:
    acc = accelerator(kind)
    cfg = TrainConfig(steps=steps, batch_size=4, checkpoint_every=2, log_every=1, kd_weight=0.5, ema_decay=0.5,
                      sample_every=2, sample_steps=2, gradient_checkpointing=True)
    student, teacher = dit(0), dit(1)
    train(student, DDPMScheduler(num_train_timesteps=50), images, cfg, f"{root}/{name}", teacher=teacher,
          accelerator=acc, resume=resume, progress=False)
    shares[name] = [local_share(student), local_share(teacher)]
with open(f"{root}/shares-{acc.process_index}.json", "w") as f:
    json.dump(shares, f)
'''


def _launch(tmp_path, script):
    path = tmp_path / "worker.py"
    path.write_text(script)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(path), str(tmp_path)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=400, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def test_fsdp2_fine_tuning_matches_data_parallel_and_resumes_exactly(tmp_path):
    res = _launch(tmp_path, WORKER)
    assert res.returncode == 0, res.stderr[-3000:]
    shares = [json.loads((tmp_path / f"shares-{rank}.json").read_text()) for rank in (0, 1)]
    for s in shares:  # sharded: each of the 2 processes holds about half of student and teacher; DDP holds all
        assert s["ddp"] == [1.0, 1.0]
        for share in s["fsdp"]:
            assert 0.35 < share < 0.65
    assert abs(shares[0]["fsdp"][0] + shares[1]["fsdp"][0] - 1.0) < 1e-9
    files = ["diffusion_pytorch_model.safetensors", "raw/diffusion_pytorch_model.safetensors",
             "checkpoints/step-0000004/model.safetensors", "checkpoints/step-0000004/ema.safetensors",
             "checkpoints/step-0000004/optimizer.safetensors"]
    for name in files:
        fsdp, ddp, cut = (load_file(tmp_path / run / name) for run in ("fsdp", "ddp", "cut"))
        assert _max_diff(fsdp, cut) == 0.0, name  # interrupted at step 2 and resumed: bitwise the same
        assert _max_diff(fsdp, ddp) < 1e-4, name  # sharding computes what data parallelism does
    ema, raw = (load_file(tmp_path / "fsdp" / n) for n in files[:2])
    assert _max_diff(ema, raw) > 1e-4  # the EMA (decay 0.5) is its own average, not the raw weights
    record = json.loads((tmp_path / "fsdp" / "train_config.json").read_text())
    assert record["accelerate"]["sharding"] == "fsdp2" and record["world_size"] == 2
    assert "sharding" not in json.loads((tmp_path / "ddp" / "train_config.json").read_text())["accelerate"]
    assert sorted(p.name for p in (tmp_path / "fsdp" / "samples").iterdir()) == ["step-0000002.png",
                                                                                 "step-0000004.png"]


def test_fsdp1_and_deepspeed_are_refused():
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from diffprune.train.accel import sharding

    assert sharding(SimpleNamespace(distributed_type=DistributedType.MULTI_CPU)) is None
    assert sharding(SimpleNamespace(distributed_type=DistributedType.FSDP, is_fsdp2=True)) == "fsdp2"
    with pytest.raises(DiffPruneError, match="FSDP version 1 is not supported.*--fsdp_version 2"):
        sharding(SimpleNamespace(distributed_type=DistributedType.FSDP, is_fsdp2=False))
    with pytest.raises(DiffPruneError, match="DeepSpeed is not supported.*--use_fsdp --fsdp_version 2"):
        sharding(SimpleNamespace(distributed_type=DistributedType.DEEPSPEED))


def test_whole_model_of_a_shell_keeps_buffers_and_takes_every_parameter():
    from diffusers import DiTTransformer2DModel

    from diffprune._torch import meta_copy
    from diffprune.train.state import plain_model

    torch.manual_seed(0)
    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=1,
                                num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    empty = meta_copy(dit, buffers=False)
    assert all(p.is_meta for p in empty.parameters()) and not any(b.is_meta for b in empty.buffers())
    rebuilt = plain_model(empty, {k: v.clone() for k, v in dit.named_parameters()})
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([3, 40]), torch.tensor([1, 7])
    with torch.no_grad():
        expected = dit.eval()(x, timestep=t, class_labels=y).sample
        assert torch.equal(rebuilt(x, timestep=t, class_labels=y).sample, expected)
    assert all(p.is_meta for p in empty.parameters())  # the shell stays empty for the next rebuild
