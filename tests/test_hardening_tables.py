"""Issue #11, items 7, 8, 12 (estimator / calibration) and 18: tables, the bottleneck, option ranges, small
calibration sets. Small generated inputs only."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from dxmi_ad import DxMIDetector, PyODDxMIDetector
from dxmi_ad.calibration import Calibration, bh_reject, min_calibration_size
from dxmi_ad.cli.main import app
from dxmi_ad.config import DxMIConfig
from dxmi_ad.data.tabular import load_csv
from dxmi_ad.nn.energy import autoencoder_latent_dim
from dxmi_ad.training.fit import train_model

runner = CliRunner()
# the autoencoder energy on purpose: these 3-feature tables would otherwise get energy_model="auto"'s MLP energy
QUICK = dict(energy_model="autoencoder", n_iter=2, ae_pretrain_iter=5, hidden=8, n_layers=1, batch_size=32,
             warmup_iter=1, device="cpu")


def _write(path, text, bom=False):
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    return path


# ---------------------------------------------------------------------- item 7: label columns, physical lines
@pytest.mark.parametrize("name", ["Label", "LABEL", " label ", "label"])
def test_label_column_is_matched_ignoring_case_and_spaces(tmp_path, name):
    csv = _write(tmp_path / "t.csv", f"a,{name},b\n1,0,2\n3,1,4\n5,0,6\n")
    X, label, features = load_csv(csv)
    assert features == ["a", "b"] and X.shape == (3, 2)  # the label is never a feature
    assert label.tolist() == [0, 1, 0]
    np.testing.assert_array_equal(X[:, 1], [2, 4, 6])


def test_two_label_columns_are_refused_by_name(tmp_path):
    csv = _write(tmp_path / "t.csv", "a,label,Label\n1,0,0\n3,1,1\n")
    with pytest.raises(ValueError, match=r"2 columns are the label column.*'label' \(column 2\), 'Label' \(column 3\)"):
        load_csv(csv)


def test_errors_name_the_physical_line_after_blank_lines_and_bom(tmp_path):
    # header = line 1, data lines 2-4, blank lines 5-6, data 7-13, the fault on line 14
    lines = ["a,b", "1,2", "3,4", "5,6", "", "", *[f"{i},{i}" for i in range(7)], "7,oops"]
    csv = _write(tmp_path / "t.csv", "\n".join(lines) + "\n", bom=True)
    with pytest.raises(ValueError, match=r"line 14, column 'b': 'oops' is not a number"):
        load_csv(csv)
    # the label check too (it counted data rows: line 12 for a fault on line 14)
    lines = ["a,Label", "1,0", "3,0", "5,0", "", "", *[f"{i},0" for i in range(7)], "7,2"]
    with pytest.raises(ValueError, match=r"line 14, column 'Label': labels must be 0 \(normal\) or 1"):
        load_csv(_write(tmp_path / "u.csv", "\r\n".join(lines) + "\r\n"))
    # a quoted field spanning two lines counts both
    csv = _write(tmp_path / "q.csv", 'a,b\n"1\n",2\n3,x\n')
    with pytest.raises(ValueError, match="line 4"):
        load_csv(csv)


def test_cli_train_never_uses_a_label_column_as_a_feature(tmp_path):
    rng = np.random.default_rng(0)
    X = np.r_[rng.normal(0, 1, (60, 3)), rng.normal(6, 1, (6, 3))]
    lab = np.r_[np.zeros(60, int), np.ones(6, int)]
    csv = tmp_path / "t.csv"
    csv.write_text("a,b,c, LABEL \n" + "\n".join(f"{r[0]:.4f},{r[1]:.4f},{r[2]:.4f},{y}" for r, y in zip(X, lab)))
    out = tmp_path / "run"
    sets = [x for kv in ("n_iter=2", "ae_pretrain_iter=5", "warmup_iter=1", "hidden=8", "n_layers=1", "device=cpu")
            for x in ("--set", kv)]
    res = runner.invoke(app, ["train", "--dataset", f"csv:{csv}", "--out", str(out), *sets])
    assert res.exit_code == 0, res.output
    meta = json.loads((out / "config.json").read_text())
    assert meta["n_features_in"] == 3  # not 4: the anomaly labels were not trained on
    assert json.loads((out / "metrics.json").read_text())["n_test_anomalous"] == 6


# ---------------------------------------------------------------------- item 8: the bottleneck
def test_bottleneck_rule():
    # a width-k code lives on the sphere S^(k-1): k - 1 < D dimensions whenever k <= D
    assert [autoencoder_latent_dim(d) for d in (1, 2, 3, 4, 5, 16, 64, 200)] == [1, 2, 3, 3, 3, 4, 16, 32]
    for d in range(2, 300):
        assert 1 <= autoencoder_latent_dim(d) <= d
    assert autoencoder_latent_dim(10, 10) == 10
    with pytest.raises(ValueError, match=r"latent_dim=5 must be <= n_features=3: its code on the sphere S\^4 has 4 >= 3 "
                                         r"dimensions, enough to learn the identity \(latent_dim='auto' gives 3\)"):
        autoencoder_latent_dim(3, 5)
    with pytest.raises(ValueError, match="latent_dim=4 must be <= n_features=3"):
        autoencoder_latent_dim(3, 4)
    with pytest.raises(ValueError, match="only allowed width is 1"):
        autoencoder_latent_dim(1, 2)
    with pytest.raises(ValueError, match="n_features=1 with spherical=True"):
        autoencoder_latent_dim(1, 1, spherical=True)


def test_estimator_resolves_and_refuses_the_latent_width():
    rng = np.random.default_rng(0)
    for d, want in ((1, 1), (2, 2), (3, 3)):
        det = DxMIDetector(random_state=0, **QUICK).fit(rng.normal(size=(40, d)))
        assert det.config_.latent_dim == want
        assert det.model_.energy.encoder[-1].out_features == want
    with pytest.raises(ValueError, match="latent_dim=5 must be <= n_features=3"):
        DxMIDetector(latent_dim=5, **QUICK).fit(rng.normal(size=(40, 3)))
    with pytest.raises(ValueError, match="latent_dim=4 must be <= n_features=3"):  # via config_overrides too
        PyODDxMIDetector(config_overrides={"latent_dim": 4}, **QUICK).fit(rng.normal(size=(40, 3)))
    with pytest.raises(ValueError, match="spherical=True"):
        DxMIDetector(spherical=True, **QUICK).fit(rng.normal(size=(40, 1)))
    DxMIDetector(**{**QUICK, "energy_model": "mlp", "latent_dim": 5}).fit(rng.normal(size=(40, 3)))  # no rule


def test_every_trainer_refuses_a_bottleneck_as_wide_as_the_input():
    cfg = DxMIConfig(dim=3, latent_dim=4, n_steps=2, sampler_hidden=8, value_hidden=8, energy_hidden=8,
                     time_dim=8, batch_size=8, n_iter=1, ae_pretrain_iter=1)
    with pytest.raises(ValueError, match="latent_dim=4 must be <= n_features=3"):
        train_model(torch.randn(16, 3), cfg)  # image detectors and resumed runs train through here


def test_contaminated_one_feature_fit_ranks_the_far_outliers_first():
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    outliers = np.array([[8.0], [9.0], [-8.5], [10.0], [-9.5]])
    X = np.r_[rng.normal(0, 1, (300, 1)), outliers]  # the outliers are in the fit rows
    det = DxMIDetector(random_state=2, n_iter=10, ae_pretrain_iter=800, hidden=32, n_layers=2, device="cpu").fit(X)
    e = det.energy(X)
    assert sorted(np.argsort(-e)[:5].tolist()) == [300, 301, 302, 303, 304]  # before: normal rows 219 and 238
    assert (det.predict(outliers) == -1).all()
    assert det.config_.latent_dim == 1  # was 3: the autoencoder could learn the identity


# ---------------------------------------------------------------------- item 12: ranges and overflow
@pytest.fixture(scope="module")
def small_det():
    return DxMIDetector(random_state=0, **QUICK).fit(np.random.default_rng(0).normal(size=(60, 3)))


@pytest.mark.parametrize("kw", [{"fdr": 0}, {"fdr": 1.0}, {"fpr": 0.0}, {"fpr": 1}, {"fpr": float("nan")},
                                {"fdr": -0.1}, {"fpr": "0.1"}])
def test_calibrate_checks_rate_ranges_first(kw, small_det):
    s = np.random.default_rng(0).normal(size=50)
    name = next(iter(kw))
    with pytest.raises(ValueError, match=f"{name}=.*strictly between 0 and 1"):
        Calibration.fit(s, **({"fpr": 0.05} | kw))
    with pytest.raises(ValueError, match=f"{name}=.*strictly between 0 and 1"):
        small_det.calibrate(**kw)  # was ZeroDivisionError for fdr=0
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        min_calibration_size(0)


def test_image_and_pixel_detectors_check_rates_before_any_work():
    from dxmi_ad.image import ImageDetector
    from dxmi_ad.pixel import PixelDetector, pixel_config

    image = ImageDetector(DxMIConfig())
    with pytest.raises(ValueError, match="fpr=0: the target false-positive rate"):
        image.fit([], fpr=0)  # before "no training images"
    with pytest.raises(ValueError, match="fdr=1.0: the target false discovery rate"):
        image.calibrate(None, fdr=1.0)
    pixel = PixelDetector(pixel_config(1, 8))
    with pytest.raises(ValueError, match="fdr=0: the target false discovery rate"):
        pixel.fit(np.zeros((4, 8, 8)), fdr=0)
    with pytest.raises(ValueError, match="fpr=2: the target false-positive rate"):
        pixel.calibrate(scores=np.arange(30.0), fpr=2)


@pytest.mark.parametrize("cls", [DxMIDetector, PyODDxMIDetector])
def test_huge_values_are_refused_naming_rows_and_columns(cls):
    X = np.random.default_rng(0).normal(size=(50, 3)) * 1e300
    with pytest.raises(ValueError, match=r"beyond the float32 range.*50 row\(s\).*column\(s\) 0, 1, 2"):
        cls(**QUICK).fit(X)
    X = np.random.default_rng(0).normal(size=(50, 3))
    X[[4, 7], 1] = 1e300
    with pytest.raises(ValueError, match=r"2 row\(s\) \(row indices 4, 7; column\(s\) 1\)"):
        cls(**QUICK).fit(X)
    det = cls(random_state=0, **QUICK).fit(np.random.default_rng(0).normal(size=(50, 3)) * 1e-3)
    bad = np.zeros((3, 3))
    bad[2, 0] = 3e38  # inside float32, but (x - mean) / scale overflows it
    with pytest.raises(ValueError, match=r"standardization overflows float32.*row indices 2; column\(s\) 0"):
        det.energy(bad)
    with pytest.raises(ValueError, match=r"row indices 1; column\(s\) 2"):
        det.predict(np.array([[0, 0, 0], [0, 0, -1e300]]))


def test_spherical_fit_accepts_huge_rows():
    X = np.random.default_rng(0).normal(size=(50, 3)) * 1e200  # direction only: finite after normalization
    det = DxMIDetector(spherical=True, random_state=0, **QUICK).fit(X)
    assert np.isfinite(det.energy(X)).all()


def test_csv_loader_refuses_values_beyond_float32(tmp_path):
    csv = _write(tmp_path / "t.csv", "a,b\n1,2\n\n3,1e300\n")
    with pytest.raises(ValueError, match=r"line 4, column 'b': value '1e300' is beyond the float32 range"):
        load_csv(csv)


def test_cli_rate_options_are_checked_at_parse_time(tmp_path):
    for cmd in (["calibrate", "--model", str(tmp_path / "none"), "--fdr", "0"],
                ["calibrate", "--model", str(tmp_path / "none"), "--fpr", "1"],
                ["train", "--dataset", "digits", "--fdr", "0", "--dry-run"],
                ["train", "--dataset", "digits", "--fpr", "1.5", "--dry-run"]):
        res = runner.invoke(app, cmd)
        assert res.exit_code == 2, res.output
        assert "strictly between 0 and 1" in res.output and "Traceback" not in res.output
        assert res.exception is None or isinstance(res.exception, SystemExit)
    res = runner.invoke(app, ["train", "--dataset", "digits", "--set", "fdr=0", "--dry-run"])  # recipe values too
    assert res.exit_code == 2 and "fdr" in res.output, res.output


# ---------------------------------------------------------------------- item 18: small calibration sets
def test_small_calibration_set_summary_gives_the_numbers():
    s = np.random.default_rng(0).normal(size=24)
    a, d = Calibration.fit(s, fpr=0.05), Calibration.fit(s, fpr=1 / 25)
    assert a.threshold == d.threshold == pytest.approx(s.max())  # both rules pick the maximum ...
    text = a.summary()  # ... and the summary says why
    assert "24 calibration scores" in text and "1/25 = 0.04" in text
    assert "fpr=0.05 sets the threshold at the maximum calibration score" in text
    assert "[1/25, 2/25) = [0.04, 0.08)" in text and "expected false-positive rate on new normal data 1/25 = 0.04" in text
    assert "fpr=0.01 needs 99" in text
    big = Calibration.fit(np.arange(200.0), fpr=0.05).summary()
    assert "rank 191 of the 200" in big and "[10/201, 11/201)" in big


def test_python_calibrate_warns_when_the_set_cannot_resolve_the_rate(small_det):
    """The CLI prints the support lines; in Python `calibrate(fpr=0.05)` on 30 rows used to stay silent."""
    rows = np.random.default_rng(1).normal(size=(200, 3))
    with pytest.warns(UserWarning, match=r"fpr=0.05 is not resolvable with 30 calibration samples .*1/31.* 0.0323") \
            as caught:
        small_det.calibrate(rows[:30], fpr=0.05)
    assert caught[0].filename == __file__  # the warning names the caller's line, not the package's
    assert small_det.calibration_.expected_fpr() == pytest.approx(1 / 31)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 199 rows: 10/200 = 0.05 exactly, no warning
        small_det.calibrate(rows[:199], fpr=0.05)
    assert small_det.calibration_.expected_fpr() == pytest.approx(0.05)


def test_python_takes_one_decision_rule_and_says_why_the_training_rows_calibrate(small_det):
    """New-user trial: fpr and fdr together were silently FDR in Python (the CLI refuses both); calibration_fraction=0
    was described as "too few rows to hold out"."""
    with pytest.raises(ValueError, match="choose one decision rule"):
        small_det.calibrate(fpr=0.05, fdr=0.1)
    X = np.random.default_rng(0).normal(size=(100, 3))
    with pytest.raises(ValueError, match="choose one decision rule"):
        DxMIDetector(fpr=0.05, fdr=0.1, **QUICK).fit(X)
    det = DxMIDetector(calibration_fraction=0.0, random_state=0, **QUICK).fit(X)
    assert "calibration_fraction=0: no rows held out" in det.calibration_.source


def test_expected_fpr_follows_a_contamination_threshold():
    """With ``contamination`` the threshold is a quantile of the fit rows' energies, not the conformal rank."""
    X = np.random.default_rng(0).normal(size=(200, 3))
    det = DxMIDetector(contamination=0.1, random_state=0, **QUICK).fit(X)
    cal = det.calibration_
    above = int((cal.scores > cal.threshold).sum())
    assert cal.expected_fpr() == pytest.approx((1 + above) / (len(cal.scores) + 1))
    assert above > 0  # the 0.9 quantile of the fit energies lies inside the calibration scores


