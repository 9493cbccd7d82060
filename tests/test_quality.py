"""Quality on real data and on the paper's toy, with bounds that can fail (fast versions of the benchmarks).

* 8 Gaussians (paper Table 1): with entropy (tau = 0.1) the energy separates test data from uniform noise on
  [-4, 4]^2 with AUC > 0.80, and without entropy (tau = 0) the AUC is at least 0.1 lower: the paper's claim that
  the entropy term is what makes the energy useful (docs/paper_map.md).
* digits: mean AUROC over the ten one-class tasks is above the Ledoit-Wolf Mahalanobis baseline minus 0.01.

The full-length versions take about 6 and 5 minutes on 2 cores and are marked ``slow`` (``python -m pytest -m slow``);
the default suite runs the digits check on three classes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from dxmi_ad import DxMIDetector, recipes
from dxmi_ad.data.synthetic import eight_gaussians, uniform_box
from dxmi_ad.data.tabular import digits_split
from dxmi_ad.metrics import auroc

RECIPES = Path(__file__).resolve().parents[1] / "dxmi_ad" / "recipes"


def _eight_gaussians_auc(tau: float, n_iter: int) -> float:
    recipe = recipes.detector_params(yaml.safe_load((RECIPES / "eight_gaussians.yaml").read_text()))
    recipe.update(entropy_weight=tau, velocity_weight=tau, n_iter=n_iter, random_state=0, device="cpu")
    det = DxMIDetector(**recipe).fit(eight_gaussians(50_000, 0))
    return auroc(det.energy(eight_gaussians(10_000, 123)), det.energy(uniform_box(10_000, 7)))


@pytest.mark.slow
def test_eight_gaussians_entropy_makes_the_energy_useful():
    auc_tau = _eight_gaussians_auc(0.1, n_iter=2000)  # the recipe's length (benchmark, seed 0: 0.844 vs 0.494)
    auc_zero = _eight_gaussians_auc(0.0, n_iter=2000)
    assert auc_tau > 0.80
    assert auc_zero < auc_tau - 0.1


def _digits_vs_mahalanobis(classes: range) -> None:
    from benchmarks.digits import mahalanobis_scores

    recipe = recipes.detector_params(yaml.safe_load((RECIPES / "digits.yaml").read_text()))
    recipe.update(n_iter=150, ae_pretrain_iter=800, random_state=0, device="cpu")
    ours, maha = [], []
    for c in classes:
        sp = digits_split(c)
        y = sp.test_label
        e = DxMIDetector(**recipe).fit(sp.train).energy(sp.test)
        m = mahalanobis_scores(sp.train, sp.test)
        ours.append(auroc(e[y == 0], e[y == 1]))
        maha.append(auroc(m[y == 0], m[y == 1]))
    assert np.mean(ours) > np.mean(maha) - 0.01, (np.round(ours, 4), np.round(maha, 4))
    assert min(ours) > 0.9


@pytest.mark.slow
def test_digits_mean_auroc_not_below_mahalanobis():
    _digits_vs_mahalanobis(range(10))


def test_digits_mean_auroc_not_below_mahalanobis_on_three_classes():
    _digits_vs_mahalanobis(range(3))
