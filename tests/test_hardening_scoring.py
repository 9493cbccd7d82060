"""Issue #11, scoring items: non-finite scores never become decisions (3), no rule -> no decision (9), what
`score` found and skipped (10), clear errors before any work (12), one-class test sets (14), the score summary,
`predict` on numpy / PIL / paths and the export size (19).

The model is a built (untrained) DxMI head on the offline Lite0 backbone at 64 x 64: scoring is what is tested, and
it takes seconds.
"""

from __future__ import annotations

import csv
import gc
import io
import json
import shutil
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from dxmi_ad.cli.main import app

runner = CliRunner()
SIZE = 64


def _strict_json(text: str):
    """json.loads that refuses the NaN / Infinity tokens (RFC 8259)."""
    def refuse(token):
        raise ValueError(f"invalid JSON token {token}")

    return json.loads(text, parse_constant=refuse)


def _tiny_detector(calibrate: bool = True):
    from dxmi_ad.config import DxMIConfig
    from dxmi_ad.image import FeatureSettings, ImageDetector
    from dxmi_ad.training.fit import build_model

    det = ImageDetector(DxMIConfig(), FeatureSettings(image_size=SIZE))
    cfg = DxMIConfig(dim=det._extractor().channels, spherical=True, latent_dim=8, energy_hidden=32,
                     sampler_hidden=16, value_hidden=16, time_dim=8, seed=0)
    det.config, det.model_ = cfg, build_model(cfg).eval()
    if calibrate:
        g = torch.Generator().manual_seed(1)
        scores = det.predict(torch.rand(9, 3, 40, 48, generator=g))["pred_score"].double().numpy()
        det.calibrate(scores=scores, fpr=0.2, source="9 random images")
    return det


def _images(folder, n, seed=0, size=(40, 48)):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for k in range(n):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / f"{k:03d}.png")
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    det = _tiny_detector()
    det.save(root / "calibrated")
    plain = _tiny_detector(calibrate=False)
    plain.save(root / "uncalibrated")
    return root / "calibrated", root / "uncalibrated", det


def _flat(res) -> str:
    """The command's output with rich's line wrapping undone."""
    return " ".join(res.output.split())


def _rows(path):
    return list(csv.DictReader(io.StringIO(path.read_text())))


# ---------------------------------------------------------------- item 3: non-finite scores never become decisions
def test_predict_refuses_nan_and_inf_pixels_naming_the_batch_index(runs):
    det = runs[2]
    x = torch.rand(3, 3, 32, 32)
    x[1, 0, 5, 5] = float("nan")
    with pytest.raises(ValueError, match="image 1 of the batch holds 1 NaN or infinite"):
        det.predict(x)  # was: pred_score NaN, pred_label False ("normal")
    x[1, 0, 5, 5] = 0.5
    x[2, 2, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="image 2 of the batch"):
        det.predict(x)
    a = np.random.default_rng(0).random((2, 32, 32, 3))
    a[0, 1, 1, 1] = np.nan
    with pytest.raises(ValueError, match="image 0 of the batch"):
        det.predict(a)


def test_nonfinite_scores_become_errors_in_every_decision_path(runs, tmp_path, monkeypatch):
    from dxmi_ad.cli import images
    from dxmi_ad.data.mvtec import ImageSample

    det = runs[2]
    folder = _images(tmp_path / "in", 4)
    from dxmi_ad.scoring import MapScorer

    real = MapScorer.from_energy_map

    def broken(self, energy_map, size):  # the second image of every batch gets a NaN score, the third +inf
        s, amap = real(self, energy_map, size)
        s = s.clone()
        if len(s) > 2:
            s[1], s[2] = float("nan"), float("inf")
        return s, amap

    monkeypatch.setattr(MapScorer, "from_energy_map", broken)  # the one scorer every path uses
    with pytest.raises(ValueError, match="image 1 of the batch got a non-finite anomaly score"):
        det.predict(torch.rand(4, 3, 32, 32))
    out_csv = tmp_path / "s.csv"
    result = images.score_paths(det, [folder], out_csv, None)
    rows = _rows(out_csv)
    assert [bool(r["error"]) for r in rows] == [False, True, True, False]
    for r in rows[1:3]:
        assert r["pred_label"] == "" and r["pred_score"] == "" and r["p_value"] == "" and "non-finite" in r["error"]
    assert rows[0]["pred_label"] in ("0", "1") and result["n_errors"] == 2
    # calibration / evaluation read files through score_samples: the same rows are errors, not scores
    samples = [ImageSample(p, "c", "test", "good", 0, None) for p in sorted(folder.iterdir())]
    scored = det.score_samples(samples)
    assert set(scored["errors"]) == {1, 2} and np.isnan(scored["pred_score"][[1, 2]]).all()
    from dxmi_ad.image import BadFilesError

    with pytest.raises(BadFilesError, match="non-finite"):
        det.calibrate(samples)


