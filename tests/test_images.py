"""Image pipeline: loaders on a generated MVTec tree, feature extraction, train / evaluate / score end to end."""

from __future__ import annotations

import csv
import io
import json
import shutil

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from dxmi_ad import recipes
from dxmi_ad.cli.main import app
from dxmi_ad.report import PLOTS
from dxmi_ad.data.images import ImageReadError, load_image, load_mask
from dxmi_ad.data.mvtec import list_folder, list_mvtec
from dxmi_ad.features.extractor import FeatureExtractor, PretrainedWeightsError
from tests.helpers import write_mvtec_tree

runner = CliRunner()


class NeedsUnpickling:
    """An object that torch.load(weights_only=True) refuses."""


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return write_mvtec_tree(tmp_path_factory.mktemp("mvtec"))


@pytest.fixture(scope="module")
def tiny_recipe(tmp_path_factory):
    path = tmp_path_factory.mktemp("recipe") / "tiny.yaml"
    recipe = yaml.safe_load(recipes.path("textures").read_text())
    recipe["features"]["image_size"] = 96
    recipe["model"].update(sampler_hidden=32, value_hidden=32, energy_hidden=64, latent_dim=16, batch_size=128,
                           ae_pretrain_iter=150, n_iter=10, warmup_iter=2)
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_mvtec_listing_pairs_masks_by_stem(tree):
    samples = list_mvtec(tree)
    assert {s.category for s in samples} == {"brick", "gravel"}
    anomalous = [s for s in samples if s.label == 1]
    assert len(anomalous) == 8
    for s in anomalous:
        if s.path.stem == "d3":
            assert s.mask_path is None  # missing mask is reported as None, not paired with another file
        else:
            assert s.mask_path.name == f"{s.path.stem}_mask.png"
    assert [s.category for s in list_mvtec(tree, "gravel")] == ["gravel"] * len(list_mvtec(tree, "gravel"))


def test_mvtec_errors_say_what_to_do(tmp_path, tree):
    with pytest.raises(FileNotFoundError, match="mvtec.com"):
        list_mvtec(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="categories \\['cable'\\] not found"):
        list_mvtec(tree, "cable")
    with pytest.raises(FileNotFoundError, match="train/good"):
        list_folder(tmp_path)


def test_image_modes_are_converted(tree):
    for name in ("rgba.png", "deep16.png", "000.png"):
        img, size = load_image(tree / "gravel/test/good" / name, 64)
        assert img.shape == (3, 64, 64) and img.dtype == torch.float32 and 0 <= img.min() and img.max() <= 1
        assert size == (60, 70)
    deep, _ = load_image(tree / "gravel/test/good/deep16.png", 64)
    assert deep.max() > 0.5  # 16-bit range rescaled, not clipped to white or black
    mask = load_mask(tree / "brick/ground_truth/synthetic_dark/d0_mask.png", 30)
    assert mask.dtype == torch.bool and set(mask.unique().tolist()) == {False, True}


