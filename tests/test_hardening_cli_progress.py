"""Issue #11 items 15-17 and 19 (threads): progress off a terminal, the CPU install, schedules that follow what the
user asked for, and the global ``--threads`` option."""

from __future__ import annotations

import io
import json
import re
import tomllib
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from rich.console import Console
from typer.testing import CliRunner

from dxmi_ad import recipes
from dxmi_ad.cli.main import _Progress, app
from dxmi_ad.config import DxMIConfig
from dxmi_ad.training.fit import count_updates, plan_stages, scale_schedule, train_model

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]
TINY_VECTOR = ["--set", "ae_pretrain_iter=40", "--set", "n_iter=40", "--set", "warmup_iter=2", "--set", "hidden=16",
               "--set", "n_layers=1", "--set", "latent_dim=4", "--set", "batch_size=32", "--set", "device=cpu"]
PERCENT_LINE = re.compile(r"^(\w+) (\d+)/(\d+) \((\d+)%\).*elapsed \d+:\d\d:\d\d  remaining (\d+:\d\d:\d\d|-:--:--)$")


# ---------------------------------------------------------------------- item 15: silence off a terminal
def test_train_off_a_terminal_prints_stage_and_percent_lines(tmp_path):
    """CliRunner's stdout is not a terminal (as a log file, CI or nohup): stage lines and percent lines appear."""
    result = runner.invoke(app, ["train", "--dataset", "digits", "--out", str(tmp_path / "run"), *TINY_VECTOR])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "stage autoencoder: 40 steps" in lines and "stage dxmi: 40 steps" in lines
    dxmi = [m for m in map(PERCENT_LINE.match, lines) if m and m.group(1) == "dxmi"]
    ae = [m for m in map(PERCENT_LINE.match, lines) if m and m.group(1) == "autoencoder"]
    assert len(dxmi) >= 3 and len(ae) >= 3
    assert dxmi[-1].group(2) == "40" and dxmi[-1].group(4) == "100"  # the stage's end is always printed
    # training lines carry the losses; model-selection lines (iteration 0, then every validate_every) the AUROC
    assert all(("E(data)=" in m.group(0) and "V loss=" in m.group(0)) or "validation AUROC=" in m.group(0)
               for m in dxmi)
    assert any("E(data)=" in m.group(0) for m in dxmi) and any("validation AUROC=" in m.group(0) for m in dxmi)
    assert not any("━━━━" in line for line in lines if line.startswith(("dxmi", "autoencoder")))  # no bars


def test_progress_picks_bars_on_a_terminal_and_lines_off_it():
    tty, log = io.StringIO(), io.StringIO()
    bars = _Progress(Console(file=tty, force_terminal=True, width=120))
    plain = _Progress(Console(file=log, force_terminal=False, width=120))
    assert not bars.plain and bars.progress is not None
    assert plain.plain and plain.progress is None
    for progress in (bars, plain):
        with progress:
            for i in range(1, 101):
                progress("dxmi", i, 100, {"energy_data": 0.5, "energy_samples": 0.7, "value_loss": 0.01})
    assert "━" in tty.getvalue() and "stage dxmi" not in tty.getvalue()
    out = log.getvalue().splitlines()
    assert out[0] == "stage dxmi: 100 steps"
    pct = [int(m.group(4)) for m in map(PERCENT_LINE.match, out) if m]
    assert pct == list(range(1, 2)) + list(range(5, 101, 5))  # the first step, then every 5%
    assert len(bars.records) == len(plain.records) == 100  # the logs are the same in both modes


def test_progress_prints_at_least_every_n_seconds(monkeypatch):
    clock = iter(np.arange(0.0, 1000.0, 40.0))  # every call 40 s later than the previous one
    monkeypatch.setattr("dxmi_ad.cli.common.time.monotonic", lambda: float(next(clock)))
    log = io.StringIO()
    progress = _Progress(Console(file=log, force_terminal=False), every_seconds=30.0)
    with progress:
        for i in (1, 2, 3):  # 3 of 1000 steps: below the next 5% but 40 s apart
            progress("autoencoder", i, 1000, {"loss": 0.1})
    lines = log.getvalue().splitlines()
    assert lines[0] == "stage autoencoder: 1000 steps"
    assert [m.group(2) for m in map(PERCENT_LINE.match, lines) if m] == ["1", "2", "3"]


