"""The T-step Gaussian diffusion sampler (the policy pi of DxMI).

Time runs in the RL direction throughout (docs/paper_map.md): ``x_0`` is the start (noise, or perturbed data
for anomaly detection) and ``x_T`` is the generated sample. Step ``t`` maps ``x_t`` to

    x_{t+1} = mu(x_t, t) + sigma_t * eps_t,   eps_t ~ N(0, I),   t = 0 .. T-1,

with a learnable ``log sigma_t`` per step (docs/paper_map.md). Two parameterizations of the mean are offered:

* ``"residual"``: ``mu = x_t + g(x_t, t)``, optionally projected to the unit sphere (the anomaly-detection sampler of
  App. C.3, whose "mean prediction is constrained to the unit sphere").
* ``"eps"``: the DDPM posterior mean on a T-step cosine noise schedule, ``g`` predicting the noise; this is what DDPM
  pre-training (the "Pretrain" rows of Table 1) trains, and DxMI then fine-tunes the same network.
  Deviation (named): the paper does not give the 2-D pretraining schedule; we use the cosine schedule of
  Nichol & Dhariwal (2021) discretised at T steps, so that ``x_0 ~ N(0, I)`` is the DDPM prior.

References:
    DxMI Eq. 8-11 and App. B, C.1, C.3; docs/paper_map.md.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from dxmi_ad.nn.layers import TimeMLP

__all__ = ["GaussianSampler", "PixelSampler", "StepOutput", "StepSampler", "cosine_alpha_bar"]

MIN_SIGMA = 1e-4  # sigma is clamped to >= 1e-4 before taking logs (docs/paper_map.md)


class StepOutput(NamedTuple):
    """Result of one sampler step.

    Attributes:
        sample: ``x_{t+1}``, shape ``(B, D)``; reparameterized (differentiable w.r.t. the sampler).
        mean: ``mu(x_t, t)``, shape ``(B, D)``.
        sigma: ``sigma_t`` per row, shape ``(B,)``.
        log_sigma: ``log sigma_t`` per row, shape ``(B,)``; the per-dimension conditional entropy up to a constant.
    """

    sample: torch.Tensor
    mean: torch.Tensor
    sigma: torch.Tensor
    log_sigma: torch.Tensor


def cosine_alpha_bar(n_steps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Cumulative signal fractions of a T-step cosine DDPM schedule.

    Args:
        n_steps: Number of diffusion steps ``T``.
        s: Offset of Nichol & Dhariwal (2021).
        max_beta: Upper clip of each ``beta_k``.

    Returns:
        ``alpha_bar`` of shape ``(T + 1,)`` in diffusion order: index 0 = clean data (1.0), index T = noise.
    """
    k = torch.arange(n_steps + 1, dtype=torch.float64)
    f = torch.cos((k / n_steps + s) / (1 + s) * math.pi / 2) ** 2
    alpha_bar = f / f[0]
    betas = (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=max_beta)
    return torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1 - betas, 0)]).float()