def test_a_csv_header_may_start_with_par1(tmp_path):
    """Parquet's magic bytes are plain text: only signatures that cannot start UTF-8 text mark a binary file."""
    path = tmp_path / "par.csv"
    path.write_text("PAR1,PAR2\n0.1,0.2\n0.3,0.4\n")
    X, _, names = load_csv(path)
    assert names == ["PAR1", "PAR2"] and X.shape == (2, 2)


def test_fdr_summary_has_no_threshold_and_the_batch_arithmetic():
    s = np.random.default_rng(0).normal(size=24)
    cal = Calibration.fit(s, fdr=0.1, fpr=0.04)
    assert "threshold" not in cal.describe().replace("no fixed threshold", "")
    assert cal.decision_threshold is None
    text = cal.summary()
    assert "smallest p-value" in text and "1/25 = 0.04" in text
    assert "0.04 <= 0.1*k/m, i.e. k >= m/2.5" in text
    assert "batches of at most 2;" in text and "4 of 10, 40 of 100, 400 of 1000" in text
    assert "(m = 100: 999)" in text
    # the arithmetic is what Benjamini-Hochberg does: in a batch of 10, 3 files above every calibration score
    # flag nothing, 4 flag 4; a batch of 2 flags one such file alone, a batch of 3 does not
    top = s.max() + 1.0
    for m, k, flagged in ((10, 3, 0), (10, 4, 4), (2, 1, 1), (3, 1, 0)):
        batch = np.r_[np.full(k, top), np.full(m - k, s.min())]
        assert int(cal.decide(batch).sum()) == flagged
    assert math.isclose(bh_reject(np.r_[np.full(4, 1 / 25), np.ones(6)], 0.1).sum(), 4)


