"""Image commands of the CLI: training on image datasets, ``evaluate``, ``score``, ``extract-features``.

Datasets: ``textures`` (embedded default: real CC0 scikit-image photos, SYNTHETIC defects), ``mvtec`` (MVTec AD
layout), ``folder`` (one category: train/good, optional test/ and ground_truth/).
"""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dxmi_ad.checkpoint import atomic_directory, atomic_write_text, read_yaml_mapping
from dxmi_ad.cli.options import TrainOptions, check_one_rule
from dxmi_ad.data.tabular import RESERVED_ID_NAMES
from dxmi_ad.scoring import ScoringSettings

IMAGE_DATASETS = ("textures", "mvtec", "folder", "features")


class ImageCLIError(Exception):
    """User-facing error of an image command."""


def load_image_recipe(path: Path | None, sets: dict[str, Any]) -> dict[str, Any]:
    """Read an image recipe (``features:``, ``model:`` and optional ``scoring:`` / ``runtime:`` sections) and apply
    ``--set`` overrides.

    ``--set`` keys are ``model.<field>`` / ``features.<field>`` / ``scoring.<field>``, or a bare DxMIConfig field
    (taken as ``model.``).

    Every value is checked here, before any image is read (types, ranges, backbone name, image size): a bad
    ``--set features.image_size=-4`` fails at once with the field named.

    Raises:
        ImageCLIError: Missing/invalid file, sections that are not mappings, unknown keys, or invalid values.
    """
    from dxmi_ad import recipes
    from dxmi_ad.config import DxMIConfig
    from dxmi_ad.features.extractor import check_feature_settings
    from dxmi_ad.image import FeatureSettings

    try:
        path = recipes.resolve(path) if path is not None else recipes.path("textures")
        recipe = read_yaml_mapping(path)
    except (FileNotFoundError, ValueError) as err:
        raise ImageCLIError(str(err)) from err
    if set(recipe) - {"features", "model", "runtime", "scoring"}:
        msg = (f"image recipe {path} must be a mapping with 'features', 'model' (and optional 'scoring', 'runtime') "
               "sections; for a vector recipe (digits, tables, tables_low_dim, eight_gaussians) pass a vector dataset, e.g. "
               "--dataset digits")
        raise ImageCLIError(msg)
    for section in ("features", "model", "runtime", "scoring"):
        if not isinstance(recipe.get(section) or {}, dict):
            msg = f"image recipe {path}: section {section!r} must be a mapping of key: value"
            raise ImageCLIError(msg)
    model, features = dict(recipe.get("model") or {}), dict(recipe.get("features") or {})
    scoring = dict(recipe.get("scoring") or {})
    for key, value in sets.items():
        section, _, name = key.rpartition(".")
        {"features": features, "scoring": scoring}.get(section, model)[name] = value
    try:
        model = DxMIConfig.rename_old_keys(model, f"{path} / --set")
    except ValueError as err:
        raise ImageCLIError(str(err)) from None
    known_model = set(DxMIConfig().to_dict())
    known_feat = set(FeatureSettings.__dataclass_fields__)
    unknown = sorted({f"model.{k}" for k in set(model) - known_model} | {f"features.{k}" for k in set(features)
                                                                           - known_feat})
    if unknown:
        msg = f"unknown recipe key(s) {unknown} in {path} / --set"
        raise ImageCLIError(msg)
    try:
        check_feature_settings(features)
        ScoringSettings.from_dict(scoring)
        DxMIConfig.from_dict(model)  # dim is set from the backbone later; every other field is checked now
    except ValueError as err:
        section = next((k for k in ("features", "scoring") if str(err).startswith((f"{k}.", f"unknown {k}"))),
                       "model")
        msg = f"invalid {section} value in {path} / --set: {err}"
        raise ImageCLIError(msg) from None
    return {"model": model, "features": features, "scoring": scoring,
            "runtime": dict(recipe.get("runtime") or {}) or None}


