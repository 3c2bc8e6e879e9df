"""Convert scikit-learn's bundled digits (8x8, 16 gray levels, 1797 images) once into blitzdiff/assets/digits.npz.

The embedded default models and the quality judge are trained on this file; scikit-learn is needed only here (it
ships the data, so nothing is downloaded), never at runtime. Deterministic: the same file every run.

Stored: `images` uint8 [1797, 16, 16] (the 8x8 images upsampled 2x, bilinear with antialiasing, 0..16 mapped to
0..255; `blitzdiff.quality.load_digits` maps them to [-1, 1]), `labels` uint8 [1797], and a fixed stratified split
as index arrays `train` (1497) and `heldout` (300: 30 per class).

    python scripts/prepare_digits.py [--out blitzdiff/assets/digits.npz]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

HELDOUT_PER_CLASS = 30
SEED = 0


def upsample(images: np.ndarray) -> np.ndarray:
    """[N, 8, 8] gray levels 0..16 -> [N, 16, 16] uint8 0..255 (bilinear, antialiased, half-pixel centers)."""
    x = torch.from_numpy(images.astype(np.float32))[:, None]  # [N, 1, 8, 8]
    x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False, antialias=True)  # [N, 1, 16, 16]
    x = (x[:, 0] * (255.0 / 16.0)).round().clamp(0, 255)  # [N, 16, 16]
    return x.to(torch.uint8).numpy()


def stratified_split(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hold out HELDOUT_PER_CLASS random images of each class (fixed seed); both index arrays sorted."""
    rng = np.random.default_rng(SEED)
    heldout = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:HELDOUT_PER_CLASS]
                              for c in range(10)])
    train = np.setdiff1d(np.arange(len(labels)), heldout)
    return train, np.sort(heldout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).parents[1] / "blitzdiff/assets/digits.npz")
    args = parser.parse_args()
    digits = load_digits()
    labels = digits.target.astype(np.uint8)
    train, heldout = stratified_split(labels)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, images=upsample(digits.images), labels=labels,
                        train=train.astype(np.int16), heldout=heldout.astype(np.int16))
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB): {len(train)} train, {len(heldout)} held out")


if __name__ == "__main__":
    main()
