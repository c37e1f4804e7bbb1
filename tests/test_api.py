"""Every name diffprune exports resolves to the object of that name in its module."""
import importlib

import diffprune


def test_every_public_name_resolves():
    for name, module in diffprune._LAZY.items():
        obj = getattr(diffprune, name)
        assert obj is getattr(importlib.import_module(f"diffprune.{module}"), name), name
    assert "prune_" in dir(diffprune) and sorted(diffprune.__all__) == sorted(diffprune._LAZY)
