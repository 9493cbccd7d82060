"""``dxmi-ad train`` and ``dxmi-ad pretrain-sampler``: recipes, data sets, run directories, checkpoints and resume.

Commands are thin: parse typed options (:class:`~dxmi_ad.cli.options.TrainOptions`), resolve the recipe, call the
library, print a table.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

if TYPE_CHECKING:
    import numpy as np

from dxmi_ad import recipes
from dxmi_ad.checkpoint import atomic_directory, read_yaml_mapping
from dxmi_ad.cli.common import (
    CLIError,
    _check_out,
    _console_warnings,
    _fail,
    _parse_sets,
    _Progress,
    _rate_option,
    console,
    err_console,
)
from dxmi_ad.cli.images import IMAGE_DATASETS, ImageCLIError
from dxmi_ad.cli.options import (
    PERMISSIONS,
    RUNTIME_KEYS,
    Accelerator,
    Mode,
    Precision,
    Strategy,
    TrainOptions,
    check_one_rule,
)

DATASETS = ("textures", "mvtec", "folder", "features", "digits", "mnist", "eight-gaussians", "wbc", "wine", "csv:PATH")
DEFAULT_DATASET = "textures"


#: Feature counts of the bundled vector datasets (``csv:`` tables: read from the file).
DATASET_WIDTHS = {"digits": 64, "mnist": 784, "wbc": 30, "wine": 13, "eight-gaussians": 2}


def load_recipe(path: Path | None, dataset: str, sets: list[str], n_features: int | None = None) -> dict[str, Any]:
    """Read a vector recipe, defaulting to the dataset's bundled recipe.

    ``n_features`` (a ``csv:`` table's width; the bundled datasets' is known) resolves ``energy_model="auto"`` and
    the parameters left at None (``DxMIDetector``'s per-energy defaults) for the checks and the schedule scaling.

    The same layout as image and pixel recipes is accepted: a ``model:`` section and an optional ``runtime:``
    section; the flat form (parameters at the top level) is read too. ``--set`` keys may carry the ``model.`` prefix
    (``--set model.n_iter=100``) as in the other modes. A key in ``model:`` means the same in every mode: a
    :class:`~dxmi_ad.config.DxMIConfig` field (``sampler_hidden``, ``project_samples``, ``last_sigma``, ...) sets that
    field here too (passed to ``DxMIDetector(config_overrides=...)``); the estimator's own parameters (``hidden`` and
    ``n_layers`` for all three networks, ``contamination``, ``calibration_fraction``, ``standardize``, ...) are
    vector-only.

    Raises:
        CLIError: If the file is missing, not a mapping, names unknown parameters or has an invalid value.
    """
    from dxmi_ad.estimator import DxMIDetector

    if path is None:
        stem = {"eight-gaussians": "eight_gaussians", "digits": "digits", "mnist": "digits"}.get(dataset, "tables")
        path = recipes.path(stem)
    try:
        path = recipes.resolve(path)
        recipe = read_yaml_mapping(path)
    except (FileNotFoundError, ValueError) as err:
        raise CLIError(str(err)) from err
    overrides = {k.removeprefix("model."): v for k, v in _parse_sets(sets).items()}
    try:  # the sectioned layout lifted, DxMIConfig fields routed to config_overrides, each layer on its own (old
        # names renamed there); then --set wins key by key, config_overrides merged field by field
        base = recipes.detector_params(recipe, str(path))
        given = recipes.detector_params(overrides, "--set")
        recipe = {**base, **given}
        if "config_overrides" in base and "config_overrides" in given:
            recipe["config_overrides"] = {**(base["config_overrides"] or {}), **(given["config_overrides"] or {})}
    except ValueError as err:
        raise CLIError(str(err)) from None
    known = set(DxMIDetector().get_params())
    unknown = sorted(set(recipe) - known)
    if unknown:
        import dataclasses
        import difflib

        from dxmi_ad.config import DxMIConfig

        every = sorted(known | {f.name for f in dataclasses.fields(DxMIConfig)} - {"dim", "mode", "seed"})
        where = [f"--set {k}" if k in given else f"recipe {path}" for k in unknown]
        hints = [f"{k!r} ({w}{'; did you mean ' + repr(m[0]) + '?' if m else ''})" for k, w in zip(unknown, where)
                 for m in [difflib.get_close_matches(k, every, n=1)]]
        msg = (f"unknown recipe key(s): {', '.join(hints)}; a model key is a DxMIDetector parameter or a DxMIConfig field: "
               f"{', '.join(every)}")
        raise CLIError(msg)

    def check(resolve_config: bool) -> None:
        """Ranges before any data is read: scikit-learn's constraints (they name the parameter), then the config.

        The DxMIConfig the parameters resolve to is built with the data's width (a placeholder that any latent size
        fits when it is unknown).
        """
        try:
            detector = DxMIDetector(**{k: v for k, v in recipe.items() if k != "runtime"})
            detector._validate_params()
            if resolve_config:
                detector._make_config(dim=width, n_rows=1 << 16)
        except (TypeError, ValueError) as err:
            raise CLIError(f"invalid recipe value in {path} / --set: {err}") from None

    width = n_features or DATASET_WIDTHS.get(dataset, 1 << 16)
    check(resolve_config=False)  # types first: the schedule arithmetic below needs numbers
    defaults = DxMIDetector(energy_model=recipe.get("energy_model", "auto")).resolved_params(width)
    def lifted(params: dict[str, Any]) -> dict[str, Any]:  # the refit length travels in config_overrides here
        extra = params.get("config_overrides") or {}
        return {**params, **({"energy_refit_iter": extra["energy_refit_iter"]} if "energy_refit_iter" in extra else {})}

    changes = _scaled_schedule({**defaults, **lifted(base)}, lifted(given))
    if "energy_refit_iter" in changes:
        recipe["config_overrides"] = {**(recipe.get("config_overrides") or {}),
                                      "energy_refit_iter": changes.pop("energy_refit_iter")}
    recipe.update(changes)
    check(resolve_config=True)
    return recipe


def _scaled_schedule(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Schedule lengths that follow the user's ``--set`` (:func:`~dxmi_ad.training.fit.scale_schedule`): e.g.
    ``--set n_iter=100`` on a recipe with ``n_iter: 300, warmup_iter: 100`` scales the warm-up to 33. Each change
    is printed as one ``info:`` line on stderr (stdout stays clean for ``--dry-run``).

    Raises:
        CLIError: Lengths given by the user that leave the energy without an update (with the arithmetic).
    """
    from dxmi_ad.training.fit import scale_schedule

    try:
        changes, notes = scale_schedule(base, overrides)
    except ValueError as err:
        raise CLIError(f"--set: {err}") from None
    for note in notes:
        err_console.print(f"info: {note}", highlight=False, markup=False, soft_wrap=True)
    return changes


