"""Quality on real data and on the paper's toy, with bounds that can fail (fast versions of the benchmarks).

* 8 Gaussians (paper Table 1): the recipe's energy separates test data from uniform noise on [-4, 4]^2 with
  AUC > 0.86 and its sampler reaches SW < 0.1; without entropy (tau = 0) the sampler leaves the data (SW more than
  10 times higher). With gamma 0.5 the energy's AUC shows the entropy effect too (seed 0: 0.893 vs 0.797; README).
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
from dxmi_ad.metrics import auroc, sliced_wasserstein

RECIPES = Path(__file__).resolve().parents[1] / "dxmi_ad" / "recipes"


def _eight_gaussians_run(tau: float, n_iter: int) -> tuple[float, float]:
    """(AUC of the energy, test vs uniform box; sliced Wasserstein of 10k samples to the test points)."""
    recipe = recipes.detector_params(yaml.safe_load((RECIPES / "eight_gaussians.yaml").read_text()))
    recipe.update(entropy_weight=tau, velocity_weight=tau, n_iter=n_iter, random_state=0, device="cpu")
    det = DxMIDetector(**recipe).fit(eight_gaussians(50_000, 0))
    test = eight_gaussians(10_000, 123)
    auc = auroc(det.energy(test), det.energy(uniform_box(10_000, 7)))
    samples = det.sample(10_000, random_state=11)
    return auc, sliced_wasserstein(samples, test) if np.isfinite(samples).all() else float("inf")


@pytest.mark.slow
def test_eight_gaussians_recipe_and_the_entropy_effect():
    """The recipe's energy (selected on held-out rows) and its final sampler; without the entropy term the sampler
    leaves the data (benchmark, seed 0, before the base energy: SW 0.075 vs 42). At gamma 1 the recipe's AUC did not
    show the entropy effect (the energy is selected at its early peak, before the sampler without entropy leaves);
    at gamma 0.5 it does. Seed 0 with the Gaussian base energy and gamma 0.5: AUC 0.893 (paper 0.898), SW 0.064
    (gamma 1: 0.897, 0.074); without the entropy term AUC 0.797, SW 1.24 (gamma 1: SW 0.45; 42 without the base energy)."""
    auc_tau, sw_tau = _eight_gaussians_run(0.1, n_iter=2000)  # the recipe's length
    auc_zero, sw_zero = _eight_gaussians_run(0.0, n_iter=2000)
    assert auc_tau > 0.885 and sw_tau < 0.1
    assert sw_zero > 4 * sw_tau and auc_zero < auc_tau - 0.03


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
