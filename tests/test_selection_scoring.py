"""Issue #13: one scorer with energy-map blur on every scoring path, and honest model selection.

- blur parity: ImageDetector.predict, the exported graph (eager and TorchScript) and the anomalib torch model give the
  same pred_score and anomaly map with a blur, and the blur changes the scores (a path that dropped it would fail);
- selection keeps the best validated state (the pre-trained start included) and never reads the test set.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dxmi_ad.config import DxMIConfig
from dxmi_ad.scoring import MapScorer, ScoringSettings, blur_map, top_k_mean
from dxmi_ad.training.fit import build_model, train_model

TINY_HEAD = dict(energy_model="autoencoder", spherical=True, energy_hidden=16, energy_layers=1, latent_dim=4,
                 sampler_hidden=16, sampler_layers=1, value_hidden=16, value_layers=1, time_dim=8, n_steps=2,
                 batch_size=64, n_iter=6, warmup_iter=0, ae_pretrain_iter=10, init_noise_low=0.005,
                 init_noise_high=0.05)


def test_blur_map_properties():
    emap = torch.zeros(1, 15, 15)
    emap[0, 7, 7] = 1.0
    assert torch.equal(blur_map(emap, 0.0), emap)
    smooth = blur_map(emap, 1.0)
    assert smooth.shape == emap.shape
    assert abs(float(smooth.sum()) - 1.0) < 1e-5  # mass kept away from the border
    assert 0.1 < float(smooth.max()) < 0.2  # peak 1 / (2 pi sigma^2) = 0.159
    const = torch.full((2, 5, 7), 3.0)
    assert torch.allclose(blur_map(const, 2.0), const)  # reflected borders: a constant map stays constant
    tiny = torch.rand(2, 1, 2)
    assert blur_map(tiny, 5.0).shape == tiny.shape  # kernel capped at the grid size


@pytest.mark.parametrize("bad", [-1.0, float("nan"), "1", True])
def test_scoring_settings_are_validated(bad):
    with pytest.raises(ValueError, match="scoring.blur_sigma"):
        ScoringSettings(blur_sigma=bad)
    with pytest.raises(ValueError, match="unknown scoring key"):
        ScoringSettings.from_dict({"blur": 1})
    assert ScoringSettings.from_dict(None) == ScoringSettings()


@pytest.mark.parametrize("bad", [0, -2, 2.5, "3", True, float("nan")])
def test_top_k_is_validated(bad):
    with pytest.raises(ValueError, match="scoring.top_k"):
        ScoringSettings(top_k=bad)
    assert ScoringSettings(top_k=3.0).top_k == 3  # YAML may give a float; an integral one is taken


def test_top_k_mean_properties():
    emap = torch.rand(4, 5, 6, generator=torch.Generator().manual_seed(0))
    flat = emap.flatten(1)
    assert torch.equal(top_k_mean(emap, 1), flat.amax(1))  # k = 1: the paper's maximum
    torch.testing.assert_close(top_k_mean(emap, 30), flat.mean(1))  # every cell: the mean
    torch.testing.assert_close(top_k_mean(emap, 1000), flat.mean(1))  # capped at h * w
    torch.testing.assert_close(top_k_mean(emap, 3), flat.sort(1, descending=True).values[:, :3].mean(1))
    by_k = torch.stack([top_k_mean(emap, k) for k in (1, 2, 5, 10, 30)])
    assert bool((by_k[1:] <= by_k[:-1]).all())  # more cells averaged: never a larger score


@pytest.fixture(scope="module")
def detector():
    from dxmi_ad.image import FeatureSettings, ImageDetector

    feats = FeatureSettings(image_size=64)
    det = ImageDetector(DxMIConfig(**TINY_HEAD), feats, scoring=ScoringSettings(blur_sigma=1.0))
    channels = det._extractor().channels
    det.config = det.config.replace(dim=channels)
    det.model_ = build_model(det.config).eval()  # random weights: parity needs no training
    return det


def test_blur_parity_across_scoring_paths(detector, tmp_path):
    from dxmi_ad.anomalib import DxmiTorchModel
    from dxmi_ad.export import Scorer
    from dxmi_ad.image import ImageDetector

    images = torch.rand(3, 3, 64, 80, generator=torch.Generator().manual_seed(0))
    ref = detector.predict(images)
    eager = Scorer(detector)(images)
    traced = torch.jit.trace(Scorer(detector), images)(images)
    anomalib_out = DxmiTorchModel(detector._extractor(), detector.model_, detector.scoring)(
        torch.nn.functional.interpolate(images, size=(64, 64), mode="bilinear", antialias=True))
    for score, amap in (eager, traced):
        torch.testing.assert_close(score, ref["pred_score"], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(amap, ref["anomaly_map"], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(anomalib_out.pred_score, ref["pred_score"], rtol=1e-4, atol=1e-6)
    # the blur is really applied: the plain maximum differs
    plain = MapScorer(detector.model_.energy, ScoringSettings())
    with torch.no_grad():
        feats = detector._extractor()(torch.nn.functional.interpolate(images, size=(64, 64), mode="bilinear",
                                                                     antialias=True))
        unblurred, _ = plain(feats, (64, 80))
    assert float((unblurred - ref["pred_score"]).abs().max()) > 1e-4
    # saved and loaded, the setting survives
    detector.save(tmp_path / "run")
    back = ImageDetector.load(tmp_path / "run")
    assert back.scoring == ScoringSettings(blur_sigma=1.0)
    torch.testing.assert_close(back.predict(images)["pred_score"], ref["pred_score"], rtol=1e-5, atol=1e-7)


def test_top_k_parity_across_scoring_paths(detector, tmp_path):
    """pred_score with top_k = 5 (and blur 1) agrees on every path, the ONNX graph included; the maps do not move."""
    from dxmi_ad.anomalib import DxmiTorchModel
    from dxmi_ad.export import Scorer
    from dxmi_ad.image import ImageDetector

    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    plain_k = detector.predict(images)
    detector.save(tmp_path / "k1")
    det = ImageDetector.load(tmp_path / "k1")
    det.scoring = ScoringSettings(blur_sigma=1.0, top_k=5)
    ref = det.predict(images)
    assert float((ref["pred_score"] - plain_k["pred_score"]).abs().min()) > 1e-6  # top_k really changes the score
    assert bool((ref["pred_score"] <= plain_k["pred_score"]).all())  # a mean of the 5 largest <= the largest
    torch.testing.assert_close(ref["anomaly_map"], plain_k["anomaly_map"])  # the map does not depend on top_k
    eager = Scorer(det)(images)
    traced = torch.jit.trace(Scorer(det), images)(images)
    anomalib_out = DxmiTorchModel(det._extractor(), det.model_, det.scoring)(images)
    for score, amap in (eager, traced):
        torch.testing.assert_close(score, ref["pred_score"], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(amap, ref["anomaly_map"], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(anomalib_out.pred_score, ref["pred_score"], rtol=1e-4, atol=1e-6)
    det.save(tmp_path / "k5")
    assert ImageDetector.load(tmp_path / "k5").scoring == ScoringSettings(blur_sigma=1.0, top_k=5)
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from dxmi_ad.cli.images import run_settings
    from dxmi_ad.export import export_model, onnx_metadata, run_onnx

    assert run_settings(det)["pred_score"].startswith("mean of the 5 largest cells")  # report.html says so
    path = export_model(det, tmp_path / "k5.onnx")
    assert "mean of the 5 largest cells" in onnx_metadata(path)["outputs"]["pred_score"]  # the serving contract
    scores, maps = run_onnx(path, images)
    np.testing.assert_allclose(scores, ref["pred_score"].numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(maps, ref["anomaly_map"].numpy(), rtol=1e-4, atol=1e-5)


def test_changing_scoring_after_calibration_warns(detector):
    import copy

    det = copy.copy(detector)
    det.scoring = ScoringSettings(top_k=2)  # not calibrated: no warning
    det.calibration_ = object()  # any rule: its threshold is in the old scores' units
    with pytest.warns(UserWarning, match="call calibrate"):
        det.scoring = ScoringSettings(top_k=3)


def _unit_vectors(n: int, d: int, seed: int) -> torch.Tensor:
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.normalize(x, dim=1)


@pytest.mark.parametrize("trend", ["falling", "rising"])
def test_selection_keeps_the_best_validated_state(trend):
    config = DxMIConfig(**{**TINY_HEAD, "dim": 8, "validate_every": 2})
    calls: list[dict[str, torch.Tensor]] = []

    def validate(model):
        calls.append({k: v.detach().clone() for k, v in model.checkpoint_tensors().items()})
        k = len(calls)
        return 1.0 / k if trend == "falling" else float(k)

    model, history = train_model(_unit_vectors(256, 8, 0), config, validate=validate)
    assert len(calls) == 4  # after pre-training, then iterations 2, 4, 6
    vals = [r for r in history if "val_auroc" in r]
    assert [r["iteration"] for r in vals] == [0, 2, 4, 6]
    final = history[-1]
    want = 0 if trend == "falling" else 6
    assert final["selected_iteration"] == want
    kept = calls[0] if trend == "falling" else calls[-1]
    for name, tensor in model.checkpoint_tensors().items():
        torch.testing.assert_close(tensor, kept[name])
    assert math.isclose(final["best_val_auroc"], max(r["val_auroc"] for r in vals))


@pytest.mark.parametrize("energy_model", ["autoencoder", "mlp", "shared"])
def test_energy_only_selection_restores_the_energy_and_keeps_the_last_sampler(energy_model):
    """``select_energy_only``: the energy of the best validation (here the start) with the last iterate's sampler;
    the same run without it restores the whole start. Shared: the energy is the value net, restored with it."""
    head = TINY_HEAD if energy_model == "autoencoder" else {
        "energy_model": energy_model, "energy_hidden": 16, "energy_layers": 1, "sampler_hidden": 16,
        "value_hidden": 16, "sampler_layers": 1, "value_layers": 1, "n_iter": 6, "warmup_iter": 0, "batch_size": 32,
        "initial": "gaussian", "parameterization": "eps", "energy_lr": 1e-2, "sampler_lr": 1e-2, "value_lr": 1e-2}
    data = _unit_vectors(256, 8, 0)
    runs = {}
    for only in (False, True):
        config = DxMIConfig(**{**head, "dim": 8, "validate_every": 2, "select_energy_only": only, "seed": 3})
        calls: list[dict[str, torch.Tensor]] = []

        def validate(model, calls=calls):
            calls.append({k: v.detach().clone() for k, v in model.checkpoint_tensors().items()})
            return 1.0 / len(calls)  # falling: the start wins

        model, history = train_model(data, config, validate=validate)
        assert history[-1]["selected_iteration"] == 0
        assert history[-1]["selected_energy_only"] == float(only)
        runs[only] = (model.checkpoint_tensors(), calls)
    (whole, calls_whole), (partial, calls_partial) = runs[False], runs[True]
    energy = "value." if energy_model == "shared" else "energy."
    last = calls_partial[-1]  # the same seed: both runs trained identically up to the last validation
    for name, tensor in partial.items():
        torch.testing.assert_close(tensor, calls_partial[0 if name.startswith(energy) else -1][name])
        torch.testing.assert_close(whole[name], calls_whole[0][name])
    moved = [n for n in partial if n.startswith("sampler.") and not torch.equal(last[n], calls_partial[0][n])]
    assert moved, "the sampler should have trained, or the test proves nothing"


def test_selection_off_by_default_and_validated():
    model, history = train_model(_unit_vectors(128, 8, 1), DxMIConfig(**{**TINY_HEAD, "dim": 8}),
                                 validate=lambda m: pytest.fail("validate called with validate_every=0"))
    assert not any("val_auroc" in r for r in history)
    with pytest.raises(ValueError, match="validation_fraction"):
        DxMIConfig(validation_fraction=0.0)
    with pytest.raises(ValueError, match="validate_every"):
        DxMIConfig(validate_every=-1)
    for low, high in ((0.0, 0.5), (0.6, 0.4), (0.5, 1.5)):
        with pytest.raises(ValueError, match="validation_blend_low"):
            DxMIConfig(validation_blend_low=low, validation_blend_high=high)


def test_synthetic_anomalies_are_seeded_and_masked():
    from dxmi_ad.validation import synthetic_anomalies, validation_auroc

    normals = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    sources = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    a1, m1 = synthetic_anomalies(normals, sources, seed=5)
    a2, m2 = synthetic_anomalies(normals, sources, seed=5)
    assert torch.equal(a1, a2) and torch.equal(m1, m2)
    assert bool(m1.flatten(1).any(1).all())
    outside = ~m1[:, None].expand_as(normals)
    torch.testing.assert_close(a1[outside], normals[outside])  # only masked pixels change
    assert validation_auroc(lambda x: x.flatten(1).mean(1), torch.zeros(4, 2), torch.ones(4, 2)) == 1.0


def test_fainter_validation_anomalies_stay_closer_to_the_normal_image():
    """validation_blend_low/high reach the generator: a blend of 0.1-0.2 changes the masked pixels less than 1.0."""
    from dxmi_ad.validation import synthetic_anomalies

    normals = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    sources = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    full, m_full = synthetic_anomalies(normals, sources, seed=5, blend=(1.0, 1.0))
    faint, m_faint = synthetic_anomalies(normals, sources, seed=5, blend=(0.1, 0.2))
    assert torch.equal(m_full, m_faint)  # same masks: only the blend differs
    inside = m_full[:, None].expand_as(normals)
    d_full = (full - normals)[inside].abs().mean()
    d_faint = (faint - normals)[inside].abs().mean()
    assert float(d_faint) < 0.3 * float(d_full)


def test_validation_region_makes_small_local_anomalies():
    """validation_region cuts every Perlin mask to a window of that share of the side: smaller masks, nothing outside."""
    from dxmi_ad.config import DxMIConfig
    from dxmi_ad.validation import synthetic_anomalies

    normals = torch.rand(8, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    sources = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    full, m_full = synthetic_anomalies(normals, sources, seed=5)
    small, m_small = synthetic_anomalies(normals, sources, seed=5, region=0.25)
    assert bool(m_small.flatten(1).any(1).all())  # every image stays anomalous
    assert bool((m_small <= m_full).all())  # a cut of the same masks
    assert float(m_small.float().mean()) < 0.5 * float(m_full.float().mean())
    rows = m_small.any(2).sum(1)  # height of each mask's bounding box: at most the window's 0.25 * 64
    assert int(rows.max()) <= 16
    whole, m_whole = synthetic_anomalies(normals, sources, seed=5, region=1.0)  # a window as large as the image
    assert torch.equal(m_whole, m_full) and torch.equal(whole, full)
    torch.testing.assert_close(small[~m_small[:, None].expand_as(normals)], normals[~m_small[:, None].expand_as(normals)])
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="region"):
            synthetic_anomalies(normals, sources, region=bad)
        with pytest.raises(ValueError, match="validation_region"):
            DxMIConfig(validation_region=bad)


def test_validation_pixel_auroc_scores_the_map_against_the_masks():
    """validation_pixel_auroc: 1 for a map that is the mask, 0.5 for a flat map, a named error for a wrong mask."""
    from dxmi_ad.validation import validation_pixel_auroc

    normal = torch.zeros(3, 1, 8, 8)
    masks = torch.zeros(2, 8, 8, dtype=torch.bool)
    masks[0, 2:4, 2:4], masks[1, 5:, 5:] = True, True
    anomalous = masks[:, None].float()
    def oracle(x):  # the map lights up exactly on the mask
        return x[:, 0]

    assert validation_pixel_auroc(oracle, normal, anomalous, masks) == 1.0
    assert validation_pixel_auroc(lambda x: torch.ones(len(x), 8, 8), normal, anomalous, masks) == 0.5
    inverted = validation_pixel_auroc(lambda x: -x[:, 0], normal, anomalous, masks)
    assert inverted == 0.0
    with pytest.raises(ValueError, match="one mask per anomalous input"):
        validation_pixel_auroc(oracle, normal, anomalous, masks[:1])
    with pytest.raises(TypeError, match="bool tensor"):
        validation_pixel_auroc(oracle, normal, anomalous, masks.float())
    assert np.isnan(validation_pixel_auroc(oracle, normal, anomalous, torch.zeros_like(masks)))  # one class only
    assert np.isnan(validation_pixel_auroc(lambda x: torch.full((len(x), 8, 8), float("nan")), normal, anomalous,
                                           masks))


def test_validation_metric_pixel_and_mean_on_real_features(tmp_path):
    """validation_metric: the image detector's selection score is the image AUROC, the pixel AUROC of the anomaly
    map against the synthetic masks, or their mean; an unknown name is refused."""
    from dxmi_ad.data.mvtec import list_mvtec
    from dxmi_ad.image import FeatureSettings, ImageDetector, extract_training_features, split_calibration
    from dxmi_ad.training.fit import train_model
    from tests.helpers import write_mvtec_tree

    samples = [s for s in list_mvtec(write_mvtec_tree(tmp_path / "mvtec"), ["brick"]) if s.split == "train"]
    fit_part, val_part = split_calibration(samples, 0.25, 1)
    scores = {}
    for metric in ("image", "pixel", "image+pixel"):
        config = DxMIConfig(**{**TINY_HEAD, "n_iter": 0, "batch_size": 32, "validation_metric": metric})
        det = ImageDetector(config, FeatureSettings(image_size=64))
        if metric == "image":
            feats, _ = extract_training_features(fit_part, det.features, det._extractor())
            n, h, w, c = feats.shape
            model, _ = train_model(torch.from_numpy(np.asarray(feats).reshape(n * h * w, c)), config.replace(dim=c))
        scores[metric] = det._validation(val_part, fit_part, skip_bad_files=False)(model)
    assert all(0.0 <= v <= 1.0 for v in scores.values()), scores
    assert scores["pixel"] != scores["image"]
    assert scores["image+pixel"] == pytest.approx((scores["image"] + scores["pixel"]) / 2, abs=1e-12)
    with pytest.raises(ValueError, match="validation_metric"):
        DxMIConfig(validation_metric="pixels")


def test_validation_source_fills_anomalies_from_normal_noise_or_other_categories(tmp_path):
    """validation_source: the same held-out normals, anomalies filled from same-category images, Perlin noise or the
    other categories' images: three different validation scores; 'other' with one category is refused, named."""
    from dxmi_ad.data.mvtec import list_mvtec
    from dxmi_ad.image import FeatureSettings, ImageDetector, extract_training_features, split_calibration
    from dxmi_ad.training.fit import train_model
    from tests.helpers import write_mvtec_tree

    samples = [s for s in list_mvtec(write_mvtec_tree(tmp_path / "mvtec")) if s.split == "train"]
    fit_part, val_part = split_calibration(samples, 0.25, 1)
    config = DxMIConfig(**{**TINY_HEAD, "n_iter": 0, "batch_size": 32})
    det = ImageDetector(config, FeatureSettings(image_size=64))
    feats, _ = extract_training_features(fit_part, det.features, det._extractor())
    n, h, w, c = feats.shape
    model, _ = train_model(torch.from_numpy(np.asarray(feats).reshape(n * h * w, c)), config.replace(dim=c))
    scores = {}
    for source in ("normal", "noise", "other"):
        det.config = config.replace(validation_source=source)
        scores[source] = det._validation(val_part, fit_part, skip_bad_files=False)(model)
    assert all(0.0 <= v <= 1.0 for v in scores.values()) and len(set(scores.values())) == 3, scores
    one = [s for s in fit_part if s.category == "brick"]
    with pytest.raises(ValueError, match="validation_source='other' fills category 'brick'"):
        det._validation([s for s in val_part if s.category == "brick"], one, skip_bad_files=False)
    with pytest.raises(ValueError, match="validation_source must be one of"):
        DxMIConfig(validation_source="dtd")