def load_dataset(dataset: str, normal_class: int, seed: int, id_column: str | None = None) -> Any:
    """Return a :class:`~dxmi_ad.data.tabular.OneClassSplit` for a dataset name (``id_column``: a ``csv:`` table's
    identifier column, kept out of the features).

    Raises:
        CLIError: For an unknown name or unreadable CSV.
    """
    import numpy as np

    from dxmi_ad.data import tabular
    from dxmi_ad.data.synthetic import eight_gaussians, uniform_box

    if dataset == "digits":
        return tabular.digits_split(normal_class, seed)
    if dataset == "mnist":
        try:
            return tabular.mnist_split(normal_class, seed)
        except ModuleNotFoundError as err:
            raise CLIError(str(err)) from err
    if dataset in ("wbc", "wine"):
        return tabular.odds_split(dataset, seed)
    if dataset == "eight-gaussians":
        test = np.r_[eight_gaussians(10_000, seed + 123), uniform_box(10_000, seed + 7)]
        label = np.r_[np.zeros(10_000, int), np.ones(10_000, int)]
        return tabular.OneClassSplit(eight_gaussians(50_000, seed), test, label, "eight-gaussians")
    if dataset.startswith("csv:"):
        try:
            X, label, names = tabular.load_csv(dataset[4:], id_column=id_column)[:3]
        except (FileNotFoundError, ValueError) as err:
            raise CLIError(str(err)) from err
        # float64 as read (the estimator standardizes in float64 before its float32 networks): the same values
        # as DxMIDetector().fit(pd.read_csv(path)), so one seed gives one model on either route
        if label is None:
            split = tabular.OneClassSplit(X, X[:0], np.zeros(0, int), dataset)
        else:
            split = tabular.split_labelled(X, label, 0.7, seed, dataset, dtype=np.float64)
        return split._replace(feature_names=tuple(names))  # kept with the model: `dxmi-ad score` checks them
    _check_dataset_name(dataset)
    raise CLIError(f"{dataset} is an image dataset, not a table")  # routed to the image path before this point


def _table_recipe(dataset: str, id_column: str | None = None) -> tuple[Path | None, int | None]:
    """``(recipe, feature count)`` of a ``csv:`` table (``(None, None)`` for other datasets): the bundled
    ``tables_low_dim`` recipe for 2 to :data:`~dxmi_ad.estimator.LOW_DIM_FEATURES` feature columns (what
    ``DxMIDetector(energy_model="auto")`` builds there), None otherwise (the ``tables`` recipe); used only without
    ``--recipe``.

    Raises:
        CLIError: The file is missing or unreadable (:func:`load_dataset`'s messages).
    """
    if not dataset.startswith("csv:"):
        return None, None
    from dxmi_ad.data import tabular
    from dxmi_ad.estimator import LOW_DIM_FEATURES

    _check_dataset_name(dataset)
    try:
        n_features = tabular.load_csv(dataset[4:], id_column=id_column)[0].shape[1]
    except (FileNotFoundError, ValueError) as err:
        raise CLIError(str(err)) from err
    if not 2 <= n_features <= LOW_DIM_FEATURES:
        return None, n_features
    return recipes.path("tables_low_dim"), n_features


