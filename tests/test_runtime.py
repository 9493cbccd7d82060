"""Fabric runtime: resume equivalence, crash while checkpointing, 2-process DDP on the CPU (gloo), bf16."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from dxmi_ad.config import DxMIConfig
from dxmi_ad.training.fit import _train, train_model
from dxmi_ad.training.runtime import Runtime, latest_checkpoint, release_process_group

CFG = DxMIConfig(dim=64, n_iter=12, ae_pretrain_iter=20, batch_size=32, sampler_hidden=32, value_hidden=32,
                 energy_hidden=32, latent_dim=8, time_dim=32, warmup_iter=2, lr_schedule="cosine")


def _digits0() -> torch.Tensor:
    X, y = load_digits(return_X_y=True)
    return torch.tensor(X[y == 0] / 16.0, dtype=torch.float32)


def _same(a, b) -> bool:
    sa, sb = a.checkpoint_tensors(), b.checkpoint_tensors()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_fabric_single_process_equals_plain_and_resume_is_exact(tmp_path):
    X = _digits0()
    plain, _ = train_model(X, CFG)
    full, hist = train_model(X, CFG, runtime=Runtime(accelerator="cpu", checkpoint_dir=tmp_path / "a",
                                                     checkpoint_every=4, keep_checkpoints=2))
    assert _same(plain, full)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["iter-00000008", "iter-00000012"]  # last 2 kept
    # stop at iteration 4, then resume: the same weights as the uninterrupted run
    rt = Runtime(accelerator="cpu", checkpoint_dir=tmp_path / "b", checkpoint_every=4, stop_after=4)
    train_model(X, CFG, runtime=rt)
    assert latest_checkpoint(tmp_path / "b").name == "iter-00000004"
    resumed, hist2 = train_model(X, CFG, runtime=dataclasses.replace(rt, stop_after=None, resume=True))
    assert _same(full, resumed) and len(hist2) == len(hist)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        train_model(X, CFG, runtime=Runtime(checkpoint_dir=tmp_path / "empty", resume=True))
    with pytest.raises(ValueError, match=r"other settings \(entropy_weight\)"):
        train_model(X, CFG.replace(entropy_weight=0.5), runtime=dataclasses.replace(rt, resume=True))
    # other data or preprocessing (e.g. another `standardize`: not part of the config) is refused too
    with pytest.raises(ValueError, match="other training data or preprocessing"):
        train_model(X * 2.0, CFG, runtime=dataclasses.replace(rt, resume=True))
    # a checkpoint written before a config field existed (here select_energy_only) resumes: the field held its
    # default in the version that wrote it
    import json

    config_json = latest_checkpoint(tmp_path / "b") / "config.json"
    meta = json.loads(config_json.read_text())
    del meta["config"]["select_energy_only"]
    del meta["data"]  # written before the data fingerprint existed: not checked
    config_json.write_text(json.dumps(meta))
    again, _ = train_model(X, CFG, runtime=dataclasses.replace(rt, stop_after=None, resume=True))
    assert _same(full, again)


def test_sigkill_while_writing_a_checkpoint_resumes_from_the_previous_one(tmp_path):
    """A child process is killed (SIGKILL) half-way through writing the iteration-8 checkpoint.

    The child uses this process's thread count: an earlier test (``--threads``) may have changed it, and the
    resumed run must equal an uninterrupted one exactly (it flaked in full-suite runs before this was pinned).
    """
    script = textwrap.dedent(f"""
        import os, signal, torch
        from sklearn.datasets import load_digits
        import dxmi_ad.training.runtime as rt
        from dxmi_ad.training.fit import train_model
        from tests.test_runtime import CFG, _digits0

        torch.set_num_threads({torch.get_num_threads()})  # as this process: float sums differ across thread counts
        real = rt.save_model_dir
        def dying(directory, tensors, meta):
            if meta.get("iteration") == 8:
                real(directory, tensors, meta)      # files written into the temporary folder...
                os.kill(os.getpid(), signal.SIGKILL)  # ...and the process dies before the rename
            real(directory, tensors, meta)
        rt.save_model_dir = dying
        train_model(_digits0(), CFG, runtime=rt.Runtime(accelerator="cpu", checkpoint_dir=r"{tmp_path / 'ck'}",
                                                         checkpoint_every=4))
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=os.getcwd(), capture_output=True, timeout=300)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    left = sorted(p.name for p in (tmp_path / "ck").iterdir())
    assert "iter-00000004" in left and "iter-00000008" not in left
    assert any(name.startswith(".iter-00000008.") for name in left)  # the half-written temporary folder
    assert latest_checkpoint(tmp_path / "ck").name == "iter-00000004"
    X = _digits0()
    resumed, _ = train_model(X, CFG, runtime=Runtime(accelerator="cpu", checkpoint_dir=tmp_path / "ck",
                                                     checkpoint_every=4, resume=True))
    assert _same(resumed, train_model(X, CFG)[0])