class StepSampler(nn.Module):
    """Shared stepping of the T-step Gaussian policies: learnable ``log sigma_t``, one reparameterized step, the chain.

    Subclasses set ``n_steps`` and ``fix_last_sigma``, call :meth:`_init_sigmas`, and implement :meth:`mean`.
    States have any shape ``(B, ...)``: vectors ``(B, D)`` or images ``(B, C, H, W)``.
    """

    n_steps: int
    fix_last_sigma: bool
    project_samples: bool = False

    def _init_sigmas(self, init: torch.Tensor, last_sigma: float) -> None:
        self.log_sigma = nn.Parameter(init.clamp(min=MIN_SIGMA).log())  # "log_betas" of the reference code
        self.register_buffer("last_log_sigma", torch.tensor(math.log(max(last_sigma, MIN_SIGMA))))

    def mean(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """The step's mean ``mu(x_t, t)`` ``(B, D)`` (implemented by each parameterization)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ noise levels
    def log_sigmas(self) -> torch.Tensor:
        """``log sigma_t`` for ``t = 0 .. T-1``, shape ``(T,)``; the last one fixed when ``fix_last_sigma``."""
        log_sigma = self.log_sigma.clamp(min=math.log(MIN_SIGMA))
        if self.fix_last_sigma:
            log_sigma = torch.cat([log_sigma[:-1], self.last_log_sigma.view(1)])
        return log_sigma

    def sigmas(self) -> torch.Tensor:
        """``sigma_t`` for ``t = 0 .. T-1``, shape ``(T,)``, each >= 1e-4."""
        return self.log_sigmas().exp()

    def sigma_parameters(self) -> list[nn.Parameter]:
        """The learnable log-sigmas (their own optimizer group, 100x the sampler lr by default; docs/paper_map.md)."""
        return [self.log_sigma]

    def initial_velocity_scale_sq(self) -> torch.Tensor:
        """Initial AVR ``s_t^2``, shape ``(T,)``: the sampler's noise levels ``sigma_t^2`` ("s_t <- sigma_t",
        docs/paper_map.md).
        """
        return self.sigmas().detach().pow(2).clone()

    def mean_parameters(self) -> list[nn.Parameter]:
        """Parameters of the mean network."""
        return list(self.net.parameters())

    # ------------------------------------------------------------------ stepping
    def sample_step(
        self, x: torch.Tensor, t: torch.Tensor | int, generator: torch.Generator | None = None
    ) -> StepOutput:
        """One reparameterized step ``x_{t+1} = mu(x_t, t) + sigma_t * eps`` (gradients flow to the sampler).

        Args:
            x: States ``x_t`` of shape ``(B, ...)``.
            t: Step index (int) or indices of shape ``(B,)`` in ``[0, T-1]``.
            generator: Optional torch generator for ``eps``.

        Returns:
            :class:`StepOutput` with ``sample`` of the shape of ``x`` and per-row ``sigma``, ``log_sigma`` ``(B,)``.
        """
        if isinstance(t, int):
            t = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        mean = self.mean(x, t)
        log_sigma = self.log_sigmas()[t.long()]  # (B,)
        sigma = log_sigma.exp()
        eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        sample = mean + sigma.view(-1, *([1] * (x.dim() - 1))) * eps
        if self.project_samples:
            sample = F.normalize(sample, dim=-1)
        return StepOutput(sample, mean, sigma, log_sigma)

    @torch.no_grad()
    def sample(self, x0: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Run the whole chain from ``x_0`` without gradients.

        Args:
            x0: Start states of shape ``(B, ...)``.
            generator: Optional torch generator.

        Returns:
            Trajectory of shape ``(T + 1, B, ...)``: index 0 = ``x_0`` (start), index T = ``x_T`` (sample).
        """
        states = [x0]
        for t in range(self.n_steps):
            states.append(self.sample_step(states[-1], t, generator).sample)
        return torch.stack(states)  # (T+1, B, ...)