def test_unreadable_image_names_the_file(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nthis is not an image")
    with pytest.raises(ImageReadError, match="broken.png"):
        load_image(bad, 32)


def test_feature_extractor_shapes_and_norm():
    fe = FeatureExtractor()
    feats = fe(torch.rand(2, 3, 96, 128))  # non-square input keeps its aspect
    assert feats.shape == (2, 192, 6, 8)
    assert torch.allclose(feats.norm(dim=1), torch.ones(2, 6, 8), atol=1e-5)
    with pytest.raises(ValueError, match="3, H, W"):
        fe(torch.rand(2, 1, 32, 32))


def test_unavailable_weights_list_the_options():
    with pytest.raises(PretrainedWeightsError, match="--no-pretrained"):
        FeatureExtractor("resnet18", out_indices=(1, 2))


def test_train_evaluate_score_end_to_end(tree, tiny_recipe, tmp_path, monkeypatch):
    monkeypatch.setenv("DXMI_AD_CACHE", str(tmp_path / "cache"))
    # a corrupt training file stops the run before training, naming the file...
    data = tmp_path / "data"
    shutil.copytree(tree, data)
    (data / "brick/train/good/zz_corrupt.png").write_bytes(b"garbage")
    run = tmp_path / "run"
    args = ["train", "--dataset", "mvtec", "--data-root", str(data), "--recipe", str(tiny_recipe), "--out", str(run)]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "zz_corrupt.png" in result.output and not run.exists()
    # ...and is left out with --skip-bad-files
    result = runner.invoke(app, [*args, "--skip-bad-files"])
    assert result.exit_code == 0, result.output
    assert {"model.safetensors", "config.json", "calibration.json", "metrics.json", "metrics.csv", "report.html",
            *PLOTS} <= {p.name for p in run.iterdir()}
    _check_report(run / "report.html", n_images=len(PLOTS))
    cal = json.loads((run / "calibration.json").read_text())
    assert cal["rule"] == "fpr" and cal["n"] == 4 and len(cal["files"]) == 4  # 20% of 2 x 11 readable train images
    assert all("/train/good/" in f for f in cal["files"])  # held out from training, never test images
    metrics = json.loads((run / "metrics.json").read_text())
    cats = {r["category"]: r for r in metrics["per_category"]}
    assert set(cats) == {"brick", "gravel", "mean"}
    assert cats["brick"]["image_AUROC"] > 0.75  # dark squares on brick are easy for pretrained features
    for key in ("pixel_AUROC", "pixel_AUPRO", "image_F1Score"):
        assert 0 <= cats["mean"][key] <= 1
    # a second run reuses the cached features (no new cache file)
    n_cache = len(list((tmp_path / "cache/features").glob("*.npy")))
    assert runner.invoke(app, [*args, "--skip-bad-files", "--overwrite"]).exit_code == 0
    assert len(list((tmp_path / "cache/features").glob("*.npy"))) == n_cache
    # evaluate reproduces the training-time table
    ev = runner.invoke(app, ["evaluate", "--model", str(run), "--out", str(tmp_path / "ev")])
    assert ev.exit_code == 0, ev.output
    again = json.loads((tmp_path / "ev/metrics.json").read_text())
    assert again["mean"]["image_AUROC"] == pytest.approx(metrics["mean"]["image_AUROC"])
    # score a folder mixing good, grayscale, RGBA, 16-bit and corrupt files
    mixed = tmp_path / "mixed"
    shutil.copytree(tree / "gravel/test", mixed)
    Image.open(tree / "brick/test/good/000.png").convert("L").save(mixed / "gray.png")
    (mixed / "corrupt.jpg").write_bytes(b"\xff\xd8 broken jpeg")
    out_csv = tmp_path / "scores.csv"
    sc = runner.invoke(app, ["score", str(mixed), "--model", str(run), "--out", str(out_csv),
                             "--heatmaps", str(tmp_path / "maps")])
    assert sc.exit_code == 1  # one file failed
    rows = list(csv.DictReader(io.StringIO(out_csv.read_text())))
    assert len(rows) == len([p for p in mixed.rglob("*") if p.is_file()])
    failed = [r for r in rows if r["error"]]
    assert [r["path"].rsplit("/", 1)[-1] for r in failed] == ["corrupt.jpg"]
    ok = [r for r in rows if not r["error"]]
    assert all(np.isfinite(float(r["pred_score"])) and r["pred_label"] in ("0", "1") for r in ok)
    assert len(list((tmp_path / "maps").glob("*.png"))) == len(ok)
    p_values = np.array([float(r["p_value"]) for r in ok])
    assert ((p_values >= 1 / 5) & (p_values <= 1)).all()  # (1 + #{cal >= s}) / (n + 1) with n = 4: never 0
    assert all(0 <= float(r["normalized_score"]) <= 1 for r in ok)

    # calibrate: a rate the calibration set cannot support is refused with the minimum size
    small = runner.invoke(app, ["calibrate", "--model", str(run), "--fpr", "0.001"])
    assert small.exit_code == 2 and "at least 999" in small.output
    # a calibration folder with an unreadable file follows the training rule
    cal_dir = tmp_path / "cal"
    shutil.copytree(tree / "brick/train/good", cal_dir)
    (cal_dir / "broken.png").write_bytes(b"nope")
    bad = runner.invoke(app, ["calibrate", "--model", str(run), "--calibration-dir", str(cal_dir), "--fpr", "0.1"])
    assert bad.exit_code == 2 and "broken.png" in bad.output
    okc = runner.invoke(app, ["calibrate", "--model", str(run), "--calibration-dir", str(cal_dir), "--fpr", "0.1",
                              "--skip-bad-files"])
    assert okc.exit_code == 0, okc.output
    cal = json.loads((run / "calibration.json").read_text())
    assert cal["n"] == 12 and cal["fpr"] == 0.1 and cal["rule"] == "fpr"
    # a validation folder without anomalies: warned, never "flag everything" (the F1 rule is refused)
    val = tmp_path / "val"
    shutil.copytree(tree / "brick/test/good", val / "good")
    warn = runner.invoke(app, ["calibrate", "--model", str(run), "--validation-dir", str(val)])
    assert warn.exit_code == 0 and "no anomalies" in warn.output
    assert json.loads((run / "calibration.json").read_text())["rule"] == "fpr"
    # with anomalies: the F1-optimal threshold
    shutil.copytree(tree / "brick/test/synthetic_dark", val / "dark")
    f1 = runner.invoke(app, ["calibrate", "--model", str(run), "--validation-dir", str(val)])
    assert f1.exit_code == 0 and json.loads((run / "calibration.json").read_text())["rule"] == "f1"
    # FDR rule: Benjamini-Hochberg over the scored batch
    fdr = runner.invoke(app, ["calibrate", "--model", str(run), "--fdr", "0.2"])
    assert fdr.exit_code == 0, fdr.output
    sc = runner.invoke(app, ["score", str(mixed), "--model", str(run), "--out", str(out_csv)])
    rows = [r for r in csv.DictReader(io.StringIO(out_csv.read_text())) if not r["error"]]
    from dxmi_ad.calibration import bh_reject

    expected = bh_reject(np.array([float(r["p_value"]) for r in rows]), 0.2)
    assert [r["pred_label"] == "1" for r in rows] == list(expected)
    import dxmi_ad

    assert dxmi_ad.load(run).calibration_.rule == "fdr"
    # the sampler of a feature-mode model refines perturbed features of --start images into feature vectors
    feats = tmp_path / "feats.npy"
    smp = runner.invoke(app, ["sample", "--model", str(run), "--start", str(tree / "brick/train/good"), "-n", "50",
                              "--out", str(feats)])
    assert smp.exit_code == 0, smp.output
    x = np.load(feats)
    dim = json.loads((run / "config.json").read_text())["config"]["dim"]
    assert x.shape == (50, dim) and np.isfinite(x).all()
    assert np.allclose(np.linalg.norm(x, axis=1), 1, atol=0.2)  # near the unit sphere of the normalized features
    nostart = runner.invoke(app, ["sample", "--model", str(run), "--out", str(feats)])
    assert nostart.exit_code == 2 and "--start" in nostart.output


def _check_report(path, n_images):
    """report.html is one self-contained page: every embedded PNG decodes, nothing is linked from outside."""
    import base64
    import re

    text = path.read_text()
    blobs = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", text)
    assert len(blobs) == n_images
    for blob in blobs:
        img = Image.open(io.BytesIO(base64.b64decode(blob)))
        img.load()
        assert img.size[0] > 100 and img.size[1] > 100
    assert "http://" not in text and "https://" not in text
    assert "image_AUROC" in text and "decision rule" in text


def test_folder_without_test_still_trains(tmp_path, tiny_recipe, tree, monkeypatch):
    monkeypatch.setenv("DXMI_AD_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "mine"
    shutil.copytree(tree / "brick/train", root / "train")
    result = runner.invoke(app, ["train", "--dataset", "folder", "--data-root", str(root), "--recipe",
                                 str(tiny_recipe), "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert "evaluation skipped" in result.output


def test_extract_features_then_train_from_them(tree, tiny_recipe, tmp_path, monkeypatch):
    monkeypatch.setenv("DXMI_AD_CACHE", str(tmp_path / "cache"))
    feats = tmp_path / "feats"
    r = runner.invoke(app, ["extract-features", "--dataset", "mvtec", "--data-root", str(tree), "--recipe",
                            str(tiny_recipe), "--out", str(feats)])
    assert r.exit_code == 0, r.output
    assert {p.name for p in feats.iterdir()} == {"train.safetensors", "test.safetensors", "meta.json"}
    run = tmp_path / "run"
    r = runner.invoke(app, ["train", "--dataset", "features", "--data-root", str(feats), "--recipe", str(tiny_recipe),
                            "--out", str(run)])
    assert r.exit_code == 0, r.output
    metrics = json.loads((run / "metrics.json").read_text())
    assert {row["category"] for row in metrics["per_category"]} == {"brick", "gravel", "mean"}
    assert metrics["mean"]["image_AUROC"] > 0.6


def test_released_feature_layout_and_pickle_refusal(tmp_path):
    from dxmi_ad.data.features import read_feature_dir

    n = 6
    data = {"feature_align": torch.randn(n, 8, 2, 2), "mask": torch.zeros(n, 1, 8, 8), "label": torch.zeros(n),
            "clsname": ["bottle"] * n}
    torch.save(data, tmp_path / "train_data.pth")  # plain tensors and strings: weights_only loading works
    train, test, _ = read_feature_dir(tmp_path)
    assert train.features.shape == (6, 8, 2, 2) and test is None and train.clsname == ["bottle"] * 6

    torch.save({"feature_align": torch.randn(2, 8, 2, 2), "extra": NeedsUnpickling()}, tmp_path / "val_data.pth")
    with pytest.raises(ValueError, match="--trust-pickle"):
        read_feature_dir(tmp_path)
