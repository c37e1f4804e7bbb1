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
    """``--device`` checked (a device torch knows, and one this machine has), or the default."""
    return check_device(args.device) if args.device else default_device()


def check_device(name: str) -> str:
    import torch

    from ..errors import DiffPruneError, require

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise DiffPruneError(f"--device {name!r} is not a torch device; pass cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        require(torch.cuda.is_available(), f"--device {name!r}: this torch ({torch.__version__}) has no CUDA device "
                                           "available; pass --device cpu, or install a CUDA build of torch")
        require(device.index is None or device.index < torch.cuda.device_count(),
                f"--device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s); pass cuda:0 .. "
                f"cuda:{torch.cuda.device_count() - 1}")
    return name


def add_prompt_flags(p, what: str) -> None:
    p.add_argument("--prompt", action="append", default=None, metavar="TEXT",
                   help=f"text-to-image models: a prompt {what} (repeat the flag for several; seed s takes prompt "
                        "s mod P)")
    p.add_argument("--prompt-file", default=None, metavar="FILE",
                   help="text-to-image models: a UTF-8 file with one prompt per line (blank lines skipped)")


def read_prompts(args) -> list[str] | None:
    """The prompts of --prompt and --prompt-file (None when neither is given)."""
    from pathlib import Path

    from ..errors import require

    prompts = list(args.prompt or [])
    if args.prompt_file is not None:
        path = Path(args.prompt_file)
        require(path.is_file(), f"--prompt-file {args.prompt_file!r} does not exist; pass a text file with one "
                                "prompt per line")
        lines = [line.strip() for line in read_text_file(path, "--prompt-file").splitlines()]
        found = [line for line in lines if line]
        require(found, f"--prompt-file {args.prompt_file!r} holds no prompt; write one prompt per line")
        prompts += found
    return prompts or None


def read_text_file(path, what: str) -> str:
    """A UTF-8 text file (with or without a byte-order mark); any other encoding is a one-line error."""
    from ..errors import DiffPruneError

    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DiffPruneError(f"{what} {str(path)!r} is not UTF-8 (byte {e.start}: {e.object[e.start:e.start + 1]!r}); "
                             "save it as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None
