"""Pixel-space DxMI: an energy on raw images (the anomaly score) and a few-step image sampler (generation).

This is the paper's image-generation variant (docs/paper_map.md) on small images (up to 64 x 64,
grayscale or colour): a U-Net sampler, first pre-trained as a DDPM on a K = 1000 step chain and re-scheduled to T
steps (FastDPM VAR), then fine-tuned by DxMI together with a normalization-free ResNet energy that is also the
time-independent value, with the sigmoid time cost, tau1 = 0.1, tau2 = 0.01, gamma = 1, learnable sigma_t (last
fixed) and adaptive velocity regularization.

Anomaly scores: ``pred_score`` is the image energy ``E(x)`` (higher = more anomalous). ``anomaly_map`` is the
magnitude of the energy's input gradient, ``sum_c |dE/dx_c|`` per pixel: where a small change of the image changes
the energy most. It is a sensitivity map, not a per-pixel energy (the energy is one number per image); documented
here because it is our choice, the paper evaluates pixel-space DxMI on generation only.

Named deviations from the paper's image runs: the sampler network is a small U-Net pre-trained here on the data at
hand (the paper fine-tunes a public CIFAR-10 DDPM); learning rates and lengths are CPU-sized (see ``recipes/``);
images are scaled to [-1, 1] as in the reference code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from dxmi_ad.calibration import Calibration
from dxmi_ad.checkpoint import load_model_dir, save_model_dir
from dxmi_ad.config import DxMIConfig
from dxmi_ad.data.images import resize_images
from dxmi_ad.decision import (
    CalibratedDetector,
    check_calibration_fraction,
    check_rates,
    holdout_split,
    refuse_unsupported_rates,
)
from dxmi_ad.nn.model import DxMIModel
from dxmi_ad.training.fit import build_model, restore_model, train_model

__all__ = ["PIXEL_DEFAULTS", "PixelDetector", "pixel_config"]


#: The image-generation settings of the paper (docs/paper_map.md) with CPU-sized networks and
#: learning rates (the paper fine-tunes a large pre-trained DDPM at sampler lr 1e-7 for 200 epochs on GPUs).
PIXEL_DEFAULTS: dict[str, Any] = {
    "mode": "pixel", "energy_model": "shared", "parameterization": "eps", "initial": "gaussian",
    "n_steps": 10, "reschedule": "var", "fix_last_sigma": True, "last_sigma": 1e-3,
    "entropy_weight": 0.1, "velocity_weight": 0.01, "energy_l2_weight": 1.0, "avr_momentum": 0.99,
    "time_cost": "sigmoid", "time_cost_scale": None, "value_resample": False,
    "energy_grad_clip": None, "value_grad_clip": None, "sampler_grad_clip": 0.1,
    "sampler_lr": 1e-6, "sigma_lr": None, "value_lr": 1e-4, "energy_lr": 1e-4,
    "batch_size": 128, "n_iter": 1000, "sampler_pretrain_iter": 3000, "sampler_pretrain_lr": 1e-3,
    "ae_pretrain_iter": 0, "unet_channels": 32, "unet_levels": 2, "energy_channels": 32, "time_dim": 64,
    "diffusion_steps": 1000,
}


def pixel_config(channels: int, size: int, **overrides: Any) -> DxMIConfig:
    """A pixel-mode :class:`DxMIConfig` for images ``(channels, size, size)``: :data:`PIXEL_DEFAULTS` + overrides.

    Raises:
        ValueError: Unknown keys or invalid values (named).
    """
    settings = {**PIXEL_DEFAULTS, **overrides, "image_channels": channels, "image_size": size,
                "dim": channels * size * size}
    return DxMIConfig.from_dict(settings)


def _as_images(images: Any, channels: int, size: int, what: str = "images") -> torch.Tensor:
    """Images ``(N, H, W)`` / ``(N, C, H, W)``, uint8 or float in [0, 1] -> float ``(N, channels, size, size)``
    in [-1, 1]; resized with the package's one resize (bilinear, antialiased); 1 <-> 3 channels converted.
    """
    x = torch.as_tensor(np.asarray(images)) if not torch.is_tensor(images) else images
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4:
        msg = f"{what} must be (N, H, W) or (N, C, H, W), got shape {tuple(x.shape)}"
        raise ValueError(msg)
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
    else:
        x = x.float()
        if x.numel():
            if not torch.isfinite(x).all():
                bad = int((~torch.isfinite(x)).flatten(1).any(1).nonzero()[0])
                msg = f"{what}: row {bad} holds NaN or infinite values"
                raise ValueError(msg)
            lo, hi = float(x.min()), float(x.max())
            if lo < -1e-3 or hi > 1 + 1e-3:
                msg = (f"{what}: float values must lie in [0, 1], got [{lo:.3g}, {hi:.3g}] "
                       "(divide 0-255 values by 255, or pass uint8)")
                raise ValueError(msg)
    if x.shape[1] != channels:
        if x.shape[1] == 1 and channels == 3:
            x = x.expand(-1, 3, -1, -1)
        elif x.shape[1] == 3 and channels == 1:
            x = x.mean(1, keepdim=True)
        else:
            msg = f"{what}: the model takes {channels} channel(s), got {x.shape[1]}"
            raise ValueError(msg)
    if tuple(x.shape[-2:]) != (size, size):
        x = resize_images(x.contiguous(), size)
    return x.clamp(0, 1) * 2 - 1


class PixelDetector(CalibratedDetector):
    """Pixel-space DxMI detector and generator (docs/paper_map.md).

    Args:
        config: A pixel-mode :class:`DxMIConfig` (see :func:`pixel_config`).
        runtime: Lightning Fabric execution (:class:`~dxmi_ad.training.runtime.Runtime`) or None (this process).

    Attributes:
        model_: The :class:`DxMIModel` (after :meth:`fit`, :meth:`pretrain` or :meth:`load`), else None.
        calibration_: Decision rule on ``pred_score`` from held-out normal images
            (:class:`~dxmi_ad.decision.CalibratedDetector`), or None.
        history_: DxMI training diagnostics.
        stage: ``"pretrained"`` (DDPM sampler only, untrained energy) or ``"dxmi"``.
        data: Where the training images came from (dataset, class, seed), saved with the model so that a later
            ``--init-sampler`` can warn about a sampler that saw other data.

    Raises:
        ValueError: If ``config.mode`` is not ``"pixel"``.
    """

    def __init__(self, config: DxMIConfig, runtime: Any = None) -> None:
        if config.mode != "pixel":
            msg = f"PixelDetector needs a pixel-mode config, got mode={config.mode!r}"
            raise ValueError(msg)
        self.config = config
        self.runtime = runtime
        self.model_: DxMIModel | None = None
        self.calibration_: Calibration | None = None
        self.history_: list[dict[str, Any]] = []
        self.stage = "untrained"
        self.data: dict[str, Any] = {}

    # ------------------------------------------------------------------ training
    def to_model_input(self, images: Any, what: str = "images") -> torch.Tensor:
        """Images ``(N, H, W)`` or ``(N, C, H, W)`` (uint8, or float in [0, 1]; any size) -> ``(N, C, S, S)`` in
        [-1, 1], the model's input. Raises ``ValueError`` naming the problem (shape, range, NaN row, channels).
        """
        c = self.config
        return _as_images(images, c.image_channels, c.image_size, what)

    def pretrain(self, images: Any, progress: Callable[..., None] | None = None) -> PixelDetector:
        """DDPM pre-training of the sampler only (``sampler_pretrain_iter`` steps); the energy stays untrained.

        Args:
            images: Training images ``(N, H, W)`` / ``(N, C, H, W)``.
            progress: Optional progress callback (stage, i, total, metrics).

        Returns:
            self, with ``stage = "pretrained"``.
        """
        x = self.to_model_input(images, "training images")
        cfg = self.config.replace(n_iter=0, sampler_pretrain_iter=max(self.config.sampler_pretrain_iter, 1))
        self.model_, _ = train_model(x, cfg, progress, runtime=self.runtime)
        self.stage = "pretrained"
        return self

    def fit(
        self,
        images: Any,
        calibration: float | Any = 0.2,
        fpr: float | None = None,
        fdr: float | None = None,
        init_sampler: PixelDetector | None = None,
        progress: Callable[..., None] | None = None,
    ) -> PixelDetector:
        """Train (DDPM pre-training unless ``init_sampler``, then DxMI) and calibrate.

        Args:
            images: Normal training images ``(N, H, W)`` / ``(N, C, H, W)``.
            calibration: Fraction of ``images`` held out for calibration (0 = none), or held-out normal images.
            fpr: Target false-positive rate of the decision rule (see :class:`~dxmi_ad.calibration.Calibration`).
            fdr: Benjamini-Hochberg false discovery rate instead.
            init_sampler: A pre-trained detector (:meth:`pretrain`) whose sampler network starts DxMI (its number of
                steps may differ: the network is re-scheduled to this config's T with posterior sigmas).
            progress: Optional progress callback.

        Returns:
            self.

        Raises:
            ValueError: Bad images, ``fpr``/``fdr`` outside (0, 1) (checked first), or an ``init_sampler`` whose
                network does not fit this config.
        """
        check_rates(fpr, fdr)
        if isinstance(calibration, (int, float)) and not isinstance(calibration, bool):
            check_calibration_fraction(calibration)  # before the images are converted or anything trains
        x = self.to_model_input(images, "training images")
        cal_x = None
        if isinstance(calibration, (int, float)) and not isinstance(calibration, bool):
            fit_rows, cal_rows = holdout_split(len(x), float(calibration), self.config.seed)
            if len(cal_rows):
                cal_x, x = x[torch.from_numpy(cal_rows)], x[torch.from_numpy(fit_rows)]
        elif calibration is not None:
            cal_x = self.to_model_input(calibration, "calibration images")
        refuse_unsupported_rates(fpr, fdr, len(cal_x) if cal_x is not None else 0, "images",
                                 "raise the calibration fraction, pass more calibration images, or ask for a larger "
                                 "rate")
        model = None
        if init_sampler is not None:
            model = build_model(self.config)
            model.sampler.net.load_state_dict(self._sampler_net_state(init_sampler))
            model.velocity_scale_sq.copy_(model.sampler.initial_velocity_scale_sq())
        self.model_, self.history_ = train_model(x, self.config, progress, model=model, runtime=self.runtime)
        self.stage = "dxmi"
        if cal_x is not None and len(cal_x):
            self.calibrate(scores=self.model_.score(cal_x).double().numpy(), fpr=fpr, fdr=fdr,
                           source=f"{len(cal_x)} held-out training images")
        return self

    def _sampler_net_state(self, other: PixelDetector) -> dict[str, torch.Tensor]:
        if other.model_ is None:
            msg = "init_sampler is not trained"
            raise ValueError(msg)
        keys = ("image_channels", "image_size", "unet_channels", "unet_levels", "time_dim", "diffusion_steps")
        diff = {k: (getattr(other.config, k), getattr(self.config, k)) for k in keys
                if getattr(other.config, k) != getattr(self.config, k)}
        if diff:
            msg = f"the pre-trained sampler does not fit this model (pre-trained vs now): {diff}"
            raise ValueError(msg)
        return other.model_.sampler.net.state_dict()

    # ------------------------------------------------------------------ calibration
    def calibrate(self, images: Any = None, fpr: float | None = None, fdr: float | None = None,
                  validation: tuple[Any, np.ndarray] | None = None, source: str | None = None,
                  scores: np.ndarray | None = None) -> Calibration:
        """Set the decision rule from held-out normal images (or their ``scores``); no retraining.

        Args:
            images: Normal calibration images, or None to re-use the stored calibration scores.
            fpr: Target false-positive rate (default 0.01, or the smallest the set supports, warned).
            fdr: Benjamini-Hochberg false discovery rate instead.
            validation: ``(images, labels)`` with labels 1 = anomalous, for the F1-optimal threshold.
            source: Description stored with the calibration.
            scores: Precomputed calibration energies ``(n,)``.

        Returns:
            The :class:`~dxmi_ad.calibration.Calibration` (also stored).

        Raises:
            ValueError: Nothing to calibrate on, or ``fpr``/``fdr`` outside (0, 1) (checked before any scoring);
                dxmi_ad.calibration.CalibrationError: too few images for the rate.
        """
        check_rates(fpr, fdr)
        if scores is None and images is not None:
            scores = self.energy(images)
            source = source or f"{len(scores)} calibration images"
        elif scores is None:
            self._require_calibration("pass calibration images")
        val = None
        if validation is not None:
            val = (self.energy(validation[0]), np.asarray(validation[1]))
        return self._set_calibration(scores, fpr, fdr, val, source or "")

    def p_value(self, pred_score: np.ndarray | torch.Tensor) -> np.ndarray:
        """Split-conformal p-values ``(B,)`` in (0, 1] of energies ``(B,)`` against the calibration images.

        Raises:
            dxmi_ad.decision.NotCalibratedError: Before calibration.
        """
        return self.p_values_of(np.asarray(pred_score, dtype=np.float64))

    # ------------------------------------------------------------------ scoring
    def _trained(self) -> DxMIModel:
        if self.model_ is None:
            msg = "the detector is not trained; call fit() or load()"
            raise RuntimeError(msg)
        return self.model_

    def energy(self, images: Any, batch_size: int = 256) -> np.ndarray:
        """Energies ``(N,)`` float64 of images ``(N, H, W)`` / ``(N, C, H, W)``; higher = more anomalous."""
        x = self.to_model_input(images)
        return self._trained().score(x, batch_size).double().numpy()

    def _energy_and_map(self, x: torch.Tensor, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """One forward/backward pass over model inputs ``(N, C, S, S)``: energies ``(N,)`` float64 and input-gradient
        maps ``(N, S, S)`` float32.
        """
        model = self._trained()
        model.eval()
        energies, maps = [], []
        for chunk in x.split(batch_size):
            chunk = chunk.clone().requires_grad_(True)
            with torch.enable_grad():
                e = model.energy(chunk)
                (grad,) = torch.autograd.grad(e.sum(), chunk)
            energies.append(e.detach().double())
            maps.append(grad.abs().sum(1))
        if not maps:
            return np.zeros(0), np.zeros((0, self.config.image_size, self.config.image_size), np.float32)
        return torch.cat(energies).numpy(), torch.cat(maps).numpy()

    def anomaly_map(self, images: Any, batch_size: int = 256) -> np.ndarray:
        """Input-gradient anomaly maps ``(N, S, S)`` float32: ``sum_c |dE/dx_c|`` (see the module docstring)."""
        return self._energy_and_map(self.to_model_input(images), batch_size)[1]

    def predict(self, images: Any, batch_size: int = 256) -> dict[str, np.ndarray]:
        """Score a batch: ``pred_score`` ``(N,)``, ``anomaly_map`` ``(N, S, S)`` and, once calibrated,
        ``pred_label`` ``(N,)`` bool, ``p_value`` ``(N,)`` in (0, 1], ``normalized_score`` ``(N,)`` in [0, 1]
        (threshold at 0.5). Raises ``ValueError`` for bad images (see :meth:`to_model_input`: NaN / infinite pixels
        are refused with the row named) and for a non-finite energy (named; never turned into a decision).
        """
        s, amap = self._energy_and_map(self.to_model_input(images), batch_size)
        bad = np.flatnonzero(~np.isfinite(s))
        if len(bad):
            msg = (f"image {int(bad[0])} of the batch got a non-finite energy ({s[bad[0]]}) from finite pixels: the "
                   "model's weights are numerically broken; no decision is made")
            raise ValueError(msg)
        out: dict[str, np.ndarray] = {"pred_score": s, "anomaly_map": amap}
        out.update(self.decisions(s))
        return out

    # ------------------------------------------------------------------ generation
    def sample(self, n: int, steps: int | None = None, guidance: float = 0.0, seed: int = 0,
               batch_size: int = 500) -> np.ndarray:
        """Generate images.

        Args:
            n: Number of images.
            steps: None = the model's own T steps with its learned sigmas (``--steps-from-model``); an integer =
                the same noise network re-scheduled to that many steps with DDPM posterior sigmas (e.g. 1000: the
                many-step DDPM reference).
            guidance: Value guidance lambda >= 0 with the paper's sign (docs/paper_map.md): after each step
                ``x_{t+1} <- x_{t+1} - lambda * sigma_t * dV/dx (x_{t+1})``, i.e. downhill in energy.
            seed: Random seed (fixes the result on the CPU).
            batch_size: Images generated at once (bounds memory).

        Returns:
            Images ``(n, C, S, S)`` float32 in [0, 1] (clipped from [-1, 1]).

        Raises:
            ValueError: ``n < 1``, ``steps < 1`` or ``steps`` above the chain length, negative guidance.
        """
        model = self._trained()
        if n < 1 or guidance < 0:
            msg = f"need n >= 1 and guidance >= 0, got n={n}, guidance={guidance}"
            raise ValueError(msg)
        sampler = model.sampler if steps is None else model.sampler.with_steps(steps)
        sampler.eval()
        model.eval()
        g = torch.Generator().manual_seed(seed)
        out = []
        for start in range(0, n, batch_size):
            b = min(batch_size, n - start)
            x = model.initial_states(b, generator=g)
            for t in range(sampler.n_steps):
                with torch.no_grad():
                    step = sampler.sample_step(x, t, g)
                x = step.sample
                if guidance:
                    xg = x.clone().requires_grad_(True)
                    with torch.enable_grad():
                        (grad,) = torch.autograd.grad(model.value(xg, t + 1).sum(), xg)
                    x = x - guidance * step.sigma.view(-1, 1, 1, 1) * grad
            out.append(((x.detach().clamp(-1, 1) + 1) / 2).float())
        return torch.cat(out).numpy()

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | Path, extra: dict[str, Any] | None = None) -> None:
        """Write ``model.safetensors`` + ``config.json`` (+ ``calibration.json``); atomic per file, no pickle.

        Raises:
            RuntimeError: Nothing trained.
        """
        model = self._trained()
        meta = {"kind": "PixelDetector", "stage": self.stage, "config": self.config.to_dict(),
                "history": self.history_[-1:], "data": self.data, **(extra or {})}
        save_model_dir(directory, model.checkpoint_tensors(), meta)
        self._save_calibration(directory)

    @classmethod
    def load(cls, directory: str | Path) -> PixelDetector:
        """Load a model written by :meth:`save`.

        Raises:
            FileNotFoundError: Missing folder or files.
            ValueError: The folder holds another kind of model, or an invalid description.
        """
        tensors, meta = load_model_dir(directory)
        if meta.get("kind") != "PixelDetector":
            msg = f"{directory} does not hold a pixel-mode model (kind={meta.get('kind')!r})"
            raise ValueError(msg)
        model = restore_model(meta.get("config"), tensors, directory)
        det = cls(model.config)
        det.model_ = model
        det.stage = meta.get("stage", "dxmi")
        det.history_ = meta.get("history", [])
        det.data = dict(meta.get("data") or {})
        # generation runs (all classes, no held-out images) are not calibrated on purpose: no warning for them
        det._load_calibration(
            directory, warn=det.stage == "dxmi" and det.data.get("normal_class") != -1)
        return det