def list_dataset(dataset: str, data_root: Path | None, category: str) -> tuple[list, str]:
    """Samples and a description for an image dataset name.

    Raises:
        ImageCLIError: Unknown name, missing root, bad layout.
    """
    from dxmi_ad.data.mvtec import list_folder, list_mvtec
    from dxmi_ad.data.textures import write_textures

    try:
        if dataset == "textures":
            root = write_textures(data_root)
            return list_mvtec(root, category), f"textures (real CC0 photos, SYNTHETIC defects) at {root}"
        if data_root is None:
            msg = f"--dataset {dataset} needs --data-root"
            raise ImageCLIError(msg)
        if dataset == "mvtec":
            return list_mvtec(data_root, category), f"MVTec AD layout at {data_root}"
        if dataset == "folder":
            return list_folder(data_root), f"folder {data_root}"
    except (FileNotFoundError, ValueError) as err:
        raise ImageCLIError(str(err)) from err
    msg = f"unknown image dataset {dataset!r}; expected one of {IMAGE_DATASETS}"
    raise ImageCLIError(msg)


def print_metrics(table: Any, console: Any, title: str) -> None:
    """Print a :func:`~dxmi_ad.evaluation.metrics_table` result as a rich table."""
    import pandas as pd
    from rich.table import Table

    from dxmi_ad.evaluation import METRIC_KEYS

    rich_table = Table(title=title)
    for col in ("category", "image AUROC", "pixel AUROC", "pixel AUPRO", "image F1max", "n test", "n anom."):
        rich_table.add_column(col, overflow="fold")
    for _, row in table.iterrows():
        rich_table.add_row(str(row["category"]),  # n/a: undefined (e.g. a one-class test set)
                           *["n/a" if pd.isna(row[k]) else f"{row[k]:.4f}" for k in METRIC_KEYS],
                           str(int(row["n_test"])), str(int(row["n_anomalous"])))
    console.print(rich_table)


def print_calibration(det: Any, console: Any) -> None:
    """The decision rule of an image model, and what its calibration set can and cannot support (in numbers)."""
    if det.calibration_ is not None:
        console.print(f"decisions: {det.calibration_.summary()}", highlight=False)
    else:
        console.print(f"[yellow]decisions: {NO_DECISION_RULE}[/]", highlight=False)


def _write_evaluation(out: Path, test: list, scored: dict, table: Any, det: Any, settings: dict,
                      extra: dict[str, Any], with_images: bool) -> dict[str, Any]:
    """metrics.json / metrics.csv and the report (plots + report.html) into ``out``.

    metrics.json is strict JSON: an undefined metric (one-class test set, no masks) is ``null``, never ``NaN``.
    ``decisions`` holds how the stored rule decides on the test set (realised FPR on the normal images, detection
    rate on the anomalous ones; each ``null`` without such images), or is ``null`` with ``decision_rule`` saying
    how to set a rule when the model has none.
    """
    from dxmi_ad.calibration import decision_summary
    from dxmi_ad.metrics import dumps_json, json_ready
    from dxmi_ad.report import write_report

    labels = np.array([s.label for s in test], int)
    metrics = {"per_category": table.to_dict(orient="records"), "mean": table.iloc[-1].to_dict(), **extra}
    if det.calibration_ is not None:
        metrics["decisions"] = decision_summary(det.calibration_, np.asarray(scored["pred_score"]), labels)
        metrics["decision_rule"] = det.calibration_.describe()
    else:
        metrics["decisions"] = None
        metrics["decision_rule"] = NO_DECISION_RULE
    metrics = json_ready(metrics)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "metrics.json", dumps_json(metrics, indent=2))
    atomic_write_text(out / "metrics.csv", table.to_csv(index=False))
    write_report(out, test, scored, table, det.calibration_, settings, with_images=with_images)
    return metrics


NO_DECISION_RULE = ("none: the model has no calibration, so no image is decided anomalous or normal; run "
                    "`dxmi-ad calibrate --model RUN_DIR --calibration-dir NORMAL_IMAGES`")


