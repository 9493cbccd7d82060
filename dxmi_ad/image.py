"""Image anomaly detection: frozen backbone features -> DxMI energy per location -> anomaly map and pred_score.

The paper's recipe (App. C.3; docs/paper_map.md): every location vector of the feature grid is an independent,
L2-normalized data point; an autoencoder energy is pretrained on the normal vectors, then DxMI fine-tunes it with a
sampler started from autoencoder-perturbed data (T = 5, tau = 0.1). At test time the per-location energies form the
energy map ``(B, h, w)``; the anomaly map is its bilinear upsampling to the model input ``(B, S, S)`` (and to the
original image size on request); ``pred_score`` is the maximum over locations (docs/paper_map.md), or the mean of
the ``scoring.top_k`` largest.

Training features are extracted once into a memory-mapped ``.npy`` cache keyed by the files, their sizes and
modification times, and the backbone settings, so a second run skips extraction and RAM stays bounded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dxmi_ad._warn import caller_stacklevel
from dxmi_ad.calibration import Calibration
from dxmi_ad.checkpoint import atomic_write_text, load_model_dir, save_model_dir
from dxmi_ad.config import DxMIConfig
from dxmi_ad.data.images import ImageReadError, load_image, load_mask, resize_images
from dxmi_ad.data.mvtec import ImageSample
from dxmi_ad.data.textures import default_cache_dir
from dxmi_ad.decision import (
    CalibratedDetector,
    check_calibration_fraction,
    check_rates,
    holdout_split,
    refuse_unsupported_rates,
)
from dxmi_ad.features.extractor import FeatureExtractor
from dxmi_ad.nn.model import DxMIModel
from dxmi_ad.scoring import MapScorer, ScoringSettings
from dxmi_ad.training.fit import ProgressCallback, restore_model, train_model

__all__ = ["BadFilesError", "FeatureSettings", "ImageDetector", "check_output_size", "iter_batches",
           "features_and_masks", "nonfinite_images", "refuse_overlap", "split_calibration", "to_image_batch"]

log = logging.getLogger(__name__)


class BadFilesError(ValueError):
    """Some files could not be read; ``errors`` maps each path to its reason."""

    def __init__(self, errors: dict[Path, str], context: str) -> None:
        lines = "\n".join(f"  {p}: {r}" for p, r in errors.items())
        super().__init__(f"{len(errors)} unreadable file(s) in the {context}:\n{lines}\n(fix or remove them, or leave "
                         "them out with --skip-bad-files / skip_bad_files=True)")
        self.errors = errors


@dataclass(frozen=True)
class FeatureSettings:
    """How images become feature vectors (stored in every image model's config.json).

    Attributes:
        backbone: timm model name.
        out_indices: Backbone stages used.
        image_size: Model input side in pixels (paper: 224).
        pretrained: ImageNet weights (False only on explicit request).
        weights: Optional path of a weights file.
        neighbourhood: ``k x k`` average of every stage's map before concatenation (PatchCore's 3 x 3 local
            aggregation; 1 = none, the paper's features).
    """

    backbone: str = "tf_efficientnet_lite0"
    out_indices: tuple[int, ...] = (0, 1, 2, 3)
    image_size: int = 224
    pretrained: bool = True
    weights: str | None = None
    neighbourhood: int = 1

    def __post_init__(self) -> None:
        """Validate every field (``ValueError`` naming ``features.<field>``); ``out_indices`` becomes a tuple."""
        from dxmi_ad.features.extractor import check_feature_settings

        check_feature_settings(asdict(self))
        object.__setattr__(self, "out_indices", tuple(self.out_indices))

    def build(self) -> FeatureExtractor:
        """The frozen :class:`FeatureExtractor` these settings describe."""
        return FeatureExtractor(self.backbone, self.out_indices, self.pretrained, self.weights,
                                neighbourhood=self.neighbourhood)


def iter_batches(
    samples: Sequence[ImageSample], size: int, batch_size: int
) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor, dict[int, str]]]:
    """Read images in batches, collecting unreadable files instead of failing.

    Yields:
        ``(indices, images, masks, errors)``: indices into ``samples`` of the readable images of the batch,
        ``(b, 3, size, size)`` float images in [0, 1], ``(b, size, size)`` bool masks, and ``{index: reason}`` for
        the unreadable ones.
    """
    for start in range(0, len(samples), batch_size):
        idx, imgs, masks, errors = [], [], [], {}
        for i in range(start, min(start + batch_size, len(samples))):
            s = samples[i]
            try:
                img, _ = load_image(s.path, size)
                mask = load_mask(s.mask_path, size)
            except ImageReadError as err:
                errors[i] = err.reason if err.path == s.path else f"its mask {err.path}: {err.reason}"
                continue
            idx.append(i)
            imgs.append(img)
            masks.append(mask)
        if imgs:
            yield idx, torch.stack(imgs), torch.stack(masks), errors
        else:
            yield [], torch.zeros(0, 3, size, size), torch.zeros(0, size, size, dtype=torch.bool), errors


@torch.no_grad()
def features_and_masks(samples: Sequence[ImageSample], extractor: FeatureExtractor, size: int, batch_size: int = 32
                       ) -> tuple[torch.Tensor, np.ndarray]:
    """Backbone features and ground-truth masks of listed samples (benchmarks and sweeps score them many times).

    Returns:
        ``features (n, C, h, w)`` of the readable samples in order, and ``masks (len(samples), size, size)`` bool.

    Raises:
        BadFilesError: If any file is unreadable.
    """
    feats, masks, bad = [], np.zeros((len(samples), size, size), bool), {}
    for idx, images, m, errors in iter_batches(samples, size, batch_size):
        if len(images):
            feats.append(extractor(images))
        masks[idx] = m.numpy()
        bad.update({samples[i].path: r for i, r in errors.items()})
    if bad:
        raise BadFilesError(bad, "listed samples")
    return torch.cat(feats), masks


_LOADER_VERSION = "torch-bilinear-antialias-v3-exif-16bit-alpha"  # cache key part: a decoding change re-extracts


def _cache_key(samples: Sequence[ImageSample], settings: FeatureSettings) -> str:
    h = hashlib.sha256(json.dumps({**asdict(settings), "loader": _LOADER_VERSION}, sort_keys=True).encode())
    if settings.weights and Path(settings.weights).exists():  # replaced weights must not reuse stale features
        st = Path(settings.weights).stat()
        h.update(f"weights|{st.st_size}|{st.st_mtime_ns}".encode())
    for s in samples:
        st = s.path.stat() if s.path.exists() else None
        h.update(f"{s.path.resolve()}|{st.st_size if st else -1}|{st.st_mtime_ns if st else -1}\n".encode())
    return h.hexdigest()[:24]


def extract_training_features(
    samples: Sequence[ImageSample],
    settings: FeatureSettings,
    extractor: FeatureExtractor,
    skip_bad_files: bool = False,
    cache_dir: Path | None = None,
    batch_size: int = 32,
    progress: ProgressCallback | None = None,
) -> tuple[np.ndarray, list[ImageSample]]:
    """Features of the training images, from the on-disk cache or extracted once into it.

    Args:
        samples: Training samples.
        settings: Feature settings (part of the cache key).
        extractor: The backbone.
        skip_bad_files: Leave unreadable files out (with a warning) instead of stopping.
        cache_dir: Cache parent folder (default ``~/.cache/dxmi-ad``).
        batch_size: Images per forward pass.
        progress: Progress callback (stage ``"features"``).

    Returns:
        ``(features, kept)``: a copy-on-write memory-mapped float32 array ``(n, h, w, C)`` and the samples it covers.

    Raises:
        BadFilesError: If a file is unreadable and ``skip_bad_files`` is False (lists every such file; raised
            before any training).
    """
    cache = (cache_dir or default_cache_dir()) / "features"
    key = _cache_key(samples, settings)
    path, meta_path = cache / f"{key}.npy", cache / f"{key}.json"
    if path.is_file() and meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
            cached = np.load(path, mmap_mode="c")
        except (OSError, ValueError) as err:
            msg = f"feature cache {path} is damaged ({err}); delete it (and {meta_path.name}) to re-extract"
            raise ValueError(msg) from err
        bad = {Path(p): r for p, r in meta["errors"].items()}
        if bad and not skip_bad_files:
            raise BadFilesError(bad, "training set")
        kept = [s for s in samples if s.path not in bad]
        return cached, kept
    cache.mkdir(parents=True, exist_ok=True)
    n, size = len(samples), settings.image_size
    grid_h, grid_w = extractor(torch.zeros(1, 3, size, size)).shape[-2:]  # exact grid for any input size
    fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".npy", dir=cache)
    os.close(fd)
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, grid_h, grid_w, extractor.channels))
        ok = np.zeros(n, bool)
        errors: dict[Path, str] = {}
        done = 0
        for idx, images, _, errs in iter_batches(samples, size, batch_size):
            errors.update({samples[i].path: r for i, r in errs.items()})
            if idx:
                out[idx] = extractor(images).permute(0, 2, 3, 1).numpy()  # (b, h, w, C)
                ok[idx] = True
            done += len(idx) + len(errs)
            if progress is not None:
                progress("features", done, n, {"unreadable": float(len(errors))})
        if errors and not skip_bad_files:
            raise BadFilesError(errors, "training set")
        if errors:
            log.warning("skipping %d unreadable training file(s): %s", len(errors), ", ".join(map(str, errors)))
        if not ok.all():  # compact: keep only readable rows
            compact = np.lib.format.open_memmap(tmp + ".c.npy", mode="w+", dtype=np.float32,
                                                shape=(int(ok.sum()), *out.shape[1:]))
            compact[:] = out[ok]
            compact.flush()
            del out, compact
            os.replace(tmp + ".c.npy", tmp)
        else:
            out.flush()
            del out
        os.replace(tmp, path)
        atomic_write_text(meta_path, json.dumps({"errors": {str(p): r for p, r in errors.items()},
                                                 "settings": asdict(settings)}))
    finally:
        for p in (tmp, tmp + ".c.npy"):
            Path(p).unlink(missing_ok=True)
    kept = [s for s in samples if s.path not in errors]
    return np.load(path, mmap_mode="c"), kept


def refuse_overlap(held: Sequence[ImageSample], others: Sequence[ImageSample], what: str, where: str) -> None:
    """Refuse held-out images that are also training/test images (leakage), naming a few."""
    seen = {s.path.resolve() for s in others}
    both = [str(s.path) for s in held if s.path.resolve() in seen]
    if both:
        msg = (f"{len(both)} {what} image(s) are also {where} images (e.g. {', '.join(both[:3])}): held-out data "
               "must not overlap them")
        raise ValueError(msg)


def _read_error(path: Path) -> str | None:
    """Why an image cannot be read, or None (a full decode, as training will do)."""
    try:
        load_image(path, 8)
    except ImageReadError as err:
        return str(err)
    return None


def check_output_size(output_size: Any) -> tuple[int, int] | None:
    """Validate an ``output_size`` argument: None, or ``(H, W)`` of two positive whole numbers of pixels.

    Raises:
        ValueError: Anything else (e.g. ``(0, 0)``, a single number, negative or fractional sizes).
    """
    if output_size is None:
        return None
    try:
        h, w = output_size
        ok = all(float(v) == int(v) and int(v) >= 1 for v in (h, w))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        msg = f"output_size must be (H, W) with two positive whole numbers of pixels, got {output_size!r}"
        raise ValueError(msg)
    return int(h), int(w)


def nonfinite_images(images: torch.Tensor) -> dict[int, int]:
    """``{batch index: number of NaN / infinite values}`` of an image batch ``(B, ...)`` (empty when all finite)."""
    if not images.is_floating_point() or not images.numel():
        return {}
    counts = (~torch.isfinite(images)).flatten(1).sum(1)
    return {int(i): int(counts[i]) for i in torch.nonzero(counts).flatten()}


def _refuse_nonfinite(images: torch.Tensor, what: str = "image") -> None:
    bad = nonfinite_images(images)
    if bad:
        i, n = next(iter(bad.items()))
        msg = (f"{what} {i} of the batch holds {n} NaN or infinite pixel value(s)"
               + (f" ({len(bad)} images in all: {sorted(bad)[:10]})" if len(bad) > 1 else "")
               + ": a non-finite image has no anomaly score; repair or drop it")
        raise ValueError(msg)


def _array_to_chw(a: np.ndarray, what: str) -> torch.Tensor:
    """One image array ``(H, W)``, ``(H, W, C)`` or ``(C, H, W)`` (C in 1, 3) -> float ``(3, H, W)`` in [0, 1]."""
    if a.ndim == 2:
        a = a[None]
    elif a.ndim == 3:
        if a.shape[-1] in (1, 3) and a.shape[0] in (1, 3):
            msg = (f"{what}: shape {a.shape} is ambiguous (channels first or last?); pass a PIL image, or a batch "
                   "(B, H, W, 3) / (B, 3, H, W) whose layout is unambiguous")
            raise ValueError(msg)
        if a.shape[-1] in (1, 3) and a.shape[0] not in (1, 3):
            a = np.moveaxis(a, -1, 0)  # HWC -> CHW
        elif a.shape[0] not in (1, 3):
            msg = (f"{what}: expected (H, W), (H, W, 3) or (3, H, W) (1 channel for grayscale), got shape "
                   f"{a.shape}" + (" (RGBA: convert to RGB first)" if 4 in (a.shape[0], a.shape[-1]) else ""))
            raise ValueError(msg)
    else:
        msg = f"{what}: expected (H, W), (H, W, 3) or (3, H, W), got shape {a.shape}"
        raise ValueError(msg)
    return _scale(torch.from_numpy(np.array(a, order="C", copy=True)), what).expand(3, -1, -1)  # read-only inputs too


def _scale(x: torch.Tensor, what: str) -> torch.Tensor:
    """uint8 -> float in [0, 1]; float checked to lie in [0, 1] (non-finite values named); other dtypes refused."""
    if x.dtype == torch.uint8:
        return x.float() / 255.0
    if not x.is_floating_point():
        msg = (f"{what}: unsupported dtype {x.dtype}; pass uint8 (0-255) or float values in [0, 1] "
               "(e.g. divide 16-bit data by 65535)")
        raise ValueError(msg)
    x = x.float()
    finite = x[torch.isfinite(x)]
    if finite.numel():
        lo, hi = float(finite.min()), float(finite.max())
        if lo < -1e-3 or hi > 1 + 1e-3:
            msg = (f"{what}: float images must lie in [0, 1], got [{lo:.3g}, {hi:.3g}] "
                   "(divide 0-255 values by 255, or pass uint8)")
            raise ValueError(msg)
    return x


def _one_image(item: Any, size: int, index: int) -> tuple[torch.Tensor, bool]:
    """One list element -> ``((3, H, W) float, decoded_from_file)``; files are read as ``dxmi-ad score`` reads them."""
    from PIL import Image

    what = f"image {index}"
    if isinstance(item, (str, os.PathLike)):
        return load_image(Path(item), size)[0], True  # ImageReadError (a ValueError) names the file
    if isinstance(item, Image.Image):
        from dxmi_ad.data.images import decode_pil  # the file decoder (EXIF, 16-bit, palette, alpha, float)

        rgb = decode_pil(item, what)  # always (H, W, 3): channels last, whatever H and W are
        return _scale(torch.from_numpy(np.ascontiguousarray(np.moveaxis(rgb, -1, 0))), what), False
    if isinstance(item, np.ndarray):
        return _array_to_chw(item, what), False
    if torch.is_tensor(item):
        x = item.detach().cpu()
        if x.ndim != 3 or x.shape[0] not in (1, 3):
            msg = f"{what}: a tensor image must be (3, H, W) (or (1, H, W)), got {tuple(x.shape)}"
            raise ValueError(msg)
        return _scale(x, what).expand(3, -1, -1), False
    msg = (f"{what}: unsupported type {type(item).__name__}; pass a file path, a PIL image, a numpy array or a "
           "torch tensor")
    raise TypeError(msg)


def to_image_batch(images: Any, size: int) -> torch.Tensor:
    """Anything a user passes as images -> an RGB float batch ``(B, 3, H, W)`` in [0, 1].

    Accepted: a torch tensor ``(B, 3, H, W)`` / ``(3, H, W)``; a numpy array ``(B, H, W, 3)``, ``(B, 3, H, W)``,
    ``(H, W, 3)``, ``(3, H, W)`` or ``(H, W)`` (grayscale); a PIL image; a file path (``str`` / ``Path``, decoded
    as ``dxmi-ad score`` decodes files); or a list of these. Values are uint8 in [0, 255] or float in [0, 1]. A
    list of images of different sizes, and every file, is resized to the model input ``size x size`` (the
    anomaly map is then at that size unless ``output_size`` is given).

    Raises:
        ValueError: Wrong shape, dtype or value range, NaN / infinite pixels (the batch index is named), an
            unreadable file (:class:`~dxmi_ad.data.images.ImageReadError`, naming it), an empty list.
        TypeError: An unsupported type.
    """
    if torch.is_tensor(images) and images.ndim == 4:
        if images.shape[1] != 3:
            msg = f"images must be (B, 3, H, W) RGB, got {tuple(images.shape)}"
            raise ValueError(msg)
        x = _scale(images.detach().cpu(), "images")
    elif isinstance(images, np.ndarray) and images.ndim == 4:
        a = images
        if a.shape[-1] == 3 and a.shape[1] == 3:
            msg = (f"image array shape {images.shape} is ambiguous (channels first or last?); pass a list of PIL "
                   "images or a torch tensor (B, 3, H, W)")
            raise ValueError(msg)
        if a.shape[-1] == 3 and a.shape[1] != 3:
            a = np.moveaxis(a, -1, 1)  # (B, H, W, 3) -> (B, 3, H, W)
        if a.shape[1] != 3:
            msg = f"image arrays must be (B, H, W, 3) or (B, 3, H, W) RGB, got {images.shape}"
            raise ValueError(msg)
        x = _scale(torch.from_numpy(np.ascontiguousarray(a)), "images")
    else:
        items = list(images) if isinstance(images, (list, tuple)) else [images]
        if not items:
            msg = "no images given (an empty list)"
            raise ValueError(msg)
        decoded = [_one_image(item, size, i) for i, item in enumerate(items)]
        shapes = {tuple(t.shape) for t, _ in decoded}
        if len(shapes) > 1:
            x = torch.stack([resize_images(t[None], size)[0] for t, _ in decoded])
        else:
            x = torch.stack([t for t, _ in decoded])
    _refuse_nonfinite(x)
    return x


def split_calibration(samples: Sequence[ImageSample], fraction: float, seed: int, minimum: int = 0
                      ) -> tuple[list[ImageSample], list[ImageSample]]:
    """Hold out a calibration split of normal training images, per category (seeded; never test images).

    Images without a tile box are drawn at random. Tiles cut from larger pictures (every training image of the
    category has a :class:`~dxmi_ad.data.mvtec.TileBox`, from ``train/tiles.csv``) are held out as a block, and
    the tiles that share a pixel with a held-out tile are left out of training too: a held-out tile that overlaps a
    training tile is partly seen and scores lower than new normal images, so a threshold set on it flags more normal
    images than its target rate (measured on the embedded textures, README). The block is the last tiles in raster
    order (top, then left) of the category's source pictures taken in a seeded order.

    Args:
        samples: Training samples (``split == "train"``).
        fraction: Fraction in [0, 0.9] of each category's training images held out (rounded down; a category
            keeps at least 2 training images).
        seed: Seed of the draw.
        minimum: Hold out at least this many images of every category that has ``minimum + 2`` or more (the
            model-selection split uses 1, so small categories are not left out of validation).

    Returns:
        ``(fit, calibration)`` lists, each in the input order; with tiles, ``fit`` lacks the tiles that overlap
        held-out ones (neither list holds them).

    Raises:
        ValueError: If ``fraction`` is outside [0, 0.9] (:func:`~dxmi_ad.decision.check_calibration_fraction`), or if
            tiles overlap so much that fewer than 2 training tiles of a category share no pixel with the held-out ones.
    """
    fraction = check_calibration_fraction(fraction)
    rng = np.random.default_rng(seed)
    held: set[int] = set()
    dropped: set[int] = set()
    for cat in sorted({s.category for s in samples}):
        idx = [i for i, s in enumerate(samples) if s.category == cat]
        n = min(max(int(fraction * len(idx)), minimum), max(len(idx) - 2, 0))
        if not n or any(samples[i].tile is None for i in idx):
            held.update(int(i) for i in rng.permutation(idx)[:n])
            continue
        sources = sorted({samples[i].tile.source for i in idx})
        rank = {src: r for r, src in enumerate(rng.permutation(sources).tolist())}
        order = sorted(idx, key=lambda i: (rank[samples[i].tile.source], samples[i].tile.top, samples[i].tile.left))
        block = order[-n:]
        near = {i for i in order[:-n] if any(samples[i].tile.overlaps(samples[j].tile) for j in block)}
        if len(idx) - n - len(near) < 2:
            msg = (f"category {cat!r}: holding out {n} of {len(idx)} tiles leaves {len(idx) - n - len(near)} that "
                   "share no pixel with them (train/tiles.csv); hold out fewer (the calibration fraction, or "
                   "validation_fraction; model selection holds out at least 1: validate_every=0 turns it off) or add "
                   "tiles that do not overlap")
            raise ValueError(msg)
        held.update(block)
        dropped.update(near)
    if dropped:
        log.info("hold-out: %d training tiles share pixels with the %d held-out ones and are not trained on",
                 len(dropped), len(held))
    return ([s for i, s in enumerate(samples) if i not in held and i not in dropped],
            [s for i, s in enumerate(samples) if i in held])


def _backbone_channels(features: FeatureSettings) -> int:
    """Channels of the location vectors these settings give (the backbone is built without loading weights).

    Raises:
        ValueError: An unknown backbone or stage indices it does not have (from :class:`FeatureExtractor`).
    """
    return FeatureExtractor(features.backbone, features.out_indices, pretrained=False).channels


class ImageDetector(CalibratedDetector):
    """Feature extractor + vector DxMI energy head; scores images into ``pred_score`` and ``anomaly_map``.

    Args:
        config: DxMI config of the head (``dim`` is set from the backbone; ``spherical`` should be True).
        features: :class:`FeatureSettings`.
        runtime: Lightning Fabric execution of the head's training (devices, precision, DDP, checkpoints,
            resume; :class:`~dxmi_ad.training.runtime.Runtime`), or None (this process, CPU).
        scoring: :class:`~dxmi_ad.scoring.ScoringSettings` (blur of the energy map, top-k mean); default: the
            paper's plain maximum.

    Attributes:
        model_: The trained :class:`DxMIModel` (after :meth:`fit` or :meth:`load`), else None.
        calibration_: The :class:`~dxmi_ad.calibration.Calibration` of image scores (held-out normal images and the
            decision rule; :class:`~dxmi_ad.decision.CalibratedDetector`), else None; ``threshold`` is its fixed
            threshold on ``pred_score`` (energy units), None under the FDR rule.
        history_: DxMI training diagnostics.
        selection_split_: What :meth:`fit` held out for model selection (``validate_every > 0``), one sentence with
            the counts (and the tiles left out of training next to a block of tiles), else None. Not saved.
    """

    def __init__(self, config: DxMIConfig, features: FeatureSettings | None = None, runtime: Any = None,
                 scoring: ScoringSettings | None = None) -> None:
        self.config = config
        self.runtime = runtime
        self.features = features or FeatureSettings()
        self.scoring = scoring or ScoringSettings()
        self.extractor: FeatureExtractor | None = None
        self.model_: DxMIModel | None = None
        self.calibration_: Calibration | None = None
        self.history_: list[dict[str, Any]] = []
        self.selection_split_: str | None = None
        self.categories: list[str] = []

    @property
    def scoring(self) -> ScoringSettings:
        """How the energy map becomes ``pred_score`` (:class:`~dxmi_ad.scoring.ScoringSettings`).

        Setting other settings on a calibrated detector warns: the decision rule's threshold is in the units of the
        scores it was calibrated on; call :meth:`calibrate` again (``dxmi-ad calibrate``).
        """
        return self._scoring

    @scoring.setter
    def scoring(self, value: ScoringSettings) -> None:
        old = self.__dict__.get("_scoring")
        if old is not None and value != old and self.__dict__.get("calibration_") is not None:
            warnings.warn(f"scoring changed from {old} to {value} after calibration: the decision threshold was set on "
                          "the old scores; call calibrate() again", UserWarning, stacklevel=caller_stacklevel())
        self._scoring = value

    def _extractor(self) -> FeatureExtractor:
        if self.extractor is None:
            self.extractor = self.features.build()
        return self.extractor

    def scorer(self) -> MapScorer:
        """The :class:`~dxmi_ad.scoring.MapScorer` of the trained energy (the one scorer of every front end).

        Raises:
            RuntimeError: If the detector is not trained.
        """
        if self.model_ is None:
            msg = "the detector is not trained; call fit() or load()"
            raise RuntimeError(msg)
        return MapScorer(self.model_.energy, self.scoring).eval()

    # ------------------------------------------------------------------ training
    def fit(
        self,
        samples: Sequence[ImageSample],
        skip_bad_files: bool = False,
        cache_dir: Path | None = None,
        progress: ProgressCallback | None = None,
        calibration: float | Sequence[ImageSample] = 0.2,
        fpr: float | None = None,
        fdr: float | None = None,
    ) -> ImageDetector:
        """Extract (or reuse) training features, train the DxMI head on every location vector, then calibrate.

        Args:
            samples: Samples; only ``split == "train"`` ones are used.
            skip_bad_files: Leave unreadable training files out instead of stopping.
            cache_dir: Feature cache parent folder.
            progress: Progress callback.
            calibration: Fraction of each category's training images held out as the calibration split (see
                :func:`split_calibration`; 0 = calibrate on the training images, optimistic p-values), or a list
                of held-out normal images (e.g. ``--calibration-dir``; never the test set).
            fpr: Target false-positive rate of the decision rule (see :meth:`calibrate`).
            fdr: Benjamini-Hochberg false discovery rate instead (see :meth:`calibrate`).

        Returns:
            self.

        Raises:
            BadFilesError: Unreadable training or calibration files without ``skip_bad_files``.
            ValueError: If there are no training images.
            dxmi_ad.calibration.CalibrationError: A calibration split too small for a requested rate.
        """
        check_rates(fpr, fdr)  # ranges before any feature extraction or training
        self.selection_split_ = None
        train = [s for s in samples if s.split == "train"]
        if not train:
            msg = "no training images"
            raise ValueError(msg)
        if isinstance(calibration, (int, float)):
            fit_part, cal_part = split_calibration(train, float(calibration), self.config.seed)
            source = (f"{len(cal_part)} of {len(train)} training images held out ({float(calibration):g} per "
                      f"category, seed {self.config.seed})")
            if len(fit_part) + len(cal_part) < len(train):  # tiles (train/tiles.csv): a pixel-disjoint block
                source += (f"; a block of tiles, the {len(train) - len(fit_part) - len(cal_part)} tiles sharing "
                           "pixels with it not trained on")
        else:
            fit_part, cal_part = train, list(calibration)
            source = f"{len(cal_part)} given calibration images"
            refuse_overlap(cal_part, [*train, *(s for s in samples if s.split == "test")], "calibration",
                            "training or test")
        bad = {s.path: str(err) for s in cal_part for err in [_read_error(s.path)] if err is not None}
        if bad and not skip_bad_files:  # same rule as the training set: stop before any training
            raise BadFilesError(bad, "calibration set")
        cal_part = [s for s in cal_part if s.path not in bad]
        if bad and not cal_part:
            msg = "every calibration image is unreadable; pass readable held-out normal images"
            raise ValueError(msg)
        refuse_unsupported_rates(fpr, fdr, len(cal_part) or len(fit_part), "images",  # before training, not after
                                 "raise the calibration fraction, pass --calibration-dir, or ask for a larger rate")
        extractor = self._extractor()
        validate = None
        if self.config.validate_every:  # honest model selection: held-out normals + synthetic anomalies
            n_before = len(fit_part)
            fit_part, val_part = split_calibration(fit_part, self.config.validation_fraction, self.config.seed + 1,
                                                   minimum=1)
            self.selection_split_ = (f"{len(val_part)} of {n_before} training images held out to select the model "
                                     f"({self.config.validation_fraction:g} per category, seed {self.config.seed + 1})")
            if len(fit_part) + len(val_part) < n_before:  # tiles (train/tiles.csv): a pixel-disjoint block
                self.selection_split_ += (f"; a block of tiles, the {n_before - len(fit_part) - len(val_part)} "
                                          "tiles sharing pixels with it not trained on")
            validate = self._validation(val_part, fit_part, skip_bad_files)
        feats, kept = extract_training_features(fit_part, self.features, extractor, skip_bad_files, cache_dir,
                                                progress=progress)
        if len(kept) < 1:
            msg = "no readable training images"
            raise ValueError(msg)
        self.fit_features(feats, sorted({s.category for s in kept}), progress, calibration_fraction=0.0,
                          calibrate=False, validate=validate)
        if cal_part:
            self.calibrate(cal_part, fpr=fpr, fdr=fdr, skip_bad_files=skip_bad_files, source=source)
        else:
            self.calibrate(kept, fpr=fpr, fdr=fdr, skip_bad_files=skip_bad_files,
                           source="the training images (no calibration split: p-values are optimistic)")
        return self

    def fit_features(
        self,
        feats: np.ndarray,
        categories: list[str],
        progress: ProgressCallback | None = None,
        calibration_fraction: float = 0.2,
        fpr: float | None = None,
        fdr: float | None = None,
        calibrate: bool = True,
        validate: Callable[[DxMIModel], float] | None = None,
    ) -> ImageDetector:
        """Train the DxMI head on feature maps (the pretrained-feature dataset path; no backbone involved).

        Args:
            feats: ``(n, h, w, C)`` float32 feature maps of normal images (a memory map is not copied).
            categories: Category names of the training set.
            progress: Progress callback.
            calibration_fraction: Fraction of the maps held out (seeded) as the calibration split; with 0 the
                training maps calibrate (optimistic p-values) unless :meth:`calibrate` is called afterwards.
            fpr: Target false-positive rate of the decision rule (see :meth:`calibrate`).
            fdr: Benjamini-Hochberg false discovery rate instead (see :meth:`calibrate`).
            calibrate: False leaves calibration to the caller (``fit`` calibrates on its held-out images).
            validate: Model selection callback (see :func:`~dxmi_ad.training.fit.train_model`); ``fit`` builds it
                from held-out training images when ``config.validate_every > 0``.

        Returns:
            self.
        """
        self.categories = list(categories)
        n, h, w, c = feats.shape
        fit_rows, cal_rows = holdout_split(n, calibration_fraction, self.config.seed)
        n_cal = len(cal_rows)
        self.config = self.config.replace(dim=c)
        if n_cal:
            vectors = torch.from_numpy(np.asarray(feats[fit_rows]).reshape(-1, c))
        else:
            vectors = torch.from_numpy(np.asarray(feats).reshape(n * h * w, c))  # memory-mapped, not copied
        self.model_, self.history_ = train_model(vectors, self.config, progress=progress, log_every=5,
                                               runtime=self.runtime, validate=validate)
        if not calibrate:
            return self
        rows = cal_rows if n_cal else fit_rows
        scores = np.concatenate([
            self.score_features(torch.from_numpy(np.array(feats[rows[i:i + 64]])).permute(0, 3, 1, 2))[0].numpy()
            for i in range(0, len(rows), 64)])
        source = (f"{n_cal} of {n} training feature maps held out (seed {self.config.seed})" if n_cal
                  else "the training images (no calibration split: p-values are optimistic)")
        self.calibrate(scores=scores, fpr=fpr, fdr=fdr, source=source)
        return self

    def _validation(self, normals: Sequence[ImageSample], others: Sequence[ImageSample], skip_bad_files: bool
                    ) -> Callable[[DxMIModel], float]:
        """The model-selection score: mean per-category AUROC on held-out normals vs SYNTHETIC anomalies.

        Image AUROC of ``pred_score``, pixel AUROC of the anomaly map against the synthetic masks, or their mean, as
        ``config.validation_metric`` says.

        Each held-out normal training image also becomes a synthetic anomaly (:func:`~dxmi_ad.validation.
        synthetic_anomalies`: a Perlin mask filled, as ``config.validation_source`` says, from another normal
        training image of the same category, the Perlin noise itself, or a training image of another category). Only
        training images are read; the scorer is the model's (blur included).

        Returns:
            ``validate(model) -> float``: the mean over categories, in [0, 1], NaN when a score is not finite.

        Raises:
            BadFilesError: Unreadable held-out images without ``skip_bad_files``.
            ValueError: If a category has no readable held-out image.
        """
        from dxmi_ad.validation import synthetic_anomalies, validation_auroc, validation_pixel_auroc

        size, extractor = self.features.image_size, self._extractor()
        blend = (self.config.validation_blend_low, self.config.validation_blend_high)

        def read(samples: Sequence[ImageSample], what: str) -> torch.Tensor:
            images, bad = [], {}
            for _, imgs, _, errors in iter_batches(samples, size, 32):
                images.append(imgs)
                bad.update({samples[i].path: r for i, r in errors.items()})
            if bad and not skip_bad_files:
                raise BadFilesError(bad, what)
            return torch.cat(images) if images else torch.zeros(0, 3, size, size)

        sets = []
        for k, cat in enumerate(sorted({s.category for s in normals})):
            normal = read([s for s in normals if s.category == cat], "validation split")
            source = self.config.validation_source  # what fills the synthetic anomalies' masks
            pool = [s for s in others if (s.category == cat) == (source == "normal")]
            if source == "other" and not pool:
                msg = (f"validation_source='other' fills category {cat!r}'s synthetic anomalies with other categories' "
                       "training images, and there are none: use 'normal' or 'noise'")
                raise ValueError(msg)
            sources = None if source == "noise" else read(
                [pool[i] for i in np.random.default_rng(self.config.seed + k).permutation(len(pool))[:32]],
                "training set")
            if not len(normal):
                msg = f"category {cat!r} has no readable held-out validation image"
                raise ValueError(msg)
            anomalous, masks = synthetic_anomalies(normal, sources, seed=self.config.seed + 7919 * k, blend=blend,
                                                   region=self.config.validation_region)
            with torch.no_grad():
                sets.append((torch.cat([extractor(c) for c in normal.split(32)]),
                             torch.cat([extractor(c) for c in anomalous.split(32)]), masks))
        if not sets:
            msg = ("model selection (validate_every > 0) needs held-out training images: every category has fewer "
                   "than 3 training images after the calibration split")
            raise ValueError(msg)
        missing = sorted({s.category for s in others} - {s.category for s in normals})
        if missing:
            warnings.warn(f"categories {missing} have too few training images to hold any out: they are not part of "
                          "the model-selection score", UserWarning, stacklevel=caller_stacklevel())
        log.info("model selection: %d held-out normal images (+ as many synthetic anomalies) in %d categories",
                 sum(len(n) for n, _, _ in sets), len(sets))

        metric = self.config.validation_metric

        def validate(model: DxMIModel) -> float:
            device = next(model.parameters()).device
            scorer = MapScorer(model.energy, self.scoring).eval()

            def energy_maps(f: torch.Tensor) -> torch.Tensor:  # (B, C, h, w) -> (B, h, w), once per set and check
                with torch.no_grad():
                    return torch.cat([scorer.energy_map(c.to(device)).float().cpu() for c in f.split(64)])

            def anomaly_map(e: torch.Tensor) -> torch.Tensor:
                return scorer.from_energy_map(e, (size, size))[1]

            per_category = []
            for n, a, m in sets:
                e_n, e_a = energy_maps(n), energy_maps(a)
                parts = []
                if metric != "pixel":  # "image" or "image+pixel"
                    parts.append(validation_auroc(scorer.reduce, e_n, e_a))
                if metric != "image":  # "pixel" or "image+pixel"
                    parts.append(validation_pixel_auroc(anomaly_map, e_n, e_a, m))
                per_category.append(np.mean(parts))
            return float(np.mean(per_category))

        return validate

    # ------------------------------------------------------------------ calibration
    def calibrate(
        self,
        samples: Sequence[ImageSample] | None = None,
        fpr: float | None = None,
        fdr: float | None = None,
        validation: Sequence[ImageSample] | None = None,
        skip_bad_files: bool = False,
        source: str | None = None,
        scores: np.ndarray | None = None,
    ) -> Calibration:
        """Set the decision rule from held-out normal images (never the test set); no retraining.

        Args:
            samples: Normal calibration images; None with ``scores`` None keeps the stored calibration scores.
            fpr: Target false-positive rate in (0, 1); default: the stored rate when the stored scores are kept,
                else 0.01, or the smallest rate the set supports (warned).
            fdr: Target false discovery rate: Benjamini-Hochberg over each scored batch.
            validation: Labelled images (``label`` 1 = anomalous) for an F1-optimal threshold (warned and refused
                without both classes).
            skip_bad_files: Leave unreadable calibration files out instead of stopping.
            source: Description recorded in the calibration.
            scores: Precomputed ``(n,)`` calibration image scores instead of ``samples``.

        Returns:
            The new :class:`~dxmi_ad.calibration.Calibration` (also stored in ``self.calibration_``).

        Raises:
            BadFilesError: Unreadable calibration/validation files without ``skip_bad_files``.
            dxmi_ad.calibration.CalibrationError: Too few calibration images for the rate (minimum stated).
            ValueError: ``fpr``/``fdr`` outside (0, 1), checked before any image is read.
        """
        check_rates(fpr, fdr)
        files: list[str] | None = None
        if scores is None and samples is not None:
            out = self.score_samples(samples)
            if out["errors"] and not skip_bad_files:
                raise BadFilesError({samples[i].path: r for i, r in out["errors"].items()}, "calibration set")
            ok = np.flatnonzero(np.isfinite(out["pred_score"]))
            scores, files = out["pred_score"][ok], [str(samples[i].path) for i in ok]
            source = source or f"{len(scores)} calibration images"
        elif scores is None:
            self._require_calibration("pass calibration images")
        val = None
        if validation is not None:
            out = self.score_samples(validation)
            if out["errors"] and not skip_bad_files:
                raise BadFilesError({validation[i].path: r for i, r in out["errors"].items()}, "validation set")
            ok = np.isfinite(out["pred_score"])
            val = (out["pred_score"][ok], np.array([s.label for s in validation])[ok])
        return self._set_calibration(scores, fpr, fdr, val, source or "", files)

    def p_value(self, pred_score: np.ndarray | torch.Tensor) -> np.ndarray:
        """Split-conformal p-values ``(B,)`` of image scores ``(B,)`` against the calibration images.

        Raises:
            dxmi_ad.decision.NotCalibratedError: Before calibration.
        """
        return self.p_values_of(np.asarray(pred_score, dtype=np.float64))

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def energy_map(self, features: torch.Tensor) -> torch.Tensor:
        """Per-location energies of features ``(B, C, h, w)`` -> ``(B, h, w)``, higher = more anomalous (no blur)."""
        return self.scorer().energy_map(features)

    @torch.no_grad()
    def score_features(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(pred_score (B,), energy_map (B, h, w))`` from features ``(B, C, h, w)``; pred_score = max (or top-k
        mean) of the (blurred, :class:`~dxmi_ad.scoring.ScoringSettings`) energy map.
        """
        scorer = self.scorer()
        emap = scorer.energy_map(features)
        return scorer.reduce(emap), emap

    @torch.no_grad()
    def _score_batch(self, images: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(pred_score (B,), anomaly_map (B, H, W))`` of a checked float batch ``(B, 3, H', W')`` in [0, 1]."""
        feats = self._extractor()(resize_images(images.float(), self.features.image_size))
        return self.scorer()(feats, size)

    @torch.no_grad()
    def predict(self, images: Any, output_size: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
        """Score images.

        Args:
            images: RGB batch ``(B, 3, H, W)`` tensor, float in [0, 1] or uint8 in [0, 255], any ``H, W`` (resized to
                the model input size ``S`` with :func:`~dxmi_ad.data.images.resize_images`, as files are); or a
                numpy array (HWC / CHW, one image or a batch), a PIL image, a file path, or a list of these (see
                :func:`to_image_batch`).
            output_size: ``(H, W)`` of the returned ``anomaly_map`` in pixels (default: the input's ``(H, W)``).

        Raises:
            ValueError: Wrong shape, dtype or range (e.g. 0-255 floats), a NaN / infinite pixel or a non-finite
                score (the batch index is named: a non-finite score is never turned into a decision), an
                unreadable file, or an invalid ``output_size``.
            TypeError: An unsupported input type.

        Returns:
            ``pred_score`` ``(B,)`` (energy, higher = more anomalous), ``anomaly_map`` ``(B, H, W)`` (bilinear
            upsampling of the energy map), and with a calibration (decision rule) only: ``pred_label`` ``(B,)``
            bool (the stored rule; under ``fdr`` Benjamini-Hochberg over this batch), ``p_value`` ``(B,)`` float64
            in (0, 1] and ``normalized_score`` ``(B,)`` in [0, 1] with the threshold at 0.5. Without a
            calibration there is no ``pred_label``: no rule, no decision.
        """
        size = check_output_size(output_size)
        batch = to_image_batch(images, self.features.image_size)
        pred_score, amap = self._score_batch(batch, size or tuple(batch.shape[-2:]))
        bad = torch.nonzero(~torch.isfinite(pred_score)).flatten().tolist()
        if bad:
            msg = (f"image {bad[0]} of the batch got a non-finite anomaly score ({float(pred_score[bad[0]])}) from "
                   "finite pixels: the model's weights are numerically broken; no decision is made")
            raise ValueError(msg)
        out = {"pred_score": pred_score, "anomaly_map": amap}
        out.update({k: torch.from_numpy(v) for k, v in self.decisions(pred_score.double().numpy()).items()})
        return out

    def score_checked(self, images: torch.Tensor, size: tuple[int, int] | None = None
                      ) -> tuple[list[int], torch.Tensor, torch.Tensor, dict[int, str]]:
        """Score a batch read from files, turning non-finite inputs or scores into per-image errors.

        Args:
            images: ``(B, 3, H, W)`` float in [0, 1] (as :func:`iter_batches` yields).
            size: ``(H, W)`` of the anomaly maps (default: the input's).

        Returns:
            ``(kept, pred_score (k,), anomaly_map (k, H, W), errors)``: positions in the batch of the ``k`` images
            with a finite score, their scores and maps, and ``{position: reason}`` for the others (never scored as
            normal).
        """
        errors = {i: f"the image holds {n} NaN or infinite pixel value(s): a non-finite image has no anomaly score"
                  for i, n in nonfinite_images(images).items()}
        kept = [i for i in range(len(images)) if i not in errors]
        if not kept:
            return [], torch.zeros(0), torch.zeros(0, *(size or images.shape[-2:])), errors
        pred_score, amap = self._score_batch(images[kept], size or tuple(images.shape[-2:]))
        finite = torch.isfinite(pred_score)
        for j in torch.nonzero(~finite).flatten().tolist():
            errors[kept[j]] = (f"non-finite anomaly score ({float(pred_score[j])}) from finite pixels: the model's "
                               "weights are numerically broken; no decision is made")
        return [i for j, i in enumerate(kept) if finite[j]], pred_score[finite], amap[finite], errors

    def score_feature_maps(self, features: torch.Tensor, size: tuple[int, int], batch_size: int = 64) -> dict:
        """Score stored feature maps ``(N, C, h, w)``: ``pred_score (N,)``, ``anomaly_map (N, H, W)`` float16 numpy."""
        scores, maps = [], []
        scorer = self.scorer()
        for chunk in features.split(batch_size):
            with torch.no_grad():
                s, amap = scorer(chunk.float(), size)
            scores.append(s.numpy())
            maps.append(amap.numpy().astype(np.float16))
        return {"pred_score": np.concatenate(scores), "anomaly_map": np.concatenate(maps)}

    def score_samples(
        self, samples: Sequence[ImageSample], batch_size: int = 32, on_batch: Callable[[int, int], None] | None = None
    ) -> dict[str, Any]:
        """Score listed samples in batches (bounded memory).

        Returns:
            ``pred_score`` ``(n,)`` numpy (NaN for unreadable files and for non-finite images or scores, which are
            listed in ``errors``), ``anomaly_map`` ``(n, S, S)`` float16 numpy, ``gt_mask`` ``(n, S, S)`` bool numpy,
            ``errors`` ``{index: reason}``.
        """
        size = self.features.image_size
        n = len(samples)
        scores = np.full(n, np.nan)
        maps = np.zeros((n, size, size), np.float16)
        masks = np.zeros((n, size, size), bool)
        errors: dict[int, str] = {}
        done = 0
        for idx, images, m, errs in iter_batches(samples, size, batch_size):
            errors.update(errs)
            if idx:
                kept, pred_score, amap, bad = self.score_checked(images)
                errors.update({idx[j]: r for j, r in bad.items()})  # non-finite: an error, never a score
                rows = [idx[j] for j in kept]
                scores[rows] = pred_score.numpy()
                maps[rows] = amap.numpy().astype(np.float16)
                masks[idx] = m.numpy()
            done += len(idx) + len(errs)
            if on_batch is not None:
                on_batch(done, n)
        return {"pred_score": scores, "anomaly_map": maps, "gt_mask": masks, "errors": errors}

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | Path, extra: dict[str, Any] | None = None) -> None:
        """Write ``model.safetensors`` + ``config.json`` + ``calibration.json`` (atomic per file; no pickle)."""
        if self.model_ is None:
            msg = "nothing to save: the detector is not trained"
            raise RuntimeError(msg)
        meta = {"kind": "ImageDetector", "config": self.config.to_dict(), "features": asdict(self.features),
                "scoring": self.scoring.to_dict(),
                "categories": self.categories, "history": self.history_[-1:], **(extra or {})}
        save_model_dir(directory, self.model_.checkpoint_tensors(), meta)
        self._save_calibration(directory)

    @classmethod
    def load(cls, directory: str | Path) -> ImageDetector:
        """Load a model written by :meth:`save`.

        Raises:
            FileNotFoundError: Missing folder or files.
            ValueError: If the folder does not hold an image model.
        """
        tensors, meta = load_model_dir(directory)
        if meta.get("kind") != "ImageDetector":
            msg = f"{directory} does not hold an image model (kind={meta.get('kind')!r}); it was trained on vectors"
            raise ValueError(msg)
        try:
            feats = dict(meta["features"])
            feats["out_indices"] = tuple(feats["out_indices"])
            features = FeatureSettings(**feats)
            scoring = ScoringSettings.from_dict(meta.get("scoring"))  # absent in runs written before the option
        except (KeyError, TypeError, ValueError) as err:
            msg = f"{directory} holds an invalid or tampered model description: {err}"
            raise ValueError(msg) from err
        model = restore_model(meta.get("config"), tensors, directory)
        channels = _backbone_channels(features)
        if channels != model.config.dim:
            msg = (f"{Path(directory) / 'config.json'}: features (backbone {features.backbone!r}, out_indices "
                   f"{list(features.out_indices)}) give {channels}-d location vectors but the energy was trained on "
                   f"config.dim = {model.config.dim}: the features section does not belong to these weights")
            raise ValueError(msg)
        det = cls(model.config, features, scoring=scoring)
        det.model_ = model
        det._load_calibration(directory)
        det.history_ = meta.get("history", [])
        det.categories = meta.get("categories", [])
        return det
