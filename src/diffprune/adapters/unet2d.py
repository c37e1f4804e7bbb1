"""Adapter for diffusers ``UNet2DModel``: all surgery specific to its blocks.

* ``conv_out`` is never pruned (its output is the predicted noise).
* GroupNorm layers keep a valid group count: Torch-Pruning treats ``num_groups`` as channel groups, so every
  group loses the same number of channels.
* Attention (diffusers ``Attention`` with ``to_q``/``to_k``/``to_v``/``to_out``): the three projections are coupled
  through ``scaled_dot_product_attention``, so they lose the same channels; with ``num_heads`` given to
  Torch-Pruning the same positions go in every head (head dims shrink) or, with ``prune_heads``, whole heads go.
  Afterwards ``heads``, ``inner_dim`` and ``scale`` are written back.
* Attention scale: the trained model used ``dim_head ** -0.5`` (``AttnProcessor2_0`` leaves the scale to SDPA,
  which takes ``1/sqrt(q.shape[-1])``). Shrinking ``dim_head`` would silently change it. We keep the trained
  effective scale by folding ``old_scale / new_scale`` into ``to_q`` (weight and bias) and setting
  ``attn.scale = new_dim_head ** -0.5``; every processor (SDPA or the classic one that reads ``attn.scale``) then
  computes exactly the trained logits.
* ``Upsample2D``/``Downsample2D`` assert ``input.shape[1] == self.channels``: ``channels``/``out_channels`` are
  set from the shapes a forward pass actually sees; ``ResnetBlock2D.in_channels/out_channels`` from its convs.
* A forward pass after pruning checks output shape and finiteness. Tracing runs with gradient checkpointing off.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from ..errors import DiffPruneError
from ..macs import unet_example_inputs
from . import ADAPTERS, ModelAdapter


def _attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    from diffusers.models.attention_processor import Attention

    return {n: m for n, m in model.named_modules() if isinstance(m, Attention)}


def _resampling_modules(model: nn.Module) -> dict[str, nn.Module]:
    from diffusers.models.downsampling import Downsample2D
    from diffusers.models.upsampling import Upsample2D

    return {n: m for n, m in model.named_modules() if isinstance(m, (Upsample2D, Downsample2D))}


def _resampling_conv(m: nn.Module):
    conv = getattr(m, "conv", None)
    if not isinstance(conv, (nn.Conv2d, nn.ConvTranspose2d)):
        conv = getattr(m, "Conv2d_0", None)
    return conv if isinstance(conv, (nn.Conv2d, nn.ConvTranspose2d)) else None


class UNet2DAdapter(ModelAdapter):
    name = "unet2d"
    model_classes = ("UNet2DModel",)

    def example_inputs(self, model, batch_size=1, device=None):
        return unet_example_inputs(model, batch_size, device)

    def ignored_layers(self, model):
        return [model.conv_out]

    def num_heads(self, model):
        heads = {}
        for attn in _attention_modules(model).values():
            for proj in (attn.to_q, attn.to_k, attn.to_v):
                heads[proj] = int(attn.heads)
        return heads

    def attention_heads(self, model) -> dict[str, int]:
        """Attention module name -> current number of heads."""
        return {n: int(a.heads) for n, a in _attention_modules(model).items()}

    def snapshot(self, model):
        return {
            "attention": {
                n: {"heads": int(a.heads), "dim_head": a.to_q.out_features // int(a.heads), "scale": float(a.scale)}
                for n, a in _attention_modules(model).items()
            }
        }

    @contextlib.contextmanager
    def tracing(self, model) -> Iterator[nn.Module]:
        was_training = model.training
        ckpt = bool(getattr(model, "is_gradient_checkpointing", False))
        if ckpt:
            model.disable_gradient_checkpointing()
        model.eval()
        try:
            yield model
        finally:
            if ckpt:
                model.enable_gradient_checkpointing()
            model.train(was_training)

    # ---- after pruning ------------------------------------------------------------------------------------
    def _write_attention(self, model, attention_meta: dict, fold: dict | None) -> None:
        modules = _attention_modules(model)
        for name, meta in attention_meta.items():
            if name not in modules:
                raise DiffPruneError(f"pruning record names attention {name!r}, which this model does not have")
            attn = modules[name]
            heads, q_out = int(meta["heads"]), attn.to_q.out_features
            dim_head = int(meta.get("dim_head", q_out // max(heads, 1)))
            if (heads < 1 or q_out % heads or heads * dim_head != q_out or attn.to_k.out_features != q_out
                    or attn.to_v.out_features != q_out):
                raise DiffPruneError(
                    f"attention {name!r}: q/k/v widths {q_out}/{attn.to_k.out_features}/{attn.to_v.out_features} "
                    f"do not split into {heads} heads of {dim_head}; the pruning record does not match the weights"
                )
            if fold is not None and fold.get(name, 1.0) != 1.0:
                with torch.no_grad():
                    attn.to_q.weight.mul_(fold[name])
                    if attn.to_q.bias is not None:
                        attn.to_q.bias.mul_(fold[name])
            attn.heads = heads
            attn.inner_dim = q_out
            attn.inner_kv_dim = attn.to_k.out_features
            attn.query_dim = attn.to_q.in_features
            attn.out_dim = attn.to_out[0].out_features
            attn.scale = float(meta["scale"])

    def _fix_shapes_by_forward(self, model, device=None) -> dict:
        """Set Up/Downsample2D and ResnetBlock2D channel attributes from what one forward pass sees; check output."""
        from diffusers.models.resnet import ResnetBlock2D

        record: dict[str, dict[str, int]] = {}
        handles = []
        for name, m in _resampling_modules(model).items():
            def hook(mod, args, kwargs, name=name):
                hs = args[0] if args else kwargs["hidden_states"]
                mod.channels = int(hs.shape[1])
                conv = _resampling_conv(mod)
                mod.out_channels = int(conv.out_channels) if conv is not None else mod.channels
                record[name] = {"channels": mod.channels, "out_channels": mod.out_channels}
            handles.append(m.register_forward_pre_hook(hook, with_kwargs=True))
        for m in model.modules():
            if isinstance(m, ResnetBlock2D):
                m.in_channels = m.conv1.in_channels
                m.out_channels = m.conv2.out_channels
        try:
            self.check(model, device)
        finally:
            for h in handles:
                h.remove()
        return dict(sorted(record.items()))

    def finalize_(self, model, snapshot, heads=None):
        heads = heads or {}
        attention, fold = {}, {}
        for name, attn in _attention_modules(model).items():
            before = snapshot["attention"][name]
            n_heads = int(heads.get(name, before["heads"]))
            q_out = attn.to_q.out_features
            if n_heads < 1 or q_out % n_heads:
                raise DiffPruneError(f"attention {name!r}: {q_out} channels do not split into {n_heads} heads")
            dim_head = q_out // n_heads
            new_scale = dim_head ** -0.5 if getattr(attn, "scale_qk", True) else 1.0
            fold[name] = before["scale"] / new_scale
            attention[name] = {"heads": n_heads, "dim_head": dim_head, "scale": new_scale,
                               "q_scale_folded": fold[name], "trained_scale": before["scale"]}
        with self.tracing(model):
            self._write_attention(model, attention, fold)
            resampling = self._fix_shapes_by_forward(model)
        return {"attention": attention, "resampling": resampling}

    def restore_(self, model, meta):
        with self.tracing(model):
            self._write_attention(model, meta.get("attention", {}), fold=None)
            self._fix_shapes_by_forward(model)

    def check(self, model, device=None):
        inputs = self.example_inputs(model, 1, device)
        g = torch.Generator().manual_seed(0)
        inputs["sample"] = torch.randn(inputs["sample"].shape, generator=g).to(inputs["sample"])
        with torch.no_grad():
            out = model(**inputs).sample
        expected = (1, model.config.out_channels, *inputs["sample"].shape[2:])
        if tuple(out.shape) != expected:
            raise DiffPruneError(f"pruned model outputs shape {tuple(out.shape)}, expected {expected}")
        if not torch.isfinite(out).all():
            raise DiffPruneError("pruned model outputs non-finite values (NaN/inf) on a random input")


ADAPTERS.register("unet2d")(UNet2DAdapter())