def run_settings(det: Any, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The settings shown in report.html: model config, features, scoring (and how pred_score is made), calibration
    rule, and ``extra``.
    """
    from dataclasses import asdict

    return {**(extra or {}), "features": asdict(det.features), "model": det.config.to_dict(),
            "scoring": det.scoring.to_dict(), "pred_score": det.scoring.describe(),
            "calibration": det.calibration_.describe() if det.calibration_ is not None else None}


def evaluate_and_write(det: Any, samples: list, out: Path, console: Any, progress: Any = None,
                       settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """Score the test samples; print the table; write metrics.json/csv, the plots and report.html into ``out``.

    A one-class test set is evaluated too: metrics that need both classes (AUROC, F1, pixel metrics without
    anomalous pixels) are ``null`` and said so, what is defined is written (the realised false-positive rate on an
    all-normal set, the detection rate on an all-anomalous one). Returns ``{}`` only without test images.
    """
    from dxmi_ad.evaluation import metrics_table

    test = [s for s in samples if s.split == "test"]
    if not test:
        console.print("[yellow]no test images (test/ folder missing or empty): evaluation skipped[/]")
        return {}
    n_anom = sum(s.label == 1 for s in test)
    if n_anom in (0, len(test)):
        missing = "anomalous" if n_anom == 0 else "normal"
        defined = ("the realised false-positive rate of the decision rule" if n_anom == 0
                   else "the detection rate (true-positive rate) of the decision rule")
        console.print(f"[yellow]the test set has no {missing} images: image AUROC and F1 are undefined (null in "
                      f"metrics.json); {defined} is reported[/]")
    t0 = time.perf_counter()
    scored = det.score_samples(test, on_batch=progress)
    seconds = time.perf_counter() - t0
    table = metrics_table(test, scored)
    if not len(table):
        console.print("[yellow]no readable test image: evaluation skipped[/]")
        return {}
    print_metrics(table, console, "DxMI anomaly detection (fractions in [0, 1]; higher is better; n/a = undefined)")
    bad = {str(test[i].path): r for i, r in scored["errors"].items()}
    if bad:
        console.print(f"[yellow]{len(bad)} unreadable test file(s) left out of the metrics[/]")
    extra = {"score_seconds": round(seconds, 3), "images_per_second": round(len(test) / max(seconds, 1e-9), 2),
             "unreadable_test_files": bad}
    from dxmi_ad.training.fit import selection_of

    selected = selection_of(det.history_)
    if selected is not None:  # chosen on the validation split (held-out training images), never on this test set
        extra["selected_iteration"], extra["validation_AUROC"] = selected
        extra["validation_metric"] = det.config.validation_metric  # image / pixel AUROC, or their mean
        what = "the energy of DxMI iteration" if det.config.select_energy_only else "DxMI iteration"
        console.print(f"model selection: kept {what} {selected[0]} (0 = the pre-trained autoencoder), "
                      f"validation AUROC {selected[1]:.4f} ({det.config.validation_metric})", highlight=False)
    metrics = _write_evaluation(out, test, scored, table, det, run_settings(det, settings), extra, True)
    _print_decisions(metrics, console)
    return metrics


def _print_decisions(metrics: dict[str, Any], console: Any) -> None:
    d = metrics.get("decisions")
    if d:
        c = d["counts"]
        fpr = "n/a (no normal images)" if d["realised_fpr"] is None else \
            f"{d['realised_fpr']:.4f} ({c['fp']} of {c['n_normal']})"
        tpr = "n/a (no anomalous images)" if d["tpr"] is None else f"{d['tpr']:.4f} ({c['tp']} of {c['n_anomalous']})"
        console.print(f"test-set decisions ({d['rule']} rule): false-positive rate {fpr}, true-positive rate {tpr}, "
                      f"false discovery proportion {d['false_discovery_proportion']:.4f}", highlight=False)
    elif "decision_rule" in metrics:
        console.print(f"[yellow]decision rule: {metrics['decision_rule']}[/]", highlight=False)


def _feature_samples(split: Any) -> list:
    """Pseudo samples (category, label, whether a mask is known) for the rows of a feature split."""
    from dxmi_ad.data.mvtec import ImageSample

    mask_path = Path("mask") if split.mask is not None else None
    return [ImageSample(Path(f"row{i}"), c, "test", "good" if lab == 0 else "anomaly", int(lab), mask_path)
            for i, (c, lab) in enumerate(zip(split.clsname, split.label))]


def train_features(opts: TrainOptions, recipe: dict[str, Any], config: Any, console: Any, progress: Any) -> Path:
    """Train from a feature dataset (``--dataset features``) and evaluate on its test split when present."""
    from dxmi_ad.data.features import read_feature_dir
    from dxmi_ad.evaluation import metrics_table
    from dxmi_ad.image import FeatureSettings, ImageDetector

    if opts.data_root is None:
        msg = "--dataset features needs --data-root (a folder written by `dxmi-ad extract-features`)"
        raise ImageCLIError(msg)
    if opts.calibration_dir or opts.validation_dir:
        msg = ("--calibration-dir / --validation-dir take image folders; feature files calibrate on "
               "--calibration-fraction of their training maps")
        raise ImageCLIError(msg)
    check_one_rule(opts.fpr, opts.fdr)
    train, test, meta = read_feature_dir(opts.data_root, opts.trust_pickle)
    feats = dict(meta.get("features") or {"backbone": "efficientnet_b4", "image_size": 224})
    feats["out_indices"] = tuple(feats.get("out_indices", (0, 1, 2, 3)))
    console.print(f"[bold]dxmi-ad train[/] features at {opts.data_root}: {tuple(train.features.shape)} train"
                  + (f", {tuple(test.features.shape)} test" if test is not None else ""))
    det = ImageDetector(config, FeatureSettings(**feats), make_runtime(recipe),
                        scoring=ScoringSettings.from_dict(recipe.get("scoring")))
    normal = train.label == 0
    t0 = time.perf_counter()
    det.fit_features(train.features[torch.from_numpy(normal)].permute(0, 2, 3, 1).contiguous().numpy(),
                     sorted(set(train.clsname)), progress, calibration_fraction=opts.calibration_fraction,
                     fpr=opts.fpr, fdr=opts.fdr)
    from dxmi_ad.training.runtime import is_global_zero

    if not is_global_zero():
        return opts.out
    print_calibration(det, console)
    seconds = time.perf_counter() - t0
    out: Path = opts.out
    with atomic_directory(out) as tmp:
        det.save(tmp, extra={"train_seconds": round(seconds, 2), "dataset": "features",
                             "data_root": str(opts.data_root)})
        if hasattr(progress, "write_logs"):
            progress.write_logs(tmp)
        if test is not None and 0 < test.label.sum() < len(test.label):
            size = tuple(test.mask.shape[-2:]) if test.mask is not None else (feats["image_size"],) * 2
            scored = det.score_feature_maps(test.features, size)
            samples = _feature_samples(test)
            mask = test.mask if test.mask is not None else np.zeros((len(samples), *size), bool)
            scored = {**scored, "gt_mask": mask}
            table = metrics_table(samples, scored)
            print_metrics(table, console, "DxMI on feature files (fractions in [0, 1]; higher is better)")
            metrics = _write_evaluation(tmp, samples, scored, table, det,
                                        run_settings(det, {"dataset": "features",
                                                           "data_root": str(opts.data_root)}),
                                        {}, with_images=False)
            _print_decisions(metrics, console)
        else:
            console.print("[yellow]no labelled test split: evaluation skipped[/]")
        keep_checkpoints(det.runtime, tmp)
    console.print(f"trained in {seconds:.1f} s; run directory: {out}")
    return out


def feature_settings(opts: TrainOptions, recipe: dict[str, Any]) -> dict[str, Any]:
    """The recipe's ``features`` section with the command-line backbone options applied."""
    feats = {**recipe["features"], "pretrained": opts.pretrained}
    if opts.weights:
        feats["weights"] = str(opts.weights)
    if opts.backbone:
        feats["backbone"] = opts.backbone
    feats["out_indices"] = tuple(feats.get("out_indices", (0, 1, 2, 3)))
    return feats


def extract_features(opts: TrainOptions, recipe: dict[str, Any], console: Any, progress: Any) -> Path:
    """``dxmi-ad extract-features``: per-image feature maps of an image dataset, with labels, masks, categories."""
    from dataclasses import asdict

    from dxmi_ad.data.features import FeatureSplit, write_feature_split
    from dxmi_ad.image import FeatureSettings, iter_batches

    settings = FeatureSettings(**feature_settings(opts, recipe))
    extractor = settings.build()
    samples, description = list_dataset(opts.dataset, opts.data_root, opts.category)
    console.print(f"[bold]dxmi-ad extract-features[/] {description}")
    out: Path = opts.out
    with atomic_directory(out) as tmp:
        for split_name in ("train", "test"):
            subset = [s for s in samples if s.split == split_name]
            if not subset:
                continue
            maps, labels, masks, names, bad = [], [], [], [], {}
            for idx, images, m, errs in iter_batches(subset, settings.image_size, 32):
                bad.update({str(subset[i].path): r for i, r in errs.items()})
                if idx:
                    maps.append(extractor(images))
                    masks.append(m.numpy())
                    labels += [subset[i].label for i in idx]
                    names += [subset[i].category for i in idx]
                if progress is not None:
                    progress(f"features {split_name}", len(labels) + len(bad), len(subset), {})
            if bad and not opts.skip_bad_files:
                from dxmi_ad.image import BadFilesError

                raise BadFilesError({Path(p): r for p, r in bad.items()}, f"{split_name} set")
            split = FeatureSplit(torch.cat(maps), np.asarray(labels), np.concatenate(masks), names)
            write_feature_split(tmp, split_name, split, {"features": asdict(settings)})
    console.print(f"wrote feature files to {out}")
    return out


def make_runtime(recipe: dict[str, Any]) -> Any:
    """The :class:`~dxmi_ad.training.runtime.Runtime` of a resolved recipe's ``runtime`` section, or None."""
    from dxmi_ad.training.runtime import Runtime

    rt = recipe.get("runtime")
    if not rt:
        return None
    return Runtime(**{**rt, "checkpoint_dir": Path(rt["checkpoint_dir"]) if rt.get("checkpoint_dir") else None})


def keep_checkpoints(runtime: Any, run_tmp: Path) -> None:
    """Move a finished run's checkpoints (``OUT.checkpoints``) into its run directory as ``checkpoints/``."""
    import shutil

    if runtime is not None and runtime.checkpoint_dir is not None and Path(runtime.checkpoint_dir).is_dir():
        shutil.move(str(runtime.checkpoint_dir), run_tmp / "checkpoints")


def calibration_inputs(opts: TrainOptions) -> tuple[Any, list | None]:
    """``(calibration, validation)`` for :meth:`ImageDetector.fit` from ``--calibration-dir`` /
    ``--calibration-fraction`` / ``--validation-dir``.

    Raises:
        ImageCLIError: Conflicting rules, or a missing/empty folder.
    """
    from dxmi_ad.data.mvtec import list_labelled_dir, list_normal_dir

    check_one_rule(opts.fpr, opts.fdr)
    if opts.fdr is not None and opts.validation_dir is not None:
        msg = "choose one decision rule: --fdr or an F1-optimal threshold from --validation-dir"
        raise ImageCLIError(msg)
    try:
        calibration = (list_normal_dir(opts.calibration_dir) if opts.calibration_dir
                       else opts.calibration_fraction)
        validation = list_labelled_dir(opts.validation_dir) if opts.validation_dir else None
    except (FileNotFoundError, ValueError) as err:
        raise ImageCLIError(str(err)) from err
    return calibration, validation


def train_images(opts: TrainOptions, recipe: dict[str, Any], console: Any, progress: Any) -> Path:
    """Train an image detector; write the run directory atomically; evaluate when test data exist."""
    from dxmi_ad.config import DxMIConfig
    from dxmi_ad.image import FeatureSettings, ImageDetector
    from dxmi_ad.training.runtime import is_global_zero

    feats = feature_settings(opts, recipe)
    config = DxMIConfig.from_dict({**recipe["model"], "seed": opts.seed})
    runtime = make_runtime(recipe)
    if opts.dataset == "features":
        return train_features(opts, recipe, config, console, progress)
    samples, description = list_dataset(opts.dataset, opts.data_root, opts.category)
    console.print(f"[bold]dxmi-ad train[/] {description}: {sum(s.split == 'train' for s in samples)} training, "
                  f"{sum(s.split == 'test' for s in samples)} test images")
    out: Path = opts.out
    calibration, validation = calibration_inputs(opts)
    if validation is not None:  # thresholds tuned on test or training images would be optimistic
        from dxmi_ad.image import refuse_overlap

        refuse_overlap(validation, samples, "validation", "training or test")
    det = ImageDetector(config, FeatureSettings(**feats), runtime,
                        scoring=ScoringSettings.from_dict(recipe.get("scoring")))
    t0 = time.perf_counter()
    det.fit(samples, skip_bad_files=opts.skip_bad_files, progress=progress, calibration=calibration,
            fpr=opts.fpr, fdr=opts.fdr)
    if not is_global_zero():  # data-parallel run: rank 0 writes the results
        return out
    if validation is not None:
        det.calibrate(fpr=opts.fpr, validation=validation, skip_bad_files=opts.skip_bad_files)
    seconds = time.perf_counter() - t0
    if det.selection_split_ is not None:
        console.print(f"model selection: {det.selection_split_}", highlight=False)
    print_calibration(det, console)
    info = {"train_seconds": round(seconds, 2), "dataset": opts.dataset,
            "data_root": str(opts.data_root) if opts.data_root else None, "category": opts.category}
    with atomic_directory(out) as tmp:
        det.save(tmp, extra=info)
        if hasattr(progress, "write_logs"):
            progress.write_logs(tmp)
        evaluate_and_write(det, samples, tmp, console, settings=info,
                           progress=progress.batches("scoring") if hasattr(progress, "batches") else None)
        keep_checkpoints(runtime, tmp)  # last: a failure above leaves them in place for --resume
    console.print(f"trained in {seconds:.1f} s; run directory: {out}")
    return out


NO_RULE = "no decision rule: pred_label left empty; set one with `dxmi-ad calibrate --model {model} --calibration-dir NORMAL_IMAGES`"


#: ``--out`` suffixes ``score`` refuses: it writes CSV text, which a file of these formats would not hold.
NOT_CSV_SUFFIXES = frozenset({".xlsx", ".xlsm", ".xls", ".ods", ".parquet", ".feather", ".json", ".npy", ".npz",
                              ".pkl", ".pickle", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".html", ".pdf",
                              ".safetensors", ".pt", ".pth", ".onnx", ".yaml", ".yml"})


#: Files of a run directory that ``score --out`` must not replace (besides everything under ``logs/``).
RUN_FILES = frozenset({"model.safetensors", "config.json", "calibration.json", "metrics.json", "metrics.csv",
                       "report.html", "model.onnx", "model.pt"})


def check_score_outputs(out_csv: Path | None, heatmaps: Path | None, inputs: Sequence[Path] = (),
                        model: Path | None = None) -> None:
    """Refuse output paths that cannot be written, before any image is read or scored.

    Raises:
        ImageCLIError: ``--out`` is one of the ``inputs``, one of the ``model`` run directory's files
            (:data:`RUN_FILES`, ``logs/``), a
            folder, ``-`` or an existing non-regular file (``/dev/stdout``: the CSV is
            written atomically, through a temporary file; omit ``--out`` to print it), lies under a file, or has a
            suffix of :data:`NOT_CSV_SUFFIXES` (e.g. ``.xlsx``: the content would be CSV text); ``--heatmaps`` is a
            file or lies under one.
    """
    def under_file(path: Path) -> Path | None:
        return next((q for q in path.absolute().parents if q.exists() and not q.is_dir()), None)

    if out_csv is not None:
        if out_csv.is_dir():
            msg = f"--out {out_csv} is a folder; give a CSV file name (e.g. {out_csv / 'scores.csv'})"
            raise ImageCLIError(msg)
        if str(out_csv) == "-" or (out_csv.exists() and not out_csv.is_file()):
            msg = (f"--out {out_csv} is not a regular file (the CSV is written to a temporary file, then renamed); "
                   "omit --out to print the CSV to the terminal, or redirect that output")
            raise ImageCLIError(msg)
        if out_csv.suffix.lower() in NOT_CSV_SUFFIXES:
            msg = (f"--out {out_csv}: score writes comma-separated text; name the file .csv (spreadsheets such as "
                   f"Excel open it), not {out_csv.suffix}")
            raise ImageCLIError(msg)
        target = out_csv.resolve()
        if any(p.is_file() and p.resolve() == target for p in inputs):
            msg = f"--out {out_csv} is one of the files to score; writing the scores would replace it: give another name"
            raise ImageCLIError(msg)
        run = model.resolve() if model is not None else None
        if run is not None and out_csv.exists() and (
                target.parent == run and target.name in RUN_FILES or run / "logs" in target.parents):
            msg = f"--out {out_csv} would replace a file of the model {model}; give another name"
            raise ImageCLIError(msg)
        if (blocker := under_file(out_csv)) is not None:
            msg = f"--out {out_csv} cannot be written: {blocker} is a file, not a folder"
            raise ImageCLIError(msg)
    if heatmaps is not None:
        if heatmaps.exists() and not heatmaps.is_dir():
            msg = f"--heatmaps {heatmaps} is an existing file; give a folder for the heat-map PNGs"
            raise ImageCLIError(msg)
        if (blocker := under_file(heatmaps)) is not None:
            msg = f"--heatmaps {heatmaps} cannot be created: {blocker} is a file, not a folder"
            raise ImageCLIError(msg)


def _reporting(batches: Any, on_batch: Any, total: int) -> Any:
    """Yield ``iter_batches`` items; after each one is processed call ``on_batch(files done, total)`` (if given)."""
    done = 0
    for item in batches:
        yield item
        done += len(item[0]) + len(item[3])  # scored + unreadable files of the batch
        if on_batch is not None:
            on_batch(done, total)


def score_paths(det: Any, paths: list[Path], out_csv: Path | None, heatmaps: Path | None,
                batch_size: int = 32, model: Path | str = "RUN_DIR", on_batch: Any = None) -> dict[str, Any]:
    """Score files and folders (recursive, :func:`~dxmi_ad.data.images.find_images`); write the CSV.

    Columns: ``path, pred_score, threshold, pred_label, p_value, normalized_score, error``. ``pred_score`` is the raw
    anomaly score (energy); ``p_value`` the split-conformal p-value against the calibration images; under an
    ``fdr`` rule ``pred_label`` is the Benjamini-Hochberg decision over all files of this call. A row gets an
    ``error`` (and empty score and decision columns) when its file is unreadable or its pixels or score are not
    finite: a non-finite score is never a decision. Without a decision rule (no calibration) ``threshold``,
    ``pred_label``, ``p_value`` and ``normalized_score`` are empty.

    Args:
        det: The image detector.
        paths: Files and folders.
        out_csv: CSV destination (written atomically), or None.
        heatmaps: Folder for heat-map PNGs, or None.
        batch_size: Images per forward pass.
        model: The run directory (named in the "no decision rule" hint).
        on_batch: Progress callback ``on_batch(files done, total)`` after each batch, or None.

    Returns:
        ``text`` (the CSV), ``n_files``, ``n_errors``, ``n_flagged`` (None without a rule), ``n_normal`` (None
        without a rule), ``rule`` (one line: :meth:`Calibration.describe`, or the "no decision rule" hint),
        ``listing`` (the :class:`~dxmi_ad.data.images.ImageListing`).

    Raises:
        ImageCLIError: Nothing scorable in ``paths`` (the message says what was skipped); unwritable outputs.
    """
    from dxmi_ad.data.images import find_images
    from dxmi_ad.data.mvtec import ImageSample
    from dxmi_ad.image import iter_batches

    check_score_outputs(out_csv, heatmaps)
    try:
        listing = find_images(paths, require=True)
    except ValueError as err:
        raise ImageCLIError(str(err)) from err
    files = listing.files
    samples = [ImageSample(f, "input", "test", "unknown", 0, None) for f in files]
    cal = det.calibration_
    scores = np.full(len(files), np.nan)
    errors: dict[int, str] = {}
    if heatmaps is not None:
        heatmaps.mkdir(parents=True, exist_ok=True)
    for idx, images, _, errs in _reporting(iter_batches(samples, det.features.image_size, batch_size), on_batch,
                                           len(files)):
        errors.update(errs)
        if not idx:
            continue
        kept, pred_score, amap, bad = det.score_checked(images)
        errors.update({idx[j]: r for j, r in bad.items()})  # non-finite pixels or score: an error row
        for k, j in enumerate(kept):
            i = idx[j]
            scores[i] = float(pred_score[k])
            if heatmaps is not None:
                s = float(scores[i])
                title = f"score {s:.3g}"
                if cal is not None:
                    title += f", p={float(cal.p_values(np.array([s]))[0]):.3g}"
                    if cal.rule != "fdr":
                        title += " (anomalous)" if s > cal.threshold else " (normal)"
                else:
                    title += " (no decision rule)"
                _write_heatmap(images[j], amap[k].numpy(), title, heatmaps / f"{i:06d}_{files[i].stem}.png")
    result = decision_csv([[str(f)] for f in files], ["path"], scores, errors, cal, out_csv,
                          NO_RULE.format(model=model))
    return {**result, "n_files": len(files), "listing": listing}


DECISION_COLUMNS = RESERVED_ID_NAMES[2:]
"""The columns of :func:`decision_csv` after the identifier columns (``pred_score`` ... ``error``)."""


def decision_csv(ids: list[list[str]], id_columns: list[str], scores: np.ndarray, errors: dict[int, str],
                 cal: Any, out_csv: Path | None, no_rule: str) -> dict[str, Any]:
    """The scoring CSV of ``dxmi-ad score`` (images and table rows alike), written atomically when ``out_csv`` is set.

    Columns: ``id_columns`` (e.g. ``path``, or ``path, row``), then ``pred_score, threshold, pred_label, p_value,
    normalized_score, error``. Items with an entry in ``errors`` or a non-finite score get the error and empty score
    and decision columns (a non-finite score is never a decision); the others are decided by ``cal`` (under an
    ``fdr`` rule, Benjamini-Hochberg over the scored items of this call), or left undecided without a rule.

    Args:
        ids: One list of identifier strings per item, ``len(id_columns)`` each.
        id_columns: Names of the identifier columns.
        scores: ``(n,)`` anomaly scores (energy; NaN = not scored).
        errors: ``{item index: reason}``.
        cal: The :class:`~dxmi_ad.calibration.Calibration`, or None.
        out_csv: Destination, or None.
        no_rule: The ``rule`` text when ``cal`` is None (how to set one).

    Returns:
        ``text`` (the CSV), ``n_errors``, ``n_flagged`` and ``n_normal`` (None without a rule), ``rule`` (one line).
    """
    n = len(ids)
    ok = np.isfinite(scores)
    ok[list(errors)] = False
    if cal is not None:
        finite = scores[ok]
        flags = np.zeros(n, bool)
        flags[ok] = cal.decide(finite)  # under fdr: Benjamini-Hochberg over the scored items of this call only
        p_values, norm = np.full(n, np.nan), np.full(n, np.nan)
        p_values[ok], norm[ok] = cal.p_values(finite), cal.normalized(finite)
        thr = cal.decision_threshold  # None under the fdr rule: decisions are Benjamini-Hochberg over this call
    else:
        flags, p_values, norm, thr = None, np.full(n, np.nan), np.full(n, np.nan), None
    thr_text = "" if thr is None else f"{thr:.6g}"
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow([*id_columns, *DECISION_COLUMNS])
    for i, key in enumerate(ids):
        if not ok[i]:
            writer.writerow([*key, "", thr_text, "", "", "", errors.get(i, "no score")])
        else:
            writer.writerow([*key, f"{scores[i]:.6g}", thr_text, "" if flags is None else int(flags[i]),
                             "" if np.isnan(p_values[i]) else f"{p_values[i]:.6g}",
                             "" if np.isnan(norm[i]) else f"{norm[i]:.4f}", ""])
    text = buf.getvalue()
    if out_csv is not None:
        atomic_write_text(out_csv, text)
    return {"text": text, "n_errors": int((~ok).sum()),
            "n_flagged": None if flags is None else int(flags[ok].sum()),
            "n_normal": None if flags is None else int((~flags[ok]).sum()),
            "rule": cal.describe() if cal is not None else no_rule}


def score_summary(result: dict[str, Any], unit: str = "file") -> str:
    """One line closing ``dxmi-ad score``: items (``unit``: file or row), flagged, normal, errors, under which rule."""
    n, bad = result.get("n_rows", result.get("n_files")), result["n_errors"]
    errs = f"{bad} error(s) (see the error column)" if bad else "0 errors"
    if result["n_flagged"] is None:
        return f"scored {n - bad} of {n} {unit}(s), {errs}; {result['rule']}"
    return (f"scored {n - bad} of {n} {unit}(s): {result['n_flagged']} flagged anomalous, {result['n_normal']} "
            f"normal, {errs}; rule: {result['rule']}")


def _write_heatmap(image: Any, amap: np.ndarray, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(3, 3), dpi=100)
    ax.imshow(image.permute(1, 2, 0).numpy())
    ax.imshow(amap, cmap="jet", alpha=0.45)
    ax.set_title(title, fontsize=8)
    ax.axis("off")
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)