def test_nan_pixels_read_from_a_file_are_an_error_row(runs, tmp_path, monkeypatch):
    import dxmi_ad.image as image_mod
    from dxmi_ad.cli import images

    folder = _images(tmp_path / "in", 3)
    real = image_mod.load_image

    def nan_for_001(path, size):  # what a decoder could hand over for a float image holding NaN
        img, hw = real(path, size)
        if path.name == "001.png":
            img = img.clone()
            img[0, 0, 0] = float("nan")
        return img, hw

    monkeypatch.setattr(image_mod, "load_image", nan_for_001)
    result = images.score_paths(runs[2], [folder], None, None)
    rows = list(csv.DictReader(io.StringIO(result["text"])))
    assert rows[1]["pred_label"] == "" and "NaN or infinite pixel" in rows[1]["error"]
    assert rows[0]["pred_label"] in ("0", "1") and rows[2]["pred_label"] in ("0", "1")


def test_pixel_detector_refuses_a_nonfinite_energy():
    from dxmi_ad.pixel import PixelDetector, pixel_config

    det = PixelDetector(pixel_config(1, 8))
    det.calibrate(scores=np.linspace(0, 1, 20), fpr=0.1)
    det._energy_and_map = lambda x, b: (np.array([0.5, np.nan]), np.zeros((2, 8, 8), np.float32))
    with pytest.raises(ValueError, match="image 1 of the batch got a non-finite energy"):
        det.predict(np.zeros((2, 8, 8), np.uint8))  # was: pred_label [False, False]
    with pytest.raises(ValueError, match="row 0 holds NaN"):
        det.predict(np.full((1, 8, 8), np.nan, np.float32))


def test_vector_estimators_refuse_nan_rows():
    from dxmi_ad import DxMIDetector, PyODDxMIDetector
    from tests.conftest import TINY

    X = np.random.default_rng(0).normal(size=(60, 6))
    bad = X[:3].copy()
    bad[1, 2] = np.nan
    for cls in (DxMIDetector, PyODDxMIDetector):
        det = cls(random_state=0, **TINY).fit(X)
        with pytest.raises(ValueError, match="NaN"):
            det.predict(bad)
        with pytest.raises(ValueError, match="NaN"):
            det.decision_function(bad)


# ---------------------------------------------------------------- item 9: no rule, no decision
def test_model_without_rule_writes_no_decisions(runs, tmp_path):
    _, plain_run, _ = runs
    folder = _images(tmp_path / "in", 3)
    out_csv = tmp_path / "s.csv"
    res = runner.invoke(app, ["score", str(folder), "--model", str(plain_run), "--out", str(out_csv)])
    assert res.exit_code == 0, res.output
    rows = _rows(out_csv)
    assert len(rows) == 3
    assert all(r["pred_label"] == "" and r["threshold"] == "" and r["p_value"] == "" and r["pred_score"] for r in rows)
    assert "no decision rule" in _flat(res) and "dxmi-ad calibrate" in _flat(res)
    import dxmi_ad

    out = dxmi_ad.load(plain_run).predict(np.zeros((SIZE, SIZE, 3), np.uint8))
    assert "pred_label" not in out and out["pred_score"].shape == (1,)


def test_evaluate_without_rule_says_so_in_metrics_and_report(runs, tmp_path):
    _, plain_run, _ = runs
    root = tmp_path / "parts"
    _images(root / "train/good", 2)
    _images(root / "test/good", 3, seed=1)
    _images(root / "test/bad", 3, seed=2)
    res = runner.invoke(app, ["evaluate", "--model", str(plain_run), "--dataset", "folder", "--data-root", str(root),
                              "--out", str(tmp_path / "ev")])
    assert res.exit_code == 0, res.output
    metrics = _strict_json((tmp_path / "ev/metrics.json").read_text())
    assert metrics["decisions"] is None and metrics["decision_rule"].startswith("none")
    assert "decision rule" in (tmp_path / "ev/report.html").read_text()


def test_anomalib_to_detector_carries_a_calibration(tmp_path):
    pytest.importorskip("anomalib")
    from dxmi_ad.anomalib import Dxmi

    small = {"latent_dim": 8, "energy_hidden": 32, "sampler_hidden": 16, "value_hidden": 16, "time_dim": 8}
    module = Dxmi(model_overrides=small, image_size=SIZE)
    with pytest.warns(UserWarning, match="no decision rule"):
        assert module.to_detector().calibration_ is None
    cal_dir = _images(tmp_path / "held_out_good", 5, seed=3)
    det = module.to_detector(calibration_images=cal_dir, fpr=0.2)
    assert det.calibration_ is not None and len(det.calibration_.scores) == 5 and det.calibration_.fpr == 0.2
    expected = np.sort(det.predict(sorted(cal_dir.iterdir()))["pred_score"].double().numpy())
    assert np.allclose(det.calibration_.scores, expected)
    det.save(tmp_path / "run")
    out_csv = tmp_path / "s.csv"
    res = runner.invoke(app, ["score", str(cal_dir), "--model", str(tmp_path / "run"), "--out", str(out_csv)])
    assert res.exit_code == 0, res.output
    assert all(r["pred_label"] in ("0", "1") and r["threshold"] for r in _rows(out_csv))


