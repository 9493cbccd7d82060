"""The ``dxmi-ad`` command line: one Typer app; the commands live in one module per group.

* :mod:`dxmi_ad.cli.train`: ``train``, ``pretrain-sampler``;
* :mod:`dxmi_ad.cli.models`: ``sample``, ``extract-features``, ``evaluate``, ``calibrate``, ``export``, ``score``;
* :mod:`dxmi_ad.cli.common`: consoles, errors, progress, ``--threads``.
"""

from __future__ import annotations

from typing import Annotated

import typer

from dxmi_ad.cli import models
from dxmi_ad.cli import train as train_commands
from dxmi_ad.cli.common import _Progress, set_threads

__all__ = ["_Progress", "app", "main"]

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Anomaly detection with DxMI energy models.")
app.command("train")(train_commands.train)
app.command("pretrain-sampler")(train_commands.pretrain_sampler)
app.command("sample")(models.sample)
app.command("extract-features")(models.extract_features)
app.command("evaluate")(models.evaluate)
app.command("calibrate")(models.calibrate)
app.command("export")(models.export)
app.command("score")(models.score)


def _version(value: bool) -> None:
    if value:
        import dxmi_ad

        typer.echo(f"dxmi-ad {dxmi_ad.__version__}")
        raise typer.Exit


@app.callback()
def _options(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="print the version and exit")] = False,
    threads: Annotated[int | None, typer.Option(
        "--threads", min=1, envvar="DXMI_AD_THREADS",
        help="CPU threads for every command (torch.set_num_threads; give it before the command: dxmi-ad --threads 2 "
             "train ...); default: torch's choice, usually one per core")] = None,
) -> None:
    """Anomaly detection with DxMI energy models."""
    del version
    if threads is not None:
        set_threads(threads)


def main() -> None:
    """Console-script entry point.

    Help read through a pipe or a log (no terminal) is laid out 120 columns wide instead of rich's 80, so that the
    option table stays readable; Typer's ``TERMINAL_WIDTH`` (or ``COLUMNS``) still wins when set.
    """
    import os
    import sys

    import typer.rich_utils

    if typer.rich_utils.MAX_WIDTH is None and "COLUMNS" not in os.environ and not sys.stdout.isatty():
        typer.rich_utils.MAX_WIDTH = 120
    app()


if __name__ == "__main__":
    main()
