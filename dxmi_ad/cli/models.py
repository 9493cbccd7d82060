"""Commands that use a trained run directory: ``sample``, ``evaluate``, ``calibrate``, ``export``, ``score``; and
``extract-features`` (the feature files a features-mode run trains on).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated, Any

import typer

from dxmi_ad.cli.common import (
    CLIError,
    _check_out,
    _console_warnings,
    _fail,
    _Progress,
    _rate_option,
    console,
    err_console,
)
from dxmi_ad.cli.images import ImageCLIError
from dxmi_ad.cli.options import ExportFormat, InputDtype, TrainOptions, check_one_rule


@_console_warnings
def sample(
    model: Annotated[Path, typer.Option(help="run directory written by `dxmi-ad train` or `pretrain-sampler`")],
    n: Annotated[int, typer.Option("-n", "--n", help="number of samples", min=1)] = 1000,
    out: Annotated[Path | None, typer.Option(help="output file: .csv or .npy (vectors; a .csv is what `score` "
                                                  "reads), .png (pixel models: a grid plus .npy beside it) "
                                                  "[default: samples.csv (vector models), samples.npy "
                                                  "(image feature vectors), samples.png (pixel models)]")] = None,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    steps_from_model: Annotated[bool, typer.Option("--steps-from-model", help="pixel models: the model's own T "
                                                   "steps and learned sigmas (the default unless --steps)")] = False,
    steps: Annotated[int | None, typer.Option(help="pixel models: re-schedule the sampler network to this many steps "
                                                   "with DDPM posterior sigmas (e.g. 1000: the many-step reference)")] = None,
    guidance: Annotated[float, typer.Option(help="pixel models: value guidance lambda >= 0 (x <- x - lambda sigma_t "
                                                 "dV/dx after each step; the paper's sign)", min=0.0)] = 0.0,
    start: Annotated[Path | None, typer.Option(help="feature-mode image models: folder of normal images whose "
                                                    "feature vectors start the chain (the sampler refines perturbed data)")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace existing output files")] = False,
) -> None:
    """Draw samples from a trained sampler.

    Pixel models write an image grid (PNG) and the images as .npy `(n, C, S, S)` in [0, 1]; vector models write
    `(n, D)` rows (a 2-D model also a scatter plot over energy contours); feature-mode image models write feature
    vectors `(n, D)` started from the features of --start images.
    """
    import numpy as np

    import dxmi_ad
    from dxmi_ad.checkpoint import atomic_write_text
    from dxmi_ad.image import ImageDetector
    from dxmi_ad.pixel import PixelDetector

    try:
        det = dxmi_ad.load(model)
    except (FileNotFoundError, ValueError) as err:
        raise _fail(str(err)) from None
    if isinstance(det, PixelDetector):
        from dxmi_ad.cli.pixel import sample_pixel

        out = out or Path("samples.png")
        if out.suffix not in (".png", ".npy"):
            raise _fail(f"--out must end in .png (a grid; the .npy goes beside it), got {out.name}")
        if steps is not None and steps_from_model:
            raise _fail("choose one: --steps-from-model (the model's T and learned sigmas) or --steps N")
        if steps is not None and not 1 <= steps <= det.config.diffusion_steps:
            raise _fail(f"--steps must be in [1, {det.config.diffusion_steps}], got {steps}")
        _refuse_existing([out.with_suffix(".png"), out.with_suffix(".npy")], overwrite)
        try:
            png, npy = sample_pixel(det, n, out, steps, guidance, seed)
        except (ValueError, OSError) as err:
            raise _fail(f"sampling failed: {err}") from None
        used = (f"{steps} re-scheduled steps, DDPM posterior sigmas" if steps is not None
                else f"the model's T={det.config.n_steps} steps and learned sigmas")
        console.print(f"wrote {n} images ({used}, guidance {guidance:g}) to {png} and {npy}", highlight=False)
        return
    # vector models: CSV, what `score` and `calibrate --calibration-csv` read back; image feature vectors: .npy
    out = out or Path("samples.npy" if isinstance(det, ImageDetector) else "samples.csv")
    if out.suffix.lower() not in (".npy", ".csv"):
        raise _fail(f"--out must end in .csv or .npy, got {out.name}")
    if steps is not None or guidance:
        raise _fail("--steps and --guidance are for pixel-mode models")
    if start is not None and not isinstance(det, ImageDetector):
        raise _fail("--start is for feature-mode image models (their sampler refines perturbed features)")
    if isinstance(det, ImageDetector) and start is None:
        raise _fail("a feature-mode image model samples feature vectors by refining perturbed training "
                    "features (docs/paper_map.md): pass --start DIR with normal images")
    _refuse_existing([out, *([out.with_suffix(".png")] if getattr(det, "n_features_in_", 0) == 2 else [])], overwrite)
    if isinstance(det, ImageDetector):
        xs = _sample_feature_vectors(det, start, n, seed)
    else:
        xs = det.sample(n, random_state=seed)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _fail(f"cannot write {out}: {err}") from None
    if out.suffix.lower() == ".npy":
        tmp = out.with_name(f".{out.name}.tmp.npy")
        np.save(tmp, xs)
        tmp.replace(out)
    else:
        import csv
        import io

        names = getattr(det, "feature_names_in_", None)  # a model trained on a CSV: its columns, in order
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")  # quotes names holding commas or quotes
        writer.writerow(list(map(str, names)) if names is not None else [f"x{i}" for i in range(xs.shape[1])])
        writer.writerows([f"{v:.9g}" for v in row] for row in xs)  # 9 digits: float32 round-trips
        atomic_write_text(out, buf.getvalue())
    console.print(f"wrote {n} samples of dimension {xs.shape[1]} to {out}")
    if xs.shape[1] == 2:
        png = out.with_suffix(".png")
        _scatter_png(det, xs, png)
        console.print(f"wrote scatter plot over energy contours to {png}")


def _refuse_existing(paths: list[Path], overwrite: bool) -> None:
    """Exit 2 naming the first of ``paths`` that exists (a file we would replace), unless ``overwrite``."""
    found = [p for p in paths if p.exists()]
    if found and not overwrite:
        raise _fail(f"{found[0]} exists; choose another --out or pass --overwrite")
    if found and found[0].is_dir():
        raise _fail(f"{found[0]} is a folder; give --out a file name")


def _sample_feature_vectors(det: Any, start: Path, n: int, seed: int) -> Any:
    """Feature vectors ``(n, D)`` from an image model's sampler, started from the features of images in ``start``."""
    import torch

    from dxmi_ad.data.mvtec import list_normal_dir
    from dxmi_ad.image import iter_batches

    try:
        samples = list_normal_dir(start, "start")
    except (FileNotFoundError, ValueError) as err:
        raise _fail(str(err)) from None
    from dxmi_ad.features.extractor import PretrainedWeightsError

    feats, skipped = [], []
    try:
        for _, images, _, errs in iter_batches(samples, det.features.image_size, 16):
            skipped += [str(samples[i].path) for i in errs]
            if len(images):
                f = det._extractor()(images)  # (b, D, h, w)
                feats.append(f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]))
    except (FileNotFoundError, PretrainedWeightsError) as err:
        raise _fail(str(err)) from None
    if skipped:
        err_console.print(f"[yellow]warning:[/] {len(skipped)} unreadable file(s) in --start left out: "
                          f"{', '.join(skipped[:5])}", highlight=False)
    if not feats:
        raise _fail(f"no readable images in {start}")
    bank = torch.cat(feats)
    g = torch.Generator().manual_seed(seed)
    data = bank[torch.randint(len(bank), (n,), generator=g)]
    model = det.model_
    x0 = model.initial_states(n, data, g)
    return model.sampler.sample(x0, g)[-1].double().numpy()


