"""The embedded default image dataset: real CC0 texture photos from scikit-image with SYNTHETIC defects.

For each of ``brick``, ``grass``, ``gravel`` (512x512 grayscale, CC0; data/README.md): training tiles of
64x64 from the top 75% of the photo (stride 32), test tiles from the disjoint bottom strip (stride 16), half of the
test tiles given a SYNTHETIC defect (a 2-px bright scratch, a darkened disc, a 16x16 cut-paste from another
texture) with its pixel mask. Defect classes are named ``synthetic_*`` everywhere. The training tiles overlap
by half, so each category's ``train/tiles.csv`` gives every tile's box in its photo, and hold-outs (calibration,
model selection) take a pixel-disjoint block (``dxmi_ad.image.split_calibration``).

The tiles are written once into an MVTec-layout cache folder and then read by the same MVTec loader as real data,
so the default exercises the real path. The folder is built in a temporary sibling and renamed when complete.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from dxmi_ad.checkpoint import atomic_directory
from dxmi_ad.data.mvtec import TILE_COLUMNS, TILES_FILE

__all__ = ["DEFECT_KINDS", "TEXTURES", "UNSEEN_KINDS", "default_cache_dir", "texture_tiles", "write_textures"]

TEXTURES = ("brick", "grass", "gravel")
DEFECT_KINDS = ("scratch", "blob", "cutpaste")
"""The SYNTHETIC defects of the default test set (the benchmarks' kinds)."""
UNSEEN_KINDS = ("smudge", "noise", "mirror")
"""Defect kinds that neither the benchmarks (:data:`DEFECT_KINDS`) nor model selection (Perlin blends of other normal
images) use, to check a choice on defects it was not made on (issue #13): a 24x24 box blur of the texture, additive
Gaussian noise (std 40 grey levels) in a 16x16 square, a 16x24 region mirrored top to bottom."""
_VERSION = "2"  # bump when the recipe below changes, so old caches are rebuilt (2: train/tiles.csv; same pixels)


def default_cache_dir() -> Path:
    """``$DXMI_AD_CACHE`` or ``~/.cache/dxmi-ad``."""
    return Path(os.environ.get("DXMI_AD_CACHE", Path.home() / ".cache" / "dxmi-ad"))


def texture_tiles(name: str, patch: int = 64, stride: int = 32, test_frac: float = 0.25, seed: int = 0,
                  kinds: tuple[str, ...] = DEFECT_KINDS) -> dict:
    """Cut one texture into real training tiles and test tiles with SYNTHETIC defects (data/README.md).

    Args:
        name: ``brick``, ``grass`` or ``gravel``.
        patch: Tile side in pixels.
        stride: Training stride (test tiles use ``stride // 2``).
        test_frac: Fraction of the photo's height kept for testing (bottom strip).
        seed: Seed of the defect placement.
        kinds: Defect kinds, used in turn: :data:`DEFECT_KINDS` (the default test set) or :data:`UNSEEN_KINDS`.

    Returns:
        Dict with ``train`` ``(n, patch, patch)`` uint8, ``train_box`` ``(n, 2)`` int (each training tile's top and
        left pixel in the photo), ``test`` ``(m, patch, patch)`` uint8, ``mask`` ``(m, patch, patch)`` bool,
        ``kind`` ``(m,)`` str (``good`` or ``synthetic_*``).

    Raises:
        ValueError: On an unknown texture name or defect kind.
    """
    import skimage.data as skd
    from scipy.ndimage import uniform_filter

    if name not in TEXTURES:
        msg = f"unknown texture {name!r}; expected one of {TEXTURES}"
        raise ValueError(msg)
    unknown = [k for k in kinds if k not in DEFECT_KINDS + UNSEEN_KINDS]
    if unknown or not kinds:
        msg = f"unknown defect kinds {unknown or kinds}; expected some of {DEFECT_KINDS + UNSEEN_KINDS}"
        raise ValueError(msg)
    rng = np.random.default_rng(seed)
    img = getattr(skd, name)()
    donor = getattr(skd, "gravel" if name != "gravel" else "brick")()
    cut = int(img.shape[0] * (1 - test_frac))

    def corners(a: np.ndarray, s: int) -> list[tuple[int, int]]:
        return [(i, j) for i in range(0, a.shape[0] - patch + 1, s) for j in range(0, a.shape[1] - patch + 1, s)]

    def tiles(a: np.ndarray, s: int) -> np.ndarray:
        return np.stack([a[i:i + patch, j:j + patch] for i, j in corners(a, s)])

    boxes = corners(img[:cut], stride)
    train = np.stack([img[i:i + patch, j:j + patch] for i, j in boxes])
    test = tiles(img[cut:], stride // 2).astype(np.float32)
    masks = np.zeros(test.shape, bool)
    kind = np.array(["good"] * len(test), dtype=object)
    for n, i in enumerate(rng.permutation(len(test))[: len(test) // 2]):
        k, q, m = kinds[n % len(kinds)], test[i], masks[i]
        if k in UNSEEN_KINDS:
            h, w = {"smudge": (24, 24), "noise": (16, 16), "mirror": (16, 24)}[k]
            y, x = rng.integers(0, patch - h), rng.integers(0, patch - w)
            m[y:y + h, x:x + w] = True
            region = q[y:y + h, x:x + w]
            if k == "smudge":
                region[:] = uniform_filter(q, size=7, mode="reflect")[y:y + h, x:x + w]
            elif k == "noise":
                region += rng.normal(0.0, 40.0, region.shape).astype(np.float32)
            else:
                region[:] = region[::-1].copy()
        elif k == "scratch":
            r = rng.integers(4, patch - 4)
            m[r:r + 2, :] = True
            q[m] = 255 - 0.3 * q[m]
        elif k == "blob":
            yy, xx = np.mgrid[:patch, :patch]
            cy, cx = rng.integers(8, patch - 8, 2)
            m |= (yy - cy) ** 2 + (xx - cx) ** 2 < rng.integers(16, 64)
            q[m] *= 0.4
        else:
            s = patch // 4
            a, b = rng.integers(0, patch - s, 2), rng.integers(0, donor.shape[0] - s, 2)
            m[a[0]:a[0] + s, a[1]:a[1] + s] = True
            q[m] = donor[b[0]:b[0] + s, b[1]:b[1] + s].ravel()
        kind[i] = "synthetic_" + k
    return {"train": train, "train_box": np.array(boxes), "test": np.clip(test, 0, 255).astype(np.uint8),
            "mask": masks, "kind": kind}


def write_textures(cache_dir: str | Path | None = None, seed: int = 0, unseen_kinds: bool = False) -> Path:
    """Write (once) the textures dataset in MVTec layout and return its root.

    Args:
        cache_dir: Parent folder (default :func:`default_cache_dir`).
        seed: Defect seed (part of the folder name).
        unseen_kinds: Test defects of :data:`UNSEEN_KINDS` instead of :data:`DEFECT_KINDS` (same training tiles and
            test tiles, other defects; a check on defects no choice was made on).

    Returns:
        ``<cache_dir>/textures-v<version>-seed<seed>`` (``textures-unseen-v<version>-seed<seed>`` with
        ``unseen_kinds``) holding ``brick/``, ``grass/``, ``gravel/``.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    root = cache_dir / f"textures{'-unseen' if unseen_kinds else ''}-v{_VERSION}-seed{seed}"
    if (root / ".complete").is_file():
        return root
    with atomic_directory(root) as tmp:
        for name in TEXTURES:
            t = texture_tiles(name, seed=seed, kinds=UNSEEN_KINDS if unseen_kinds else DEFECT_KINDS)
            (tmp / name / "train" / "good").mkdir(parents=True)
            rows = [",".join(TILE_COLUMNS)]
            for i, (tile, (top, left)) in enumerate(zip(t["train"], t["train_box"])):
                Image.fromarray(tile).save(tmp / name / "train" / "good" / f"{i:03d}.png")
                rows.append(f"{i:03d}.png,{name},{top},{left},{tile.shape[0]},{tile.shape[1]}")
            (tmp / name / "train" / TILES_FILE).write_text("\n".join(rows) + "\n")
            for i, (tile, mask, kind) in enumerate(zip(t["test"], t["mask"], t["kind"])):
                (tmp / name / "test" / kind).mkdir(parents=True, exist_ok=True)
                Image.fromarray(tile).save(tmp / name / "test" / kind / f"{i:03d}.png")
                if kind != "good":
                    (tmp / name / "ground_truth" / kind).mkdir(parents=True, exist_ok=True)
                    Image.fromarray(mask.astype(np.uint8) * 255).save(
                        tmp / name / "ground_truth" / kind / f"{i:03d}_mask.png")
        (tmp / "README.txt").write_text(
            "Real CC0 texture photos from scikit-image (brick, grass, gravel). Test tiles in synthetic_* folders carry "
            "SYNTHETIC defects made by dxmi-ad; ground_truth holds their masks.\n")
        (tmp / ".complete").write_text(_VERSION)
    return root
