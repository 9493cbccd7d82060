"""Two research switches of the DxMI energy (issue #13). The average of the energy's iterates (``energy_ema``): the
game is played by the live energy, the trained model scores with the exponential moving average of its weights,
model selection validates that average, and a resumed run carries the average with it. The negative phase's weight
(``negative_phase_weight``, an ablation control): at 0 the energy never sees the sampler's outputs."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from sklearn.datasets import load_digits

from dxmi_ad.config import DxMIConfig
from dxmi_ad.training.dxdp import DxDPTrainer
from dxmi_ad.training.fit import build_model, train_model
from dxmi_ad.training.runtime import Runtime

CFG = DxMIConfig(dim=64, n_iter=12, ae_pretrain_iter=20, batch_size=32, sampler_hidden=32, value_hidden=32,
                 energy_hidden=32, latent_dim=8, time_dim=32, warmup_iter=2, energy_lr=1e-3)


def _digits0() -> torch.Tensor:
    X, y = load_digits(return_X_y=True)
    return torch.tensor(X[y == 0] / 16.0, dtype=torch.float32)


def test_the_average_changes_the_energy_only_and_is_the_closed_form():
    X = _digits0()
    plain, _ = train_model(X, CFG)
    averaged, history = train_model(X, CFG.replace(energy_ema=0.9))
    for name, before in plain.sampler.state_dict().items():  # the same game: the average is bookkeeping
        assert torch.equal(before, averaged.sampler.state_dict()[name]), name
    for a, b in zip(plain.value.parameters(), averaged.value.parameters()):
        assert torch.equal(a, b)
    assert any(not torch.allclose(a, b) for a, b in zip(plain.energy.parameters(), averaged.energy.parameters()))
    assert history[-1] == {"iteration": 12, "energy_ema": 0.9}

    # the closed form, replayed by hand: avg_k = 0.9 avg_{k-1} + 0.1 theta_k over the 10 energy updates
    model = build_model(CFG)
    trainer = DxDPTrainer(model, CFG.replace(energy_ema=0.9))
    gen = torch.Generator().manual_seed(0)
    x = X[:32]
    avg = [p.detach().clone() for p in model.energy_params()]
    for i in range(5):
        trainer.step(x, gen)
        if CFG.updates_energy_at(i):
            avg = [0.9 * a + 0.1 * p.detach() for a, p in zip(avg, model.energy_params())]
    for a, b in zip(avg, trainer.energy_average):
        torch.testing.assert_close(a, b)
    live = [p.detach().clone() for p in model.energy_params()]
    assert trainer.swap_energy_average()
    for p, a in zip(model.energy_params(), avg):
        torch.testing.assert_close(p.detach(), a)
    trainer.swap_energy_average()  # and back
    for p, a in zip(model.energy_params(), live):
        assert torch.equal(p.detach(), a)


def test_selection_validates_the_averaged_energy():
    X = _digits0()
    config = CFG.replace(energy_ema=0.5, validate_every=4)
    seen = []

    def validate(model):
        seen.append([p.detach().clone() for p in model.energy_params()])
        return float(len(seen))  # every later check is better: the last (averaged) state must be kept

    trained, history = train_model(X, config, validate=validate)
    assert [h["iteration"] for h in history if "val_auroc" in h] == [0, 4, 8, 12]
    assert history[-1]["selected_iteration"] == 12
    for p, v in zip(trained.energy_params(), seen[-1]):  # the model returned is the one validated last
        assert torch.equal(p.detach(), v)
    plain, _ = train_model(X, CFG.replace(validate_every=4), validate=lambda m: 0.0)  # live energy, kept start
    assert any(not torch.equal(a.detach(), b) for a, b in zip(plain.energy_params(), seen[-1]))


def test_resume_carries_the_average(tmp_path):
    X = _digits0()
    config = CFG.replace(energy_ema=0.8)
    full, _ = train_model(X, config)
    rt = Runtime(accelerator="cpu", checkpoint_dir=tmp_path / "ck", checkpoint_every=4, stop_after=8)
    train_model(X, config, runtime=rt)
    resumed, _ = train_model(X, config, runtime=dataclasses.replace(rt, stop_after=None, resume=True))
    sa, sb = full.checkpoint_tensors(), resumed.checkpoint_tensors()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize(("changes", "match"), [
    ({"energy_ema": 1.0}, r"energy_ema must be in \[0, 1\)"),
    ({"energy_ema": -0.1}, r"energy_ema must be in \[0, 1\)"),
    ({"energy_ema": 0.9, "energy_model": "shared"}, "shared energy"),
    ({"energy_ema": 0.9, "energy_refit_iter": 5}, "set one to 0"),
])
def test_bad_settings_are_refused(changes, match):
    with pytest.raises(ValueError, match=match):
        CFG.replace(**changes)


def test_off_is_the_last_iterate():
    X = _digits0()
    a, _ = train_model(X, CFG)
    b, _ = train_model(X, CFG.replace(energy_ema=0.0))
    assert all(torch.equal(x, y) for x, y in zip(a.energy.parameters(), b.energy.parameters()))


def test_without_the_negative_phase_the_energy_never_sees_the_sampler():
    X = _digits0()
    control = CFG.replace(negative_phase_weight=0.0)
    a, _ = train_model(X, control)
    b, _ = train_model(X, control.replace(sampler_lr=1e-2, value_lr=1e-2))  # another game, same energy
    assert any(not torch.equal(x, y) for x, y in zip(a.sampler.parameters(), b.sampler.parameters()))
    for x, y in zip(a.energy.parameters(), b.energy.parameters()):
        torch.testing.assert_close(x, y)
    full, _ = train_model(X, CFG)  # with the negative phase (Eq. 5) the energy does depend on the samples
    assert any(not torch.allclose(x, y) for x, y in zip(a.energy.parameters(), full.energy.parameters()))
    start, _ = train_model(X, CFG.replace(n_iter=0))  # and the control fits the data better than its start
    with torch.no_grad():
        assert float(a.energy(X[:64]).mean()) < float(start.energy(X[:64]).mean())
    with pytest.raises(ValueError, match=r"negative_phase_weight must be in \[0, 1\]"):
        CFG.replace(negative_phase_weight=1.5)


def test_the_average_starts_at_the_pretrained_energy():
    """The average begins when DxMI does: a start-only run (n_iter = 0) keeps its pre-trained energy, and with
    iterations the average differs from the random initialisation's blend."""
    X = _digits0()
    start, _ = train_model(X, CFG.replace(n_iter=0))
    start_ema, _ = train_model(X, CFG.replace(n_iter=0, energy_ema=0.9))
    for a, b in zip(start.energy.parameters(), start_ema.energy.parameters()):
        assert torch.equal(a, b)
    # with one energy update, avg = 0.9 start + 0.1 theta_1 exactly (no trace of the random initialisation)
    one = CFG.replace(n_iter=3, warmup_iter=2, energy_ema=0.9)
    live, _ = train_model(X, one.replace(energy_ema=0.0))
    averaged, _ = train_model(X, one)
    for s, t, a in zip(start.energy.parameters(), live.energy.parameters(), averaged.energy.parameters()):
        torch.testing.assert_close(a, 0.9 * s + 0.1 * t)
