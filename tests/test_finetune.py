"""`diffprune finetune` on a pruned tiny model: the loss falls and the result keeps the pruned format."""
import pytest
from conftest import save_tiny_model

from diffprune.cli import main
from diffprune.io import load_model, save_pruned
from diffprune.prune import PruneConfig, prune_
from diffprune.sampling import default_scheduler
from diffprune.train import read_log


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    teacher = save_tiny_model(root / "teacher")
    report = prune_(teacher, PruneConfig(method="magnitude", ratio=0.5, ratio_mode="uniform"), progress=False)
    save_pruned(teacher, root / "pruned", report.to_dict(), scheduler=default_scheduler())
    return root


@pytest.mark.parametrize("kd", [0.0, 0.7])
def test_finetune_recovers_pruned_model(models, tmp_path, kd):
    out = tmp_path / "ft"
    args = ["finetune", str(models / "pruned"), "--data", "mnist", "--steps", "60", "--batch-size", "16",
            "--lr", "2e-3", "--log-every", "10", "--checkpoint-every", "30", "--out", str(out), "--device", "cpu"]
    if kd:
        args += ["--teacher", str(models / "teacher"), "--kd-weight", str(kd)]
    assert main(args) == 0
    loss = read_log(out / "train_log.csv")["loss"]
    assert len(loss) == 6 and loss[-2:].mean() < 0.85 * loss[0], loss.tolist()
    loaded = load_model(out)
    assert loaded.pruning is not None and loaded.pruning["method"] == "magnitude"
    pruned = load_model(models / "pruned")
    assert {k: v.shape for k, v in loaded.denoiser.state_dict().items()} == \
        {k: v.shape for k, v in pruned.denoiser.state_dict().items()}


def test_finetune_teacher_without_weight_is_refused(models, tmp_path, capsys):
    code = main(["finetune", str(models / "pruned"), "--data", "mnist", "--steps", "2", "--out", str(tmp_path / "x"),
                 "--teacher", str(models / "teacher"), "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "kd_weight=0" in err[0] and "--kd-weight" in err[0]
    assert not (tmp_path / "x").exists()
