"""The report: pruning.json accessors, figures present, HTML self-contained, Markdown beside its PNGs."""
import re

import torch
from PIL import Image

from diffprune.report import metrics_rows, timestep_losses, width_changes, write_report

PRUNING = {
    "base_widths": {"conv_in": [1, 8], "down_blocks.0.resnets.0.norm1": [8, 8], "down_blocks.0.resnets.0.conv1": [8, 8],
                      "mid_block.attentions.0.to_q": [16, 16], "conv_out": [8, 1]},
    "widths": {"conv_in": [1, 4], "down_blocks.0.resnets.0.norm1": [4, 4], "down_blocks.0.resnets.0.conv1": [4, 4],
                     "mid_block.attentions.0.to_q": [8, 8], "conv_out": [4, 1]},
    "calibration": {"losses": {"t": [0, 1, 2, 3], "loss": [0.9, 1.0, 0.4, 0.04]}, "cutoff_t": 3,
                    "stopped_by": "threshold", "timesteps": {"name": "threshold", "thr": 0.05}},
}


def test_width_changes_reads_out_channels_and_skips_norms():
    assert width_changes(PRUNING) == {"conv_in": (8, 4), "down_blocks.0.resnets.0.conv1": (8, 4),
                                     "mid_block.attentions.0.to_q": (16, 8), "conv_out": (1, 1)}
    assert width_changes(None) == {} and width_changes({"method": "magnitude"}) == {}


def test_timestep_losses_both_layouts_and_data_free():
    c = timestep_losses(PRUNING)
    assert c.t == [0, 1, 2, 3] and c.loss == [0.9, 1.0, 0.4, 0.04] and c.cutoff_t == 3
    assert c.stopped_by == "threshold" and c.thr == 0.05
    pairs = {"calibration": {"losses": [[0, 0.5], [1, 0.25]], "cutoff_t": 1}}
    assert timestep_losses(pairs)[:3] == ([0, 1], [0.5, 0.25], 1)
    assert timestep_losses({"calibration": None}).t == []


def _images(n, seed):
    return torch.randint(0, 256, (n, 1, 16, 16), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


METRICS = {"params": 1000, "base_params": 4000, "macs": 2_000_000, "base_macs": 8_000_000, "fid": 12.5,
           "fid_teacher": 10.0, "ssim": 0.8, "mse": 0.01, "speedup": 2.5, "mac_ratio": 4.0, "device": "cpu",
           "threads": 1, "seeds": {"first": 0, "n": 16}, "versions": {"torch": torch.__version__},
           "names": {"student": "pruned", "teacher": "teacher"}}


def test_full_report_files_and_self_contained_html(tmp_path):
    log = {"step": [0, 10, 20, 30], "loss": [0.5, 0.3, 0.2, 0.15], "lr": [1e-4] * 4, "images_per_s": [10.0] * 4}
    written = write_report(tmp_path, METRICS, student_images=_images(16, 1), teacher_images=_images(16, 2),
                           seeds=list(range(16)), pruning=PRUNING, train_log=log)
    pngs = ["samples.png", "channel_widths.png", "timestep_loss.png", "finetune_loss.png"]
    assert sorted(written.values()) == sorted(pngs + ["report.html", "report.md", "README.md"])
    card = (tmp_path / "README.md").read_text()
    assert card.startswith("---\n") and "samples.png" in card  # the evaluated model's card shows its grid
    for name in pngs:
        with Image.open(tmp_path / name) as im:
            assert im.format == "PNG" and im.width >= 400 and im.height >= 150
    html = (tmp_path / "report.html").read_text()
    srcs = re.findall(r'src="([^"]*)"', html)
    assert len(srcs) == 4 and all(s.startswith("data:image/png;base64,") for s in srcs)
    md = (tmp_path / "report.md").read_text()
    for name in pngs:
        assert f"]({name})" in md
    assert "| Parameters | 4,000 | 1,000 |" in md and "4.00×" in md and "2.50×" in md


def test_report_without_pruning_record_or_log_says_what_is_missing(tmp_path):
    written = write_report(tmp_path, METRICS, student_images=_images(5, 1), teacher_images=None, seeds=range(5))
    assert set(written) == {"samples", "html", "md"}
    md = (tmp_path / "report.md").read_text()
    assert "Not shown (no data recorded)" in md
    assert not (tmp_path / "channel_widths.png").exists()


def test_metrics_rows_format_missing_values_as_dash():
    rows = dict((r[0], r[1:]) for r in metrics_rows({"params": 12, "fid": None}))
    assert rows["Parameters"] == ("—", "12")
    assert rows["FID vs data (no data)"] == ("—", "—")


def test_the_report_is_utf8_whatever_the_locale(tmp_path):
    """Under LC_ALL=C without UTF-8 mode Python's locale encoding is ASCII, which cannot hold the tables' "—"."""
    import os
    import subprocess
    import sys

    script = ("import locale, sys, torch; from diffprune.report import write_report; sys.path.insert(0, sys.argv[2]); "
              "from test_report import METRICS, PRUNING, _images; "
              "write_report(sys.argv[1], METRICS, student_images=_images(4, 1), teacher_images=_images(4, 2), "
              "seeds=range(4), pruning=PRUNING); print(locale.getpreferredencoding(False))")
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0",
           "PYTHONIOENCODING": "ascii"}
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path), os.path.dirname(__file__)], env=env,
                          capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    import codecs

    assert codecs.lookup(done.stdout.strip()).name == "ascii"  # the locale really could not encode "—"
    md = (tmp_path / "report.md").read_bytes().decode("utf-8")
    html = (tmp_path / "report.html").read_bytes().decode("utf-8")
    assert "—" in md and "—" in html and "×" in md


