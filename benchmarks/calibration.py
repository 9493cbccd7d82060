"""Do calibrated decisions keep their promise on unseen data? Digits (each class as normal) and the embedded textures.

For each normal set, the model is trained on one part of the normal data; a disjoint held-out part calibrates; the
rest of the normals and the anomalies are never seen before scoring. Printed (dxmi_ad.calibration.summarize_checks):

* realised false-positive rate at target 0.05 on the unseen normals (pooled over classes) beside the binomial 99%
  interval of 0.05 for that many normals (test-sample noise only), the 99% interval that also counts the draw of the
  calibration set (beta-binomial; the right yardstick for small calibration sets), and its mean over repeated
  calibration/test re-splits;
* uniformity of the unseen normals' conformal p-values: their Kolmogorov-Smirnov statistic against U(0, 1) ranked
  among the same statistic on the re-splits (given one calibration draw the p-values are uniform only marginally, so
  the plain KS p-value would reject exchangeable data far too often); median p-value of anomalies
  and the fraction of anomalies with p <= 0.05;
* Benjamini-Hochberg at q = 0.1 on batches of unseen normals plus as many anomalies: mean false discovery proportion
  over the re-splits, with its standard error.

    python benchmarks/calibration.py [--threads 2] [--splits 200] [--skip-textures]
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

from dxmi_ad import recipes
from dxmi_ad.calibration import calibration_check, summarize_checks

ROOT = Path(__file__).resolve().parents[1]
FPR, FDR = 0.05, 0.1


def digits_checks(params: dict, n_splits: int, seed: int = 0) -> tuple[list, float]:
    """One check per digit class: 60 training rows, 59 calibration rows ((59+1) x 0.05 = 3: exact), the rest
    unseen; anomalies: as many rows of the other classes as unseen normals (FDR batches), all of them for p-values."""
    from sklearn.datasets import load_digits

    from dxmi_ad import DxMIDetector

    X, y = load_digits(return_X_y=True)
    checks, t0 = [], time.perf_counter()
    for c in range(10):
        rng = np.random.default_rng(seed + c)
        normal = X[y == c][rng.permutation(int((y == c).sum()))]
        train, cal, rest = normal[:60], normal[60:119], normal[119:]
        anomalies = X[y != c][rng.permutation(int((y != c).sum()))[:len(rest)]]
        with warnings.catch_warnings():  # the scorer's own rule is not used here: raw energies only
            warnings.simplefilter("ignore")
            det = DxMIDetector(**{**params, "calibration_fraction": 0.0, "random_state": seed}).fit(train)
        checks.append(calibration_check(det.energy(cal), det.energy(rest), det.energy(anomalies), FPR, FDR,
                                        n_splits, seed))
    return checks, time.perf_counter() - t0


def texture_checks(recipe: dict, n_splits: int, seed: int = 0) -> tuple[list, float]:
    """One unified image model of the three textures: 20% of each texture's training tiles calibrate (held out from
    training, pooled as the model uses them); unseen normals and anomalies are the test tiles (SYNTHETIC defects)."""
    from dxmi_ad.config import DxMIConfig
    from dxmi_ad.data.mvtec import list_mvtec
    from dxmi_ad.data.textures import write_textures
    from dxmi_ad.image import FeatureSettings, ImageDetector

    feats = FeatureSettings(**{**recipe["features"], "out_indices": tuple(recipe["features"]["out_indices"])})
    samples = list_mvtec(write_textures())
    t0 = time.perf_counter()
    det = ImageDetector(DxMIConfig.from_dict({**recipe["model"], "seed": seed}), feats).fit(samples, calibration=0.2,
                                                                                          fpr=FPR)
    test = [s for s in samples if s.split == "test"]
    scores = det.score_samples(test)["pred_score"]
    labels = np.array([s.label for s in test])
    checks = [calibration_check(det.calibration_.scores, scores[labels == 0], scores[labels == 1], FPR, FDR,
                                n_splits, seed)]
    return checks, time.perf_counter() - t0


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--splits", type=int, default=200, help="calibration/test re-splits per normal set")
    parser.add_argument("--skip-textures", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = {}
    digits_params = recipes.detector_params(yaml.safe_load(recipes.path("digits").read_text()))
    checks, seconds = digits_checks(digits_params, args.splits)
    rows["digits (10 classes, recipes/digits.yaml)"] = {**summarize_checks(checks, FPR, FDR), "seconds": seconds}
    if not args.skip_textures:
        recipe = yaml.safe_load((ROOT / "dxmi_ad" / "recipes" / "textures.yaml").read_text())
        checks, seconds = texture_checks(recipe, args.splits)
        rows["textures (pooled, recipes/textures.yaml)"] = {**summarize_checks(checks, FPR, FDR), "seconds": seconds}
    table = pd.DataFrame(rows).T
    print(f"Calibration on unseen data: target FPR {FPR}, BH q = {FDR}; {args.splits} re-splits per normal set; "
          f"torch threads={args.threads}")
    cols = ["n_normal", "fpr_single", "fpr_low", "fpr_high", "fpr_low_cal", "fpr_high_cal", "fpr_resplit_mean", "fpr_resplit_se", "ks_pvalue",
            "anomaly_p_median", "anomaly_p_below_fpr", "fdp_mean", "fdp_se", "mean_discoveries", "seconds"]
    print(table[cols].to_string(float_format=lambda v: f"{v:.4f}"))


if __name__ == "__main__":
    main()
