"""Calibrated decisions: conformal thresholds and p-values, BH, F1, and the promises on real data (digits, textures)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from scipy.stats import false_discovery_control

from dxmi_ad import recipes
from dxmi_ad.calibration import (
    Calibration,
    CalibrationError,
    bh_reject,
    calibration_check,
    conformal_p_values,
    conformal_threshold,
    min_calibration_size,
    resolve_fpr,
    summarize_checks,
)

FPR, FDR = 0.05, 0.1


# ---------------------------------------------------------------------- the rules themselves
def test_conformal_threshold_is_the_right_order_statistic():
    cal = np.arange(1.0, 40.0)  # n = 39: k = ceil(40 x 0.95) = 38
    t = conformal_threshold(cal, 0.05)
    assert 38.0 <= t < 39.0
    assert (cal > t).sum() == 1  # one of 39 above: (n + 1 - k) / (n + 1) = 2/40 = alpha exactly for new points
    assert conformal_threshold(cal, 0.025) > 39.0  # k = n: above the largest


def test_too_small_calibration_is_refused_with_the_minimum():
    assert min_calibration_size(0.001) == 999 and min_calibration_size(0.05) == 19 and min_calibration_size(0.1) == 9
    with pytest.raises(CalibrationError, match="at least 999 calibration samples, got 50"):
        Calibration.fit(np.random.default_rng(0).normal(size=50), fpr=0.001)
    with pytest.raises(CalibrationError, match="at least 19"):
        Calibration.fit(np.ones(10), fdr=0.05)
    with pytest.raises(CalibrationError, match="non-finite"):
        Calibration.fit(np.array([1.0, np.nan, 2.0]))
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        conformal_threshold(np.ones(100), 1.5)
    with pytest.warns(UserWarning, match="cannot support the default"):
        assert resolve_fpr(None, 36) == pytest.approx(1 / 37)
    assert resolve_fpr(0.2, 3) == 0.2  # a requested rate is kept (and refused later if unsupported)


def test_p_values_are_never_zero_and_match_the_formula():
    cal = np.array([0.1, 0.2, 0.2, 0.5])
    p = conformal_p_values(cal, np.array([0.0, 0.2, 0.3, 9.0, np.nan]))
    np.testing.assert_allclose(p[:4], [5 / 5, 4 / 5, 2 / 5, 1 / 5])
    assert np.isnan(p[4]) and (p[:4] > 0).all()


def test_bh_is_scipys():
    p = np.random.default_rng(1).uniform(size=200) ** 3
    np.testing.assert_array_equal(bh_reject(p, 0.1), false_discovery_control(p) <= 0.1)
    assert not bh_reject(np.array([np.nan, 0.5]), 0.1).any()


def test_f1_rule_and_its_refusal_without_anomalies():
    rng = np.random.default_rng(0)
    cal = rng.normal(size=200)
    s = np.r_[rng.normal(size=300), rng.normal(4, 1, size=60)]
    y = np.r_[np.zeros(300, int), np.ones(60, int)]
    c = Calibration.fit(cal, validation=(s, y))
    assert c.rule == "f1" and 1.0 < c.threshold < 4.0 and c.validation["f1"] > 0.8
    with pytest.warns(UserWarning, match="no anomalies"):
        c = Calibration.fit(cal, fpr=0.05, validation=(s[:300], y[:300]))
    assert c.rule == "fpr" and c.decide(s[:300]).mean() < 0.15  # never "flag everything"
    with pytest.warns(UserWarning, match="no normal samples"):
        Calibration.fit(cal, fpr=0.05, validation=(s[300:], y[300:]))


def test_normalized_score_and_round_trip(tmp_path):
    cal = np.linspace(0, 1, 101)
    c = Calibration.fit(cal, fpr=0.1)
    norm = c.normalized(np.array([c.threshold, -5.0, 5.0]))
    np.testing.assert_allclose(norm, [0.5, 0.0, 1.0])
    c.save(tmp_path)
    back = Calibration.load(tmp_path)
    assert back.describe() == c.describe()
    np.testing.assert_array_equal(back.scores, c.scores)
    record = json.loads((tmp_path / "calibration.json").read_text())
    (tmp_path / "calibration.json").write_text(json.dumps({**record, "rule": "everything"}))
    with pytest.raises(ValueError, match="unknown rule"):
        Calibration.load(tmp_path)


# ---------------------------------------------------------------------- the estimator API
def test_detector_p_value_predict_calibrate_save(tmp_path):
    from sklearn.datasets import load_digits

    from dxmi_ad import DxMIDetector, load

    X, y = load_digits(return_X_y=True)
    normal = X[y == 0]
    det = DxMIDetector(n_iter=10, ae_pretrain_iter=200, hidden=64, random_state=0, calibration_fraction=0.25,
                       fpr=0.05, device="cpu").fit(normal)
    assert len(det.calibration_.scores) == int(0.25 * len(normal)) and det.calibration_.rule == "fpr"
    p_anom = det.p_value(X[y != 0])
    assert p_anom.min() > 0 and np.median(p_anom) <= 1 / (len(det.calibration_.scores) + 1) + 1e-12
    assert (det.predict(X[y != 0]) == -1).mean() > 0.9
    with pytest.raises(CalibrationError, match="at least 999"):
        det.calibrate(fpr=0.001)
    det.calibrate(fdr=0.1)
    batch = np.r_[normal[:20], X[y != 0][:20]]
    np.testing.assert_array_equal(det.predict(batch) == -1, bh_reject(det.p_value(batch), 0.1))
    det.save(tmp_path / "m")
    again = load(tmp_path / "m")
    np.testing.assert_array_equal(again.predict(batch), det.predict(batch))
    assert again.calibration_.rule == "fdr"


# ---------------------------------------------------------------------- promises on real data
def _digits_checks(n_splits: int) -> list:
    from sklearn.datasets import load_digits

    from dxmi_ad import DxMIDetector

    X, y = load_digits(return_X_y=True)
    checks = []
    for c in range(10):
        rng = np.random.default_rng(c)
        normal = X[y == c][rng.permutation(int((y == c).sum()))]
        train, cal, rest = normal[:60], normal[60:119], normal[119:]  # (59 + 1) x 0.05 = 3: the exact quantile
        anomalies = X[y != c][rng.permutation(int((y != c).sum()))[:len(rest)]]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            det = DxMIDetector(n_iter=20, ae_pretrain_iter=300, hidden=64, warmup_iter=5, calibration_fraction=0.0,
                               random_state=0, device="cpu").fit(train)
        checks.append(calibration_check(det.energy(cal), det.energy(rest), det.energy(anomalies), FPR, FDR,
                                        n_splits))
    return checks


def test_uniformity_check_counts_the_calibration_draw():
    """Exchangeable scores pass the p-value uniformity check at its level; shifted normals fail it.

    Given one calibration draw the conformal p-values are uniform only marginally, so the plain one-sample KS test
    (the check before) rejects exchangeable scores far more often than its level; the re-split null does not.
    """
    from scipy.stats import kstest

    def run(shift: float, seed: int) -> tuple[float, float]:
        rng = np.random.default_rng(seed)
        check = calibration_check(rng.normal(size=99), rng.normal(shift, size=219), rng.normal(3, size=50),
                                  n_splits=99, seed=seed)
        return summarize_checks([check])["ks_pvalue"], kstest(check["p_normal"], "uniform").pvalue

    same = np.array([run(0.0, seed) for seed in range(60)])
    assert (same[:, 0] <= 0.01).mean() <= 0.05  # at its level (binomial noise of 60 draws)
    assert (same[:, 1] <= 0.01).mean() >= 0.15  # the plain KS p-value over-rejects
    shifted = np.array([run(0.8, seed)[0] for seed in range(20)])
    assert (shifted <= 0.01).mean() >= 0.8  # normals scored higher than calibration: found


def test_promises_hold_on_digits():
    s = summarize_checks(_digits_checks(n_splits=200), FPR, FDR)
    # realised FPR on unseen normals (pooled over the 10 classes) within the binomial 99% interval of 0.05
    assert s["fpr_low"] <= s["fpr_single"] <= s["fpr_high"], s
    assert abs(s["fpr_resplit_mean"] - FPR) <= 3 * s["fpr_resplit_se"] + 0.005, s
    # normal p-values uniform, anomalies near 0
    assert s["ks_pvalue"] > 0.01, s
    assert s["anomaly_p_median"] <= 0.05 and s["anomaly_p_below_fpr"] > 0.7, s
    # BH at q = 0.1: mean false discovery proportion at most q (plus its standard error)
    assert s["fdp_mean"] <= FDR + s["fdp_se"], s
    assert s["mean_discoveries"] > 20, s  # and it does discover


def test_promises_hold_on_textures(tmp_path_factory):
    """One small unified model of the embedded textures: 20% of each texture's training tiles calibrate."""
    import yaml

    from dxmi_ad.config import DxMIConfig
    from dxmi_ad.data.mvtec import list_mvtec
    from dxmi_ad.data.textures import write_textures
    from dxmi_ad.image import FeatureSettings, ImageDetector

    recipe = yaml.safe_load(recipes.path("textures").read_text())
    recipe["model"].update(ae_pretrain_iter=300, n_iter=0)  # the calibration argument holds for any fixed scorer
    feats = FeatureSettings(**{**recipe["features"], "out_indices": tuple(recipe["features"]["out_indices"])})
    samples = list_mvtec(write_textures())
    det = ImageDetector(DxMIConfig.from_dict(recipe["model"]), feats).fit(samples, calibration=0.2, fpr=FPR)
    test = [s for s in samples if s.split == "test"]
    scores = det.score_samples(test)["pred_score"]
    labels = np.array([s.label for s in test])
    assert len(det.calibration_.scores) == 99  # 20% of the 165 training tiles of each texture, pooled like the model
    assert all("/train/good/" in f for f in det.calibration_.files)
    checks = [calibration_check(det.calibration_.scores, scores[labels == 0], scores[labels == 1], FPR, FDR,
                                n_splits=200)]
    s = summarize_checks(checks, FPR, FDR)
    # One model, one calibration draw of 99 scores: the realised FPR of that single split varies with the draw
    # (Beta(n + 1 - k, k), the conformal guarantee is marginal over draws), so it is judged against the interval that
    # counts the draw; the mean over re-splits must sit at the target.
    assert s["fpr_low_cal"] <= s["fpr_single"] <= s["fpr_high_cal"], s
    assert abs(s["fpr_resplit_mean"] - FPR) <= 3 * s["fpr_resplit_se"] + 0.005, s
    assert s["ks_pvalue"] > 0.01, s
    assert s["fdp_mean"] <= FDR + s["fdp_se"], s
    assert s["anomaly_p_median"] < 0.5, s  # textures are harder (image AUROC about 0.77)


