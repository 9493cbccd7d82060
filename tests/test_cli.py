"""The `dxmi-ad` command line: train / sample, run directories, clear errors without tracebacks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from dxmi_ad import recipes
from dxmi_ad.cli.main import app

runner = CliRunner()
FAST = ["--set", "n_iter=20", "--set", "ae_pretrain_iter=200", "--set", "warmup_iter=5", "--set", "device=cpu"]


def test_train_digits_writes_run_dir(tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "--dataset", "digits", "--normal-class", "1", "--out", str(out), *FAST])
    assert result.exit_code == 0, result.output
    assert "AUROC" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["calibration.json", "config.json", "logs", "metrics.json",
                                                     "model.safetensors"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["image_AUROC"] > 0.9 and metrics["dataset"] == "digits-1"
    assert 0 <= metrics["FPR"] < 0.2 and metrics["TPR"] > 0.5
    # training records through Lightning's CSV logger: one row per logged iteration of every stage
    log = (out / "logs" / "train" / "metrics.csv").read_text().splitlines()
    assert "dxmi/energy_data" in log[0] and "autoencoder/loss" in log[0] and len(log) > 10
    # no leftovers from the atomic write
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
    again = runner.invoke(app, ["train", "--dataset", "digits", "--out", str(out), *FAST])
    assert again.exit_code == 2 and "exists" in again.output


def test_train_csv_and_sample(tmp_path):
    rng = np.random.default_rng(0)
    X = np.r_[rng.normal(0, 1, (200, 3)), rng.normal(5, 1, (20, 3))]
    label = np.r_[np.zeros(200), np.ones(20)]
    lines = ["a,b,c,label"] + [",".join(f"{v:.5f}" for v in row) + f",{int(lab)}" for row, lab in zip(X, label)]
    csv = tmp_path / "table.csv"
    csv.write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "--dataset", f"csv:{csv}", "--out", str(out), *FAST])
    assert result.exit_code == 0, result.output
    assert "feature names" not in result.output  # a named fit scores its own rows without scikit-learn's warning
    assert "3 feature columns: recipe tables_low_dim" in result.output  # what DxMIDetector() builds for 3 features
    assert json.loads((out / "config.json").read_text())["config"]["energy_model"] == "mlp"
    assert json.loads((out / "metrics.json").read_text())["image_AUROC"] > 0.9
    s = runner.invoke(app, ["sample", "--model", str(out), "-n", "50", "--out", str(tmp_path / "s.csv")])
    assert s.exit_code == 0, s.output
    assert (tmp_path / "s.csv").read_text().splitlines()[0] == "a,b,c"  # the training columns
    assert len((tmp_path / "s.csv").read_text().splitlines()) == 51


def test_score_tables_with_a_vector_model(tmp_path):
    """`dxmi-ad score` scores the rows of CSV tables with a vector model: columns checked by name, one CSV row per
    table row (path, row = line in the file), decisions from the stored calibration, nothing written on a bad table."""
    rng = np.random.default_rng(1)
    normal = rng.normal(0, 1, (300, 3))
    csv = tmp_path / "table.csv"
    csv.write_text("a,b,c\n" + "\n".join(",".join(f"{v:.5f}" for v in row) for row in normal) + "\n")
    out = tmp_path / "run"
    assert runner.invoke(app, ["train", "--dataset", f"csv:{csv}", "--out", str(out), *FAST]).exit_code == 0
    assert json.loads((out / "config.json").read_text())["feature_names_in"] == ["a", "b", "c"]
    new = tmp_path / "new.csv"  # columns in another order are matched by name; a label column is ignored
    new.write_text("c,label,a,b\n0,0,0,0\n\n9,1,9,9\n0.1,0,-0.1,0.2\n")
    scores = tmp_path / "scores.csv"
    r = runner.invoke(app, ["score", str(new), "--model", str(out), "--out", str(scores)])
    assert r.exit_code == 0, r.output
    assert "scored 3 of 3 row(s): 1 flagged anomalous, 2 normal" in r.output
    rows = scores.read_text().splitlines()
    assert rows[0] == "path,row,pred_score,threshold,pred_label,p_value,normalized_score,error"
    table = [line.split(",") for line in rows[1:]]
    assert [t[1] for t in table] == ["2", "4", "5"]  # physical lines: the blank line 3 is skipped
    assert [t[4] for t in table] == ["0", "1", "0"]
    assert float(table[1][2]) > float(table[1][3]) > float(table[0][2])  # the far row is above the threshold
    from dxmi_ad import load

    det = load(out)  # the same energies as the Python API
    import pandas as pd

    expected = det.energy(pd.DataFrame([[0, 0, 0], [9, 9, 9], [-0.1, 0.2, 0.1]], columns=["a", "b", "c"]))
    np.testing.assert_allclose([float(t[2]) for t in table], expected, rtol=1e-5)
    for bad, words in ((tmp_path, "is a folder"), (out / "config.json", "CSV files")):
        r = runner.invoke(app, ["score", str(bad), "--model", str(out)])
        assert r.exit_code == 2 and words in r.output, r.output
    wide = tmp_path / "wide.csv"
    wide.write_text("a,b,c,d\n1,2,3,4\n")
    r = runner.invoke(app, ["score", str(wide), "--model", str(out), "--out", str(tmp_path / "w.csv")])
    assert r.exit_code == 2 and "not seen in training ['d']" in r.output and "expected: a, b, c" in r.output
    assert not (tmp_path / "w.csv").exists()
    r = runner.invoke(app, ["score", str(csv), str(tmp_path / "none.csv"), "--model", str(out)])
    assert r.exit_code == 2 and "none.csv" in r.output
    for model in (tmp_path / "nope", csv):  # a wrong --model is named before any input is listed
        r = runner.invoke(app, ["score", str(csv), "--model", str(model)])
        assert r.exit_code == 2 and "run directory" in r.output and "image file" not in r.output, r.output
    r = runner.invoke(app, ["score", str(new), "--model", str(out), "--heatmaps", str(tmp_path / "h")])
    assert r.exit_code == 2 and "image models" in r.output
    dup = tmp_path / "dup.csv"
    dup.write_text("a,b,c,a\n1,2,3,4\n")
    r = runner.invoke(app, ["score", str(dup), "--model", str(out)])
    assert r.exit_code == 2 and "must be unique" in r.output and "columns 1, 4" in r.output
    # calibration rows are matched by name too (reordered columns give the same rule as the original order)
    cal = tmp_path / "cal.csv"
    cal.write_text("c,a,b\n" + "\n".join(",".join(f"{v:.5f}" for v in row[[2, 0, 1]]) for row in normal[:120]))
    r = runner.invoke(app, ["calibrate", "--model", str(out), "--calibration-csv", str(cal), "--fpr", "0.05"])
    assert r.exit_code == 0 and "feature names" not in r.output, r.output
    from dxmi_ad import load as load_again

    expected_threshold = load_again(out).calibration_.threshold
    plain = tmp_path / "plain.csv"
    plain.write_text("a,b,c\n" + "\n".join(",".join(f"{v:.5f}" for v in row) for row in normal[:120]))
    r = runner.invoke(app, ["calibrate", "--model", str(out), "--calibration-csv", str(plain), "--fpr", "0.05"])
    assert r.exit_code == 0 and load_again(out).calibration_.threshold == pytest.approx(expected_threshold)
    assert load_again(out).calibration_.source == f"120 normal rows of {plain}" and "plain.csv" in r.output
    r = runner.invoke(app, ["calibrate", "--model", str(out), "--calibration-csv", str(plain)])  # no rate: kept
    assert r.exit_code == 0 and "keeping the model's rule: target FPR 0.05" in r.output, r.output
    assert load_again(out).calibration_.threshold == pytest.approx(expected_threshold)
    # an F1-optimal threshold from a labelled table (as --validation-dir does for images)
    val = tmp_path / "val.csv"
    far = rng.normal(4, 1, (20, 3))
    val.write_text("label,b,a,c\n" + "\n".join(f"{lab},{r[1]:.5f},{r[0]:.5f},{r[2]:.5f}" for lab, r in
                                                 [(0, row) for row in normal[:40]] + [(1, row) for row in far]))
    r = runner.invoke(app, ["calibrate", "--model", str(out), "--validation-csv", str(val)])
    assert r.exit_code == 0, r.output
    cal_f1 = load_again(out).calibration_
    assert cal_f1.rule == "f1" and cal_f1.validation == {"n_normal": 40, "n_anomalous": 20, "f1": cal_f1.validation["f1"]}
    assert cal_f1.validation["f1"] > 0.8 and "keeping the model's rule" not in r.output
    for args, message in ((["--validation-csv", str(plain)], "needs a label column with both"),
                          (["--validation-csv", str(val), "--fdr", "0.1"], "choose one rule")):
        r = runner.invoke(app, ["calibrate", "--model", str(out), *args])
        assert r.exit_code == 2 and message in r.output, r.output


def test_table_workflow_mistakes_get_named(tmp_path, monkeypatch):
    """New-user leftovers: an extra text column is an unknown column (not "not a number"); a workbook is told to be
    saved as CSV (by name and by content); `score --out` must be CSV; `sample` writes CSV by default and `score`
    reads it back; the train table says what validation_AUROC and image_AUROC mean."""
    rng = np.random.default_rng(2)
    csv = tmp_path / "table.csv"
    csv.write_text("a,b\n" + "\n".join(",".join(f"{v:.5f}" for v in row) for row in rng.normal(0, 1, (300, 2))))
    out = tmp_path / "run"
    r = runner.invoke(app, ["train", "--dataset", f"csv:{csv}", "--out", str(out), *FAST])
    assert r.exit_code == 0, r.output
    assert "validation_AUROC: held-out normal training rows vs SYNTHETIC anomalies" in " ".join(r.output.split())
    ids = tmp_path / "ids.csv"
    ids.write_text("id,a,b\nrow-1,0.1,0.2\n")
    for args in (["score", str(ids), "--model", str(out)],
                 ["calibrate", "--model", str(out), "--calibration-csv", str(ids), "--fpr", "0.1"]):
        r = runner.invoke(app, args)
        assert r.exit_code == 2 and "not seen in training ['id']" in r.output and "not a number" not in r.output
    book = tmp_path / "book.xlsx"
    book.write_bytes(b"PK\x03\x04" + bytes(60))
    r = runner.invoke(app, ["score", str(book), "--model", str(out)])
    assert r.exit_code == 2 and "save the sheet as CSV" in r.output
    renamed = tmp_path / "book.csv"
    renamed.write_bytes(book.read_bytes())
    for args in (["score", str(renamed), "--model", str(out)], ["train", "--dataset", f"csv:{renamed}"]):
        r = runner.invoke(app, args)
        assert r.exit_code == 2 and "Excel .xlsx" in r.output and "save the table as CSV" in r.output, r.output
    r = runner.invoke(app, ["score", str(csv), "--model", str(out), "--out", str(tmp_path / "scores.xlsx")])
    assert r.exit_code == 2 and "name the file .csv" in r.output and not (tmp_path / "scores.xlsx").exists()
    import os

    fifo = tmp_path / "pipe"  # like /dev/stdout: not a regular file, which the atomic write would replace
    os.mkfifo(fifo)
    for target in (str(fifo), "-"):
        r = runner.invoke(app, ["score", str(csv), "--model", str(out), "--out", target])
        assert r.exit_code == 2 and "omit --out to print the CSV" in r.output, r.output
    assert fifo.is_fifo() and not (tmp_path / "-").exists()
    before = csv.read_bytes()  # the review's data-loss cases: the scored table, the model's own files
    for target, words in ((csv, "is one of the files to score"), (out / "model.safetensors", "not .safetensors"),
                          (out / "logs" / "train" / "metrics.csv", "would replace a file of the model")):
        r = runner.invoke(app, ["score", str(csv), "--model", str(out), "--out", str(target)])
        assert r.exit_code == 2 and words in r.output, r.output
    assert csv.read_bytes() == before
    r = runner.invoke(app, ["score", str(csv), "--model", str(out), "--out", str(out / "scores.csv")])
    assert r.exit_code == 0  # a new file in the run directory is fine (and again: it is not a model file)
    assert runner.invoke(app, ["score", str(csv), "--model", str(out), "--out", str(out / "scores.csv")]).exit_code == 0
    for text, words in (("0.1,0.2\n0.3,0.4\n", "header holds numbers"), (",a,b\n0,0.1,0.2\n", "has no name")):
        bad = tmp_path / "bad.csv"
        bad.write_text(text)
        r = runner.invoke(app, ["train", "--dataset", f"csv:{bad}", "--out", str(tmp_path / "x"), *FAST])
        assert r.exit_code == 2 and words in r.output, r.output
    for dataset, words in (("csv:", "needs the file's path"), ("CSV:t.csv", "lower case: csv:t.csv")):
        r = runner.invoke(app, ["train", "--dataset", dataset])
        assert r.exit_code == 2 and words in r.output, r.output
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(app, ["sample", "--model", str(out), "-n", "20"])
    assert r.exit_code == 0 and (tmp_path / "samples.csv").read_text().splitlines()[0] == "a,b", r.output
    r = runner.invoke(app, ["score", "samples.csv", "--model", str(out), "--out", "s.csv"])
    assert r.exit_code == 0 and len((tmp_path / "s.csv").read_text().splitlines()) == 21, r.output


def test_sample_2d_writes_png(tmp_path):
    out = tmp_path / "g"
    args = ["train", "--dataset", "eight-gaussians", "--out", str(out), "--set", "n_iter=10",
            "--set", "sampler_pretrain_iter=50", "--set", "device=cpu"]
    assert runner.invoke(app, args).exit_code == 0
    s = runner.invoke(app, ["sample", "--model", str(out), "-n", "300", "--out", str(tmp_path / "s.npy")])
    assert s.exit_code == 0, s.output
    assert np.load(tmp_path / "s.npy").shape == (300, 2)
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    # nothing is lost: a second run refuses to replace the files (the scatter plot too) unless --overwrite
    before = (tmp_path / "s.npy").read_bytes()
    again = runner.invoke(app, ["sample", "--model", str(out), "-n", "300", "--seed", "1", "--out", str(tmp_path / "s.npy")])
    assert again.exit_code == 2 and "exists" in again.output and "--overwrite" in again.output, again.output
    assert (tmp_path / "s.npy").read_bytes() == before
    (tmp_path / "s.npy").unlink()
    plot_only = runner.invoke(app, ["sample", "--model", str(out), "-n", "300", "--out", str(tmp_path / "s.npy")])
    assert plot_only.exit_code == 2 and "s.png exists" in plot_only.output, plot_only.output
    forced = runner.invoke(app, ["sample", "--model", str(out), "-n", "300", "--seed", "1", "--overwrite",
                                 "--out", str(tmp_path / "s.npy")])
    assert forced.exit_code == 0 and np.load(tmp_path / "s.npy").shape == (300, 2), forced.output


def test_train_refuses_an_out_it_cannot_write_before_training(tmp_path):
    blocked = tmp_path / "a_file"
    blocked.write_text("x")
    r = runner.invoke(app, ["train", "--dataset", "digits", "--out", str(blocked / "run"), *FAST])
    assert r.exit_code == 2 and "cannot be written there" in r.output and "Traceback" not in r.output, r.output
    assert "training" not in r.output.lower() or "failed" not in r.output.lower()
    assert not list(tmp_path.glob(".run.check.*")) and blocked.read_text() == "x"


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["train", "--dataset", "imagenet"], "unknown dataset"),  # unknown dataset name
        (["train", "--dataset", "csv:/no/such.csv"], "not found"),  # missing CSV
        (["train", "--dataset", "digits", "--set", "bogus=1"], "unknown recipe key"),  # unknown vector key
        (["train", "--set", "bogus=1"], "unknown recipe key"),  # unknown image key
        (["train", "--dataset", "mvtec"], "--data-root"),  # mvtec without a root
        (["train", "--set", "n_iter"], "KEY=VALUE"),  # malformed --set
        (["sample", "--model", "/no/such/run"], "not found"),  # missing run dir
    ],
)
def test_errors_are_clear(args, match):
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert match in result.output
    assert "Traceback" not in result.output


def test_bad_csv_names_line(tmp_path):
    csv = tmp_path / "bad.csv"
    csv.write_text("a,b\n1,2\n3,4\n5,oops\n")
    result = runner.invoke(app, ["train", "--dataset", f"csv:{csv}"])
    assert result.exit_code == 2 and "line 4" in result.output and "oops" in result.output


def test_set_reads_scientific_notation():
    result = runner.invoke(app, ["train", "--dataset", "digits", "--dry-run", "--set", "energy_lr=1e-5"])
    assert result.exit_code == 0 and '"energy_lr": 1e-05' in result.output


def test_out_pointing_at_a_file_is_refused_before_training(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    result = runner.invoke(app, ["train", "--dataset", "digits", "--out", str(f), "--overwrite"])
    assert result.exit_code == 2 and "existing file" in result.output


def test_dry_run_prints_recipe():
    result = runner.invoke(app, ["train", "--dataset", "digits", "--dry-run", "--set", "n_iter=7"])
    assert result.exit_code == 0 and '"n_iter": 7' in result.output


def _dry_run_recipe(recipe: Path, text: str, *args: str) -> tuple[dict, str]:
    """Write ``text`` to ``recipe``, run ``train --dataset digits --dry-run`` on it; (printed JSON, the JSON text)."""
    recipe.write_text(text)
    res = runner.invoke(app, ["train", "--dataset", "digits", "--dry-run", "--recipe", str(recipe), *args])
    assert res.exit_code == 0, res.output
    printed = res.stdout[res.stdout.index("{"):]
    return json.loads(printed), printed


def test_vector_recipes_take_the_sectioned_layout_and_model_prefixed_sets(tmp_path):
    """One recipe layout for every mode: ``model:`` (+ ``runtime:``) sections and ``--set model.KEY=V``."""
    shown, _ = _dry_run_recipe(tmp_path / "vec.yaml", "model:\n  n_iter: 60\n  hidden: 64\n", "--set",
                               "model.n_steps=3")
    assert (shown["n_iter"], shown["hidden"], shown["n_steps"]) == (60, 64, 3)


def test_a_dxmi_config_field_means_the_same_in_a_vector_recipe(tmp_path):
    """A ``model:`` key that is a DxMIConfig field (not an estimator parameter) reaches the fitted config."""
    from dxmi_ad import DxMIDetector, recipes

    shown, _ = _dry_run_recipe(tmp_path / "vec.yaml", "model:\n  n_iter: 60\n  sampler_hidden: 48\n  lr_schedule: cosine\n",
                               "--set", "model.last_sigma=0.02")
    assert shown["config_overrides"] == {"last_sigma": 0.02, "lr_schedule": "cosine", "sampler_hidden": 48}
    params = recipes.detector_params({"model": {"sampler_hidden": 48, "hidden": 32, "energy": "autoencoder"}})
    config = DxMIDetector(**params)._make_config(dim=16, n_rows=100)
    assert (config.sampler_hidden, config.value_hidden, config.energy_model) == (48, 32, "autoencoder")
    bad = runner.invoke(app, ["train", "--dataset", "digits", "--dry-run", "--set", "model.last_sigma=-1"])
    assert bad.exit_code != 0 and "last_sigma" in bad.output
    fixed = runner.invoke(app, ["train", "--dataset", "digits", "--dry-run", "--set", "dim=3"])
    assert fixed.exit_code != 0 and "dim" in fixed.output


def test_recipes_read_exponent_numbers_and_dry_runs_refuse_unknown_datasets(tmp_path):
    """New-user findings: ``energy_lr: 1e-5`` (YAML 1.1 reads it as text) and the JSON that --dry-run prints load
    back as recipes; a dry run refuses a dataset the real run would refuse."""
    shown, printed = _dry_run_recipe(tmp_path / "lr.yaml", "model:\n  energy_lr: 1e-5\n  sampler_lr: 2E-4\n")
    assert (shown["energy_lr"], shown["sampler_lr"]) == (1e-5, 2e-4)
    again, _ = _dry_run_recipe(tmp_path / "printed.json", printed)  # the printed JSON loads back as a recipe
    assert (again["energy_lr"], again["sampler_lr"]) == (1e-5, 2e-4)
    for dataset, words in (("wines", "unknown dataset"), ("t.csv", "csv:t.csv"), ("csv:nope.csv", "not found")):
        bad = runner.invoke(app, ["train", "--dataset", dataset, "--dry-run"])
        assert bad.exit_code != 0 and words in bad.output, bad.output
    pixel = runner.invoke(app, ["train", "--mode", "pixel", "--dataset", "wine", "--dry-run"])
    assert pixel.exit_code != 0 and "pixel mode trains on" in pixel.output
    rule = runner.invoke(app, ["train", "--mode", "pixel", "--set", "project_samples=true", "--dry-run"])
    assert rule.exit_code == 2 and "needs spherical=true" in rule.output  # the config's cross-field rules, as a run
    typo = runner.invoke(app, ["train", "--dataset", "digits", "--dry-run", "--set", "n_itr=5"])
    assert typo.exit_code != 0 and "did you mean 'n_iter'" in typo.output and "--set n_itr" in typo.output


@pytest.mark.parametrize("name", [n for n in recipes.names() if n.startswith("textures")])
def test_shipped_texture_recipes_resolve(name):
    """Every shipped image recipe for the embedded textures resolves through ``train --dry-run`` (the config's
    cross-field rules included); ``textures_paper`` carries the paper's autoencoder size (App. C.3) and the quiet,
    far start of the README's row, with the scoring chosen on validation."""
    res = runner.invoke(app, ["train", "--recipe", name, "--dry-run"])
    assert res.exit_code == 0, res.output
    shown = json.loads(res.stdout[res.stdout.index("{"):])
    model = shown["model"]
    if name == "textures_paper":
        assert (model["energy_hidden"], model["latent_dim"]) == (1024, 128)
        assert (model["init_sigma"], model["init_keep_residual"]) == (1e-3, True)
        assert (model["init_noise_low"], model["init_noise_high"]) == (0.05, 0.3)
        assert shown["scoring"] == {"blur_sigma": 0.5, "top_k": 3}
        assert (model["noise_negative_fraction"], model["noise_negative_low"], model["noise_negative_high"]) == (
            0.5, 0.2, 1.0)
