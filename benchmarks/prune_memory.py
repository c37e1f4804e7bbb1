"""Peak memory of the `diffprune prune` command itself on full-size denoisers (random weights, public configs).

    python benchmarks/prune_memory.py --models dit-xl-2-256 [--dtype bfloat16] [--src OTHER_CHECKOUT/src --label before]
        [--method diff-pruning --prune-args "--data data-free --calib-batch 2 --timesteps strided --stride 250"]
    python benchmarks/prune_memory.py --models flux-dev --dtype bfloat16 --stream

Each model is saved once as a diffusers folder under ``--work`` (safetensors in ``--dtype``, default float32, from its
public configuration, nothing downloaded), then pruned by the CLI exactly as a user runs it (``diffprune prune
--method magnitude --target-macs 0.5``, which keeps the stored dtype; ``--method``/``--prune-args`` for a gradient
criterion and its calibration) under ``/usr/bin/time -v``: the peak resident
memory of that process against the size of the weights file, and the params and MACs before -> after from the
output's pruning.json. ``--src`` runs another checkout's code (to measure before a change). ``--stream`` writes the
model folder without ever building the model: random weights (normal, std 0.02) in ``--dtype``, tensor by tensor
into 5 GB shards with their index, as large checkpoints are published (FLUX.1-dev: 11.9B parameters, 24 GB in
bfloat16, on a 24 GiB machine). Appends to benchmarks/results/prune_memory.json and rewrites .md.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _models import CONFIGS, benchmark_model
from diffprune._fs import atomic_write_bytes

RESULTS = Path("benchmarks/results")
NOTES = """Peak RSS counts the weights file's pages that the process has read: diffusers maps the safetensors file, and
every weight is read once (the finite-weights check, the dependency trace and the scores), so those clean,
file-backed pages (about 1.05× the file) are resident at the end. The kernel drops them under memory pressure
and reads them again if needed; they are not memory the process allocated. Peak anon is what it allocated (the
pruned tensors, Torch-Pruning's graph, the scores, Python and torch themselves), sampled every 20 ms.
Floor: the pruned copy (about 0.5× at 0.5× MACs) plus the runtime; Torch-Pruning writes each pruned tensor as a
new one beside the original, so the originals' pages stay mapped until the process ends. Before the meta-copy MAC
count (rows before e831442) the counting forward also touched every weight in memory."""


def model_folder(name: str, work: Path, dtype: str, stream: bool = False) -> Path:
    import torch

    folder = work / (name if dtype == "float32" else f"{name}-{dtype}")
    if not (folder / "config.json").is_file():
        if stream:
            write_streamed(name, folder, getattr(torch, dtype))
        else:
            model = benchmark_model(name).denoiser.to(getattr(torch, dtype))
            model.save_pretrained(folder, safe_serialization=True)
    return folder


def write_streamed(name: str, folder: Path, dtype, shard_bytes: int = 5 * 10**9) -> None:
    """A diffusers folder of configuration ``name`` with random weights, written one shard at a time."""
    import diffusers
    import torch
    from safetensors.torch import save_file

    cls, kwargs = CONFIGS[name]
    with torch.device("meta"):
        model = getattr(diffusers, cls).from_config(kwargs)
    tmp = folder.with_name(folder.name + ".partial")
    subprocess.run(["rm", "-rf", str(tmp)], check=True)
    model.save_config(tmp)
    gen = torch.Generator().manual_seed(0)
    shards, shard, size, total = [], {}, 0, 0
    items = list(model.state_dict().items())
    for i, (key, meta) in enumerate(items):
        shard[key] = (torch.randn(meta.shape, generator=gen) * 0.02).to(dtype)
        size += shard[key].numel() * shard[key].element_size()
        if size >= shard_bytes or i == len(items) - 1:
            path = tmp / f"part-{len(shards)}.safetensors"
            save_file(shard, str(path), metadata={"format": "pt"})
            shards.append((path, list(shard)))
            total, shard, size = total + size, {}, 0
            print(f"{name}: wrote shard {len(shards)} ({total / 2**30:.1f} GiB)", flush=True)
    weight_map = {}
    for n, (path, keys) in enumerate(shards, 1):
        final = f"diffusion_pytorch_model-{n:05d}-of-{len(shards):05d}.safetensors"
        path.rename(tmp / final)
        weight_map.update(dict.fromkeys(keys, final))
    (tmp / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    tmp.rename(folder)


def measure(name: str, work: Path, src: str | None, threads: int, dtype: str, method: str, extra: list,
            stream: bool = False) -> dict:
    folder = model_folder(name, work, dtype, stream)
    out = work / f"{name}-pruned-{os.getpid()}"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if src:
        env["PYTHONPATH"] = src
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "diffprune", "prune", "--model", str(folder), "--method",
           method, "--target-macs", "0.5", *extra, "--out", str(out), "--device", "cpu"]
    t0 = time.time()
    with tempfile.TemporaryFile("w+") as err:
        run = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err, text=True)
        anon_kib = _poll_anon(run)
        err.seek(0)
        stderr = err.read()
    if run.returncode:
        sys.exit(f"{name}: prune failed:\n{stderr[-2000:]}")
    peak_kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr).group(1))
    weights = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    pruned = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    rec = json.loads((out / "pruning.json").read_text())
    subprocess.run(["rm", "-rf", str(out)], check=True)
    return {"model": name, "method": method, "dtype": rec.get("dtype", "float32"), "params_before": rec["base_params"],
            "params_after": rec["params"], "macs_before": rec["base_macs"], "macs_after": rec["macs"],
            "weights_gib": round(weights / 2**30, 2), "pruned_weights_gib": round(pruned / 2**30, 2),
            "peak_rss_gib": round(peak_kib / 2**20, 2), "peak_over_weights": round(peak_kib * 1024 / weights, 2),
            "peak_anon_gib": round(anon_kib / 2**20, 2), "anon_over_weights": round(anon_kib * 1024 / weights, 2),
            "seconds": round(time.time() - t0, 1), "threads": threads, "command": " ".join(cmd[2:])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["dit-xl-2-256"])
    p.add_argument("--work", default="benchmarks/runs/prune-memory")
    p.add_argument("--src", default=None, help="run this checkout's src/ instead of the installed diffprune")
    p.add_argument("--label", default="this commit")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype the model folder is saved in (the CLI prunes and saves it in the same)")
    p.add_argument("--method", default="magnitude")
    p.add_argument("--prune-args", default="", help="more `diffprune prune` arguments, e.g. a calibration's")
    p.add_argument("--stream", action="store_true", help="write the model folder shard by shard (see above)")
    args = p.parse_args()
    path = RESULTS / "prune_memory.json"
    rows = json.loads(path.read_text()) if path.is_file() else []
    commit = subprocess.run(["git", "-C", args.src or ".", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    for name in args.models:
        rows.append({"label": args.label, "commit": commit,
                     **measure(name, Path(args.work), args.src, args.threads, args.dtype, args.method,
                                  args.prune_args.split(), args.stream)})
        atomic_write_bytes(path, (json.dumps(rows, indent=1) + "\n").encode())
    lines = ["# Peak memory of `diffprune prune` (0.5x MACs, random full-size weights)", "",
             "`python benchmarks/prune_memory.py --models ...` (`--src` for an older checkout). Peak resident memory "
             "of the prune process (`/usr/bin/time -v`) against the weights file, in the dtype it is stored and "
             "pruned in; params and MACs (one call at batch 1) before -> after from the output's pruning.json.", "",
             "| code | model | method | dtype | params | MACs/call | weights GiB | peak RSS GiB | / weights | peak anon GiB "
             "| / weights | pruned GiB | seconds | threads |",
             "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['label']} ({r['commit']}) | {r['model']} | {r.get('method', 'magnitude')} | {r.get('dtype', 'float32')} | {_pair(r, 'params', 1e6, 'M')} "
              f"| {_pair(r, 'macs', 1e9, 'G')} | {r['weights_gib']} | {r['peak_rss_gib']} | {r['peak_over_weights']}× "
              f"| {r.get('peak_anon_gib', '—')} | {str(r['anon_over_weights']) + '×' if 'anon_over_weights' in r else '—'} "
              f"| {r['pruned_weights_gib']} | {r['seconds']} | {r['threads']} |" for r in rows]
    lines += ["", NOTES]
    atomic_write_bytes(RESULTS / "prune_memory.md", ("\n".join(lines) + "\n").encode())
    print("\n".join(lines))


def _poll_anon(run: subprocess.Popen) -> int:
    """Wait for ``run`` (``/usr/bin/time`` over python) while sampling its python child's anonymous resident memory
    (``RssAnon``: what the process itself allocated, not the weights file's pages it maps) every 20 ms; the
    largest sample, in KiB."""
    peak = 0
    while run.poll() is None:
        for child in Path(f"/proc/{run.pid}/task/{run.pid}/children").read_text().split() if Path(
                f"/proc/{run.pid}/task/{run.pid}/children").exists() else []:
            try:
                status = Path(f"/proc/{child}/status").read_text()
            except OSError:
                continue
            m = re.search(r"RssAnon:\s+(\d+) kB", status)
            peak = max(peak, int(m.group(1))) if m else peak
        time.sleep(0.02)
    return peak


def _pair(row: dict, key: str, scale: float, unit: str) -> str:
    if f"{key}_before" not in row:
        return "—"
    return f"{row[key + '_before'] / scale:.1f}{unit} -> {row[key + '_after'] / scale:.1f}{unit}"


if __name__ == "__main__":
    main()
