"""The stock layout at full size: which MAC fractions it reaches, whether plain diffusers loads the result, its speed.

    python benchmarks/stock_full_size.py [--models sd15-unet] [--ratios 0.3 0.45] [--target 0.5]
        [--batches 1 64] [--device cuda] [--dtype bfloat16] [--repeats 20] [--rounds 2] [--threads 16]

Each model (a configuration of benchmarks/_models.py built with random weights, or a model folder) is pruned with
magnitude (no data needed) on --device:
1. in the stock layout (``PruneConfig(layout="stock")``) at each --ratio, recording the MAC fraction and the widths the
   stock config gets (``block_out_channels``): the steps the stock layout can take;
2. in the stock layout to --target (reached within the default +-2%, or refused: then to the nearer of the two
   steps the refusal names);
3. that stock model saved with ``save_pruned`` and loaded by plain diffusers ``from_pretrained`` in a
   process that never imports diffprune; both run the same inputs in float32 (deterministic kernels, no TF32) and
   the outputs are compared (bitwise, and the largest difference);
4. in the free layout to the MAC fraction the stock model kept (the default layout, for comparison at equal MACs);
5. teacher, free and stock timed per denoiser call at each batch size in --dtype, alternately in --rounds rounds
   (median of --repeats after warm-up per round; the median over rounds counts).
Results are written after every step (a run cut short keeps what it measured) to benchmarks/results/
stock-full-size.json and .md (``--results``).
"""
import argparse
import copy
import json
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from diffprune.adapters import adapter_for
from diffprune.errors import DiffPruneError
from diffprune.io import save_pruned
from diffprune.latency import denoiser_latency
from diffprune.macs import count_macs
from diffprune.prune import PruneConfig, prune_

from _models import benchmark_model

# Keyword inputs from their flattened names ("added_cond_kwargs.time_ids" -> an entry of that dict): one text, run
# here and in the plain process (which must not import this file: it imports diffprune).
UNFLATTEN = r"""
def unflatten(flat):
    kwargs = {}
    for key, value in flat.items():
        outer, _, inner = key.partition(".")
        if inner:
            kwargs.setdefault(outer, {})[inner] = value
        else:
            kwargs[outer] = value
    return kwargs
"""
exec(UNFLATTEN)

# Loads the folder with plain diffusers (the class its config.json names), runs the saved inputs, saves the output;
# fails if anything imported diffprune.
PLAIN = UNFLATTEN + r"""
import json, sys
import diffusers, torch
from safetensors.torch import load_file, save_file
folder, inputs, out, device, threads = sys.argv[1:6]
torch.set_num_threads(int(threads))  # as the parent: the same kernels and summation order
torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
cls = getattr(diffusers, json.load(open(folder + "/config.json"))["_class_name"])
model = cls.from_pretrained(folder).to(device).eval()
with torch.no_grad():
    save_file({"out": model(**unflatten(load_file(inputs, device=device))).sample.float().cpu().contiguous()}, out)
assert not any(m.split(".")[0] == "diffprune" for m in sys.modules), "diffprune was imported"
"""


def flat_inputs(model, device) -> dict[str, torch.Tensor]:
    """The stock forward's keyword inputs at batch 2 (random where floating point), flattened one level."""
    g = torch.Generator().manual_seed(3)
    flat = {}
    for key, value in adapter_for(model).example_inputs(model, 2).items():
        for sub, v in (value.items() if isinstance(value, dict) else [(None, value)]):
            if isinstance(v, torch.Tensor):
                v = torch.randn(v.shape, generator=g) if v.is_floating_point() and "ids" not in (sub or key) else v
                flat[key if sub is None else f"{key}.{sub}"] = v.to(device).contiguous()
    return flat


def call(model, flat) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**unflatten(flat)).sample.float().cpu()  # noqa: F821 (defined by exec(UNFLATTEN))


def widths(model) -> list[int] | None:
    """The widths the stock config gets (UNets: ``block_out_channels``), as the saved config.json will say."""
    from diffprune.io.save import stock_twin

    config = stock_twin(model).config
    return list(config["block_out_channels"]) if "block_out_channels" in config else None


