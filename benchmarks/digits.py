"""DxMI beside classical detectors on real vector data: scikit-learn digits (each class normal in turn),
ODDS-style wbc and wine (data/README.md). AUROC of each method measured in the same run on the same splits.

Peers: IsolationForest (200 trees), LocalOutlierFactor (novelty=True, 20 neighbours), and a Ledoit-Wolf
Mahalanobis distance after standardisation and PCA (32 components, capped by the data; data/README.md).
wbc and wine results are means over ``--odds-seeds`` random outlier subsamples and splits (they are small).

    python benchmarks/digits.py [--recipe digits] [--table-recipe tables] [--defaults] [--seeds 3]
                                [--odds-seeds 5] [--timing] [--scaling-choice]

The digits rows use ``--recipe`` (the shipped ``digits`` recipe: pixel intensities, one scale for all features),
wbc and wine ``--table-recipe`` (the shipped ``tables`` recipe: per-feature standardization), as
``dxmi-ad train --dataset digits | wbc | wine`` does. ``--defaults`` runs ``DxMIDetector()`` with nothing set (what
a user who tunes nothing gets) on every row. ``--seeds N`` repeats the digits rows with split and model seeds
0..N-1 and prints the mean over the 10 classes per seed, then mean +/- std. Every method's fit seconds are printed
beside its AUROC; ``--timing`` adds fit times on a synthetic 10,000 x 100 table (standard normal rows: timing only,
no AUROC), the size the estimator's default is meant to handle in seconds. ``--scaling-choice`` prints only the
validation behind the ``digits`` recipe's ``standardize: global`` (MNIST-5k, another source of pixel tables:
per-feature against global scaling, LOF beside them).
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

from dxmi_ad import DxMIDetector, recipes
from dxmi_ad.data.tabular import OneClassSplit, digits_split, odds_split
from dxmi_ad.metrics import auroc

RECIPE = recipes.path("digits")
TABLE_RECIPE = recipes.path("tables")


def mahalanobis_scores(train: np.ndarray, test: np.ndarray) -> np.ndarray:
    """Ledoit-Wolf Mahalanobis distance after standardisation + PCA (higher = more anomalous)."""
    pre = make_pipeline(StandardScaler(), PCA(min(32, train.shape[1], len(train) - 1), random_state=0)).fit(train)
    return LedoitWolf().fit(pre.transform(train)).mahalanobis(pre.transform(test))


def score_split(split: OneClassSplit, recipe: dict, seed: int) -> dict[str, float]:
    """AUROC of every method on one split, plus DxMI's training seconds."""
    y = split.test_label

    def auc(s: np.ndarray) -> float:
        return auroc(s[y == 0], s[y == 1])

    fits = fit_all(split.train, recipe, seed)
    out = {name: auc(score(split.test)) for name, (score, _) in fits.items()}
    out.update({f"{name} s": seconds for name, (_, seconds) in fits.items()})
    return out


def fit_all(train: np.ndarray, recipe: dict, seed: int) -> dict[str, tuple]:
    """Fit every method on ``train``: ``{name: (score function (higher = more anomalous), fit seconds)}``."""
    def timed(fit):
        t0 = time.perf_counter()
        model = fit()
        return model, time.perf_counter() - t0

    det, t_det = timed(lambda: DxMIDetector(**{**recipe, "random_state": seed, "device": "cpu"}).fit(train))
    ae, t_ae = timed(lambda: DxMIDetector(**{**recipe, "random_state": seed, "device": "cpu", "n_iter": 0}).fit(train))
    iforest, t_if = timed(lambda: IsolationForest(n_estimators=200, random_state=seed).fit(train))
    lof, t_lof = timed(lambda: LocalOutlierFactor(n_neighbors=min(20, len(train) - 1), novelty=True).fit(train))
    t0 = time.perf_counter()
    pre = make_pipeline(StandardScaler(), PCA(min(32, train.shape[1], len(train) - 1), random_state=0)).fit(train)
    lw = LedoitWolf().fit(pre.transform(train))
    t_mah = time.perf_counter() - t0
    return {"DxMI": (det.energy, t_det), "autoencoder alone": (ae.energy, t_ae),
            "IsolationForest": (lambda x: -iforest.score_samples(x), t_if),
            "LOF": (lambda x: -lof.score_samples(x), t_lof),
            "Mahalanobis": (lambda x: lw.mahalanobis(pre.transform(x)), t_mah)}


def timing_row(recipe: dict) -> dict[str, float]:
    """Fit seconds of every method on a synthetic 10,000 x 100 table (no AUROC: timing only)."""
    x = np.random.default_rng(0).standard_normal((10_000, 100))
    return {f"{name} s": seconds for name, (_, seconds) in fit_all(x, recipe, 0).items()}