def _check_dataset_name(dataset: str) -> None:
    """Refuse, without reading data, a vector dataset name that :func:`load_dataset` would refuse.

    Raises:
        CLIError: An unknown name (a ``.csv`` path without the ``csv:`` prefix is named as such) or a ``csv:`` file
            that does not exist.
    """
    if dataset.startswith("csv:"):
        if not dataset[4:].strip():
            raise CLIError("--dataset csv: needs the file's path after the prefix, e.g. csv:my_table.csv")
        if Path(dataset[4:]).expanduser().is_dir():
            raise CLIError(f"{dataset}: {dataset[4:]!r} is a folder, not a CSV file")
        if not Path(dataset[4:]).expanduser().is_file():
            raise CLIError(f"{dataset}: CSV file {dataset[4:]!r} not found")
        return
    if dataset not in DATASETS:
        hint = (f" (the prefix is written in lower case: csv:{dataset[4:]})" if dataset.lower().startswith("csv:")
                else f" (a CSV file is given as csv:{dataset})" if dataset.lower().endswith(".csv") else "")
        msg = f"unknown dataset {dataset!r}{hint}; expected one of {', '.join(DATASETS)}"
        raise CLIError(msg)


def _named(split: Any, rows: np.ndarray) -> Any:
    """``rows`` ``(n, D)`` with the split's column names (a CSV's header), or as they are."""
    from dxmi_ad.data.tabular import with_column_names

    return with_column_names(rows, split.feature_names)


def labelled_metrics(det: Any, X: Any, label: np.ndarray) -> dict[str, Any]:
    """Metrics of a vector model on labelled rows ``X`` ``(N, D)`` (``label`` ``(N,)``: 0 normal, 1 anomaly).

    ``image_AUROC`` (anomalib's key for a per-sample score) and ``AUPR`` (average precision, anomalies positive) when
    both classes are present (else None), ``n_test_anomalous``, and ``FPR`` / ``TPR`` of the model's calibrated rule
    (its threshold, or Benjamini-Hochberg over these rows under an FDR rule; None without normal / anomalous rows
    or without a rule).
    """
    from sklearn.metrics import average_precision_score

    from dxmi_ad.metrics import auroc

    energy = det.energy(X)
    both = 0 < label.sum() < len(label)
    # the stored rule on these energies (True = anomalous): the same for DxMIDetector's -1 / +1 and pyod's 1 / 0
    flagged = det.decide(energy) if getattr(det, "calibration_", None) is not None else None
    return {"image_AUROC": auroc(energy[label == 0], energy[label == 1]) if both else None,
            "AUPR": float(average_precision_score(label, energy)) if both else None,
            "n_test_anomalous": int(label.sum()),
            "FPR": float(flagged[label == 0].mean()) if flagged is not None and (label == 0).any() else None,
            "TPR": float(flagged[label == 1].mean()) if flagged is not None and (label == 1).any() else None}


def _evaluate(det: Any, split: Any, dataset: str) -> dict[str, Any]:
    from dxmi_ad.metrics import sliced_wasserstein

    metrics: dict[str, Any] = {"dataset": split.name, "n_train": int(len(split.train)), "n_test": int(len(split.test))}
    # n_train = every training row given; how fit used them (the networks saw only n_fit of them)
    metrics.update({f"n_{k}": int(v) for k, v in getattr(det, "row_counts_", {}).items()})
    if len(split.test_label) and 0 < split.test_label.sum() < len(split.test_label):
        metrics.update(labelled_metrics(det, _named(split, split.test), split.test_label))
    if det.selected_iteration_ is not None:  # model selection on held-out rows (never the test)
        metrics["selected_iteration"] = det.selected_iteration_
        metrics["validation_AUROC"] = det.validation_auroc_
    if dataset == "eight-gaussians":
        normal = split.test[split.test_label == 0]
        metrics["SW"] = sliced_wasserstein(det.sample(len(normal), random_state=0), normal)
    return metrics


