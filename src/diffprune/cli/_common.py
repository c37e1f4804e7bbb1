"""Helpers shared by the subcommands (the CLI may choose a device; the library never does)."""
from __future__ import annotations


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def add_device_flag(p) -> None:
    p.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda:0 (default: cuda if available)")


def add_prediction_type_flag(p) -> None:
    p.add_argument("--prediction-type", default=None, choices=["epsilon", "v_prediction", "sample"],
                   help="what the model predicts; only needed for a model without a scheduler (checked against the "
                        "model's scheduler otherwise; default epsilon)")


def device_of(args) -> str:
    return args.device or default_device()
