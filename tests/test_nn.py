"""Shapes, time direction, noise levels and energy ranges of the DxMI networks."""

from __future__ import annotations

import math

import torch

from dxmi_ad.config import DxMIConfig
from dxmi_ad.nn.energy import AutoencoderEnergy, ValueNet
from dxmi_ad.nn.model import DxMIModel
from dxmi_ad.nn.sampler import GaussianSampler, cosine_alpha_bar
from dxmi_ad.training.dxdp import DxDPTrainer


def test_trajectory_shape_and_start():
    s = GaussianSampler(dim=3, n_steps=4, hidden=8, n_layers=1, time_dim=8)
    x0 = torch.randn(5, 3)
    traj = s.sample(x0, torch.Generator().manual_seed(0))
    assert traj.shape == (5, 5, 3)  # (T+1, B, D)
    assert torch.equal(traj[0], x0)  # t = 0 is the start, t = T the sample


def test_residual_sampler_starts_as_identity_plus_noise():
    s = GaussianSampler(dim=2, n_steps=3, hidden=8, n_layers=1, time_dim=8, init_sigma=0.05)
    x = torch.randn(4, 2)
    assert torch.allclose(s.mean(x, torch.zeros(4, dtype=torch.long)), x)
    assert torch.allclose(s.sigmas(), torch.full((3,), 0.05))


def test_fix_last_sigma_gets_no_gradient():
    s = GaussianSampler(dim=2, n_steps=3, hidden=8, n_layers=1, time_dim=8, parameterization="eps",
                        fix_last_sigma=True, last_sigma=0.01)
    assert math.isclose(s.sigmas()[-1].item(), 0.01, rel_tol=1e-5)
    s.sigmas().sum().backward()
    assert s.log_sigma.grad[-1] == 0 and (s.log_sigma.grad[:-1] != 0).all()


def test_spherical_mean_on_sphere():
    s = GaussianSampler(dim=6, n_steps=2, hidden=8, n_layers=1, time_dim=8, spherical=True)
    m = s.mean(torch.randn(7, 6), torch.ones(7, dtype=torch.long))
    assert torch.allclose(m.norm(dim=-1), torch.ones(7), atol=1e-5)


def test_cosine_schedule_ends_in_noise():
    abar = cosine_alpha_bar(5)
    assert abar[0] == 1 and abar[-1] < 1e-3 and (abar[1:] < abar[:-1]).all()


def test_autoencoder_energy_on_sphere_is_bounded():
    ae = AutoencoderEnergy(dim=8, latent_dim=4, hidden=16, n_layers=1, spherical_output=True)
    x = torch.nn.functional.normalize(torch.randn(50, 8), dim=-1)
    e = ae(x)
    assert e.shape == (50,) and (e >= 0).all() and (e <= 4 + 1e-5).all()


def test_value_accepts_terminal_step():
    v = ValueNet(dim=3, hidden=8, n_layers=1, time_dim=8)
    assert v(torch.randn(4, 3), 5).shape == (4,)


def test_one_iteration_updates_each_network_and_stays_finite():
    cfg = DxMIConfig(dim=4, n_steps=3, sampler_hidden=16, value_hidden=16, energy_hidden=16, latent_dim=4,
                     time_dim=8, batch_size=16, sampler_layers=1, value_layers=1, energy_layers=1)
    torch.manual_seed(0)
    model = DxMIModel(cfg)
    model.freeze_initial()
    before = {k: v.clone() for k, v in model.checkpoint_tensors().items()}
    diag = DxDPTrainer(model).step(torch.randn(16, 4), torch.Generator().manual_seed(0))
    after = model.checkpoint_tensors()
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert {"sampler", "value", "energy", "velocity_scale_sq"} <= changed
    assert "initial_ae" not in changed  # the start autoencoder stays frozen (docs/paper_map.md)
    assert all(torch.isfinite(v).all() for v in diag.values())


def test_fourier_feature_energy_shapes_checkpoint_and_checks():
    import pytest

    from dxmi_ad.nn.energy import MLPEnergy

    torch.manual_seed(0)
    energy = MLPEnergy(2, hidden=8, n_layers=1, fourier_features=6, fourier_scale=0.5)
    x = torch.randn(5, 2)
    assert energy(x).shape == (5,)
    assert energy.net[0].in_features == 12  # sin and cos of 6 projections
    assert energy.fourier_matrix.shape == (2, 6) and "fourier_matrix" in energy.state_dict()
    torch.manual_seed(1)  # another draw of W and of the weights: the checkpoint restores both
    again = MLPEnergy(2, hidden=8, n_layers=1, fourier_features=6, fourier_scale=0.5)
    assert not torch.allclose(again(x), energy(x))
    again.load_state_dict(energy.state_dict())
    assert torch.allclose(again(x), energy(x))
    plain = MLPEnergy(2, hidden=8, n_layers=1)
    assert plain.fourier_matrix is None and plain.net[0].in_features == 2
    with pytest.raises(ValueError, match="fourier"):
        MLPEnergy(2, fourier_features=4, fourier_scale=0.0)
    with pytest.raises(ValueError, match="energy_fourier_features must be >= 0"):
        DxMIConfig(dim=2, energy_model="mlp", energy_fourier_features=-1)
    model = DxMIModel(DxMIConfig(dim=2, energy_model="mlp", energy_fourier_features=4, energy_hidden=8,
                                 energy_layers=1, sampler_hidden=8, value_hidden=8, time_dim=8, initial="gaussian",
                                 parameterization="eps"))
    assert model.energy.net[0].in_features == 8
