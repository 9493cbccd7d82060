"""Pixel-space networks and noise schedules: the image-generation variant of DxMI (docs/paper_map.md).

* :func:`ddpm_alpha_bar`: the K-step DDPM chain the sampler is pre-trained on (linear betas 1e-4 .. 0.02, Ho et al.
  2020, K = 1000).
* :func:`reschedule`: the T noise levels a few-step sampler visits, and the continuous positions of those levels on
  the K-step chain (the pre-trained noise network is queried there). ``"var"`` is FastDPM's VAR schedule (the
  starting point of DxMI on CIFAR-10): ``sqrt(beta_i)`` linear in ``i`` from ``sqrt(1e-4)``; the reference config
  lists it for T = 10 (1e-4, 0.011025, ..., 0.748225). Named deviation: the paper gives VAR only for T = 10; for other
  T we choose the end so that the chain's total signal ``prod(1 - beta_i)`` equals that of the T = 10 list
  (0.0208), a rule that reproduces the published list exactly at T = 10. ``"uniform"`` takes T evenly spaced levels
  of the K-step chain (DDIM-style skipping with the DDPM posterior).
* :class:`UNet`: a small U-Net noise predictor ``eps(x_k, k)`` for images up to 64 x 64 (the sampler's network;
  the paper fine-tunes a public 35.7M-parameter DDPM U-Net, we pre-train a small one on the data at hand).
* :class:`ConvEnergy`: a ResNet without any normalization layer, sum-pooled, with a linear head and a learned output
  scale (the paper's ``IGEBMEncoderV2`` value network, nh = 128; here ``energy_channels``), used as the
  time-independent value ``V(x)`` that *is* the energy (docs/paper_map.md).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dxmi_ad.config import VAR_TOTAL_SIGNAL
from dxmi_ad.nn.layers import SinusoidalTimeEmbedding

__all__ = ["ConvEnergy", "TimeIndependentValue", "UNet", "ddpm_alpha_bar", "reschedule"]



def ddpm_alpha_bar(n_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """Cumulative signal fractions of the linear-beta DDPM chain (Ho et al. 2020).

    Args:
        n_steps: Chain length ``K``.
        beta_start: First beta.
        beta_end: Last beta.

    Returns:
        ``alpha_bar`` of shape ``(K + 1,)``, float64, diffusion order: index 0 = clean data (1.0), index K = noise.
    """
    betas = torch.linspace(beta_start, beta_end, n_steps, dtype=torch.float64)
    return torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1 - betas, 0)])


def _var_betas(n_steps: int) -> torch.Tensor:
    """FastDPM VAR betas for T steps: ``sqrt(beta)`` linear from 0.01; end matched to the T = 10 total signal."""
    if n_steps == 1:
        return torch.tensor([1 - VAR_TOTAL_SIGNAL], dtype=torch.float64)

    def total(end: float) -> float:
        return float(torch.prod(1 - torch.linspace(0.01, end, n_steps, dtype=torch.float64) ** 2))

    lo, hi = 0.01, 0.99999
    if total(hi) > VAR_TOTAL_SIGNAL:  # very few steps cannot reach the target signal: largest allowed end
        lo = hi
    for _ in range(200):  # bisection on sqrt(beta_T)
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if total(mid) > VAR_TOTAL_SIGNAL else (lo, mid)
    return torch.linspace(0.01, lo, n_steps, dtype=torch.float64) ** 2


def reschedule(alpha_bar: torch.Tensor, n_steps: int, kind: str = "var") -> tuple[torch.Tensor, torch.Tensor]:
    """Noise levels of a T-step sampler cut from a K-step DDPM chain (docs/paper_map.md).

    Args:
        alpha_bar: The K-step chain's ``alpha_bar``, shape ``(K + 1,)`` (:func:`ddpm_alpha_bar`).
        n_steps: ``T``, 1 <= T <= K.
        kind: ``"var"`` (FastDPM VAR, see the module docstring) or ``"uniform"`` (every K/T-th level).

    Returns:
        ``(short_alpha_bar, times)``: ``short_alpha_bar`` of shape ``(T + 1,)`` (index 0 = 1.0, clean; index T =
        noisiest), and ``times`` of shape ``(T,)``: the continuous position ``k`` in ``[0, K]`` of level ``i = 1..T``
        on the K-step chain (log-linear interpolation of ``alpha_bar``), where the noise network is evaluated.

    Raises:
        ValueError: On an unknown kind or T outside ``[1, K]``.
    """
    K = alpha_bar.numel() - 1
    if not 1 <= n_steps <= K:
        msg = f"n_steps must be in [1, {K}], got {n_steps}"
        raise ValueError(msg)
    if kind == "uniform":
        ks = torch.linspace(0, K, n_steps + 1, dtype=torch.float64).round().long()
        return alpha_bar[ks].clone(), ks[1:].to(torch.float64)
    if kind != "var":
        msg = f"reschedule must be 'var' or 'uniform', got {kind!r}"
        raise ValueError(msg)
    short = torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1 - _var_betas(n_steps), 0)])
    # continuous k with log alpha_bar(k) = log short[i], by linear interpolation between integer steps
    log_ab = alpha_bar.log()
    target = short[1:].log().clamp(min=float(log_ab[-1]))
    idx = torch.searchsorted(-log_ab, -target).clamp(1, K)  # first k with log_ab[k] <= target
    lo_v, hi_v = log_ab[idx - 1], log_ab[idx]
    frac = ((lo_v - target) / (lo_v - hi_v)).clamp(0, 1)
    return short, (idx - 1).to(torch.float64) + frac


class _ResBlock(nn.Module):
    """Pre-activation residual block with a time embedding (GroupNorm) for the U-Net."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(_groups(c_in), c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, c_out)
        self.norm2, self.conv2 = nn.GroupNorm(_groups(c_out), c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, c_out, H, W)
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


