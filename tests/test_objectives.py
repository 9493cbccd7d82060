"""Golden values and signs of the DxMI loss terms (Eq. 5, 8, 10; App. A)."""

from __future__ import annotations

import math

import pytest
import torch

from dxmi_ad.objectives import avr_update, energy_loss, running_cost, td_target


def test_energy_loss_sign_and_gamma():
    e_data, e_samp = torch.tensor([1.0, 3.0]), torch.tensor([5.0, 7.0])
    loss, diag = energy_loss(e_data, e_samp, 0.0)
    assert loss.item() == pytest.approx(2.0 - 6.0)  # data pushed down, samples pushed up
    loss_g, _ = energy_loss(e_data, e_samp, 0.5)
    assert loss_g.item() == pytest.approx(-4.0 + 0.5 * (5.0 + 37.0))
    assert diag["energy_data"].item() == 2.0 and diag["energy_samples"].item() == 6.0


def test_running_cost_uses_per_dimension_means():
    # docs/paper_map.md docs/paper_map.md: velocity = mean_d(dx^2) / (2 s^2), entropy = log sigma (not D log sigma).
    x = torch.zeros(1, 4)
    x_next = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    cost = running_cost(x, x_next, torch.tensor([math.log(0.5)]), torch.tensor([2.0]), 0.1, 0.01)
    assert cost.item() == pytest.approx(0.01 * 1.0 / 4.0 - 0.1 * math.log(0.5))


def test_td_target_is_detached():
    v = torch.ones(3, requires_grad=True)
    target = td_target(v * 2, torch.ones(3))
    assert not target.requires_grad
    assert torch.equal(target, torch.full((3,), 3.0))


def test_avr_ema_per_step():
    traj = torch.stack([torch.zeros(2, 3), torch.ones(2, 3), 3 * torch.ones(2, 3)])  # steps of 1 and 2
    s2 = avr_update(torch.tensor([1.0, 1.0]), traj, momentum=0.99)
    assert torch.allclose(s2, torch.tensor([0.99 + 0.01 * 1.0, 0.99 + 0.01 * 4.0]))


def test_energy_loss_negative_penalty_golden():
    # MPDR / NAE gamma_neg: only E(x_T)^2 is penalized, separately from gamma (which penalizes both halves).
    e_data, e_samp = torch.tensor([1.0, 3.0]), torch.tensor([5.0, 7.0])
    loss, diag = energy_loss(e_data, e_samp, 0.0, 0.5)
    assert loss.item() == pytest.approx(-4.0 + 0.5 * 37.0)  # mean(E(x_T)^2) = (25 + 49) / 2
    both, _ = energy_loss(e_data, e_samp, 0.5, 1.0)
    assert both.item() == pytest.approx(-4.0 + 0.5 * (5.0 + 37.0) + 1.0 * 37.0)
    assert diag["energy_gap"].item() == 4.0
    e_samp.requires_grad_(True)
    loss, _ = energy_loss(e_data, e_samp, 0.0, 1.0)
    loss.backward()
    assert torch.allclose(e_samp.grad, torch.tensor([-0.5 + 5.0, -0.5 + 7.0]))  # d/dE: -1/B + 2 E / B
