"""Shared pieces of the ``dxmi-ad`` commands: consoles, errors, warnings, ``--set`` parsing, progress, threads.

Only the command layer prints; errors go to stderr with exit code 2 and no traceback.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import typer
import yaml
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(soft_wrap=True)  # long lines stay whole in logs and pipes (tables keep their layout)
err_console = Console(stderr=True, soft_wrap=True)

def _show_warning(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
    err_console.print(f"[yellow]warning:[/] {message}", highlight=False)


def _console_warnings(command: Any) -> Any:
    """Decorator: Python warnings raised by a command print as one yellow line on stderr (no source context)."""
    import functools
    import warnings

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from dxmi_ad.decision import CoarseRateWarning

        with warnings.catch_warnings():
            warnings.simplefilter("default")
            warnings.simplefilter("ignore", CoarseRateWarning)  # the commands print Calibration.summary() instead
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



def _parse_sets(sets: list[str]) -> dict[str, Any]:
    from dxmi_ad.checkpoint import safe_load_yaml

    out: dict[str, Any] = {}
    for item in sets:
        if "=" not in item:
            msg = f"--set expects KEY=VALUE, got {item!r}"
            raise CLIError(msg)
        key, value = item.split("=", 1)
        try:
            parsed = safe_load_yaml(value)  # plain values only: tags such as !!python/object are refused
        except yaml.YAMLError as err:
            reason = str(err).splitlines()[0]
            msg = (f"--set {key.strip()}: {value!r} is not a plain value (a number, true/false, a string or a "
                   f"[list]; YAML tags are refused): {reason}")
            raise CLIError(msg) from None
        out[key.strip()] = parsed
    return out




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
             "energy_saturation": "E/Emax", "value_loss": "V loss", "val_auroc": "validation AUROC",
             "unreadable": "unreadable"}

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
                self._stages[stage] = {"start": now, "bucket": 0.0, "printed": now}
                return
            self.console.print(f"stage {stage}: {total} {unit}", highlight=False, markup=False, soft_wrap=True)
            st = self._stages[stage] = {"start": self._last_event, "bucket": -1.0, "printed": self._last_event,
                                        "t1": now, "i1": float(i)}
        bucket = float(int(100.0 * i / total // self.percent_step)) if total else 0.0
        if bucket > st["bucket"] or i >= total or now - st["printed"] >= self.every_seconds:
            elapsed = now - st["start"]
            # the rate is measured from the stage's first reported step, so the set-up before it (model building,
            # the first batch, a resumed stage's checkpoint) does not inflate the estimate; unknown until then
            ran = i - st["i1"]
            if i >= total:
                remaining = "0:00:00"
            elif ran > 0 and total:
                remaining = self._clock((now - st["t1"]) * (total - i) / ran)
            else:
                remaining = "-:--:--"
            pct = f" ({100.0 * i / total:.0f}%)" if total else ""
            line = f"{stage} {i}/{total}{pct}" + (f"  {text}" if text else "")
            line += f"  elapsed {self._clock(elapsed)}  remaining {remaining}"
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
        ``stage``; not recorded in the training logs.
        """

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
        and, when tensorboard is installed, its TensorBoardLogger; returns the logger names used.
        """
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


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuse, before any training, an existing run directory (unless ``overwrite``), a file in its place, or a
    place where the run cannot be written: the results are written to a temporary folder beside ``out`` and renamed,
    so a folder is created there and removed again (the parent folders are created as the run would).
    """
    import shutil
    import tempfile

    if out.exists() and not out.is_dir():
        msg = f"--out {out} is an existing file, not a run directory"
        raise CLIError(msg)
    if out.exists() and not overwrite:
        msg = f"run directory {out} exists; choose another --out or pass --overwrite"
        raise CLIError(msg)
    parent = out.absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tempfile.mkdtemp(prefix=f".{out.name}.check.", dir=parent))
    except OSError as err:
        msg = f"--out {out}: the run cannot be written there ({err.strerror or err}); choose another --out"
        raise CLIError(msg) from None




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
