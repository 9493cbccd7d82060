"""One decision layer and one training schedule under every front end (issue #12)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dxmi_ad.calibration import Calibration, CalibrationError
from dxmi_ad.config import DxMIConfig
from dxmi_ad.decision import CalibratedDetector, NotCalibratedError, holdout_split
from dxmi_ad.estimator import DxMIDetector
from dxmi_ad.image import ImageDetector, split_calibration
from dxmi_ad.pixel import PixelDetector, pixel_config
from dxmi_ad.training.fit import build_model, train_model
from dxmi_ad.training.schedule import StagedTraining, StageSchedule, plan_stages

TINY = dict(dim=6, n_steps=2, energy_model="autoencoder", initial="gaussian", latent_dim=2, sampler_hidden=16,
            value_hidden=16, energy_hidden=16, sampler_layers=1, value_layers=1, energy_layers=1, batch_size=32,
            time_dim=8, n_iter=4, warmup_iter=0, ae_pretrain_iter=5, sampler_pretrain_iter=3, parameterization="eps")


def _pixel() -> PixelDetector:
    return PixelDetector(pixel_config(1, 8, n_steps=2, unet_channels=8, unet_levels=1, energy_channels=8,
                                      time_dim=8, n_iter=1, warmup_iter=0, batch_size=8, diffusion_steps=400))


def test_every_detector_shares_the_decision_layer():
    for det in (DxMIDetector(), ImageDetector(DxMIConfig()), _pixel()):
        assert isinstance(det, CalibratedDetector)
        assert det.threshold is None and getattr(det, "calibration_", None) is None
        with pytest.raises(NotCalibratedError, match="no calibration"):
            det.p_values_of(np.zeros(3))
    # one error type, caught as either of the two the detectors used to raise
    assert issubclass(NotCalibratedError, RuntimeError) and issubclass(NotCalibratedError, ValueError)


def test_one_threshold_meaning_none_under_fdr():
    det = ImageDetector(DxMIConfig())
    scores = np.linspace(0.0, 1.0, 200)
    det._set_calibration(scores, fpr=0.05)
    assert det.threshold == pytest.approx(det.calibration_.threshold) and det.threshold is not None
    det._set_calibration(None)  # no new rule: the stored target FPR is kept
    assert det.calibration_.rule == "fpr" and det.calibration_.fpr == pytest.approx(0.05)
    det._set_calibration(None, fdr=0.1)  # re-calibrate the stored scores under an FDR rule
    assert det.calibration_.rule == "fdr" and det.threshold is None  # batch-dependent: no fixed threshold
    out = det.decisions(np.array([0.1, 5.0]))
    assert out["pred_label"].tolist() == [False, True] and np.isnan(out["normalized_score"]).all()


def test_one_holdout_rule_and_fraction_range():
    fit, cal = holdout_split(100, 0.2, seed=3)
    assert len(cal) == 20 and len(fit) == 80 and not set(fit) & set(cal)
    assert (holdout_split(100, 0.2, seed=3)[1] == cal).all()  # seeded
    for bad in (-0.1, 0.95, float("nan"), True, "0.2"):
        with pytest.raises(ValueError, match=r"calibration fraction must be a number in \[0, 0.9\]"):
            holdout_split(10, bad, seed=0)
    with pytest.raises(ValueError, match="calibration fraction"):  # the image split uses the same check
        split_calibration([], 0.95, 0)
    with pytest.raises(ValueError, match="calibration fraction"):  # and the pixel detector (was [0, 1))
        _pixel().fit(np.zeros((10, 8, 8)), calibration=0.95)


def test_pixel_detector_refuses_an_unsupported_rate_before_training(monkeypatch):
    det = _pixel()
    monkeypatch.setattr("dxmi_ad.pixel.train_model", lambda *a, **k: pytest.fail("trained before the rate check"))
    with pytest.raises(CalibrationError, match="needs at least 99 calibration images, got 4"):
        det.fit(np.random.default_rng(0).random((20, 8, 8)), calibration=0.2, fpr=0.01)


def test_fitted_attributes_have_one_spelling():
    det = ImageDetector(DxMIConfig())
    for name in ("model_", "calibration_", "history_"):
        assert hasattr(det, name)
    for old in ("model", "calibration", "history"):
        assert not hasattr(det, old)


def test_the_stage_schedule_is_the_same_object_for_the_loop_and_for_step_by_step_training():
    """train_model's pre-training and StagedTraining.step (the anomalib module's path) give the same weights."""
    cfg = DxMIConfig(**TINY)
    data = torch.randn(64, 6)
    data = data / data.norm(dim=1, keepdim=True)
    torch.manual_seed(0)
    looped = build_model(cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    staged = StagedTraining(looped, cfg, plan_stages(cfg))
    from dxmi_ad.training.dxdp import random_batch

    staged.pretrain(lambda: random_batch(data, cfg.batch_size, gen), gen)
    torch.manual_seed(0)
    stepped = build_model(cfg)
    gen2 = torch.Generator().manual_seed(cfg.seed)
    one = StagedTraining(stepped, cfg, plan_stages(cfg))
    stages = []
    while one.stage != "dxmi":
        stages.append(one.stage)
        one.step(random_batch(data, cfg.batch_size, gen2), gen2)
    assert stages == ["autoencoder"] * 5 + ["sampler"] * 3
    for (k, a), b in zip(looped.state_dict().items(), stepped.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    # and both pre-training stages really changed their networks (the anomalib path used to skip the sampler's)
    torch.manual_seed(0)
    fresh = build_model(cfg)
    for part in ("sampler", "energy"):
        before, after = getattr(fresh, part).state_dict(), getattr(looped, part).state_dict()
        assert any(not torch.equal(before[k], after[k]) for k in before), part


def test_train_model_runs_the_schedule_it_plans():
    cfg = DxMIConfig(**TINY)
    data = torch.randn(64, 6)
    seen = []
    train_model(data / data.norm(dim=1, keepdim=True), cfg,
                progress=lambda stage, i, total, m: seen.append((stage, total)), log_every=1)
    stages = plan_stages(cfg)
    assert stages == StageSchedule(5, 3, 4, 0)
    assert ("autoencoder", 5) in seen and ("sampler", 3) in seen and ("dxmi", 4) in seen


def test_old_config_key_energy_still_loads():
    cfg = DxMIConfig.from_dict({"energy": "mlp", "dim": 4, "initial": "gaussian"})
    assert cfg.energy_model == "mlp" and "energy" not in cfg.to_dict()


def test_stored_calibration_round_trip_through_the_base(tmp_path):
    det = ImageDetector(DxMIConfig())
    det.calibration_ = Calibration.fit(np.linspace(0, 1, 50), fpr=0.1)
    det._save_calibration(tmp_path)
    other = ImageDetector(DxMIConfig())
    assert other._load_calibration(tmp_path).threshold == pytest.approx(det.calibration_.threshold)
    other.calibration_ = None
    other._save_calibration(tmp_path)  # no rule: a stale file is removed
    assert not (tmp_path / "calibration.json").exists()


def test_old_energy_key_is_read_by_every_recipe_loader(tmp_path):
    from dxmi_ad.cli.images import ImageCLIError, load_image_recipe
    from dxmi_ad.cli.pixel import load_pixel_recipe
    from dxmi_ad.training.schedule import is_autoencoder

    recipe = load_image_recipe(None, {"model.energy": "autoencoder"})  # a --set written for version 0.1
    assert recipe["model"]["energy_model"] == "autoencoder" and "energy" not in recipe["model"]
    with pytest.raises(ImageCLIError, match="disagree"):
        load_image_recipe(None, {"model.energy": "mlp", "model.energy_model": "autoencoder"})
    assert load_pixel_recipe(None, "digits", {"energy": "shared"}, 0)["model"]["energy_model"] == "shared"
    assert not is_autoencoder({"energy": "mlp"}) and is_autoencoder({})
