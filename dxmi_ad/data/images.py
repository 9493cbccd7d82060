"""Reading images and masks of any encoding and size, faithfully, with errors that name the file.

The rule: the same displayed picture gives the same pixels, whatever its encoding.

* Orientation: the EXIF orientation tag is applied (``PIL.ImageOps.exif_transpose``), for images and masks, so a
  phone photo stored sideways with a rotation tag reads as it is displayed.
* Bit depth: 8-bit values are divided by 255, 16-bit values (``I;16*``; ``I`` holding 0..65535) by 65535, so an
  8-bit picture stored as 16-bit (``v * 257``) reads the same. Never stretched by the image's own min / max.
* Float images (``F``): values in [0, 1] are read as they are, values in [0, 255] are divided by 255; other
  ranges, and NaN or infinite values, make the file unreadable with the reason.
* Colour modes ``1``, ``L``, ``P``, ``RGB``, ``CMYK``, ``YCbCr`` are converted to RGB by PIL.
* Transparency (``RGBA``, ``LA``, ``PA``, a palette or ``tRNS`` transparent colour): composited over black, so
  the colour stored under fully transparent pixels (which viewers never show) cannot change the result.
* Size: more than :func:`max_image_pixels` pixels (default twice PIL's ``Image.MAX_IMAGE_PIXELS``, about 179
  million; ``$DXMI_AD_MAX_IMAGE_PIXELS`` sets it, 0 = no limit) makes the file unreadable (decompression bombs).
* Masks: decoded as above, then a pixel is anomalous when its largest channel is at least half of the range
  (>= 128 of 255, >= 32768 of 65535, >= 0.5 for float), so the ringing of a JPEG mask does not grow the defect; a
  single-channel integer mask holding only 0 and 1 is a label map (1 = anomalous). Resized with nearest neighbour
  (docs/paper_map.md).
* Listing: names starting with ``.`` (``.ipynb_checkpoints/``, macOS ``._000.png``, ``.DS_Store``) are never data
  (:func:`is_hidden`).
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError, features

__all__ = ["IMAGE_SUFFIXES", "MAX_PIXELS_ENV", "ImageListing", "ImageReadError", "decode_pil", "find_images",
           "is_hidden", "list_images", "load_image", "load_mask", "max_image_pixels", "read_mask", "read_rgb"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif",
                  *((".webp",) if features.check("webp") else ()))
MAX_PIXELS_ENV = "DXMI_AD_MAX_IMAGE_PIXELS"
_PIL_GUARD = threading.Lock()
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")


class ImageReadError(ValueError):
    """An image or mask file could not be read; ``path`` and ``reason`` say which and why."""

    def __init__(self, path: Path | str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


def is_hidden(path: Path, root: Path | None = None) -> bool:
    """Whether ``path`` (or one of its folders below ``root``) is hidden: its name starts with ``.``.

    Args:
        path: File or folder.
        root: Listing root; only the parts of ``path`` below it count (a root such as ``~/.data/mvtec`` is fine).
    """
    parts = path.relative_to(root).parts if root is not None else (path.name,)
    return any(part.startswith(".") for part in parts)


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside ``folder`` (:data:`IMAGE_SUFFIXES`, case-insensitive; hidden names skipped),
    sorted by name; ``[]`` when ``folder`` is not a folder.
    """
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir()
                  if not is_hidden(p) and p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


@dataclass
class ImageListing:
    """What :func:`find_images` found.

    Attributes:
        files: Image files to read, in order (explicitly named files first-come, folders sorted).
        hidden: Hidden files and folders skipped (a hidden folder counts once, its content is not listed).
        unsupported: Files skipped for their extension (not in :data:`IMAGE_SUFFIXES`).
    """

    files: list[Path] = field(default_factory=list)
    hidden: list[Path] = field(default_factory=list)
    unsupported: list[Path] = field(default_factory=list)

    def describe_skipped(self) -> str:
        """One line on what was skipped, e.g. ``"skipped 2 hidden (.DS_Store, .ipynb_checkpoints), 3 with
        unsupported extensions (2 .txt, 1 .svg; supported: .png, ...)"``; empty when nothing was.
        """
        parts = []
        if self.hidden:
            names = ", ".join(p.name for p in self.hidden[:3]) + (", ..." if len(self.hidden) > 3 else "")
            parts.append(f"{len(self.hidden)} hidden ({names})")
        if self.unsupported:
            counts = Counter(p.suffix.lower() or "(no extension)" for p in self.unsupported)
            kinds = ", ".join(f"{n} {ext}" for ext, n in counts.most_common())
            parts.append(f"{len(self.unsupported)} with unsupported extensions ({kinds}; supported: "
                         f"{', '.join(IMAGE_SUFFIXES)})")
        return ("skipped " + ", ".join(parts)) if parts else ""


