"""Stateless loss terms of DxMI / DxDP: tensors in, tensors out; no optimizer calls, no ``backward``.

Conventions (docs/paper_map.md): time runs in the RL direction (t = 0 start, t = T sample); running costs use
per-dimension means (docs/paper_map.md): ``velocity = mean_d (x_{t+1} - x_t)^2 / (2 s_t^2)`` and entropy ``= log sigma_t``;
the energy term is not divided by ``D``.

References:
    DxMI (Yoon et al., NeurIPS 2024) Eq. 5 (GCD), Eq. 8 (optimal-control form), Eq. 10 (TD target), Eq. 11 (policy
    improvement), App. A (adaptive velocity regularization); docs/paper_map.md.
"""

from __future__ import annotations

import torch

__all__ = ["avr_update", "energy_loss", "running_cost", "td_target", "time_cost"]


def energy_loss(
    energy_data: torch.Tensor,
    energy_samples: torch.Tensor,
    energy_l2_weight: float = 0.0,
    negative_l2_weight: float = 0.0,
    negative_phase_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """EBM side of the GCD objective (Eq. 5) with its regularizers.

    ``E_p[E] - w E_pi[E] + gamma (E_p[E^2] + E_pi[E^2]) + gamma_neg E_pi[E^2]``; the last term is MPDR / NAE's
    penalty on the energy of the negatives (``gamma_neg``, weight 1 there), a named deviation from DxMI's EV trainer;
    ``w`` is 1 in the paper (0 only as an ablation control: the energy then fits the data alone).

    Args:
        energy_data: Energies of data, shape ``(B,)`` (pushed down).
        energy_samples: Energies of sampler outputs ``x_T``, shape ``(B',)`` (pushed up).
        energy_l2_weight: gamma >= 0 (paper default 1 for 2-D / images; 0 in the AD trainer).
        negative_l2_weight: gamma_neg >= 0, weight of ``E_pi[E(x_T)^2]`` alone (0 = off).
        negative_phase_weight: ``w`` in [0, 1], weight of the negative phase ``-E_pi[E]`` (1 = Eq. 5).

    Returns:
        Scalar loss and detached diagnostics ``energy_data``, ``energy_samples`` (batch means) and ``energy_gap``
        (``energy_samples - energy_data``).
    """
    loss = energy_data.mean() - negative_phase_weight * energy_samples.mean()
    if energy_l2_weight:
        loss = loss + energy_l2_weight * (energy_data.pow(2).mean() + energy_samples.pow(2).mean())
    if negative_l2_weight:
        loss = loss + negative_l2_weight * energy_samples.pow(2).mean()
    e_data, e_samples = energy_data.mean().detach(), energy_samples.mean().detach()
    return loss, {"energy_data": e_data, "energy_samples": e_samples, "energy_gap": e_samples - e_data}


def running_cost(
    x_t: torch.Tensor,
    x_next: torch.Tensor,
    log_sigma_t: torch.Tensor,
    velocity_scale_sq_t: torch.Tensor,
    entropy_weight: float,
    velocity_weight: float,
) -> torch.Tensor:
    """Running cost of one transition: ``tau2 * mean_d(x_{t+1} - x_t)^2 / (2 s_t^2) - tau1 * log sigma_t`` (Eq. 8).

    Args:
        x_t: States of shape ``(B, D)`` or ``(B, C, H, W)`` (the mean runs over every non-batch dimension).
        x_next: Next states of the same shape.
        log_sigma_t: ``log sigma_t`` per row, shape ``(B,)`` (negative conditional entropy up to a constant).
        velocity_scale_sq_t: ``s_t^2`` per row, shape ``(B,)``, > 0.
        entropy_weight: tau1 >= 0.
        velocity_weight: tau2 >= 0.

    Returns:
        Cost per row, shape ``(B,)``.
    """
    velocity = (x_next - x_t).pow(2).flatten(1).mean(1) / (2 * velocity_scale_sq_t)  # (B,)
    return velocity_weight * velocity - entropy_weight * log_sigma_t


def td_target(next_value: torch.Tensor, cost: torch.Tensor) -> torch.Tensor:
    """TD target of Eq. 10: ``sg[V^{t+1}(x_{t+1})] + running cost`` (``E(x_T)`` at the last step), detached.

    Args:
        next_value: ``V^{t+1}(x_{t+1})`` or ``E(x_T)``, shape ``(B,)``.
        cost: Running cost of the transition, shape ``(B,)``.

    Returns:
        Detached target of shape ``(B,)``.
    """
    return (next_value + cost).detach()


def avr_update(velocity_scale_sq: torch.Tensor, trajectory: torch.Tensor, momentum: float) -> torch.Tensor:
    """Adaptive velocity regularization (App. A): ``s_t^2 <- alpha s_t^2 + (1 - alpha) E||x_{t+1} - x_t||^2 / D``.

    Stored in natural step order (index ``t`` = transition ``t -> t+1``); the reference code stores it flipped and
    reads ``T - t - 1`` (docs/paper_map.md item 9), which is the same quantity.

    Args:
        velocity_scale_sq: Current ``s_t^2``, shape ``(T,)``.
        trajectory: Sampled states ``x_0 .. x_T``, shape ``(T + 1, B, D)`` or ``(T + 1, B, C, H, W)``.
        momentum: alpha in [0, 1) (paper: 0.99).

    Returns:
        Updated ``s_t^2``, shape ``(T,)``, detached.
    """
    step_sq = (trajectory[1:] - trajectory[:-1]).pow(2).flatten(1).mean(1)  # (T,)
    return (momentum * velocity_scale_sq + (1 - momentum) * step_sq).detach()


def time_cost(t: torch.Tensor, n_steps: int, kind: str, scale: float = 1.0) -> torch.Tensor:
    """Time cost R(t) > 0 of the image variant (Eq. 12, docs/paper_map.md), replacing the running costs in the TD target.

    ``"sigmoid"``: ``scale * (sigmoid(-t + T // 2) - sigmoid(-t - 1 + T // 2))`` (integer centre as the reference code,
    docs/paper_map.md; the sum over t telescopes to about ``scale``); ``"linear"``: the constant ``scale`` (paper: c = 0.05).

    Args:
        t: Step indices of shape ``(B,)`` in ``[0, T-1]``.
        n_steps: ``T``.
        kind: ``"sigmoid"`` or ``"linear"``.
        scale: Scale (``time_cost_sig`` = 1, or c).

    Returns:
        Cost per row, shape ``(B,)``, float.

    Raises:
        ValueError: For another ``kind``.
    """
    t = t.float()
    if kind == "sigmoid":
        centre = n_steps // 2
        return scale * (torch.sigmoid(-t + centre) - torch.sigmoid(-t - 1 + centre))
    if kind == "linear":
        return torch.full_like(t, scale)
    msg = f"time cost must be 'sigmoid' or 'linear', got {kind!r}"
    raise ValueError(msg)
