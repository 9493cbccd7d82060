"""MVTec AD folder layout and the generic folder layout, listed into samples (no pixels read here).

MVTec AD: ``ROOT/<category>/train/good/*.png``, ``ROOT/<category>/test/<defect>/*.png`` (``good`` = normal),
``ROOT/<category>/ground_truth/<defect>/<stem>_mask.png``. Masks are paired to images **by file stem**, never by
sorted position (STYLE.md §4). A generic folder is one category at its root (``ROOT/train/good``, optional
``ROOT/test/...`` and ``ROOT/ground_truth/...``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dxmi_ad.data.images import IMAGE_SUFFIXES, list_images

__all__ = ["MVTEC_HELP", "ImageSample", "list_folder", "list_mvtec"]

MVTEC_HELP = (
    "MVTec AD is not downloaded by dxmi-ad. Get it from https://www.mvtec.com/company/research/datasets/mvtec-ad "
    "(CC BY-NC-SA 4.0), unpack it, and pass its folder as --data-root. Expected layout: "
    "ROOT/<category>/train/good/*.png, ROOT/<category>/test/<defect or good>/*.png, "
    "ROOT/<category>/ground_truth/<defect>/<name>_mask.png. See data/README.md."
)


@dataclass(frozen=True)
class ImageSample:
    """One image of a dataset.

    Attributes:
        path: Image file.
        category: Category name (MVTec class, texture, or the folder's name).
        split: ``"train"`` or ``"test"``.
        defect: ``"good"`` or the defect folder's name.
        label: 0 = normal, 1 = anomalous.
        mask_path: Ground-truth mask file, or None (normal images; anomalies whose mask is missing).
    """

    path: Path
    category: str
    split: str
    defect: str
    label: int
    mask_path: Path | None


def _mask_for(gt_dir: Path, stem: str) -> Path | None:
    """``<stem>_mask.<ext>`` or ``<stem>.<ext>`` in ``gt_dir``, case-insensitively (``001.PNG`` / ``001_mask.png``)."""
    if not gt_dir.is_dir():
        return None
    by_name = {p.name.lower(): p for p in gt_dir.iterdir() if p.is_file()}
    for suffix in IMAGE_SUFFIXES:
        for name in (f"{stem}_mask{suffix}", f"{stem}{suffix}"):
            if name.lower() in by_name:
                return by_name[name.lower()]
    return None


def _list_category(cat_dir: Path, category: str) -> list[ImageSample]:
    samples = [ImageSample(p, category, "train", "good", 0, None) for p in list_images(cat_dir / "train" / "good")]
    test_dir = cat_dir / "test"
    if test_dir.is_dir():
        for defect_dir in sorted(d for d in test_dir.iterdir() if d.is_dir()):
            defect = defect_dir.name
            label = 0 if defect == "good" else 1
            gt_dir = cat_dir / "ground_truth" / defect
            for p in list_images(defect_dir):
                mask = _mask_for(gt_dir, p.stem) if label else None
                samples.append(ImageSample(p, category, "test", defect, label, mask))
    return samples


def list_mvtec(root: str | Path, categories: str | list[str] = "all") -> list[ImageSample]:
    """List the images of an MVTec-AD-layout root.

    Args:
        root: Dataset root.
        categories: ``"all"`` (every sub-folder holding ``train/good``), a comma-separated string, or a list.

    Returns:
        Samples of all requested categories, train then test per category.

    Raises:
        FileNotFoundError: If the root is missing (with where to get MVTec AD) or a requested category is absent.
        ValueError: If no category has training images.
    """
    root = Path(root)
    if not root.is_dir():
        msg = f"dataset root {root} not found. {MVTEC_HELP}"
        raise FileNotFoundError(msg)
    available = sorted(d.name for d in root.iterdir() if (d / "train" / "good").is_dir())
    if isinstance(categories, str):
        wanted = available if categories == "all" else [c.strip() for c in categories.split(",") if c.strip()]
    else:
        wanted = list(categories)
    missing = [c for c in wanted if c not in available]
    if missing:
        msg = f"categories {missing} not found under {root} (found: {available or 'none'}). {MVTEC_HELP}"
        raise FileNotFoundError(msg)
    if not wanted:
        msg = f"no category with a train/good folder under {root}. {MVTEC_HELP}"
        raise ValueError(msg)
    samples = [s for c in wanted for s in _list_category(root / c, c)]
    for c in wanted:
        if not any(s.category == c and s.split == "train" for s in samples):
            msg = f"{root / c / 'train' / 'good'} holds no images ({', '.join(IMAGE_SUFFIXES)})"
            raise ValueError(msg)
    return samples


def list_folder(root: str | Path) -> list[ImageSample]:
    """List a generic folder: ``ROOT/train/good`` (required), ``ROOT/test/<good|defect>``, ``ROOT/ground_truth``.

    Raises:
        FileNotFoundError: If ``ROOT/train/good`` is missing.
        ValueError: If it holds no images.
    """
    root = Path(root)
    if not (root / "train" / "good").is_dir():
        msg = (f"{root / 'train' / 'good'} not found: a folder dataset needs ROOT/train/good with normal images "
               "(optional: ROOT/test/good, ROOT/test/<defect>, ROOT/ground_truth/<defect>/<name>_mask.png)")
        raise FileNotFoundError(msg)
    samples = _list_category(root, root.resolve().name)
    if not any(s.split == "train" for s in samples):
        msg = f"{root / 'train' / 'good'} holds no images ({', '.join(IMAGE_SUFFIXES)})"
        raise ValueError(msg)
    return samples


def list_normal_dir(root: str | Path, what: str = "calibration") -> list[ImageSample]:
    """Every image under ``root`` (recursive) as a normal sample: a calibration folder of held-out normal images.

    Args:
        root: Folder.
        what: Name used in error messages.

    Raises:
        FileNotFoundError: If ``root`` is not a folder.
        ValueError: If it holds no images.
    """
    root = Path(root)
    if not root.is_dir():
        msg = f"{what} folder {root} not found"
        raise FileNotFoundError(msg)
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        msg = f"{what} folder {root} holds no images ({', '.join(IMAGE_SUFFIXES)})"
        raise ValueError(msg)
    return [ImageSample(p, p.parent.name, "calibration", "good", 0, None) for p in files]


def list_labelled_dir(root: str | Path) -> list[ImageSample]:
    """A labelled validation folder: ``ROOT/good/**`` normal (label 0), every other ``ROOT/<defect>/**`` anomalous.

    Raises:
        FileNotFoundError: If ``root`` is not a folder.
        ValueError: If it holds no images in sub-folders.
    """
    root = Path(root)
    if not root.is_dir():
        msg = f"validation folder {root} not found (expected ROOT/good/ and ROOT/<defect>/ sub-folders)"
        raise FileNotFoundError(msg)
    samples = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        label = 0 if sub.name.lower() == "good" else 1
        samples += [ImageSample(p, root.name, "validation", sub.name, label, None)
                    for p in sorted(sub.rglob("*")) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if not samples:
        msg = f"validation folder {root} holds no images in sub-folders (expected ROOT/good/ and ROOT/<defect>/)"
        raise ValueError(msg)
    return samples
