"""Export a denoiser, pruned or not, to ONNX for deployment runtimes (ONNX Runtime, OpenVINO, TensorRT).

The exported graph is the denoiser's own ``forward``: its inputs are the keyword inputs of one call, named as
diffusers names them (``sample`` or ``hidden_states``, ``timestep``, and the family's conditioning:
``class_labels``, ``encoder_hidden_states``, SDXL's ``text_embeds``/``time_ids``, SD3/Flux's ``pooled_projections``,
Flux's ``img_ids``/``txt_ids``/``guidance``, PixArt's ``encoder_attention_mask``), and its one output is
``out_sample``, the model's whole output (a learned-variance model's too), as optimum's ONNX denoisers name it. The
batch dimension is dynamic. A pruned model needs nothing from diffprune at inference once exported: its widths are in
the graph.

Every export is checked before it is published: ONNX Runtime's output on a fresh random input at another batch size
must equal PyTorch's within ``atol`` (recorded in ``export.json`` with the measured difference); otherwise nothing is
written. Needs the ``export`` extra: ``pip install 'diffprune[export]'`` (onnx, onnxruntime, onnxscript).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from torch import nn

from .errors import DiffPruneError, require

FORMATS = ("onnx",)
EXPORTERS = ("auto", "dynamo", "torchscript")  # auto: dynamo, then the TorchScript exporter if dynamo fails
EXPORT_BATCH = 3  # the example batch the graph is traced at (odd, so no other first dimension is mistaken for it)
ONNX_NAME = "model.onnx"


def require_onnx():
    """onnx and onnxruntime, or the install hint."""
    import importlib

    try:
        importlib.import_module("onnx")  # the exporter writes with it
        onnxruntime = importlib.import_module("onnxruntime")
    except ImportError:
        raise DiffPruneError("ONNX export needs onnx and onnxruntime: pip install 'diffprune[export]'") from None
    return onnxruntime


def flat_inputs(adapter, model: nn.Module, batch_size: int, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """One call's inputs as named tensors (nested ``added_cond_kwargs`` flattened into their own names), the
    noisy input random (``seed``), integer inputs as the adapter makes them."""
    inputs = adapter.example_inputs(model, batch_size)
    flat = {}
    for name, value in inputs.items():
        for k, v in (value.items() if isinstance(value, dict) else [(name, value)]):
            if v is not None:  # e.g. PixArt's resolution/aspect ratio, None below 1024 px
                flat[k] = v
    x = flat[adapter.sample_arg]
    flat[adapter.sample_arg] = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).to(x.dtype)
    return flat


class _Graph(nn.Module):
    """The denoiser as a function of flat tensors in the order of ``names`` (what the ONNX graph takes)."""

    def __init__(self, model: nn.Module, nested: dict[str, list[str]], names: list[str]):
        super().__init__()
        self.model, self.nested, self.names = model, nested, names

    def forward(self, *args):
        flat = dict(zip(self.names, args))
        kwargs = {k: v for k, v in flat.items() if not any(k in keys for keys in self.nested.values())}
        for group, keys in self.nested.items():
            kwargs[group] = {k: flat.get(k) for k in keys}
        return self.model(**kwargs).sample


def _nested(adapter, model) -> dict[str, list[str]]:
    return {k: list(v) for k, v in adapter.example_inputs(model, 1).items() if isinstance(v, dict)}


def _batched(flat: dict, batch_size: int) -> list[str]:
    return [k for k, v in flat.items() if v.dim() >= 1 and v.shape[0] == batch_size]


def _export(graph: _Graph, flat: dict, path: Path, exporter: str, opset: int | None) -> None:
    names = list(flat)
    dynamic = _batched(flat, EXPORT_BATCH)
    args = tuple(flat[k] for k in names)
    if exporter == "dynamo":
        batch = torch.export.Dim("batch")
        shapes = tuple({0: batch} if k in dynamic else None for k in names)
        torch.onnx.export(graph, args, str(path), input_names=names, output_names=["out_sample"],
                          dynamic_shapes=(shapes,), dynamo=True, opset_version=opset, verbose=False)
    else:
        axes = {k: {0: "batch"} for k in dynamic} | {"out_sample": {0: "batch"}}
        torch.onnx.export(graph, args, str(path), input_names=names, output_names=["out_sample"],
                          dynamic_axes=axes, dynamo=False, opset_version=opset or 17)


def _export_checked(graph: _Graph, flat: dict, path: Path, exporter: str, opset: int | None, adapter, model,
                    atol: float) -> tuple[str, dict]:
    """Export with ``exporter`` and check the graph with ONNX Runtime; ``auto`` tries torch.export (dynamo) first and
    the TorchScript exporter when dynamo cannot trace the model with a dynamic batch or its graph fails the check.
    Returns ``(the exporter that wrote the graph, the check)``."""
    import logging
    import warnings

    order = ("dynamo", "torchscript") if exporter == "auto" else (exporter,)
    errors = []
    for name in order:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                logging.getLogger("torch.export").setLevel(logging.CRITICAL)
                _export(graph, flat, path, name, opset)
            return name, check_onnx(path, graph, adapter, model, atol=atol)
        except Exception as e:  # torch.export, the ONNX exporters and ONNX Runtime raise many kinds
            cause = e.__cause__ or e  # torch.export wraps the error that says what failed
            errors.append(f"{name}: {type(cause).__name__}: {(str(cause).strip().splitlines() or [''])[0][:160]}")
    raise DiffPruneError(f"ONNX export of this {adapter.name} model failed, nothing was written ({'; '.join(errors)}); "
                         "try another --opset or --exporter, or report it with the model's config")


def check_onnx(path: Path, graph: _Graph, adapter, model, *, batch_size: int = 5, atol: float = 1e-4) -> dict:
    """ONNX Runtime vs PyTorch on a fresh random input of another batch size: ``{max_abs_diff, atol, batch}``."""
    ort = require_onnx()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    flat = flat_inputs(adapter, model, batch_size, seed=1)
    wanted = {i.name for i in session.get_inputs()}
    got = session.run(["out_sample"], {k: v.numpy() for k, v in flat.items() if k in wanted})[0]
    with torch.no_grad():
        ref = graph(*(flat[k] for k in graph.names))
    diff = float((torch.from_numpy(got) - ref).abs().max())
    require(diff <= atol, f"ONNX Runtime's output differs from PyTorch's by {diff:.3g} (> atol {atol}); the export "
                          "is wrong, nothing was written: report it with the model's config")
    return {"max_abs_diff": diff, "atol": atol, "batch": batch_size}


def export_model(model: str | os.PathLike, out: str | os.PathLike, *, fmt: str = "onnx", exporter: str = "auto",
                 opset: int | None = None, atol: float = 1e-4, overwrite: bool = False) -> dict:
    """Export the denoiser of ``model`` (any folder, name or hub id diffprune loads) to ``out/model.onnx`` with
    ``export.json``; returns the record. Runs on the CPU, in the model's dtype."""
    from ._fs import atomic_dir, atomic_write_json
    from .io import load_model

    require(fmt in FORMATS, f"format {fmt!r} is not supported; choose from {list(FORMATS)}")
    require(exporter in EXPORTERS, f"exporter {exporter!r} is unknown; choose from {list(EXPORTERS)}")
    require_onnx()
    loaded = load_model(model, device="cpu")
    net, adapter = loaded.denoiser.eval(), loaded.adapter
    flat = flat_inputs(adapter, net, EXPORT_BATCH)
    graph = _Graph(net, _nested(adapter, net), list(flat)).eval()
    t0 = time.perf_counter()
    batched = _batched(flat, EXPORT_BATCH)
    with atomic_dir(out, overwrite=overwrite, kind="export", inputs=(model,)) as tmp:
        net.requires_grad_(False)
        exporter, check = _export_checked(graph, flat, tmp / ONNX_NAME, exporter, opset, adapter, net, atol)
        shapes = {k: ["batch", *v.shape[1:]] if k in batched else list(v.shape) for k, v in flat.items()}
        record = {"format": fmt, "exporter": exporter, "opset": opset, "source": str(model), "family": adapter.name,
                  "inputs": {k: {"shape": shapes[k], "dtype": str(v.dtype).replace("torch.", "")}
                             for k, v in flat.items()},
                  "output": "out_sample", "check": check, "seconds": round(time.perf_counter() - t0, 1),
                  "pruned": loaded.pruning is not None, "versions": _versions()}
        atomic_write_json(tmp / "export.json", record)
    return record


def _versions() -> dict:
    import onnx
    import onnxruntime

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


__all__ = ["EXPORTERS", "FORMATS", "check_onnx", "export_model", "flat_inputs", "require_onnx"]