# ---------------------------------------------------------------- item 10: what was found and skipped
def test_score_refuses_folders_with_nothing_to_score(runs, tmp_path):
    run = runs[0]
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "notes.txt").write_text("x")
    (odd / "drawing.svg").write_text("<svg/>")
    out_csv = tmp_path / "s.csv"
    res = runner.invoke(app, ["score", str(odd), "--model", str(run), "--out", str(out_csv)])
    assert res.exit_code == 2 and not out_csv.exists()  # was: an empty CSV, exit 0
    assert "no supported images" in _flat(res) and ".svg" in _flat(res) and ".txt" in _flat(res)
    empty = tmp_path / "empty"
    empty.mkdir()
    res = runner.invoke(app, ["score", str(empty), "--model", str(run), "--out", str(out_csv)])
    assert res.exit_code == 2 and "no files" in _flat(res) and not out_csv.exists()
    # a mixed folder is scored, and the skipped files are named by kind
    _images(odd, 2)
    res = runner.invoke(app, ["score", str(odd), "--model", str(run), "--out", str(out_csv)])
    assert res.exit_code == 0, res.output
    assert "found 2 image file(s)" in _flat(res) and "2 with unsupported extensions" in _flat(res)
    assert len(_rows(out_csv)) == 2


# ---------------------------------------------------------------- item 12: clear errors before any work
def test_score_output_paths_are_checked_before_any_work(runs, tmp_path, monkeypatch):
    import dxmi_ad.cli.models as main

    run = runs[0]
    folder = _images(tmp_path / "in", 2)
    monkeypatch.setattr(main, "_load_image_model", lambda m: pytest.fail("the model was loaded before the check"))
    (tmp_path / "outdir").mkdir()
    maps = tmp_path / "maps"
    res = runner.invoke(app, ["score", str(folder), "--model", str(run), "--out", str(tmp_path / "outdir"),
                              "--heatmaps", str(maps)])
    assert res.exit_code == 2 and "is a folder" in _flat(res) and not maps.exists()
    (tmp_path / "afile").write_text("x")
    res = runner.invoke(app, ["score", str(folder), "--model", str(run), "--heatmaps", str(tmp_path / "afile")])
    assert res.exit_code == 2 and "is an existing file" in _flat(res)
    res = runner.invoke(app, ["score", str(folder), "--model", str(run), "--out", str(tmp_path / "afile/s.csv")])
    assert res.exit_code == 2 and "is a file, not a folder" in _flat(res)
    res = runner.invoke(app, ["evaluate", "--model", str(run), "--out", str(tmp_path / "afile")])
    assert res.exit_code == 2 and "is an existing file" in _flat(res)


def test_output_size_and_input_size_are_validated(runs):
    from dxmi_ad.export import export_model

    det = runs[2]
    for bad in ((0, 0), (-4, 10), (10,), "big", (2.5, 3)):
        with pytest.raises(ValueError, match="output_size must be"):
            det.predict(torch.rand(1, 3, 32, 32), output_size=bad)
    assert det.predict(torch.rand(1, 3, 32, 32), output_size=(7, 9))["anomaly_map"].shape == (1, 7, 9)
    with pytest.raises(ValueError, match="input_size must be"):
        export_model(det, "unused.pt", "torchscript", input_size=(0, 0))