class GaussianSampler(StepSampler):
    """T-step Gaussian policy ``pi(x_{t+1} | x_t) = N(mu(x_t, t), sigma_t^2 I)``.

    Args:
        dim: Data dimension ``D``.
        n_steps: Number of steps ``T`` (paper: 5 for 2-D and anomaly detection).
        hidden: Hidden width of the mean network (paper AD: 2048).
        n_layers: Hidden layers of the mean network (paper AD: 3).
        time_dim: Width of the sinusoidal step embedding (paper: 128).
        parameterization: ``"residual"`` or ``"eps"`` (see the module docstring).
        init_sigma: Initial ``sigma_t`` for the residual parameterization (all steps). Ignored for ``"eps"``,
            which starts from the DDPM posterior standard deviations.
        last_sigma: Value of the last step's sigma when ``fix_last_sigma`` is set (``"eps"``) and the floor of the
            DDPM posterior std.
        fix_last_sigma: Keep ``sigma_{T-1}`` fixed (the reference code's ``trainable_beta='fix_last'``).
        spherical: Project the mean onto the unit sphere (anomaly-detection features, docs/paper_map.md).
            Samples ``mean + sigma * eps`` are not re-projected unless ``project_samples`` (the paper does not say;
            see docs/paper_map.md).
        activation: Hidden activation.
        project_samples: With ``spherical``, also project each sample ``x_{t+1}`` onto the unit sphere. Named
            deviation (off by default): the step is then a projected Gaussian, whose entropy ``log sigma_t`` is
            used as an approximation; it stops negatives from differing from data by their norm alone. Every path
            that feeds the energy uses :meth:`sample_step` (the trajectory's ``x_T``, the re-sampled terminal value
            target and the sampler loss), so all of them see projected samples. Ignored without ``spherical``
            (:class:`~dxmi_ad.config.DxMIConfig` refuses that combination).

    Raises:
        ValueError: On a non-positive ``dim``, ``n_steps`` or sigma, or an unknown parameterization.
    """

    def __init__(
        self,
        dim: int,
        n_steps: int = 5,
        hidden: int = 2048,
        n_layers: int = 3,
        time_dim: int = 128,
        parameterization: str = "residual",
        init_sigma: float = 0.05,
        last_sigma: float = 1e-3,
        fix_last_sigma: bool = False,
        spherical: bool = False,
        activation: str = "silu",
        project_samples: bool = False,
    ) -> None:
        super().__init__()
        if dim < 1 or n_steps < 1:
            msg = f"dim and n_steps must be >= 1, got dim={dim}, n_steps={n_steps}"
            raise ValueError(msg)
        if parameterization not in ("residual", "eps"):
            msg = f"parameterization must be 'residual' or 'eps', got {parameterization!r}"
            raise ValueError(msg)
        if init_sigma <= 0 or last_sigma <= 0:
            msg = f"init_sigma and last_sigma must be > 0, got {init_sigma}, {last_sigma}"
            raise ValueError(msg)
        self.dim, self.n_steps = dim, n_steps
        self.parameterization, self.spherical, self.fix_last_sigma = parameterization, spherical, fix_last_sigma
        self.project_samples = project_samples and spherical
        self.net = TimeMLP(dim, hidden, n_layers, dim, time_dim, activation)
        alpha_bar = cosine_alpha_bar(n_steps)  # diffusion order, (T+1,)
        self.register_buffer("alpha_bar", alpha_bar)
        if parameterization == "eps":
            # DDPM posterior std for diffusion index k = T - t (k = T .. 1), RL order t = 0 .. T-1.
            k = torch.arange(n_steps, 0, -1)
            beta = 1 - alpha_bar[k] / alpha_bar[k - 1]
            post_var = (1 - alpha_bar[k - 1]) / (1 - alpha_bar[k]) * beta
            init = post_var.sqrt().clamp(min=last_sigma)
            # Zero-init the output layer so the untrained eps-net predicts 0.
        else:
            init = torch.full((n_steps,), float(init_sigma))
            nn.init.zeros_(self.net.net[-1].weight)  # the untrained sampler starts as the identity map
        nn.init.zeros_(self.net.net[-1].bias)
        self._init_sigmas(init, last_sigma)

    # ------------------------------------------------------------------ stepping
    def mean(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Mean ``mu(x_t, t)`` of the step distribution.

        Args:
            x: States ``x_t`` of shape ``(B, D)``.
            t: Step indices of shape ``(B,)``, integers in ``[0, T-1]``.

        Returns:
            Tensor of shape ``(B, D)``.
        """
        out = self.net(x, t)  # (B, D)
        if self.parameterization == "eps":
            k = self.n_steps - t.long()  # diffusion index, T .. 1
            abar_k, abar_prev = self.alpha_bar[k][:, None], self.alpha_bar[k - 1][:, None]
            alpha_k = abar_k / abar_prev
            mean = (x - (1 - alpha_k) / (1 - abar_k).sqrt() * out) / alpha_k.sqrt()  # DDPM Eq. 11 (Ho et al.)
        else:
            mean = x + out
        if self.spherical:
            mean = F.normalize(mean, dim=-1)
        return mean

    def ddpm_loss(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Standard DDPM epsilon-prediction loss on the T-step schedule (pre-training, "Pretrain" in Table 1).

        Args:
            x: Clean data of shape ``(B, D)``.
            generator: Optional torch generator.

        Returns:
            Scalar mean squared error between true and predicted noise.

        Raises:
            RuntimeError: If the sampler does not use the ``"eps"`` parameterization.
        """
        if self.parameterization != "eps":
            msg = "DDPM pre-training needs parameterization='eps'"
            raise RuntimeError(msg)
        b = x.shape[0]
        k = torch.randint(1, self.n_steps + 1, (b,), generator=generator, device=x.device)  # diffusion index
        eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        abar = self.alpha_bar[k][:, None]
        x_k = abar.sqrt() * x + (1 - abar).sqrt() * eps
        return F.mse_loss(self.net(x_k, self.n_steps - k), eps)


class PixelSampler(StepSampler):
    """T-step image sampler: a DDPM noise network queried at T re-scheduled noise levels (docs/paper_map.md).

    Step ``t`` (RL order) is the reverse step from short-chain level ``i = T - t`` to ``i - 1``:

        mu = (x - beta_i / sqrt(1 - abar_i) * eps(x, k_i)) / sqrt(1 - beta_i),   beta_i = 1 - abar_i / abar_{i-1},

    with ``k_i`` the level's continuous position on the K-step chain (:func:`~dxmi_ad.nn.pixel.reschedule`) and
    ``sigma_t`` initialised to the DDPM posterior std ``sqrt((1 - abar_{i-1}) / (1 - abar_i) * beta_i)`` (FastDPM
    "DDPM-rev", kappa = 1); the last step's sigma is fixed at ``last_sigma`` (``fix_last``, 1e-3 as the reference).

    Args:
        channels, size: Image shape ``(C, size, size)``.
        n_steps: ``T``.
        diffusion_steps: ``K`` of the pre-training chain (1000).
        reschedule_kind: ``"var"`` or ``"uniform"``.
        base, levels, time_dim: U-Net width, down-samplings, time-embedding width.
        last_sigma: Fixed sigma of the last step (and floor of the initial sigmas).
        fix_last_sigma: Keep ``sigma_{T-1}`` fixed.

    Images are in [-1, 1]; ``x_0 ~ N(0, I)``.
    """

    def __init__(self, channels: int = 1, size: int = 28, n_steps: int = 10, diffusion_steps: int = 1000,
                 reschedule_kind: str = "var", base: int = 32, levels: int = 2, time_dim: int = 128,
                 last_sigma: float = 1e-3, fix_last_sigma: bool = True) -> None:
        from dxmi_ad.nn.pixel import UNet, ddpm_alpha_bar

        super().__init__()
        self.shape = (channels, size, size)
        self.n_steps, self.fix_last_sigma, self.diffusion_steps = n_steps, fix_last_sigma, diffusion_steps
        self.net = UNet(channels, base, levels, time_dim)
        self.register_buffer("chain_alpha_bar", ddpm_alpha_bar(diffusion_steps).float())  # (K+1,)
        self.reschedule_kind = reschedule_kind
        self.last_sigma = last_sigma
        self._set_levels(n_steps, reschedule_kind)
        self._init_sigmas(self.posterior_sigmas(), last_sigma)

    def _set_levels(self, n_steps: int, kind: str) -> None:
        from dxmi_ad.nn.pixel import ddpm_alpha_bar, reschedule

        short, times = reschedule(ddpm_alpha_bar(self.diffusion_steps), n_steps, kind)
        # RL order: step t uses level i = T - t
        self.register_buffer("level_alpha_bar", short.float())  # (T+1,), diffusion order
        self.register_buffer("level_times", times.float())  # (T,), level i at index i-1

    def posterior_sigmas(self) -> torch.Tensor:
        """DDPM posterior std of each step in RL order ``t = 0..T-1``, shape ``(T,)``, floored at ``last_sigma``."""
        i = torch.arange(self.n_steps, 0, -1)
        ab, ab_prev = self.level_alpha_bar[i], self.level_alpha_bar[i - 1]
        beta = 1 - ab / ab_prev
        return ((1 - ab_prev) / (1 - ab) * beta).clamp(min=0).sqrt().clamp(min=self.last_sigma)

    def initial_velocity_scale_sq(self) -> torch.Tensor:
        """Initial AVR ``s_t^2``, shape ``(T,)``: the re-scheduled chain's forward betas in RL order (the reference
        image trainer's ``betas_for_q = user_defined_eta``, docs/paper_map.md), not the smaller posterior variances.
        """
        i = torch.arange(self.n_steps, 0, -1)
        return (1 - self.level_alpha_bar[i] / self.level_alpha_bar[i - 1]).detach().clone()

    def mean(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Mean ``mu(x_t, t)``: ``(B, C, H, W)`` states and ``(B,)`` integer steps in ``[0, T-1]`` -> ``(B, C, H, W)``."""
        i = self.n_steps - t.long()  # level T .. 1
        ab, ab_prev = self.level_alpha_bar[i].view(-1, 1, 1, 1), self.level_alpha_bar[i - 1].view(-1, 1, 1, 1)
        beta = 1 - ab / ab_prev
        eps = self.net(x, self.level_times[i - 1])
        return (x - beta / (1 - ab).sqrt() * eps) / (1 - beta).sqrt()  # DDPM Eq. 11 on the short chain

    def with_steps(self, n_steps: int, kind: str | None = None) -> PixelSampler:
        """A copy sharing this noise network, re-scheduled to ``n_steps`` levels with posterior sigmas (no learned
        sigmas): the DDPM baseline at any number of steps, e.g. 1000 for the many-step reference.
        """
        import copy

        out = copy.copy(self)  # shallow: same network
        out._parameters, out._buffers, out._modules = dict(self._parameters), dict(self._buffers), dict(self._modules)
        out.n_steps = n_steps
        # the full chain is plain DDPM ancestral sampling; shorter chains keep this sampler's re-scheduling
        out._set_levels(n_steps, kind or ("uniform" if n_steps == self.diffusion_steps else self.reschedule_kind))
        out._parameters["log_sigma"] = nn.Parameter(out.posterior_sigmas().clamp(min=MIN_SIGMA).log(),
                                                    requires_grad=False)
        return out

    def ddpm_loss(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """DDPM epsilon-prediction loss on the K-step chain (Ho et al. 2020, "simple" loss).

        Args:
            x: Clean images of shape ``(B, C, H, W)`` in [-1, 1].
            generator: Optional torch generator.

        Returns:
            Scalar mean squared error between true and predicted noise.
        """
        b = x.shape[0]
        k = torch.randint(1, self.diffusion_steps + 1, (b,), generator=generator, device=x.device)
        eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        ab = self.chain_alpha_bar[k].view(-1, 1, 1, 1)
        return F.mse_loss(self.net(ab.sqrt() * x + (1 - ab).sqrt() * eps, k.float()), eps)