def test_remaining_time_ignores_the_set_up_before_the_first_step(monkeypatch):
    """The first ETA was far off: the set-up before a stage's first step (60 s here) was counted as step time.
    The rate is now measured from the first reported step (1 s per step here); unknown on the first line."""
    times = iter([0.0, 60.0, 60.0, 64.0, 64.0, 69.0, 69.0])  # set-up 60 s, then 1 s per step
    monkeypatch.setattr("dxmi_ad.cli.common.time.monotonic", lambda: float(next(times)))
    log = io.StringIO()
    progress = _Progress(Console(file=log, force_terminal=False, width=200))
    for i in (1, 5, 10):  # of 100 steps
        progress("dxmi", i, 100, {})
    lines = [m for m in map(PERCENT_LINE.match, log.getvalue().splitlines()) if m]
    assert [m.group(5) for m in lines] == ["-:--:--", "0:01:35", "0:01:30"]  # 95 and 90 steps left at 1 s each
    assert "elapsed 0:01:09" in lines[-1].group(0)  # elapsed still counts the set-up


def test_scoring_and_feature_progress_print_off_a_terminal():
    log = io.StringIO()
    with _Progress(Console(file=log, force_terminal=False)) as progress:
        on_batch = progress.batches("scoring")
        for done in (32, 64, 70):
            on_batch(done, 70)
        progress("features", 10, 10, {"unreadable": 0.0})
    lines = log.getvalue().splitlines()
    assert "stage scoring: 70 images" in lines and "stage features: 10 images" in lines
    assert any(line.startswith("scoring 70/70 (100%)") for line in lines)
    assert not progress.records[:-1]  # scoring is not a training record


def test_pixel_pretrain_progress_off_a_terminal(tmp_path):
    result = runner.invoke(app, ["pretrain-sampler", "--dataset", "digits", "--normal-class", "3", "--out",
                                 str(tmp_path / "p"), "--set", "sampler_pretrain_iter=20", "--set", "unet_channels=8",
                                 "--set", "energy_channels=8", "--set", "batch_size=16", "--set", "n_steps=2"])
    assert result.exit_code == 0, result.output
    assert "stage sampler: 20 steps" in result.output.splitlines()
    assert any((m := PERCENT_LINE.match(line)) and m.group(1) == "sampler" and m.group(4) == "100"
               for line in result.output.splitlines())


# ---------------------------------------------------------------------- item 16: CPU install
def test_readme_install_command_and_exact_torch_pins():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    first_block = readme.split("```bash", 1)[1].split("```", 1)[0]
    assert 'pip install -e ".[dev]" && dxmi-ad train' in first_block
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    pins = {d.split("==")[0]: d.split("==")[1] for d in deps if d.startswith(("torch==", "torchvision=="))}
    # exact pins: `pip install torch==2.14.1 torchvision==0.29.1 --index-url .../whl/cpu` first, then the project
    # install finds them satisfied and keeps the CPU build
    assert pins == {"torch": "2.14.1", "torchvision": "0.29.1"}


# ---------------------------------------------------------------------- item 17: schedules follow the user
def _textures_model() -> dict:
    return {**DxMIConfig().to_dict(), **yaml.safe_load(recipes.path("textures").read_text())["model"]}