# ---------------------------------------------------------------------- commands
@_console_warnings
def train(
    dataset: Annotated[str, typer.Option(help="textures | mvtec | folder | features | digits | mnist | eight-gaussians | wbc | wine | csv:PATH")] = DEFAULT_DATASET,
    data_root: Annotated[Path | None, typer.Option(help="image datasets: dataset root (textures: cache folder)")] = None,
    category: Annotated[str, typer.Option(help="mvtec/textures: comma-separated categories, or all")] = "all",
    normal_class: Annotated[int, typer.Option(min=-1, max=9, help="digits / mnist: the class taken as normal (0-9; pixel mode: -1 = "
                                                   "all classes, generation only)")] = 0,
    mode: Annotated[Mode, typer.Option(help="auto or vector (DxMI on vectors: table rows, or per-location "
                                           "pretrained features of image datasets) | pixel "
                                           "(DxMI on raw pixels: U-Net sampler + ResNet energy, images up to 64x64)")] = Mode.auto,
    init_sampler: Annotated[Path | None, typer.Option(help="pixel mode: start DxMI from this `dxmi-ad pretrain-sampler` "
                                                           "run (skips DDPM pre-training; its network shape is used)")] = None,
    recipe: Annotated[Path | None, typer.Option(help="YAML recipe or a bundled recipe's name (vector: DxMIDetector "
                                                     "parameters; image: features + model) [default: the dataset's; "
                                                     "csv: tables_low_dim for 2-3 feature columns, tables otherwise]")] = None,
    out: Annotated[Path | None, typer.Option(help="run directory (default runs/<dataset>-<time>)")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override a recipe key: KEY=VALUE")] = None,
    seed: Annotated[int, typer.Option(help="random seed (fixes results on the CPU)")] = 0,
    skip_bad_files: Annotated[bool, typer.Option(help="leave unreadable training images out instead of stopping")] = False,
    pretrained: Annotated[bool, typer.Option(help="ImageNet backbone weights; --no-pretrained = random weights")] = True,
    weights: Annotated[Path | None, typer.Option(help="backbone weights file (state dict)")] = None,
    backbone: Annotated[str | None, typer.Option(help="timm backbone name (default from the recipe)")] = None,
    trust_pickle: Annotated[bool, typer.Option(help="features: allow unpickling the authors' .pth/.pkl files "
                                                    "(can run arbitrary code; only for trusted files)")] = False,
    calibration_fraction: Annotated[float | None, typer.Option(
        min=0.0, max=0.9, help="fraction of the normal training data held out to calibrate decisions [default: 0.2]")] = None,
    calibration_dir: Annotated[Path | None, typer.Option(help="image datasets: folder of held-out normal images to "
                                                              "calibrate on (instead of a training split)")] = None,
    fpr: Annotated[float | None, typer.Option(callback=_rate_option,
                                              help="target false-positive rate of the decision threshold "
                                                   "[default: 0.01, or the smallest the calibration set supports]")] = None,
    fdr: Annotated[float | None, typer.Option(callback=_rate_option, help="decide by Benjamini-Hochberg at this "
                                                                          "false discovery rate, in (0, 1)")] = None,
    validation_dir: Annotated[Path | None, typer.Option(help="image datasets: labelled folder (good/, <defect>/) "
                                                             "for an F1-optimal threshold")] = None,
    accelerator: Annotated[Accelerator | None, typer.Option(help="Lightning Fabric accelerator")] = None,
    devices: Annotated[int | None, typer.Option(min=1, help="devices per node (data-parallel DxMI above 1)")] = None,
    num_nodes: Annotated[int | None, typer.Option(min=1, help="nodes (launch with torchrun on each)")] = None,
    strategy: Annotated[Strategy | None, typer.Option(help="data-parallel strategy")] = None,
    precision: Annotated[Precision | None, typer.Option(
        help="numeric precision of the DxMI stage (16-mixed is not offered: fp16 needs loss scaling across the "
             "energy, value and sampler optimizers; use bf16-mixed)")] = None,
    checkpoint_every: Annotated[int | None, typer.Option(min=0, help="DxMI iterations between checkpoints (written to "
                                                              "OUT.checkpoints/ while training)")] = None,
    keep_checkpoints: Annotated[int | None, typer.Option(min=1, help="newest checkpoints kept [default: 3]")] = None,
    resume: Annotated[Path | None, typer.Option(help="continue an interrupted run (its --out) from its newest "
                                                     "complete checkpoint, with the settings it started with")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing run directory")] = False,
    dry_run: Annotated[bool, typer.Option(help="print the resolved recipe and exit")] = False,
    id_column: Annotated[str | None, typer.Option(help="csv: an identifier column (text), kept out of the features "
                                                       "(`score --id-column` passes it to the scores)")] = None,
) -> None:
    """Train a DxMI detector, calibrate its decisions on held-out normal data, report AUROC on the test split.

    With no arguments: the embedded textures (real CC0 photos with SYNTHETIC defects), one model for all three.
    """
    opts = TrainOptions(
        dataset=dataset, data_root=data_root, category=category, normal_class=normal_class, mode=mode.value,
        init_sampler=init_sampler, recipe=recipe, out=out, set_=set_, seed=seed, skip_bad_files=skip_bad_files,
        pretrained=pretrained, weights=weights, backbone=backbone, trust_pickle=trust_pickle,
        calibration_fraction=calibration_fraction, calibration_dir=calibration_dir, fpr=fpr, fdr=fdr,
        validation_dir=validation_dir, accelerator=accelerator.value if accelerator else None, devices=devices,
        num_nodes=num_nodes, strategy=strategy.value if strategy else None,
        precision=precision.value if precision else None, checkpoint_every=checkpoint_every,
        keep_checkpoints=keep_checkpoints, resume=resume, overwrite=overwrite, dry_run=dry_run, id_column=id_column)
    try:
        if resume is not None:
            opts = _resume_args(resume, opts)
        elif opts.out is None:
            stem = opts.dataset.replace(":", "_").replace("/", "_")
            opts = opts.replace(out=Path("runs") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}")
        check_one_rule(opts.fpr, opts.fdr)
        if opts.id_column is not None and not opts.dataset.startswith("csv:"):
            raise CLIError(f"--id-column is for csv:PATH tables; {opts.dataset} has no identifier column")
    except (CLIError, ValueError) as err:
        raise _fail(str(err)) from None
    if opts.mode == Mode.pixel.value:
        _train_pixel(opts)
        return
    if opts.init_sampler is not None:
        raise _fail("--init-sampler is for --mode pixel")
    if opts.dataset in IMAGE_DATASETS:
        _train_images(opts)
        return
    _train_vectors(opts)


PIXEL_SIZES = {"digits": 8, "mnist": 28}  # image sides of the built-in pixel datasets without an image_size


def _train_pixel(opts: TrainOptions, pretrain_only: bool = False) -> None:
    from dxmi_ad.calibration import CalibrationError
    from dxmi_ad.cli.pixel import PixelCLIError, check_pixel_dataset, load_pixel_recipe, train_pixel

    try:
        check_pixel_dataset(opts.dataset)  # before the recipe: a dry run refuses what the real run would
        for key in ("calibration_dir", "validation_dir", "weights", "backbone"):
            if getattr(opts, key) is not None:
                raise CLIError(f"--{key.replace('_', '-')} does not apply to pixel mode")
        recipe = load_pixel_recipe(opts.recipe, opts.dataset, _parse_sets(opts.sets),
                                   opts.normal_class)
        from dxmi_ad.config import DxMIConfig
        from dxmi_ad.pixel import PIXEL_DEFAULTS, pixel_config

        base = load_pixel_recipe(opts.recipe, opts.dataset, {}, opts.normal_class)["model"]
        sets = {k.removeprefix("model."): v for k, v in _parse_sets(opts.sets).items()}
        recipe["model"].update(_scaled_schedule({**DxMIConfig().to_dict(), **PIXEL_DEFAULTS, **base}, sets))
        model = dict(recipe["model"])  # the config's ranges and cross-field rules, checked as the real run will
        size = model.pop("image_size", PIXEL_SIZES.get(opts.dataset, 64))  # digits / mnist: the data's own size
        if isinstance(size, bool) or not isinstance(size, int):
            raise CLIError(f"image_size must be a whole number of pixels, got {size!r}")
        pixel_config(model.pop("image_channels", 1), size, **model)
        if not _prepare_run(opts, recipe):
            return
        explicit = set(_parse_sets(opts.sets)) | (set(recipe["model"]) if opts.recipe else set())
        with _Progress() as progress:
            metrics = train_pixel(opts, recipe, explicit, console, progress, pretrain_only)
    except (CLIError, PixelCLIError, CalibrationError, FileNotFoundError, ModuleNotFoundError, ValueError,
            TypeError, FloatingPointError) as err:
        raise _fail(str(err)) from None
    if not metrics:
        return
    table = Table(title=f"DxMI pixel mode on {metrics['dataset']}")
    for col in ("metric", "value"):
        table.add_column(col)
    for key in ("image_AUROC", "pixel_AUROC", "FPR", "TPR", "n_train", "n_test", "n_test_anomalous", "train_seconds"):
        if metrics.get(key) is not None:
            v = metrics[key]
            table.add_row(key, f"{v:.4f}" if isinstance(v, float) and key != "train_seconds" else str(v))
    console.print(table)
    if metrics.get("note"):
        console.print(metrics["note"])
    console.print(f"run directory: {opts.out} (samples.png: 64 generated images)")


@_console_warnings
def pretrain_sampler(
    dataset: Annotated[str, typer.Option(help="digits | mnist | textures | mvtec | folder")] = "digits",
    normal_class: Annotated[int, typer.Option(min=-1, max=9, help="digits / mnist: class to learn (0-9), -1 = all")] = -1,
    data_root: Annotated[Path | None, typer.Option(help="image-folder datasets: dataset root")] = None,
    category: Annotated[str, typer.Option(help="mvtec/textures: categories, or all")] = "all",
    recipe: Annotated[Path | None, typer.Option(help="pixel recipe YAML (default: recipes/pixel_<dataset>.yaml for "
                                                     "all classes, pixel_<dataset>_ad.yaml for one)")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override a recipe key: KEY=VALUE")] = None,
    out: Annotated[Path | None, typer.Option(help="run directory (default runs/pretrain-<dataset>-<time>)")] = None,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    overwrite: Annotated[bool, typer.Option(help="replace an existing run directory")] = False,
) -> None:
    """DDPM pre-training of a pixel-mode sampler (the paper's starting point); then `dxmi-ad train --mode pixel
    --init-sampler OUT` fine-tunes it with DxMI (any number of steps T: the network is re-scheduled).
    """
    stem = f"pretrain-{dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
    opts = TrainOptions(dataset=dataset, normal_class=normal_class, data_root=data_root, category=category,
                        recipe=recipe, set_=set_, out=out or Path("runs") / stem, seed=seed, overwrite=overwrite,
                        mode=Mode.pixel.value)
    _train_pixel(opts, pretrain_only=True)


def checkpoint_dir(out: Path) -> Path:
    """Where a run writes its checkpoints while it trains: ``OUT.checkpoints`` beside ``OUT``."""
    return out.parent / f"{out.name}.checkpoints"


def _resume_args(run: Path, given: TrainOptions) -> TrainOptions:
    """The arguments an interrupted run started with (``RUN.checkpoints/run.json``), with ``resume`` set.

    Permissions are never read from ``run.json``: ``--trust-pickle`` and ``--overwrite`` come from this command
    line only (they may be given with ``--resume``); a ``trust_pickle: true`` in the file is ignored.

    Raises:
        CLIError: Nothing to resume; other (non-permission) options given with ``--resume`` (the run's own settings
            are used); an invalid ``run.json`` (named, with the field); a run directory ``RUN`` that already exists
            without ``--overwrite``.
    """
    extra = sorted(k for k in given.given() if k not in ("resume", *PERMISSIONS))
    if extra:
        flags = ", ".join("--" + k.rstrip("_").replace("_", "-") for k in extra)
        msg = f"--resume continues a run with the settings it started with; drop {flags}"
        raise CLIError(msg)
    ck = checkpoint_dir(run)
    if not (ck / "run.json").is_file():
        why = "it finished" if run.is_dir() else "it was not started with --checkpoint-every"
        msg = f"nothing to resume: {ck / 'run.json'} not found ({why}?)"
        raise CLIError(msg)
    try:
        record = json.loads((ck / "run.json").read_text(encoding="utf-8"))
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        msg = f"{ck / 'run.json'} is not valid JSON: {err}"
        raise CLIError(msg) from None
    recorded = TrainOptions.from_record(record, ck / "run.json")
    if run.exists() and not given.overwrite:
        msg = f"run directory {run} exists; pass --overwrite with --resume to replace it"
        raise CLIError(msg)
    # the run directory as given now (run.json may hold a path relative to another working directory); the
    # permissions as given now
    return recorded.replace(**{k: getattr(given, k) for k in PERMISSIONS}, out=run, resume=run, dry_run=False)


def _runtime(opts: TrainOptions, recipe_runtime: dict[str, Any] | None) -> dict[str, Any] | None:
    """Fabric runtime settings from the recipe's ``runtime:`` section and the flags (flags win), or None."""
    from dxmi_ad.training.runtime import Runtime

    merged = {**(recipe_runtime or {}), **opts.runtime_flags()}
    if not merged and opts.resume is None:
        return None
    unknown = sorted(set(merged) - set(RUNTIME_KEYS))
    if unknown:
        msg = f"unknown runtime key(s) {unknown}; known: {list(RUNTIME_KEYS)}"
        raise CLIError(msg)
    if merged.get("checkpoint_every") or opts.resume is not None:
        merged["checkpoint_dir"] = str(checkpoint_dir(opts.out))
    merged["resume"] = opts.resume is not None
    if merged["resume"]:
        from dxmi_ad.training.runtime import latest_checkpoint

        if latest_checkpoint(Path(merged["checkpoint_dir"])) is None:  # killed before its first checkpoint
            merged["resume"] = False
            err_console.print(f"info: {merged['checkpoint_dir']} holds no complete checkpoint yet (the run was "
                              "stopped before its first one): starting it again from the beginning with its "
                              "recorded settings", highlight=False, markup=False, soft_wrap=True)
    Runtime(**{**merged, "checkpoint_dir": None, "resume": False})  # validates values (clear errors)
    return merged


def _start_checkpoints(opts: TrainOptions, runtime: dict[str, Any] | None) -> None:
    """Record the run's arguments beside its checkpoints so that `--resume OUT` needs nothing else.

    What a killed run left in ``OUT.checkpoints`` decides (the same on every rank; only rank 0 writes):

    * nothing but ``run.json`` and temporary folders (killed before its first checkpoint): removed, the run starts
      again from the beginning;
    * complete checkpoints of the same command (the same recorded settings): the run continues from the newest
      (``runtime["resume"]`` is set), so the original command restarts a killed run;
    * checkpoints of other settings: refused with the exact command to continue it, unless ``--overwrite``.

    Raises:
        CLIError: Checkpoints of a run with other settings, without ``--overwrite``.
    """
    import shutil

    from dxmi_ad.checkpoint import atomic_write_text
    from dxmi_ad.training.runtime import is_global_zero, latest_checkpoint

    if runtime is None or runtime.get("checkpoint_dir") is None or runtime["resume"]:
        return
    ck = Path(runtime["checkpoint_dir"])
    writer = is_global_zero()
    if ck.exists() and any(ck.iterdir()):  # an interrupted run's checkpoints: never mix them with a new run's
        newest = latest_checkpoint(ck)
        leftovers = all(p.name == "run.json" or p.name.startswith(".") for p in ck.iterdir())
        try:
            recorded = json.loads((ck / "run.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            recorded = None
        if newest is None and leftovers:
            err_console.print(f"info: {ck} holds no complete checkpoint (a run stopped before its first one): "
                              "starting over", highlight=False, markup=False, soft_wrap=True)
            if writer:
                shutil.rmtree(ck)
        elif newest is not None and recorded == opts.record() and not opts.overwrite:
            runtime["resume"] = True
            err_console.print(f"info: continuing the interrupted run of this command from {newest} (pass "
                              "--overwrite to start over)", highlight=False, markup=False, soft_wrap=True)
            return
        elif not opts.overwrite:
            msg = (f"{ck} holds the checkpoints of an interrupted run with other settings: continue it with "
                   f"`dxmi-ad train --resume {opts.out}`, or pass --overwrite to start over")
            raise CLIError(msg)
        elif writer:
            shutil.rmtree(ck)
    if writer:
        atomic_write_text(ck / "run.json", json.dumps(opts.record(), indent=2))


def _train_vectors(opts: TrainOptions) -> None:
    from dxmi_ad.cli import images
    from dxmi_ad.training.runtime import is_global_zero

    dataset, seed, out = opts.dataset, opts.seed, opts.out
    try:
        table_recipe, n_features = _table_recipe(dataset, opts.id_column)
        if opts.recipe is None and table_recipe is not None:
            err_console.print(f"info: {n_features} feature columns: recipe tables_low_dim (an MLP energy on Fourier "
                              "features, as DxMIDetector() builds for 2-3 features; --recipe tables for the "
                              "autoencoder energy)", highlight=False, markup=False, soft_wrap=True)
        params = load_recipe(opts.recipe or table_recipe, dataset, opts.sets, n_features)
        params.setdefault("random_state", seed)
        if opts.calibration_dir is not None or opts.validation_dir is not None:
            msg = "--calibration-dir and --validation-dir are for image datasets; vector models hold out " \
                  "--calibration-fraction of the training rows (or use `dxmi-ad calibrate --calibration-csv`)"
            raise CLIError(msg)
        for key in ("calibration_fraction", "fpr", "fdr"):
            if getattr(opts, key) is not None:
                params[key] = getattr(opts, key)
        params["runtime"] = _runtime(opts, params.get("runtime"))
        from dxmi_ad.estimator import DxMIDetector

        DxMIDetector(**{k: v for k, v in params.items() if k != "runtime"})._validate_params()  # ranges, before work
        _check_dataset_name(dataset)  # a dry run must refuse what the real run would
        if opts.normal_class != 0 and dataset not in ("digits", "mnist"):
            err_console.print(f"warning: --normal-class is for digits / mnist; ignored for {dataset}",
                              highlight=False, markup=False, soft_wrap=True)
        if opts.dry_run:
            console.print_json(json.dumps(params, default=str))
            return
        split = load_dataset(dataset, opts.normal_class, seed, opts.id_column)
        if opts.resume is None:
            _check_out(out, opts.overwrite)
        _start_checkpoints(opts, params["runtime"])
    except (CLIError, ValueError) as err:
        raise _fail(str(err)) from None
    from dxmi_ad.estimator import DxMIDetector

    console.print(f"[bold]dxmi-ad train[/] dataset={split.name} train={split.train.shape} test={split.test.shape}")
    t0 = time.perf_counter()
    try:
        with _Progress() as progress:
            det = DxMIDetector(**{**params, "verbose": progress}).fit(_named(split, split.train))
    except (ValueError, FloatingPointError, FileNotFoundError) as err:
        raise _fail(f"training failed: {err}") from None
    seconds = time.perf_counter() - t0
    if not is_global_zero():  # data-parallel run: rank 0 writes the results
        return
    console.print(f"decisions: {det.calibration_.summary()}", highlight=False)
    metrics = _evaluate(det, split, dataset)
    metrics.update({"train_seconds": round(seconds, 2), "recipe": params})
    with atomic_directory(out) as tmp:  # a failed run never leaves a half-written run directory
        det.save(tmp)
        progress.write_logs(tmp)
        from dxmi_ad.metrics import dumps_json  # strict JSON: an undefined metric is null, never NaN

        (tmp / "metrics.json").write_text(dumps_json(metrics, indent=2), encoding="utf-8")
        images.keep_checkpoints(images.make_runtime(params), tmp)  # last: a failure above keeps them resumable
    table = Table(title=f"DxMI on {split.name}")
    for col in ("metric", "value"):
        table.add_column(col)
    for key in ("image_AUROC", "AUPR", "FPR", "TPR", "SW", "selected_iteration", "validation_AUROC", "n_train", "n_fit",
                "n_validation", "n_calibration", "n_test",
                "n_test_anomalous", "train_seconds"):
        if key in metrics:
            v = metrics[key]
            table.add_row(key, f"{v:.1f}" if key == "train_seconds" else f"{v:.4f}" if isinstance(v, float) else str(v))
    console.print(table)
    for line in _vector_metric_notes(metrics):
        console.print(line, highlight=False)
    console.print(f"run directory: {out}")


def _vector_metric_notes(metrics: dict[str, Any]) -> list[str]:
    """What the vector run's table rows mean, where the names alone mislead: ``image_AUROC`` is the AUROC over
    test rows (anomalib's key for a per-sample score), ``validation_AUROC`` is measured against SYNTHETIC anomalies,
    and ``selected_iteration`` 0 means the pre-trained start was kept.
    """
    notes = []
    if "n_fit" in metrics:
        cal = metrics.get("n_calibration", 0)
        notes.append(f"n_train: every training row; the networks trained on n_fit = {metrics['n_fit']}, "
                     f"{metrics.get('n_validation', 0)} were held out to select the model and "
                     + (f"{cal} to calibrate the decision rule" if cal else
                        "none to calibrate the decision rule (it is calibrated on the training rows)"))
    if "image_AUROC" in metrics:
        notes.append("image_AUROC: AUROC of the energy over the test rows (normal vs anomalous; anomalib's key "
                     "for a per-sample score)")
    if "validation_AUROC" in metrics:
        notes.append("validation_AUROC: held-out normal training rows vs SYNTHETIC anomalies made from them "
                     "(features swapped between rows, rows moved away from the mean), measured every validate_every "
                     "iterations to choose the state kept; the test rows are never read for it")
        if metrics.get("selected_iteration") == 0:
            notes.append("selected_iteration 0: the pre-trained start's energy scored best on validation, so it "
                         "was kept (the DxMI iterations did not improve the energy for this data)")
    return notes


def _prepare_run(opts: TrainOptions, recipe: dict[str, Any]) -> bool:
    """Resolve the recipe's ``runtime`` section with the flags; print the recipe and return False for ``--dry-run``;
    else check ``--out`` and record the run for ``--resume`` (:func:`_start_checkpoints`) and return True.

    Raises:
        CLIError: A bad runtime section, an existing run directory, checkpoints of other settings.
    """
    recipe["runtime"] = _runtime(opts, recipe.get("runtime"))
    if opts.dry_run:
        console.print_json(json.dumps(recipe, default=str))
        return False
    if opts.resume is None:
        _check_out(opts.out, opts.overwrite)
    _start_checkpoints(opts, recipe["runtime"])
    return True


def _train_images(opts: TrainOptions) -> None:
    from dxmi_ad.cli import images
    from dxmi_ad.features.extractor import PretrainedWeightsError
    from dxmi_ad.image import BadFilesError

    try:
        recipe = images.load_image_recipe(opts.recipe, _parse_sets(opts.sets))
        from dxmi_ad.config import DxMIConfig

        base = images.load_image_recipe(opts.recipe, {})["model"]
        sets = {k.rpartition(".")[2]: v for k, v in _parse_sets(opts.sets).items()
                if k.rpartition(".")[0] in ("", "model")}
        recipe["model"].update(_scaled_schedule({**DxMIConfig().to_dict(), **base}, sets))
        if not _prepare_run(opts, recipe):
            return
        if opts.calibration_fraction is None:
            opts = opts.replace(calibration_fraction=0.2)
        with _Progress() as progress:
            images.train_images(opts, recipe, console, progress)
    except (CLIError, ImageCLIError, BadFilesError, PretrainedWeightsError, FileNotFoundError, ValueError,
            FloatingPointError) as err:
        raise _fail(str(err)) from None
