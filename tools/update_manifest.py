"""Rewrite src/diffprune/assets/manifest.json: the sha256 of every shipped file (verified on load)."""
import json
from pathlib import Path

from diffprune.assets import sha256_file

root = Path(__file__).resolve().parents[1] / "src" / "diffprune" / "assets"
manifest = {p.relative_to(root).as_posix(): sha256_file(p)
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "manifest.json"}
(root / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
print(f"{len(manifest)} files in {root / 'manifest.json'}")