def test_image_selection_never_reads_the_test_set(tmp_path, monkeypatch):
    """ImageDetector.fit with validate_every > 0 reads only training images and records the selected iteration."""
    import dxmi_ad.image as image_mod
    from dxmi_ad.data.mvtec import list_mvtec
    from dxmi_ad.image import FeatureSettings, ImageDetector
    from tests.helpers import write_mvtec_tree

    root = write_mvtec_tree(tmp_path / "mvtec")
    samples = list_mvtec(root, ["brick"])
    test_paths = {s.path for s in samples if s.split == "test"}
    read: list = []
    real_load = image_mod.load_image

    def spy(path, *args, **kwargs):
        read.append(path)
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(image_mod, "load_image", spy)
    config = DxMIConfig(**{**TINY_HEAD, "validate_every": 3, "validation_fraction": 0.25, "batch_size": 32})
    det = ImageDetector(config, FeatureSettings(image_size=64), scoring=ScoringSettings(blur_sigma=0.5))
    det.fit(samples, calibration=0.2, fpr=0.5, cache_dir=tmp_path / "cache")
    assert read, "the spy saw no image reads"
    assert not test_paths & set(read), "the test set was read during training"
    final = det.history_[-1]
    assert final["selected_iteration"] in (0, 3, 6)
    assert 0.0 <= final["best_val_auroc"] <= 1.0
    assert np.isfinite(final["best_val_auroc"])
    from dxmi_ad.training.fit import selection_of  # what metrics.json / the CLI report

    assert selection_of(det.history_) == (final["selected_iteration"], final["best_val_auroc"])
    assert selection_of([{"iteration": 3, "val_auroc": 0.5}]) is None
    # what the CLI prints: the counts of the split (no tile table here, so no block)
    assert "training images held out to select the model" in det.selection_split_
    assert "block" not in det.selection_split_


