"""The 2-D 8-Gaussians toy set of the paper's Table 1 (real loaders live in :mod:`dxmi_ad.data.tabular`).

References:
    DxMI §5.1, App. C.1; official code ``loader/synthetic.py``: centres on a radius-4 circle, std 0.5, the whole
    set divided by 1.414 (docs/paper_map.md).
"""

from __future__ import annotations

import numpy as np

__all__ = ["BOX_HALF_WIDTH", "eight_gaussians", "uniform_box"]

BOX_HALF_WIDTH = 4.0  # [-4, 4]^2 matches the paper's ideal AUC of about 0.906 (docs/paper_map.md)


def eight_gaussians(n: int, seed: int | None = 0) -> np.ndarray:
    """Draw ``n`` points from the 8-Gaussians mixture.

    Args:
        n: Number of points (>= 0).
        seed: Seed of the numpy generator.

    Returns:
        float32 array of shape ``(n, 2)``.
    """
    rng = np.random.default_rng(seed)
    angles = np.arange(8) * np.pi / 4
    centers = 4.0 * np.stack([np.cos(angles), np.sin(angles)], 1)
    which = rng.integers(0, 8, n)
    x = centers[which] + 0.5 * rng.standard_normal((n, 2))
    return (x / 1.414).astype(np.float32)


def uniform_box(n: int, seed: int | None = 1, half_width: float = BOX_HALF_WIDTH) -> np.ndarray:
    """Uniform noise on ``[-half_width, half_width]^2`` (the negatives of Table 1's AUC), ``(n, 2)`` float32."""
    rng = np.random.default_rng(seed)
    return rng.uniform(-half_width, half_width, (n, 2)).astype(np.float32)
