"""Test helpers: a small MVTec-layout tree with the edge cases users hit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_mvtec_tree(root: Path, seed: int = 0) -> Path:
    """Two categories of small real-texture crops (scikit-image brick / gravel) with SYNTHETIC dark-square defects.

    Edge cases: odd image sizes, a grayscale category, an RGBA and a 16-bit image, one anomalous image without a
    mask file, masks paired by stem (files listed in an order that differs from the masks').
    """
    import skimage.data as skd

    rng = np.random.default_rng(seed)
    for cat, photo in (("brick", skd.brick()), ("gravel", skd.gravel())):
        base = root / cat
        for sub in ("train/good", "test/good", "test/synthetic_dark", "ground_truth/synthetic_dark"):
            (base / sub).mkdir(parents=True, exist_ok=True)

        def crop(h: int = 60, w: int = 70) -> np.ndarray:
            i, j = rng.integers(0, 300, 2)
            return photo[i:i + h, j:j + w]

        for k in range(12):
            Image.fromarray(crop()).save(base / "train/good" / f"{k:03d}.png")
        for k in range(4):
            Image.fromarray(crop()).save(base / "test/good" / f"{k:03d}.png")
        for k in range(4):
            img = crop().astype(np.float32)
            mask = np.zeros_like(img, dtype=bool)
            mask[20:40, 25:45] = True
            img[mask] *= 0.2
            Image.fromarray(img.astype(np.uint8)).save(base / "test/synthetic_dark" / f"d{k}.png")
            if k != 3:  # d3 has no mask: left out of pixel metrics, still counted for image metrics
                Image.fromarray(mask.astype(np.uint8) * 255).save(base / "ground_truth/synthetic_dark" / f"d{k}_mask.png")
    # odd modes in the gravel test set
    rgba = np.dstack([np.asarray(Image.open(root / "gravel/test/good/000.png").convert("RGB")),
                      np.full((60, 70), 128, np.uint8)])
    Image.fromarray(rgba).save(root / "gravel/test/good/rgba.png")
    deep = (np.asarray(Image.open(root / "gravel/test/good/001.png"), dtype=np.uint16) * 257)
    Image.fromarray(deep).save(root / "gravel/test/good/deep16.png")
    return root
