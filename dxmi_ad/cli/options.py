"""Typed options of the commands: the choices as Enums (checked by Typer at parse time) and :class:`TrainOptions`,
the one object a ``train`` / ``pretrain-sampler`` / ``extract-features`` invocation is carried by (no string-keyed
dicts), recorded in ``run.json`` so that ``--resume`` restarts a run with its own settings.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from enum import Enum
from pathlib import Path
from typing import Any

__all__ = ["PERMISSIONS", "RUNTIME_KEYS", "Accelerator", "ExportFormat", "InputDtype", "Mode", "OptionsError",
           "Precision", "Strategy", "TrainOptions", "check_one_rule"]


class OptionsError(ValueError):
    """Options that do not fit together, or an invalid recorded option (the message names it)."""


class Mode(str, Enum):
    """``--mode``: ``auto`` / ``vector`` (DxMI on vectors) or ``pixel`` (raw pixels).

    ``auto`` and ``vector`` are the same: table rows, or per-location pretrained feature vectors of image datasets
    (the ``mode`` that ``config.json`` records).
    """

    auto = "auto"
    vector = "vector"
    pixel = "pixel"


class Accelerator(str, Enum):
    """``--accelerator`` (Lightning Fabric)."""

    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"
    gpu = "gpu"
    mps = "mps"


class Strategy(str, Enum):
    """``--strategy`` (Lightning Fabric): data-parallel DxMI above one device."""

    auto = "auto"
    ddp = "ddp"
    ddp_spawn = "ddp_spawn"


class Precision(str, Enum):
    """``--precision`` (Lightning Fabric); fp16 is not offered (DxMI's one-step updates have no loss scaling)."""

    full = "32-true"
    bf16_mixed = "bf16-mixed"


class ExportFormat(str, Enum):
    """``dxmi-ad export --format``."""

    onnx = "onnx"
    torchscript = "torchscript"


class InputDtype(str, Enum):
    """``dxmi-ad export --input-dtype``: float32 in [0, 1] or uint8 in [0, 255]."""

    float32 = "float32"
    uint8 = "uint8"


_CHOICES: dict[str, type[Enum]] = {"mode": Mode, "accelerator": Accelerator, "strategy": Strategy,
                                   "precision": Precision}

RUNTIME_KEYS = ("accelerator", "devices", "num_nodes", "strategy", "precision", "checkpoint_every",
                "keep_checkpoints")
"""Options that go to the Fabric runtime (they override a recipe's ``runtime:`` section)."""

PERMISSIONS = ("trust_pickle", "overwrite")
"""Options that loosen a safety check: never read from a file (``run.json`` may come from anyone)."""

_NOT_RECORDED = ("resume", "dry_run", *PERMISSIONS)
_RANGES = {"fpr": (0.0, 1.0, False), "fdr": (0.0, 1.0, False), "calibration_fraction": (0.0, 0.9, True),
           "devices": (1, math.inf, True), "num_nodes": (1, math.inf, True), "checkpoint_every": (0, math.inf, True),
           "keep_checkpoints": (1, math.inf, True), "normal_class": (-1, 9, True)}


def check_one_rule(fpr: float | None, fdr: float | None) -> None:
    """Refuse ``--fpr`` together with ``--fdr`` (two decision rules).

    Raises:
        OptionsError: Both given.
    """
    if fpr is not None and fdr is not None:
        msg = "choose one decision rule: --fpr or --fdr"
        raise OptionsError(msg)


@dataclasses.dataclass(frozen=True)
class TrainOptions:
    """The options of one ``dxmi-ad train`` run (see ``dxmi-ad train --help`` for each); choices are plain strings
    (the values of :class:`Mode`, :class:`Accelerator`, :class:`Strategy`, :class:`Precision`).
    """

    dataset: str = "textures"
    data_root: Path | None = None
    category: str = "all"
    normal_class: int = 0
    mode: str = "auto"
    init_sampler: Path | None = None
    recipe: Path | None = None
    out: Path | None = None
    set_: list[str] | None = None
    seed: int = 0
    skip_bad_files: bool = False
    pretrained: bool = True
    weights: Path | None = None
    backbone: str | None = None
    trust_pickle: bool = False
    calibration_fraction: float | None = None
    calibration_dir: Path | None = None
    fpr: float | None = None
    fdr: float | None = None
    validation_dir: Path | None = None
    accelerator: str | None = None
    devices: int | None = None
    num_nodes: int | None = None
    strategy: str | None = None
    precision: str | None = None
    checkpoint_every: int | None = None
    keep_checkpoints: int | None = None
    resume: Path | None = None
    overwrite: bool = False
    dry_run: bool = False
    id_column: str | None = None

    def replace(self, **changes: Any) -> TrainOptions:
        """A copy with some options changed."""
        return dataclasses.replace(self, **changes)

    @property
    def sets(self) -> list[str]:
        """The ``--set KEY=VALUE`` items (empty list when none)."""
        return list(self.set_ or [])

    def runtime_flags(self) -> dict[str, Any]:
        """The Fabric options given on the command line (:data:`RUNTIME_KEYS`, None left out)."""
        return {k: getattr(self, k) for k in RUNTIME_KEYS if getattr(self, k) is not None}

    def given(self) -> list[str]:
        """Names of the options that differ from their defaults."""
        default = TrainOptions()
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) != getattr(default, f.name)]

    def record(self) -> dict[str, Any]:
        """The settings written to ``run.json``: JSON values; no permission, no ``resume`` / ``dry_run``."""
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self).items()
                if k not in _NOT_RECORDED}

    @classmethod
    def from_record(cls, record: Any, path: Path) -> TrainOptions:
        """Options from ``run.json`` (an untrusted file): every field's type, choice and range is checked;
        permissions and ``resume`` / ``dry_run`` are never taken from it.

        Raises:
            OptionsError: Not a JSON object, unknown fields, or a value of the wrong type, choice or range (the file
                and the field are named).
        """
        if not isinstance(record, dict):
            msg = f"{path} must hold a JSON object of train options, got a JSON {type(record).__name__}"
            raise OptionsError(msg)
        hints = typing.get_type_hints(cls)
        unknown = sorted(k for k in record if k not in hints)
        if unknown:
            msg = f"{path}: unknown field(s) {unknown}; it must hold the options of `dxmi-ad train`"
            raise OptionsError(msg)
        out: dict[str, Any] = {}
        for key, value in record.items():
            if key in _NOT_RECORDED:
                continue  # never honoured from a file
            out[key] = _checked_value(key, value, hints[key], path)
        return cls(**out)


