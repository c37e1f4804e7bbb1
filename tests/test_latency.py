"""The latency harness: finite medians of >= 10 runs, with threads, device and peak memory recorded."""
import math
import time

import pytest
import torch

from diffprune.errors import DiffPruneError
from diffprune.latency import measure, peak_memory, sampler_latency, denoiser_latency
from diffprune.presets import build_model
from diffprune.sampling import default_scheduler


def test_measure_returns_the_median_of_the_timed_runs():
    calls = []
    rec = measure(lambda: calls.append(time.sleep(0.001)), device="cpu", repeats=10, warmup=3)
    assert len(calls) == 13  # 3 warm-up + 10 timed
    assert rec["repeats"] == 10 and rec["warmup"] == 3
    assert 0.001 <= rec["min_s"] <= rec["median_s"] <= rec["max_s"] < 1.0
    assert rec["device"] == "cpu" and rec["threads"] == torch.get_num_threads() == 1
    assert rec["peak_memory_bytes"] > 10 * 2**20 and "ru_maxrss" in rec["peak_memory_kind"]


def test_fewer_than_ten_runs_are_refused():
    with pytest.raises(DiffPruneError, match="repeats=5 must be an integer >= 10"):
        measure(lambda: None, device="cpu", repeats=5)


def test_unet_and_sampler_latency_on_a_tiny_unet():
    unet = build_model("tiny")
    rec = denoiser_latency(unet, device="cpu", batch_sizes=(1, 4), repeats=10, warmup=1)
    assert sorted(rec) == ["1", "4"]
    for b, r in rec.items():
        assert math.isfinite(r["median_s"]) and r["median_s"] > 0
        assert r["batch_size"] == int(b) and r["per_image_s"] == pytest.approx(r["median_s"] / int(b))
        assert r["threads"] == 1 and r["device"] == "cpu"
    s = sampler_latency(unet, default_scheduler(), device="cpu", steps=2, batch_size=2, repeats=10, warmup=0)
    assert math.isfinite(s["per_image_s"]) and s["per_image_s"] == pytest.approx(s["median_s"] / 2)
    assert s["steps"] == 2 and s["batch_size"] == 2
    assert unet.training  # the model's mode is restored


def test_device_mismatch_is_an_error():
    with pytest.raises(DiffPruneError, match="move it first"):
        denoiser_latency(build_model("tiny"), device="meta", batch_sizes=(1,))


def test_peak_memory_says_what_it_measured():
    rec = peak_memory("cpu")
    assert rec["peak_memory_bytes"] > 0 and "whole process" in rec["peak_memory_kind"]


def test_latency_timing_shows_one_bar_per_batch_size_counting_every_call(capsys):
    unet = build_model("tiny").eval()
    denoiser_latency(unet, device="cpu", batch_sizes=(1, 2), repeats=10, warmup=2, progress=True)
    err = capsys.readouterr().err
    assert "latency (batch 1)" in err and "latency (batch 2)" in err and err.count("12/12") >= 2
    denoiser_latency(unet, device="cpu", batch_sizes=(1,), repeats=10, warmup=2)  # silent by default
    assert capsys.readouterr().err == ""
    sampler_latency(unet, default_scheduler(), device="cpu", steps=2, batch_size=2, repeats=10, warmup=1,
                    progress=True)
    assert "sampler latency (batch 2, 2 steps)" in capsys.readouterr().err
