"""The safe model format and loading any model diffprune accepts (no pickle anywhere).

:mod:`diffprune.io.load`: :func:`load_model` (a shipped name, a pruned folder, a plain diffusers model or pipeline
folder, or a hub id), :func:`load_pruned`, :func:`load_pipeline` (the stock diffusers pipeline).
:mod:`diffprune.io.save`: :func:`save_pruned` (atomic), :func:`write_model`, :func:`assemble_pipeline`.
File names and the checks every loader makes are in :mod:`diffprune.layout`.
"""
from .._torch import require_finite_weights
from ..layout import model_files
from .load import (LoadedModel, PipelineSource, load_codec, load_model, load_pipeline, load_pruned, load_scheduler,
                   load_text_encoder, stock_pipeline)
from .save import assemble_pipeline, save_pruned, write_model

__all__ = ["LoadedModel", "PipelineSource", "assemble_pipeline", "load_codec", "load_model", "load_pipeline",
           "load_pruned", "load_scheduler", "load_text_encoder", "model_files", "require_finite_weights",
           "save_pruned", "stock_pipeline", "write_model"]