@pytest.mark.parametrize("variant", [1, 2])
def test_offline_lite_backbones_load_real_imagenet_weights(variant):
    """#13 item 5: Lite1 / Lite2 ImageNet weights ship in pip packages and load strictly into timm."""
    import timm
    from skimage.data import chelsea

    from dxmi_ad.features.extractor import FeatureExtractor, efficientnet_lite_state_dict

    state = efficientnet_lite_state_dict(variant)
    net = timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False)
    net.load_state_dict(state, strict=True)
    image = torch.from_numpy(chelsea()).permute(2, 0, 1)[None].float() / 255
    image = torch.nn.functional.interpolate(image, size=(240, 240), mode="bilinear", antialias=True)
    mean, std = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1), torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
    with torch.no_grad():
        top = int(net.eval()((image - mean) / std).argmax())
    assert 281 <= top <= 285, top  # a cat class: the weights are ImageNet's, not random
    extractor = FeatureExtractor(f"tf_efficientnet_lite{variant}")
    assert extractor.channels == (192 if variant == 1 else 208)


def test_neighbourhood_aggregation_averages_each_stage():
    from dxmi_ad.features.extractor import FeatureExtractor, check_feature_settings

    plain = FeatureExtractor(out_indices=(1, 2), normalize=False)
    agg = FeatureExtractor(out_indices=(1, 2), normalize=False, neighbourhood=3)
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    f_plain, f_agg = plain(x), agg(x)
    assert f_plain.shape == f_agg.shape == (1, 64, 8, 8)
    # the last stage is at the grid resolution: its aggregated map is the 3x3 mean of the plain one
    want = torch.nn.functional.avg_pool2d(f_plain[:, 24:], 3, stride=1, padding=1, count_include_pad=False)
    torch.testing.assert_close(f_agg[:, 24:], want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="features.neighbourhood"):
        check_feature_settings({"neighbourhood": 2})