def test_the_width_plot_orders_layers_as_the_models_family_does():
    from diffprune.report import layer_order

    unet = ["up_blocks.1.resnets.0.conv1", "mid_block.resnets.0.conv1", "down_blocks.10.resnets.0.conv1",
            "conv_in", "down_blocks.2.resnets.0.conv1", "time_embedding.linear_1"]
    assert sorted(unet, key=layer_order({"family": "unet2d"})) == [
        "conv_in", "time_embedding.linear_1", "down_blocks.2.resnets.0.conv1", "down_blocks.10.resnets.0.conv1",
        "mid_block.resnets.0.conv1", "up_blocks.1.resnets.0.conv1"]
    assert sorted(unet, key=layer_order({"family": "unet2d-cond"})) == sorted(unet, key=layer_order(
        {"family": "unet2d"}))
    dit = ["proj_out_1", "transformer_blocks.10.attn1.to_q", "transformer_blocks.2.norm1.emb.timestep_embedder.linear_1",
           "transformer_blocks.2.attn1.to_q", "pos_embed.proj"]
    assert sorted(dit, key=layer_order({"family": "dit"})) == [
        "pos_embed.proj", "transformer_blocks.2.norm1.emb.timestep_embedder.linear_1",
        "transformer_blocks.2.attn1.to_q", "transformer_blocks.10.attn1.to_q", "proj_out_1"]
    for unknown in ({"family": "something-new"}, {}, None):  # the recorded order, unchanged
        assert sorted(dit, key=layer_order(unknown)) == dit


def test_timings_whose_repeats_spread_are_flagged_not_printed_as_fact():
    from diffprune.cli.run import summary_table
    from diffprune.report import BUSY_SPREAD, busy_timings, metrics_rows, summary_rows

    calm = {"median_s": 0.010, "min_s": 0.009, "max_s": 0.012, "per_image_s": 0.010}
    busy = {"median_s": 0.120, "min_s": 0.010, "max_s": 0.150, "per_image_s": 0.120}  # 15x spread
    sampler = {**calm, "steps": 50, "batch_size": 16}
    m = {"latency": {"teacher": {"latency_unet": {"1": calm}, "latency_sampler": sampler},
                     "student": {"latency_unet": {"1": busy}, "latency_sampler": sampler}},
         "speedup": 2.03, "base_params": 10, "params": 5, "base_macs": 10, "macs": 5}
    assert BUSY_SPREAD == 1.5 and busy_timings(m) == ["student denoiser call, batch 1 (15.0×)"]
    row = next(r for r in metrics_rows(m) if r[0].startswith("Denoiser call latency, batch 1"))
    assert row[1] == "10.00 ms" and row[2] == "120.00 ms ⚠ repeats spread 15.0×"
    check = dict(summary_rows(m))["Timing check"]
    assert check.startswith("⚠ the machine was busy") and "student denoiser call, batch 1 (15.0×)" in check
    assert "warning: timings spread more than 1.5x between repeats" in summary_table(m, "runs/x", 60)
    m["latency"]["student"]["latency_unet"]["1"] = calm
    assert busy_timings(m) == [] and dict(summary_rows(m))["Timing check"].startswith("ok")
    assert "warning" not in summary_table(m, "runs/x", 60)
