"""Building blocks shared by the sampler, value and energy networks.

References:
    DxMI (Yoon et al., NeurIPS 2024, arXiv:2407.00626) App. C.3: time-conditioned MLPs whose input is the
    concatenation of ``x_t`` and a 128-d sinusoidal embedding of the step index ``t`` (docs/paper_map.md).
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["SinusoidalTimeEmbedding", "TimeMLP", "make_mlp"]

_ACTIVATIONS = {"silu": nn.SiLU, "leaky_relu": lambda: nn.LeakyReLU(0.2), "relu": nn.ReLU, "gelu": nn.GELU}


def make_mlp(in_dim: int, hidden: int, n_layers: int, out_dim: int, activation: str = "silu") -> nn.Sequential:
    """An MLP with ``n_layers`` hidden layers of width ``hidden``.

    Args:
        in_dim: Input width ``D_in``.
        hidden: Hidden width.
        n_layers: Number of hidden layers (>= 1).
        out_dim: Output width ``D_out``.
        activation: One of ``silu``, ``leaky_relu``, ``relu``, ``gelu``.

    Returns:
        ``nn.Sequential`` mapping ``(B, D_in)`` to ``(B, D_out)``.

    Raises:
        ValueError: If ``n_layers < 1`` or the activation is unknown.
    """
    if n_layers < 1:
        msg = f"n_layers must be >= 1, got {n_layers}"
        raise ValueError(msg)
    if activation not in _ACTIVATIONS:
        msg = f"unknown activation {activation!r}; expected one of {sorted(_ACTIVATIONS)}"
        raise ValueError(msg)
    layers: list[nn.Module] = []
    width = in_dim
    for _ in range(n_layers):
        layers += [nn.Linear(width, hidden), _ACTIVATIONS[activation]()]
        width = hidden
    layers.append(nn.Linear(width, out_dim))
    return nn.Sequential(*layers)


class SinusoidalTimeEmbedding(nn.Module):
    """Transformer-style sinusoidal embedding of an integer step index.

    Args:
        dim: Embedding width (even). The paper uses 128 (App. C.3).
        max_period: Longest period of the sinusoids.
    """

    def __init__(self, dim: int = 128, max_period: float = 10_000.0) -> None:
        super().__init__()
        if dim < 2 or dim % 2:
            msg = f"time embedding dim must be an even number >= 2, got {dim}"
            raise ValueError(msg)
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """Embed step indices.

        Args:
            t: Step indices of shape ``(B,)`` (int or float), RL time direction (0 = start, T = data end).

        Returns:
            Embedding of shape ``(B, dim)``.
        """
        args = t.to(self.freqs.dtype)[:, None] * self.freqs[None, :]  # (B, dim/2)
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, dim)


class TimeMLP(nn.Module):
    """MLP on ``concat(x, emb(t))``: the paper's time-conditioned sampler / value network (App. C.3).

    Args:
        dim: Data dimension ``D``.
        hidden: Hidden width (paper: 2048 sampler, 1024 value).
        n_layers: Number of hidden layers (paper: 3).
        out_dim: Output width (``D`` for the sampler, 1 for the value).
        time_dim: Width of the sinusoidal embedding (paper: 128).
        activation: Hidden activation.
    """

    def __init__(
        self, dim: int, hidden: int, n_layers: int, out_dim: int, time_dim: int = 128, activation: str = "silu"
    ) -> None:
        super().__init__()
        self.embed = SinusoidalTimeEmbedding(time_dim)
        self.net = make_mlp(dim + time_dim, hidden, n_layers, out_dim, activation)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Evaluate the network.

        Args:
            x: States of shape ``(B, D)``.
            t: Step indices of shape ``(B,)``.

        Returns:
            Tensor of shape ``(B, out_dim)``.
        """
        return self.net(torch.cat([x, self.embed(t)], dim=-1))  # (B, out_dim)
