"""Energy models E(x) and the value function V(x, t).

Polarity everywhere: **higher energy = more anomalous** (q(x) ∝ exp(-E(x)/tau), PAPER.md §1.1, pitfall 3).

* :class:`MLPEnergy`: a free MLP energy (used with the energy-magnitude regularizer gamma).
* :class:`AutoencoderEnergy`: reconstruction error of an autoencoder with spherical latent and, for features on
  the unit sphere, a spherical output (the paper's anomaly-detection energy, App. C.3; MPDR's ``AE`` class).
* :class:`ValueNet`: time-conditioned value ``V(x, t)``; :class:`SharedValueEnergy` makes ``E(x) = V(x, T)``
  (the 2-D experiment, PAPER.md §2.6).

References:
    DxMI §3.2, App. C.1, C.3; PAPER.md §2.6, §3.3, §4.2, §6 items 15, 19.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dxmi_ad.nn.layers import TimeMLP, make_mlp

__all__ = ["AutoencoderEnergy", "MLPEnergy", "SharedValueEnergy", "ValueNet"]


class ValueNet(nn.Module):
    """Time-conditioned value (cost-to-go) ``V^t(x_t)``; accepts ``t`` in ``{0, ..., T}`` (pitfall 19).

    Args:
        dim: Data dimension ``D``.
        hidden: Hidden width (paper AD: 1024).
        n_layers: Hidden layers (paper: 3).
        time_dim: Sinusoidal embedding width (paper: 128).
        activation: Hidden activation.
    """

    def __init__(self, dim: int, hidden: int = 1024, n_layers: int = 3, time_dim: int = 128, activation: str = "silu"):
        super().__init__()
        self.net = TimeMLP(dim, hidden, n_layers, 1, time_dim, activation)

    def forward(self, x: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """Evaluate ``V(x, t)``.

        Args:
            x: States of shape ``(B, D)``.
            t: Step index (int) or indices of shape ``(B,)``; RL time (0 = start, T = data end).

        Returns:
            Values of shape ``(B,)``, in energy units.
        """
        if isinstance(t, int):
            t = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        return self.net(x, t).squeeze(-1)  # (B,)


class MLPEnergy(nn.Module):
    """Free MLP energy ``E(x)``.

    Args:
        dim: Data dimension ``D``.
        hidden: Hidden width.
        n_layers: Hidden layers.
        activation: Hidden activation.
    """

    def __init__(self, dim: int, hidden: int = 256, n_layers: int = 3, activation: str = "silu") -> None:
        super().__init__()
        self.net = make_mlp(dim, hidden, n_layers, 1, activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Energy of ``x`` of shape ``(B, D)``; returns ``(B,)``, higher = more anomalous."""
        return self.net(x).squeeze(-1)


class SharedValueEnergy(nn.Module):
    """Energy that *is* the value net at the terminal step: ``E(x) = V(x, T)`` (2-D experiment, PAPER.md §2.6).

    Args:
        value: The shared :class:`ValueNet`.
        n_steps: ``T``.
    """

    def __init__(self, value: ValueNet, n_steps: int) -> None:
        super().__init__()
        self.value = value
        self.n_steps = n_steps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``V(x, T)`` for ``x`` of shape ``(B, D)``; returns ``(B,)``."""
        return self.value(x, self.n_steps)


class AutoencoderEnergy(nn.Module):
    """Autoencoder reconstruction energy ``E(x) = ||x - dec(enc(x))||^2`` (summed over dimensions).

    The latent code is projected to the unit sphere (MPDR ``spherical=True``); with ``spherical_output`` the decoder
    output is projected to the unit sphere too ("decoder manifold on the sphere", App. C.3). For unit-norm inputs the
    energy then lies in ``[0, 4]``. Deviation (named): the sum over dimensions (MPDR's ``l2_sum``) is used because
    the paper's tau = 0.1 is only meaningful on that scale (PAPER.md §7); the paper does not state the reduction.

    Args:
        dim: Data dimension ``D``.
        latent_dim: Latent width (paper: 128).
        hidden: Hidden width of encoder and decoder (paper: 1024).
        n_layers: Hidden layers of each (paper: 3).
        spherical_output: Project reconstructions onto the unit sphere (for L2-normalized features).
        activation: Hidden activation (MPDR: LeakyReLU).
    """

    def __init__(
        self,
        dim: int,
        latent_dim: int = 128,
        hidden: int = 1024,
        n_layers: int = 3,
        spherical_output: bool = False,
        activation: str = "leaky_relu",
    ) -> None:
        super().__init__()
        self.encoder = make_mlp(dim, hidden, n_layers, latent_dim, activation)
        self.decoder = make_mlp(latent_dim, hidden, n_layers, dim, activation)
        self.spherical_output = spherical_output

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latent code on the unit sphere, ``(B, D)`` -> ``(B, latent_dim)``."""
        return F.normalize(self.encoder(x), dim=-1)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Reconstruction from a latent code, ``(B, latent_dim)`` -> ``(B, D)``."""
        out = self.decoder(z)
        return F.normalize(out, dim=-1) if self.spherical_output else out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Energy of ``x`` of shape ``(B, D)``; returns ``(B,)`` >= 0, higher = more anomalous."""
        return (x - self.decode(self.encode(x))).pow(2).sum(-1)

    @torch.no_grad()
    def perturb(
        self, x: torch.Tensor, noise_low: float, noise_high: float, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Manifold projection-diffusion start ``x_0`` (MPDR ``project_diffuse``; DxMI App. C.3).

        Encodes ``x``, adds Gaussian noise to the spherical latent with a per-sample std drawn uniformly from
        ``[noise_low, noise_high]``, re-projects to the sphere and decodes. Call it on a *frozen copy* of the
        pretrained autoencoder (pitfall 17).

        Args:
            x: Data of shape ``(B, D)``.
            noise_low: Smallest latent noise std (>= 0).
            noise_high: Largest latent noise std (>= noise_low).
            generator: Optional torch generator.

        Returns:
            Perturbed reconstructions of shape ``(B, D)``.
        """
        z = self.encode(x)
        std = noise_low + (noise_high - noise_low) * torch.rand(
            (x.shape[0], 1), generator=generator, device=x.device, dtype=x.dtype
        )
        noise = torch.randn(z.shape, generator=generator, device=x.device, dtype=x.dtype)
        return self.decode(F.normalize(z + std * noise, dim=-1))