def _ddp_worker(fabric, data, ckdir):
    """Train on 2 ranks, then compare every parameter and the AVR buffer across ranks (exactly)."""
    model, _ = _train(fabric, data, CFG, None, 5, None, fabric.device,
                      Runtime(accelerator="cpu", devices=2, strategy="ddp_spawn", checkpoint_dir=ckdir,
                              checkpoint_every=CFG.n_iter))
    flat = torch.cat([t.detach().reshape(-1).float() for t in model.checkpoint_tensors().values()])
    gathered = fabric.all_gather(flat)
    avr = fabric.all_gather(model.velocity_scale_sq.detach())
    release_process_group(fabric)
    return float((gathered[0] - gathered[1]).abs().max()), float((avr[0] - avr[1]).abs().max()), \
        float(model.velocity_scale_sq.sum())


def test_two_process_ddp_on_cpu(tmp_path):
    from lightning.fabric import Fabric

    fabric = Fabric(accelerator="cpu", devices=2, strategy="ddp_spawn")
    param_diff, avr_diff, avr_sum = fabric.launch(_ddp_worker, _digits0(), str(tmp_path / "ck"))
    assert param_diff == 0.0 and avr_diff == 0.0 and avr_sum > 0
    # one writer: each checkpoint exactly once, no stray temporary folders
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["iter-00000000", f"iter-{CFG.n_iter:08d}"]


def test_ddp_detector_matches_single_process_auroc():
    from sklearn.metrics import roc_auc_score

    from dxmi_ad import DxMIDetector

    X, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(0)
    normal = X[y == 3][rng.permutation(int((y == 3).sum()))]
    test = np.r_[normal[120:], X[y != 3][:300]]
    label = np.r_[np.zeros(len(normal) - 120), np.ones(300)]
    params = dict(n_iter=30, ae_pretrain_iter=400, hidden=64, warmup_iter=5, random_state=0, device="cpu",
                  calibration_fraction=0.2)
    single = DxMIDetector(**params).fit(normal[:120])
    ddp = DxMIDetector(**params, runtime={"accelerator": "cpu", "devices": 2, "strategy": "ddp_spawn"}).fit(
        normal[:120])
    a_single = roc_auc_score(label, single.energy(test))
    a_ddp = roc_auc_score(label, ddp.energy(test))
    assert a_single > 0.85 and abs(a_ddp - a_single) < 0.03, (a_single, a_ddp)


def test_bf16_mixed_stays_finite_and_fp16_is_refused():
    model, hist = train_model(_digits0(), CFG, runtime=Runtime(accelerator="cpu", precision="bf16-mixed"))
    assert all(np.isfinite(h["energy_data"]) and np.isfinite(h["value_loss"]) for h in hist)
    assert all(torch.isfinite(t).all() for t in model.checkpoint_tensors().values())
    with pytest.raises(ValueError, match="loss scaling"):
        Runtime(precision="16-mixed")


def test_cli_resume_rules(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from dxmi_ad.cli.main import app

    runner = CliRunner()
    out = tmp_path / "run"
    fast = ["--dataset", "digits", "--set", "n_iter=20", "--set", "ae_pretrain_iter=50", "--set", "hidden=32",
            "--set", "device=cpu", "--checkpoint-every", "10", "--out", str(out)]
    # leftovers of an interrupted run are never mixed into a new run
    (tmp_path / "run.checkpoints" / "iter-00000040").mkdir(parents=True)
    refused = runner.invoke(app, ["train", *fast])
    assert refused.exit_code == 2 and "--resume" in refused.output and not out.exists()
    ok = runner.invoke(app, ["train", *fast, "--overwrite"])
    assert ok.exit_code == 0, ok.output
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["iter-00000000", "iter-00000010",
                                                                       "iter-00000020", "run.json"]
    # a finished run has nothing to resume; other flags are not silently dropped
    done = runner.invoke(app, ["train", "--resume", str(out)])
    assert done.exit_code == 2 and "nothing to resume" in done.output
    extra = runner.invoke(app, ["train", "--resume", str(out), "--seed", "3"])
    assert extra.exit_code == 2 and "--seed" in extra.output