def test_set_n_iter_on_the_image_recipe_keeps_energy_updates():
    result = runner.invoke(app, ["train", "--set", "n_iter=100", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "warmup_iter (energy frozen) scaled by the same factor, 100 -> 33" in result.output
    model = json.loads(result.output[result.output.index("{"):])["model"]
    assert model["n_iter"] == 100 and model["warmup_iter"] == 33
    stages = plan_stages(DxMIConfig.from_dict({**model, "dim": 8}))
    assert stages.energy_updates == 67
    # a longer run keeps the recipe's warm-up; a warm-up the user sets is kept, or refused with the arithmetic
    assert scale_schedule(_textures_model(), {"n_iter": 1000}) == ({}, [])
    assert scale_schedule(_textures_model(), {"n_iter": 100, "warmup_iter": 10})[0] == {}
    bad = runner.invoke(app, ["train", "--set", "n_iter=100", "--set", "warmup_iter=100", "--dry-run"])
    assert bad.exit_code == 2 and "warmup_iter=100 >= n_iter=100" in bad.output


def test_set_n_iter_on_the_vector_recipe_scales_warmup():
    result = runner.invoke(app, ["train", "--dataset", "digits", "--set", "n_iter=30", "--dry-run"])
    assert result.exit_code == 0, result.output
    params = json.loads(result.output[result.output.index("{"):])
    assert params["n_iter"] == 30 and params["warmup_iter"] == 10


def test_train_model_updates_the_energy_when_the_warmup_would_cover_everything():
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
    cfg = DxMIConfig(dim=4, n_iter=9, warmup_iter=100, ae_pretrain_iter=5, batch_size=16, sampler_hidden=8,
                     value_hidden=8, energy_hidden=8, latent_dim=2, time_dim=8, sampler_layers=1, value_layers=1,
                     energy_layers=1)
    with pytest.warns(UserWarning, match=r"warmup_iter=100 >= n_iter=9.*first 3 of the 9"):
        _, history = train_model(x, cfg, log_every=1)
    steps = [rec["energy_step"] for rec in history]
    assert steps == [0.0] * 3 + [1.0] * 6


def test_anomalib_schedule_100_images_30_epochs_reaches_dxmi():
    # the README example: Folder of 100 images, batches of 32, Lite0 at 224 px (14 x 14 locations), 30 epochs
    total = count_updates(100, 32, 196, 784, 30)
    assert total == 750  # (8 + 8 + 8 + 1) updates per epoch, fewer than the recipe's 6000 + 300
    changes, notes = scale_schedule(_textures_model(), {}, total=total)
    assert changes == {"ae_pretrain_iter": 714, "n_iter": 36, "warmup_iter": 12}
    assert notes and "750 updates" in notes[0]
    stages = plan_stages({**_textures_model(), **changes})
    assert stages.total == total and stages.dxmi == 36 and stages.energy_updates == 24
    # overrides are kept: the existing anomalib test (150 autoencoder updates of 180) still gets 30 DxMI updates
    assert scale_schedule(_textures_model(), {"ae_pretrain_iter": 150}, total=180)[0] == {"n_iter": 30,
                                                                                        "warmup_iter": 10}
    with pytest.raises(ValueError, match="750 updates.*ae_pretrain_iter=800"):
        scale_schedule(_textures_model(), {"ae_pretrain_iter": 800}, total=750)
    assert count_updates(100, 32, 196, 784, 30, updates_per_batch=10) == 1200
    assert count_updates(100, 32, 196, 784, 30, drop_last=True) == 720


def test_anomalib_module_plans_its_schedule():
    pytest.importorskip("anomalib")
    from dxmi_ad.anomalib import Dxmi

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = Dxmi(pretrained=False)
    stages = model.plan_schedule(n_images=100, images_per_batch=32, locations_per_image=196, epochs=30)
    assert (stages.ae_pretrain, stages.dxmi, stages.warmup) == (714, 36, 12)
    assert model.dxmi_config.ae_pretrain_iter == 714 and model.dxmi_config.n_iter == 36


# ---------------------------------------------------------------------- item 19: --threads
def test_threads_option_sets_torch_threads(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setattr(torch, "set_num_interop_threads", lambda n: None)
    try:
        result = runner.invoke(app, ["--threads", "1", "train", "--dataset", "digits", "--dry-run"])
        assert result.exit_code == 0, result.output
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    bad = runner.invoke(app, ["--threads", "0", "train", "--dry-run"])
    assert bad.exit_code == 2 and "--threads" in bad.output
    assert "--threads" in runner.invoke(app, ["--help"]).output