def find_images(paths: Iterable[Path | str], require: bool = True) -> ImageListing:
    """Image files of files and folders, as ``dxmi-ad score`` takes them.

    Folders are searched recursively (files sorted by path); hidden names (``.*``) below a given folder are skipped
    (a hidden folder is not entered) and so are files whose extension is not in :data:`IMAGE_SUFFIXES`; both are
    recorded in the listing. A file named explicitly is always kept (an unreadable one is reported when read).

    Args:
        paths: Files and folders.
        require: Raise when nothing to read was found.

    Returns:
        The listing: files, and the hidden and unsupported entries skipped.

    Raises:
        ValueError: If ``require`` and no file was found; the message says what was skipped, e.g. ``no supported
            images in shots/ (skipped 3 with unsupported extensions (3 .heic; supported: ...))``.
    """
    out = ImageListing()
    paths = [Path(p) for p in paths]
    for p in paths:
        if not p.is_dir():
            out.files.append(p)
            continue
        found = []
        for dirpath, dirnames, filenames in os.walk(p):
            here = Path(dirpath)
            out.hidden += [here / d for d in sorted(dirnames) if d.startswith(".")]
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))  # hidden folders are not entered
            for name in sorted(filenames):
                f = here / name
                if name.startswith("."):
                    out.hidden.append(f)
                elif f.suffix.lower() not in IMAGE_SUFFIXES:
                    out.unsupported.append(f)
                else:
                    found.append(f)
        out.files += sorted(found)
    if require and not out.files:
        where = ", ".join(str(p) for p in paths) or "(no path given)"
        skipped = out.describe_skipped()
        msg = f"no supported images in {where} ({skipped})" if skipped else f"no files in {where}"
        raise ValueError(msg)
    return out


def max_image_pixels() -> int | None:
    """The largest image (width x height, pixels) that is read; None = no limit.

    ``$DXMI_AD_MAX_IMAGE_PIXELS`` when set (0 = no limit), else twice PIL's ``Image.MAX_IMAGE_PIXELS`` (the size at
    which PIL refuses a file as a possible decompression bomb; about 179 million pixels).

    Raises:
        ValueError: If the variable is not a whole number >= 0.
    """
    raw = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if raw:
        try:
            n = int(raw.replace("_", ""))
        except ValueError:
            n = -1
        if n < 0:
            msg = f"{MAX_PIXELS_ENV}={raw!r} is not a whole number of pixels (0 = no limit)"
            raise ValueError(msg)
        return n or None
    pil = Image.MAX_IMAGE_PIXELS
    return None if pil is None else 2 * int(pil)


def _open(path: Path) -> Image.Image:
    """Open, size-check, decode and orient (EXIF) one file; the file is closed on return."""
    limit = max_image_pixels()
    try:
        with _PIL_GUARD:  # PIL's own bomb guard is replaced by `limit` for this header read (restored after)
            saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
            try:
                handle = Image.open(path)
            finally:
                Image.MAX_IMAGE_PIXELS = saved
        with handle:  # closes the file even when decoding fails
            w, h = handle.size
            if limit is not None and w * h > limit:
                reason = (f"image is {w} x {h} = {w * h:,} pixels, more than the limit of {limit:,} (a guard against "
                          f"decompression bombs); if the file is trusted, set {MAX_PIXELS_ENV}={w * h} (0 = no limit)")
                raise ImageReadError(path, reason)
            handle.load()
            try:
                img = ImageOps.exif_transpose(handle)  # a copy, turned as displayed (EXIF orientation tag)
            except Exception as err:  # noqa: BLE001 - a broken EXIF block: the orientation is unknown
                raise ImageReadError(path, f"EXIF orientation unreadable ({type(err).__name__}: {err})") from err
    except ImageReadError:
        raise
    except FileNotFoundError as err:
        raise ImageReadError(path, "file not found") from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ImageReadError(path, f"not a readable image ({type(err).__name__}: {err})") from err
    if img.width == 0 or img.height == 0:
        raise ImageReadError(path, "image has zero size")
    return img


