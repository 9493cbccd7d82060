"""DxMI beside classical detectors on real vector data: scikit-learn digits (each class normal in turn),
ODDS-style wbc and wine (data/README.md). AUROC of each method measured in the same run on the same splits.

Peers: IsolationForest (200 trees), LocalOutlierFactor (novelty=True, 20 neighbours), and a Ledoit-Wolf
Mahalanobis distance after standardisation and PCA (32 components, capped by the data; data/README.md).
wbc and wine results are means over ``--odds-seeds`` random outlier subsamples and splits (they are small).

    python benchmarks/digits.py [--recipe recipes/digits.yaml] [--odds-seeds 5]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from sklearn.covariance import LedoitWolf
from sklearn.decomposition import PCA
from sklearn.ensemble import IsolationForest
from sklearn.neighbors import LocalOutlierFactor
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from dxmi_ad import DxMIDetector
from dxmi_ad.data.tabular import OneClassSplit, digits_split, odds_split
from dxmi_ad.metrics import auroc

RECIPE = Path(__file__).resolve().parents[1] / "dxmi_ad" / "recipes" / "digits.yaml"


def mahalanobis_scores(train: np.ndarray, test: np.ndarray) -> np.ndarray:
    """Ledoit-Wolf Mahalanobis distance after standardisation + PCA (higher = more anomalous)."""
    pre = make_pipeline(StandardScaler(), PCA(min(32, train.shape[1], len(train) - 1), random_state=0)).fit(train)
    return LedoitWolf().fit(pre.transform(train)).mahalanobis(pre.transform(test))


def score_split(split: OneClassSplit, recipe: dict, seed: int) -> dict[str, float]:
    """AUROC of every method on one split, plus DxMI's training seconds."""
    y = split.test_label

    def auc(s: np.ndarray) -> float:
        return auroc(s[y == 0], s[y == 1])

    t0 = time.perf_counter()
    det = DxMIDetector(**{**recipe, "random_state": seed, "device": "cpu"}).fit(split.train)
    seconds = time.perf_counter() - t0
    ae = DxMIDetector(**{**recipe, "random_state": seed, "device": "cpu", "n_iter": 0}).fit(split.train)
    iforest = IsolationForest(n_estimators=200, random_state=seed).fit(split.train)
    lof = LocalOutlierFactor(n_neighbors=min(20, len(split.train) - 1), novelty=True).fit(split.train)
    return {
        "DxMI": auc(det.energy(split.test)), "autoencoder alone": auc(ae.energy(split.test)),
        "IsolationForest": auc(-iforest.score_samples(split.test)), "LOF": auc(-lof.score_samples(split.test)),
        "Mahalanobis": auc(mahalanobis_scores(split.train, split.test)), "DxMI seconds": seconds,
    }


def run(recipe: dict, odds_seeds: int, classes: range = range(10)) -> pd.DataFrame:
    """All digits classes, then wbc and wine averaged over seeds; returns the table."""
    rows = []
    for c in classes:
        rows.append({"dataset": f"digits-{c}", **score_split(digits_split(c, seed=0), recipe, seed=0)})
    digits = pd.DataFrame(rows).drop(columns="dataset").mean()
    rows.append({"dataset": "digits mean", **digits.to_dict()})
    for name in ("wbc", "wine"):
        per_seed = pd.DataFrame([score_split(odds_split(name, s), recipe, s) for s in range(odds_seeds)])
        rows.append({"dataset": f"{name} (mean of {odds_seeds})", **per_seed.mean().to_dict()})
    return pd.DataFrame(rows)


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, default=RECIPE)
    parser.add_argument("--odds-seeds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(2)
    recipe = yaml.safe_load(args.recipe.read_text())
    table = run(recipe, args.odds_seeds)
    print(f"AUROC (higher is better); recipe={args.recipe.name}; torch threads=2")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))


if __name__ == "__main__":
    main()
