"""The 2-D 8-Gaussians toy set of the paper's Table 1, and SYNTHETIC anomalies for model selection on tables
(real loaders live in :mod:`dxmi_ad.data.tabular`).

References:
    DxMI §5.1, App. C.1; official code ``loader/synthetic.py``: centres on a radius-4 circle, std 0.5, the whole
    set divided by 1.414 (docs/paper_map.md).
"""

from __future__ import annotations

import numpy as np

__all__ = ["BOX_HALF_WIDTH", "eight_gaussians", "feature_swap_anomalies", "outward_anomalies", "uniform_box"]

BOX_HALF_WIDTH = 4.0  # [-4, 4]^2 matches the paper's ideal AUC of about 0.906 (docs/paper_map.md)


_EIGHT_CENTRES_RAW = 4.0 * np.stack([np.cos(np.arange(8) * np.pi / 4), np.sin(np.arange(8) * np.pi / 4)], 1)
EIGHT_GAUSSIANS_CENTRES = _EIGHT_CENTRES_RAW / 1.414
"""``(8, 2)`` centres of the 8-Gaussians mixture in data units (radius ``4 / 1.414``)."""
EIGHT_GAUSSIANS_STD = 0.5 / 1.414
"""Standard deviation of each mode per axis in data units (about 0.354)."""


def eight_gaussians(n: int, seed: int | None = 0) -> np.ndarray:
    """Draw ``n`` points from the 8-Gaussians mixture.

    Args:
        n: Number of points (>= 0).
        seed: Seed of the numpy generator.

    Returns:
        float32 array of shape ``(n, 2)``.
    """
    rng = np.random.default_rng(seed)
    which = rng.integers(0, 8, n)
    x = _EIGHT_CENTRES_RAW[which] + 0.5 * rng.standard_normal((n, 2))
    return (x / 1.414).astype(np.float32)


def uniform_box(n: int, seed: int | None = 1, half_width: float = BOX_HALF_WIDTH) -> np.ndarray:
    """Uniform noise on ``[-half_width, half_width]^2`` (the negatives of Table 1's AUC), ``(n, 2)`` float32."""
    rng = np.random.default_rng(seed)
    return rng.uniform(-half_width, half_width, (n, 2)).astype(np.float32)


def feature_swap_anomalies(rows: np.ndarray, n: int, seed: int | None = 0, low: float = 0.125,
                           high: float = 0.5) -> np.ndarray:
    """SYNTHETIC anomalies made from normal rows: each copies a random row and replaces a random subset of its
    features by another random row's values (CutPaste for tables).

    Every marginal is kept (each value is some normal row's value) while the dependence between the features is
    broken, so the anomalies are near-misses rather than far outliers; with 2 features one coordinate is swapped.
    Used to select a model on held-out rows (:class:`~dxmi_ad.estimator.DxMIDetector`, ``validate_every``); never a
    benchmark's test anomalies.

    Args:
        rows: Normal rows ``(m, D)``, ``m >= 2``, ``D >= 2`` (any units).
        n: Number of anomalies to make, ``>= 0``.
        seed: Seed of the draws.
        low: Smallest share of features swapped per anomaly, ``0 < low <= high``; at least one feature is swapped.
        high: Largest share, ``<= 1``; at most ``D - 1`` features are swapped.

    Returns:
        ``(n, D)`` array, the dtype of ``rows``.

    Raises:
        ValueError: Fewer than 2 rows or 2 features, or a share outside ``0 < low <= high <= 1``.

    Example:
        >>> x = np.arange(12.0).reshape(4, 3)
        >>> feature_swap_anomalies(x, 5, seed=0).shape
        (5, 3)
    """
    rows = np.asarray(rows)
    if rows.ndim != 2 or rows.shape[0] < 2 or rows.shape[1] < 2:
        msg = f"feature_swap_anomalies needs at least 2 rows and 2 features, got shape {rows.shape}"
        raise ValueError(msg)
    if not 0 < low <= high <= 1:
        msg = f"feature_swap_anomalies needs 0 < low <= high <= 1, got low={low}, high={high}"
        raise ValueError(msg)
    m, d = rows.shape
    rng = np.random.default_rng(seed)
    base = rng.integers(0, m, n)
    donor = (base + rng.integers(1, m, n)) % m  # another row
    k = np.clip(np.rint(rng.uniform(low, high, n) * d).astype(int), 1, d - 1)
    out = rows[base].copy()
    for i in range(n):
        cols = rng.choice(d, size=k[i], replace=False)
        out[i, cols] = rows[donor[i], cols]
    return out


def outward_anomalies(rows: np.ndarray, n: int, seed: int | None = 0, low: float = 1.5,
                      high: float = 3.0) -> np.ndarray:
    """SYNTHETIC anomalies made from normal rows: each takes a random row and moves it away from the rows' mean,
    ``mean + f (row - mean)`` with ``f ~ U(low, high)`` (the same factor for every feature).

    The far-outlier counterpart of :func:`feature_swap_anomalies` (which keeps every marginal and cannot be told
    from normal rows when the features are independent): together they select a model on held-out rows
    (:class:`~dxmi_ad.estimator.DxMIDetector`, ``validate_every``); never a benchmark's test anomalies.

    Args:
        rows: Normal rows ``(m, D)``, ``m >= 1`` (any units).
        n: Number of anomalies to make, ``>= 0``.
        seed: Seed of the draws.
        low: Smallest factor, ``1 < low <= high``.
        high: Largest factor.

    Returns:
        ``(n, D)`` array, the dtype of ``rows`` when it is a floating type, else float64.

    Raises:
        ValueError: No row, a non-2-D array, or a range outside ``1 < low <= high``.

    Example:
        >>> outward_anomalies(np.arange(12.0).reshape(4, 3), 5, seed=0).shape
        (5, 3)
    """
    rows = np.asarray(rows)
    if rows.ndim != 2 or rows.shape[0] < 1:
        msg = f"outward_anomalies needs at least 1 row of a 2-D array, got shape {rows.shape}"
        raise ValueError(msg)
    if not 1 < low <= high:
        msg = f"outward_anomalies needs 1 < low <= high, got low={low}, high={high}"
        raise ValueError(msg)
    rng = np.random.default_rng(seed)
    mean = rows.mean(0, dtype=np.float64)
    factor = rng.uniform(low, high, (n, 1))
    dtype = rows.dtype if np.issubdtype(rows.dtype, np.floating) else np.float64
    return (mean + factor * (rows[rng.integers(0, len(rows), n)] - mean)).astype(dtype)
