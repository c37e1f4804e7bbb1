"""``diffprune config [NAME]``: the run configs that ship with diffprune. Without NAME, their names; with NAME, the
YAML printed (or written with ``--out``) to copy and edit; ``diffprune run NAME`` runs one as it is."""
from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("config", help="list the shipped run configs, or print one to copy",
                       description=__doc__)
    p.add_argument("name", nargs="?", default=None, help="a shipped config (e.g. demo, demo-dit); omit to list them")
    p.add_argument("--out", default=None, help="write the YAML to this file instead of printing it (new file)")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from .._fs import atomic_write_text
    from ..assets import shipped_configs
    from ..errors import require

    configs = shipped_configs()
    if args.name is None:
        for name, path in configs.items():
            first = path.read_text(encoding="utf-8").splitlines()[0].lstrip("# ").strip()
            print(f"{name:<16} {first}")
        return 0
    require(args.name in configs, f"{args.name!r} is not a shipped config; shipped: {', '.join(configs)}")
    text = configs[args.name].read_text(encoding="utf-8")
    if args.out is None:
        print(text, end="")
        return 0
    require(not Path(args.out).exists(), f"--out {args.out!r} exists; choose a new file name (nothing was written)")
    atomic_write_text(args.out, text)
    print(f"wrote {args.out}: edit it, then `diffprune run {args.out} --out RUN_FOLDER`")
    return 0