def _decode(img: Image.Image, path: Path | str) -> np.ndarray:
    """Displayed colours of an opened image: float32 ``(H, W, 3)`` in [0, 1] (module docstring for the rules).

    Raises:
        ImageReadError: Non-finite or out-of-range high-bit-depth values, or a mode PIL cannot convert to RGB.
    """
    mode = img.mode
    if mode in _SIXTEEN_BIT or mode == "I":
        a = np.asarray(img, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        if lo < 0 or hi > 65535:
            raise ImageReadError(path, f"integer pixel values span {lo:.0f}..{hi:.0f}, outside the 16-bit range "
                                       "0..65535: save it as an 8- or 16-bit image")
        return np.repeat((a / 65535.0).astype(np.float32)[..., None], 3, axis=2)
    if mode == "F":
        a = np.asarray(img, dtype=np.float64)
        finite = np.isfinite(a)
        if not finite.all():
            r, c = np.argwhere(~finite)[0]
            raise ImageReadError(path, f"{int((~finite).sum())} non-finite pixel value(s) (NaN or infinite), the "
                                       f"first at row {r}, column {c}")
        lo, hi = float(a.min()), float(a.max())
        if lo >= 0 and hi <= 1:
            g = a
        elif lo >= 0 and hi <= 255:
            g = a / 255.0
        else:
            raise ImageReadError(path, f"float pixel values span [{lo:.6g}, {hi:.6g}]; expected [0, 1] or [0, 255]")
        return np.repeat(g.astype(np.float32)[..., None], 3, axis=2)
    try:
        if mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in img.info:
            rgba = np.asarray(img.convert("RGBA"), dtype=np.float32) / 255.0
            return rgba[..., :3] * rgba[..., 3:]  # over black: hidden colours under transparent pixels vanish
        return np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    except (OSError, ValueError) as err:
        raise ImageReadError(path, f"cannot convert {mode} to RGB ({err})") from err


def decode_pil(img: Image.Image, what: str = "image") -> np.ndarray:
    """The displayed picture of an in-memory PIL image, decoded exactly as files are: float32 ``(H, W, 3)`` in [0, 1]
    (EXIF orientation applied, 16-bit / float scaled, transparency over black).

    Raises:
        ImageReadError: Non-finite or out-of-range values, an unreadable EXIF block or an unconvertible mode; the
            message starts with ``what``.
    """
    try:
        img = ImageOps.exif_transpose(img)
    except Exception as err:  # noqa: BLE001 - a broken EXIF block: the orientation is unknown
        raise ImageReadError(what, f"EXIF orientation unreadable ({type(err).__name__}: {err})") from err
    if img.width == 0 or img.height == 0:
        raise ImageReadError(what, "image has zero size")
    return _decode(img, what)


def read_rgb(path: Path) -> np.ndarray:
    """The displayed picture of an image file at its own size: float32 ``(H, W, 3)`` in [0, 1].

    Raises:
        ImageReadError: If the file is missing, truncated, not an image, empty, too large, or holds non-finite or
            out-of-range values.
    """
    return _decode(_open(path), path)


def load_image(path: Path, size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Read an image as an RGB float tensor resized to ``size x size``.

    Args:
        path: Image file.
        size: Output side in pixels.

    Returns:
        ``(image, (H, W))``: float32 ``(3, size, size)`` in [0, 1], and the displayed height and width in pixels
        (after the EXIF orientation).

    Raises:
        ImageReadError: If the file is missing, truncated, not an image, empty, too large, or holds non-finite or
            out-of-range values.
    """
    rgb = read_rgb(path)
    arr = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)  # (3, H, W)
    return resize_images(arr[None], size)[0].contiguous(), (rgb.shape[0], rgb.shape[1])


def resize_images(images: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Resize a float batch ``(B, C, H, W)`` to ``size`` with bilinear interpolation and antialiasing.

    The one resize of dxmi-ad: file loading, :meth:`~dxmi_ad.image.ImageDetector.predict` on other sizes, the
    exported scorer and anomalib's ``Resize(antialias=True)`` pre-processor all compute the same values (half-pixel
    centres, ``align_corners=False``). A batch already at ``size`` comes back with the same values: the resize is
    never skipped by a shape test, so a traced (exported) graph resizes every input size.
    """
    hw = (size, size) if isinstance(size, int) else tuple(size)
    return F.interpolate(images, size=hw, mode="bilinear", align_corners=False, antialias=True)


def read_mask(path: Path) -> np.ndarray:
    """A ground-truth mask at its own size as bool ``(H, W)``, True = anomalous (module docstring for the rule).

    Raises:
        ImageReadError: If the file cannot be read.
    """
    img = _open(path)
    if img.mode in ("L", "I", *_SIXTEEN_BIT) and "transparency" not in img.info:
        raw = np.asarray(img)
        if raw.min() >= 0 and raw.max() == 1:  # a 0/1 label map, not a picture
            return raw == 1
    return _decode(img, path).max(axis=2) >= 0.5


def load_mask(path: Path | None, size: int) -> torch.Tensor:
    """Read a ground-truth mask as a bool tensor ``(size, size)`` (nearest-neighbour resize); all False if None.

    A pixel is anomalous when its largest channel is at least half of the range (>= 128 of 255), after the EXIF
    orientation and transparency (over black); a single-channel 0/1 mask is a label map (1 = anomalous).

    Raises:
        ImageReadError: If the file cannot be read.
    """
    if path is None:
        return torch.zeros(size, size, dtype=torch.bool)
    binary = Image.fromarray(read_mask(path).astype(np.uint8) * 255).resize((size, size), Image.NEAREST)
    return torch.from_numpy(np.asarray(binary) > 0)