def test_cli_calibrate_and_print_calibration_show_the_summary(tmp_path):
    from dxmi_ad.cli.images import print_calibration

    det = DxMIDetector(random_state=0, calibration_fraction=0.2, **QUICK).fit(
        np.random.default_rng(0).normal(size=(120, 3)))
    assert len(det.calibration_.scores) == 24
    det.save(tmp_path / "m")
    res = runner.invoke(app, ["calibrate", "--model", str(tmp_path / "m"), "--fdr", "0.1"])
    assert res.exit_code == 0, res.output
    out = " ".join(res.output.split())
    assert "no fixed threshold" in out and "k >= m/2.5" in out and "; threshold " not in out
    res = runner.invoke(app, ["calibrate", "--model", str(tmp_path / "m"), "--fpr", "0.05"])
    assert res.exit_code == 0, res.output
    assert "the maximum calibration score" in " ".join(res.output.split())

    class _Image:
        calibration_ = Calibration.fit(np.arange(24.0), fdr=0.1, fpr=0.04)

    console = Console(record=True, width=300)
    print_calibration(_Image(), console)
    shown = console.export_text()
    assert "no fixed threshold" in shown and "4 of 10, 40 of 100" in shown


def test_a_semicolon_csv_is_named_as_such(tmp_path):
    from dxmi_ad.data.tabular import load_csv

    f = tmp_path / "semi.csv"
    f.write_text("a;b;c\n1;2;3\n4;5;6\n")
    with pytest.raises(ValueError, match=r"line 2.*not a number.*separate its fields with ';'"):
        load_csv(f)


