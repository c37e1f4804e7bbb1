"""Model cards (Hugging Face card format) and `diffprune push`, everything up to the network call."""
import pytest
from huggingface_hub import ModelCard

from diffprune.card import PUSH_PATTERNS, input_license, model_card, push, write_card
from diffprune.cli import main
from diffprune.errors import DiffPruneError

RECORD = {"family": "dit", "method": "diff-pruning", "base_params": 2_883_472, "params": 990_551,
          "base_macs": 20_299_776, "macs": 10_134_236, "model_source": "mnist-dit", "torch_pruning_version": "1.6.1",
          "config": {"target_macs": 0.5, "thr": 0.05, "calib_batch": 32, "seed": 0, "ratio": None}}


def test_the_card_parses_as_a_hub_card_and_states_the_numbers_and_how_to_load(tmp_path):
    metrics = {"fid": 30.54, "fid_teacher": 23.22, "ssim": 0.967, "speedup": 1.43, "device": "cpu", "threads": 2}
    path = write_card(tmp_path, RECORD, stage="evaluated", metrics=metrics, grid="samples.png", conditioning="class",
                      license="apache-2.0", name="tmp")
    card = ModelCard.load(str(path))
    data = card.data.to_dict()
    assert data["library_name"] == "diffusers" and data["license"] == "apache-2.0"
    assert data["pipeline_tag"] == "image-generation" and {"diffprune", "pruned", "dit"} <= set(data["tags"])
    assert "base_model" not in data  # a shipped name / local folder is not a hub id
    text = card.text
    assert "| parameters | 2.88M | 0.991M (34.4%) |" in text
    assert "| MACs per denoiser call (batch 1) | 20.3M | 10.1M (49.9%) |" in text
    assert "| FID | 23.22 | 30.54 |" in text and "| SSIM to the base model (same starting noise) | 1 | 0.967 |" in text
    assert "![samples](samples.png)" in text and 'load_pipeline("tmp")' in text
    assert "needs diffprune to load" in text and "ignore_mismatched_sizes=True" in text
    assert "`target_macs=0.5`, `thr=0.05`, `calib_batch=32`, `seed=0`" in text and "ratio=" not in text
    hub = ModelCard(model_card(RECORD, stage="pruned", base="google/ddpm-cifar10-32")).data.to_dict()
    assert hub["base_model"] == "google/ddpm-cifar10-32" and "license" not in hub  # never guessed
    assert ModelCard(model_card(RECORD, stage="pruned", conditioning="text")).data.to_dict()["pipeline_tag"] == \
        "text-to-image"


def test_the_license_is_copied_from_the_inputs_card_only(tmp_path):
    (tmp_path / "base").mkdir()
    assert input_license(tmp_path / "base") is None
    (tmp_path / "base" / "README.md").write_text("---\nlicense: openrail\n---\n# a model\n")
    assert input_license(tmp_path / "base") == "openrail"
    (tmp_path / "plain.md").write_text("# just notes, no metadata\n")
    assert input_license(tmp_path / "plain.md") is None


class _FakeApi:
    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo", repo_id, kw))

    def upload_folder(self, **kw):
        self.calls.append(("upload_folder", kw))
        return type("Info", (), {"commit_url": f"https://hub/{kw['repo_id']}/commit/1"})()


def test_push_uploads_only_safe_files_of_a_carded_folder(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    write_card(folder, RECORD, stage="pruned")
    api = _FakeApi()
    assert push(folder, "me/tiny-dit", private=True, api=api) == "https://hub/me/tiny-dit/commit/1"
    (name, repo, kw), (_, up) = api.calls
    assert (name, repo, kw) == ("create_repo", "me/tiny-dit", {"private": True, "exist_ok": True,
                                                                 "repo_type": "model"})
    assert up["folder_path"] == str(folder) and up["allow_patterns"] == PUSH_PATTERNS
    assert "checkpoints/*" in up["ignore_patterns"] and not any(p.endswith((".bin", ".pt", ".ckpt"))
                                                                 for p in PUSH_PATTERNS)
    (folder / "sub").mkdir()
    (folder / "sub" / "weights.bin").write_bytes(b"x")
    with pytest.raises(DiffPruneError, match=r"holds pickle files \['sub/weights.bin'\]"):
        push(folder, "me/tiny-dit", api=_FakeApi())
    (tmp_path / "empty").mkdir()
    with pytest.raises(DiffPruneError, match="has no README.md model card"):
        push(tmp_path / "empty", "me/x", api=_FakeApi())
    with pytest.raises(DiffPruneError, match="repo id 'nameonly' must be 'owner/name'"):
        push(folder, "nameonly", api=_FakeApi())
    assert main(["push", str(tmp_path / "missing"), "me/x"]) == 2
