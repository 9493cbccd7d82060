"""Checkpoints as safetensors + JSON, written atomically. Never pickle: loading cannot run code.

A model directory holds ``model.safetensors`` (all tensors, flat ``group.name`` keys) and ``config.json`` (the
resolved config, fitted scalars, package versions). Files are written to a temporary name in the same folder,
flushed, fsync'ed and renamed, so a crash never leaves a half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

__all__ = [
    "CONFIG_FILE", "MODEL_FILE", "atomic_directory", "atomic_replace", "atomic_write_text", "check_model_meta",
    "load_model_dir", "read_yaml_mapping", "remove_stale_temporaries", "save_model_dir", "versions",
]

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def versions() -> dict[str, str]:
    """Versions of the packages that produced a checkpoint."""
    from dxmi_ad import __version__

    return {"dxmi_ad": __version__, "torch": torch.__version__}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_replace(path: Path, write: Any) -> None:
    """Create ``path`` atomically: ``write(tmp_path)`` fills a temp file in the same folder, then fsync and rename.

    Raises:
        Whatever ``write`` raises; the temp file is removed and ``path`` is left untouched.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write a text file atomically (temp file in the same folder, fsync, rename).

    Args:
        path: Destination path; parent folders are created.
        text: UTF-8 content.
    """
    atomic_replace(Path(path), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def save_model_dir(directory: str | os.PathLike[str], tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write ``model.safetensors`` and ``config.json`` into ``directory`` atomically (tensors first).

    Args:
        directory: Target folder (created if missing).
        tensors: Flat mapping of names to tensors (made contiguous, moved to the CPU).
        meta: JSON-serialisable metadata; ``versions`` is added.

    Raises:
        TypeError: If ``meta`` is not JSON-serialisable.
    """
    directory = Path(directory)
    payload = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    from dxmi_ad.metrics import dumps_json  # strict JSON: a NaN loss in the history is written as null

    text = dumps_json({**meta, "versions": versions()}, indent=2, sort_keys=True)
    atomic_replace(directory / MODEL_FILE, lambda tmp: save_file(payload, tmp))
    atomic_write_text(directory / CONFIG_FILE, text)


