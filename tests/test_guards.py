"""Guards against the degenerate DxMI game (issue #13, item 1) and the start distributions (item 2).

Projected samples, fixed last sigma, the negatives' energy penalty, the training-health signal, and the
``initial`` / ``init_input_steps`` start switches; tiny networks, a few iterations each.
"""

from __future__ import annotations

import csv
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from dxmi_ad.config import DxMIConfig
from dxmi_ad.nn.energy import AutoencoderEnergy, MLPEnergy
from dxmi_ad.nn.model import DxMIModel
from dxmi_ad.training.dxdp import DxDPTrainer, TrainingHealthWarning, pretrain_autoencoder
from dxmi_ad.training.fit import build_model, train_model

D = 16
TINY = {"dim": D, "n_steps": 3, "sampler_hidden": 16, "value_hidden": 16, "energy_hidden": 16, "latent_dim": 4,
        "time_dim": 8, "batch_size": 32, "sampler_layers": 1, "value_layers": 1, "energy_layers": 1,
        "spherical": True, "ae_pretrain_iter": 0, "seed": 0}


def _cfg(**kw) -> DxMIConfig:
    return DxMIConfig(**{**TINY, **kw})


def _unit(n: int, d: int = D, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


def _energy_inputs(cfg: DxMIConfig, n_steps: int = 1) -> list[torch.Tensor]:
    """Every tensor the energy network is called on during ``n_steps`` trainer steps."""
    model = build_model(cfg)
    model.freeze_initial()
    seen: list[torch.Tensor] = []
    model.energy.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    trainer = DxDPTrainer(model)
    gen = torch.Generator().manual_seed(1)
    for _ in range(n_steps):
        trainer.step(_unit(cfg.batch_size, seed=2), gen)
    return seen


def _max_norm_error(tensors: list[torch.Tensor]) -> float:
    return max(float((t.norm(dim=-1) - 1).abs().max()) for t in tensors)


# ---------------------------------------------------------------------------------------------- projected samples
@pytest.mark.parametrize("initial", ["autoencoder", "feature_noise", "gaussian"])
def test_energy_only_sees_unit_norm_inputs_with_project_samples(initial):
    seen = _energy_inputs(_cfg(project_samples=True, initial=initial, init_noise_low=0.01, init_noise_high=0.05))
    # energy step (data + x_T), terminal value target and terminal rows of the sampler loss all feed the energy
    assert len(seen) == 3  # one step: energy step, terminal TD target, terminal rows of the sampler loss
    assert _max_norm_error(seen) < 1e-5


def test_guard_check_catches_off_sphere_samples_without_projection():
    # the same check fails when the guard is off: the last learnable sigma (0.05) pushes x_T off the sphere
    seen = _energy_inputs(_cfg(project_samples=False, initial="feature_noise", init_noise_low=0.01,
                               init_noise_high=0.05))
    assert _max_norm_error(seen) > 1e-3


def test_every_trajectory_state_is_projected():
    model = build_model(_cfg(project_samples=True, initial="gaussian"))
    traj = model.sampler.sample(torch.randn(8, D), torch.Generator().manual_seed(0))
    assert torch.allclose(traj[1:].norm(dim=-1), torch.ones(3, 8), atol=1e-5)
    off = build_model(_cfg(project_samples=False, initial="gaussian")).sampler.sample(
        torch.randn(8, D), torch.Generator().manual_seed(0))
    assert float((off[-1].norm(dim=-1) - 1).abs().max()) > 1e-3


def test_project_samples_without_spherical_is_refused():
    with pytest.raises(ValueError, match="project_samples=true needs spherical=true"):
        _cfg(project_samples=True, spherical=False)


# ---------------------------------------------------------------------------------------------- fixed last sigma
@pytest.mark.parametrize("fix", [True, False])
def test_fixed_last_sigma_is_not_trained(fix):
    cfg = _cfg(fix_last_sigma=fix, last_sigma=1e-3, sampler_lr=1e-3, initial="feature_noise",
               init_noise_low=0.01, init_noise_high=0.05, project_samples=True)
    model = build_model(cfg)
    trainer = DxDPTrainer(model)
    before = model.sampler.sigmas().detach().clone()
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        trainer.step(_unit(32, seed=3), gen)
    after = model.sampler.sigmas().detach()
    assert not torch.allclose(after[:-1], before[:-1])  # the other sigmas are trained (sigma lr 0.1)
    if fix:
        assert after[-1].item() == pytest.approx(1e-3, rel=1e-6) and after[-1] == before[-1]
        assert all(p is not model.sampler.last_log_sigma for p in model.sampler.parameters())
    else:
        assert after[-1] != before[-1]


# ---------------------------------------------------------------------------------------------- negatives' penalty
def test_negative_l2_weight_changes_only_the_energy_update():
    data = _unit(32, seed=4)
    energies = []
    for weight in (0.0, 1.0):
        model = build_model(_cfg(negative_l2_weight=weight, initial="feature_noise", init_noise_low=0.1,
                                 init_noise_high=0.2, energy_lr=1e-2))
        DxDPTrainer(model).step(data, torch.Generator().manual_seed(0))
        energies.append(torch.cat([p.detach().flatten() for p in model.energy.parameters()]))
    assert not torch.allclose(energies[0], energies[1])


def test_negative_l2_weight_range_checked():
    with pytest.raises(ValueError, match="negative_l2_weight must be >= 0"):
        _cfg(negative_l2_weight=-1.0)


# ---------------------------------------------------------------------------------------------- health signal
def test_energy_bound_of_each_energy():
    x = torch.tensor([[3.0, 4.0], [0.6, 0.8]])  # norms 5 and 1
    ae = AutoencoderEnergy(2, 1, 8, 1, spherical_output=True)
    assert torch.allclose(ae.energy_bound(x), torch.tensor([36.0, 4.0]))
    assert (ae(x) <= ae.energy_bound(x) + 1e-5).all()
    assert AutoencoderEnergy(2, 1, 8, 1, spherical_output=False).energy_bound(x) is None
    assert MLPEnergy(2, 8, 1).energy_bound(x) is None


def _saturating_model(saturate: bool, **kw) -> tuple[DxMIModel, torch.Tensor]:
    """Decoder fixed at the unit vector u, data = u (E(data) = 0); the sampler maps to -u (E = 4 = E_max) or stays."""
    cfg = _cfg(initial="feature_noise", init_noise_low=1e-3, init_noise_high=1e-3, project_samples=True,
               fix_last_sigma=True, warmup_iter=1000, sampler_lr=1e-9, sigma_lr=1e-9, health_window=3, **kw)
    model = build_model(cfg)
    u = torch.zeros(D)
    u[0] = 1.0
    with torch.no_grad():
        last = model.energy.decoder[-1]
        last.weight.zero_()
        last.bias.copy_(u)
        model.sampler.log_sigma.fill_(math.log(1e-3))
        if saturate:
            model.sampler.net.net[-1].bias.copy_(-2 * u)  # residual mean normalize(x - 2u) = -u
    return model, u.expand(cfg.batch_size, D).clone()


def test_saturated_samples_warn_once_and_are_logged():
    model, data = _saturating_model(True)
    trainer = DxDPTrainer(model)
    gen = torch.Generator().manual_seed(0)
    with pytest.warns(TrainingHealthWarning, match="E_max"):
        diags = [trainer.step(data, gen) for _ in range(3)]
    d = diags[-1]
    assert d["energy_max"].item() == pytest.approx(4.0, abs=1e-4)
    assert d["energy_saturation"].item() > 0.99
    assert d["energy_gap"].item() == pytest.approx(d["energy_samples"].item() - d["energy_data"].item())
    with warnings.catch_warnings():  # once per run
        warnings.simplefilter("error", TrainingHealthWarning)
        for _ in range(6):
            trainer.step(data, gen)


def test_normal_state_does_not_warn():
    model, data = _saturating_model(False)
    trainer = DxDPTrainer(model)
    gen = torch.Generator().manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", TrainingHealthWarning)
        for _ in range(6):
            d = trainer.step(data, gen)
    assert d["energy_saturation"].item() < 0.01


def test_health_window_zero_disables_the_warning():
    model, data = _saturating_model(True)
    trainer = DxDPTrainer(model, model.config.replace(health_window=0))
    with warnings.catch_warnings():
        warnings.simplefilter("error", TrainingHealthWarning)
        for _ in range(4):
            d = trainer.step(data, torch.Generator().manual_seed(0))
    assert d["energy_saturation"].item() > 0.99  # still reported


def test_health_signal_reaches_the_training_log(tmp_path):
    from dxmi_ad.cli.main import _Progress

    progress = _Progress()
    cfg = _cfg(n_iter=3, ae_pretrain_iter=2, project_samples=True, init_noise_low=0.01, init_noise_high=0.05)
    _, history = train_model(_unit(64, seed=5), cfg, progress=progress, log_every=1)
    assert {"energy_data", "energy_samples", "energy_gap", "energy_max", "energy_saturation"} <= set(history[-1])
    progress.write_logs(tmp_path)
    with open(tmp_path / "logs" / "train" / "metrics.csv", newline="") as fh:
        header = next(csv.reader(fh))
    for key in ("dxmi/energy_data", "dxmi/energy_samples", "dxmi/energy_gap", "dxmi/energy_saturation"):
        assert key in header


@pytest.mark.parametrize("bad", [{"saturation_threshold": 0.0}, {"saturation_threshold": 1.5},
                                 {"health_window": -1}])
def test_health_fields_range_checked(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        _cfg(**bad)


# ---------------------------------------------------------------------------------------------- start distributions
@pytest.fixture(scope="module")
def pretrained():
    """A tiny spherical autoencoder trained on random unit vectors (150 steps, under a second on an idle core)."""
    data = _unit(256, d=8, seed=6)
    cfg = DxMIConfig(**{**TINY, "dim": 8, "latent_dim": 3, "energy_hidden": 32, "initial": "autoencoder"})
    model = build_model(cfg)
    losses = pretrain_autoencoder(model.energy, data, 150, 5e-3, 64, torch.Generator().manual_seed(0))
    assert losses[-1] < losses[0]
    model.freeze_initial()
    model.base_config = cfg
    return model, data


def _starts(model: DxMIModel, data: torch.Tensor, seed: int = 0, **changes) -> torch.Tensor:
    model.config = model.base_config.replace(**changes)  # each call from the fixture's config, not the last call's
    return model.initial_states(len(data), data, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("initial", ["autoencoder", "feature_noise"])
def test_starts_shape_sphere_and_seed(pretrained, initial):
    model, data = pretrained
    x0 = _starts(model, data[:40], initial=initial)
    assert x0.shape == (40, 8)
    assert torch.allclose(x0.norm(dim=-1), torch.ones(40), atol=1e-5)
    assert torch.equal(x0, _starts(model, data[:40], initial=initial))
    assert not torch.equal(x0, _starts(model, data[:40], seed=1, initial=initial))


def test_feature_noise_start_is_off_the_decoder_manifold(pretrained):
    model, data = pretrained
    ae = model.initial_ae
    on = ae(_starts(model, data, initial="autoencoder", init_noise_low=0.05, init_noise_high=0.3)).mean()
    off = ae(_starts(model, data, initial="feature_noise", init_noise_low=0.05, init_noise_high=0.3)).mean()
    assert off > 2 * on  # the decoded start has near-zero reconstruction error by construction


def test_feature_noise_draws_noise_in_range(pretrained):
    model, data = pretrained
    x0 = _starts(model, data, initial="feature_noise", init_noise_low=0.1, init_noise_high=0.1, spherical=False)
    dist = (x0 - data).norm(dim=-1) / math.sqrt(8)  # about the per-dimension std
    assert 0.05 < float(dist.mean()) < 0.15


def test_input_steps_descend_the_energy_without_touching_its_gradients(pretrained):
    model, data = pretrained
    for p in model.energy.parameters():
        p.grad = None
    kw = {"initial": "feature_noise", "init_noise_low": 0.2, "init_noise_high": 0.3}
    plain = _starts(model, data, init_input_steps=0, **kw)
    moved = _starts(model, data, init_input_steps=5, init_input_step_size=0.05, init_input_noise=0.001, **kw)
    assert moved.shape == plain.shape
    assert torch.allclose(moved.norm(dim=-1), torch.ones(len(data)), atol=1e-5)
    assert model.energy(moved).mean() < model.energy(plain).mean()
    assert all(p.grad is None for p in model.energy.parameters())
    again = _starts(model, data, init_input_steps=5, init_input_step_size=0.05, init_input_noise=0.001, **kw)
    assert torch.equal(moved, again)


def test_input_steps_recovery_term_pulls_towards_the_data(pretrained):
    model, data = pretrained
    kw = {"initial": "feature_noise", "init_noise_low": 0.3, "init_noise_high": 0.3, "init_input_steps": 5,
          "init_input_step_size": 0.1, "init_input_noise": 0.0}
    free = _starts(model, data, init_recovery_weight=0.0, **kw)
    tied = _starts(model, data, init_recovery_weight=5.0, **kw)
    assert (tied - data).norm(dim=-1).mean() < (free - data).norm(dim=-1).mean()


def test_start_tracks_the_energy_only_when_asked(pretrained):
    """initial_tracks_energy: the start is made by the energy being trained (MPDR), not the frozen copy."""
    model, data = pretrained
    kw = {"init_noise_low": 0.05, "init_noise_high": 0.1}
    frozen = _starts(model, data, **kw)
    assert torch.equal(_starts(model, data, initial_tracks_energy=True, **kw), frozen)  # same weights: same start
    saved = {k: v.clone() for k, v in model.energy.state_dict().items()}
    try:
        with torch.no_grad():
            for p in model.energy.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
        assert torch.equal(_starts(model, data, **kw), frozen)  # the frozen copy does not move
        model.energy.train()
        moved = _starts(model, data, initial_tracks_energy=True, **kw)
        assert not torch.allclose(moved, frozen, atol=1e-3)
        assert model.energy.training  # the energy's mode is restored after the start (it is perturbed in eval)
        assert model.energy(moved).mean() < model.energy(frozen).mean()  # on the current decoder manifold
    finally:
        model.energy.load_state_dict(saved)
    with pytest.raises(ValueError, match="initial_tracks_energy=True needs initial='autoencoder'"):
        _cfg(initial="feature_noise", initial_tracks_energy=True)


def test_start_keeps_the_residual_only_when_asked(pretrained):
    """init_keep_residual: x_0 = x + decode(z') - decode(z): off the decoder manifold like the data, near its row."""
    model, data = pretrained
    ae = model.initial_ae
    kw = {"init_noise_low": 0.05, "init_noise_high": 0.1}
    on = _starts(model, data, **kw)
    kept = _starts(model, data, init_keep_residual=True, **kw)
    assert torch.allclose(kept.norm(dim=-1), torch.ones(len(data)), atol=1e-5)
    with torch.no_grad():
        expected = F.normalize(data + on - ae.decode(ae.encode(data)), dim=-1)  # same draws: same latent noise
        assert torch.allclose(kept, expected, atol=1e-5)
        # the paper's start has near-zero reconstruction error; keeping the residual gives it the data's again
        assert float(ae(kept).mean()) > 0.5 * float(ae(data).mean()) > float(ae(on).mean())
    zero = _starts(model, data, init_keep_residual=True, init_noise_low=0.0, init_noise_high=0.0)
    assert torch.allclose(zero, data, atol=1e-5)  # no latent noise: the data row itself
    with pytest.raises(ValueError, match="init_keep_residual=True needs initial='autoencoder'"):
        _cfg(initial="feature_noise", init_keep_residual=True)


def test_start_needs_data_rows():
    model = build_model(_cfg(initial="feature_noise"))
    with pytest.raises(ValueError, match="initial='feature_noise' needs a data batch of 4 rows"):
        model.initial_states(4, None)


# ---------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("bad", [{"init_input_steps": -1}, {"init_input_step_size": 0.0}, {"init_input_noise": -0.1},
                                 {"init_recovery_weight": -1.0}, {"initial": "uniform"}])
def test_start_fields_range_checked(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        _cfg(**bad)


def test_old_config_without_new_keys_loads_with_defaults():
    new = ("negative_l2_weight", "health_window", "saturation_threshold", "init_input_steps",
           "init_input_step_size", "init_input_noise", "init_recovery_weight")
    old = {k: v for k, v in _cfg().to_dict().items() if k not in new}
    cfg = DxMIConfig.from_dict(old)
    assert cfg.negative_l2_weight == 0.0 and cfg.init_input_steps == 0 and cfg.health_window == 20
    assert not cfg.project_samples and not cfg.fix_last_sigma and cfg.initial == "autoencoder"


def test_with_config_applies_construction_time_switches(pretrained):
    """Continuing a pre-trained start under another config: the sampler's sigmas and guards are the new config's
    (a copy with ``.config`` replaced would keep the old ones), the pre-trained energy and start copy are kept."""
    from dxmi_ad.training.fit import with_config

    model, data = pretrained
    base = model.base_config.replace(init_sigma=0.01, project_samples=False)
    model.config = base
    moved = with_config(model, base.replace(init_sigma=1e-3, project_samples=True, fix_last_sigma=True,
                                            last_sigma=2e-3))
    torch.testing.assert_close(moved.sampler.sigmas(), torch.tensor([1e-3] * (moved.config.n_steps - 1) + [2e-3]))
    assert moved.sampler.project_samples and moved.sampler.fix_last_sigma
    x = moved.sampler.sample(data[:16], torch.Generator().manual_seed(0))
    assert torch.allclose(x.norm(dim=-1), torch.ones(16), atol=1e-5)  # the guard now acts: samples on the sphere
    for part in ("energy", "initial_ae"):
        for a, b in zip(getattr(moved, part).state_dict().values(), getattr(model, part).state_dict().values()):
            assert torch.equal(a, b)
    same = with_config(model, base.replace(energy_lr=1e-3))  # a run-time setting: the sampler is copied as well
    for a, b in zip(same.sampler.state_dict().values(), model.sampler.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="does not fit the model's energy"):
        with_config(model, base.replace(latent_dim=5))
    noise = with_config(model, base.replace(initial="feature_noise"))  # no start copy
    assert noise.initial_ae is None
    back = with_config(noise, base)  # a start copy again: made from the pre-trained energy, not left random
    for a, b in zip(back.initial_ae.state_dict().values(), model.energy.state_dict().values()):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------- noise negatives
def test_noise_negatives_replace_the_first_sampler_outputs_in_the_energy_step(monkeypatch):
    import dxmi_ad.training.dxdp as dxdp

    seen = []
    real = dxdp.energy_step

    def spy(model, config, opt, x_data, x_T, *args, **kwargs):
        seen.append((x_data.clone(), x_T.clone()))
        return real(model, config, opt, x_data, x_T, *args, **kwargs)

    monkeypatch.setattr(dxdp, "energy_step", spy)
    data = _unit(32, seed=5)
    cfg = dict(project_samples=True, initial="feature_noise", init_noise_low=0.01, init_noise_high=0.02,
               noise_negative_low=0.5, noise_negative_high=1.0)
    for fraction in (0.0, 0.25):
        DxDPTrainer(build_model(_cfg(noise_negative_fraction=fraction, **cfg))).step(data, torch.Generator().manual_seed(0))
    (x0, neg0), (x1, neg1) = seen
    assert neg1.shape == neg0.shape == (32, D)
    assert _max_norm_error([neg1]) < 1e-5  # the noise rows are put back on the sphere too
    # the sampler's outputs stay close to their data rows (start noise 0.01-0.02); the 8 noise rows do not
    near = (neg0 - x0).norm(dim=-1)
    far = (neg1[:8] - x1[:8]).norm(dim=-1)
    assert float(near.max()) < 0.5 < float(far.min())
    assert torch.allclose((neg1[8:] - x1[8:]).norm(dim=-1).max(), near.max(), atol=0.3)


def test_noise_negative_settings_are_checked():
    with pytest.raises(ValueError, match="noise_negative_fraction must be in"):
        _cfg(noise_negative_fraction=1.0)
    with pytest.raises(ValueError, match="noise_negative_low <= noise_negative_high"):
        _cfg(noise_negative_low=0.5, noise_negative_high=0.1)
