"""Honest model selection: a validation split of held-out normal training images plus synthetic anomalies.

The feature-AD training loops that DxMI's pipeline comes from keep the best epoch measured on the test set; here the
test set is never read during training. Instead a fraction of the normal *training* images is held out, each of them
is also turned into a SYNTHETIC anomaly (anomalib's :class:`~anomalib.data.utils.generators.perlin.PerlinAnomalyGenerator`:
a Perlin-noise mask into which another normal training image, colour-augmented, is blended), and the image AUROC of
the model's ``pred_score`` on normals vs synthetic anomalies (or the pixel AUROC of its anomaly map against the
synthetic masks, ``DxMIConfig.validation_metric``) is measured every ``validate_every`` DxMI iterations.
The best state (the pre-trained autoencoder start included) is kept. This is a named deviation from the paper, which
keeps the last iterate (``docs/paper_map.md``).

Example:
    >>> import torch
    >>> normals = torch.rand(2, 3, 32, 32)
    >>> anomalous, masks = synthetic_anomalies(normals, sources=torch.rand(3, 3, 32, 32), seed=0)
    >>> anomalous.shape, masks.shape, bool(masks.flatten(1).any(1).all())
    (torch.Size([2, 3, 32, 32]), torch.Size([2, 32, 32]), True)
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

__all__ = ["synthetic_anomalies", "validation_auroc", "validation_pixel_auroc"]


def synthetic_anomalies(images: torch.Tensor, sources: torch.Tensor | None = None, seed: int = 0,
                        blend: tuple[float, float] = (0.5, 1.0),
                        region: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn normal images into SYNTHETIC anomalies with Perlin-noise masks (anomalib's generator, seeded).

    Args:
        images: Normal images ``(N, 3, H, W)`` float in [0, 1].
        sources: Images ``(M, 3, H', W')`` in [0, 1] blended into the masked region (other normal images; resized
            to ``(H, W)``); None = anomalib's default source (the Perlin noise itself).
        seed: Seed of every random draw (mask, rotation, source choice, colour augmentation, blend factor); the
            global torch RNG is restored afterwards.
        blend: Range of the blend factor beta (1 = the source replaces the masked pixels).
        region: None = anomalib's masks as drawn (Perlin blobs: 5% of a 224-px image on average, 0.6-14%); a
            fraction in (0, 1] = each mask cut to a window of ``region * H`` by ``region * W`` pixels (square on
            square images) centred on one of its own pixels, shifted inside the image at a border
            (1 = no cut); the pixel is drawn from a stream of its own, so the masks are cut from the same Perlin
            masks as with None. The anomaly is then small and local, like most real defects; pixels outside the
            window keep the normal image.

    Returns:
        ``(anomalous (N, 3, H, W) float in [0, 1], masks (N, H, W) bool)``; every mask has at least one pixel.

    Raises:
        ValueError: If ``images`` is not ``(N, 3, H, W)`` or ``region`` is outside (0, 1].
    """
    from anomalib.data.utils.generators.perlin import PerlinAnomalyGenerator
    from PIL import Image

    if images.ndim != 4 or images.shape[1] != 3:
        msg = f"images must be (N, 3, H, W), got {tuple(images.shape)}"
        raise ValueError(msg)
    if region is not None and not 0 < region <= 1:
        msg = f"region must be in (0, 1] (a fraction of the image side) or None, got {region}"
        raise ValueError(msg)
    out, masks = [], []
    with tempfile.TemporaryDirectory(prefix="dxmi-ad-anomaly-sources-") as tmp, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if sources is not None and len(sources):
            for i, src in enumerate(sources):  # the generator reads its sources from files
                arr = (src.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
                Image.fromarray(arr).save(Path(tmp) / f"{i:05d}.png")
            generator = PerlinAnomalyGenerator(anomaly_source_path=tmp, probability=1.0, blend_factor=blend)
            # the generator lists its sources in directory order (file-system dependent): sort, so a seed fixes them
            generator.anomaly_source_paths = sorted(generator.anomaly_source_paths)
        else:
            generator = PerlinAnomalyGenerator(probability=1.0, blend_factor=blend)
        windows = torch.Generator().manual_seed(seed)  # its own stream: the masks are anomalib's, whatever region
        for image in images.float():
            augmented, mask = generator(image)
            mask = mask[0] > 0.5
            if region is not None:
                mask = _window(mask, region, windows)
                augmented = torch.where(mask, augmented, image)
            out.append(augmented.clamp(0, 1))
            masks.append(mask)
    return torch.stack(out), torch.stack(masks)


def _window(mask: torch.Tensor, region: float, rng: torch.Generator) -> torch.Tensor:
    """``mask (H, W) bool`` cut to a ``region``-sized window around one of its pixels (drawn with ``rng``).

    The window is ``round(region * H)`` by ``round(region * W)`` pixels (at least 1), centred on that pixel and
    shifted inside the image at a border, so every window has the full size and ``region = 1`` keeps the whole mask.
    """
    def span(centre: int, size: int) -> slice:
        side = max(1, int(region * size + 0.5))
        start = min(max(centre - side // 2, 0), size - side)
        return slice(start, start + side)

    rows, cols = torch.nonzero(mask, as_tuple=True)
    i = int(torch.randint(len(rows), (1,), generator=rng))
    window = torch.zeros_like(mask)
    window[span(int(rows[i]), mask.shape[0]), span(int(cols[i]), mask.shape[1])] = True
    return mask & window


def validation_auroc(score: Callable[[torch.Tensor], torch.Tensor], normal: torch.Tensor, anomalous: torch.Tensor,
                     batch_size: int = 64) -> float:
    """Image AUROC of ``score`` on normal vs anomalous inputs (feature maps or images), higher score = anomalous.

    Args:
        score: ``(B, ...) -> pred_score (B,)``.
        normal: Normal inputs ``(N, ...)``.
        anomalous: Anomalous inputs ``(M, ...)``.
        batch_size: Inputs per call.

    Returns:
        ``roc_auc_score`` (scikit-learn) in [0, 1]; NaN when a score is not finite.
    """
    from sklearn.metrics import roc_auc_score

    with torch.no_grad():
        scores = torch.cat([score(chunk) for x in (normal, anomalous) for chunk in x.split(batch_size)])
    if not bool(torch.isfinite(scores).all()):
        return float("nan")
    labels = np.r_[np.zeros(len(normal)), np.ones(len(anomalous))]
    return float(roc_auc_score(labels, scores.double().numpy()))


def validation_pixel_auroc(anomaly_map: Callable[[torch.Tensor], torch.Tensor], normal: torch.Tensor,
                           anomalous: torch.Tensor, masks: torch.Tensor, batch_size: int = 64) -> float:
    """Pixel AUROC of ``anomaly_map`` on normal and SYNTHETIC anomalous inputs against the synthetic masks.

    Every pixel of a normal input is negative; a pixel of an anomalous input is positive where its mask is set
    (anomalib's pixel AUROC convention: all pixels of all images of the set pooled).

    Args:
        anomaly_map: ``(B, ...) -> anomaly map (B, H, W)``, higher = more anomalous (any device).
        normal: Normal inputs ``(N, ...)``.
        anomalous: Anomalous inputs ``(M, ...)``.
        masks: Masks of the anomalous inputs, ``(M, H, W)`` bool tensor (True = anomalous pixel), at the anomaly
            map's size.
        batch_size: Inputs per call.

    Returns:
        ``roc_auc_score`` (scikit-learn) in [0, 1]; NaN when a map value is not finite or when the pooled pixels
        are all of one class (no mask pixel set, or no input at all).

    Raises:
        TypeError: If ``masks`` is not a bool tensor.
        ValueError: If ``masks`` does not have one ``(H, W)`` mask per anomalous input at the map's size.
    """
    from sklearn.metrics import roc_auc_score

    if not (isinstance(masks, torch.Tensor) and masks.dtype == torch.bool):
        msg = f"masks must be a bool tensor (True = anomalous pixel), got {type(masks).__name__} " \
              f"{getattr(masks, 'dtype', '')}".rstrip()
        raise TypeError(msg)
    with torch.no_grad():
        maps = torch.cat([anomaly_map(chunk).cpu() for x in (normal, anomalous) for chunk in x.split(batch_size)])
    if masks.shape != (len(anomalous), *maps.shape[1:]):
        msg = (f"masks have shape {tuple(masks.shape)}; expected one mask per anomalous input at the anomaly map's "
               f"size, {(len(anomalous), *maps.shape[1:])}")
        raise ValueError(msg)
    labels = torch.cat([torch.zeros(len(normal), *maps.shape[1:], dtype=torch.bool), masks.cpu()]).flatten()
    if not bool(torch.isfinite(maps).all()) or not bool(labels.any()) or bool(labels.all()):
        return float("nan")
    return float(roc_auc_score(labels.numpy(), maps.flatten().double().numpy()))
