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

__all__ = ["names", "path", "resolve"]


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
