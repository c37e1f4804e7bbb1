"""``diffprune push DIR REPO_ID``: upload a diffprune output folder (its model card, safetensors weights and JSON
files; never a pickle, never the training checkpoints) to a Hugging Face hub model repository with huggingface_hub.
Log in first (``hf auth login``) or pass ``--token``."""
from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("push", help="upload a pruned, fine-tuned or evaluated folder to the Hugging Face hub",
                       description=__doc__)
    p.add_argument("folder", help="the folder diffprune wrote (with its README.md model card)")
    p.add_argument("repo_id", help="the hub repository, owner/name (created when missing)")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--token", default=None, help="a hub token (default: the logged-in one)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..card import push

    url = push(args.folder, args.repo_id, private=args.private, token=args.token)
    print(f"uploaded {args.folder} to {args.repo_id}: {url}")
    return 0
