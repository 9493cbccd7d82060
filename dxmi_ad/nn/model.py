"""The DxMI model: energy E, value V, sampler pi and the start distribution pi(x_0), built from a config.

References:
    DxMI §3-4, App. C.1, C.3; docs/paper_map.md (which experiment shares which network; the frozen start copy).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from dxmi_ad.config import DxMIConfig
from dxmi_ad.nn.energy import AutoencoderEnergy, MLPEnergy, SharedValueEnergy, ValueNet
from dxmi_ad.nn.pixel import ConvEnergy, TimeIndependentValue
from dxmi_ad.nn.sampler import GaussianSampler, PixelSampler, StepSampler

__all__ = ["DxMIModel"]


class DxMIModel(nn.Module):
    """Container of the three DxMI networks plus the frozen start autoencoder.

    Args:
        config: The model's :class:`~dxmi_ad.config.DxMIConfig`.

    Attributes:
        sampler: :class:`GaussianSampler` (pi); :class:`PixelSampler` in pixel mode.
        value: :class:`ValueNet` (V); in pixel mode :class:`TimeIndependentValue` around a :class:`ConvEnergy`.
        state_shape: Shape of one state, ``(D,)`` or ``(C, H, W)``.
        energy: The energy E: :class:`AutoencoderEnergy`, :class:`MLPEnergy` or :class:`SharedValueEnergy`.
        initial_ae: Frozen copy of the pretrained autoencoder used for pi(x_0) (``initial="autoencoder"``), else None.
        needs_start_data: Whether :meth:`initial_states` perturbs a data batch (every start but ``"gaussian"``).
        velocity_scale_sq: AVR buffer ``s_t^2``, shape ``(T,)``.
    """

    def __init__(self, config: DxMIConfig) -> None:
        super().__init__()
        c = config
        self.config = config
        self.sampler: StepSampler
        if c.mode == "pixel":  # image variant (docs/paper_map.md): U-Net sampler, V(x) == E(x) a plain ResNet
            self.state_shape: tuple[int, ...] = (c.image_channels, c.image_size, c.image_size)
            self.sampler = PixelSampler(c.image_channels, c.image_size, c.n_steps, c.diffusion_steps, c.reschedule,
                                        c.unet_channels, c.unet_levels, c.time_dim, c.last_sigma, c.fix_last_sigma)
            self.value: nn.Module = TimeIndependentValue(ConvEnergy(c.image_channels, c.energy_channels, c.unet_levels))
        else:
            self.state_shape = (c.dim,)
            self.sampler = GaussianSampler(
                c.dim, c.n_steps, c.sampler_hidden, c.sampler_layers, c.time_dim, c.parameterization,
                c.init_sigma, c.last_sigma, c.fix_last_sigma, c.spherical, c.activation, c.project_samples,
            )
            self.value = ValueNet(c.dim, c.value_hidden, c.value_layers, c.time_dim, c.activation)
        if c.energy_model == "shared":
            self.energy: nn.Module = SharedValueEnergy(self.value, c.n_steps)
        elif c.energy_model == "mlp":
            self.energy = MLPEnergy(c.dim, c.energy_hidden, c.energy_layers, c.activation,
                                    c.energy_fourier_features, c.energy_fourier_scale, c.energy_quadratic_weight)
        else:
            self.energy = AutoencoderEnergy(c.dim, c.latent_dim, c.energy_hidden, c.energy_layers, c.spherical)
        self.initial_ae: AutoencoderEnergy | None = None
        if c.initial == "autoencoder":
            self.initial_ae = copy.deepcopy(self.energy)
            self.initial_ae.requires_grad_(False)
        # AVR initialised from the sampler's noise levels (docs/paper_map.md; the pixel sampler: its forward betas).
        self.register_buffer("velocity_scale_sq", self.sampler.initial_velocity_scale_sq())

    def freeze_initial(self) -> None:
        """Copy the (pretrained) energy autoencoder into the frozen start network (docs/paper_map.md)."""
        if self.initial_ae is not None:
            self.initial_ae.load_state_dict(self.energy.state_dict())
            self.initial_ae.requires_grad_(False)

    @property
    def needs_start_data(self) -> bool:
        """True when pi(x_0) perturbs data rows (``initial`` is ``"autoencoder"`` or ``"feature_noise"``)."""
        return self.config.initial != "gaussian"

    def energy_params(self) -> list[nn.Parameter]:
        """Parameters updated by the energy step (the value net's for the shared variant)."""
        return list(self.energy.parameters())

    @torch.no_grad()
    def initial_states(
        self, n: int, data: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Draw ``x_0`` from pi(x_0) (``config.initial``), then the optional input-space steps.

        * ``"gaussian"``: N(0, I);
        * ``"autoencoder"``: ``decode(normalize(enc(x) + s eps))`` through the frozen start autoencoder (on the
          decoder manifold, where its reconstruction error is near 0 by construction), or through the current
          energy autoencoder with ``initial_tracks_energy`` (MPDR); with ``init_keep_residual``
          ``x + decode(normalize(enc(x) + s eps)) - decode(enc(x))`` (the data's residual kept);
        * ``"feature_noise"``: ``x + s eps`` in feature space, projected onto the unit sphere when ``spherical``
          (off the decoder manifold);

        with ``s`` uniform in ``[init_noise_low, init_noise_high]`` per row. With ``init_input_steps = K > 0`` the
        start then takes ``K`` MPDR-style steps (:meth:`input_steps`).

        Args:
            n: Number of states.
            data: Data batch of shape ``(n, D)`` to perturb (required unless ``initial="gaussian"``).
            generator: Optional torch generator.

        Returns:
            Start states of shape ``(n, D)`` (pixel mode: ``(n, C, H, W)``, N(0, I)).

        Raises:
            ValueError: If a data-perturbing start is used without a data batch of ``n`` rows.
        """
        c = self.config
        device = self.velocity_scale_sq.device
        if not self.needs_start_data:
            x0 = torch.randn((n, *self.state_shape), generator=generator, device=device)
        else:
            if data is None or data.shape[0] != n:
                msg = f"initial={c.initial!r} needs a data batch of {n} rows to perturb"
                raise ValueError(msg)
            if c.initial == "autoencoder":
                # initial_tracks_energy: MPDR's projection through the energy being trained (a named deviation)
                ae = self.energy if c.initial_tracks_energy else self.initial_ae
                was_training = ae.training
                ae.eval()
                x0 = ae.perturb(data, c.init_noise_low, c.init_noise_high, generator,
                                keep_residual=c.init_keep_residual)
                ae.train(was_training)
            else:  # feature_noise
                x0 = self.feature_noise(data, c.init_noise_low, c.init_noise_high, generator)
        if c.init_input_steps:
            x0 = self.input_steps(x0, data, generator)
        return x0

    @torch.no_grad()
    def feature_noise(self, data: torch.Tensor, low: float, high: float,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """Feature-space noise around data rows: ``x + s eps``, ``eps ~ N(0, I)``, ``s ~ U[low, high]`` per row.

        The ``"feature_noise"`` start (``initial``) and the noise negatives (``noise_negative_fraction``), both
        named deviations (``docs/paper_map.md``). Re-projected onto the unit sphere when ``spherical``.

        Args:
            data: Rows of shape ``(n, D)``.
            low: Smallest per-row noise std ``s`` (per feature), ``>= 0``.
            high: Largest per-row noise std ``s``, ``>= low``.
            generator: Optional torch generator.

        Returns:
            Noisy rows of shape ``(n, D)``.
        """
        n = data.shape[0]
        std = low + (high - low) * torch.rand((n, *([1] * (data.dim() - 1))), generator=generator,
                                              device=data.device, dtype=data.dtype)
        x = data + std * torch.randn(data.shape, generator=generator, device=data.device, dtype=data.dtype)
        return F.normalize(x, dim=-1) if self.config.spherical else x

    def input_steps(
        self, x: torch.Tensor, data: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """``init_input_steps`` MPDR-style input-space steps on the current energy (MPDR ``mcmc_*_x``).

        ``x <- x - init_input_step_size * grad_x U(x) + init_input_noise * eps``, projected onto the unit sphere
        when ``spherical``, with ``U(x) = E(x) + init_recovery_weight * ||x - x_data||^2 / 2`` (the recovery term
        needs ``data``; MPDR weighs a latent geodesic distance instead, a named deviation). The gradient is taken
        with respect to ``x`` only: the energy's parameters receive none (their ``.grad`` stays untouched).

        Args:
            x: Start states of shape ``(B, D)``.
            data: The data rows the starts were made from, ``(B, D)``, or None (no recovery term).
            generator: Optional torch generator.

        Returns:
            Moved states of shape ``(B, D)``, detached.
        """
        c = self.config
        was_training = self.energy.training
        self.energy.eval()
        x = x.detach()
        with torch.enable_grad():
            for _ in range(c.init_input_steps):
                x = x.requires_grad_(True)
                u = self.energy(x).sum()
                if c.init_recovery_weight and data is not None:
                    u = u + c.init_recovery_weight * 0.5 * (x - data).pow(2).sum()
                (grad,) = torch.autograd.grad(u, x)
                noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
                x = (x - c.init_input_step_size * grad + c.init_input_noise * noise).detach()
                if c.spherical:
                    x = F.normalize(x, dim=-1)
        self.energy.train(was_training)
        return x

    @torch.no_grad()
    def score(self, x: torch.Tensor, batch_size: int = 65536) -> torch.Tensor:
        """Energy (anomaly score) of ``x`` in batches, in eval mode.

        Args:
            x: Vectors of shape ``(N, D)`` or, in pixel mode, images ``(N, C, H, W)`` in [-1, 1].
            batch_size: Rows per forward pass (bounds memory).

        Returns:
            Energies of shape ``(N,)``, higher = more anomalous.
        """
        was_training = self.training
        self.eval()
        out = torch.cat([self.energy(chunk) for chunk in x.split(batch_size)]) if len(x) else x.new_zeros(0)
        self.train(was_training)
        return out

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """State tensors without duplicates (the shared energy's keys alias the value net's), for safetensors."""
        state = self.state_dict()
        if self.config.energy_model == "shared":
            state = {k: v for k, v in state.items() if not k.startswith("energy.")}
        return state

    def load_checkpoint_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Load tensors written by :meth:`checkpoint_tensors`; strict on missing and unexpected keys.

        Raises:
            ValueError: If keys are missing or unexpected (the message lists them) or shapes differ.
        """
        expected = set(self.checkpoint_tensors())
        missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        if missing or unexpected:
            msg = f"checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
            raise ValueError(msg)
        try:
            self.load_state_dict(tensors, strict=False)
        except RuntimeError as err:
            msg = f"checkpoint tensors do not fit the model: {err}"
            raise ValueError(msg) from err