def _groups(channels: int) -> int:
    return math.gcd(channels, 8)


class UNet(nn.Module):
    """Small U-Net noise predictor ``eps(x_k, k)`` (DDPM, Ho et al. 2020), for images up to 64 x 64.

    Args:
        channels: Image channels ``C`` (1 grayscale, 3 colour).
        base: Width at full resolution; level ``l`` (after ``l`` 2x down-samplings) has ``base * min(2 ** l, 4)``
            channels. Full resolution holds one residual block only, so the cost stays low on 28 x 28 images.
        levels: Number of 2x down-samplings (odd sizes are handled by ``ceil`` pooling and interpolation back).
        time_dim: Width of the sinusoidal embedding of the continuous diffusion time ``k``.

    The output convolution is zero-initialised (the untrained network predicts zero noise).
    """

    def __init__(self, channels: int = 1, base: int = 32, levels: int = 2, time_dim: int = 128) -> None:
        super().__init__()
        widths = [base * min(2 ** level, 4) for level in range(levels + 1)]
        emb_dim = 4 * base
        self.embed = nn.Sequential(SinusoidalTimeEmbedding(time_dim), nn.Linear(time_dim, emb_dim), nn.SiLU(),
                                   nn.Linear(emb_dim, emb_dim))
        self.inp = nn.Conv2d(channels, widths[0], 3, padding=1)
        self.full = _ResBlock(widths[0], widths[0], emb_dim)
        self.down = nn.ModuleList(_ResBlock(widths[i], widths[i + 1], emb_dim) for i in range(levels))
        self.mid = _ResBlock(widths[-1], widths[-1], emb_dim)
        self.up = nn.ModuleList(_ResBlock(2 * widths[i + 1], widths[i], emb_dim) for i in range(levels))
        self.out_full = _ResBlock(2 * widths[0], widths[0], emb_dim)
        self.out_norm = nn.GroupNorm(_groups(widths[0]), widths[0])
        self.out = nn.Conv2d(widths[0], channels, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Predict the noise.

        Args:
            x: Noisy images of shape ``(B, C, H, W)``.
            k: Continuous diffusion times of shape ``(B,)`` in ``[0, K]`` (K = noise end).

        Returns:
            Predicted noise of shape ``(B, C, H, W)``.
        """
        emb = self.embed(k)  # (B, 4 base)
        skips = [self.full(self.inp(x), emb)]  # level 0: (B, w0, H, W)
        for block in self.down:  # level i+1: (B, w_{i+1}, ceil(H / 2^(i+1)), ...)
            skips.append(block(F.avg_pool2d(skips[-1], 2, ceil_mode=True), emb))
        h = self.mid(skips[-1], emb)
        for i in reversed(range(len(self.down))):
            h = self.up[i](torch.cat([h, skips[i + 1]], 1), emb)  # (B, w_i) at level i+1
            h = F.interpolate(h, size=skips[i].shape[-2:], mode="nearest")  # up to level i
        h = self.out_full(torch.cat([h, skips[0]], 1), emb)
        return self.out(F.silu(self.out_norm(h)))


class _PlainBlock(nn.Module):
    """Residual block without normalization (IGEBM): LeakyReLU(0.2), two 3x3 convolutions, optional 2x avg-pool."""

    def __init__(self, c_in: int, c_out: int, downsample: bool) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(c_in, c_out, 3, padding=1), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1, bias=False) if c_in != c_out else nn.Identity()
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(F.leaky_relu(self.conv1(F.leaky_relu(x, 0.2)), 0.2))
        h = self.skip(x) + h
        return F.avg_pool2d(h, 2, ceil_mode=True) if self.downsample else h


class ConvEnergy(nn.Module):
    """Normalization-free ResNet energy ``E(x)`` (IGEBMEncoderV2 style, docs/paper_map.md "value net").

    Args:
        channels: Image channels ``C``.
        width: Base width ``nh`` (paper: 128); the blocks have ``nh, nh, 2 nh, 2 nh`` channels.
        levels: Number of 2x down-samplings (at most 3 used).

    Shapes: ``(B, C, H, W)`` -> ``(B,)``. Spatial features are summed (``keepdim False`` sum-pool of the reference),
    then a linear head and a learned scalar output scale (initialised to 1).
    """

    def __init__(self, channels: int = 1, width: int = 32, levels: int = 2) -> None:
        super().__init__()
        n_down = min(levels, 3)
        widths = [width, width, 2 * width, 2 * width][: n_down + 1]
        self.inp = nn.Conv2d(channels, widths[0], 3, padding=1)
        blocks, c = [], widths[0]
        for i, w in enumerate(widths):
            blocks.append(_PlainBlock(c, w, downsample=i < n_down))
            c = w
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(c, 1)
        self.out_scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Energy per image, shape ``(B,)``; higher = less like the training data."""
        h = self.blocks(self.inp(x))
        h = F.leaky_relu(h, 0.2).sum(dim=(2, 3))  # (B, c) sum-pool
        return self.head(h).squeeze(-1) * self.out_scale


class TimeIndependentValue(nn.Module):
    """``V(x, t) = E(x)``: the time-independent value shared with the energy (docs/paper_map.md).

    Args:
        energy: The energy network, ``(B, ...)`` -> ``(B,)``.
    """

    def __init__(self, energy: nn.Module) -> None:
        super().__init__()
        self.net = energy

    def forward(self, x: torch.Tensor, t: torch.Tensor | int | None = None) -> torch.Tensor:
        """Value of ``x`` at any step ``t`` (ignored), shape ``(B,)``."""
        return self.net(x)