def load_model_dir(directory: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a model directory written by :func:`save_model_dir`.

    Args:
        directory: The folder.

    Returns:
        ``(tensors, meta)``.

    Raises:
        FileNotFoundError: If the folder or one of its two files is missing (the message names it).
        ValueError: If ``config.json`` is not valid JSON, not a JSON object, or holds an invalid ``config`` /
            ``features`` section (see :func:`check_model_meta`; the message names the file and the field), or the
            tensor file is corrupt.
    """
    directory = Path(directory)
    for name in (MODEL_FILE, CONFIG_FILE):
        if not (directory / name).is_file():
            msg = f"{directory / name} not found: a model directory holds {MODEL_FILE} and {CONFIG_FILE}"
            raise FileNotFoundError(msg)
    try:
        meta = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        msg = f"{directory / CONFIG_FILE} is not valid JSON: {err}"
        raise ValueError(msg) from err
    check_model_meta(meta, directory / CONFIG_FILE)
    try:
        tensors = load_file(directory / MODEL_FILE)
    except Exception as err:  # safetensors raises its own error types
        msg = f"{directory / MODEL_FILE} is not a valid safetensors file: {err}"
        raise ValueError(msg) from err
    return tensors, meta


# kinds of model description whose ``config`` section is a DxMIConfig (and image models: a ``features`` section)
_CONFIG_KINDS = ("ImageDetector", "PixelDetector", "DxMIDetector", "PyODDxMIDetector", "DxMITrainingCheckpoint")


def check_model_meta(meta: Any, path: str | os.PathLike[str]) -> None:
    """Validate a model description read from a run directory before anything is built from it.

    Values read from a file are untrusted: a tampered or damaged ``config.json`` must give one clear error naming the
    file and the field, never a traceback from deep inside torch or timm, nor a silently wrong model.

    Args:
        meta: The parsed JSON.
        path: The file it came from (named in errors).

    Raises:
        ValueError: ``meta`` is not a JSON object; a model kind without its ``config`` object; an invalid
            ``config`` (any :class:`~dxmi_ad.config.DxMIConfig` field: type, range, finiteness) or ``features``
            section (backbone name, stages, image size, pretrained, weights path); the message names ``path``.
    """
    if not isinstance(meta, dict):
        msg = f"{path} must hold a JSON object (a model description), got a JSON {type(meta).__name__}"
        raise ValueError(msg)
    kind = meta.get("kind")
    if kind is not None and not isinstance(kind, str):
        msg = f"{path}: field 'kind' must be a string, got {kind!r}"
        raise ValueError(msg)
    if kind in _CONFIG_KINDS or "config" in meta:
        from dxmi_ad.config import DxMIConfig

        config = meta.get("config")
        if not isinstance(config, dict):
            msg = f"{path}: field 'config' must be a JSON object of model settings, got {config!r:.80}"
            raise ValueError(msg)
        try:
            DxMIConfig.from_dict(config)
        except (TypeError, ValueError) as err:
            msg = f"{path}: field 'config': {err}"
            raise ValueError(msg) from err
    if kind == "ImageDetector" or "features" in meta:
        from dxmi_ad.features.extractor import check_feature_settings

        feats = meta.get("features")
        if not isinstance(feats, dict):
            msg = f"{path}: field 'features' must be a JSON object of feature settings, got {feats!r:.80}"
            raise ValueError(msg)
        try:
            check_feature_settings(feats)
        except ValueError as err:
            msg = f"{path}: {err}"
            raise ValueError(msg) from err
    for key in ("history", "categories"):
        if key in meta and not isinstance(meta[key], list):
            msg = f"{path}: field {key!r} must be a JSON list, got {meta[key]!r:.80}"
            raise ValueError(msg)


def remove_stale_temporaries(directory: str | os.PathLike[str], final_name: str) -> list[Path]:
    r"""Remove the temporary folders that killed writers left in ``directory`` for final names matching
    ``final_name`` (a regular expression; the folders :func:`atomic_directory` makes: ``.<final>.[old.]pid<N>.<8>``).

    The temporary name carries the writer's process id: a folder of a live process on this machine is kept (a
    concurrent writer); one of a dead process, or without a process id (older versions), is removed. A backup
    (``.old.``) of a final folder that no longer exists is the only copy of the previous result (the writer died
    between moving it aside and renaming its replacement into place): it is renamed back, not removed.

    Args:
        directory: The folder to clean.
        final_name: Regular expression of the final folder names (e.g. ``re.escape("run")`` or ``r"iter-\\d{8}"``).

    Returns:
        The removed paths.
    """
    removed: list[Path] = []
    directory = Path(directory)
    if not directory.is_dir():
        return removed
    pattern = re.compile(rf"^\.(?:{final_name})\.(?:old\.)?(?:pid(\d+)\.)?[a-z0-9_]{{8}}$")
    for p in directory.iterdir():
        m = pattern.match(p.name)
        if m is None or not p.is_dir():
            continue
        if m.group(1) is not None and _alive(int(m.group(1))):
            continue
        final = directory / re.sub(r"\.(?:old\.)?(?:pid\d+\.)?[a-z0-9_]{8}$", "", p.name[1:])
        if ".old." in p.name and not final.exists():
            p.rename(final)  # the previous result, moved aside by a writer killed before its replacement landed
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def _alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists, owned by another user
        return True
    return True


@contextlib.contextmanager
def atomic_directory(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Build a folder under a temporary sibling name and rename it to ``final`` only if the block succeeds.

    An existing ``final`` is replaced at the end; on an exception the temporary folder is removed and ``final`` is
    left as it was, so a failed run never leaves a half-written result in place. The temporary name holds this
    process id; temporary folders of ``final`` left by killed processes are removed first
    (:func:`remove_stale_temporaries`).

    Yields:
        The temporary folder to write into.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(final.parent, re.escape(final.name))  # left by a killed earlier attempt
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.pid{os.getpid()}.", dir=final.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; a run directory gets the usual permissions
    try:
        yield tmp
        if final.exists():  # keep the old result until the new one is in place
            backup = Path(tempfile.mkdtemp(prefix=f".{final.name}.old.pid{os.getpid()}.", dir=final.parent))
            backup.rmdir()
            final.rename(backup)
            tmp.rename(final)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            tmp.rename(final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@functools.cache
def _yaml_loader() -> type:
    """A ``yaml.SafeLoader`` subclass that also resolves ``1e-5`` / ``1E+3`` as floats (built once)."""
    import yaml

    class _Loader(yaml.SafeLoader):
        pass

    _Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    _Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
        list("-+0123456789"))
    return _Loader


def safe_load_yaml(text: str) -> Any:
    """``yaml.safe_load`` that reads numbers as YAML 1.2 and JSON do.

    ``1e-5`` and ``1E+3`` are floats (PyYAML's YAML 1.1 resolver reads them as strings, so a recipe with
    ``energy_lr: 1e-5``, or the JSON that ``--dry-run`` prints, would not load). Plain values only: tags such as
    ``!!python/object`` are refused (a SafeLoader subclass constructs no objects).

    Args:
        text: YAML (or JSON) text.

    Returns:
        The parsed value (mapping, list, str, int, float, bool or None).

    Raises:
        yaml.YAMLError: Invalid YAML or a tag.
    """
    import yaml

    return yaml.load(text, Loader=_yaml_loader())


def read_yaml_mapping(path: str | os.PathLike[str], what: str = "recipe") -> dict[str, Any]:
    """Read a YAML file that must hold a mapping (recipes).

    Raises:
        FileNotFoundError: If the file is missing.
        ValueError: If it is not valid YAML or not a mapping (the message names the file).
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        msg = f"{what} {path} not found"
        raise FileNotFoundError(msg)
    try:
        data = safe_load_yaml(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        msg = f"{what} {path} is not valid YAML: {err}"
        raise ValueError(msg) from err
    if not isinstance(data, dict):
        msg = f"{what} {path} must be a mapping of key: value"
        raise ValueError(msg)
    return data
