"""DxDP: one DxMI iteration in the order of the official anomaly-detection trainer, and the pre-training stages.

One :meth:`DxDPTrainer.step` is (docs/paper_map.md):

1. sample trajectories ``x_0 .. x_T`` without gradients (``x_0`` from pi(x_0));
2. AVR EMA of ``s_t^2`` (at the start of the update, as the reference code does);
3. one energy step on ``E(data) - E(x_T)`` (+ gamma regularizer, + the negatives' penalty
   ``negative_l2_weight * E(x_T)^2``), gradient clipping;
4. ``T`` value TD steps in backward time order ``t = T-1 .. 0``, each one Adam step, with the target
   ``V(x_{t+1}, t+1)`` (``E(x_T)`` at the last step) ``+ tau2 * velocity - tau1 * log sigma_t`` (Eq. 10), the next
   state re-sampled from the current sampler (``value_resample``, EV trainer) under ``no_grad`` (docs/paper_map.md);
   with ``time_cost`` set (the image-generation trainer ``DxMI_Trainer``, docs/paper_map.md) the target is
   ``V(x_{t+1}) + R(t)`` instead (Eq. 12) and the running costs stay only in the sampler loss;
5. one sampler step on ``B`` states of mixed ``t`` drawn uniformly from the ``B * T`` buffered states (Eq. 11):
   ``V(x_{t+1}(phi), t+1)`` (``E`` at the last step) ``+ tau2 * velocity - tau1 * log sigma_t``, one reparameterized
   step, no back-propagation through time, gradient clipping;
6. the buffer is dropped (no replay, docs/paper_map.md).

Named deviations: ``warmup_iter`` (energy frozen for the first iterations), ``lr_schedule="cosine"`` and the guards
against the degenerate game (``project_samples``, ``negative_l2_weight``; docs/paper_map.md) are options outside the paper,
all off by default.

Training health: every step returns ``energy_data``, ``energy_samples``, ``energy_gap`` and, for a bounded energy,
``energy_max`` (mean ``E_max(x_T)``; ``(|x| + 1)^2`` = 4 for unit-norm samples with the spherical-output autoencoder)
and ``energy_saturation`` (``E(samples) / E_max``). When the saturation stays above ``saturation_threshold`` for a
whole window of ``health_window`` iterations a :class:`TrainingHealthWarning` is issued, once per trainer: the energy
then separates samples from data by a trivial cue and the game teaches nothing about the data's neighbourhood.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dxmi_ad._warn import caller_stacklevel
from dxmi_ad.config import DxMIConfig
from dxmi_ad.nn.energy import AutoencoderEnergy
from dxmi_ad.nn.model import DxMIModel
from dxmi_ad.objectives import avr_update, energy_loss, running_cost, td_target, time_cost

__all__ = ["AutoencoderPretrainer", "DxDPTrainer", "EnergyRefitter", "SamplerPretrainer", "TrainingHealthWarning",
           "energy_step", "pretrain_autoencoder", "random_batch", "sync_grads"]


class TrainingHealthWarning(UserWarning):
    """The DxMI game has degenerated: ``E(samples)`` sits at the energy's maximum (see :class:`DxDPTrainer`)."""


def _schedule(config: DxMIConfig, n_iter: int) -> Callable[[int], float]:
    if config.lr_schedule == "cosine" and n_iter > 0:
        return lambda i: 0.5 * (1 + math.cos(math.pi * min(i, n_iter) / n_iter))
    return lambda i: 1.0


def _clip(params: list[nn.Parameter], max_norm: float | None) -> None:
    if max_norm is not None:
        nn.utils.clip_grad_norm_(params, max_norm)