# ---------------------------------------------------------------- vectors: DxMIDetector selection (issue #13, item 6)
def test_feature_swap_anomalies_keep_marginals_and_break_rows():
    from dxmi_ad.data.synthetic import feature_swap_anomalies
    from dxmi_ad.data.tabular import digits_split

    rows = digits_split(0).train[:50]
    fake = feature_swap_anomalies(rows, 300, seed=3)
    assert fake.shape == (300, 64)
    np.testing.assert_array_equal(fake, feature_swap_anomalies(rows, 300, seed=3))
    for j in range(64):  # every value is some normal row's value in that column
        assert np.isin(fake[:, j], rows[:, j]).all()
    # each anomaly differs from its closest normal row (a real change), and no anomaly is a copy of a row
    diff = (fake[:, None, :] != rows[None, :, :]).sum(-1).min(1)
    assert (diff >= 1).mean() > 0.95
    two = feature_swap_anomalies(np.array([[0.0, 1.0], [2.0, 3.0]]), 20, seed=0)
    assert {tuple(r) for r in two} <= {(0.0, 3.0), (2.0, 1.0)}  # exactly one of two coordinates swapped
    with pytest.raises(ValueError, match="2 rows and 2 features"):
        feature_swap_anomalies(np.zeros((5, 1)), 3)


