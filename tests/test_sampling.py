import numpy as np
import torch
from diffusers import DDIMScheduler

from diffprune.presets import build_model
from diffprune.samples import load_samples, save_samples
from diffprune.sampling import QuadDDIMScheduler, default_scheduler, sample, skip_timesteps


def _unet():
    torch.manual_seed(0)
    return build_model("tiny").eval()


def test_seed_invariance_across_batch_sizes():
    unet, sched = _unet(), default_scheduler()
    for sampler in ("ddim", "ddpm"):
        a = sample(unet, sched, seeds=range(10, 17), num_inference_steps=5, sampler=sampler, batch_size=7, progress=False)
        b = sample(unet, sched, seeds=range(10, 17), num_inference_steps=5, sampler=sampler, batch_size=1, progress=False)
        assert a.shape == (7, 1, 8, 8)
        torch.testing.assert_close(a, b, atol=1e-3, rtol=0)
        # a seed's image does not depend on its neighbours
        c = sample(unet, sched, seeds=[13], num_inference_steps=5, sampler=sampler, progress=False)
        torch.testing.assert_close(a[3:4], c, atol=1e-3, rtol=0)


def test_quad_timesteps_follow_ddim_paper():
    seq = skip_timesteps(1000, 10, "quad")
    expected = np.unique((np.linspace(0, np.sqrt(800), 10) ** 2).astype(int))[::-1]
    assert seq.tolist() == expected.tolist() == [800, 632, 483, 355, 246, 158, 88, 39, 9, 0]
    assert skip_timesteps(1000, 10, "uniform").tolist() == list(range(900, -1, -100))
    # for many steps the first squares repeat: each repeat moves to one past the value before it, so exactly S
    # distinct steps remain (the paper's code would run 49 of 50), equal to the paper's squares past the repeats
    for S in (30, 50, 100, 1000):
        seq = skip_timesteps(1000, S, "quad")[::-1]
        squares = (np.linspace(0, np.sqrt(800), S) ** 2).astype(int)
        assert len(seq) == S and (np.diff(seq) >= 1).all() and seq[-1] == max(800, S - 1)
        assert (seq >= squares).all() and (seq[squares >= S] == squares[squares >= S]).all()
    assert skip_timesteps(1000, 50, "quad")[::-1][:6].tolist() == [0, 1, 2, 3, 5, 8]
    s = QuadDDIMScheduler(num_train_timesteps=1000)
    s.set_timesteps(50, skip="quad")
    assert s.num_inference_steps == len(s.timesteps) == 50


def test_quad_step_uses_true_previous_timestep():
    base = default_scheduler()
    s = QuadDDIMScheduler.from_config(base.config)
    s.set_timesteps(10, skip="quad")
    x, eps = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    t, prev = 632, 483
    assert s.previous_timestep(t) == prev
    a_t, a_p = base.alphas_cumprod[t], base.alphas_cumprod[prev]
    x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    x0 = x0.clamp(-1, 1)  # DDPM config clips predicted x0 at 1
    expected = a_p.sqrt() * x0 + (1 - a_p).sqrt() * eps
    torch.testing.assert_close(s.step(eps, t, x).prev_sample, expected)


def test_uniform_matches_stock_ddim():
    unet, sched = _unet(), default_scheduler()
    ours = sample(unet, sched, seeds=[0], num_inference_steps=10, progress=False)
    ddim = DDIMScheduler.from_config(sched.config)
    ddim.set_timesteps(10)
    x = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for t in ddim.timesteps:
            x = ddim.step(unet(x, t).sample, t, x).prev_sample
    torch.testing.assert_close(ours, x.clamp(-1, 1), atol=1e-4, rtol=0)


def test_sample_folder_round_trip(tmp_path):
    imgs = torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8)
    save_samples(imgs, [7, 8, 9, 10, 11], tmp_path, {"steps": 3})
    loaded, seeds = load_samples(tmp_path)
    assert torch.equal(loaded, imgs) and seeds.tolist() == [7, 8, 9, 10, 11]
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["00000.png", "00001.png", "00002.png", "00003.png",
                                                                "00004.png", "grid.png"]


def test_non_square_sample_size_comes_from_the_config():
    from diffprune.adapters import adapter_for
    from diffprune.macs import count_macs
    from diffprune.presets import PRESETS

    torch.manual_seed(0)
    unet = build_model({**PRESETS.get("tiny"), "sample_size": (8, 4)}).eval()
    assert adapter_for(unet).input_shape(unet) == (1, 8, 4)
    assert sample(unet, default_scheduler(), seeds=[0, 1], num_inference_steps=2, progress=False).shape == (2, 1, 8, 4)
    assert count_macs(unet).per_layer["conv_in"] == 8 * 4 * 8 * 1 * 9  # 3x3, 1 -> 8 channels over 8x4 positions
