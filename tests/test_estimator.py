"""DxMIDetector: scikit-learn contract, polarity, reproducibility, persistence, bad input, pyod adapter."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.utils.estimator_checks import check_estimator

from dxmi_ad import DxMIDetector, PyODDxMIDetector
from tests.conftest import TINY


@pytest.fixture(scope="module")
def blobs():
    rng = np.random.default_rng(0)
    normal = rng.normal(0, 1, (300, 5))
    outliers = rng.normal(0, 1, (60, 5)) + 6.0
    return normal, outliers


@pytest.fixture(scope="module")
def fitted(blobs):
    params = {**TINY, "n_iter": 30, "ae_pretrain_iter": 300, "hidden": 32, "latent_dim": 3, "warmup_iter": 5}
    return DxMIDetector(random_state=0, **params).fit(blobs[0])


def test_check_estimator():
    # contamination as a fraction (scikit-learn's meaning: that share of the fit rows is flagged): the default
    # calibrated rule thresholds at held-out rows and may rightly flag none of sklearn's blob rows, which
    # check_outliers_fit_predict requires
    check_estimator(DxMIDetector(random_state=0, contamination=0.1, **TINY))


def test_polarity_and_contract(fitted, blobs):
    normal, outliers = blobs
    e_in, e_out = fitted.energy(normal), fitted.energy(outliers)
    assert e_out.mean() > e_in.max() * 0.5 and np.median(e_out) > np.quantile(e_in, 0.99)
    X = np.r_[normal, outliers]
    np.testing.assert_allclose(fitted.score_samples(X), -fitted.energy(X))
    np.testing.assert_allclose(fitted.decision_function(X), fitted.score_samples(X) - fitted.offset_)
    assert set(np.unique(fitted.predict(X))) <= {-1, 1}
    assert (fitted.predict(outliers) == -1).mean() > 0.9
    # contamination="auto": calibrated on the held-out rows (60 of 300: the smallest supported rate, 1/61)
    assert fitted.calibration_.rule == "fpr" and len(fitted.calibration_.scores) == 60
    assert fitted.calibration_.fpr == pytest.approx(1 / 61)
    assert (fitted.predict(normal) == -1).mean() <= 0.04


def test_fit_is_reproducible_and_leaves_params(blobs):
    params = {**TINY, "n_iter": 10, "ae_pretrain_iter": 20}
    a = DxMIDetector(random_state=3, **params)
    before = a.get_params()
    ea = a.fit(blobs[0]).energy(blobs[1])
    eb = clone(a).fit(blobs[0]).energy(blobs[1])
    np.testing.assert_array_equal(ea, eb)
    assert a.get_params() == before


def test_save_load_roundtrip(fitted, blobs, tmp_path):
    fitted.save(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["calibration.json", "config.json",
                                                                  "model.safetensors"]
    loaded = DxMIDetector.load(tmp_path / "m")
    X = np.r_[blobs[0][:20], blobs[1][:20]]
    np.testing.assert_array_equal(loaded.energy(X), fitted.energy(X))
    np.testing.assert_array_equal(loaded.predict(X), fitted.predict(X))
    np.testing.assert_array_equal(loaded.sample(5, random_state=1), fitted.sample(5, random_state=1))
    assert (loaded.selected_iteration_, loaded.validation_auroc_) == (fitted.selected_iteration_,
                                                                      fitted.validation_auroc_)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        DxMIDetector.load(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not a tensor file")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="not a valid safetensors|does not hold"):
        DxMIDetector.load(tmp_path)


def test_sample_shape_and_units(fitted, blobs):
    xs = fitted.sample(200, random_state=0)
    assert xs.shape == (200, 5) and np.isfinite(xs).all()
    assert abs(xs.mean() - blobs[0].mean()) < 1.0  # original units, not standardised ones
    with pytest.raises(ValueError, match="n_samples"):
        fitted.sample(0)


@pytest.mark.parametrize(
    ("X", "match"),
    [
        (np.array([[1.0, np.nan], [0.0, 1.0]]), "NaN"),  # NaN
        (np.array([[1.0, np.inf], [0.0, 1.0]]), "infinity"),  # inf
        (np.ones(5), "2D array"),  # wrong number of dimensions
        (np.ones((1, 3)), "minimum of 2"),  # fewer than 2 samples
    ],
)
def test_bad_fit_input(X, match):
    with pytest.raises(ValueError, match=match):
        DxMIDetector(**TINY).fit(X)


def test_bad_predict_input(fitted):
    with pytest.raises(ValueError, match="features"):
        fitted.energy(np.ones((3, 4)))
    with pytest.raises(NotFittedError):
        DxMIDetector().predict(np.ones((3, 5)))


def test_bad_parameter_names_the_value():
    with pytest.raises(ValueError, match="energy_model"):
        DxMIDetector(energy_model="nope", **TINY).fit(np.ones((4, 2)))


def test_pyod_adapter(blobs):
    normal, outliers = blobs
    det = PyODDxMIDetector(random_state=0, **{**TINY, "ae_pretrain_iter": 200, "hidden": 32, "latent_dim": 3})
    det.fit(normal)
    assert det.threshold_ == pytest.approx(np.percentile(det.decision_scores_, 90), rel=1e-6)
    assert det.labels_.mean() == pytest.approx(0.1, abs=0.01)
    np.testing.assert_allclose(det.decision_function(outliers), det.energy(outliers))
    assert set(np.unique(det.predict(np.r_[normal, outliers]))) == {0, 1}
    proba = det.predict_proba(outliers)
    assert proba.shape == (60, 2) and np.allclose(proba.sum(1), 1)
    # pyod's predict_confidence (ExCeeD): the formula on the training energies, in [0, 1]
    from scipy.stats import binom

    X = np.r_[normal[:20], outliers[:20]]
    conf = det.predict_confidence(X)
    n = len(det.decision_scores_)
    k = np.array([np.count_nonzero(det.decision_scores_ <= e) for e in det.energy(X)])
    expected = 1 - binom.cdf(n - int(n * 0.1), n, (1 + k) / (2 + n))
    flagged = det.predict(X) == 1
    np.testing.assert_allclose(conf, np.where(flagged, expected, 1 - expected))
    assert conf.shape == (40,) and ((conf >= 0) & (conf <= 1)).all()
    assert conf[flagged].size and conf[~flagged].size  # both kinds of prediction are covered


def test_pyod_adapter_clone_and_reload_keep_everything(blobs, tmp_path):
    det = PyODDxMIDetector(random_state=0, **{**TINY, "spherical": True})
    assert clone(det).get_params() == det.get_params()  # every parameter survives (not only contamination)
    det.fit(blobs[0])
    det.save(tmp_path / "p")
    back = PyODDxMIDetector.load(tmp_path / "p")
    assert back.spherical is True
    np.testing.assert_array_equal(back.predict_proba(blobs[1]), det.predict_proba(blobs[1]))


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda m: m["config"].update(n_steps="5"), "n_steps must be an integer"),  # wrong type
        (lambda m: m["params"].update(bogus=1), "invalid or tampered"),  # unknown parameter
        (lambda m: m.pop("n_features_in"), "invalid or tampered"),  # missing field
        (lambda m: m["config"].update(spherical="no"), "true or false"),  # string for a bool
    ],
)
def test_tampered_config_is_refused_cleanly(fitted, tmp_path, edit, match):
    import json

    fitted.save(tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "config.json").read_text())
    edit(meta)
    (tmp_path / "m" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=match):
        DxMIDetector.load(tmp_path / "m")


def test_ddpm_pretraining_with_autoencoder_start_is_refused():
    with pytest.raises(ValueError, match="initial='gaussian'"):
        DxMIDetector(energy_model="autoencoder", sampler_pretrain_iter=5, **TINY).fit(
            np.random.default_rng(0).normal(size=(20, 3)))


def test_verbose_true_prints_progress_on_stderr(capsys):
    """``verbose=True`` used to print nothing (only a callable worked): now one line per stage and every 10% of it,
    with the energies, on stderr; ``verbose=False`` stays silent."""
    X = np.random.default_rng(0).normal(size=(300, 4))
    DxMIDetector(verbose=True, n_iter=20, ae_pretrain_iter=20, warmup_iter=5, random_state=0).fit(X)
    err = capsys.readouterr().err
    assert "dxmi-ad autoencoder 20/20 (100%)" in err and "dxmi-ad dxmi 20/20 (100%)" in err and "E(data)" in err
    DxMIDetector(n_iter=20, ae_pretrain_iter=20, warmup_iter=5, random_state=0).fit(X)
    assert "dxmi-ad" not in capsys.readouterr().err
