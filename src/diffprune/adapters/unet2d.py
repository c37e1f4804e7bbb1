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
* Stock layout (``prune --layout stock``): the config has one width per level (``block_out_channels``), the
  timestep embedding's width (``time_embedding_dim``) and a fixed head dim (``attention_head_dim``). So every group of
  one level keeps the same width (:meth:`width_tie`), attentions lose whole heads, and the first level's width also
  sizes the sinusoidal timestep features (``Timesteps(block_out_channels[0])``): it can shrink only by a whole factor
  ``m`` with ``freq_shift=0``, where the narrower features are exactly every ``m``-th frequency of the wider ones,
  and ``time_embedding.linear_1`` keeps the inputs of those (:func:`_narrow_time_proj`); otherwise it stays whole.
"""
from __future__ import annotations

import itertools

import torch
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
    stock_widths = True

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

    def whole_heads(self, model):
        # the stock config fixes the head dim (attention_head_dim; None: one head as wide as the level)
        if not self.stock or model.config.attention_head_dim is None:
            return []
        return list(self.num_heads(model))

    def width_tie(self, model, name):
        widths = list(model.config.block_out_channels)
        head, _, rest = name.partition(".")
        index = rest.split(".")[0]
        if head in ("time_embedding", "class_embedding", "add_embedding"):
            return "time"  # time_embedding_dim: the timestep embedding's hidden and output width (SDXL's added one)
        if head in ("conv_in", "conv_norm_out"):
            level = 0
        elif head == "mid_block":
            level = len(widths) - 1
        elif head in ("down_blocks", "up_blocks") and index.isdigit():
            level = int(index) if head == "down_blocks" else len(widths) - 1 - int(index)
        else:
            return None
        # a level as wide as the one before it starts with an identity residual (no conv_shortcut) from that one's
        # downsampler: the two keep one width, or the stock config would build a shortcut the model does not have
        while level > 0 and widths[level - 1] == widths[level]:
            level -= 1
        return f"level {level}"

    def tie_widths(self, model, key, width):
        if key != "level 0":
            return None
        cfg = model.config
        if cfg.time_embedding_type != "positional" or cfg.freq_shift != 0:
            return [width]  # the timestep features of another width are other functions of t
        return [width // m for m in range(1, width // 2 + 1) if width % m == 0 and (width // m) % 2 == 0]

    def choose_widths(self, model, options):
        """The nearest allowed widths, unless two neighbouring levels of different widths would become equal: the
        deeper one's first ResNet has a ``conv_shortcut`` only while they differ, so the stock config would drop it.
        Then the legal combination of level widths nearest the selection's (summed distance relative to each level's
        widest) is taken."""
        chosen = super().choose_widths(model, options)
        levels = sorted((k for k in options if k.startswith("level ")), key=lambda k: int(k.split()[1]))

        def legal(widths) -> bool:  # neighbouring keys were different widths (equal neighbours share one key)
            return all(a != b for a, b in zip(widths, widths[1:]))

        if legal([chosen[k] for k in levels]):
            return chosen
        combos = (c for c in itertools.product(*(options[k][0] for k in levels)) if legal(c))
        best = min(combos, key=lambda c: sum(abs(w - options[k][1]) / max(options[k][0]) for k, w in zip(levels, c)),
                   default=None)
        if best is None:
            raise DiffPruneError(f"--layout stock: no widths of {levels} keep neighbouring levels different, as this "
                                 "UNet2DModel's config needs; prune in the free layout (the default)")
        return {**chosen, **dict(zip(levels, best))}

    def stock_config(self, model, config):
        widths = [int(block.resnets[0].conv2.out_channels) for block in model.down_blocks]
        return {**config, "block_out_channels": widths,
                "time_embedding_dim": int(model.time_embedding.linear_1.out_features)}

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
        meta = {}
        if self.stock:  # the timestep features follow the first level; whole heads went (the head dim is
            if self.whole_heads(model):  # the config's), unless the config has one head per attention
                heads = {n: a.to_q.out_features // snapshot["attention"][n]["dim_head"]
                         for n, a in _attention.attention_modules(model).items()}
            if model.conv_in.out_channels != model.time_proj.num_channels:
                meta["time_proj"] = _narrow_time_proj(model, model.conv_in.out_channels)
        with self.tracing(model):
            attention = _attention.finalize(model, snapshot["attention"], heads)
            resampling = self._fix_shapes_by_forward(model)
        return {"attention": attention, "resampling": resampling, **meta}

    def restore_(self, model, meta):
        with self.tracing(model):
            if "time_proj" in meta:
                _narrow_time_proj(model, meta["time_proj"]["num_channels"])
            _attention.write(model, meta.get("attention", {}), fold=None)
            self._fix_shapes_by_forward(model)


def _narrow_time_proj(model, width: int) -> dict:
    """``Timesteps`` narrowed to ``width`` features, and ``time_embedding.linear_1`` to the inputs that carry them:
    with ``downscale_freq_shift=0`` the ``width`` features are exactly every ``m``-th frequency (``m = old / width``)
    of the old ones, in both halves (sin and cos), so the kept inputs see the same values as before."""
    proj, linear = model.time_proj, model.time_embedding.linear_1
    old, m = int(proj.num_channels), int(proj.num_channels) // width
    if width < 2 or width % 2 or old % width or proj.downscale_freq_shift != 0:
        raise DiffPruneError(f"the timestep features ({old}, freq_shift {proj.downscale_freq_shift}) cannot be "
                             f"narrowed to {width}: only by a whole factor, with freq_shift 0")
    half = old // 2
    kept = [m * i for i in range(width // 2)] + [half + m * i for i in range(width // 2)]
    linear.weight = nn.Parameter(linear.weight.detach()[:, torch.tensor(kept, device=linear.weight.device)].clone(),
                                 requires_grad=linear.weight.requires_grad)
    linear.in_features, proj.num_channels = width, width
    return {"num_channels": width, "features": kept}


ADAPTERS.register("unet2d")(UNet2DAdapter())