def _scatter_png(det: Any, xs: Any, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    lim = max(4.0, float(np.abs(xs).max()) * 1.05) if np.isfinite(xs).all() else 4.0
    lim = min(lim, 8.0)
    grid = np.linspace(-lim, lim, 200)
    gx, gy = np.meshgrid(grid, grid)
    from dxmi_ad.data.tabular import with_column_names

    grid_rows = with_column_names(np.c_[gx.ravel(), gy.ravel()], getattr(det, "feature_names_in_", None))
    energy = det.energy(grid_rows).reshape(gx.shape)
    fig, ax = plt.subplots(figsize=(6, 6), dpi=100)
    cs = ax.contourf(gx, gy, energy, levels=30, cmap="viridis")
    fig.colorbar(cs, ax=ax, label="energy (higher = more anomalous)")
    ax.scatter(xs[:, 0], xs[:, 1], s=2, c="white", alpha=0.5, label="samples x_T")
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_title("DxMI samples over energy contours")
    ax.legend(loc="upper right")
    tmp = png.with_name(f".{png.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(png)


@_console_warnings
def extract_features(
    out: Annotated[Path, typer.Option(help="folder to write train/test feature files into")],
    dataset: Annotated[str, typer.Option(help="textures | mvtec | folder")] = "textures",
    data_root: Annotated[Path | None, typer.Option(help="dataset root")] = None,
    category: Annotated[str, typer.Option(help="categories, or all")] = "all",
    recipe: Annotated[Path | None, typer.Option(help="image recipe (its features section is used)")] = None,
    skip_bad_files: Annotated[bool, typer.Option(help="leave unreadable images out")] = False,
    pretrained: Annotated[bool, typer.Option(help="ImageNet backbone weights")] = True,
    weights: Annotated[Path | None, typer.Option(help="backbone weights file")] = None,
    backbone: Annotated[str | None, typer.Option(help="timm backbone name")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing folder")] = False,
) -> None:
    """Write per-image feature maps (with labels, masks, categories) for `train --dataset features`."""
    from dxmi_ad.cli import images
    from dxmi_ad.features.extractor import PretrainedWeightsError
    from dxmi_ad.image import BadFilesError

    try:
        if dataset not in ("textures", "mvtec", "folder"):
            msg = f"extract-features reads image datasets (textures, mvtec, folder), got {dataset!r}"
            raise CLIError(msg)
        _check_out(out, overwrite)
        opts = TrainOptions(dataset=dataset, data_root=data_root, category=category, skip_bad_files=skip_bad_files,
                            pretrained=pretrained, weights=weights, backbone=backbone, out=out, recipe=recipe)
        with _Progress() as progress:
            images.extract_features(opts, images.load_image_recipe(recipe, {}), console, progress)
    except (CLIError, ImageCLIError, BadFilesError, PretrainedWeightsError, FileNotFoundError, ValueError) as err:
        raise _fail(str(err)) from None


def _model_kind(model: Path) -> str | None:
    """The ``kind`` recorded in a run directory's config.json, or None when it cannot be read."""
    from dxmi_ad.checkpoint import CONFIG_FILE

    try:
        return json.loads((model / CONFIG_FILE).read_text(encoding="utf-8")).get("kind")
    except (OSError, ValueError, AttributeError):
        return None


TABLE_NO_RULE = ("no decision rule: pred_label left empty; set one with `dxmi-ad calibrate --model {model} "
                 "--calibration-csv NORMAL_ROWS.csv`")


def _model_columns(det: Any, X: Any, columns: list[str], path: Path) -> Any:
    """Table rows ``X`` ``(n, D)`` with CSV ``columns``, as the vector model ``det`` takes them: a DataFrame in the
    training columns' order when the model knows their names (matched by name, any order), else the array. The
    names were checked by :func:`~dxmi_ad.data.tabular.load_csv` (``expected_columns``) when the table was read.

    Raises:
        CLIError: A column count that differs from the model's (a model trained on unnamed arrays).
    """
    from dxmi_ad.data.tabular import with_column_names

    names = getattr(det, "feature_names_in_", None)
    if names is not None and list(columns) != list(names):
        X = X[:, [columns.index(c) for c in names]]  # same names, another order
    if X.shape[1] != det.n_features_in_:
        raise CLIError(f"{path}: {X.shape[1]} feature column(s), the model was trained on {det.n_features_in_}")
    return with_column_names(X, names)


def _score_tables(model: Path, paths: list[Path], out: Path | None, id_column: str | None = None) -> dict[str, Any]:
    """Score every row of the CSV ``paths`` with the vector model in ``model``; returns :func:`decision_csv`'s
    result plus ``n_rows``. All tables are read and checked before anything is written. ``id_column``: every
    table's identifier column, copied to the scores after ``row`` (never a feature).

    Raises:
        CLIError: A folder or a non-CSV file, or columns that differ from the training columns (named).
        ValueError: A table :func:`~dxmi_ad.data.tabular.load_csv` refuses (file, line and column named).
    """
    import warnings

    import numpy as np

    import dxmi_ad
    from dxmi_ad.cli.images import decision_csv
    from dxmi_ad.data.tabular import load_csv

    for p in paths:
        if p.is_dir():
            raise CLIError(f"{p} is a folder: a vector model scores CSV files; give their paths")
        if p.suffix.lower() != ".csv":
            hint = " (save the sheet as CSV)" if p.suffix.lower() in (".xlsx", ".xls", ".ods") else ""
            raise CLIError(f"{p}: a vector model scores CSV files with a header row (.csv), not "
                           f"{p.suffix or 'this file'}{hint}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "no calibration.json" is said by the rule column and summary
        det = dxmi_ad.load(model)
    tables = []
    for p in paths:  # every table is read and checked before any is scored
        X, label, columns, lines, *names = load_csv(p, min_rows=1, return_lines=True, id_column=id_column,
                                                    expected_columns=getattr(det, "feature_names_in_", None))
        if label is not None:
            err_console.print(f"{p}: the label column is not a feature; ignored", highlight=False)
        tables.append((p, _model_columns(det, X, columns, p), lines, names[0] if names else None))
    ids, scores = [], []
    for p, X, lines, names in tables:
        try:
            scores.append(det.energy(X))
        except ValueError as err:  # e.g. a value the standardization cannot hold: name the table
            raise CLIError(f"{p}: {err} (row indices count data rows from 0; see the row column for lines)") from None
        ids += [[str(p), str(int(line)), *([] if names is None else [str(names[k])])] for k, line in enumerate(lines)]
    id_names = ["path", "row", *([] if id_column is None else [id_column.strip()])]
    result = decision_csv(ids, id_names, np.concatenate(scores), {}, det.calibration_, out,
                          TABLE_NO_RULE.format(model=model))
    return {**result, "n_rows": len(ids)}


def _load_image_model(model: Path) -> Any:
    from dxmi_ad.checkpoint import CONFIG_FILE
    from dxmi_ad.image import ImageDetector

    kind = _model_kind(model)
    if kind == "PixelDetector":
        raise _fail(f"{model} is a pixel-mode model: its metrics are in {model / 'metrics.json'}; use `dxmi-ad "
                    "sample` to generate, `dxmi-ad calibrate` to re-calibrate, or PixelDetector.predict in Python")
    from dxmi_ad.features.extractor import PretrainedWeightsError

    try:
        det = ImageDetector.load(model)
    except (FileNotFoundError, ValueError) as err:
        raise _fail(str(err)) from None
    try:  # the backbone (and its weights file) before any image is read: a moved file fails here, not mid-way
        det._extractor()
    except (FileNotFoundError, PretrainedWeightsError, ValueError) as err:
        raise _fail(f"cannot build the backbone of {model} ({model / CONFIG_FILE}, field features): {err}") from None
    return det


def _evaluate_table(model: Path, table: Path, out: Path | None, id_column: str | None) -> None:
    """``evaluate`` of a vector model on a labelled CSV: prints :func:`~dxmi_ad.cli.train.labelled_metrics` and, with
    ``out``, writes them to ``out/evaluation.json`` (atomically; never the training run's ``metrics.json``).

    Raises:
        CLIError: No label column, columns that differ from the training columns, an ``out`` that cannot be made.
        ValueError: A table :func:`~dxmi_ad.data.tabular.load_csv` refuses (file, line and column named).
    """
    import warnings

    import dxmi_ad
    from dxmi_ad.checkpoint import atomic_write_text
    from dxmi_ad.cli.train import labelled_metrics
    from dxmi_ad.data.tabular import load_csv
    from dxmi_ad.metrics import dumps_json

    if out is not None:  # before any work: a path that cannot be a folder fails here, in one line
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise CLIError(f"--out {out}: cannot create this folder ({err.strerror or err})") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "no calibration.json": said below
        det = dxmi_ad.load(model)
    X, label, columns = load_csv(table, id_column=id_column,
                                 expected_columns=getattr(det, "feature_names_in_", None))[:3]
    if label is None:
        raise CLIError(f"{table}: no label column; evaluation needs a `label` column (0 normal, 1 anomaly; "
                       "`dxmi-ad score` scores unlabelled rows)")
    metrics = {"model": str(model), "table": str(table), "n_test": len(label),
               **labelled_metrics(det, _model_columns(det, X, columns, table), label)}
    cal = det.calibration_
    metrics["rule"] = cal.summary().splitlines()[0] if cal is not None else None
    for key, value in metrics.items():
        console.print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}", highlight=False)
    if cal is None:
        console.print(f"no decision rule ({model} has no calibration.json): FPR / TPR not measured; set one with "
                      "`dxmi-ad calibrate`", highlight=False)
    else:
        console.print("\n".join(cal.summary().splitlines()[1:]), highlight=False)
    if out is not None:
        atomic_write_text(out / "evaluation.json", dumps_json(metrics, indent=2))
        console.print(f"wrote {out / 'evaluation.json'}")


@_console_warnings
def evaluate(
    model: Annotated[Path, typer.Option(help="run directory of an image or vector model")],
    dataset: Annotated[str | None, typer.Option(help="textures | mvtec | folder (default: the training dataset)")] = None,
    data_root: Annotated[Path | None, typer.Option(help="dataset root")] = None,
    category: Annotated[str | None, typer.Option(help="categories, or all")] = None,
    out: Annotated[Path | None, typer.Option(help="where to write metrics, plots and report.html (default: --model; "
                                                  "vector model: evaluation.json, only with --out)")] = None,
    csv: Annotated[Path | None, typer.Option(help="vector model: a CSV of labelled rows (the training columns and "
                                                  "`label`, 0 normal / 1 anomaly)")] = None,
    id_column: Annotated[str | None, typer.Option(help="--csv: its identifier column (text), not a feature")] = None,
) -> None:
    """Image model: per-category image AUROC, pixel AUROC, AUPRO and F1-max, plus the mean; plots and report.html.
    Vector model (--csv): AUROC, AUPR and the calibrated rule's FPR / TPR on the labelled rows.
    """
    from dxmi_ad.checkpoint import load_model_dir
    from dxmi_ad.cli import images

    if not model.is_dir():
        raise _fail(f"--model {model}: {'not found' if not model.exists() else 'is a file'}; give the run directory "
                    "written by `dxmi-ad train`")
    target = out or model
    if target.exists() and not target.is_dir():
        raise _fail(f"--out {target} is an existing file; give a folder for the metrics"
                    + ("" if csv is not None else ", the plots and report.html"))
    if _model_kind(model) in ("DxMIDetector", "PyODDxMIDetector"):
        if dataset is not None or data_root is not None or category is not None:
            raise _fail("--dataset, --data-root and --category are for image models; a vector model is evaluated "
                        "on a labelled table: --csv PATH")
        if csv is None:
            raise _fail(f"{model} is a vector model: evaluate it on a labelled table, --csv PATH (the training "
                        "columns and a `label` column, 0 normal / 1 anomaly)")
        try:
            _evaluate_table(model, csv, out, id_column)
        except (CLIError, FileNotFoundError, ValueError) as err:
            raise _fail(str(err)) from None
        return
    if csv is not None or id_column is not None:
        raise _fail("--csv and --id-column are for vector models; an image model is evaluated on --dataset")
    det = _load_image_model(model)
    _, meta = load_model_dir(model)
    dataset = dataset or meta.get("dataset") or "textures"
    if dataset == "features":
        raise _fail("this model was trained on feature files; its metrics.json was written at training time "
                    "(pass --dataset and --data-root to evaluate it on images)")
    root = data_root or (Path(meta["data_root"]) if meta.get("data_root") else None)
    try:
        samples, description = images.list_dataset(dataset, root, category or meta.get("category") or "all")
    except ImageCLIError as err:
        raise _fail(str(err)) from None
    console.print(f"[bold]dxmi-ad evaluate[/] {description}")
    images.print_calibration(det, console)
    with _Progress() as progress:
        metrics = images.evaluate_and_write(det, samples, out or model, console, progress=progress.batches("scoring"),
                                            settings={"dataset": dataset, "data_root": str(root) if root else None})
    if not metrics:
        raise typer.Exit(code=1)
    console.print(f"wrote metrics.json, metrics.csv, plots and report.html to {out or model}")


@_console_warnings
def calibrate(
    model: Annotated[Path, typer.Option(help="run directory written by `dxmi-ad train`")],
    calibration_dir: Annotated[Path | None, typer.Option(help="image model: folder of held-out normal images "
                                                              "(default: keep the stored calibration scores)")] = None,
    calibration_csv: Annotated[Path | None, typer.Option(help="vector model: CSV of held-out normal rows")] = None,
    fpr: Annotated[float | None, typer.Option(callback=_rate_option, help="target false-positive rate, in (0, 1) "
                                              "(default: the model's current target)")] = None,
    fdr: Annotated[float | None, typer.Option(callback=_rate_option,
                                              help="Benjamini-Hochberg at this false discovery rate, in (0, 1)")] = None,
    validation_dir: Annotated[Path | None, typer.Option(help="image model: labelled folder (good/, <defect>/) "
                                                             "for an F1-optimal threshold")] = None,
    validation_csv: Annotated[Path | None, typer.Option(help="vector model: labelled CSV (a label column, 0 = "
                                                             "normal, 1 = anomaly) for an F1-optimal threshold")] = None,
    skip_bad_files: Annotated[bool, typer.Option(help="leave unreadable calibration images out")] = False,
    id_column: Annotated[str | None, typer.Option(help="--calibration-csv / --validation-csv: their identifier "
                                                       "column (text), not a feature")] = None,
) -> None:
    """Re-calibrate a trained model's decisions without retraining; rewrites RUN_DIR/calibration.json atomically."""
    import dxmi_ad
    from dxmi_ad.calibration import CalibrationError
    from dxmi_ad.cli import images
    from dxmi_ad.cli.pixel import PixelCLIError, calibrate_pixel
    from dxmi_ad.decision import kept_rule
    from dxmi_ad.image import BadFilesError, ImageDetector
    from dxmi_ad.pixel import PixelDetector

    try:
        check_one_rule(fpr, fdr)
        det = dxmi_ad.load(model)
        stored = getattr(det, "calibration_", None)
        if fpr is None and fdr is None and validation_dir is None and validation_csv is None \
                and kept_rule(stored) != (None, None):  # new calibration data, the same rule and target
            fpr, fdr = kept_rule(stored)
            err_console.print(f"keeping the model's rule: target {stored.rule.upper()} {fdr or fpr:g} (pass --fpr or "
                              "--fdr to change it)", highlight=False)
        if isinstance(det, (ImageDetector, PixelDetector)):
            if calibration_csv is not None or validation_csv is not None or id_column is not None:
                raise CLIError("--calibration-csv, --validation-csv and --id-column are for vector models; pass "
                               "--calibration-dir / --validation-dir for an image model")
            calibration, validation = images.calibration_inputs(TrainOptions(
                fpr=fpr, fdr=fdr, calibration_dir=calibration_dir, validation_dir=validation_dir))
            if isinstance(det, PixelDetector):
                cal = calibrate_pixel(det, calibration, validation, fpr, fdr, skip_bad_files)
            else:
                cal = det.calibrate(calibration or None, fpr=fpr, fdr=fdr, validation=validation,
                                    skip_bad_files=skip_bad_files)
        else:
            if calibration_dir is not None or validation_dir is not None:
                raise CLIError("this is a vector model: pass --calibration-csv (normal rows), not image folders")
            from dxmi_ad.data.tabular import load_csv

            X = X_val = y_val = None
            if id_column is not None and calibration_csv is None and validation_csv is None:
                raise CLIError("--id-column names a column of --calibration-csv / --validation-csv; pass that file too")
            if validation_csv is not None:
                if fdr is not None:
                    raise CLIError("choose one rule: --fdr or an F1-optimal threshold from --validation-csv")
                X_val, y_val, columns = load_csv(validation_csv, id_column=id_column,
                                                 expected_columns=getattr(det, "feature_names_in_", None))[:3]
                if y_val is None or not (y_val == 0).any() or not (y_val == 1).any():
                    raise CLIError(f"{validation_csv}: an F1 threshold needs a label column with both normal rows "
                                   "(0) and anomalies (1)")
                X_val = _model_columns(det, X_val, columns, validation_csv)
            if calibration_csv is not None:
                X, label, columns = load_csv(calibration_csv, id_column=id_column,
                                             expected_columns=getattr(det, "feature_names_in_", None))[:3]
                if label is not None:  # calibration rows must be normal: a label column is never a feature
                    if not (label == 0).any():
                        raise CLIError(f"{calibration_csv}: every row has label 1 (anomaly); calibration needs "
                                       "normal rows (label 0)")
                    if (label == 1).any():
                        err_console.print(f"[yellow]warning:[/] {calibration_csv}: calibrating on the "
                                          f"{int((label == 0).sum())} rows with label 0; {int(label.sum())} "
                                          "rows with label 1 (anomalies) left out", highlight=False)
                    X = X[label == 0]
                X = _model_columns(det, X, columns, calibration_csv)  # by name, as `score` reads tables
            det.calibrate(X, fpr=fpr, fdr=fdr, X_validation=X_val, y_validation=y_val)
            if calibration_csv is not None:  # the file, not the Python call, is what the user will look for
                det.calibration_ = dataclasses.replace(
                    det.calibration_, source=f"{len(X)} normal rows of {calibration_csv}")
            cal = det.calibration_
        cal.save(model)
    except (CLIError, ImageCLIError, PixelCLIError, BadFilesError, CalibrationError, FileNotFoundError,
            ValueError) as err:
        raise _fail(str(err)) from None
    console.print(f"calibrated {model}: {cal.summary()}", highlight=False)
    stale = [p.name for p in (model / "model.onnx", model / "model.pt", model / "report.html") if p.exists()]
    if stale:
        err_console.print(f"[yellow]warning:[/] made with the previous rule, re-run `dxmi-ad export` / "
                          f"`dxmi-ad evaluate` to update: {', '.join(stale)} in {model}", highlight=False)


@_console_warnings
def export(
    model: Annotated[Path, typer.Option(help="run directory of an image model")],
    format_: Annotated[ExportFormat, typer.Option("--format", help="graph format")] = ExportFormat.onnx,
    out: Annotated[Path | None, typer.Option(help="output file (default RUN_DIR/model.onnx or model.pt)")] = None,
    input_dtype: Annotated[InputDtype, typer.Option(help="float32 (values in [0, 1]) or uint8 (values in [0, 255])")
                           ] = InputDtype.float32,
    input_size: Annotated[tuple[int, int] | None, typer.Option(help="H W of the exported input (default: the "
                                                                    "model input size); the graph resizes")] = None,
) -> None:
    """Export the whole scorer (resize, backbone, energy head, map upsampling) with the threshold in its metadata.

    Input `images (B, 3, H, W)` RGB; outputs `pred_score (B,)` and `anomaly_map (B, H, W)`.
    """
    from dxmi_ad.export import export_model

    format_, input_dtype = ExportFormat(format_).value, InputDtype(input_dtype).value  # plain strings below
    if input_size is not None and min(input_size) < 32:
        raise _fail(f"--input-size must be at least 32 x 32 pixels, got {input_size[0]} x {input_size[1]}")
    det = _load_image_model(model)
    path = out or model / ("model.onnx" if format_ == "onnx" else "model.pt")
    if path.is_dir():
        raise _fail(f"--out {path} is a folder; give a file name (e.g. {path / 'model.onnx'})")
    try:
        export_model(det, path, format_, input_dtype, tuple(input_size) if input_size else None)
    except (RuntimeError, ValueError) as err:
        raise _fail(f"export failed: {err}") from None
    thr = det.calibration_.decision_threshold if det.calibration_ is not None else None
    h, w = input_size or (det.features.image_size, det.features.image_size)
    origin = "" if input_size else " (the input size the model was trained at, from its config.json)"
    console.print(f"wrote {format_} scorer to {path}: input {input_dtype} (B, 3, {h}, {w}){origin}, outputs "
                  f"pred_score, anomaly_map" + (f"; threshold {thr:.6g} in its metadata" if thr is not None else
                                                "; no fixed threshold in its metadata (" +
                                                ("FDR rule: decide per batch" if det.calibration_ is not None else
                                                 "no decision rule: run `dxmi-ad calibrate` first") + ")"),
                  highlight=False)


@_console_warnings
def score(
    paths: Annotated[list[Path], typer.Argument(help="image files and/or folders (recursive); CSV files for a "
                                                     "vector model")],
    model: Annotated[Path, typer.Option(help="run directory of an image or vector model")],
    out: Annotated[Path | None, typer.Option(help="CSV file (default: print to the terminal)")] = None,
    heatmaps: Annotated[Path | None, typer.Option(help="folder for heat-map overlay PNGs")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="images per batch (bounds memory)")] = 32,
    id_column: Annotated[str | None, typer.Option(help="vector model: the tables' identifier column (text), copied "
                                                       "to the scores after `row`, never a feature")] = None,
) -> None:
    """Score images (one CSV row per file) or, with a vector model, the rows of CSV tables (one per row); then a
    summary line on stderr; exit 1 if an image failed.

    Columns: path (and row, the line in the table file, for tables, then the --id-column's values), pred_score (the energy; for images the max
    per-location energy; higher = more anomalous), threshold (from the model's calibration; empty when its rule is a
    false discovery rate, set with `dxmi-ad calibrate --fdr`), pred_label (the stored rule; for an FDR rule,
    Benjamini-Hochberg over everything scored in this call; empty without a rule or for a row with an error),
    p_value (split-conformal, against held-out normal data), normalized_score (0.5 = threshold), error (unreadable
    file, NaN / infinite pixels or score). Tables need the training columns (by name when the model was trained on
    a CSV), a label column is ignored; a bad table stops the run (exit 2) before anything is written. Nothing to
    score, --out a folder or --heatmaps a file: exit 2 before any input is read, no CSV written.
    """
    from dxmi_ad.cli import images
    from dxmi_ad.data.images import find_images

    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise _fail(f"not found: {', '.join(missing)}")
    if not model.is_dir():  # before any input is listed: the model decides whether images or tables are read
        raise _fail(f"--model {model}: {'not found' if not model.exists() else 'is a file'}; give the run directory "
                    "written by `dxmi-ad train`")
    if _model_kind(model) in ("DxMIDetector", "PyODDxMIDetector"):
        if heatmaps is not None:
            raise _fail("--heatmaps is for image models; a vector model scores table rows")
        try:
            images.check_score_outputs(out, None, paths, model)
            result = _score_tables(model, paths, out, id_column)
        except (CLIError, ImageCLIError, FileNotFoundError, ValueError) as err:
            raise _fail(str(err)) from None
        if out is None:
            console.print(result["text"], end="", highlight=False, markup=False, soft_wrap=True)
        else:
            console.print(f"wrote {out}")
        err_console.print(images.score_summary(result, unit="row"), highlight=False, soft_wrap=True)
        return
    if id_column is not None:
        raise _fail("--id-column is for vector models scoring CSV tables; an image's identifier is its path")
    try:  # everything that can be refused is refused before the model is loaded or any image is read
        images.check_score_outputs(out, heatmaps, paths, model)
        listing = find_images(paths, require=True)
    except (ImageCLIError, ValueError) as err:
        raise _fail(str(err)) from None
    skipped = listing.describe_skipped()
    err_console.print(f"found {len(listing.files)} image file(s) to score" + (f"; {skipped}" if skipped else ""),
                      highlight=False)
    det = _load_image_model(model)
    try:
        with _Progress(err_console) as progress:  # stderr: the CSV may go to stdout
            result = images.score_paths(det, listing.files, out, heatmaps, batch_size, model=model,
                                        on_batch=progress.batches("scoring"))
    except (ImageCLIError, ValueError) as err:
        raise _fail(str(err)) from None
    if out is None:
        console.print(result["text"], end="", highlight=False, markup=False, soft_wrap=True)
    else:
        console.print(f"wrote {out}")
    err_console.print(images.score_summary(result), highlight=False, soft_wrap=True)
    if result["n_errors"]:
        raise typer.Exit(code=1)
