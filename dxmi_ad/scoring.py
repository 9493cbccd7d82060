"""The image scorer: location features -> per-location energy -> (blurred) energy map -> anomaly map and pred_score.

One ``nn.Module`` (:class:`MapScorer`) owns this path for every front end: :class:`~dxmi_ad.image.ImageDetector`,
the exported graph (:mod:`dxmi_ad.export`) and the anomalib model (:mod:`dxmi_ad.anomalib`), so their scores agree.
It imports only torch and torchvision.

The paper's recipe (DxMI App. C.3): every location vector of the ``(h, w)`` feature grid is scored by the energy,
the image score ``pred_score`` is the maximum of the energy map and the anomaly map is its bilinear upsampling to the
image size. :class:`ScoringSettings` adds two options (named deviations, ``docs/paper_map.md``): a Gaussian blur of
the energy map before the maximum and the upsampling (anomalib's PaDiM and PatchCore blur their maps with sigma = 4 px
at the input size; we blur on the energy grid, sigma in grid cells), and ``top_k``: ``pred_score`` as the mean of the
k largest cells of the (blurred) map instead of the single largest (k = 1, the paper).

Example:
    >>> import torch
    >>> scorer = MapScorer(torch.nn.Identity(), ScoringSettings(blur_sigma=0.0))
    >>> emap = torch.zeros(1, 4, 4); emap[0, 1, 2] = 1.0
    >>> float(scorer.reduce(emap)[0])
    1.0
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MapScorer", "ScoringSettings", "blur_map", "top_k_mean", "upsample_map"]


@dataclass(frozen=True)
class ScoringSettings:
    """How the energy map becomes ``pred_score`` and the anomaly map (stored in every image model's config.json).

    Attributes:
        blur_sigma: Standard deviation of the Gaussian blur of the energy map, in grid cells (0 = none, the paper's
            plain maximum). The kernel has ``2 * int(4 * sigma + 0.5) + 1`` taps (anomalib's convention), capped at
            the grid size, with reflected borders.
        top_k: ``pred_score`` is the mean of the ``top_k`` largest cells of the (blurred) energy map, in energy units;
            1 (the default) = the maximum, the paper's score. Capped at the number of cells (``h * w``); the anomaly
            map does not depend on it.

    Raises:
        ValueError: ``blur_sigma`` negative, not finite, or not a number, or ``top_k`` not an integer >= 1 (the
            message names ``scoring.blur_sigma`` / ``scoring.top_k``).
    """

    blur_sigma: float = 0.0
    top_k: int = 1

    def __post_init__(self) -> None:
        """Validate the fields."""
        value = self.blur_sigma
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
            msg = f"scoring.blur_sigma must be a finite number >= 0 (grid cells), got {value!r}"
            raise ValueError(msg)
        object.__setattr__(self, "blur_sigma", float(value))
        k = self.top_k
        if isinstance(k, bool) or not isinstance(k, numbers.Real) or not math.isfinite(k) or not float(k).is_integer() \
                or k < 1:
            msg = f"scoring.top_k must be an integer >= 1 (energy-map cells averaged into pred_score), got {k!r}"
            raise ValueError(msg)
        object.__setattr__(self, "top_k", int(k))

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dict of the fields."""
        return asdict(self)

    def describe(self) -> str:
        """One line saying how ``pred_score`` is made, for reports and export metadata.

        Example:
            >>> ScoringSettings(top_k=3).describe()
            'mean of the 3 largest cells of the per-location energy map'
        """
        blur = f"Gaussian-blurred (sigma {self.blur_sigma:g} grid cells) " if self.blur_sigma > 0 else ""
        if self.top_k == 1:
            return f"maximum of the {blur}per-location energy map"
        return f"mean of the {self.top_k} largest cells of the {blur}per-location energy map"

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> ScoringSettings:
        """Build from a dict (``None`` or ``{}`` = the defaults, e.g. a run directory written before this option).

        Raises:
            ValueError: Not a mapping, unknown keys, or invalid values.
        """
        if data is None:
            return cls()
        if not isinstance(data, dict):
            msg = f"scoring must be a mapping, got {type(data).__name__}"
            raise ValueError(msg)
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            msg = f"unknown scoring key(s) {unknown}; known: {sorted(cls.__dataclass_fields__)}"
            raise ValueError(msg)
        return cls(**data)


def _kernel_size(sigma: float, h: int, w: int) -> list[int]:
    """Odd Gaussian kernel ``[kx, ky]``: anomalib's ``2 * int(4 sigma + 0.5) + 1``, capped at ``2 * size - 1`` so the
    reflected padding (``kernel // 2``) stays inside the grid.
    """
    k = 2 * int(4.0 * sigma + 0.5) + 1
    return [min(k, 2 * w - 1), min(k, 2 * h - 1)]  # torchvision takes (kx, ky)


def blur_map(energy_map: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of an energy map ``(B, h, w)`` with ``sigma`` in grid cells (0 = unchanged).

    Uses :func:`torchvision.transforms.v2.functional.gaussian_blur` (reflected borders).
    """
    if sigma <= 0:
        return energy_map
    from torchvision.transforms.v2.functional import gaussian_blur

    h, w = energy_map.shape[-2:]
    return gaussian_blur(energy_map[:, None], _kernel_size(sigma, h, w), [sigma, sigma])[:, 0]


def top_k_mean(energy_map: torch.Tensor, k: int) -> torch.Tensor:
    """``(B,)`` mean of the ``k`` largest cells of each map ``(B, h, w)`` (k capped at ``h * w``; k = 1: the maximum).

    In the energy map's units. k = 1 is the paper's max pooling (DxMI App. C.3); k > 1 is the ``scoring.top_k``
    deviation (docs/paper_map.md).

    Raises:
        ValueError: ``k < 1``.
    """
    if k < 1:
        msg = f"top_k must be >= 1, got {k}"
        raise ValueError(msg)
    flat = energy_map.flatten(1)
    if k == 1:
        return flat.amax(1)
    return flat.topk(min(k, flat.shape[1]), dim=1).values.mean(1)


def upsample_map(energy_map: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Anomaly map ``(B, H, W)`` from an energy map ``(B, h, w)``: bilinear upsampling (DxMI App. C.3)."""
    return F.interpolate(energy_map[:, None], size=tuple(size), mode="bilinear", align_corners=False)[:, 0]


class MapScorer(nn.Module):
    """Per-location energy -> energy map -> ``pred_score`` and anomaly map, as one traceable module.

    Args:
        energy: The energy network ``(N, C) -> (N,)`` (higher = more anomalous), in eval mode.
        settings: Scoring settings (blur); default: the paper's plain maximum.
    """

    def __init__(self, energy: nn.Module, settings: ScoringSettings | None = None) -> None:
        super().__init__()
        self.energy = energy
        self.settings = settings or ScoringSettings()

    def energy_map(self, features: torch.Tensor) -> torch.Tensor:
        """Per-location energies of L2-normalized features ``(B, C, h, w)`` -> ``(B, h, w)``, higher = more anomalous."""
        b, c, h, w = features.shape
        vectors = features.permute(0, 2, 3, 1).reshape(-1, c)  # (B*h*w, C)
        return self.energy(vectors).reshape(b, h, w)

    def reduce(self, energy_map: torch.Tensor) -> torch.Tensor:
        """``pred_score (B,)`` of an energy map ``(B, h, w)``: the maximum (or top-k mean) of the (blurred) map."""
        return top_k_mean(blur_map(energy_map, self.settings.blur_sigma), self.settings.top_k)

    def from_energy_map(self, energy_map: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``pred_score (B,)`` and anomaly map ``(B, H, W)`` (the blurred energy map, upsampled) of ``(B, h, w)``."""
        smooth = blur_map(energy_map, self.settings.blur_sigma)
        return top_k_mean(smooth, self.settings.top_k), upsample_map(smooth, size)

    def forward(self, features: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Score location features ``(B, C, h, w)``.

        Args:
            features: L2-normalized location vectors ``(B, C, h, w)``.
            size: ``(H, W)`` of the anomaly map in pixels.

        Returns:
            ``pred_score (B,)`` (maximum, or top-k mean, of the blurred energy map; higher = more anomalous) and
            ``anomaly_map (B, H, W)``.
        """
        return self.from_energy_map(self.energy_map(features), size)
