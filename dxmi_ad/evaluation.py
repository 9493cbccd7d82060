"""Per-category image and pixel metrics of an image detector, from well-kept libraries.

* image AUROC: :func:`sklearn.metrics.roc_auc_score` on ``pred_score`` (raw, never flipped; docs/paper_map.md);
* pixel AUROC: the same over every pixel of the category's test images with a known mask, at the model input size
  (masks resized with nearest neighbour, as the paper's protocol);
* pixel AUPRO (FPR limit 0.3) and image F1-max: anomalib's metric implementations.

Keys follow anomalib: ``image_AUROC``, ``pixel_AUROC``, ``pixel_AUPRO``, ``image_F1Score``; fractions in [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score

from dxmi_ad.data.mvtec import ImageSample

__all__ = ["METRIC_KEYS", "category_metrics", "metrics_table"]

METRIC_KEYS = ("image_AUROC", "pixel_AUROC", "pixel_AUPRO", "image_F1Score")


def category_metrics(pred_score: np.ndarray, gt_label: np.ndarray, anomaly_map: np.ndarray | None = None,
                     gt_mask: np.ndarray | None = None, mask_known: np.ndarray | None = None) -> dict[str, float]:
    """Metrics of one category.

    Args:
        pred_score: ``(n,)`` image scores, higher = more anomalous.
        gt_label: ``(n,)`` 1 = anomalous.
        anomaly_map: ``(n, S, S)`` pixel scores, or None to skip pixel metrics.
        gt_mask: ``(n, S, S)`` bool ground truth.
        mask_known: ``(n,)`` bool, False for anomalous images without a mask file (left out of pixel metrics).

    Returns:
        Dict with the available keys of :data:`METRIC_KEYS` (NaN where a metric is undefined, e.g. one class only).
    """
    from anomalib.metrics.aupro import _AUPRO
    from anomalib.metrics.f1_score import _F1Max

    out: dict[str, float] = {k: float("nan") for k in METRIC_KEYS}
    y = np.asarray(gt_label).astype(int)
    if 0 < y.sum() < len(y):
        out["image_AUROC"] = float(roc_auc_score(y, pred_score))
        f1 = _F1Max()
        f1.update(torch.as_tensor(pred_score, dtype=torch.float32), torch.as_tensor(y))
        out["image_F1Score"] = float(f1.compute())
    if anomaly_map is not None and gt_mask is not None:
        keep = np.ones(len(y), bool) if mask_known is None else np.asarray(mask_known, bool)
        masks, maps = gt_mask[keep], anomaly_map[keep].astype(np.float32)
        if masks.any() and not masks.all():
            out["pixel_AUROC"] = float(roc_auc_score(masks.ravel(), maps.ravel()))
            aupro = _AUPRO(fpr_limit=0.3)
            aupro.update(torch.from_numpy(maps), torch.from_numpy(masks.astype(np.int64)))
            out["pixel_AUPRO"] = float(aupro.compute())
    return out


def metrics_table(samples: Sequence[ImageSample], scored: dict[str, Any]) -> pd.DataFrame:
    """Per-category metrics plus a ``mean`` row, from :meth:`ImageDetector.score_samples` output.

    Unreadable test files (NaN scores) are left out and counted in ``n_unreadable``.
    """
    rows = []
    scores = scored["pred_score"]
    for cat in sorted({s.category for s in samples}):
        idx = np.array([i for i, s in enumerate(samples) if s.category == cat and np.isfinite(scores[i])], int)
        bad = sum(1 for i, s in enumerate(samples) if s.category == cat and not np.isfinite(scores[i]))
        if not len(idx):
            continue
        labels = np.array([samples[i].label for i in idx])
        known = np.array([samples[i].label == 0 or samples[i].mask_path is not None for i in idx])
        m = category_metrics(scores[idx], labels, scored["anomaly_map"][idx], scored["gt_mask"][idx], known)
        rows.append({"category": cat, **m, "n_test": len(idx), "n_anomalous": int(labels.sum()),
                     "n_unreadable": bad})
    table = pd.DataFrame(rows)
    if len(table):
        mean = table[list(METRIC_KEYS)].mean(skipna=True)
        table = pd.concat([table, pd.DataFrame([{"category": "mean", **mean.to_dict(),
                                                 "n_test": int(table["n_test"].sum()),
                                                 "n_anomalous": int(table["n_anomalous"].sum()),
                                                 "n_unreadable": int(table["n_unreadable"].sum())}])],
                          ignore_index=True)
    return table
