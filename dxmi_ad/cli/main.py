"""The ``dxmi-ad`` command line: ``train`` and ``sample``.

Commands are thin: parse, build the estimator from a recipe, call the library, print a table. Only this layer
prints; errors go to stderr with a non-zero exit code and no traceback.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from dxmi_ad import recipes
from dxmi_ad.checkpoint import atomic_directory, read_yaml_mapping
from dxmi_ad.cli.images import IMAGE_DATASETS, ImageCLIError

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Anomaly detection with DxMI energy models.")
console = Console()
err_console = Console(stderr=True)

DATASETS = ("textures", "mvtec", "folder", "digits", "mnist", "eight-gaussians", "wbc", "wine", "csv:PATH")
DEFAULT_DATASET = "textures"


def _show_warning(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
    err_console.print(f"[yellow]warning:[/] {message}", highlight=False)


def _console_warnings(command: Any) -> Any:
    """Decorator: Python warnings raised by a command print as one yellow line on stderr (no source context)."""
    import functools
    import warnings

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            warnings.showwarning = _show_warning
            return command(*args, **kwargs)

    return wrapper


class CLIError(Exception):
    """A user-facing error: printed in one line to stderr, exit code 2."""


def _rate_option(value: float | None) -> float | None:
    """Typer callback of ``--fpr`` / ``--fdr``: a rate strictly between 0 and 1, refused at parse time (exit 2)."""
    if value is not None and not 0.0 < value < 1.0:  # also refuses NaN
        msg = f"{value:g} is not a rate strictly between 0 and 1 (e.g. 0.05)"
        raise typer.BadParameter(msg)
    return value


def _fail(message: str) -> typer.Exit:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(code=2)


# ---------------------------------------------------------------------- recipes
def _parse_sets(sets: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in sets:
        if "=" not in item:
            msg = f"--set expects KEY=VALUE, got {item!r}"
            raise CLIError(msg)
        key, value = item.split("=", 1)
        try:
            parsed = yaml.safe_load(value)  # plain values only: safe_load refuses tags such as !!python/object
        except yaml.YAMLError as err:
            reason = str(err).splitlines()[0]
            msg = (f"--set {key.strip()}: {value!r} is not a plain value (a number, true/false, a string or a "
                   f"[list]; YAML tags are refused): {reason}")
            raise CLIError(msg) from None
        if isinstance(parsed, str):  # YAML 1.1 reads 1e-5 as a string
            try:
                parsed = float(parsed) if any(c in parsed for c in ".eE") else int(parsed)
            except ValueError:
                pass
        out[key.strip()] = parsed
    return out


def load_recipe(path: Path | None, dataset: str, sets: list[str]) -> dict[str, Any]:
    """Read a recipe (YAML mapping of DxMIDetector parameters), defaulting to the dataset's bundled recipe.

    Raises:
        CLIError: If the file is missing, not a mapping, or names unknown parameters.
    """
    from dxmi_ad.estimator import DxMIDetector

    if path is None:
        stem = "eight_gaussians" if dataset == "eight-gaussians" else "digits"
        path = recipes.path(stem)
    try:
        path = recipes.resolve(path)
        recipe = read_yaml_mapping(path)
    except (FileNotFoundError, ValueError) as err:
        raise CLIError(str(err)) from err
    base = dict(recipe)
    overrides = _parse_sets(sets)
    recipe.update(overrides)
    known = set(DxMIDetector().get_params())
    unknown = sorted(set(recipe) - known)
    if unknown:
        msg = f"unknown recipe key(s) {unknown} in {path} / --set; known: {sorted(known)}"
        raise CLIError(msg)
    recipe.update(_scaled_schedule({**DxMIDetector().get_params(), **base}, overrides))
    try:  # every range checked before any data is read (scikit-learn's parameter constraints)
        DxMIDetector(**{k: v for k, v in recipe.items() if k != "runtime"})._validate_params()
    except (TypeError, ValueError) as err:
        msg = f"invalid recipe value in {path} / --set: {err}"
        raise CLIError(msg) from None
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


# ---------------------------------------------------------------------- data
def load_dataset(dataset: str, normal_class: int, seed: int) -> Any:
    """Return a :class:`~dxmi_ad.data.tabular.OneClassSplit` for a dataset name.

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
            X, label, _ = tabular.load_csv(dataset[4:])
        except (FileNotFoundError, ValueError) as err:
            raise CLIError(str(err)) from err
        if label is None:
            return tabular.OneClassSplit(X.astype("float32"), X[:0].astype("float32"), np.zeros(0, int), dataset)
        return tabular.split_labelled(X, label, 0.7, seed, dataset)
    msg = f"unknown dataset {dataset!r}; expected one of {', '.join(DATASETS)}"
    raise CLIError(msg)


