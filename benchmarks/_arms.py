"""A benchmark arm as a run config: the shipped demo config of a family with one arm's prune settings.

An arm is ``default`` (the config as shipped: what ``diffprune prune`` does without ``--method``), a method name
(``magnitude``) or ``key=value`` overrides of the prune section (``thr=0.02``; several joined by ``,``). Settings the
arm's method does not take (``thr`` for magnitude, the threshold's fields for a strategy without them) are dropped.
"""
import json
from pathlib import Path

import yaml

from diffprune.cli.demo import DEMOS, config_path
from diffprune.importance import METHODS, setting_owners
from diffprune.timesteps import STRATEGY_FIELDS, TIMESTEP_STRATEGIES


def demo_config(name: str) -> dict:
    """The shipped demo config ``name`` (``demo``, ``demo-dit``) as a dict."""
    key = next(k for k, v in DEMOS.items() if v == name)
    return yaml.safe_load(Path(config_path(False, key)).read_text())


def arm_config(base: dict, arm: str, seed: int, steps: int, n: int | None = None) -> dict:
    """``base`` with ``arm``'s prune settings, ``seed``, ``steps`` fine-tuning steps and ``n`` evaluation samples."""
    raw = json.loads(json.dumps(base))
    if "=" in arm:
        for item in arm.split(","):
            key, value = item.split("=", 1)
            raw["prune"][key] = yaml.safe_load(value)
    elif arm != "default":
        raw["prune"]["method"] = arm
    method = METHODS.get(raw["prune"].get("method", "diff-pruning"))
    for key in [k for k in raw["prune"] if k in setting_owners() and k not in method.settings]:
        raw["prune"].pop(key)  # a setting this method does not take (thr, calib_batch, ...)
    strategy = raw["prune"].get("timesteps") or method.default_timesteps
    if strategy is not None:  # e.g. taylor walks all timesteps: the config's thr is not its setting
        taken = set(TIMESTEP_STRATEGIES.get(strategy).__dataclass_fields__)
        for key in [k for k in raw["prune"] if k in STRATEGY_FIELDS and k not in taken]:
            raw["prune"].pop(key)
    raw["finetune"]["steps"] = steps
    if n is not None:
        raw["eval"]["n"] = n
    raw["seed"] = seed
    return raw
