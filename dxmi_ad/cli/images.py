"""Image commands of the CLI: training on image datasets, ``evaluate``, ``score``, ``extract-features``.

Datasets: ``textures`` (embedded default: real CC0 scikit-image photos, SYNTHETIC defects), ``mvtec`` (MVTec AD
layout), ``folder`` (one category: train/good, optional test/ and ground_truth/).
"""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dxmi_ad.checkpoint import atomic_directory, atomic_write_text, read_yaml_mapping

IMAGE_DATASETS = ("textures", "mvtec", "folder", "features")


class ImageCLIError(Exception):
    """User-facing error of an image command."""


def load_image_recipe(path: Path | None, sets: dict[str, Any]) -> dict[str, Any]:
    """Read an image recipe (``features:`` and ``model:`` sections) and apply ``--set`` overrides.

    ``--set`` keys are ``model.<field>`` / ``features.<field>``, or a bare DxMIConfig field (taken as ``model.``).

    Raises:
        ImageCLIError: Missing/invalid file or unknown keys.
    """
    from dxmi_ad.config import DxMIConfig
    from dxmi_ad.image import FeatureSettings

    from dxmi_ad import recipes

    try:
        path = recipes.resolve(path) if path is not None else recipes.path("textures")
        recipe = read_yaml_mapping(path)
    except (FileNotFoundError, ValueError) as err:
        raise ImageCLIError(str(err)) from err
    if set(recipe) - {"features", "model", "runtime"}:
        msg = f"image recipe {path} must be a mapping with 'features', 'model' (and optional 'runtime') sections"
        raise ImageCLIError(msg)
    model, features = dict(recipe.get("model") or {}), dict(recipe.get("features") or {})
    for key, value in sets.items():
        section, _, name = key.rpartition(".")
        (features if section == "features" else model)[name] = value
    known_model = set(DxMIConfig().to_dict())
    known_feat = set(FeatureSettings.__dataclass_fields__)
    unknown = sorted({f"model.{k}" for k in set(model) - known_model} | {f"features.{k}" for k in set(features)
                                                                           - known_feat})
    if unknown:
        msg = f"unknown recipe key(s) {unknown} in {path} / --set"
        raise ImageCLIError(msg)
    return {"model": model, "features": features, "runtime": dict(recipe.get("runtime") or {}) or None}


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
    from rich.table import Table

    from dxmi_ad.evaluation import METRIC_KEYS

    rich_table = Table(title=title)
    for col in ("category", "image AUROC", "pixel AUROC", "pixel AUPRO", "image F1max", "n test", "n anom."):
        rich_table.add_column(col, overflow="fold")
    for _, row in table.iterrows():
        rich_table.add_row(str(row["category"]), *[f"{row[k]:.4f}" for k in METRIC_KEYS],
                           str(int(row["n_test"])), str(int(row["n_anomalous"])))
    console.print(rich_table)


def print_calibration(det: Any, console: Any) -> None:
    """One line on the decision rule of an image model."""
    if det.calibration is not None:
        console.print(f"decisions: {det.calibration.describe()}", highlight=False)


def _write_evaluation(out: Path, test: list, scored: dict, table: Any, det: Any, settings: dict,
                      extra: dict[str, Any], with_images: bool) -> dict[str, Any]:
    """metrics.json / metrics.csv and the report (plots + report.html) into ``out``."""
    from dxmi_ad.calibration import decision_summary
    from dxmi_ad.report import write_report

    labels = np.array([s.label for s in test], int)
    metrics = {"per_category": table.to_dict(orient="records"), "mean": table.iloc[-1].to_dict(), **extra}
    if det.calibration is not None:
        metrics["decisions"] = decision_summary(det.calibration, np.asarray(scored["pred_score"]), labels)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2, default=float))
    atomic_write_text(out / "metrics.csv", table.to_csv(index=False))
    write_report(out, test, scored, table, det.calibration, settings, with_images=with_images)
    return metrics