def sync_grads(params: list[nn.Parameter], sync: Callable[[torch.Tensor], None] | None) -> None:
    """Average the gradients of ``params`` over processes with one collective (no-op when ``sync`` is None)."""
    if sync is None:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    sync(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def random_batch(data: torch.Tensor, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """A random batch of rows: without replacement within the batch when ``N >= batch_size``, with replacement
    otherwise.

    Args:
        data: Rows ``(N, ...)``, ``N >= 1`` (any device; a memory-mapped CPU tensor is indexed, not copied).
        batch_size: Rows to draw, ``>= 1``.
        generator: Torch generator of the draw; the batch is returned on its device.

    Returns:
        ``(batch_size, ...)`` tensor on ``generator.device``.
    """
    n = data.shape[0]
    if n >= batch_size:
        idx = torch.randperm(n, generator=generator, device=generator.device)[:batch_size]
    else:
        idx = torch.randint(n, (batch_size,), generator=generator, device=generator.device)
    return data[idx.to(data.device)].to(generator.device)  # e.g. a memory-mapped CPU set feeding a GPU model


def energy_step(model: DxMIModel, config: DxMIConfig, opt: torch.optim.Optimizer, x_data: torch.Tensor,
                x_T: torch.Tensor, sync: Callable[[torch.Tensor], None] | None = None, update: bool = True,
                health: Callable[[dict[str, torch.Tensor]], None] | None = None) -> dict[str, torch.Tensor]:
    """The energy update of Eq. 5: push ``E`` down on data ``(B, ...)`` and up on samples ``x_T`` ``(B', ...)``.

    The loss is :func:`~dxmi_ad.objectives.energy_loss` (with ``gamma`` / ``gamma_neg``); gradients are averaged
    over data-parallel ranks (``sync``) and clipped (``energy_grad_clip``) before ``opt`` steps. Used by
    :meth:`DxDPTrainer.step` and :class:`EnergyRefitter`.

    Args:
        model: The model whose energy is updated in place.
        config: Its config (``energy_l2_weight``, ``negative_l2_weight``, ``energy_grad_clip``).
        opt: The energy's optimizer (the value optimizer for the shared variant).
        x_data: Data batch ``(B, ...)``.
        x_T: Sampler outputs ``(B', ...)``, no gradient needed.
        sync: Data-parallel gradient averaging hook (see :class:`DxDPTrainer`), or None.
        update: False: compute the loss and diagnostics only (a frozen energy: warm-up, ``energy_update_every``).
        health: Called with the diagnostics before the update (the training-health signal adds to them).

    Returns:
        Detached ``energy_data``, ``energy_samples``, ``energy_gap`` (batch means) and what ``health`` added.
    """
    energy = model.energy
    energy.train()
    opt.zero_grad(set_to_none=True)
    e = energy(torch.cat([x_data, x_T]))
    n = x_data.shape[0]
    loss, diag = energy_loss(e[:n], e[n:], config.energy_l2_weight, config.negative_l2_weight,
                             config.negative_phase_weight)
    if health is not None:
        health(diag)
    if update:
        loss.backward()
        sync_grads(model.energy_params(), sync)
        _clip(model.energy_params(), config.energy_grad_clip)
        opt.step()
    opt.zero_grad(set_to_none=True)
    energy.eval()
    return diag


class DxDPTrainer:
    """Optimizers and the per-iteration update of DxMI (Algorithm 1 with DxDP, AD-trainer order).

    Args:
        model: The :class:`DxMIModel` to train (modified in place).
        config: Its config (``model.config`` if omitted).
        n_iter: Length used by the learning-rate schedule (``config.n_iter`` if omitted).
        sync: Data-parallel hook: ``sync(flat)`` replaces a 1-D tensor in place by its mean over all processes
            (e.g. Fabric's ``all_reduce``). Called on the gradients of every update (before clipping) and on the AVR
            statistic, so all ranks apply identical updates to identical parameters. None: single process.

    Attributes:
        energy_average: With ``energy_ema > 0``, the moving average of the energy's parameters (one tensor per
            parameter of ``model.energy_params()``, same shapes), updated after every energy update and saved in
            :meth:`state_tensors`; None when ``energy_ema`` is 0. :meth:`swap_energy_average` puts it in the model.
    """

    def __init__(self, model: DxMIModel, config: DxMIConfig | None = None, n_iter: int | None = None,
                 sync: Callable[[torch.Tensor], None] | None = None) -> None:
        self.model = model
        self.sync = sync
        self.config = c = config or model.config
        self.shared = c.energy_model == "shared"
        self.opt_sampler = torch.optim.Adam(
            [{"params": model.sampler.mean_parameters(), "lr": c.sampler_lr},
             {"params": model.sampler.sigma_parameters(), "lr": c.effective_sigma_lr}]
        )
        self.opt_value = torch.optim.Adam(model.value.parameters(), lr=c.value_lr)
        # Shared variant: the energy *is* V(., T) and is stepped by the value optimizer (DxMI_Trainer).
        self.opt_energy = self.opt_value if self.shared else torch.optim.Adam(model.energy_params(), lr=c.energy_lr)
        self._lr_factor = _schedule(c, c.n_iter if n_iter is None else n_iter)
        self._base_lrs = {name: [g["lr"] for g in o.param_groups] for name, o in self._optimizers().items()}
        self.iteration = 0
        self._saturation: list[torch.Tensor] = []  # E(samples) / E_max of the current health window
        self.saturation_warned = False
        # energy_ema: the average of the energy's iterates, from the current weights (train_model restarts it after
        # the pre-training stages: reset_energy_average)
        self.energy_average: list[torch.Tensor] | None = (
            [p.detach().clone() for p in model.energy_params()] if c.energy_ema else None)

    # ------------------------------------------------------------------ helpers
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Optimizer states as flat tensors (``opt.<name>.<param index>.<key>``), for safetensors checkpoints."""
        out = {}
        for name, opt in self._optimizers().items():
            for idx, st in opt.state_dict()["state"].items():
                for key, value in st.items():
                    out[f"opt.{name}.{idx}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
        for idx, avg in enumerate(self.energy_average or []):
            out[f"opt.ema_energy.{idx}"] = avg
        return out

    def state_meta(self) -> dict[str, Any]:
        """JSON part of the trainer state: iteration and the optimizers' param groups (learning rates...)."""
        groups = {name: [{k: v for k, v in g.items() if k != "params"} for g in opt.state_dict()["param_groups"]]
                  for name, opt in self._optimizers().items()}
        return {"iteration": self.iteration, "param_groups": groups}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Restore what :meth:`state_tensors` / :meth:`state_meta` wrote (the model's weights are loaded apart).

        Raises:
            ValueError: A state that does not fit these optimizers.
        """
        for name, opt in self._optimizers().items():
            sd = opt.state_dict()
            state: dict[int, dict[str, torch.Tensor]] = {}
            prefix = f"opt.{name}."
            for key, value in tensors.items():
                if key.startswith(prefix):
                    idx, field = key[len(prefix):].split(".", 1)
                    state.setdefault(int(idx), {})[field] = value
            groups = meta["param_groups"][name]
            if len(groups) != len(sd["param_groups"]):
                msg = f"checkpoint optimizer {name!r} has {len(groups)} parameter groups, expected {len(sd['param_groups'])}"
                raise ValueError(msg)
            sd["state"] = state
            sd["param_groups"] = [{**g, "params": own["params"]} for g, own in zip(groups, sd["param_groups"])]
            opt.load_state_dict(sd)
        if self.energy_average is not None:
            keys = [f"opt.ema_energy.{idx}" for idx in range(len(self.energy_average))]
            if not all(k in tensors for k in keys):
                msg = "the checkpoint has no average of the energy (energy_ema was off when it was written)"
                raise ValueError(msg)
            for avg, key in zip(self.energy_average, keys):
                avg.copy_(tensors[key])
        self.iteration = int(meta["iteration"])

    @torch.no_grad()
    def reset_energy_average(self) -> None:
        """Restart the average (``energy_ema``) at the energy's current weights: called when DxMI starts, after the
        pre-training stages, so the average begins at the pre-trained start, not at the random initialisation.
        """
        if self.energy_average is not None:
            for avg, p in zip(self.energy_average, self.model.energy_params()):
                avg.copy_(p.detach())

    @torch.no_grad()
    def swap_energy_average(self) -> bool:
        """Exchange the energy's parameters with their average (``energy_ema``); a second call swaps back.

        Returns:
            False (nothing done) when ``energy_ema`` is off.
        """
        if self.energy_average is None:
            return False
        for p, avg in zip(self.model.energy_params(), self.energy_average):
            live = p.detach().clone()
            p.copy_(avg)
            avg.copy_(live)
        return True

    def _optimizers(self) -> dict[str, torch.optim.Optimizer]:
        opts = {"sampler": self.opt_sampler, "value": self.opt_value}
        if not self.shared:
            opts["energy"] = self.opt_energy
        return opts

    def _health(self, energy: nn.Module, x_T: torch.Tensor, e_samples: torch.Tensor,
                diag: dict[str, torch.Tensor]) -> None:
        """Add ``energy_max`` / ``energy_saturation`` to ``diag`` and warn once when the samples saturate the energy.

        Args:
            energy: The energy network (its optional ``energy_bound(x) -> (B,) | None`` gives ``E_max``).
            x_T: Samples fed to the energy, ``(B, D)``.
            e_samples: Mean energy of the samples (scalar, detached).
            diag: Diagnostics dict, updated in place.
        """
        bound_fn = getattr(energy, "energy_bound", None)
        bound = bound_fn(x_T.detach()) if bound_fn is not None else None
        if bound is None:
            return
        e_max = bound.float().mean().detach()
        saturation = e_samples.float() / e_max
        diag["energy_max"], diag["energy_saturation"] = e_max, saturation
        window = self.config.health_window
        if not window or self.saturation_warned:
            return
        self._saturation.append(saturation)
        if len(self._saturation) < window:
            return
        lowest = float(torch.stack(self._saturation).min())  # one device sync per window
        self._saturation = []
        if lowest > self.config.saturation_threshold:
            self.saturation_warned = True
            warnings.warn(
                f"DxMI training health: E(samples) has stayed above {self.config.saturation_threshold:.0%} of the "
                f"energy's maximum E_max (~{float(e_max):.3g}) for {window} iterations "
                f"(iteration {self.iteration + 1}; E(samples)={float(e_samples):.4g}, "
                f"E(data)={float(diag['energy_data']):.4g}): the energy separates samples from data by a trivial cue; "
                "consider project_samples, fix_last_sigma, negative_l2_weight or a lower energy_lr",
                TrainingHealthWarning, stacklevel=caller_stacklevel())

    def _next_cost(self, x_next: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``V(x_{t+1}, t+1)``, or ``E(x_{t+1})`` where ``t = T-1`` (docs/paper_map.md). Shapes ``(B, D)``, ``(B,)`` -> ``(B,)``."""
        T = self.config.n_steps
        if self.shared:
            return self.model.value(x_next, t + 1)  # V(., T) is the energy
        terminal = t == T - 1
        out = torch.empty(x_next.shape[0], device=x_next.device, dtype=x_next.dtype)
        if terminal.any():
            out[terminal] = self.model.energy(x_next[terminal]).to(out.dtype)  # bf16 under autocast
        if (~terminal).any():
            out[~terminal] = self.model.value(x_next[~terminal], t[~terminal] + 1).to(out.dtype)
        return out

    # ------------------------------------------------------------------ one iteration
    def step(self, x_data: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """One DxMI iteration on a data batch.

        Args:
            x_data: Data batch of shape ``(B, D)`` (normal samples).
            generator: Optional torch generator (all sampling noise of the iteration).

        Returns:
            Detached diagnostics: ``energy_data``, ``energy_samples``, ``energy_gap`` (``E(samples) - E(data)``),
            ``value_loss``, ``sampler_loss`` (scalars), ``sigma`` ``(T,)`` and, for an energy with an upper bound
            (:meth:`~dxmi_ad.nn.energy.AutoencoderEnergy.energy_bound`), ``energy_max`` (batch mean of ``E_max(x_T)``)
            and ``energy_saturation`` (``E(samples) / energy_max``).

        Warns:
            TrainingHealthWarning: Once per trainer, when ``energy_saturation > saturation_threshold`` at every
                iteration of a window of ``health_window`` iterations.
        """
        m, c = self.model, self.config
        T, B = c.n_steps, x_data.shape[0]
        sampler, value, energy = m.sampler, m.value, m.energy
        # 1. Trajectories without gradients.
        sampler.eval()
        x0 = m.initial_states(B, x_data, generator)
        traj = sampler.sample(x0, generator)  # (T+1, B, D); t = 0 start, t = T sample
        # 2. AVR (start of update_f_v in the reference code).
        if c.avr_momentum is not None:
            new_s2 = avr_update(m.velocity_scale_sq, traj, c.avr_momentum)
            if self.sync is not None:  # linear in the batch statistic: every rank ends with the same s_t
                self.sync(new_s2)
            m.velocity_scale_sq.copy_(new_s2)
        s2 = m.velocity_scale_sq if c.avr_momentum is not None else torch.ones_like(m.velocity_scale_sq)
        diag: dict[str, torch.Tensor] = {}
        # 3. Energy step: push E(data) down and E(x_T) up (Eq. 5).
        updated = c.updates_energy_at(self.iteration)
        negatives = traj[-1]
        n_noise = round(c.noise_negative_fraction * B)
        if n_noise:  # named deviation: the first n_noise negatives of Eq. 5 are feature-noise rows of the data
            noise = m.feature_noise(x_data[:n_noise], c.noise_negative_low, c.noise_negative_high, generator)
            negatives = torch.cat([noise, traj[-1][n_noise:]])
        diag.update(energy_step(m, c, self.opt_energy, x_data, negatives, self.sync, update=updated,
                                health=lambda d: self._health(energy, negatives, d["energy_samples"], d)))
        if updated and self.energy_average is not None:  # energy_ema: avg += (1 - d) (theta - avg)
            with torch.no_grad():
                for avg, p in zip(self.energy_average, m.energy_params()):
                    avg.lerp_(p.detach(), 1 - c.energy_ema)
        # 4. Value TD steps, backward in time (Eq. 10).
        value_losses = []
        for t in range(T - 1, -1, -1):
            x_t = traj[t]
            t_vec = torch.full((B,), t, dtype=torch.long, device=x_t.device)
            with torch.no_grad():
                value.eval()
                if c.value_resample:
                    st = sampler.sample_step(x_t, t_vec, generator)
                    x_next, log_sigma = st.sample, st.log_sigma
                else:
                    x_next, log_sigma = traj[t + 1], sampler.log_sigmas()[t_vec]
                if c.time_cost == "none":  # EV trainer: running costs in the target (Eq. 10)
                    cost = running_cost(x_t, x_next, log_sigma, s2[t_vec], c.entropy_weight, c.velocity_weight)
                else:  # image variant: the time cost R(t) replaces them in the target only (Eq. 12)
                    cost = time_cost(t_vec, T, c.time_cost, c.effective_time_cost_scale).to(x_t.dtype)
                target = td_target(self._next_cost(x_next, t_vec), cost)
            value.train()
            self.opt_value.zero_grad(set_to_none=True)
            loss_v = F.mse_loss(value(x_t, t_vec), target)
            loss_v.backward()
            sync_grads(list(value.parameters()), self.sync)
            _clip(list(value.parameters()), c.value_grad_clip)
            self.opt_value.step()
            value_losses.append(loss_v.detach())
        self.opt_value.zero_grad(set_to_none=True)
        value.eval()
        # 5. Sampler step on B states of mixed t from the B*T buffer (Eq. 11); one step, no BPTT.
        sampler.train()
        states = traj[:-1].reshape(T * B, *traj.shape[2:])  # (T*B, ...), row r has t = r // B
        steps = torch.arange(T, device=states.device).repeat_interleave(B)
        perm_device = generator.device if generator is not None else states.device
        idx = torch.randperm(T * B, generator=generator, device=perm_device)[:B].to(states.device)
        x_t, t_vec = states[idx], steps[idx]
        self.opt_sampler.zero_grad(set_to_none=True)
        st = sampler.sample_step(x_t, t_vec, generator)
        cost = running_cost(x_t, st.sample, st.log_sigma, s2[t_vec], c.entropy_weight, c.velocity_weight)
        loss_pi = (self._next_cost(st.sample, t_vec) + cost).mean()
        loss_pi.backward()
        sync_grads(list(sampler.parameters()), self.sync)
        _clip(list(sampler.parameters()), c.sampler_grad_clip)
        self.opt_sampler.step()
        self.opt_sampler.zero_grad(set_to_none=True)
        # V / E gradients produced by the sampler loss are discarded (docs/paper_map.md).
        self.opt_value.zero_grad(set_to_none=True)
        self.opt_energy.zero_grad(set_to_none=True)
        sampler.eval()
        self.iteration += 1
        factor = self._lr_factor(self.iteration)
        for name, opt in self._optimizers().items():  # looked up each time: load_state replaces the group dicts
            for group, base_lr in zip(opt.param_groups, self._base_lrs[name]):
                group["lr"] = base_lr * factor
        diag["value_loss"] = torch.stack(value_losses).mean()
        diag["sampler_loss"] = loss_pi.detach()
        diag["sigma"] = sampler.sigmas().detach()
        return diag


class EnergyRefitter:
    """Energy-only steps against the frozen final sampler (``energy_refit_iter``, a named deviation, issue #13).

    Each step draws a fresh batch of samples ``x_T`` from the sampler (no gradient) and takes one Adam step of the
    energy loss of the game (Eq. 5 with ``gamma`` / ``gamma_neg``, the same gradient clipping) on the data batch and
    those samples, at the energy's learning rate (``value_lr`` for the shared variant, whose energy is ``V(., T)``),
    constant, with a fresh Adam. The sampler, and for a separate energy the value net, do not change.

    Args:
        model: The trained model (its energy is updated in place).
        config: Its config.
        sync: Data-parallel gradient averaging hook (see :class:`DxDPTrainer`), or None.
    """

    def __init__(self, model: DxMIModel, config: DxMIConfig,
                 sync: Callable[[torch.Tensor], None] | None = None) -> None:
        self.model, self.config, self.sync = model, config, sync
        lr = config.value_lr if config.energy_model == "shared" else config.energy_lr
        self.opt = torch.optim.Adam(model.energy_params(), lr=lr)

    def step(self, x_data: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """One energy step on a data batch ``(B, ...)``.

        Returns:
            Detached ``energy_data``, ``energy_samples`` and ``energy_gap`` (batch means).
        """
        m, c = self.model, self.config
        m.sampler.eval()
        with torch.no_grad():
            x_T = m.sampler.sample(m.initial_states(x_data.shape[0], x_data, generator), generator)[-1]
        return energy_step(m, c, self.opt, x_data, x_T, self.sync)


class AutoencoderPretrainer:
    """Adam steps of reconstruction pre-training of the autoencoder energy (App. C.3), one batch at a time.

    Args:
        ae: The autoencoder (trained in place).
        lr: Learning rate (MPDR: 1e-4).
        sync: Data-parallel gradient averaging hook (see :class:`DxDPTrainer`), or None.
    """

    def __init__(self, ae: AutoencoderEnergy, lr: float, sync: Callable[[torch.Tensor], None] | None = None) -> None:
        self.ae = ae
        self.sync = sync
        self.opt = torch.optim.Adam(ae.parameters(), lr=lr)

    def step(self, x: torch.Tensor) -> float:
        """One step on a batch ``(B, D)`` of normal vectors; returns the loss (mean energy of the batch)."""
        self.ae.train()
        loss = self.ae(x).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        sync_grads(list(self.ae.parameters()), self.sync)
        self.opt.step()
        return float(loss.detach())


class SamplerPretrainer:
    """Adam steps (cosine decay over ``n_iter``) of DDPM pre-training of an ``"eps"`` sampler, one batch at a time.

    Args:
        model: The model whose sampler mean network is trained in place.
        lr: Learning rate.
        n_iter: Length of the stage (the cosine schedule's horizon).
        sync: Data-parallel gradient averaging hook (see :class:`DxDPTrainer`), or None.
    """

    def __init__(self, model: DxMIModel, lr: float, n_iter: int,
                 sync: Callable[[torch.Tensor], None] | None = None) -> None:
        self.model = model
        self.sync = sync
        self.opt = torch.optim.Adam(model.sampler.mean_parameters(), lr=lr)
        n = max(1, int(n_iter))
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda i: 0.5 * (1 + math.cos(math.pi * min(i, n) / n)))

    def step(self, x: torch.Tensor, generator: torch.Generator) -> float:
        """One step of the DDPM loss on a batch ``x`` (``(B, D)`` or ``(B, C, H, W)``); returns the loss."""
        sampler = self.model.sampler
        sampler.train()
        loss = sampler.ddpm_loss(x, generator)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        sync_grads(list(sampler.mean_parameters()), self.sync)
        self.opt.step()
        self.sched.step()
        return float(loss.detach())

    def finish(self) -> None:
        """End of the stage: eval mode, and AVR starts from the pre-trained sampler's velocity scales."""
        self.model.sampler.eval()
        self.model.velocity_scale_sq.copy_(self.model.sampler.initial_velocity_scale_sq())


def pretrain_autoencoder(
    ae: AutoencoderEnergy,
    data: torch.Tensor,
    n_iter: int,
    lr: float,
    batch_size: int,
    generator: torch.Generator,
    callback: Callable[[int, float], None] | None = None,
    sync: Callable[[torch.Tensor], None] | None = None,
) -> list[float]:
    """Reconstruction pre-training of the autoencoder energy (App. C.3: "pretrained to minimize reconstruction").

    Args:
        ae: The autoencoder (trained in place).
        data: Normal training vectors of shape ``(N, D)``.
        n_iter: Adam steps.
        lr: Learning rate (MPDR: 1e-4).
        batch_size: Rows per step.
        generator: Torch generator for batch selection.
        callback: Called as ``callback(i, loss)`` after each step.
        sync: Data-parallel gradient averaging hook, or None.

    Returns:
        The loss (mean energy of the batch) per step.
    """
    pre = AutoencoderPretrainer(ae, lr, sync)
    losses = []
    for i in range(n_iter):
        losses.append(pre.step(random_batch(data, batch_size, generator)))
        if callback is not None:
            callback(i, losses[-1])
    ae.eval()
    return losses
