"""The shared suite of the text-to-image denoiser families (as diffusers' ModelTesterMixin): a family's test class
says how to build a tiny model, a random conditioning batch and the stock pipeline's own call of the denoiser, and
which widths must survive pruning; the tests here check the adapter against the stock call, count MACs, prune with
magnitude and diff-pruning (calibration ``(x0, cond)`` given in memory) to 0.5x MACs, save -> load bitwise, keep a
share of each conditioning path, and refuse a conditioning of the wrong form with a one-line error."""
import math

import pytest
import torch
from diffusers import DDPMScheduler

from diffprune.adapters import adapter_for
from diffprune.errors import DiffPruneError
from diffprune.io import load_model, save_pruned
from diffprune.macs import count_macs
from diffprune.prune import PruneConfig, prune_

CALIB = {"calib_batch": 4, "max_timesteps": 3}


def scheduler():
    return DDPMScheduler(num_train_timesteps=50)


def attention_heads_split(model, record: dict) -> list[str]:
    """Names of the attention modules whose q/k/v widths do not split into the heads the record gives."""
    from diffusers.models.attention_processor import Attention

    bad = []
    for name, attn in model.named_modules():
        if isinstance(attn, Attention):
            q, k, v = attn.to_q.out_features, attn.to_k.out_features, attn.to_v.out_features
            heads = record[name]["heads"]
            if not (q == k == v and q % heads == 0 and attn.heads == heads and q // heads == record[name]["dim_head"]):
                bad.append(name)
    return bad


class TextFamilySuite:
    adapter_name: str = ""
    keys: tuple = ()
    channels: int = 4  # of x_t

    # --- what a family says -------------------------------------------------------------------------------------
    def build(self):
        """The tiny model (seeded)."""
        raise NotImplementedError

    def make_cond(self, n: int, length: int, generator) -> dict:
        raise NotImplementedError

    def stock_call(self, model, x, t, cond) -> torch.Tensor:
        """The prediction as the stock pipeline computes it (its own call of the denoiser)."""
        raise NotImplementedError

    def kept(self, model) -> dict:
        """Widths that pruning must never change, read from ``model`` (compared with :attr:`expected_kept`)."""
        raise NotImplementedError

    expected_kept: dict = {}

    # --- fixtures -----------------------------------------------------------------------------------------------
    @pytest.fixture(scope="class")
    def base(self):
        return self.build()

    def calibration(self, model, n: int = 6):
        g = torch.Generator().manual_seed(1)
        x0 = torch.randn(n, *adapter_for(model).input_shape(model), generator=g).clamp(-1, 1)
        return x0, self.make_cond(n, 12, g)

    @pytest.fixture(scope="class", params=["magnitude", "diff-pruning"])
    def pruned(self, request):
        return self.pruned_by(request.param)

    def pruned_by(self, method: str) -> dict:
        model = self.build()
        extra = CALIB if method == "diff-pruning" else {}
        report = prune_(model, PruneConfig(method=method, target_macs=0.5, **extra), self.calibration(model),
                        scheduler=scheduler(), progress=False)
        return dict(model=model, report=report, method=method)

    def inputs(self, model, n: int = 2, length: int = 12, seed: int = 2):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, *adapter_for(model).input_shape(model), generator=g)
        return x, torch.tensor([3, 40][:n]), self.make_cond(n, length, g)

    # --- the shared tests ---------------------------------------------------------------------------------------
    def test_adapter_is_picked_and_takes_a_dict(self, base):
        adapter = adapter_for(base)
        assert adapter.name == self.adapter_name
        assert adapter.conditioning(base).keys == self.keys

    def test_forward_is_the_stock_pipelines_call(self, base):
        adapter = adapter_for(base)
        x, t, cond = self.inputs(base)
        with torch.no_grad():
            ours = adapter.forward(base, x, t, cond)
            theirs = self.stock_call(base, x, t, cond)
        assert ours.shape == x.shape and torch.equal(ours, theirs)

    def test_macs_grow_with_the_context_and_count_the_conditioning_paths(self, base):
        adapter = adapter_for(base)
        spec = adapter.conditioning(base)
        counts = {}
        for length in (spec.context_length, 2 * spec.context_length):
            inputs = adapter.example_inputs(base)
            inputs.update(adapter.model_kwargs(base, self.make_cond(1, length, torch.Generator().manual_seed(0))))
            counts[length] = count_macs(base, inputs)
        default = count_macs(base)
        assert default.macs == counts[spec.context_length].macs
        assert counts[2 * spec.context_length].macs > default.macs
        for path in adapter.conditioning_paths(base):
            assert sum(v for k, v in default.per_layer.items() if k.startswith(path + ".")) > 0, path

    def test_prunes_to_half_the_macs_keeping_heads_and_the_fixed_widths(self, pruned):
        model, report = pruned["model"], pruned["report"]
        assert report.family == self.adapter_name and report.method == pruned["method"]
        assert abs(report.macs / report.base_macs - 0.5) <= 0.02 * 0.5
        assert report.params < report.base_params and report.macs == count_macs(model).macs
        if pruned["method"] == "diff-pruning":
            assert report.calibration["batch"] == 4 and report.calibration["accumulated"] == [0, 1, 2]
        assert attention_heads_split(model, report.structure["meta"]["attention"]) == []
        assert self.kept(model) == self.expected_kept
        x, t, cond = self.inputs(model)
        with torch.no_grad():
            out = adapter_for(model).forward(model, x, t, cond)
        assert out.shape == x.shape and torch.isfinite(out).all()

    def test_save_then_load_is_bitwise(self, pruned, tmp_path):
        model, report = pruned["model"], pruned["report"]
        save_pruned(model, tmp_path / "p", report.to_dict(), scheduler=scheduler())
        again = load_model(tmp_path / "p")
        assert again.adapter.name == self.adapter_name and again.pruning["family"] == self.adapter_name
        x, t, cond = self.inputs(model)
        with torch.no_grad():
            a = adapter_for(model).forward(model.eval(), x, t, cond)
            b = again.adapter.forward(again.denoiser.eval(), x, t, cond)
        assert torch.equal(a, b)

    def test_conditioning_floor_keeps_half_of_each_conditioning_path(self, base):
        widths = {}
        for floor in (None, 0.5):
            model = self.build()
            config = PruneConfig(method="magnitude", ratio=0.7, ratio_mode="uniform", global_ranking=True,
                                 conditioning_floor=floor)  # global ranking, no search: the floor decides
            prune_(model, config, progress=False)
            paths = adapter_for(model).conditioning_paths(model)
            widths[floor] = {n: m.out_features for n, m in model.named_modules()
                             if isinstance(m, torch.nn.Linear) and any(n.startswith(p + ".") for p in paths)}
        original = {n: m.out_features for n, m in base.named_modules() if n in widths[0.5]}
        assert original and all(widths[0.5][n] >= math.ceil(original[n] / 2) for n in original), (widths, original)
        assert any(widths[None][n] < math.ceil(original[n] / 2) for n in original)  # without it, a path loses more

    def test_conditioning_of_the_wrong_form_is_a_one_line_error(self, base):
        adapter = adapter_for(base)
        x, t, cond = self.inputs(base)
        expected = rf"takes a dict with keys \[{', '.join(repr(k) for k in self.keys)}\]"
        drop = "pooled" if "pooled" in self.keys else self.keys[-1]
        missing = {k: v for k, v in cond.items() if k != drop}
        for bad in (cond["context"], missing):
            with pytest.raises(DiffPruneError, match=expected) as err:
                adapter.forward(base, x, t, bad)
            assert "\n" not in str(err.value)
        x0, cond = self.calibration(base)
        with pytest.raises(DiffPruneError, match="calibration conditioning: this model " + expected):
            prune_(self.build(), PruneConfig(method="diff-pruning", target_macs=0.5, **CALIB), (x0, cond["context"]),
                   scheduler=scheduler(), progress=False)
