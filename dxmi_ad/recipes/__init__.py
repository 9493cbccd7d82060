"""Recipes shipped with the package: YAML parameter sets for each dataset and mode.

The files live inside the package (``dxmi_ad/recipes/*.yaml``) and are read through :mod:`importlib.resources`, so
they are found the same way from a source checkout, an editable install and a wheel. A recipe is named on the command
line either by its name (``--recipe mvtec``, the file ``mvtec.yaml`` here) or by a path to any YAML file.

Example:
    >>> from dxmi_ad import recipes
    >>> "textures" in recipes.names()
    True
    >>> recipes.path("textures").name
    'textures.yaml'
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

__all__ = ["detector_params", "names", "path", "resolve"]


def _folder() -> Path:
    return Path(str(resources.files(__name__)))


def names() -> list[str]:
    """Names of the shipped recipes (file stems), sorted."""
    return sorted(p.stem for p in _folder().glob("*.yaml"))


def path(name: str) -> Path:
    """Path of the shipped recipe ``name`` (with or without ``.yaml``).

    Raises:
        FileNotFoundError: If no shipped recipe has that name; the message lists the shipped names.
    """
    stem = name[:-5] if name.endswith(".yaml") else name
    found = _folder() / f"{stem}.yaml"
    if not found.is_file():
        msg = f"no shipped recipe named {name!r}; shipped recipes: {', '.join(names())} (or give a path to a YAML file)"
        raise FileNotFoundError(msg)
    return found


def resolve(name_or_path: str | Path) -> Path:
    """A recipe given on the command line: an existing file path, else a shipped recipe name.

    ``recipes/textures.yaml`` (the path the recipes had in the source tree before they moved into the package) is
    still accepted and means the shipped ``textures`` recipe when no such file exists.

    Raises:
        FileNotFoundError: If it is neither an existing file nor a shipped recipe name.
    """
    candidate = Path(name_or_path).expanduser()
    if candidate.is_file():
        return candidate
    if candidate.parent.name == "recipes" or candidate.parent == Path():
        try:
            return path(candidate.name)
        except FileNotFoundError:
            pass
    msg = (f"recipe {str(name_or_path)!r} not found: not a file, and not a shipped recipe name "
           f"({', '.join(names())})")
    raise FileNotFoundError(msg)


def detector_params(recipe: dict[str, Any], where: str = "recipe") -> dict[str, Any]:
    """Keyword arguments of :class:`~dxmi_ad.estimator.DxMIDetector` from a vector recipe mapping.

    Vector recipes take the layout of image and pixel ones: a ``model:`` section (its keys are lifted to the top) and
    an optional ``runtime:`` section, or the flat form. A key means the same in every mode: a
    :class:`~dxmi_ad.config.DxMIConfig` field that is not an estimator parameter (``sampler_hidden``,
    ``project_samples``, ``last_sigma``, ``lr_schedule``, ...) is passed through ``config_overrides`` (merged with one
    given there); the estimator's own parameters (``hidden`` and ``n_layers`` for all three networks,
    ``contamination``, ``standardize``, ...) are read as such. Values are not checked here (the estimator checks them).

    Args:
        recipe: The parsed YAML mapping (not modified).
        where: The file (or other source) named in errors.

    Returns:
        A new dict of ``DxMIDetector`` keyword arguments; unknown keys are kept (the caller refuses them).

    Raises:
        ValueError: ``model:`` not a mapping, an old and a new name disagreeing, or a field the data fixes (``dim``,
            ``mode``, ``seed``: the estimator's ``random_state``).

    Example:
        >>> p = detector_params({"model": {"hidden": 64, "last_sigma": 0.01}})
        >>> p["hidden"], p["config_overrides"]
        (64, {'last_sigma': 0.01})
    """
    import dataclasses

    from dxmi_ad.config import DxMIConfig
    from dxmi_ad.estimator import DxMIDetector

    params = dict(recipe)
    if "model" in params:
        model = params.pop("model")
        if not isinstance(model, dict):
            msg = f"{where}: 'model:' must be a mapping of parameter: value, got {type(model).__name__}"
            raise ValueError(msg)
        params = {**model, **params}
    params = DxMIConfig.rename_old_keys(params, where=where)
    fields = {f.name for f in dataclasses.fields(DxMIConfig)} - set(DxMIDetector().get_params())
    moved = {k: params.pop(k) for k in sorted(set(params) & fields)}
    fixed = sorted(set(moved) & {"dim", "mode", "seed"})
    if fixed:
        msg = f"{where}: {fixed} cannot be set in a vector recipe (the data fixes dim and mode; seed: random_state)"
        raise ValueError(msg)
    if moved:
        params["config_overrides"] = {**(params.get("config_overrides") or {}), **moved}
    return params
