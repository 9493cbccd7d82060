"""MVTec AD folder layout and the generic folder layout, listed into samples (no pixels read here).

MVTec AD: ``ROOT/<category>/train/good/*.png``, ``ROOT/<category>/test/<defect>/*.png`` (``good`` = normal),
``ROOT/<category>/ground_truth/<defect>/<stem>_mask.png``. Masks are paired to images **by file stem**, never by
sorted position (the project's naming rules); anomalous images left without a mask are named in a warning. A generic folder is one
category at its root (``ROOT/train/good``, optional ``ROOT/test/...`` and ``ROOT/ground_truth/...``). Hidden names
(``.*``: ``.ipynb_checkpoints/``, ``._000.png``) are skipped everywhere.

Tiles: when the training images are tiles cut from larger pictures, ``<category>/train/tiles.csv`` (optional) says
where each came from, with the header ``file,source,top,left,height,width``: ``file`` relative to ``train/good``,
``source`` a name of the larger picture, the rest the tile's box in that picture's pixels. Hold-outs (calibration,
model selection) then keep held-out tiles pixel-disjoint from the tiles trained on
(``dxmi_ad.image.split_calibration``): a held-out tile that overlaps a training tile is partly seen, and scores
lower than new normal images do.
"""

from __future__ import annotations

import csv
import warnings
from dataclasses import dataclass
from pathlib import Path

from dxmi_ad._warn import caller_stacklevel
from dxmi_ad.data.images import IMAGE_SUFFIXES, find_images, is_hidden, list_images

__all__ = ["MVTEC_HELP", "TILES_FILE", "TILE_COLUMNS", "ImageSample", "TileBox", "list_folder", "list_labelled_dir",
           "list_mvtec", "list_normal_dir", "read_tiles"]

MVTEC_HELP = (
    "MVTec AD is not downloaded by dxmi-ad. Get it from https://www.mvtec.com/company/research/datasets/mvtec-ad "
    "(CC BY-NC-SA 4.0), unpack it, and pass its folder as --data-root. Expected layout: "
    "ROOT/<category>/train/good/*.png, ROOT/<category>/test/<defect or good>/*.png, "
    "ROOT/<category>/ground_truth/<defect>/<name>_mask.png. See data/README.md."
)

TILES_FILE = "tiles.csv"
"""Name of the optional tile table of a category's training images (``<category>/train/tiles.csv``)."""
TILE_COLUMNS = ("file", "source", "top", "left", "height", "width")
"""Header of :data:`TILES_FILE`, in order."""