def test_rule_switches_and_models_without_calibration(tmp_path):
    from sklearn.datasets import load_digits

    from dxmi_ad import DxMIDetector, PyODDxMIDetector, load

    X, y = load_digits(return_X_y=True)
    params = dict(n_iter=5, ae_pretrain_iter=100, hidden=32, random_state=0, device="cpu")
    det = DxMIDetector(**params, fdr=0.2).fit(X[y == 0])
    assert det.calibration_.rule == "fdr" and det.calibration_.decision_threshold is None
    det.calibrate(fpr=0.1)  # an explicit rate switches the rule back
    assert det.calibration_.rule == "fpr" and det.calibration_.fpr == 0.1
    with pytest.raises(CalibrationError, match="at least 999 calibration rows"):  # refused before training
        DxMIDetector(**params, fpr=0.001).fit(X[y == 0])
    pyod = PyODDxMIDetector(**params).fit(X[y == 0])
    pyod.calibrate(fdr=0.2)
    batch = np.r_[X[y == 0][:10], X[y != 0][:10]]
    np.testing.assert_array_equal(pyod.predict(batch), bh_reject(pyod.p_value(batch), 0.2).astype(int))
    # a model folder without calibration.json: scores work, decisions ask for calibration, calibrate() repairs it
    det.save(tmp_path / "m")
    (tmp_path / "m" / "calibration.json").unlink()
    with pytest.warns(UserWarning, match="no calibration.json"):
        bare = load(tmp_path / "m")
    assert np.isfinite(bare.energy(batch)).all()
    with pytest.raises(ValueError, match="calibrate"):
        bare.predict(batch)
    bare.calibrate(X[y == 0][:60], fpr=0.05)
    assert set(np.unique(bare.predict(batch))) <= {-1, 1}
