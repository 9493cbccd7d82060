"""Feature files: the "pretrained-feature dataset" (per-image feature maps with labels, masks and categories).

Our layout (``dxmi-ad extract-features --out DIR``): ``DIR/train.safetensors`` and ``DIR/test.safetensors`` holding
``feature_align (N, C, h, w)`` float32, ``label (N,)`` int64 and ``mask (N, S, S)`` uint8, plus ``DIR/meta.json``
with the category of every row (``clsname``) and the feature settings.

The layout in which the paper's authors released their MVTec features is read too (docs/paper_map.md):
``train_data.pth`` / ``val_data.pth`` (or ``.pkl``), each a dict with ``feature_align (N, 272, 14, 14)``, ``mask``,
``label``, ``clsname``. These are read with ``torch.load(weights_only=True)``; a file that needs general unpickling
is refused unless ``trust_pickle=True``, because unpickling can run arbitrary code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["FeatureSplit", "read_feature_dir", "write_feature_split"]


@dataclass
class FeatureSplit:
    """One split of a feature dataset.

    Attributes:
        features: ``(N, C, h, w)`` float32 feature maps.
        label: ``(N,)`` int, 1 = anomalous.
        mask: ``(N, S, S)`` bool ground truth (all False for normal images), or None.
        clsname: Category of every row (N strings).
    """

    features: torch.Tensor
    label: np.ndarray
    mask: np.ndarray | None
    clsname: list[str]


def write_feature_split(directory: Path, name: str, split: FeatureSplit, meta: dict[str, Any]) -> None:
    """Write ``<name>.safetensors`` and record its categories in ``meta.json`` (both atomically)."""
    from safetensors.torch import save_file

    from dxmi_ad.checkpoint import atomic_replace, atomic_write_text

    tensors = {"feature_align": split.features.float().contiguous(), "label": torch.as_tensor(split.label).long()}
    if split.mask is not None:
        tensors["mask"] = torch.from_numpy(split.mask.astype(np.uint8))
    atomic_replace(directory / f"{name}.safetensors", lambda tmp: save_file(tensors, tmp))
    meta_path = directory / "meta.json"
    data = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    data.update(meta)
    data.setdefault("clsname", {})[name] = list(split.clsname)
    atomic_write_text(meta_path, json.dumps(data, indent=1))


def _from_dict(obj: Any, path: Path) -> FeatureSplit:
    if not isinstance(obj, dict) or "feature_align" not in obj:
        msg = f"{path}: expected a dict with 'feature_align', 'label', 'mask', 'clsname'"
        raise ValueError(msg)
    feats = torch.as_tensor(obj["feature_align"]).float()
    if feats.ndim != 4:
        msg = f"{path}: feature_align must have shape (N, C, h, w), got {tuple(feats.shape)}"
        raise ValueError(msg)
    n = feats.shape[0]
    label = np.asarray(obj.get("label", np.zeros(n)), dtype=int).reshape(-1)
    mask = obj.get("mask")
    mask = None if mask is None else np.asarray(mask).reshape(n, *np.asarray(mask).shape[-2:]) > 0
    clsname = [str(c) for c in obj.get("clsname", ["features"] * n)]
    if len(label) != n or len(clsname) != n:
        msg = f"{path}: label/clsname lengths ({len(label)}, {len(clsname)}) differ from N = {n}"
        raise ValueError(msg)
    return FeatureSplit(feats, label, mask, clsname)


def _load_torch(path: Path, trust_pickle: bool) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        if not trust_pickle:
            msg = (f"{path} cannot be read with torch.load(weights_only=True) ({type(err).__name__}); it needs general "
                   "unpickling, which can run arbitrary code. Pass --trust-pickle only if you trust its source.")
            raise ValueError(msg) from err
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (pickle.UnpicklingError, RuntimeError):
        with path.open("rb") as fh:  # a plain pickle (the authors' .pkl)
            return pickle.load(fh)  # noqa: S301 - only with --trust-pickle


def read_feature_dir(directory: str | Path, trust_pickle: bool = False) -> tuple[FeatureSplit, FeatureSplit | None,
                                                                                 dict[str, Any]]:
    """Read a feature dataset (our layout or the authors' ``train_data.pth`` / ``val_data.pth``).

    Args:
        directory: The folder.
        trust_pickle: Allow general unpickling of the authors' files (unsafe for untrusted files).

    Returns:
        ``(train, test or None, meta)``.

    Raises:
        FileNotFoundError: If no known file is found (the message lists what is expected).
        ValueError: Malformed content, or a pickle without ``trust_pickle``.
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    if (directory / "train.safetensors").is_file():
        meta = json.loads((directory / "meta.json").read_text()) if (directory / "meta.json").is_file() else {}
        splits = []
        for name in ("train", "test"):
            path = directory / f"{name}.safetensors"
            if not path.is_file():
                splits.append(None)
                continue
            t = load_file(path)
            n = t["feature_align"].shape[0]
            splits.append(_from_dict({"feature_align": t["feature_align"], "label": t["label"].numpy(),
                                      "mask": t["mask"].numpy() if "mask" in t else None,
                                      "clsname": meta.get("clsname", {}).get(name, ["features"] * n)}, path))
        return splits[0], splits[1], meta
    for stem_train, stem_test in (("train_data", "val_data"),):
        for ext in (".pth", ".pkl", ".pt"):
            train_path = directory / f"{stem_train}{ext}"
            if train_path.is_file():
                train = _from_dict(_load_torch(train_path, trust_pickle), train_path)
                test_path = directory / f"{stem_test}{ext}"
                test = _from_dict(_load_torch(test_path, trust_pickle), test_path) if test_path.is_file() else None
                return train, test, {"source": "released features (paper layout)"}
    msg = (f"no feature files in {directory}: expected train.safetensors (+ test.safetensors, meta.json) from "
           "`dxmi-ad extract-features`, or the authors' train_data.pth / val_data.pth")
    raise FileNotFoundError(msg)