# ---------------------------------------------------------------------- progress
class _Progress:
    """Training progress with live losses (stage, iteration, E(data), E(samples), value loss, sigma_t, elapsed,
    remaining), one task per stage; every reported record is kept and written by :meth:`write_logs` through
    Lightning's loggers (CSV, and TensorBoard when installed).

    On a terminal: rich progress bars. Off a terminal (a log file, CI, ``nohup``, a pipe; or a dumb terminal), where
    bars cannot redraw: plain lines, as Lightning prints when piped: one ``stage NAME: TOTAL steps`` line when a stage
    starts, then ``NAME i/total (p%)  losses  elapsed H:MM:SS  remaining H:MM:SS`` every ``percent_step`` percent, at
    least every ``every_seconds`` seconds while the stage runs, and at its end.

    Args:
        out: The console to draw on (default: the command's stdout console); ``out.is_terminal`` picks the mode.
        percent_step: Plain mode: a line every this many percent of a stage.
        every_seconds: Plain mode: a line at least this often (seconds) while a stage runs.
    """

    SHOWN = {"loss": "loss", "energy_data": "E(data)", "energy_samples": "E(samples)",
             "energy_saturation": "E/Emax", "value_loss": "V loss", "unreadable": "unreadable"}

    def __init__(self, out: Console | None = None, percent_step: float = 5.0, every_seconds: float = 30.0) -> None:
        self.console = out if out is not None else console
        self.plain = not self.console.is_terminal or self.console.is_dumb_terminal
        self.percent_step = float(percent_step)
        self.every_seconds = float(every_seconds)
        self.progress = None if self.plain else Progress(
            TextColumn("[bold]{task.description:<11}"), BarColumn(bar_width=20),
            TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(), TextColumn("eta"),
            TimeRemainingColumn(), TextColumn("{task.fields[metrics]}"),
            console=self.console, transient=False,
        )
        self.tasks: dict[str, Any] = {}
        self.records: list[tuple[str, int, dict[str, float]]] = []
        self._last_event = time.monotonic()
        self._stages: dict[str, dict[str, float]] = {}  # plain mode: start time, last printed bucket and time

    @classmethod
    def _text(cls, metrics: dict[str, Any]) -> str:
        text = "  ".join(f"{name}={metrics[k]:.4g}" for k, name in cls.SHOWN.items() if isinstance(metrics.get(k), float))
        sigma = metrics.get("sigma")
        if isinstance(sigma, list) and sigma:
            text += f"  sigma_t={sigma[0]:.3g}..{sigma[-1]:.3g}"
        return text

    @staticmethod
    def _clock(seconds: float) -> str:
        seconds = max(0, int(round(seconds)))
        return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"

    def _plain_line(self, stage: str, i: int, total: int, text: str) -> None:
        now = time.monotonic()
        st = self._stages.get(stage)
        if st is None:  # a new stage: it started when the previous event ended
            unit = "images" if stage.startswith(("features", "scoring")) else "steps"
            if stage == "resume":
                self.console.print(f"resume: continuing at iteration {i}/{total}", highlight=False, markup=False,
                                   soft_wrap=True)
                self._stages[stage] = {"start": now, "bucket": 0.0, "printed": now, "i0": float(i)}
                return
            self.console.print(f"stage {stage}: {total} {unit}", highlight=False, markup=False, soft_wrap=True)
            i0 = self._stages["resume"]["i0"] if stage == "dxmi" and "resume" in self._stages else 0.0
            st = self._stages[stage] = {"start": self._last_event, "bucket": -1.0, "printed": self._last_event,
                                        "i0": i0}
        bucket = float(int(100.0 * i / total // self.percent_step)) if total else 0.0
        if bucket > st["bucket"] or i >= total or now - st["printed"] >= self.every_seconds:
            elapsed = now - st["start"]
            ran = i - st["i0"]  # steps run in this process (a resumed stage starts at its checkpoint)
            remaining = elapsed * (total - i) / ran if ran > 0 and total else 0.0
            pct = f" ({100.0 * i / total:.0f}%)" if total else ""
            line = f"{stage} {i}/{total}{pct}" + (f"  {text}" if text else "")
            line += f"  elapsed {self._clock(elapsed)}  remaining {self._clock(remaining)}"
            self.console.print(line, highlight=False, markup=False, soft_wrap=True)
            st["bucket"], st["printed"] = bucket, now

    def __call__(self, stage: str, i: int, total: int, metrics: dict[str, Any]) -> None:
        text = self._text(metrics)
        if self.plain:
            self._plain_line(stage, i, total, text)
        else:
            if stage not in self.tasks:
                self.tasks[stage] = self.progress.add_task(stage, total=total, metrics="")
            self.progress.update(self.tasks[stage], completed=i, metrics=text)
        self._last_event = time.monotonic()
        flat: dict[str, float] = {}
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and k != "iteration":
                flat[f"{stage}/{k}"] = float(v)
            elif isinstance(v, list):
                flat.update({f"{stage}/{k}_{t}": float(x) for t, x in enumerate(v)})
        self.records.append((stage, i, flat))

    def batches(self, stage: str) -> Any:
        """An ``on_batch(done, total)`` callback (image scoring) that reports ``done`` of ``total`` images of
        ``stage``; not recorded in the training logs."""

        def on_batch(done: int, total: int) -> None:
            if self.plain:
                self._plain_line(stage, done, total, "")
            else:
                if stage not in self.tasks:
                    self.tasks[stage] = self.progress.add_task(stage, total=total, metrics="")
                self.progress.update(self.tasks[stage], completed=done)
            self._last_event = time.monotonic()

        return on_batch

    def write_logs(self, directory: Path) -> list[str]:
        """Write the training records under ``directory/logs`` with Lightning's CSVLogger (``logs/train/metrics.csv``)
        and, when tensorboard is installed, its TensorBoardLogger; returns the logger names used."""
        import importlib.util

        from lightning.fabric.loggers import CSVLogger, TensorBoardLogger

        loggers = [CSVLogger(root_dir=directory, name="logs", version="train")]
        if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
            loggers.append(TensorBoardLogger(root_dir=directory, name="logs", version="tensorboard"))
        offsets: dict[str, int] = {}
        step = 0
        for stage, i, flat in self.records:  # one global step axis across stages
            offsets.setdefault(stage, step)
            step = offsets[stage] + i
            for logger in loggers:
                logger.log_metrics(flat, step=step)
        for logger in loggers:
            logger.finalize("success")
        return [type(lg).__name__ for lg in loggers]

    def __enter__(self) -> _Progress:
        self._last_event = time.monotonic()
        if self.progress is not None:
            self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.__exit__(*exc)


def _evaluate(det: Any, split: Any, dataset: str) -> dict[str, Any]:
    from dxmi_ad.metrics import auroc, sliced_wasserstein

    metrics: dict[str, Any] = {"dataset": split.name, "n_train": int(len(split.train)), "n_test": int(len(split.test))}
    if len(split.test_label) and 0 < split.test_label.sum() < len(split.test_label):
        energy = det.energy(split.test)
        metrics["AUROC"] = auroc(energy[split.test_label == 0], energy[split.test_label == 1])
        metrics["n_test_anomalous"] = int(split.test_label.sum())
        flagged = det.predict(split.test) == -1  # the calibrated rule (FPR threshold or BH over the test set)
        metrics["FPR"] = float(flagged[split.test_label == 0].mean())
        metrics["TPR"] = float(flagged[split.test_label == 1].mean())
    if dataset == "eight-gaussians":
        normal = split.test[split.test_label == 0]
        metrics["SW"] = sliced_wasserstein(det.sample(len(normal), random_state=0), normal)
    return metrics


# ---------------------------------------------------------------------- commands
@app.command()
@_console_warnings
def train(
    dataset: Annotated[str, typer.Option(help="textures | mvtec | folder | features | digits | mnist | eight-gaussians | wbc | wine | csv:PATH")] = DEFAULT_DATASET,
    data_root: Annotated[Path | None, typer.Option(help="image datasets: dataset root (textures: cache folder)")] = None,
    category: Annotated[str, typer.Option(help="mvtec/textures: comma-separated categories, or all")] = "all",
    normal_class: Annotated[int, typer.Option(help="digits / mnist: the class taken as normal (0-9; pixel mode: -1 = "
                                                   "all classes, generation only)")] = 0,
    mode: Annotated[str, typer.Option(help="auto (image datasets: pretrained features; others: vectors) | pixel "
                                           "(DxMI on raw pixels: U-Net sampler + ResNet energy, images up to 64x64)")] = "auto",
    init_sampler: Annotated[Path | None, typer.Option(help="pixel mode: start DxMI from this `dxmi-ad pretrain-sampler` "
                                                           "run (skips DDPM pre-training; its network shape is used)")] = None,
    recipe: Annotated[Path | None, typer.Option(help="YAML recipe (vector: DxMIDetector parameters; image: features + model)")] = None,
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
    accelerator: Annotated[str | None, typer.Option(help="Lightning Fabric accelerator: auto | cpu | cuda")] = None,
    devices: Annotated[int | None, typer.Option(help="devices per node (data-parallel DxMI above 1)")] = None,
    num_nodes: Annotated[int | None, typer.Option(help="nodes (launch with torchrun on each)")] = None,
    strategy: Annotated[str | None, typer.Option(help="auto | ddp | ddp_spawn")] = None,
    precision: Annotated[str | None, typer.Option(help="32-true | bf16-mixed")] = None,
    checkpoint_every: Annotated[int | None, typer.Option(help="DxMI iterations between checkpoints (written to "
                                                              "OUT.checkpoints/ while training)")] = None,
    keep_checkpoints: Annotated[int | None, typer.Option(help="newest checkpoints kept [default: 3]")] = None,
    resume: Annotated[Path | None, typer.Option(help="continue an interrupted run (its --out) from its newest "
                                                     "complete checkpoint, with the settings it started with")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing run directory")] = False,
    dry_run: Annotated[bool, typer.Option(help="print the resolved recipe and exit")] = False,
) -> None:
    """Train a DxMI detector, calibrate its decisions on held-out normal data, report AUROC on the test split.

    With no arguments: the embedded textures (real CC0 photos with SYNTHETIC defects), one model for all three.
    """
    args = dict(locals())
    try:
        if resume is not None:
            args = _resume_args(resume, args)
        elif args["out"] is None:
            stem = args["dataset"].replace(":", "_").replace("/", "_")
            args["out"] = Path("runs") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    except (CLIError, ValueError) as err:
        raise _fail(str(err)) from None
    if args["mode"] not in ("auto", "pixel"):
        raise _fail(f"--mode must be auto or pixel, got {args['mode']!r}")
    if args["mode"] == "pixel":
        _train_pixel(args)
        return
    if args["init_sampler"] is not None:
        raise _fail("--init-sampler is for --mode pixel")
    if args["dataset"] in IMAGE_DATASETS:
        _train_images(args)
        return
    _train_vectors(args)


def _train_pixel(args: dict[str, Any], pretrain_only: bool = False) -> None:
    from dxmi_ad.calibration import CalibrationError
    from dxmi_ad.cli.pixel import PixelCLIError, load_pixel_recipe, train_pixel

    try:
        if args["fpr"] is not None and args["fdr"] is not None:
            raise CLIError("choose one decision rule: --fpr or --fdr")
        for key in ("calibration_dir", "validation_dir", "weights", "backbone"):
            if args.get(key) is not None:
                raise CLIError(f"--{key.replace('_', '-')} does not apply to pixel mode")
        recipe = load_pixel_recipe(args["recipe"], args["dataset"], _parse_sets(args["set_"] or []),
                                   args["normal_class"])
        from dxmi_ad.config import DxMIConfig
        from dxmi_ad.pixel import PIXEL_DEFAULTS

        base = load_pixel_recipe(args["recipe"], args["dataset"], {}, args["normal_class"])["model"]
        sets = {k.removeprefix("model."): v for k, v in _parse_sets(args["set_"] or []).items()}
        recipe["model"].update(_scaled_schedule({**DxMIConfig().to_dict(), **PIXEL_DEFAULTS, **base}, sets))
        recipe["runtime"] = _runtime(args, recipe.get("runtime"))
        if args["dry_run"]:
            console.print_json(json.dumps(recipe, default=str))
            return
        if args["resume"] is None:
            _check_out(args["out"], args["overwrite"])
        _start_checkpoints(args, recipe["runtime"])
        explicit = set(_parse_sets(args["set_"] or [])) | (set(recipe["model"]) if args["recipe"] else set())
        with _Progress() as progress:
            metrics = train_pixel({**args, "recipe": recipe, "explicit_keys": explicit}, console, progress,
                                  pretrain_only)
    except (CLIError, PixelCLIError, CalibrationError, FileNotFoundError, ModuleNotFoundError, ValueError,
            FloatingPointError) as err:
        raise _fail(str(err)) from None
    if not metrics:
        return
    table = Table(title=f"DxMI pixel mode on {metrics['dataset']}")
    for col in ("metric", "value"):
        table.add_column(col)
    for key in ("AUROC", "pixel_AUROC", "FPR", "TPR", "n_train", "n_test", "n_test_anomalous", "train_seconds"):
        if metrics.get(key) is not None:
            v = metrics[key]
            table.add_row(key, f"{v:.4f}" if isinstance(v, float) and key != "train_seconds" else str(v))
    console.print(table)
    if metrics.get("note"):
        console.print(metrics["note"])
    console.print(f"run directory: {args['out']} (samples.png: 64 generated images)")


@app.command("pretrain-sampler")
@_console_warnings
def pretrain_sampler(
    dataset: Annotated[str, typer.Option(help="digits | mnist | textures | mvtec | folder")] = "digits",
    normal_class: Annotated[int, typer.Option(help="digits / mnist: class to learn (0-9), -1 = all")] = -1,
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
    --init-sampler OUT` fine-tunes it with DxMI (any number of steps T: the network is re-scheduled)."""
    args = dict(locals())
    stem = f"pretrain-{dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
    args.update(out=out or Path("runs") / stem, fpr=None, fdr=None, calibration_fraction=None, resume=None,
                dry_run=False, calibration_dir=None, validation_dir=None, weights=None, backbone=None,
                **{k: None for k in RUNTIME_KEYS})
    _train_pixel(args, pretrain_only=True)


RUNTIME_KEYS = ("accelerator", "devices", "num_nodes", "strategy", "precision", "checkpoint_every",
                "keep_checkpoints")


def checkpoint_dir(out: Path) -> Path:
    """Where a run writes its checkpoints while it trains: ``OUT.checkpoints`` beside ``OUT``."""
    return out.parent / f"{out.name}.checkpoints"


# Options that loosen a safety check. They are never read from a file (run.json of a run folder may come from
# anyone): every permission comes from the command line of the current invocation.
PERMISSIONS = ("trust_pickle", "overwrite")
_NOT_RECORDED = ("resume", "dry_run", *PERMISSIONS)


def _check_run_record(record: Any, path: Path) -> dict[str, Any]:
    """Validate the settings of ``run.json`` (an untrusted file) against the ``train`` options.

    Returns:
        The recorded settings with paths as :class:`~pathlib.Path`; permission keys (``trust_pickle``,
        ``overwrite``) and ``resume`` / ``dry_run`` are dropped, whatever the file says.

    Raises:
        CLIError: Not a JSON object, unknown keys, or a value of the wrong type or out of range (names the field).
    """
    import math
    import types
    import typing

    if not isinstance(record, dict):
        msg = f"{path} must hold a JSON object of train options, got a JSON {type(record).__name__}"
        raise CLIError(msg)
    hints = typing.get_type_hints(train)
    unknown = sorted(k for k in record if k not in hints or k == "return")
    if unknown:
        msg = f"{path}: unknown field(s) {unknown}; it must hold the options of `dxmi-ad train`"
        raise CLIError(msg)
    out: dict[str, Any] = {}
    for key, value in record.items():
        if key in _NOT_RECORDED:
            continue  # never honoured from a file
        hint = hints[key]
        kinds = set(typing.get_args(hint)) if isinstance(hint, types.UnionType) else {hint}
        ok = (value is None and type(None) in kinds) or any(
            (kind is bool and isinstance(value, bool))
            or (kind is int and isinstance(value, int) and not isinstance(value, bool))
            or (kind is float and isinstance(value, (int, float)) and not isinstance(value, bool)
                and math.isfinite(value))
            or (kind in (str, Path) and isinstance(value, str) and (kind is str or value.strip() != ""))
            or (typing.get_origin(kind) is list and isinstance(value, list) and all(isinstance(v, str) for v in value))
            for kind in kinds)
        if not ok:
            names = " or ".join(sorted("null" if k is type(None) else "a list of strings" if typing.get_origin(k)
                                       is list else "a path" if k is Path else f"a {k.__name__}" for k in kinds))
            msg = f"{path}: field {key!r} must be {names}, got {value!r:.80}"
            raise CLIError(msg)
        out[key] = Path(value) if Path in kinds and isinstance(value, str) else value
    for key, low, high, closed in (("fpr", 0.0, 1.0, False), ("fdr", 0.0, 1.0, False),
                                   ("calibration_fraction", 0.0, 0.9, True)):
        v = out.get(key)
        if v is not None and not ((low <= v <= high) if closed else (low < v < high)):
            msg = f"{path}: field {key!r} must be in {'[' if closed else '('}{low:g}, {high:g}{']' if closed else ')'}, got {v!r}"
            raise CLIError(msg)
    return out


def _resume_args(run: Path, given: dict[str, Any]) -> dict[str, Any]:
    """The arguments an interrupted run started with (``RUN.checkpoints/run.json``), with ``resume`` set.

    Permissions are never read from ``run.json``: ``--trust-pickle`` and ``--overwrite`` come from this command
    line only (they may be given with ``--resume``); a ``trust_pickle: true`` in the file is ignored.

    Raises:
        CLIError: Nothing to resume; other (non-permission) options given with ``--resume`` (the run's own settings
            are used); an invalid ``run.json`` (named, with the field); a run directory ``RUN`` that already exists
            without ``--overwrite``.
    """
    import inspect

    defaults = {k: p.default for k, p in inspect.signature(train).parameters.items()}
    extra = sorted(k for k, v in given.items() if k not in ("resume", *PERMISSIONS) and v != defaults.get(k))
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
    args = {**defaults, **_check_run_record(record, ck / "run.json")}
    if run.exists() and not given.get("overwrite"):
        msg = f"run directory {run} exists; pass --overwrite with --resume to replace it"
        raise CLIError(msg)
    # the run directory as given now (run.json may hold a path relative to another working directory); the
    # permissions as given now
    return {**args, **{k: given.get(k, False) for k in PERMISSIONS}, "out": run, "resume": run, "dry_run": False}


def _runtime(args: dict[str, Any], recipe_runtime: dict[str, Any] | None) -> dict[str, Any] | None:
    """Fabric runtime settings from the recipe's ``runtime:`` section and the flags (flags win), or None."""
    from dxmi_ad.training.runtime import Runtime

    merged = {**(recipe_runtime or {}), **{k: args[k] for k in RUNTIME_KEYS if args.get(k) is not None}}
    if not merged and args.get("resume") is None:
        return None
    unknown = sorted(set(merged) - set(RUNTIME_KEYS))
    if unknown:
        msg = f"unknown runtime key(s) {unknown}; known: {list(RUNTIME_KEYS)}"
        raise CLIError(msg)
    if merged.get("checkpoint_every") or args.get("resume") is not None:
        merged["checkpoint_dir"] = str(checkpoint_dir(args["out"]))
    merged["resume"] = args.get("resume") is not None
    if merged["resume"]:
        from dxmi_ad.training.runtime import latest_checkpoint

        if latest_checkpoint(Path(merged["checkpoint_dir"])) is None:  # killed before its first checkpoint
            merged["resume"] = False
            err_console.print(f"info: {merged['checkpoint_dir']} holds no complete checkpoint yet (the run was "
                              "stopped before its first one): starting it again from the beginning with its "
                              "recorded settings", highlight=False, markup=False, soft_wrap=True)
    Runtime(**{**merged, "checkpoint_dir": None, "resume": False})  # validates values (clear errors)
    return merged


def _run_record(args: dict[str, Any]) -> dict[str, Any]:
    """The settings written to ``run.json``: no permission, no ``resume`` / ``dry_run`` (JSON values)."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in args.items() if k not in _NOT_RECORDED}


def _start_checkpoints(args: dict[str, Any], runtime: dict[str, Any] | None) -> None:
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
        elif newest is not None and recorded == _run_record(args) and not args.get("overwrite"):
            runtime["resume"] = True
            err_console.print(f"info: continuing the interrupted run of this command from {newest} (pass "
                              "--overwrite to start over)", highlight=False, markup=False, soft_wrap=True)
            return
        elif not args.get("overwrite"):
            msg = (f"{ck} holds the checkpoints of an interrupted run with other settings: continue it with "
                   f"`dxmi-ad train --resume {args['out']}`, or pass --overwrite to start over")
            raise CLIError(msg)
        elif writer:
            shutil.rmtree(ck)
    if writer:
        atomic_write_text(ck / "run.json", json.dumps(_run_record(args), indent=2))


def _train_vectors(args: dict[str, Any]) -> None:
    from dxmi_ad.cli import images
    from dxmi_ad.training.runtime import is_global_zero

    dataset, seed, out = args["dataset"], args["seed"], args["out"]
    try:
        params = load_recipe(args["recipe"], dataset, args["set_"] or [])
        params.setdefault("random_state", seed)
        if args["calibration_dir"] is not None or args["validation_dir"] is not None:
            msg = "--calibration-dir and --validation-dir are for image datasets; vector models hold out " \
                  "--calibration-fraction of the training rows (or use `dxmi-ad calibrate --calibration-csv`)"
            raise CLIError(msg)
        if args["fpr"] is not None and args["fdr"] is not None:
            raise CLIError("choose one decision rule: --fpr or --fdr")
        for key in ("calibration_fraction", "fpr", "fdr"):
            if args[key] is not None:
                params[key] = args[key]
        params["runtime"] = _runtime(args, params.get("runtime"))
        from dxmi_ad.estimator import DxMIDetector

        DxMIDetector(**{k: v for k, v in params.items() if k != "runtime"})._validate_params()  # ranges, before work
        if args["dry_run"]:
            console.print_json(json.dumps(params, default=str))
            return
        split = load_dataset(dataset, args["normal_class"], seed)
        if args["resume"] is None:
            _check_out(out, args["overwrite"])
        _start_checkpoints(args, params["runtime"])
    except (CLIError, ValueError) as err:
        raise _fail(str(err)) from None
    from dxmi_ad.estimator import DxMIDetector

    console.print(f"[bold]dxmi-ad train[/] dataset={split.name} train={split.train.shape} test={split.test.shape}")
    t0 = time.perf_counter()
    try:
        with _Progress() as progress:
            det = DxMIDetector(**{**params, "verbose": progress}).fit(split.train)
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
    for key in ("AUROC", "FPR", "TPR", "SW", "n_train", "n_test", "n_test_anomalous", "train_seconds"):
        if key in metrics:
            v = metrics[key]
            table.add_row(key, f"{v:.1f}" if key == "train_seconds" else f"{v:.4f}" if isinstance(v, float) else str(v))
    console.print(table)
    console.print(f"run directory: {out}")


@app.command()
@_console_warnings
def sample(
    model: Annotated[Path, typer.Option(help="run directory written by `dxmi-ad train` or `pretrain-sampler`")],
    n: Annotated[int, typer.Option("-n", "--n", help="number of samples", min=1)] = 1000,
    out: Annotated[Path | None, typer.Option(help="output file: .npy or .csv (vectors), .png (pixel models: a grid "
                                                  "plus .npy beside it) [default: samples.npy / samples.png]")] = None,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    steps_from_model: Annotated[bool, typer.Option("--steps-from-model", help="pixel models: the model's own T "
                                                   "steps and learned sigmas (the default unless --steps)")] = False,
    steps: Annotated[int | None, typer.Option(help="pixel models: re-schedule the sampler network to this many steps "
                                                   "with DDPM posterior sigmas (e.g. 1000: the many-step reference)")] = None,
    guidance: Annotated[float, typer.Option(help="pixel models: value guidance lambda >= 0 (x <- x - lambda sigma_t "
                                                 "dV/dx after each step; the paper's sign)", min=0.0)] = 0.0,
    start: Annotated[Path | None, typer.Option(help="feature-mode image models: folder of normal images whose "
                                                    "feature vectors start the chain (the sampler refines perturbed data)")] = None,
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
        try:
            png, npy = sample_pixel(det, n, out, steps, guidance, seed)
        except (ValueError, OSError) as err:
            raise _fail(f"sampling failed: {err}") from None
        used = (f"{steps} re-scheduled steps, DDPM posterior sigmas" if steps is not None
                else f"the model's T={det.config.n_steps} steps and learned sigmas")
        console.print(f"wrote {n} images ({used}, guidance {guidance:g}) to {png} and {npy}", highlight=False)
        return
    out = out or Path("samples.npy")
    if out.suffix not in (".npy", ".csv"):
        raise _fail(f"--out must end in .npy or .csv, got {out.name}")
    if steps is not None or guidance:
        raise _fail("--steps and --guidance are for pixel-mode models")
    if start is not None and not isinstance(det, ImageDetector):
        raise _fail("--start is for feature-mode image models (their sampler refines perturbed features)")
    if isinstance(det, ImageDetector):
        if start is None:
            raise _fail("a feature-mode image model samples feature vectors by refining perturbed training "
                        "features (docs/paper_map.md): pass --start DIR with normal images")
        xs = _sample_feature_vectors(det, start, n, seed)
    else:
        xs = det.sample(n, random_state=seed)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _fail(f"cannot write {out}: {err}") from None
    if out.suffix == ".npy":
        tmp = out.with_name(f".{out.name}.tmp.npy")
        np.save(tmp, xs)
        tmp.replace(out)
    else:
        header = ",".join(f"x{i}" for i in range(xs.shape[1]))
        lines = [header] + [",".join(f"{v:.7g}" for v in row) for row in xs]
        atomic_write_text(out, "\n".join(lines) + "\n")
    console.print(f"wrote {n} samples of dimension {xs.shape[1]} to {out}")
    if xs.shape[1] == 2:
        png = out.with_suffix(".png")
        _scatter_png(det, xs, png)
        console.print(f"wrote scatter plot over energy contours to {png}")


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
    model = det.model
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
    energy = det.energy(np.c_[gx.ravel(), gy.ravel()]).reshape(gx.shape)
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


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuse an existing run directory (unless ``overwrite``) or a file in its place, before any training."""
    if out.exists() and not out.is_dir():
        msg = f"--out {out} is an existing file, not a run directory"
        raise CLIError(msg)
    if out.exists() and not overwrite:
        msg = f"run directory {out} exists; choose another --out or pass --overwrite"
        raise CLIError(msg)


def _train_images(args: dict[str, Any]) -> None:
    from dxmi_ad.cli import images
    from dxmi_ad.features.extractor import PretrainedWeightsError
    from dxmi_ad.image import BadFilesError

    try:
        recipe = images.load_image_recipe(args["recipe"], _parse_sets(args["set_"] or []))
        from dxmi_ad.config import DxMIConfig

        base = images.load_image_recipe(args["recipe"], {})["model"]
        sets = {k.rpartition(".")[2]: v for k, v in _parse_sets(args["set_"] or []).items()
                if k.rpartition(".")[0] in ("", "model")}
        recipe["model"].update(_scaled_schedule({**DxMIConfig().to_dict(), **base}, sets))
        recipe["runtime"] = _runtime(args, recipe.get("runtime"))
        if args["dry_run"]:
            console.print_json(json.dumps(recipe, default=str))
            return
        out = args["out"]
        if args["resume"] is None:
            _check_out(out, args["overwrite"])
        _start_checkpoints(args, recipe["runtime"])
        if args["calibration_fraction"] is None:
            args = {**args, "calibration_fraction": 0.2}
        with _Progress() as progress:
            images.train_images({**args, "recipe": recipe, "out": out}, console, progress)
    except (CLIError, ImageCLIError, BadFilesError, PretrainedWeightsError, FileNotFoundError, ValueError,
            FloatingPointError) as err:
        raise _fail(str(err)) from None


@app.command("extract-features")
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
        params = {"recipe": images.load_image_recipe(recipe, {}), "dataset": dataset, "data_root": data_root,
                  "category": category, "skip_bad_files": skip_bad_files, "pretrained": pretrained,
                  "weights": weights, "backbone": backbone, "out": out}
        with _Progress() as progress:
            images.extract_features(params, console, progress)
    except (CLIError, ImageCLIError, BadFilesError, PretrainedWeightsError, FileNotFoundError, ValueError) as err:
        raise _fail(str(err)) from None


def _load_image_model(model: Path) -> Any:
    from dxmi_ad.checkpoint import CONFIG_FILE
    from dxmi_ad.image import ImageDetector

    try:
        kind = json.loads((model / CONFIG_FILE).read_text(encoding="utf-8")).get("kind")
    except (OSError, ValueError, AttributeError):
        kind = None
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


@app.command()
@_console_warnings
def evaluate(
    model: Annotated[Path, typer.Option(help="run directory of an image model")],
    dataset: Annotated[str | None, typer.Option(help="textures | mvtec | folder (default: the training dataset)")] = None,
    data_root: Annotated[Path | None, typer.Option(help="dataset root")] = None,
    category: Annotated[str | None, typer.Option(help="categories, or all")] = None,
    out: Annotated[Path | None, typer.Option(help="where to write metrics, plots and report.html (default: --model)")] = None,
) -> None:
    """Per-category image AUROC, pixel AUROC, AUPRO and F1-max, plus the mean; plots and report.html."""
    from dxmi_ad.checkpoint import load_model_dir
    from dxmi_ad.cli import images

    target = out or model
    if target.exists() and not target.is_dir():
        raise _fail(f"--out {target} is an existing file; give a folder for metrics.json, the plots and report.html")
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


@app.command()
@_console_warnings
def calibrate(
    model: Annotated[Path, typer.Option(help="run directory written by `dxmi-ad train`")],
    calibration_dir: Annotated[Path | None, typer.Option(help="image model: folder of held-out normal images "
                                                              "(default: keep the stored calibration scores)")] = None,
    calibration_csv: Annotated[Path | None, typer.Option(help="vector model: CSV of held-out normal rows")] = None,
    fpr: Annotated[float | None, typer.Option(callback=_rate_option, help="target false-positive rate, in (0, 1)")] = None,
    fdr: Annotated[float | None, typer.Option(callback=_rate_option,
                                              help="Benjamini-Hochberg at this false discovery rate, in (0, 1)")] = None,
    validation_dir: Annotated[Path | None, typer.Option(help="image model: labelled folder (good/, <defect>/) "
                                                             "for an F1-optimal threshold")] = None,
    skip_bad_files: Annotated[bool, typer.Option(help="leave unreadable calibration images out")] = False,
) -> None:
    """Re-calibrate a trained model's decisions without retraining; rewrites RUN_DIR/calibration.json atomically."""
    import dxmi_ad
    from dxmi_ad.calibration import CalibrationError
    from dxmi_ad.cli import images
    from dxmi_ad.image import BadFilesError, ImageDetector

    from dxmi_ad.cli.pixel import PixelCLIError, calibrate_pixel
    from dxmi_ad.pixel import PixelDetector

    try:
        det = dxmi_ad.load(model)
        if isinstance(det, (ImageDetector, PixelDetector)):
            if calibration_csv is not None:
                raise CLIError("--calibration-csv is for vector models; pass --calibration-dir for an image model")
            calibration, validation = images.calibration_inputs(
                {"fpr": fpr, "fdr": fdr, "calibration_dir": calibration_dir, "validation_dir": validation_dir,
                 "calibration_fraction": None})
            if isinstance(det, PixelDetector):
                cal = calibrate_pixel(det, calibration, validation, fpr, fdr, skip_bad_files)
            else:
                cal = det.calibrate(calibration or None, fpr=fpr, fdr=fdr, validation=validation,
                                    skip_bad_files=skip_bad_files)
        else:
            if calibration_dir is not None or validation_dir is not None:
                raise CLIError("this is a vector model: pass --calibration-csv (normal rows), not image folders")
            if fpr is not None and fdr is not None:
                raise CLIError("choose one decision rule: --fpr or --fdr")
            X = None
            if calibration_csv is not None:
                from dxmi_ad.data.tabular import load_csv

                X, label, _ = load_csv(calibration_csv)
                if label is not None:  # calibration rows must be normal: a label column is never a feature
                    if not (label == 0).any():
                        raise CLIError(f"{calibration_csv}: every row has label 1 (anomaly); calibration needs "
                                       "normal rows (label 0)")
                    if (label == 1).any():
                        err_console.print(f"[yellow]warning:[/] {calibration_csv}: calibrating on the "
                                          f"{int((label == 0).sum())} rows with label 0; {int(label.sum())} "
                                          "rows with label 1 (anomalies) left out", highlight=False)
                    X = X[label == 0]
            det.calibrate(X, fpr=fpr, fdr=fdr)
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


@app.command()
@_console_warnings
def export(
    model: Annotated[Path, typer.Option(help="run directory of an image model")],
    format_: Annotated[str, typer.Option("--format", help="onnx | torchscript")] = "onnx",
    out: Annotated[Path | None, typer.Option(help="output file (default RUN_DIR/model.onnx or model.pt)")] = None,
    input_dtype: Annotated[str, typer.Option(help="float32 (values in [0, 1]) | uint8 (values in [0, 255])")] = "float32",
    input_size: Annotated[tuple[int, int] | None, typer.Option(help="H W of the exported input (default: the "
                                                                    "model input size); the graph resizes")] = None,
) -> None:
    """Export the whole scorer (resize, backbone, energy head, map upsampling) with the threshold in its metadata.

    Input `images (B, 3, H, W)` RGB; outputs `pred_score (B,)` and `anomaly_map (B, H, W)`.
    """
    from dxmi_ad.export import FORMATS, export_model

    if format_ not in FORMATS:
        raise _fail(f"--format must be one of {', '.join(FORMATS)}, got {format_!r}")
    if input_dtype not in ("float32", "uint8"):
        raise _fail(f"--input-dtype must be float32 or uint8, got {input_dtype!r}")
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
    thr = det.calibration.decision_threshold if det.calibration is not None else None
    h, w = input_size or (det.features.image_size, det.features.image_size)
    origin = "" if input_size else " (the input size the model was trained at, from its config.json)"
    console.print(f"wrote {format_} scorer to {path}: input {input_dtype} (B, 3, {h}, {w}){origin}, outputs "
                  f"pred_score, anomaly_map" + (f"; threshold {thr:.6g} in its metadata" if thr is not None else
                                                "; no fixed threshold in its metadata (" +
                                                ("FDR rule: decide per batch" if det.calibration is not None else
                                                 "no decision rule: run `dxmi-ad calibrate` first") + ")"),
                  highlight=False)


@app.command()
@_console_warnings
def score(
    paths: Annotated[list[Path], typer.Argument(help="image files and/or folders (recursive)")],
    model: Annotated[Path, typer.Option(help="run directory of an image model")],
    out: Annotated[Path | None, typer.Option(help="CSV file (default: print to the terminal)")] = None,
    heatmaps: Annotated[Path | None, typer.Option(help="folder for heat-map overlay PNGs")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="images per batch (bounds memory)")] = 32,
) -> None:
    """Score images: one CSV row per file, then a summary line on stderr; exit 1 if a file failed.

    Columns: path, score (pred_score: max per-location energy, higher = more anomalous), threshold (from the
    model's calibration; empty when its rule is a false discovery rate, set with `dxmi-ad calibrate --fdr`),
    is_anomaly (the stored rule; for an FDR rule, Benjamini-Hochberg over all files of this call; empty without a
    rule or for a row with an error), p_value (split-conformal, against held-out normal images), normalized_score
    (0.5 = threshold), error (unreadable file, NaN / infinite pixels or score). Nothing to score (no supported image
    in the folders), --out a folder or --heatmaps a file: exit 2 before any image is read, no CSV written.
    """
    from dxmi_ad.cli import images
    from dxmi_ad.data.images import find_images

    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise _fail(f"not found: {', '.join(missing)}")
    try:  # everything that can be refused is refused before the model is loaded or any image is read
        images.check_score_outputs(out, heatmaps)
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


def set_threads(threads: int) -> None:
    """Use ``threads`` CPU threads: ``torch.set_num_threads`` (intra-op) and, when torch still allows it (before its
    first parallel work), ``torch.set_num_interop_threads``; ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` are set for
    child processes (data-parallel workers).

    Raises:
        ValueError: If ``threads < 1``.
    """
    import os

    import torch

    if threads < 1:
        msg = f"--threads must be >= 1, got {threads}"
        raise ValueError(msg)
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError:  # only settable once, before any inter-op parallel work; intra-op is what matters here
        pass
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)


@app.callback()
def _options(
    threads: Annotated[int | None, typer.Option(
        "--threads", min=1, envvar="DXMI_AD_THREADS",
        help="CPU threads for every command (torch.set_num_threads; give it before the command: dxmi-ad --threads 2 "
             "train ...); default: torch's choice, usually one per core")] = None,
) -> None:
    """Anomaly detection with DxMI energy models."""
    if threads is not None:
        set_threads(threads)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
