"""Reading images and masks of any mode and size, consistently, with errors that name the file.

* Images: PIL modes ``1``, ``L``, ``P``, ``RGB``, ``RGBA``, ``LA``, ``CMYK``, 16-bit (``I;16*``, ``I``) and float
  (``F``) are converted to 8-bit RGB (16-bit / float by linear rescaling of their range; alpha dropped), then resized
  bilinearly to ``size x size``.
* Masks: any mode; a pixel is anomalous when non-zero; resized with nearest neighbour (PAPER.md pitfall 21).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

__all__ = ["IMAGE_SUFFIXES", "ImageReadError", "list_images", "load_image", "load_mask"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class ImageReadError(ValueError):
    """An image or mask file could not be read; ``path`` and ``reason`` say which and why."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside ``folder`` (png, jpg, bmp, tif; case-insensitive), sorted by name."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _open(path: Path) -> Image.Image:
    try:
        with Image.open(path) as handle:  # closes the file even when decoding fails
            handle.load()
            img = handle.copy()
    except FileNotFoundError as err:
        raise ImageReadError(path, "file not found") from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImageReadError(path, f"not a readable image ({type(err).__name__}: {err})") from err
    return img


def _to_rgb8(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = np.zeros_like(a) if hi <= lo else (a - lo) / (hi - lo) * 255.0
        img = Image.fromarray(a.round().astype(np.uint8))
    return img.convert("RGB")


def load_image(path: Path, size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Read an image as an RGB float tensor resized to ``size x size``.

    Args:
        path: Image file.
        size: Output side in pixels.

    Returns:
        ``(image, (H, W))``: float32 ``(3, size, size)`` in [0, 1], and the original height and width in pixels.

    Raises:
        ImageReadError: If the file is missing, truncated, not an image, or empty.
    """
    img = _open(path)
    if img.width == 0 or img.height == 0:
        raise ImageReadError(path, "image has zero size")
    original = (img.height, img.width)
    try:
        rgb = _to_rgb8(img)
    except (OSError, ValueError) as err:
        raise ImageReadError(path, f"cannot convert to RGB ({err})") from err
    arr = torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (3, H, W)
    return resize_images(arr[None], size)[0].contiguous(), original


def resize_images(images: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Resize a float batch ``(B, C, H, W)`` to ``size`` with bilinear interpolation and antialiasing.

    The one resize of dxmi-ad: file loading, :meth:`~dxmi_ad.image.ImageDetector.predict` on other sizes, the
    exported scorer and anomalib's ``Resize(antialias=True)`` pre-processor all compute the same values (half-pixel
    centres, ``align_corners=False``). A batch already at ``size`` is returned unchanged.
    """
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(images.shape[-2:]) == hw:
        return images
    return F.interpolate(images, size=hw, mode="bilinear", align_corners=False, antialias=True)


def load_mask(path: Path | None, size: int) -> torch.Tensor:
    """Read a ground-truth mask as a bool tensor ``(size, size)`` (nearest-neighbour resize); all False if None.

    Raises:
        ImageReadError: If the file cannot be read.
    """
    if path is None:
        return torch.zeros(size, size, dtype=torch.bool)
    img = _open(path)
    a = np.asarray(img.convert("L") if img.mode not in ("I;16", "I", "F", "1", "L") else img)
    binary = Image.fromarray(((a > 0) * 255).astype(np.uint8)).resize((size, size), Image.NEAREST)
    return torch.from_numpy(np.asarray(binary) > 0)
