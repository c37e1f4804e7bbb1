"""Adapter for diffusers ``UNet2DModel`` (pixel or latent, unconditional or class-conditional).

* ``conv_out`` is never pruned (its output is the prediction).
* GroupNorm layers keep a valid group count: Torch-Pruning treats ``num_groups`` as channel groups, so every
  group loses the same number of channels.
* Attention: heads, widths and scale written back (:mod:`diffprune.adapters._attention`).
* Class conditioning (``num_class_embeds`` with ``class_embed_type=None``): ``class_embedding`` is an
  ``nn.Embedding`` added to the time embedding; its width follows the time embedding's. Labels ``0 ..
  num_class_embeds - 1``; the model has no null label, so no classifier-free guidance.
* ``Upsample2D``/``Downsample2D`` assert ``input.shape[1] == self.channels``: ``channels``/``out_channels`` are
  set from the shapes a forward pass actually sees; ``ResnetBlock2D.in_channels/out_channels`` from its convs.
* A forward pass after pruning checks output shape and finiteness. Tracing runs with gradient checkpointing off.
"""
from __future__ import annotations

from torch import nn

from ..errors import DiffPruneError
from . import ADAPTERS, Conditioning, ModelAdapter, _attention


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
    # down blocks, mid block, up blocks: the order a sample flows through (UNet2DConditionModel's too)
    flow = ("conv_in", "time_embedding", "class_embedding", "down_blocks", "mid_block", "up_blocks", "conv_norm_out",
            "conv_out")

    def conditioning(self, model):
        n = model.config.num_class_embeds
        if n is None:
            return None
        if model.config.class_embed_type is not None:
            raise DiffPruneError(f"UNet2DModel class_embed_type={model.config.class_embed_type!r} is not supported; "
                                 "class labels are supported through num_class_embeds (class_embed_type=None)")
        return Conditioning("class", int(n), None)

    def ignored_layers(self, model):
        return [model.conv_out]

    def conditioning_paths(self, model):
        return [n for n in ("time_embedding", "class_embedding", "add_embedding") if getattr(model, n, None) is not None]

    def num_heads(self, model):
        return _attention.num_heads(model)

    def snapshot(self, model):
        return {"attention": _attention.snapshot(model)}

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
        with self.tracing(model):
            attention = _attention.finalize(model, snapshot["attention"], heads)
            resampling = self._fix_shapes_by_forward(model)
        return {"attention": attention, "resampling": resampling}

    def restore_(self, model, meta):
        with self.tracing(model):
            _attention.write(model, meta.get("attention", {}), fold=None)
            self._fix_shapes_by_forward(model)


ADAPTERS.register("unet2d")(UNet2DAdapter())
