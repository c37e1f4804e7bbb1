"""Teacher vs pruned student per denoiser call under eager PyTorch, torch.compile and ONNX Runtime (issue 30).

    python benchmarks/runtime_speed.py --runs /work/runs [--seed 3] [--batches 1 16] [--rounds 2]

Models: the shipped UNet (mnist-teacher) and DiT (mnist-dit) with the default method's fine-tuned 0.5x-MACs student
of one seed from the allocation benchmarks' run folders (``--runs``: ``unet-allocation/conditioning_floor-0.5/
seed-<s>/finetune/model``, ``dit-allocation/...``), and the CIFAR-10 configuration (google/ddpm-cifar10-32's UNet,
random weights, nothing downloaded) with a magnitude-pruned 0.5x-MACs student made here. Each denoiser is timed on
the CPU at each batch (conditioning included; median of 10 calls after warm-up): eager (``torch.no_grad``),
``torch.compile`` (inductor, default mode; compile time reported apart) and ONNX Runtime (``diffprune export``'s
graph, CPU provider, as many intra-op threads as torch uses). Teacher and student alternate, ``--rounds`` rounds, the
median over rounds counts. Per image = per call / batch x 50 steps (DDIM 50, one call per step: the sampler's own
arithmetic is not included). Writes benchmarks/results/runtime-speed.json and .md.
"""
import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from diffprune._fs import atomic_write_bytes
from diffprune.export import export_model, flat_inputs, require_onnx
from diffprune.io import load_model, save_pruned
from diffprune.latency import measure
from diffprune.macs import count_macs

STEPS = 50
RUNTIMES = ("eager", "compile", "onnxruntime")


def cifar10(work: Path) -> tuple[Path, Path]:
    """google/ddpm-cifar10-32's UNet with random weights, and its magnitude-pruned 0.5x-MACs student, as folders."""
    from diffprune.presets import build_model
    from diffprune.prune import PruneConfig, prune_model

    teacher, student = work / "cifar10-teacher", work / "cifar10-student"
    if not (teacher / "config.json").is_file():
        torch.manual_seed(0)
        build_model("ddpm-cifar10-32").save_pretrained(teacher, safe_serialization=True)
    if not (student / "pruning.json").is_file():
        loaded, _ = prune_model(teacher, PruneConfig(method="magnitude", target_macs=0.5), progress=False)
        save_pruned(loaded.denoiser, student, loaded.pruning, overwrite=True)
    return teacher, student


def callers(folder, work: Path, name: str, batch: int, threads: int) -> dict:
    """``{runtime: (call, setup seconds)}`` for one denoiser (a folder or shipped name) at one batch."""
    ort = require_onnx()
    loaded = load_model(folder)
    model, adapter = loaded.denoiser.eval().requires_grad_(False), loaded.adapter
    inputs = adapter.example_inputs(model, batch)
    inputs[adapter.sample_arg] = torch.randn(inputs[adapter.sample_arg].shape)
    out = {}
    with torch.no_grad():
        out["eager"] = (lambda: model(**inputs), 0.0)
        compiled = torch.compile(model)
        t0 = time.perf_counter()
        compiled(**inputs)
        out["compile"] = (lambda: compiled(**inputs), time.perf_counter() - t0)
    onnx_dir = work / f"{name}-onnx"
    t0 = time.perf_counter()
    if not (onnx_dir / "model.onnx").is_file():
        export_model(folder, onnx_dir, overwrite=True)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(onnx_dir / "model.onnx"), options, providers=["CPUExecutionProvider"])
    wanted = {i.name for i in session.get_inputs()}
    feed = {k: v.numpy() for k, v in flat_inputs(adapter, model, batch).items() if k in wanted}
    out["onnxruntime"] = (lambda: session.run(None, feed), time.perf_counter() - t0)
    return out


def median_call(fn) -> float:
    with torch.no_grad():
        return measure(fn, device="cpu", repeats=10, warmup=2)["median_s"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", required=True)
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--work", default="benchmarks/runs/runtime-speed")
    args = p.parse_args()
    work, threads = Path(args.work), torch.get_num_threads()
    work.mkdir(parents=True, exist_ok=True)
    runs = Path(args.runs)
    models = {"unet": ("mnist-teacher", runs / f"unet-allocation/conditioning_floor-0.5/seed-{args.seed}/finetune/model"),
              "dit": ("mnist-dit", runs / f"dit-allocation/conditioning_floor-0.5/seed-{args.seed}/finetune/model"),
              "cifar10": cifar10(work)}
    rows = []
    for family, (teacher, student) in models.items():
        macs = count_macs(load_model(student).denoiser, shapes_only=True).macs / \
            count_macs(load_model(teacher).denoiser, shapes_only=True).macs
        for batch in args.batches:
            calls = {role: callers(m, work, f"{family}-{role}", batch, threads)
                     for role, m in (("teacher", teacher), ("student", student))}
            for runtime in RUNTIMES:
                times = {"teacher": [], "student": []}
                for _ in range(args.rounds):  # alternating, so that a drift of the machine hits both
                    for role in times:
                        times[role].append(median_call(calls[role][runtime][0]))
                t, s = statistics.median(times["teacher"]), statistics.median(times["student"])
                rows.append({"family": family, "batch": batch, "runtime": runtime, "teacher_ms": 1e3 * t,
                             "student_ms": 1e3 * s, "speedup": t / s, "macs_ratio": macs,
                             "speedup_over_mac_cut": t / s * macs,
                             "teacher_ms_per_image": 1e3 * t / batch * STEPS,
                             "student_ms_per_image": 1e3 * s / batch * STEPS,
                             "setup_s": {role: round(calls[role][runtime][1], 1) for role in calls},
                             "threads": threads})
                print(json.dumps(rows[-1]), flush=True)
    write(rows, args)


def write(rows: list, args) -> None:
    import onnxruntime

    out = Path("benchmarks/results")
    command = (f"python benchmarks/runtime_speed.py --runs RUNS --seed {args.seed} --batches "
               f"{' '.join(map(str, args.batches))} --rounds {args.rounds}")
    meta = {"command": command, "torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "rows": rows}
    atomic_write_bytes(out / "runtime-speed.json", (json.dumps(meta, indent=1) + "\n").encode())
    lines = ["# Teacher vs pruned student under eager PyTorch, torch.compile and ONNX Runtime (CPU)", "",
             f"`{command}` (torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, "
             f"{rows[0]['threads']} threads, idle machine). Per call: median of 10 after warm-up, median of the "
             f"rounds; per image: per call / batch x {STEPS} steps. setup: torch.compile's first call, ONNX export "
             "and session creation (teacher / student).", "",
             "| model | batch | runtime | teacher ms/call | student ms/call | speedup | MACs kept | speedup ÷ MAC cut "
             "| student ms/image | setup s |", "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['family']} | {r['batch']} | {r['runtime']} | {r['teacher_ms']:.2f} | {r['student_ms']:.2f} "
                     f"| {r['speedup']:.2f}× | {r['macs_ratio']:.3f} | {r['speedup_over_mac_cut']:.2f} "
                     f"| {r['student_ms_per_image']:.1f} | {r['setup_s']['teacher']} / {r['setup_s']['student']} |")
    atomic_write_bytes(out / "runtime-speed.md", ("\n".join(lines) + "\n").encode())
    print("\n".join(lines))


if __name__ == "__main__":
    main()
