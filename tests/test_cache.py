"""The one load-or-compute cache: verified reads, damaged entries recomputed, optional writes, size limit, leftovers
of killed processes, and `diffprune cache`."""
import errno
import os

import pytest
import torch
from safetensors.torch import save_file

from diffprune import _cache
from diffprune._fs import clean_stale_temporaries
from diffprune.cli import main
from diffprune.errors import DiffPruneError

DEAD_PID = 2**22 + 12345  # above Linux's pid_max default range: no such process


def _compute(calls):
    def compute():
        calls.append(1)
        return {"x": torch.arange(12, dtype=torch.float32).view(3, 4)}
    return compute


def _damage(path, how):
    if how == "truncated":
        path.write_bytes(path.read_bytes()[:40])
    elif how == "other content":  # a valid safetensors file of the right shape, no key: e.g. copied from elsewhere
        save_file({"x": -torch.arange(12, dtype=torch.float32).view(3, 4)}, str(path))
    elif how == "edited tensor":  # the entry's own metadata kept, one value changed in place
        data = bytearray(path.read_bytes())
        data[-4:] = b"\x00\x00\x80\x7f"
        path.write_bytes(bytes(data))
    else:  # unreadable: not safetensors at all
        path.write_bytes(b"\x00garbage" * 10)


@pytest.mark.parametrize("how", ["truncated", "other content", "edited tensor", "unreadable"])
def test_damaged_entry_is_recomputed(tmp_path, how, capsys):
    calls = []
    cold, info = _cache.cached("latents", "k1", _compute(calls), root=tmp_path)
    assert info["hit"] is False and len(calls) == 1
    again, info = _cache.cached("latents", "k1", _compute(calls), root=tmp_path)
    assert info["hit"] is True and len(calls) == 1 and torch.equal(again["x"], cold["x"])
    _damage(tmp_path / "latents" / "k1.safetensors", how)
    capsys.readouterr()
    fixed, info = _cache.cached("latents", "k1", _compute(calls), root=tmp_path)
    assert len(calls) == 2 and info["hit"] is False and info["replaced"]
    assert torch.equal(fixed["x"], cold["x"])
    assert "recomputing it" in capsys.readouterr().err
    assert _cache.cached("latents", "k1", _compute(calls), root=tmp_path)[1]["hit"] is True  # replaced for good


def test_caller_check_refuses_a_sound_entry_of_the_wrong_shape(tmp_path):
    calls = []
    _cache.cached("fid-stats", "k", _compute(calls), root=tmp_path)
    check = lambda t: None if t["x"].shape == (4, 3) else f"x is {tuple(t['x'].shape)}, not (4, 3)"  # noqa: E731
    _, info = _cache.cached("fid-stats", "k", _compute(calls), root=tmp_path, check=check)
    assert len(calls) == 2 and info["replaced"] == "x is (3, 4), not (4, 3)"


def test_a_failed_cache_write_warns_and_goes_on(tmp_path, monkeypatch, capsys):
    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(_cache, "atomic_write_bytes", full)
    calls = []
    out, info = _cache.cached("teacher-samples", "k", _compute(calls), root=tmp_path)
    assert len(calls) == 1 and out["x"].shape == (3, 4) and not (tmp_path / "teacher-samples" / "k.safetensors").exists()
    assert "could not write the cache entry" in capsys.readouterr().err


def test_least_recently_used_entries_go_first(tmp_path, monkeypatch):
    for i, key in enumerate(("a", "b", "c")):
        _cache.cached("latents", key, _compute([]), root=tmp_path)
        os.utime(tmp_path / "latents" / f"{key}.safetensors", (1000 + i, 1000 + i))
    _cache.cached("latents", "a", _compute([]), root=tmp_path)  # a hit refreshes "a"
    size = (tmp_path / "latents" / "a.safetensors").stat().st_size
    monkeypatch.setenv("DIFFPRUNE_CACHE_MAX", str(3 * size))
    _cache.cached("latents", "d", _compute([]), root=tmp_path)
    assert sorted(p.stem for p in _cache.entries(tmp_path)) == ["a", "c", "d"]  # "b" was the least recently used
    monkeypatch.setenv("DIFFPRUNE_CACHE_MAX", "lots")
    with pytest.raises(DiffPruneError, match="DIFFPRUNE_CACHE_MAX='lots' is not a size"):
        _cache.max_bytes()
    monkeypatch.setenv("DIFFPRUNE_CACHE_MAX", "1.5G")
    assert _cache.max_bytes() == int(1.5 * 2**30)


def test_leftovers_of_dead_processes_are_cleaned_and_an_interrupted_swap_recovered(tmp_path):
    (tmp_path / f".x.safetensors.tmp-{DEAD_PID}-abc").write_bytes(b"partial")
    (tmp_path / f".x.safetensors.tmp-{os.getpid()}-abc").write_bytes(b"mine, still being written")
    (tmp_path / f".out.old-{DEAD_PID}").mkdir()
    (tmp_path / f".out.old-{DEAD_PID}" / "metrics.json").write_text("{}")
    (tmp_path / f".done.old-{DEAD_PID}").mkdir()
    (tmp_path / "done").mkdir()
    done = clean_stale_temporaries(tmp_path)
    assert len(done) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["done", "out", f".x.safetensors.tmp-{os.getpid()}-abc"])
    assert (tmp_path / "out" / "metrics.json").read_text() == "{}"


def test_cache_command(tmp_path, capsys):
    _cache.cached("latents", "a", _compute([]), root=tmp_path)
    _cache.cached("text", "b", _compute([]), root=tmp_path)
    (tmp_path / "latents" / "notes.txt").write_text("the user's")
    assert main(["cache", "info", "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: int(line.split()[1]) for line in out.splitlines()[1:]}
    assert rows == {"latents": 1, "text": 1, "fid-stats": 0, "teacher-samples": 0, "latency": 0}
    assert main(["cache", "clear", "--cache-dir", str(tmp_path), "--kind", "text"]) == 0
    assert [p.stem for p in _cache.entries(tmp_path)] == ["a"]
    assert main(["cache", "clear", "--cache-dir", str(tmp_path)]) == 0
    assert _cache.entries(tmp_path) == [] and (tmp_path / "latents" / "notes.txt").is_file()
    assert main(["cache", "clear", "--cache-dir", str(tmp_path), "--kind", "nope"]) == 2