# ---------------------------------------------------------------- item 14: one-class test sets
@pytest.mark.parametrize("kind", ["all_normal", "all_anomalous"])
def test_one_class_test_sets_write_what_is_defined(runs, tmp_path, kind):
    run, _, det = runs
    root = tmp_path / "parts"
    _images(root / "train/good", 2)
    test_dir = root / ("test/good" if kind == "all_normal" else "test/bad")
    _images(test_dir, 5, seed=4)
    if kind == "all_anomalous":  # masks present: pixel metrics need normal pixels too, which they have
        (root / "ground_truth/bad").mkdir(parents=True)
        for f in test_dir.iterdir():
            mask = np.zeros((40, 48), np.uint8)
            mask[10:20, 10:20] = 255
            Image.fromarray(mask).save(root / "ground_truth/bad" / f"{f.stem}_mask.png")
    ev = tmp_path / "ev"
    gc.collect()  # finalizer warnings of EARLIER tests' garbage (e.g. an unclosed file) must not land in this output
    res = runner.invoke(app, ["evaluate", "--model", str(run), "--dataset", "folder", "--data-root", str(root),
                              "--out", str(ev)])
    assert res.exit_code == 0, res.output  # all-normal was: exit 1, nothing written
    assert "warning" not in _flat(res).lower()  # no matplotlib legend warnings
    metrics = _strict_json((ev / "metrics.json").read_text())  # was: NaN tokens (invalid JSON)
    assert metrics["mean"]["image_AUROC"] is None and metrics["per_category"][0]["image_F1Score"] is None
    flagged = det.predict(sorted(test_dir.iterdir()))["pred_label"].numpy()
    d = metrics["decisions"]
    if kind == "all_normal":
        assert d["realised_fpr"] == pytest.approx(flagged.mean()) and d["tpr"] is None
    else:
        assert d["tpr"] == pytest.approx(flagged.mean()) and d["realised_fpr"] is None
    assert {"roc.png", "pr.png", "histogram.png", "calibration.png", "report.html"} <= {p.name for p in ev.iterdir()}


def test_report_plots_of_a_one_class_set_raise_no_warnings(runs, tmp_path):
    from dxmi_ad.data.mvtec import ImageSample
    from dxmi_ad.evaluation import metrics_table
    from dxmi_ad.report import write_report

    det = runs[2]
    folder = _images(tmp_path / "bad", 3)
    samples = [ImageSample(p, "c", "test", "bad", 1, None) for p in sorted(folder.iterdir())]
    scored = det.score_samples(samples)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        write_report(tmp_path / "rep", samples, scored, metrics_table(samples, scored), det.calibration_, {})


def test_every_metrics_writer_is_strict_json():
    from dxmi_ad.metrics import dumps_json

    text = dumps_json({"a": float("nan"), "b": [np.float32("inf"), np.int64(2)], "c": np.array([1.5, np.nan])})
    assert _strict_json(text) == {"a": None, "b": [None, 2], "c": [1.5, None]}


# ---------------------------------------------------------------- item 19: summary, predict inputs, export size
def test_score_ends_with_a_summary(runs, tmp_path):
    run = runs[0]
    folder = _images(tmp_path / "in", 4)
    (folder / "broken.png").write_bytes(b"nope")
    out_csv = tmp_path / "s.csv"
    res = runner.invoke(app, ["score", str(folder), "--model", str(run), "--out", str(out_csv)])
    assert res.exit_code == 1
    rows = _rows(out_csv)
    n_flag = sum(r["pred_label"] == "1" for r in rows)
    n_norm = sum(r["pred_label"] == "0" for r in rows)
    assert f"scored 4 of 5 file(s): {n_flag} flagged anomalous, {n_norm} normal, 1 error(s)" in _flat(res)
    assert "rule: target FPR 0.2" in _flat(res)


def test_predict_accepts_numpy_pil_paths_and_lists(runs, tmp_path):
    import dxmi_ad

    det = dxmi_ad.load(runs[0])
    rgb = np.random.default_rng(5).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    ref = det.predict(torch.from_numpy(rgb).permute(2, 0, 1)[None])["pred_score"]
    for given in (rgb, rgb.transpose(2, 0, 1) / 255.0, rgb[None], Image.fromarray(rgb), str(tmp_path / "a.png"),
                  tmp_path / "a.png", [rgb, tmp_path / "a.png"]):
        out = det.predict(given)  # was: AttributeError on anything but a tensor
        assert torch.allclose(out["pred_score"], ref.expand(len(out["pred_score"])), rtol=1e-4), type(given)
        assert "pred_label" in out
    with pytest.raises(TypeError, match="unsupported type dict"):
        det.predict({"image": rgb})
    with pytest.raises(ValueError, match="RGBA"):
        det.predict(np.zeros((8, 8, 4), np.uint8))
    with pytest.raises(ValueError, match="unsupported dtype"):
        det.predict(np.zeros((8, 8, 3), np.uint16))
    with pytest.raises(ValueError, match="not a readable image|unreadable|cannot"):
        (tmp_path / "b.png").write_bytes(b"nope")
        det.predict(tmp_path / "b.png")


def test_export_defaults_to_the_trained_input_size(runs, tmp_path):
    from dxmi_ad.export import load_torchscript

    run = tmp_path / "run"
    shutil.copytree(runs[0], run)
    res = runner.invoke(app, ["export", "--model", str(run), "--format", "torchscript"])
    assert res.exit_code == 0, res.output
    assert f"(B, 3, {SIZE}, {SIZE}) (the input size the model was trained at" in _flat(res)
    module, meta = load_torchscript(run / "model.pt")
    assert meta["input_size"] == [SIZE, SIZE]
    score, amap = module(torch.rand(1, 3, SIZE, SIZE))
    assert amap.shape == (1, SIZE, SIZE)