def run_settings(det: Any, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The settings shown in report.html: model config, features, calibration rule, and ``extra``."""
    from dataclasses import asdict

    return {**(extra or {}), "features": asdict(det.features), "model": det.config.to_dict(),
            "calibration": det.calibration.describe() if det.calibration is not None else None}


def evaluate_and_write(det: Any, samples: list, out: Path, console: Any, progress: Any = None,
                       settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """Score the test samples; print the table; write metrics.json/csv, the plots and report.html into ``out``."""
    from dxmi_ad.evaluation import metrics_table

    test = [s for s in samples if s.split == "test"]
    if not test:
        console.print("[yellow]no test images (test/ folder missing or empty): evaluation skipped[/]")
        return {}
    if not any(s.label == 1 for s in test):
        console.print("[yellow]test set has no anomalous images: AUROC is undefined, evaluation skipped[/]")
        return {}
    t0 = time.perf_counter()
    scored = det.score_samples(test, on_batch=progress)
    seconds = time.perf_counter() - t0
    table = metrics_table(test, scored)
    print_metrics(table, console, "DxMI anomaly detection (fractions in [0, 1]; higher is better)")
    bad = {str(test[i].path): r for i, r in scored["errors"].items()}
    if bad:
        console.print(f"[yellow]{len(bad)} unreadable test file(s) left out of the metrics[/]")
    extra = {"score_seconds": round(seconds, 3), "images_per_second": round(len(test) / max(seconds, 1e-9), 2),
             "unreadable_test_files": bad}
    metrics = _write_evaluation(out, test, scored, table, det, run_settings(det, settings), extra, True)
    _print_decisions(metrics, console)
    return metrics


def _print_decisions(metrics: dict[str, Any], console: Any) -> None:
    d = metrics.get("decisions")
    if d:
        fpr = "n/a" if d["realised_fpr"] is None else f"{d['realised_fpr']:.4f}"
        tpr = "n/a" if d["tpr"] is None else f"{d['tpr']:.4f}"
        console.print(f"test-set decisions ({d['rule']} rule): false-positive rate {fpr}, true-positive rate {tpr}, "
                      f"false discovery proportion {d['false_discovery_proportion']:.4f}", highlight=False)


def _feature_samples(split: Any) -> list:
    """Pseudo samples (category, label, whether a mask is known) for the rows of a feature split."""
    from dxmi_ad.data.mvtec import ImageSample

    mask_path = Path("mask") if split.mask is not None else None
    return [ImageSample(Path(f"row{i}"), c, "test", "good" if lab == 0 else "anomaly", int(lab), mask_path)
            for i, (c, lab) in enumerate(zip(split.clsname, split.label))]


def train_features(params: dict[str, Any], config: Any, console: Any, progress: Any) -> Path:
    """Train from a feature dataset (``--dataset features``) and evaluate on its test split when present."""
    from dxmi_ad.data.features import read_feature_dir
    from dxmi_ad.evaluation import metrics_table
    from dxmi_ad.image import FeatureSettings, ImageDetector

    if params["data_root"] is None:
        msg = "--dataset features needs --data-root (a folder written by `dxmi-ad extract-features`)"
        raise ImageCLIError(msg)
    if params.get("calibration_dir") or params.get("validation_dir"):
        msg = ("--calibration-dir / --validation-dir take image folders; feature files calibrate on "
               "--calibration-fraction of their training maps")
        raise ImageCLIError(msg)
    if params.get("fpr") is not None and params.get("fdr") is not None:
        msg = "choose one decision rule: --fpr or --fdr"
        raise ImageCLIError(msg)
    train, test, meta = read_feature_dir(params["data_root"], params.get("trust_pickle", False))
    feats = dict(meta.get("features") or {"backbone": "efficientnet_b4", "image_size": 224})
    feats["out_indices"] = tuple(feats.get("out_indices", (0, 1, 2, 3)))
    console.print(f"[bold]dxmi-ad train[/] features at {params['data_root']}: {tuple(train.features.shape)} train"
                  + (f", {tuple(test.features.shape)} test" if test is not None else ""))
    det = ImageDetector(config, FeatureSettings(**feats), make_runtime(params["recipe"]))
    normal = train.label == 0
    t0 = time.perf_counter()
    det.fit_features(train.features[torch.from_numpy(normal)].permute(0, 2, 3, 1).contiguous().numpy(),
                     sorted(set(train.clsname)), progress, calibration_fraction=params["calibration_fraction"],
                     fpr=params.get("fpr"), fdr=params.get("fdr"))
    from dxmi_ad.training.runtime import is_global_zero

    if not is_global_zero():
        return params["out"]
    print_calibration(det, console)
    seconds = time.perf_counter() - t0
    out: Path = params["out"]
    with atomic_directory(out) as tmp:
        det.save(tmp, extra={"train_seconds": round(seconds, 2), "dataset": "features",
                             "data_root": str(params["data_root"])})
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
                                                           "data_root": str(params["data_root"])}),
                                        {}, with_images=False)
            _print_decisions(metrics, console)
        else:
            console.print("[yellow]no labelled test split: evaluation skipped[/]")
        keep_checkpoints(det.runtime, tmp)
    console.print(f"trained in {seconds:.1f} s; run directory: {out}")
    return out


def feature_settings(params: dict[str, Any]) -> dict[str, Any]:
    """The recipe's ``features`` section with the command-line backbone options applied."""
    feats = {**params["recipe"]["features"], "pretrained": params["pretrained"]}
    if params.get("weights"):
        feats["weights"] = str(params["weights"])
    if params.get("backbone"):
        feats["backbone"] = params["backbone"]
    feats["out_indices"] = tuple(feats.get("out_indices", (0, 1, 2, 3)))
    return feats


def extract_features(params: dict[str, Any], console: Any, progress: Any) -> Path:
    """``dxmi-ad extract-features``: per-image feature maps of an image dataset, with labels, masks, categories."""
    from dataclasses import asdict

    from dxmi_ad.data.features import FeatureSplit, write_feature_split
    from dxmi_ad.image import FeatureSettings, iter_batches

    settings = FeatureSettings(**feature_settings(params))
    extractor = settings.build()
    samples, description = list_dataset(params["dataset"], params["data_root"], params["category"])
    console.print(f"[bold]dxmi-ad extract-features[/] {description}")
    out: Path = params["out"]
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
            if bad and not params["skip_bad_files"]:
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


def calibration_inputs(params: dict[str, Any]) -> tuple[Any, list | None]:
    """``(calibration, validation)`` for :meth:`ImageDetector.fit` from ``--calibration-dir`` /
    ``--calibration-fraction`` / ``--validation-dir``.

    Raises:
        ImageCLIError: Conflicting rules, or a missing/empty folder.
    """
    from dxmi_ad.data.mvtec import list_labelled_dir, list_normal_dir

    if params.get("fpr") is not None and params.get("fdr") is not None:
        msg = "choose one decision rule: --fpr or --fdr"
        raise ImageCLIError(msg)
    if params.get("fdr") is not None and params.get("validation_dir") is not None:
        msg = "choose one decision rule: --fdr or an F1-optimal threshold from --validation-dir"
        raise ImageCLIError(msg)
    try:
        calibration = (list_normal_dir(params["calibration_dir"]) if params.get("calibration_dir")
                       else params["calibration_fraction"])
        validation = list_labelled_dir(params["validation_dir"]) if params.get("validation_dir") else None
    except (FileNotFoundError, ValueError) as err:
        raise ImageCLIError(str(err)) from err
    return calibration, validation


def train_images(params: dict[str, Any], console: Any, progress: Any) -> Path:
    """Train an image detector; write the run directory atomically; evaluate when test data exist."""
    from dxmi_ad.config import DxMIConfig
    from dxmi_ad.image import FeatureSettings, ImageDetector

    from dxmi_ad.training.runtime import is_global_zero

    recipe = params["recipe"]
    feats = feature_settings(params)
    config = DxMIConfig.from_dict({**recipe["model"], "seed": params["seed"]})
    runtime = make_runtime(recipe)
    if params["dataset"] == "features":
        return train_features(params, config, console, progress)
    samples, description = list_dataset(params["dataset"], params["data_root"], params["category"])
    console.print(f"[bold]dxmi-ad train[/] {description}: {sum(s.split == 'train' for s in samples)} training, "
                  f"{sum(s.split == 'test' for s in samples)} test images")
    out: Path = params["out"]
    calibration, validation = calibration_inputs(params)
    if validation is not None:  # thresholds tuned on test or training images would be optimistic
        from dxmi_ad.image import refuse_overlap

        refuse_overlap(validation, samples, "validation", "training or test")
    det = ImageDetector(config, FeatureSettings(**feats), runtime)
    t0 = time.perf_counter()
    det.fit(samples, skip_bad_files=params["skip_bad_files"], progress=progress, calibration=calibration,
            fpr=params.get("fpr"), fdr=params.get("fdr"))
    if not is_global_zero():  # data-parallel run: rank 0 writes the results
        return out
    if validation is not None:
        det.calibrate(fpr=params.get("fpr"), validation=validation, skip_bad_files=params["skip_bad_files"])
    seconds = time.perf_counter() - t0
    print_calibration(det, console)
    info = {"train_seconds": round(seconds, 2), "dataset": params["dataset"],
            "data_root": str(params["data_root"]) if params["data_root"] else None, "category": params["category"]}
    with atomic_directory(out) as tmp:
        det.save(tmp, extra=info)
        if hasattr(progress, "write_logs"):
            progress.write_logs(tmp)
        evaluate_and_write(det, samples, tmp, console, settings=info)
        keep_checkpoints(runtime, tmp)  # last: a failure above leaves them in place for --resume
    console.print(f"trained in {seconds:.1f} s; run directory: {out}")
    return out


def score_paths(det: Any, paths: list[Path], out_csv: Path | None, heatmaps: Path | None,
                batch_size: int = 32) -> tuple[str, int]:
    """Score files and folders (recursive); returns the CSV text and the number of unreadable files.

    Columns: ``path, score, threshold, is_anomaly, p_value, normalized_score, error``. ``score`` is the raw
    ``pred_score`` (energy); ``p_value`` the split-conformal p-value against the calibration images; under an
    ``fdr`` rule ``is_anomaly`` is the Benjamini-Hochberg decision over all files of this call.
    """
    from dxmi_ad.data.images import IMAGE_SUFFIXES
    from dxmi_ad.data.mvtec import ImageSample
    from dxmi_ad.image import iter_batches

    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        else:
            files.append(p)
    samples = [ImageSample(f, "input", "test", "unknown", 0, None) for f in files]
    cal = det.calibration
    scores = np.full(len(files), np.nan)
    errors: dict[int, str] = {}
    if heatmaps is not None:
        heatmaps.mkdir(parents=True, exist_ok=True)
    for idx, images, _, errs in iter_batches(samples, det.features.image_size, batch_size):
        errors.update(errs)
        if not idx:
            continue
        out = det.predict(images)
        scores[idx] = out["pred_score"].double().numpy()
        if heatmaps is not None:
            for j, i in enumerate(idx):
                s = float(scores[i])
                title = f"score {s:.3g}"
                if cal is not None:
                    title += f", p={float(cal.p_values(np.array([s]))[0]):.3g}"
                    if cal.rule != "fdr":
                        title += " (anomalous)" if s > cal.threshold else " (normal)"
                _write_heatmap(images[j], out["anomaly_map"][j].numpy(), title,
                               heatmaps / f"{i:06d}_{files[i].stem}.png")
    if cal is not None:
        flags, p_values, norm = cal.decide(scores), cal.p_values(scores), cal.normalized(scores)
        thr = cal.decision_threshold  # None under the fdr rule: decisions are Benjamini-Hochberg over this call
    else:
        flags, p_values, norm, thr = np.zeros(len(files), bool), scores * np.nan, scores * np.nan, None
    thr_text = "" if thr is None else f"{thr:.6g}"
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["path", "score", "threshold", "is_anomaly", "p_value", "normalized_score", "error"])
    for i, f in enumerate(files):
        if i in errors:
            writer.writerow([str(f), "", thr_text, "", "", "", errors[i]])
        else:
            writer.writerow([str(f), f"{scores[i]:.6g}", thr_text, int(flags[i]), f"{p_values[i]:.6g}",
                             "" if np.isnan(norm[i]) else f"{norm[i]:.4f}", ""])
    text = buf.getvalue()
    if out_csv is not None:
        atomic_write_text(out_csv, text)
    return text, len(errors)


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
