"""``standardize="global"``: one scale for features in the same units (issue #13, "vectors": digits vs LOF).

Per-feature standardization divides each pixel by its spread in the normal class, so a pixel that is nearly always 0
there turns every stray stroke of a normal test image into a large deviation. Chosen on MNIST-5k (a validation
family, not the digits benchmark), then measured on digits (README).
"""

from __future__ import annotations

import json

import numpy as np
import yaml
from sklearn.neighbors import LocalOutlierFactor
from typer.testing import CliRunner

from dxmi_ad import DxMIDetector, recipes
from dxmi_ad.cli.main import app
from dxmi_ad.data.tabular import digits_split
from dxmi_ad.metrics import auroc

TINY = dict(n_iter=2, ae_pretrain_iter=5, hidden=8, n_layers=1, device="cpu", random_state=0)


def test_global_scaling_divides_every_feature_by_one_scale_and_survives_save_load(tmp_path):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 4)) * np.array([1.0, 2.0, 3.0, 0.001]) + np.array([5.0, 0.0, -1.0, 2.0])
    det = DxMIDetector(standardize="global", validate_every=0, calibration_fraction=0, **TINY).fit(X)
    expected = np.sqrt(np.mean(X.std(0) ** 2))  # the root mean variance: about sqrt((1 + 4 + 9) / 4)
    np.testing.assert_allclose(det.scale_, expected, rtol=1e-5)
    np.testing.assert_allclose(det.mean_, X.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(det._transform(X[:5]).numpy(), (X[:5] - X.mean(0)) / expected, rtol=1e-4, atol=1e-5)
    det.save(tmp_path / "m")
    again = DxMIDetector.load(tmp_path / "m")
    assert again.standardize == "global"
    np.testing.assert_allclose(again.energy(X[:20]), det.energy(X[:20]), rtol=1e-6)
    assert DxMIDetector(standardize=True, validate_every=0, calibration_fraction=0, **TINY).fit(X).scale_[3] < 0.01
    # one scale means one constant-feature guard: a large offset in one column does not reset its scale to 1
    tiny = rng.normal(size=(300, 3)) * 1e-3 + np.array([0.0, 0.0, 1e6])
    det = DxMIDetector(standardize="global", validate_every=0, calibration_fraction=0, **TINY).fit(tiny)
    assert len(set(det.scale_.tolist())) == 1


def test_the_shipped_recipes_scale_pixels_globally_and_tables_per_feature():
    runner = CliRunner()
    for dataset, expected in (("digits", "global"), ("mnist", "global"), ("wbc", True), ("wine", True)):
        res = runner.invoke(app, ["train", "--dataset", dataset, "--dry-run"])
        assert res.exit_code == 0, res.output
        shown = json.loads(res.stdout[res.stdout.index("{"):])
        assert shown["standardize"] == expected, (dataset, shown["standardize"])
    tables = recipes.detector_params(yaml.safe_load(recipes.path("tables").read_text()))
    # the tables recipe is DxMIDetector()'s defaults on 4+ features (what the README says), digits differs in scaling
    ours, default = (DxMIDetector(**p)._make_config(30, 1000).replace(seed=0).to_dict() for p in (tables, {}))
    assert ours == default
    defaults = DxMIDetector().get_params()
    assert all(defaults[k] in (v, None) for k, v in tables.items() if k != "energy_model"), tables
    digits = recipes.detector_params(yaml.safe_load(recipes.path("digits").read_text()))
    assert {k for k in digits if digits[k] != tables.get(k)} == {"standardize"}


def test_global_scaling_beats_per_feature_on_the_hardest_digits_and_reaches_lof():
    """Digits 3 and 8 (per-feature scaling's two weakest classes), the autoencoder energy alone, 300 steps (the
    scaling is what is tested; DxMI on top is in the README's table): per-feature 0.951 / 0.949, global 0.993 / 0.992,
    LOF 0.990 / 0.981 (seed 0)."""
    ours, per_feature, lof = [], [], []
    for c in (3, 8):
        sp = digits_split(c, seed=0)
        y = sp.test_label

        def auc(s: np.ndarray) -> float:
            return auroc(s[y == 0], s[y == 1])

        params = dict(n_iter=0, ae_pretrain_iter=300, device="cpu", random_state=0)
        ours.append(auc(DxMIDetector(standardize="global", **params).fit(sp.train).energy(sp.test)))
        per_feature.append(auc(DxMIDetector(standardize=True, **params).fit(sp.train).energy(sp.test)))
        lof.append(auc(-LocalOutlierFactor(n_neighbors=20, novelty=True).fit(sp.train).score_samples(sp.test)))
    assert np.mean(ours) > np.mean(per_feature) + 0.02, (ours, per_feature)
    assert np.mean(ours) >= np.mean(lof) - 0.005, (ours, lof)
