"""Issue 11, run directories and recipes: trust never comes from a file (item 1), values read from a run directory
are validated (item 2), recipe values and moved weights fail before any work (item 12), killed runs restart with
their original command and leave no temporary folders behind (item 13)."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import dxmi_ad
from dxmi_ad.calibration import Calibration
from dxmi_ad.cli.main import app
from dxmi_ad.config import DxMIConfig
from dxmi_ad.image import FeatureSettings, ImageDetector
from dxmi_ad.training.fit import build_model

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]


class _Marker:
    """Unpickling this object creates a marker folder (a harmless stand-in for arbitrary code).

    ``os.makedirs`` rather than ``open``: an opened file would stay open until garbage collection, whose
    ResourceWarning then lands in whatever later test happens to be running (a CI failure: a later CLI test
    printed it)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (os.makedirs, (self.path, 0o777, True))  # exist_ok: it may be unpickled twice


# ---------------------------------------------------------------------- item 1
def test_resume_never_takes_trust_pickle_from_run_json(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "code_ran"
    feats = tmp_path / "shared_drive" / "feats"
    feats.mkdir(parents=True)
    (feats / "train_data.pkl").write_bytes(pickle.dumps(_Marker(marker)))
    run = tmp_path / "received" / "run"
    ck = run.parent / "run.checkpoints"
    ck.mkdir(parents=True)
    (ck / "run.json").write_text(json.dumps({"dataset": "features", "data_root": str(feats), "trust_pickle": True,
                                             "overwrite": True, "checkpoint_every": 1, "out": str(run)}))
    res = runner.invoke(app, ["train", "--resume", str(run)])
    assert res.exit_code == 2 and "--trust-pickle" in res.output.replace("\n", ""), res.output
    assert "Traceback" not in res.output
    assert not marker.exists()  # nothing was unpickled
    # the permission given on the command line of this invocation is the one that counts
    res = runner.invoke(app, ["train", "--resume", str(run), "--trust-pickle"])
    assert marker.exists() and res.exit_code == 2, res.output


def test_resume_refuses_a_malformed_run_json_and_an_existing_run_without_overwrite(tmp_path):
    run = tmp_path / "run"
    ck = tmp_path / "run.checkpoints"
    ck.mkdir()
    (ck / "run.json").write_text(json.dumps({"dataset": "digits", "seed": "zero", "checkpoint_every": 5}))
    res = runner.invoke(app, ["train", "--resume", str(run)])
    flat = res.output.replace("\n", "")
    assert res.exit_code == 2 and "run.json" in flat and "'seed' must be a int" in flat, flat
    (ck / "run.json").write_text(json.dumps({"dataset": "digits", "fpr": 5.0, "checkpoint_every": 5}))
    res = runner.invoke(app, ["train", "--resume", str(run)])
    assert res.exit_code == 2 and "'fpr'" in res.output.replace("\n", ""), res.output
    (ck / "run.json").write_text(json.dumps(["not", "an", "object"]))
    res = runner.invoke(app, ["train", "--resume", str(run)])
    assert res.exit_code == 2 and "JSON object" in res.output.replace("\n", ""), res.output
    (ck / "run.json").write_text(json.dumps({"dataset": "digits", "overwrite": True, "checkpoint_every": 5}))
    run.mkdir()
    (run / "precious.txt").write_text("keep")
    res = runner.invoke(app, ["train", "--resume", str(run)])  # overwrite: true in the file is not a permission
    assert res.exit_code == 2 and "--overwrite" in res.output.replace("\n", "") and (run / "precious.txt").exists()


# ---------------------------------------------------------------------- item 2
@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A small untrained image model directory (64 px, random-weight backbone saved to a weights file)."""
    from safetensors.torch import save_file

    from dxmi_ad.features.extractor import FeatureExtractor

    root = tmp_path_factory.mktemp("rundir")
    weights = root / "backbone.safetensors"
    save_file({k: v.contiguous() for k, v in FeatureExtractor(pretrained=False).body.state_dict().items()}, weights)
    cfg = DxMIConfig(dim=192, sampler_hidden=8, value_hidden=8, energy_hidden=8, latent_dim=4, time_dim=8,
                     spherical=True)
    det = ImageDetector(cfg, FeatureSettings(image_size=64, weights=str(weights)))
    det.model_ = build_model(cfg)
    det.calibration_ = Calibration.fit(np.linspace(0.0, 1.0, 50), fpr=0.05)
    det.save(root / "run")
    image = root / "img.png"
    Image.fromarray((np.random.default_rng(0).random((40, 40, 3)) * 255).astype(np.uint8)).save(image)
    return root / "run", image


def _nan(text: str, key: str) -> str:
    """The JSON text with the number of ``key`` replaced by NaN (which Python's json reads as a float)."""
    return re.sub(rf'("{key}": )[-0-9.e]+', r"\1NaN", text, count=1)


def _set(path: list, value):
    def edit(d):
        cur = d
        for k in path[:-1]:
            cur = cur[k]
        cur[path[-1]] = value
        return d
    return edit


TAMPERINGS = {  # name: (file, edit of the parsed JSON (or raw text), field expected in the message)
    "threshold NaN": ("calibration.json", lambda t: _nan(t, "threshold"), "threshold"),
    "threshold string": ("calibration.json", _set(["threshold"], "high"), "threshold"),
    "threshold null under fpr": ("calibration.json", _set(["threshold"], None), "threshold"),
    "scores with NaN": ("calibration.json", lambda t: re.sub(r'("scores": \[\s*)[-0-9.e]+', r"\1NaN", t), "scores"),
    "scores string": ("calibration.json", _set(["scores"], "abc"), "scores"),
    "scores nested": ("calibration.json", _set(["scores"], [[1, 2], [3]]), "scores"),
    "scores empty": ("calibration.json", _set(["scores"], []), "scores"),
    "rule unknown": ("calibration.json", _set(["rule"], "magic"), "rule"),
    "fpr above 1": ("calibration.json", _set(["fpr"], 2.0), "fpr"),
    "fdr string": ("calibration.json", lambda d: {**d, "rule": "fdr", "fdr": "a"}, "fdr"),
    "fdr negative": ("calibration.json", lambda d: {**d, "rule": "fdr", "fdr": -1}, "fdr"),
    "calibration list": ("calibration.json", lambda d: [1, 2], "JSON object"),
    "config list": ("config.json", lambda d: [1, 2], "JSON object"),
    "image size negative": ("config.json", _set(["features", "image_size"], -4), "features.image_size"),
    "image size string": ("config.json", _set(["features", "image_size"], "big"), "features.image_size"),
    "image size float": ("config.json", _set(["features", "image_size"], 64.5), "features.image_size"),
    "stages empty": ("config.json", _set(["features", "out_indices"], []), "features.out_indices"),
    "stages strings": ("config.json", _set(["features", "out_indices"], ["a"]), "features.out_indices"),
    "backbone unknown": ("config.json", _set(["features", "backbone"], "no_such_net"), "features.backbone"),
    "backbone number": ("config.json", _set(["features", "backbone"], 5), "features.backbone"),
    "weights number": ("config.json", _set(["features", "weights"], 7), "features.weights"),
    "pretrained string": ("config.json", _set(["features", "pretrained"], "yes"), "features.pretrained"),
    "features list": ("config.json", _set(["features"], [1]), "features"),
    "model config list": ("config.json", _set(["config"], [1]), "config"),
    "model lr NaN": ("config.json", lambda t: _nan(t, "energy_lr"), "energy_lr"),
    "model latent negative": ("config.json", _set(["config", "latent_dim"], -1), "latent_dim"),
}


@pytest.mark.parametrize("name", list(TAMPERINGS))
def test_tampered_run_directory_gives_a_clean_error_naming_file_and_field(tmp_path, base_run, name):
    run, image = base_run
    file, edit, field = TAMPERINGS[name]
    tampered = tmp_path / "run"
    shutil.copytree(run, tampered)
    text = (tampered / file).read_text()
    try:
        edited = edit(text)
    except (TypeError, AttributeError):  # an edit of the parsed JSON
        edited = None
    if not isinstance(edited, str):
        edited = json.dumps(edit(json.loads(text)), indent=1)
    assert edited != text
    (tampered / file).write_text(edited)
    with pytest.raises(ValueError) as err:
        dxmi_ad.load(tampered).predict(np.zeros((1, 3, 40, 40), np.float32))
    assert file in str(err.value) and field in str(err.value), str(err.value)
    res = runner.invoke(app, ["score", str(image), "--model", str(tampered)])
    flat = res.output.replace("\n", "")
    assert res.exit_code == 2 and "error:" in flat and file in flat and field in flat, flat
    assert "Traceback" not in flat


# ---------------------------------------------------------------------- item 12
def test_score_after_the_weights_file_moved_names_it_and_the_fix(tmp_path, base_run):
    run, image = base_run
    moved = tmp_path / "run"
    shutil.copytree(run, moved)
    weights = Path(json.loads((moved / "config.json").read_text())["features"]["weights"])
    ok = runner.invoke(app, ["score", str(image), "--model", str(moved)])
    assert ok.exit_code == 0, ok.output
    away = tmp_path / "elsewhere.safetensors"
    shutil.copy(weights, away)
    meta = json.loads((moved / "config.json").read_text())
    meta["features"]["weights"] = str(tmp_path / "gone.safetensors")
    (moved / "config.json").write_text(json.dumps(meta))
    res = runner.invoke(app, ["score", str(image), "--model", str(moved), "--out", str(tmp_path / "s.csv")])
    flat = res.output.replace("\n", "")
    assert res.exit_code == 2 and "gone.safetensors" in flat and "config.json" in flat and "weights" in flat, flat
    assert not (tmp_path / "s.csv").exists()  # failed before scoring anything
    with pytest.raises(FileNotFoundError, match="gone.safetensors"):
        dxmi_ad.load(moved).predict(np.zeros((1, 3, 40, 40), np.float32))


@pytest.mark.parametrize("sets, expected", [
    (["features.image_size=-4"], "features.image_size"),
    (["features.image_size=big"], "features.image_size"),
    (["features.backbone=no_such_net"], "features.backbone"),
    (["energy_lr=.nan"], "energy_lr"),
    (["n_iter=-3"], "n_iter"),
    (["x=!!python/object:os.system"], "YAML tags are refused"),
])
def test_recipe_values_fail_before_any_work(tmp_path, sets, expected):
    out = tmp_path / "run"
    args = ["train", "--dataset", "folder", "--data-root", str(tmp_path / "no_such_folder"), "--out", str(out),
            "--checkpoint-every", "5"]
    for s in sets:
        args += ["--set", s]
    res = runner.invoke(app, args)
    assert res.exit_code == 2 and expected in res.output.replace("\n", "") and "Traceback" not in res.output, \
        res.output
    assert not out.exists() and not (tmp_path / "run.checkpoints").exists()  # nothing written, nothing read


def test_vector_recipe_values_and_yaml_tags_fail_before_any_work(tmp_path):
    for value, expected in (("n_iter=-1", "n_iter"), ("hidden=!!python/name:os.system", "YAML tags are refused")):
        res = runner.invoke(app, ["train", "--dataset", "digits", "--set", value, "--out", str(tmp_path / "r")])
        assert res.exit_code == 2 and expected in res.output.replace("\n", ""), res.output
        assert "Traceback" not in res.output and not (tmp_path / "r").exists()


# ---------------------------------------------------------------------- item 13
FAST = ["--dataset", "digits", "--set", "n_iter=4", "--set", "ae_pretrain_iter=5", "--set", "hidden=8",
        "--set", "batch_size=16", "--set", "device=cpu", "--checkpoint-every", "2"]


def _killed_train(tmp_path: Path, out: Path, patch: str) -> int:
    """Run `dxmi-ad train FAST --out OUT` in a child process that SIGKILLs itself where ``patch`` says."""
    script = "\n".join(["import os, signal, sys", "print(os.getpid(), flush=True)", "import dxmi_ad.training.fit as fit",
                          "import dxmi_ad.training.runtime as rt", patch, "from dxmi_ad.cli.main import app",
                          f"sys.argv = ['dxmi-ad', 'train', *{FAST!r}, '--out', {str(out)!r}]", "app()"])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, timeout=300, env=env)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    return int(proc.stdout.split()[0])


KILL_IN_PRETRAINING = """
def dying(*a, **k):
    os.kill(os.getpid(), signal.SIGKILL)
fit.StagedTraining.pretrain = dying
"""

KILL_WRITING_ITER_2 = """
real = rt.save_model_dir
def dying(directory, tensors, meta):
    real(directory, tensors, meta)
    if meta.get("iteration") == 2:
        os.kill(os.getpid(), signal.SIGKILL)  # files in the temporary folder, killed before the rename
rt.save_model_dir = dying
"""


def test_run_killed_before_its_first_checkpoint_restarts_with_its_original_command(tmp_path):
    out = tmp_path / "run"
    _killed_train(tmp_path, out, KILL_IN_PRETRAINING)
    assert [p.name for p in (tmp_path / "run.checkpoints").iterdir()] == ["run.json"]  # no checkpoint yet
    shutil.copytree(tmp_path / "run.checkpoints", tmp_path / "run2.checkpoints")  # the same state, a second time
    res = runner.invoke(app, ["train", *FAST, "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert (out / "model.safetensors").is_file() and not (tmp_path / "run.checkpoints").exists()
    # --resume of such a run starts it from the beginning
    out2 = tmp_path / "run2"
    res = runner.invoke(app, ["train", "--resume", str(out2)])
    assert res.exit_code == 0 and "from the beginning" in res.output.replace("\n", " "), res.output
    assert (out2 / "model.safetensors").is_file()


def test_run_killed_while_checkpointing_continues_with_its_original_command_without_temporary_folders(tmp_path):
    out = tmp_path / "run"
    pid = _killed_train(tmp_path, out, KILL_WRITING_ITER_2)
    left = sorted(p.name for p in (tmp_path / "run.checkpoints").iterdir())
    assert "iter-00000000" in left and any(n.startswith(".iter-00000002.") for n in left), left
    # a run directory a killed process was writing (same kind of leftover, beside OUT)
    stale = tmp_path / f".run.pid{pid}.abcd1234"
    stale.mkdir()
    res = runner.invoke(app, ["train", *FAST, "--out", str(out)])
    assert res.exit_code == 0 and "continuing" in res.output, res.output
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert kept == ["iter-00000000", "iter-00000002", "iter-00000004", "run.json"], kept  # no hidden folder
    assert not stale.exists() and sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    # other settings are never mixed into the checkpoints: the exact command to continue is named
    (tmp_path / "run2.checkpoints" / "iter-00000002").mkdir(parents=True)
    (tmp_path / "run2.checkpoints" / "iter-00000002" / "model.safetensors").write_bytes(b"x")
    (tmp_path / "run2.checkpoints" / "iter-00000002" / "config.json").write_text("{}")
    res = runner.invoke(app, ["train", *FAST, "--out", str(tmp_path / "run2")])
    assert res.exit_code == 2 and "--resume" in res.output, res.output