def pruned(teacher, **config) -> tuple[torch.nn.Module, dict]:
    student = copy.deepcopy(teacher)
    t0 = time.time()
    report = prune_(student, PruneConfig(method="magnitude", **config), progress=False)
    row = {**config, "macs_fraction": round(report.macs / report.base_macs, 4), "params": report.params,
           "seconds": round(time.time() - t0, 1)}
    student.record = report.to_dict()  # what save_pruned writes as pruning.json
    return student, row


def plain_check(model, device) -> dict:
    """Save ``model`` (stock layout), load it with plain diffusers in a fresh process, compare outputs in float32."""
    flat = flat_inputs(model, device)
    with tempfile.TemporaryDirectory() as tmp:
        save_pruned(model, Path(tmp) / "m", model.record)
        save_file({k: v.cpu() for k, v in flat.items()}, f"{tmp}/in.safetensors")
        expected = call(model, flat)
        run = subprocess.run([sys.executable, "-c", PLAIN, f"{tmp}/m", f"{tmp}/in.safetensors", f"{tmp}/out.safetensors",
                              device, str(torch.get_num_threads())], capture_output=True, text=True)
        if run.returncode:
            return {"loaded": False, "error": run.stderr.strip().splitlines()[-1]}
        got = load_file(f"{tmp}/out.safetensors")["out"]
    return {"loaded": True, "bitwise": bool(torch.equal(got, expected)),
            "max_abs_diff": float((got - expected).abs().max()), "output_abs_mean": float(expected.abs().mean())}


def timed(models: dict, batches, repeats, rounds, device) -> dict:
    runs = [{name: {b: r["median_s"] for b, r in denoiser_latency(m, device=device, batch_sizes=tuple(batches),
                                                                   repeats=repeats).items()}
             for name, m in models.items()} for _ in range(rounds)]
    return {name: {b: round(statistics.median(r[name][str(b)] for r in runs) * 1e3, 3) for b in batches}
            for name in models}


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--models", nargs="+", default=["sd15-unet"])
    p.add_argument("--ratios", nargs="*", type=float, default=[])
    p.add_argument("--target", type=float, default=0.5)
    p.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=16)
    p.add_argument("--no-plain-check", action="store_true", help="skip step 3 (the plain diffusers load)")
    p.add_argument("--results", default="benchmarks/results/stock-full-size")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False  # as the plain process runs
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    device_name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else platform.processor() or "cpu"
    command = (f"python benchmarks/stock_full_size.py --models {' '.join(args.models)} --ratios "
               f"{' '.join(map(str, args.ratios))} --target {args.target} --batches {' '.join(map(str, args.batches))} "
               f"--device {args.device} --dtype {args.dtype} --repeats {args.repeats} --rounds {args.rounds} "
               f"--threads {args.threads}" + (" --no-plain-check" if args.no_plain_check else ""))
    result = {"command": command, "device": device_name, "torch": torch.__version__, "models": {}}
    for name in args.models:
        rec = result["models"][name] = {}
        teacher = benchmark_model(name).denoiser.to(args.device)
        rec["teacher"] = {"params": sum(p.numel() for p in teacher.parameters()),
                          "macs": count_macs(teacher).macs, "widths": widths(teacher)}
        rec["stock_ratios"] = []
        for ratio in args.ratios:
            student, row = pruned(teacher, ratio=ratio, layout="stock")
            rec["stock_ratios"].append({**row, "widths": widths(student)})
            write(args.results, result)
            del student
        try:
            stock, row = pruned(teacher, target_macs=args.target, layout="stock")
            rec["stock_target"] = {**row, "widths": widths(stock)}
        except DiffPruneError as e:  # then the nearest of the two steps the refusal names
            rec["stock_target"] = {"target_macs": args.target, "error": str(e)}
            steps = [float(x) for x in re.search(r"ask for one of ([0-9.]+(?: and [0-9.]+)?)", str(e))[1].split(" and ")]
            stock, row = pruned(teacher, target_macs=min(steps, key=lambda v: abs(v - args.target)), layout="stock")
            rec["stock_ratios"].append({**row, "widths": widths(stock), "nearest": True})
        write(args.results, result)
        reached = row["macs_fraction"]
        if not args.no_plain_check:
            rec["plain_load"] = {"macs_fraction": reached, "widths": widths(stock), **plain_check(stock, args.device)}
            write(args.results, result)
        free, rec["free"] = pruned(teacher, target_macs=reached)  # the free layout at the stock model's MACs
        write(args.results, result)
        torch.backends.cudnn.deterministic = False  # timed with the default kernels
        dtype = getattr(torch, args.dtype)
        models = {"teacher": teacher, "free": free, "stock": stock}
        rec["latency_ms"] = timed({k: m.to(dtype) for k, m in models.items()}, args.batches, args.repeats,
                                  args.rounds, args.device)
        rec["latency_dtype"] = args.dtype
        write(args.results, result)
        del teacher, free, stock, models
        torch.backends.cudnn.deterministic = True


