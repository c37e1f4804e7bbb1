"""Training and fine-tuning: :func:`train` and its settings, :class:`TrainConfig`.

``config`` (the settings and the result), ``loop`` (:func:`train`, the loop itself), ``checkpoints`` (their format:
save, list, verify, restore), ``run_folder`` (a new, overwritten or resumed output folder, its record and log),
``outputs`` (final models, sample grids), ``accel`` (accelerate glue). The run's records and log columns live in
:mod:`diffprune.records`.
"""
from .._hashing import state_sha256
from ..records import LOG_FIELDS, read_log, run_info
from .accel import accelerate_settings, check_training_device, make_accelerator
from .checkpoints import CHECKPOINT_FILES, CHECKPOINT_PREFIX, list_checkpoints, verify_checkpoint
from .config import LR_SCHEDULES, TrainConfig, TrainResult
from .loop import antithetic_timesteps, train
from .outputs import ema_copy

__all__ = ["CHECKPOINT_FILES", "CHECKPOINT_PREFIX", "LOG_FIELDS", "LR_SCHEDULES", "TrainConfig", "TrainResult",
           "accelerate_settings", "antithetic_timesteps", "check_training_device", "ema_copy", "list_checkpoints",
           "make_accelerator", "read_log", "run_info", "state_sha256", "train", "verify_checkpoint"]