@dataclass(frozen=True)
class TileBox:
    """Where a training tile was cut from: ``source`` picture, box ``top``, ``left``, ``height``, ``width`` (pixels)."""

    source: str
    top: int
    left: int
    height: int
    width: int

    def overlaps(self, other: TileBox) -> bool:
        """True when the two boxes share at least one pixel of the same source picture."""
        return (self.source == other.source and self.top < other.top + other.height
                and other.top < self.top + self.height and self.left < other.left + other.width
                and other.left < self.left + self.width)


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
        tile: Where a training tile was cut from (``train/tiles.csv``), or None.
    """

    path: Path
    category: str
    split: str
    defect: str
    label: int
    mask_path: Path | None
    tile: TileBox | None = None


def read_tiles(table: Path, images: list[Path]) -> dict[Path, TileBox]:
    """Read a tile table (:data:`TILES_FILE`) for the training images ``images`` of its category.

    Args:
        table: The ``tiles.csv`` file (header ``file,source,top,left,height,width``; ``file`` relative to
            ``train/good`` next to it).
        images: The category's training images (every one must have a row; rows for other files are refused).

    Returns:
        Image path -> :class:`TileBox`.

    Raises:
        ValueError: A missing column, an empty source, a row that is not ``top, left >= 0`` and ``height, width >= 1``
            integers, a file named twice or not among the training images, or training images without a row (each
            names the table and the row or file).
    """
    good = table.parent / "good"
    by_name = {p.relative_to(good).as_posix(): p for p in images}
    out: dict[Path, TileBox] = {}
    with table.open(newline="", encoding="utf-8-sig") as f:  # utf-8-sig: a spreadsheet's byte-order mark is no column
        reader = csv.DictReader(f)
        if reader.fieldnames:
            reader.fieldnames = [c.strip().lower() for c in reader.fieldnames]
        missing = [c for c in TILE_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            msg = f"{table}: missing column(s) {', '.join(missing)}; the header must be {','.join(TILE_COLUMNS)}"
            raise ValueError(msg)
        for row in reader:
            line = reader.line_num
            name = (row["file"] or "").strip()
            if name not in by_name:
                msg = f"{table}, line {line}: {name!r} is not a training image in {good}"
                raise ValueError(msg)
            if by_name[name] in out:
                msg = f"{table}, line {line}: {name!r} has a row already"
                raise ValueError(msg)
            try:
                box = [int(row[c]) for c in TILE_COLUMNS[2:]]
            except (TypeError, ValueError):
                msg = f"{table}, line {line}: top, left, height and width must be integers, got {row}"
                raise ValueError(msg) from None
            if box[0] < 0 or box[1] < 0 or box[2] < 1 or box[3] < 1:
                msg = f"{table}, line {line}: need top, left >= 0 and height, width >= 1, got {box}"
                raise ValueError(msg)
            source = (row["source"] or "").strip()
            if not source:
                msg = f"{table}, line {line}: empty source (the name of the picture {name!r} was cut from)"
                raise ValueError(msg)
            out[by_name[name]] = TileBox(source, *box)
    unlisted = [p.name for p in images if p not in out]
    if unlisted:
        msg = (f"{table}: {len(unlisted)} training image(s) have no row ({', '.join(unlisted[:3])}"
               f"{', ...' if len(unlisted) > 3 else ''}); list every image of {good} or remove the table")
        raise ValueError(msg)
    return out


def _mask_names(stem: str) -> list[str]:
    """File names accepted as the mask of image ``stem``: ``<stem>_mask.<ext>`` or ``<stem>.<ext>``."""
    return [name for suffix in IMAGE_SUFFIXES for name in (f"{stem}_mask{suffix}", f"{stem}{suffix}")]


def _list_category(cat_dir: Path, category: str) -> list[ImageSample]:
    """Train and test samples of one category; warns when anomalous test images have no mask (by stem)."""
    images = list_images(cat_dir / "train" / "good")
    table = cat_dir / "train" / TILES_FILE
    tiles = read_tiles(table, images) if table.is_file() and images else {}
    samples = [ImageSample(p, category, "train", "good", 0, None, tiles.get(p)) for p in images]
    test_dir = cat_dir / "test"
    unpaired = []
    if test_dir.is_dir():
        for defect_dir in sorted(d for d in test_dir.iterdir() if d.is_dir() and not is_hidden(d)):
            defect = defect_dir.name
            label = 0 if defect == "good" else 1
            gt_dir = cat_dir / "ground_truth" / defect
            by_name = ({p.name.lower(): p for p in gt_dir.iterdir() if p.is_file() and not is_hidden(p)}
                       if label and gt_dir.is_dir() else {})
            missing = []
            for p in list_images(defect_dir):
                mask = next((by_name[n.lower()] for n in _mask_names(p.stem) if n.lower() in by_name), None)
                if label and mask is None:
                    missing.append(p)
                samples.append(ImageSample(p, category, "test", defect, label, mask))
            if missing:
                unpaired.append(_unpaired_text(cat_dir, gt_dir, missing, sorted(by_name.values())))
    if unpaired:
        anomalous = [s for s in samples if s.label == 1]
        undefined = ("; pixel metrics are undefined for this category"
                     if all(s.mask_path is None for s in anomalous) else "")
        warnings.warn(f"{category}: anomalous test images without a mask are left out of pixel metrics{undefined}: "
                      + "; ".join(unpaired), stacklevel=caller_stacklevel())
    return samples


def _unpaired_text(cat_dir: Path, gt_dir: Path, missing: list[Path], held: list[Path]) -> str:
    """``"3 of test/scratch (000.png, ...) expected ground_truth/scratch/000_mask.png or 000.png, which holds
    000_gt.png, ..."``.
    """
    def few(names: list[str]) -> str:
        return ", ".join(names[:3]) + (f", ... ({len(names)} in all)" if len(names) > 3 else "")

    rel = gt_dir.relative_to(cat_dir).as_posix()
    stem, ext = missing[0].stem, missing[0].suffix.lower()
    holds = (f"which holds {few([p.name for p in held])}" if held
             else ("which holds no files" if gt_dir.is_dir() else "which does not exist"))
    return (f"{len(missing)} in test/{missing[0].parent.name} ({few([p.name for p in missing])}) expected "
            f"{rel}/{stem}_mask{ext} or {stem}{ext} (any of {', '.join(IMAGE_SUFFIXES)}), {holds}")


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
    subdirs = sorted(d for d in root.iterdir() if d.is_dir() and not is_hidden(d))
    available = [d.name for d in subdirs if (d / "train" / "good").is_dir()]
    if isinstance(categories, str):
        wanted = available if categories == "all" else [c.strip() for c in categories.split(",") if c.strip()]
    else:
        wanted = list(categories)
    skipped = [d.name for d in subdirs if d.name not in available]
    if categories == "all" and available and skipped:
        warnings.warn(f"category all under {root}: using {len(available)} ({', '.join(available)}); skipped "
                      f"{len(skipped)} folder(s) without train/good: {', '.join(skipped)}", stacklevel=caller_stacklevel())
    missing = [c for c in wanted if c not in available]
    if missing:
        msg = f"categories {missing} not found under {root} (found: {available or 'none'}). {MVTEC_HELP}"
        raise FileNotFoundError(msg)
    if not wanted:
        found = f"sub-folders found: {', '.join(skipped)}" if skipped else "no sub-folders"
        hint = (" (it looks like one category itself: use --dataset folder)" if (root / "train" / "good").is_dir()
                else "")
        msg = f"no category with a train/good folder under {root}{hint}; {found}. {MVTEC_HELP}"
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
    listing = find_images([root], require=False)  # recursive; hidden names and other extensions skipped
    files = listing.files
    if not files:
        msg = f"{what} folder {root} holds no images ({listing.describe_skipped() or 'it is empty'})"
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
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not is_hidden(p)):
        label = 0 if sub.name.lower() == "good" else 1
        samples += [ImageSample(p, root.name, "validation", sub.name, label, None)
                    for p in find_images([sub], require=False).files]
    if not samples:
        msg = f"validation folder {root} holds no images in sub-folders (expected ROOT/good/ and ROOT/<defect>/)"
        raise ValueError(msg)
    return samples