def test_fit_warns_when_a_dataframe_column_looks_like_a_label():
    import warnings

    import pandas as pd

    from dxmi_ad import DxMIDetector

    rng = np.random.default_rng(0)
    df = pd.DataFrame(rng.normal(size=(60, 3)), columns=["a", "b", "Label"])
    tiny = dict(n_iter=0, ae_pretrain_iter=2, hidden=8, n_layers=1, device="cpu", random_state=0)
    with pytest.warns(UserWarning, match="'Label' of the DataFrame look like labels"):
        DxMIDetector(**tiny).fit(df)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        DxMIDetector(**tiny).fit(df.drop(columns="Label"))
    assert not [w for w in caught if "look like labels" in str(w.message)]


def test_an_identifier_column_is_kept_out_of_the_features_and_passed_to_the_scores(tmp_path):
    rng = np.random.default_rng(0)
    X = rng.normal(0, 1, (80, 4))
    csv = tmp_path / "t.csv"
    csv.write_text("sample_id,a,b,c,d\n" + "\n".join(f"S{i:03d}," + ",".join(f"{v:.4f}" for v in r)
                                                      for i, r in enumerate(X)))
    out = tmp_path / "run"
    sets = [x for kv in ("n_iter=2", "ae_pretrain_iter=5", "warmup_iter=1", "hidden=8", "n_layers=1", "device=cpu")
            for x in ("--set", kv)]
    res = runner.invoke(app, ["train", "--dataset", f"csv:{csv}", "--out", str(out), *sets])
    assert res.exit_code == 2 and "'sample_id': 'S000' is not a number" in res.output
    assert "--id-column sample_id" in " ".join(res.output.split())  # the way out is named
    res = runner.invoke(app, ["train", "--dataset", f"csv:{csv}", "--id-column", "sample_id", "--out", str(out), *sets])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "config.json").read_text())["n_features_in"] == 4  # the identifier is not a feature
    m = json.loads((out / "metrics.json").read_text())  # n_train counts every row; how fit used them beside it
    assert m["n_train"] == 80 and m["n_calibration"] == 16 and m["n_fit"] + m["n_validation"] == 64
    assert m["n_validation"] == 0  # 64 rows leave 6 validation rows, below the minimum: no selection
    new = tmp_path / "new.csv"  # another column order: features are matched by name
    new.write_text("d,sample_id,a,b,c\n1,X-1,0,0,0\n0,X 2,9,9,9\n")
    scored = tmp_path / "scores.csv"
    res = runner.invoke(app, ["score", str(new), "--model", str(out), "--id-column", "sample_id", "--out", str(scored)])
    assert res.exit_code == 0, res.output
    table = scored.read_text().splitlines()
    assert table[0].startswith("path,row,sample_id,pred_score,")
    assert [r.split(",")[2] for r in table[1:]] == ["X-1", "X 2"]
    assert float(table[2].split(",")[3]) > float(table[1].split(",")[3])  # the far row scores higher
    res = runner.invoke(app, ["score", str(new), "--model", str(out)])  # without the flag: named, with the fix
    assert res.exit_code == 2 and "not seen in training ['sample_id']" in res.output
    assert "--id-column sample_id" in " ".join(res.output.split())
    res = runner.invoke(app, ["score", str(new), "--model", str(out), "--id-column", "pred_score"])
    assert res.exit_code == 2 and "may not be named 'pred_score'" in res.output
    bad = tmp_path / "bad.csv"  # a bad value in a trained column: no identifier hint; an empty cell is named so
    bad.write_text("a,b,c,d\n0,x,0,0\n0,,0,0\n")
    res = runner.invoke(app, ["score", str(bad), "--model", str(out)])
    assert res.exit_code == 2 and "'x' is not a number" in res.output and "--id-column" not in res.output
    with pytest.raises(ValueError, match="line 3, column 'b': empty cell"):
        load_csv(_write(tmp_path / "e.csv", "a,b\n1,2\n3,\n"))
    with pytest.raises(ValueError, match="labels must be 0 \\(normal\\) or 1 \\(anomaly\\), got 'normal'"):
        load_csv(_write(tmp_path / "l.csv", "a,b,label\n1,2,normal\n"))
    res = runner.invoke(app, ["calibrate", "--model", str(out), "--calibration-csv", str(csv), "--id-column",
                              "sample_id", "--fpr", "0.1"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["calibrate", "--model", str(out), "--id-column", "sample_id"])
    assert res.exit_code == 2 and "pass that file too" in res.output
    labelled = tmp_path / "labelled.csv"  # `evaluate` has a vector route: a labelled table
    labelled.write_text("sample_id,a,b,c,d,label\n" + "\n".join(
        f"T{i}," + ",".join(f"{v:.4f}" for v in r) + f",{int(i >= 40)}"
        for i, r in enumerate(np.r_[rng.normal(0, 1, (40, 4)), rng.normal(4, 1, (8, 4))])))
    trained = (out / "metrics.json").read_text()
    res = runner.invoke(app, ["evaluate", "--model", str(out), "--csv", str(labelled), "--id-column", "sample_id",
                              "--out", str(out)])  # into the run directory: the training metrics stay
    assert res.exit_code == 0, res.output
    assert (out / "metrics.json").read_text() == trained
    ev = json.loads((out / "evaluation.json").read_text())
    assert ev["n_test"] == 48 and ev["n_test_anomalous"] == 8 and ev["image_AUROC"] > 0.9 and ev["AUPR"] > 0.5
    assert 0 <= ev["FPR"] <= 1 and 0 <= ev["TPR"] <= 1 and ev["model"] == str(out)
    normal_only = tmp_path / "normal_only.csv"  # one class: the realised FPR, no AUROC
    normal_only.write_text("\n".join(labelled.read_text().splitlines()[:41]))
    res = runner.invoke(app, ["evaluate", "--model", str(out), "--csv", str(normal_only), "--id-column", "sample_id",
                              "--out", str(tmp_path / "ev1")])
    assert res.exit_code == 0, res.output
    ev = json.loads((tmp_path / "ev1" / "evaluation.json").read_text())
    assert ev["image_AUROC"] is None and ev["TPR"] is None and 0 <= ev["FPR"] <= 1
    (tmp_path / "afile").write_text("")
    res = runner.invoke(app, ["evaluate", "--model", str(out), "--csv", str(labelled), "--id-column", "sample_id",
                              "--out", str(tmp_path / "afile" / "sub")])
    assert res.exit_code == 2 and "cannot create this folder" in res.output
    res = runner.invoke(app, ["evaluate", "--model", str(tmp_path / "typo"), "--csv", str(labelled)])
    assert res.exit_code == 2 and "typo: not found" in res.output
    res = runner.invoke(app, ["evaluate", "--model", str(out)])
    assert res.exit_code == 2 and "--csv PATH" in res.output
    from dxmi_ad.cli.train import labelled_metrics  # one decision convention: pyod's 1 / 0 predict reads the same

    frame = pd.read_csv(labelled).drop(columns=["sample_id"])
    y, rows = frame.pop("label").to_numpy(), frame.to_numpy()
    kw = dict(n_iter=2, ae_pretrain_iter=5, warmup_iter=1, hidden=8, n_layers=1, device="cpu", random_state=0)
    ours, pyod = DxMIDetector(**kw).fit(X), PyODDxMIDetector(**kw).fit(X)
    assert labelled_metrics(ours, rows, y) == labelled_metrics(pyod, rows, y)
    assert labelled_metrics(ours, rows, y)["TPR"] == float((ours.predict(rows)[y == 1] == -1).mean())
    res = runner.invoke(app, ["evaluate", "--model", str(out), "--csv", str(new), "--id-column", "sample_id"])
    assert res.exit_code == 2 and "no label column" in res.output
    res = runner.invoke(app, ["train", "--dataset", "digits", "--id-column", "x", "--dry-run"])
    assert res.exit_code == 2 and "--id-column is for csv:PATH tables" in res.output
    with pytest.raises(ValueError, match="no column named 'nope'"):
        load_csv(csv, id_column="nope")


def test_a_text_column_in_a_dataframe_is_named_with_the_fix():
    rng = np.random.default_rng(0)
    df = pd.DataFrame(rng.normal(size=(60, 3)), columns=["a", "b", "c"])
    df.insert(0, "part_id", [f"P{i:03d}" for i in range(60)])
    tiny = dict(n_iter=0, ae_pretrain_iter=2, hidden=8, n_layers=1, device="cpu", random_state=0)
    with pytest.raises(ValueError, match=r"fit: column\(s\) 'part_id' of the DataFrame are not numeric \(e.g. 'P000'\)"
                                         r".*X.drop\(columns=\['part_id'\]\)"):
        DxMIDetector(**tiny).fit(df)
    det = DxMIDetector(**tiny).fit(df.drop(columns="part_id"))
    with pytest.raises(ValueError, match=r"scoring: column\(s\) 'part_id'"):
        det.decision_function(df)
    assert det.energy(df.drop(columns="part_id")).shape == (60,)
    as_text = df.drop(columns="part_id").astype(str).astype(object)  # numeric strings still convert, as before
    np.testing.assert_allclose(det.energy(as_text), det.energy(df.drop(columns="part_id")), rtol=1e-5)


def test_cli_and_python_train_the_same_model_on_the_same_csv(tmp_path):
    rng = np.random.default_rng(3)
    csv = tmp_path / "t.csv"
    pd.DataFrame(rng.normal(size=(80, 4)) * [1, 10, 100, 0.1] + 1000, columns=list("abcd")).to_csv(csv, index=False)
    kv = dict(n_iter=2, ae_pretrain_iter=5, warmup_iter=1, hidden=8, n_layers=1, device="cpu")
    sets = [x for k, v in kv.items() for x in ("--set", f"{k}={v}")]
    res = runner.invoke(app, ["train", "--dataset", f"csv:{csv}", "--out", str(tmp_path / "run"), *sets])
    assert res.exit_code == 0, res.output
    cli = json.loads((tmp_path / "run" / "calibration.json").read_text())["threshold"]
    python = DxMIDetector(**kv, random_state=0).fit(pd.read_csv(csv)).threshold_  # float64 on both routes
    assert cli == pytest.approx(python, rel=1e-9)


def test_python_calibrate_with_new_rows_keeps_the_rule_and_target():
    """`calibrate(X_new)` without a rate used to reset the target to 0.01 (the CLI keeps the stored one)."""
    small_det = _fresh_small_det()
    rows = np.random.default_rng(2).normal(size=(400, 3))
    assert small_det.calibration_.fpr == pytest.approx(1 / 13)  # 12 held-out rows: the default fell back
    small_det.calibrate(rows[:200])  # a fallback is not a target: the new set resolves the default again
    assert small_det.calibration_.fpr == pytest.approx(0.01)
    small_det.calibrate(rows[:200], fpr=0.05)
    small_det.calibrate(rows[200:])
    assert small_det.calibration_.rule == "fpr" and small_det.calibration_.fpr == pytest.approx(0.05)
    assert len(small_det.calibration_.scores) == 200
    small_det.calibrate(rows[:200], fdr=0.1)
    small_det.calibrate(rows[200:])
    assert small_det.calibration_.rule == "fdr" and small_det.calibration_.fdr == pytest.approx(0.1)
    small_det.calibrate(rows[:200], fpr=0.02)  # an explicit rate still replaces the rule
    assert small_det.calibration_.rule == "fpr" and small_det.calibration_.fpr == pytest.approx(0.02)


def _fresh_small_det() -> DxMIDetector:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return DxMIDetector(random_state=0, **QUICK).fit(np.random.default_rng(0).normal(size=(60, 3)))


def test_python_warns_when_benjamini_hochberg_can_flag_nothing():
    """fdr rule, 50 calibration rows: p >= 1/51, so in a batch of 100 one far row cannot be flagged alone."""
    small_det = _fresh_small_det()
    from dxmi_ad.decision import BatchFDRWarning

    rng = np.random.default_rng(3)
    small_det.calibrate(rng.normal(size=(50, 3)), fdr=0.1)
    batch = np.r_[rng.normal(size=(99, 3)), np.full((1, 3), 50.0)]
    with pytest.warns(BatchFDRWarning, match=r"flagged none of the 100 items although 1 scored above every one of "
                                             r"the 50 calibration scores.*at most 5\).*at least 999 calibration"):
        assert (small_det.predict(batch) == 1).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        small_det.predict(batch[-3:])  # a small batch flags the far row: no warning
    assert small_det.predict(batch[-3:])[-1] == -1


def test_library_warnings_name_the_users_line():
    """Warnings used to point at a line inside dxmi_ad (a fixed stacklevel); they name the caller's file now."""
    from dxmi_ad.calibration import resolve_fpr

    with pytest.warns(UserWarning, match="model selection skipped") as record:
        DxMIDetector(random_state=0, **QUICK).fit(np.random.default_rng(0).normal(size=(60, 3)))
    assert {r.filename for r in record if "model selection" in str(r.message)} == {__file__}
    with pytest.warns(UserWarning, match="cannot support the default") as record:
        resolve_fpr(None, 12)
    assert record[0].filename == __file__


def test_warnings_skip_the_torch_no_grad_wrapper(tmp_path):
    """A warning raised under a @torch.no_grad() method of dxmi_ad names the caller, not torch/utils/_contextlib.py."""
    import warnings as w

    from dxmi_ad._warn import caller_stacklevel

    @torch.no_grad()
    def library_method():
        w.warn("x", UserWarning, stacklevel=caller_stacklevel())

    library_method.__wrapped__.__code__ = library_method.__wrapped__.__code__.replace(
        co_filename=str(Path(dxmi_ad_file()).parent / "fake.py"))
    with pytest.warns(UserWarning) as record:
        library_method()
    assert record[0].filename == __file__


def dxmi_ad_file() -> str:
    import dxmi_ad

    return dxmi_ad.__file__
