"""Evaluation metrics. AUROC comes from scikit-learn; sliced Wasserstein is the paper's 2-D sample metric.

References:
    DxMI §5.1 Table 1 (sliced Wasserstein-2 with 1,000 projections; AUC of energy-based classification).
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

__all__ = ["auroc", "dumps_json", "json_ready", "sliced_wasserstein"]


def json_ready(obj: Any) -> Any:
    """A copy of ``obj`` that strict JSON can hold: NaN / infinite floats become None (``null``: undefined).

    numpy scalars and arrays become Python numbers and lists, tuples become lists, mapping keys strings; anything
    else is returned unchanged (``json.dumps`` then refuses what it cannot write).
    """
    if isinstance(obj, dict):
        return {str(k): json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_ready(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(float(obj)) else None
    return obj


def dumps_json(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` of :func:`json_ready` ``(obj)`` with ``allow_nan=False``: always valid JSON (RFC 8259), with
    undefined metrics written as ``null`` instead of the invalid ``NaN`` token.

    Raises:
        TypeError: A value JSON cannot represent (after conversion).
    """
    return json.dumps(json_ready(obj), allow_nan=False, **kwargs)


def auroc(scores_normal: np.ndarray, scores_anomalous: np.ndarray) -> float:
    """AUROC of anomaly scores (higher = more anomalous), via :func:`sklearn.metrics.roc_auc_score`.

    Args:
        scores_normal: Scores of normal samples, shape ``(n0,)``.
        scores_anomalous: Scores of anomalies, shape ``(n1,)``.

    Returns:
        AUROC in [0, 1]; raw, never flipped (docs/paper_map.md).

    Raises:
        ValueError: If either set is empty or a score is not finite.
    """
    s0, s1 = np.asarray(scores_normal, float).ravel(), np.asarray(scores_anomalous, float).ravel()
    if not len(s0) or not len(s1):
        msg = f"AUROC needs normal and anomalous scores, got {len(s0)} and {len(s1)}"
        raise ValueError(msg)
    y = np.r_[np.zeros(len(s0)), np.ones(len(s1))]
    s = np.r_[s0, s1]
    if not np.isfinite(s).all():
        msg = "AUROC got non-finite scores"
        raise ValueError(msg)
    return float(roc_auc_score(y, s))


def sliced_wasserstein(x: np.ndarray, y: np.ndarray, n_projections: int = 1000, seed: int = 0) -> float:
    """Sliced Wasserstein-2 distance between two equal-size samples.

    ``SW_2 = sqrt(mean over random unit directions of W_2^2 of the 1-D projections)``; the 1-D W2 of equal-size
    samples is the RMS difference of sorted projections.

    Args:
        x: Sample of shape ``(n, D)``.
        y: Sample of shape ``(n, D)``.
        n_projections: Number of random directions (paper: 1,000).
        seed: Seed of the directions.

    Returns:
        The distance (>= 0), in data units.

    Raises:
        ValueError: If the shapes differ.
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.shape != y.shape or x.ndim != 2:
        msg = f"sliced_wasserstein needs two (n, D) arrays of equal shape, got {x.shape} and {y.shape}"
        raise ValueError(msg)
    rng = np.random.default_rng(seed)
    dirs = rng.standard_normal((x.shape[1], n_projections))
    dirs /= np.linalg.norm(dirs, axis=0, keepdims=True)
    px, py = np.sort(x @ dirs, axis=0), np.sort(y @ dirs, axis=0)
    return float(np.sqrt(np.mean((px - py) ** 2)))
