"""Energy models E(x) and the value function V(x, t).

Polarity everywhere: **higher energy = more anomalous** (q(x) ∝ exp(-E(x)/tau), docs/paper_map.md).

* :class:`MLPEnergy`: a free MLP energy (used with the energy-magnitude regularizer gamma).
* :class:`AutoencoderEnergy`: reconstruction error of an autoencoder with spherical latent and, for features on
  the unit sphere, a spherical output (the paper's anomaly-detection energy, App. C.3; MPDR's ``AE`` class).
* :class:`ValueNet`: time-conditioned value ``V(x, t)``; :class:`SharedValueEnergy` makes ``E(x) = V(x, T)``
  (the 2-D experiment, docs/paper_map.md).

References:
    DxMI §3.2, App. C.1, C.3; docs/paper_map.md.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dxmi_ad.nn.layers import TimeMLP, make_mlp

__all__ = ["AutoencoderEnergy", "MLPEnergy", "SharedValueEnergy", "ValueNet", "autoencoder_latent_dim"]


def autoencoder_latent_dim(dim: int, latent_dim: int | str = "auto", spherical: bool = False) -> int:
    """The autoencoder bottleneck width for ``dim`` input features: the code is always narrower than the input.

    A bottleneck as wide as the input lets the autoencoder learn the identity, and then far outliers are
    reconstructed as well as normal rows (low energy). The latent code of width ``k`` is projected onto the unit
    sphere ``S^{k-1}``, a manifold of ``k - 1`` dimensions, so the code is narrower than the data exactly when
    ``k - 1 < dim``, i.e. ``k <= dim``. The rule:

    * ``"auto"``: ``min(32, max(3, dim // 4), dim)``; for ``dim = 2`` that is a circle of codes (a 1-D curve
      through the plane: the 8-Gaussians ring is one), for ``dim = 1`` the two points ``{-1, +1}`` (the energy is
      the squared distance to the nearer of two learned values, a two-centre quantizer);
    * an explicit width must be ``<= dim``;
    * ``dim == 1`` with L2-normalized inputs (``spherical=True``) is refused: every row becomes -1 or +1 (only its
      sign survives), so there is nothing left to score.

    Args:
        dim: Number of input features ``D`` (>= 1).
        latent_dim: ``"auto"`` or the requested width (int >= 1).
        spherical: Whether the inputs are L2-normalized onto the unit sphere.

    Returns:
        The latent width ``k`` (``1 <= k <= D``: a code of ``k - 1 < D`` dimensions).

    Raises:
        ValueError: An explicit width ``> dim`` (the message gives the arithmetic and the automatic width), or
            ``dim == 1`` with ``spherical=True``.
    """
    dim = int(dim)
    if dim == 1 and spherical:
        msg = ("n_features=1 with spherical=True: L2-normalizing a single feature leaves only its sign (-1 or +1), "
               "so nothing is left to score; use spherical=False (standardized input) or another detector")
        raise ValueError(msg)
    auto = max(1, min(32, max(3, dim // 4), dim))
    if isinstance(latent_dim, str):
        if latent_dim != "auto":
            msg = f"latent_dim must be 'auto' or an integer >= 1, got {latent_dim!r}"
            raise ValueError(msg)
        return auto
    k = int(latent_dim)
    if dim == 1 and k != 1:
        msg = (f"latent_dim={k} with n_features=1: the only allowed width is 1 (its spherical code is the two points "
               "-1 and +1, so the autoencoder cannot learn the identity); use latent_dim='auto'")
        raise ValueError(msg)
    if dim > 1 and k > dim:
        msg = (f"latent_dim={k} must be <= n_features={dim}: its code on the sphere S^{k - 1} has {k - 1} >= {dim} "
               f"dimensions, enough to learn the identity (latent_dim='auto' gives {auto})")
        raise ValueError(msg)
    return k


class ValueNet(nn.Module):
    """Time-conditioned value (cost-to-go) ``V^t(x_t)``; accepts ``t`` in ``{0, ..., T}`` (docs/paper_map.md).

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
    """Free MLP energy ``E(x)``, optionally on random Fourier features of ``x``.

    Args:
        dim: Data dimension ``D``.
        hidden: Hidden width.
        n_layers: Hidden layers.
        activation: Hidden activation.
        fourier_features: ``F > 0``: the MLP reads ``[sin(2 pi x W), cos(2 pi x W)]`` (``2F`` inputs) with a fixed
            ``W`` of shape ``(D, F)`` drawn from ``N(0, fourier_scale^2)`` at construction (Tancik et al., NeurIPS
            2020; a named deviation, issue #13: a plain MLP on raw low-dimensional input learns narrow modes only after
            a long plateau). 0 = the raw input (paper).
        fourier_scale: Standard deviation of ``W``, in cycles per input unit (> 0).
        quadratic_weight: ``w >= 0``: ``E(x) = MLP(x) + w ||x||^2 / 2``, a Gaussian base energy (a named deviation,
            issue #13; 0 = paper). The game only shapes the energy where data and samples are; the base makes it
            grow away from them (far outliers score high: without it, periodic Fourier features and a sampler that
            under-disperses gave rows shifted by 2-10 standard deviations AUROC 0.23-0.51 against normal rows).

    Raises:
        ValueError: ``fourier_features < 0``, ``fourier_scale <= 0`` or ``quadratic_weight < 0``.
    """

    def __init__(self, dim: int, hidden: int = 256, n_layers: int = 3, activation: str = "silu",
                 fourier_features: int = 0, fourier_scale: float = 1.0, quadratic_weight: float = 0.0) -> None:
        super().__init__()
        if fourier_features < 0 or not fourier_scale > 0 or not quadratic_weight >= 0:
            msg = ("fourier_features must be >= 0, fourier_scale > 0 and quadratic_weight >= 0, got "
                   f"{fourier_features}, {fourier_scale}, {quadratic_weight}")
            raise ValueError(msg)
        self.quadratic_weight = float(quadratic_weight)
        if fourier_features:
            self.register_buffer("fourier_matrix", torch.randn(dim, fourier_features) * fourier_scale)
        else:
            self.fourier_matrix = None
        self.net = make_mlp(2 * fourier_features if fourier_features else dim, hidden, n_layers, 1, activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Energy of ``x`` of shape ``(B, D)``; returns ``(B,)``, higher = more anomalous."""
        base = 0.5 * self.quadratic_weight * x.pow(2).sum(-1) if self.quadratic_weight else 0.0
        if self.fourier_matrix is not None:
            z = 2 * math.pi * x @ self.fourier_matrix.to(x.dtype)  # (B, F)
            x = torch.cat([torch.sin(z), torch.cos(z)], dim=-1)  # (B, 2F)
        return self.net(x).squeeze(-1) + base

    def energy_bound(self, x: torch.Tensor) -> None:
        """No upper bound: a free MLP energy is unbounded (see :meth:`AutoencoderEnergy.energy_bound`)."""
        del x


class SharedValueEnergy(nn.Module):
    """Energy that *is* the value net at the terminal step: ``E(x) = V(x, T)`` (2-D experiment, docs/paper_map.md).

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

    def energy_bound(self, x: torch.Tensor) -> None:
        """No upper bound: the value net is unbounded (see :meth:`AutoencoderEnergy.energy_bound`)."""
        del x


class AutoencoderEnergy(nn.Module):
    """Autoencoder reconstruction energy ``E(x) = ||x - dec(enc(x))||^2`` (summed over dimensions).

    The latent code is projected to the unit sphere (MPDR ``spherical=True``); with ``spherical_output`` the decoder
    output is projected to the unit sphere too ("decoder manifold on the sphere", App. C.3). For unit-norm inputs the
    energy then lies in ``[0, 4]``. Deviation (named): the sum over dimensions (MPDR's ``l2_sum``) is used because
    the paper's tau = 0.1 is only meaningful on that scale (docs/paper_map.md); the paper does not state the reduction.

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

    def energy_bound(self, x: torch.Tensor) -> torch.Tensor | None:
        """Largest energy the model can give each row: ``E_max(x) = (|x| + 1)^2`` with a spherical output.

        With the reconstruction ``r`` on the unit sphere, ``E(x) = |x - r|^2 <= (|x| + |r|)^2 = (|x| + 1)^2``
        (reached at ``r = -x / |x|``): 4 for unit-norm inputs. The training-health signal divides ``E(samples)`` by it
        (``E(samples) / E_max`` near 1 means the energy separates samples by a trivial cue, docs/paper_map.md).

        Args:
            x: Inputs of shape ``(B, D)``.

        Returns:
            Bounds of shape ``(B,)``, or None without ``spherical_output`` (the decoder output is unbounded).
        """
        if not self.spherical_output:
            return None
        return (x.norm(dim=-1) + 1).pow(2)

    @torch.no_grad()
    def perturb(
        self, x: torch.Tensor, noise_low: float, noise_high: float, generator: torch.Generator | None = None,
        keep_residual: bool = False,
    ) -> torch.Tensor:
        """Manifold projection-diffusion start ``x_0`` (MPDR ``project_diffuse``; DxMI App. C.3).

        Encodes ``x``, adds Gaussian noise to the spherical latent with a per-sample std drawn uniformly from
        ``[noise_low, noise_high]``, re-projects to the sphere and decodes. Call it on a *frozen copy* of the
        pretrained autoencoder (docs/paper_map.md).

        Args:
            x: Data of shape ``(B, D)``.
            noise_low: Smallest latent noise std (>= 0).
            noise_high: Largest latent noise std (>= noise_low).
            generator: Optional torch generator.
            keep_residual: Named deviation (``init_keep_residual``): return ``x + decode(z') - decode(z)`` instead,
                the data point moved along the decoder manifold with its own reconstruction residual kept (and
                re-projected to the unit sphere when the output is spherical), so the start differs from the data by
                where it lies along the manifold, not by lying exactly on it.

        Returns:
            Perturbed reconstructions of shape ``(B, D)``.
        """
        z = self.encode(x)
        std = noise_low + (noise_high - noise_low) * torch.rand(
            (x.shape[0], 1), generator=generator, device=x.device, dtype=x.dtype
        )
        noise = torch.randn(z.shape, generator=generator, device=x.device, dtype=x.dtype)
        moved = self.decode(F.normalize(z + std * noise, dim=-1))
        if not keep_residual:
            return moved
        x0 = x + moved - self.decode(z)
        return F.normalize(x0, dim=-1) if self.spherical_output else x0