def _checked_value(key: str, value: Any, hint: Any, path: Path) -> Any:
    """One recorded value, checked against its type hint, choices and range."""
    kinds = set(typing.get_args(hint)) if isinstance(hint, types.UnionType) else {hint}
    ok = (value is None and type(None) in kinds) or any(
        (kind is bool and isinstance(value, bool))
        or (kind is int and isinstance(value, int) and not isinstance(value, bool))
        or (kind is float and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value))
        or (kind in (str, Path) and isinstance(value, str) and (kind is str or value.strip() != ""))
        or (typing.get_origin(kind) is list and isinstance(value, list) and all(isinstance(v, str) for v in value))
        for kind in kinds)
    if not ok:
        names = " or ".join(sorted("null" if k is type(None) else "a list of strings" if typing.get_origin(k)
                                   is list else "a path" if k is Path else f"a {k.__name__}" for k in kinds))
        msg = f"{path}: field {key!r} must be {names}, got {value!r:.80}"
        raise OptionsError(msg)
    if key in _CHOICES and value is not None and value not in {c.value for c in _CHOICES[key]}:
        msg = f"{path}: field {key!r} must be one of {[c.value for c in _CHOICES[key]]}, got {value!r:.80}"
        raise OptionsError(msg)
    if key in _RANGES and value is not None:
        low, high, closed = _RANGES[key]
        if not ((low <= value <= high) if closed else (low < value < high)):
            msg = (f"{path}: field {key!r} must be in {'[' if closed else '('}{low:g}, {high:g}"
                   f"{']' if closed else ')'}, got {value!r}")
            raise OptionsError(msg)
    return Path(value) if Path in kinds and isinstance(value, str) else value