def test_detector_selection_keeps_the_best_validated_state():
    from dxmi_ad import DxMIDetector
    from dxmi_ad.data.tabular import digits_split

    split = digits_split(1)
    kw = dict(n_iter=20, warmup_iter=0, ae_pretrain_iter=60, hidden=32, batch_size=64, random_state=0,
              device="cpu", energy_lr=1e-3)
    det = DxMIDetector(validate_every=10, **kw).fit(split.train)
    vals = [(r["iteration"], r["val_auroc"]) for r in det.history_ if "val_auroc" in r]
    assert [i for i, _ in vals] == [0, 10, 20]  # the pre-trained start competes
    best_it, best_val = max(vals, key=lambda v: (v[1], -v[0]))
    assert (det.selected_iteration_, det.validation_auroc_) == (best_it, best_val)
    assert 0.5 < best_val <= 1.0
    off = DxMIDetector(validate_every=0, **kw).fit(split.train)
    assert off.selected_iteration_ is None and not any("val_auroc" in r for r in off.history_)
    few = DxMIDetector(validate_every=10, **kw).fit(split.train[:40])  # 40 rows: 3 validation rows < 10
    assert few.selected_iteration_ is None


def test_energy_update_every_skips_energy_steps():
    base = DxMIConfig.from_dict({**TINY_HEAD, "dim": 8, "n_iter": 6, "energy_update_every": 3, "seed": 0})
    data = torch.nn.functional.normalize(torch.randn(256, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    _, history = train_model(data, base, log_every=1)
    assert [r["energy_step"] for r in history if "energy_step" in r] == [1, 0, 0, 1, 0, 0]
    model = build_model(base)
    before = [p.detach().clone() for p in model.energy_params()]
    from dxmi_ad.training.dxdp import DxDPTrainer
    trainer = DxDPTrainer(model, base)
    trainer.step(data[:64], torch.Generator().manual_seed(1))
    moved = any(not torch.equal(a, b) for a, b in zip(before, model.energy_params()))
    trainer.step(data[:64], torch.Generator().manual_seed(2))
    after_second = [p.detach().clone() for p in model.energy_params()]
    trainer.step(data[:64], torch.Generator().manual_seed(3))
    assert moved  # iteration 0 updates the energy
    assert all(torch.equal(a, b) for a, b in zip(after_second, model.energy_params()))  # iteration 2 does not
    with pytest.raises(ValueError, match="energy_update_every"):
        DxMIConfig(energy_update_every=0)


def test_detector_selection_edge_cases():
    """Review findings: no calibration hold-out still calibrates on every fit row; a spawned runtime skips selection
    with a warning; config_overrides' selection fields are the ones used."""
    from dxmi_ad import DxMIDetector

    X = np.random.default_rng(0).standard_normal((120, 4))
    kw = dict(n_iter=4, ae_pretrain_iter=10, hidden=8, warmup_iter=0, validate_every=2, random_state=0, device="cpu")
    det = DxMIDetector(calibration_fraction=0, fpr=0.01, **kw).fit(X)  # 120 rows support 0.01; 108 would too
    assert det.selected_iteration_ is not None and len(det.calibration_.scores) == 120
    spawn = DxMIDetector(**kw, runtime={"strategy": "ddp_spawn"})
    with pytest.warns(UserWarning, match="spawn"):
        rows, val = spawn._validation_split(X, spawn._make_config(4, 120), 0)
    assert val is None and len(rows) == 120
    wide = DxMIDetector(**{**kw, "config_overrides": {"validation_fraction": 0.4}})
    rows, val = wide._validation_split(X, wide._make_config(4, 120), 0)
    assert (len(rows), len(val)) == (72, 48)


def test_set_wins_over_the_recipe_key_by_key():
    from dxmi_ad.cli.train import load_recipe

    got = load_recipe(None, "eight-gaussians", ["config_overrides={lr_schedule: constant}"])
    assert got["config_overrides"] == {"activation": "leaky_relu", "last_sigma": 0.01, "lr_schedule": "constant",
                                       "energy_fourier_features": 64, "energy_fourier_scale": 0.3,
                                       "energy_quadratic_weight": 0.1, "select_energy_only": True}
    assert load_recipe(None, "digits", ["energy=shared"])["energy_model"] == "shared"  # the old name, as an override


def test_ablation_start_cache_gives_the_same_runs(tmp_path):
    """benchmarks/textures_ablation.py --start-cache: a cached autoencoder start continues exactly like a trained one."""
    from benchmarks.textures_ablation import pretrained_start
    from dxmi_ad import recipes
    from dxmi_ad.checkpoint import read_yaml_mapping
    from dxmi_ad.image import FeatureSettings
    from dxmi_ad.training.fit import with_config

    recipe = read_yaml_mapping(recipes.path("textures_paper"))
    cfg = DxMIConfig.from_dict({**recipe["model"], "dim": 16, "energy_hidden": 32, "latent_dim": 4,
                                "sampler_hidden": 16, "value_hidden": 16, "ae_pretrain_iter": 20, "batch_size": 64})
    feats = FeatureSettings(**{**recipe["features"], "out_indices": tuple(recipe["features"]["out_indices"])})
    x = torch.nn.functional.normalize(torch.randn(300, 16, generator=torch.Generator().manual_seed(0)), dim=1)
    trained, _, how = pretrained_start(x, cfg, feats, tmp_path)
    cached, _, how2 = pretrained_start(x, cfg, feats, tmp_path)
    assert (how, how2) == ("trained", "cached") and len(list(tmp_path.iterdir())) == 1
    _, _, how3 = pretrained_start(x, cfg.replace(seed=1), feats, tmp_path)  # another seed: its own start
    assert how3 == "trained" and len(list(tmp_path.iterdir())) == 2
    run = cfg.replace(n_iter=10, warmup_iter=2)
    a, _ = train_model(x, run, model=with_config(trained, run))
    b, _ = train_model(x, run, model=with_config(cached, run))
    with torch.no_grad():
        torch.testing.assert_close(a.energy(x), b.energy(x), rtol=0, atol=0)
