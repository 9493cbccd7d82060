"""Evaluation report of an image model: plots (matplotlib), tables (pandas) and one self-contained ``report.html``.

Written by ``dxmi-ad evaluate`` and at the end of ``dxmi-ad train`` beside ``metrics.json`` / ``metrics.csv``:

* ``roc.png``: image-level ROC per category (:func:`sklearn.metrics.roc_curve`);
* ``pr.png``: image-level precision-recall per category (:func:`sklearn.metrics.precision_recall_curve`);
* ``histogram.png``: score histograms of normal test, anomalous test and calibration images, threshold drawn;
* ``top_anomalies.png``: the highest-scoring test images with their anomaly-map overlays and ground-truth masks;
* ``calibration.png``: expected vs realised false-positive rate on the normal test images, for target rates from
  ``1/(n_cal+1)`` to 0.5 (split-conformal thresholds of the calibration set);
* ``report.html``: one page with every plot embedded (base64 PNG), the metrics table, the decision rule and the
  run's settings; it opens offline in any browser.

Every file is written atomically (temp file, then rename).
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dxmi_ad.calibration import Calibration, conformal_threshold, decision_summary, min_calibration_size
from dxmi_ad.checkpoint import atomic_replace, atomic_write_text
from dxmi_ad.data.mvtec import ImageSample

__all__ = ["PLOTS", "realised_fpr_curve", "write_report"]

PLOTS = ("roc.png", "pr.png", "histogram.png", "top_anomalies.png", "calibration.png")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> bytes:
    """Save a figure to ``path`` atomically and return the PNG bytes."""
    plt = _plt()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    data = buf.getvalue()
    atomic_replace(path, lambda tmp: Path(tmp).write_bytes(data))
    return data


def _by_category(samples: Sequence[ImageSample], scores: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    out = {}
    for cat in sorted({s.category for s in samples}):
        idx = [i for i, s in enumerate(samples) if s.category == cat and np.isfinite(scores[i])]
        y = np.array([samples[i].label for i in idx], int)
        if 0 < y.sum() < len(y):
            out[cat] = (y, scores[idx])
    return out


def _curve_plot(samples: Sequence[ImageSample], scores: np.ndarray, kind: str, path: Path) -> bytes:
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    curves = _by_category(samples, scores)
    if not curves:  # one-class test set: no curve is defined, and an empty legend would warn
        ax.text(0.5, 0.5, "undefined: every category's test set\nhas only normal or only anomalous images",
                ha="center", va="center", fontsize=9, transform=ax.transAxes)
    for cat, (y, s) in curves.items():
        if kind == "roc":
            fpr, tpr, _ = roc_curve(y, s)
            ax.plot(fpr, tpr, label=f"{cat} (AUROC {roc_auc_score(y, s):.3f})")
        else:
            precision, recall, _ = precision_recall_curve(y, s)
            ax.plot(recall, precision, label=f"{cat} (AP {average_precision_score(y, s):.3f})")
    if kind == "roc":
        ax.plot([0, 1], [0, 1], "k--", lw=0.5)
        ax.set(xlabel="false-positive rate", ylabel="true-positive rate", title="image-level ROC")
        if curves:
            ax.legend(loc="lower right", fontsize=8)
    else:
        ax.set(xlabel="recall", ylabel="precision", title="image-level precision-recall", ylim=(0, 1.02))
        if curves:
            ax.legend(loc="lower left", fontsize=8)
    return _save(fig, path)


def _histogram(scores: np.ndarray, labels: np.ndarray, calibration: Calibration | None, path: Path) -> bytes:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ok = np.isfinite(scores)
    groups = [("normal (test)", scores[ok & (labels == 0)]), ("anomalous (test)", scores[ok & (labels == 1)])]
    if calibration is not None:
        groups.append(("calibration (held-out normal)", calibration.scores))
    finite = np.concatenate([g for _, g in groups if len(g)])
    bins = np.linspace(finite.min(), finite.max(), 40) if len(finite) and np.ptp(finite) > 0 else 20
    for name, values in groups:
        if len(values):
            ax.hist(values, bins=bins, alpha=0.5, density=True, label=f"{name}, n={len(values)}")
    if calibration is not None and calibration.decision_threshold is not None:  # none under FDR: batch-dependent
        ax.axvline(calibration.decision_threshold, color="k", ls="--", label=f"threshold ({calibration.rule})")
    ax.set(xlabel="pred_score (energy, higher = more anomalous)", ylabel="density", title="image scores")
    ax.legend(fontsize=7)
    return _save(fig, path)


def realised_fpr_curve(calibration: Calibration, normal_scores: np.ndarray, n_points: int = 25
                       ) -> pd.DataFrame:
    """Expected vs realised false-positive rate of split-conformal thresholds on unseen normal scores.

    Args:
        calibration: The calibration (its scores set the thresholds).
        normal_scores: ``(m,)`` scores of unseen normal samples (the test set's normals).
        n_points: Number of target rates, evenly spaced from the smallest supported rate to 0.5.

    Returns:
        DataFrame with columns ``target_fpr``, ``realised_fpr``, ``threshold``, ``n_normal``.
    """
    normal = np.asarray(normal_scores, dtype=np.float64)
    normal = normal[np.isfinite(normal)]
    n = len(calibration.scores)
    low = 1.0 / (n + 1)
    rows = []
    for a in np.unique(np.linspace(max(low, 1e-4), 0.5, n_points)):
        if n < min_calibration_size(a):
            continue
        t = conformal_threshold(calibration.scores, float(a))
        rows.append({"target_fpr": float(a), "realised_fpr": float((normal > t).mean()) if len(normal) else np.nan,
                     "threshold": t, "n_normal": len(normal)})
    return pd.DataFrame(rows)


def _calibration_plot(curve: pd.DataFrame, path: Path) -> bytes:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=100)
    if len(curve):
        m = int(curve["n_normal"].iloc[0])
        a = curve["target_fpr"].to_numpy()
        if m:  # binomial 99% band of the realised rate on m normal images
            from scipy.stats import binom

            lo, hi = binom.interval(0.99, m, a)
            ax.fill_between(a, lo / m, hi / m, color="0.85", label="binomial 99% band")
            ax.plot(a, curve["realised_fpr"], "o-", ms=3, label=f"realised on {m} normal test images")
        else:  # all-anomalous test set: the realised rate is undefined
            ax.text(0.25, 0.3, "realised rate undefined:\nno normal test images", ha="center", fontsize=9)
    ax.plot([0, 0.5], [0, 0.5], "k--", lw=0.7, label="expected (target)")
    ax.set(xlim=(0, 0.5), ylim=(0, 0.6), xlabel="target false-positive rate", ylabel="realised false-positive rate",
           title="calibration: target vs realised FPR")
    ax.legend(fontsize=7, loc="upper left")
    return _save(fig, path)


def _top_anomalies(samples: Sequence[ImageSample], scored: dict[str, Any], path: Path, k: int = 12) -> bytes:
    from dxmi_ad.data.images import ImageReadError, load_image

    plt = _plt()
    scores = scored["pred_score"]
    order = [int(i) for i in np.argsort(-np.nan_to_num(scores, nan=-np.inf)) if np.isfinite(scores[i])][:k]
    cols = 4
    rows = max(1, -(-len(order) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.2 * rows), dpi=80, squeeze=False)
    maps = scored["anomaly_map"]
    lo = float(np.nanmin(maps[order])) if order else 0.0
    hi = float(np.nanmax(maps[order])) if order else 1.0
    for ax in axes.ravel():
        ax.axis("off")
    for ax, i in zip(axes.ravel(), order):
        size = maps.shape[-1]
        try:
            image = load_image(samples[i].path, size)[0].permute(1, 2, 0).numpy()
        except (ImageReadError, OSError, AttributeError):
            image = np.zeros((size, size, 3))
        ax.imshow(image)
        ax.imshow(maps[i].astype(np.float32), cmap="jet", alpha=0.45, vmin=lo, vmax=hi)
        mask = scored.get("gt_mask")
        if mask is not None and mask[i].any():
            ax.contour(mask[i].astype(float), levels=[0.5], colors="white", linewidths=1)
        truth = "anomalous" if samples[i].label == 1 else "normal"
        ax.set_title(f"{samples[i].category}/{samples[i].defect}\nscore {scores[i]:.3g} ({truth})", fontsize=8)
    fig.suptitle("highest-scoring test images (white contour: ground-truth mask)", fontsize=10)
    return _save(fig, path)


def write_report(
    out: Path,
    samples: Sequence[ImageSample],
    scored: dict[str, Any],
    table: pd.DataFrame,
    calibration: Calibration | None,
    settings: dict[str, Any],
    with_images: bool = True,
) -> Path:
    """Write every plot and ``report.html`` into ``out``.

    Args:
        out: Folder (created).
        samples: The scored test samples ``(n)``.
        scored: ``pred_score (n,)``, ``anomaly_map (n, S, S)``, ``gt_mask (n, S, S)`` (from
            :meth:`~dxmi_ad.image.ImageDetector.score_samples`).
        table: Per-category metrics (:func:`~dxmi_ad.evaluation.metrics_table`).
        calibration: The model's calibration, or None.
        settings: The run's settings (shown as JSON).
        with_images: Draw the top-anomalies grid (False for feature-file datasets without image files).

    Returns:
        The path of ``report.html``.
    """
    out.mkdir(parents=True, exist_ok=True)
    scores = np.asarray(scored["pred_score"], dtype=np.float64)
    labels = np.array([s.label for s in samples], int)
    figures: dict[str, bytes] = {
        "roc.png": _curve_plot(samples, scores, "roc", out / "roc.png"),
        "pr.png": _curve_plot(samples, scores, "pr", out / "pr.png"),
        "histogram.png": _histogram(scores, labels, calibration, out / "histogram.png"),
    }
    if with_images:
        figures["top_anomalies.png"] = _top_anomalies(samples, scored, out / "top_anomalies.png")
    decision_rows = []
    if calibration is not None:
        curve = realised_fpr_curve(calibration, scores[labels == 0])
        figures["calibration.png"] = _calibration_plot(curve, out / "calibration.png")
        atomic_write_text(out / "calibration_curve.csv", curve.to_csv(index=False))
        d = decision_summary(calibration, scores, labels)
        c = d["counts"]
        decision_rows = [
            ("decision rule", calibration.describe()),
            ("realised false-positive rate (normal test images)",
             "n/a" if d["realised_fpr"] is None else f"{d['realised_fpr']:.4f} ({c['fp']} of {c['n_normal']})"),
            ("true-positive rate (anomalous test images)",
             "n/a" if d["tpr"] is None else f"{d['tpr']:.4f} ({c['tp']} of {c['n_anomalous']})"),
            ("false discovery proportion", f"{d['false_discovery_proportion']:.4f} of {c['flagged']} flagged"),
        ]
    else:  # no rule, no decision: say so instead of leaving the section out
        decision_rows = [("decision rule", "none: the model has no calibration, so no image is decided anomalous or "
                                           "normal; run `dxmi-ad calibrate --model RUN_DIR --calibration-dir "
                                           "NORMAL_IMAGES`")]
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>dxmi-ad report</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
        "img{max-width:100%;margin:6px 0;border:1px solid #eee}pre{background:#f6f6f6;padding:8px;font-size:12px;"
        "overflow-x:auto}.fig{display:inline-block;vertical-align:top;margin-right:12px}</style></head><body>",
        "<h1>dxmi-ad evaluation report</h1>",
        "<p>Scores are energies of a DxMI energy-based model (higher = more anomalous); "
        f"pred_score = {html.escape(str(settings.get('pred_score', 'maximum of the per-location energy map')))}. "
        "Metrics are fractions in [0, 1].</p>",
        "<h2>Metrics</h2>", table.to_html(index=False, float_format=lambda v: f"{v:.4f}", border=0),
    ]
    if decision_rows:
        parts += ["<h2>Decisions on the test set</h2><table>"]
        parts += [f"<tr><th style='text-align:left'>{html.escape(k)}</th><td style='text-align:left'>"
                  f"{html.escape(v)}</td></tr>" for k, v in decision_rows]
        parts += ["</table>"]
    parts += ["<h2>Plots</h2>"]
    for name, data in figures.items():
        b64 = base64.b64encode(data).decode("ascii")
        parts.append(f"<div class='fig'><h3>{html.escape(name)}</h3>"
                     f"<img alt='{html.escape(name)}' src='data:image/png;base64,{b64}'></div>")
    parts += ["<h2>Settings</h2><pre>", html.escape(json.dumps(settings, indent=2, default=str)), "</pre>",
              "</body></html>"]
    path = out / "report.html"
    atomic_write_text(path, "\n".join(parts))
    return path