def run(recipe: dict, table_recipe: dict, odds_seeds: int, classes: range = range(10), seeds: int = 1) -> pd.DataFrame:
    """All digits classes (``seeds`` split and model seeds), then wbc and wine averaged over seeds; the table."""
    rows, means = [], []
    for seed in range(seeds):
        per_class = [{"dataset": f"digits-{c}" + (f" (seed {seed})" if seeds > 1 else ""),
                      **score_split(digits_split(c, seed=seed), recipe, seed=seed)} for c in classes]
        rows += per_class
        means.append(pd.DataFrame(per_class).drop(columns="dataset").mean())
        if seeds > 1:
            rows.append({"dataset": f"digits mean (seed {seed})", **means[-1].to_dict()})
    rows.append({"dataset": "digits mean" + (f" (mean of {seeds} seeds)" if seeds > 1 else ""),
                 **pd.DataFrame(means).mean().to_dict()})
    if seeds > 1:
        rows.append({"dataset": f"digits mean (std over {seeds} seeds)", **pd.DataFrame(means).std(ddof=0).to_dict()})
    for name in ("wbc", "wine"):
        per_seed = pd.DataFrame([score_split(odds_split(name, s), table_recipe, s) for s in range(odds_seeds)])
        rows.append({"dataset": f"{name} (mean of {odds_seeds})", **per_seed.mean().to_dict()})
    return pd.DataFrame(rows)


def scaling_choice(classes: range = range(10), seed: int = 0) -> pd.DataFrame:
    """The validation behind the ``digits`` recipe's ``standardize: global``: MNIST-5k (pixel intensities from another
    source than the digits benchmark), each class normal in turn, ``DxMIDetector`` defaults with per-feature and with
    global scaling, LOF beside them; AUROC per class and the mean."""
    from dxmi_ad.data.tabular import mnist_split

    rows = []
    for c in classes:
        split = mnist_split(c, seed=seed)
        y = split.test_label
        row: dict[str, float | str] = {"dataset": f"mnist5k-{c}"}
        for label, value in (("per-feature (True)", True), ("global", "global")):
            det = DxMIDetector(standardize=value, random_state=seed, device="cpu").fit(split.train)
            e = det.energy(split.test)
            row[f"DxMI, standardize {label}"] = auroc(e[y == 0], e[y == 1])
        lof = LocalOutlierFactor(n_neighbors=20, novelty=True).fit(split.train)
        s = -lof.score_samples(split.test)
        row["LOF"] = auroc(s[y == 0], s[y == 1])
        rows.append(row)
    table = pd.DataFrame(rows)
    return pd.concat([table, pd.DataFrame([{"dataset": "mean", **table.drop(columns="dataset").mean().to_dict()}])])


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(RECIPE), help="digits rows: a shipped recipe name or a YAML path")
    parser.add_argument("--table-recipe", default=str(TABLE_RECIPE), help="wbc / wine rows (and --timing)")
    parser.add_argument("--seeds", type=int, default=1, help="split and model seeds of the digits rows")
    parser.add_argument("--defaults", action="store_true", help="DxMIDetector() with nothing set (no recipe)")
    parser.add_argument("--odds-seeds", type=int, default=5)
    parser.add_argument("--timing", action="store_true", help="add fit times on a 10,000 x 100 table")
    parser.add_argument("--classes", type=int, default=10, help="digits classes 0..N-1")
    parser.add_argument("--scaling-choice", action="store_true",
                        help="only the MNIST-5k validation of the digits recipe's scaling (about 10 minutes)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.scaling_choice:
        print("MNIST-5k (validation family of the digits recipe's standardize: global), DxMIDetector defaults, seed 0")
        print(scaling_choice(range(args.classes)).to_string(index=False, float_format=lambda v: f"{v:.4f}"))
        return
    def read(name: str) -> dict:
        path = recipes.resolve(name)
        return recipes.detector_params(yaml.safe_load(path.read_text()), str(path))

    recipe, table_recipe = ({}, {}) if args.defaults else (read(args.recipe), read(args.table_recipe))
    table = run(recipe, table_recipe, args.odds_seeds, range(args.classes), args.seeds)
    if args.timing:
        table = pd.concat([table, pd.DataFrame([{"dataset": "synthetic 10000 x 100 (timing)",
                                                 **timing_row(table_recipe)}])])
    aurocs = [c for c in table.columns if not c.endswith(" s")]
    settings = ("DxMIDetector() defaults" if args.defaults else
                f"digits rows: recipe {Path(args.recipe).stem}; wbc / wine: recipe {Path(args.table_recipe).stem}")
    print(f"AUROC (higher is better); {settings}; torch threads=2")
    print(table[aurocs].to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print("fit seconds (one fit each, same machine, same run)")
    print(table[["dataset", *[c for c in table.columns if c.endswith(" s")]]].to_string(
        index=False, float_format=lambda v: f"{v:.2f}"))


if __name__ == "__main__":
    main()
