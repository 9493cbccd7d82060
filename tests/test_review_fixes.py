"""Defects found by reviewing the #11 / #13 change, each pinned by a test that failed before its fix."""

from __future__ import annotations

import json
import re
import warnings

import numpy as np
import pytest
import torch

from dxmi_ad.config import DxMIConfig
from dxmi_ad.training.fit import train_model
from dxmi_ad.training.runtime import Runtime

SMALL = dict(dim=8, n_steps=2, energy_model="mlp", spherical=True, sampler_hidden=16, value_hidden=16, energy_hidden=16,
             sampler_layers=1, value_layers=1, energy_layers=1, batch_size=16, n_iter=6, warmup_iter=0,
             ae_pretrain_iter=0, energy_lr=1e-2, validate_every=1, time_dim=8, initial="gaussian")


def test_selection_survives_a_kill_and_resume(tmp_path):
    """The best validated state travels with the checkpoints: a resumed run selects as an uninterrupted one."""
    data = torch.nn.functional.normalize(torch.randn(64, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    cfg = DxMIConfig(**SMALL)
    ref: dict[str, torch.Tensor] = {}

    def validate(model):  # best = the untrained start
        flat = torch.cat([p.detach().flatten() for p in model.energy.parameters()])
        ref.setdefault("p", flat.clone())
        return float(-(flat - ref["p"]).norm())

    whole, h1 = train_model(data, cfg, runtime=Runtime(accelerator="cpu", checkpoint_dir=str(tmp_path / "a"),
                                                       checkpoint_every=1), validate=validate)
    ref.clear()
    train_model(data, cfg, runtime=Runtime(accelerator="cpu", checkpoint_dir=str(tmp_path / "b"), checkpoint_every=1,
                                           stop_after=3), validate=validate)
    resumed, h2 = train_model(data, cfg, runtime=Runtime(accelerator="cpu", checkpoint_dir=str(tmp_path / "b"),
                                                         checkpoint_every=1, resume=True), validate=validate)
    assert h1[-1]["selected_iteration"] == h2[-1]["selected_iteration"] == 0
    for name, tensor in whole.checkpoint_tensors().items():
        torch.testing.assert_close(resumed.checkpoint_tensors()[name], tensor)


def test_validate_every_without_a_validation_split_warns():
    data = torch.nn.functional.normalize(torch.randn(32, 8, generator=torch.Generator().manual_seed(1)), dim=-1)
    with pytest.warns(UserWarning, match="no validation split"):
        train_model(data, DxMIConfig(**{**SMALL, "n_iter": 1}))


def test_pil_images_one_or_three_pixels_tall_are_channels_last():
    from PIL import Image

    from dxmi_ad.image import to_image_batch

    red = np.zeros((3, 50, 3), np.uint8)
    red[..., 0] = 255
    batch = to_image_batch(Image.fromarray(red), 64)
    assert batch.shape == (1, 3, 3, 50)
    torch.testing.assert_close(batch[0].mean((1, 2)), torch.tensor([1.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="ambiguous"):
        to_image_batch(red, 64)  # (3, 50, 3): channels first or last?
    with pytest.raises(ValueError, match="ambiguous"):
        to_image_batch(np.zeros((2, 3, 40, 3), np.uint8), 64)


def test_a_killed_replacement_restores_the_previous_result(tmp_path):
    from dxmi_ad.checkpoint import remove_stale_temporaries

    backup = tmp_path / ".run.old.pid999999.abcd1234"  # moved aside by a writer killed before its rename
    backup.mkdir()
    (backup / "model.safetensors").write_text("previous")
    (tmp_path / ".run.pid999999.efgh5678").mkdir()  # that writer's unfinished new result
    removed = remove_stale_temporaries(tmp_path, re.escape("run"))
    assert [p.name for p in removed] == [".run.pid999999.efgh5678"]
    assert (tmp_path / "run" / "model.safetensors").read_text() == "previous"


def test_synthetic_anomaly_sources_do_not_depend_on_directory_order(monkeypatch):
    from anomalib.data.utils.generators import perlin

    from dxmi_ad.validation import synthetic_anomalies

    normals = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    sources = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    want, _ = synthetic_anomalies(normals, sources, seed=3)
    real_init = perlin.PerlinAnomalyGenerator.__init__

    def reversed_listing(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self.anomaly_source_paths = list(reversed(sorted(self.anomaly_source_paths)))  # another file system

    monkeypatch.setattr(perlin.PerlinAnomalyGenerator, "__init__", reversed_listing)
    got, _ = synthetic_anomalies(normals, sources, seed=3)
    torch.testing.assert_close(got, want)


def test_a_features_section_that_does_not_fit_the_weights_is_refused(tmp_path):
    from dxmi_ad.image import FeatureSettings, ImageDetector
    from dxmi_ad.training.fit import build_model

    cfg = DxMIConfig(dim=192, energy_model="autoencoder", spherical=True, energy_hidden=16, energy_layers=1, latent_dim=4,
                     sampler_hidden=16, sampler_layers=1, value_hidden=16, value_layers=1, time_dim=8, n_steps=2)
    det = ImageDetector(cfg, FeatureSettings(image_size=64))
    det.model_ = build_model(cfg).eval()
    det.save(tmp_path / "run")
    path = tmp_path / "run" / "config.json"
    meta = json.loads(path.read_text())
    meta["features"]["out_indices"] = [1, 2]
    path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"config.json.*64-d location vectors.*config.dim = 192"):
        ImageDetector.load(tmp_path / "run")


def test_calibrating_new_scores_does_not_inherit_the_old_rate(tmp_path):
    from dxmi_ad.image import FeatureSettings, ImageDetector

    det = ImageDetector(DxMIConfig(), FeatureSettings(image_size=64))
    rng = np.random.default_rng(0)
    det.calibrate(scores=rng.normal(size=200), fpr=0.2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cal = det.calibrate(scores=rng.normal(size=200))
    assert cal.fpr == pytest.approx(0.01)  # the default, not the previous 0.2
    assert det.calibrate().fpr == pytest.approx(0.01)  # re-calibrating the stored scores keeps the stored rate


def test_traced_scorer_resizes_inputs_of_any_size():
    """A graph traced at the model's input size still resizes other sizes (the resize is never skipped)."""
    from dxmi_ad.export import Scorer
    from dxmi_ad.image import FeatureSettings, ImageDetector
    from dxmi_ad.training.fit import build_model

    det = ImageDetector(DxMIConfig(energy_model="autoencoder", spherical=True, energy_hidden=16, energy_layers=1,
                                   latent_dim=4, sampler_hidden=16, sampler_layers=1, value_hidden=16, value_layers=1,
                                   time_dim=8, n_steps=2), FeatureSettings(image_size=64))
    det.config = det.config.replace(dim=det._extractor().channels)
    det.model_ = build_model(det.config).eval()
    traced = torch.jit.trace(Scorer(det), torch.rand(1, 3, 64, 64))  # traced at the model size
    other = torch.rand(2, 3, 40, 72, generator=torch.Generator().manual_seed(0))
    score, amap = traced(other)
    ref = det.predict(other)
    torch.testing.assert_close(score, ref["pred_score"], rtol=1e-4, atol=1e-6)
    assert amap.shape == (2, 40, 72)