def write(results: str, result: dict) -> None:
    res = Path(results)
    res.parent.mkdir(parents=True, exist_ok=True)
    res.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# The stock layout at full size (magnitude, random weights; {result['device']})\n",
             f"`{result['command']}`\n"]
    for name, rec in result["models"].items():
        t = rec["teacher"]
        lines += [f"## {name}: {t['params'] / 1e6:.1f}M params, {t['macs'] / 1e9:.3g}G MACs/call, widths "
                  f"{t['widths']}\n", "| layout | asked | MACs kept | params | widths | prune time |",
                  "| --- | --- | ---: | ---: | --- | ---: |"]
        rows = [("stock", r) for r in rec.get("stock_ratios", []) if not r.get("nearest")]
        rows += [("stock", rec["stock_target"])] if "stock_target" in rec else []
        rows += [("stock", r) for r in rec.get("stock_ratios", []) if r.get("nearest")]
        rows += [("free", rec["free"])] if "free" in rec else []
        for layout, r in rows:
            if r is None:
                continue
            asked = (f"ratio {r['ratio']}" if "ratio" in r else f"target_macs {r['target_macs']:.4g}") + (
                " (the nearest step)" if r.get("nearest") else "")
            if "error" in r:
                lines.append(f"| {layout} | {asked} | refused: {r['error']} | | | |")
                continue
            lines.append(f"| {layout} | {asked} | {r['macs_fraction']:.4f} | {r['params'] / 1e6:.1f}M | "
                         f"{r.get('widths') or 'free'} | {r['seconds']:.0f} s |")
        if "plain_load" in rec:
            pl = rec["plain_load"]
            said = (f"loaded; outputs {'bitwise equal' if pl['bitwise'] else 'differ'} (largest difference "
                    f"{pl['max_abs_diff']:.3g}, mean output magnitude {pl['output_abs_mean']:.3g})" if pl["loaded"]
                    else f"NOT loaded: {pl['error']}")
            lines += ["", f"Plain diffusers `from_pretrained` of the stock model (free: pruned to its {pl['macs_fraction']:.4f} of the "
                          f"MACs; {pl['widths']}), float32, no diffprune in the process: {said}."]
        if "latency_ms" in rec:
            lat, batches = rec["latency_ms"], list(rec["latency_ms"]["teacher"])
            lines += ["", f"Latency per denoiser call ({rec['latency_dtype']}), median over rounds:\n",
                      "| batch | teacher | free | stock | free speedup | stock speedup |",
                      "| ---: | ---: | ---: | ---: | ---: | ---: |"]
            for b in batches:
                tt, f, s = lat["teacher"][b], lat["free"][b], lat["stock"][b]
                lines.append(f"| {b} | {tt:.2f} ms | {f:.2f} ms | {s:.2f} ms | {tt / f:.2f}x | {tt / s:.2f}x |")
        lines.append("")
    res.with_suffix(".md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
