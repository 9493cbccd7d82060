"""Configuration of a DxMI model and its training run.

One frozen, keyword-only dataclass holds every setting of the vector-space model (network sizes, objective weights,
optimisation, schedule). It is stored in every checkpoint (``config.json``) so a model is rebuilt from the file alone.
Unknown keys are rejected all at once; ranges are checked in ``__post_init__`` (scikit-learn style messages).

Defaults are the paper's anomaly-detection settings (docs/paper_map.md) where the paper gives them; the CPU recipes in
``recipes/`` override the sizes and lengths.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

#: Total signal fraction of the FastDPM "VAR" schedule at T = 10 (sqrt(beta) linear from 0.01 in steps of 0.095):
#: about 0.0208. Pixel-mode step schedules end at this signal level (:mod:`dxmi_ad.nn.pixel`).
VAR_TOTAL_SIGNAL = math.prod(1 - (0.01 + 0.095 * i) ** 2 for i in range(10))
#: What the image models' validation score measures (``DxMIConfig.validation_metric``).
VALIDATION_METRICS = ("image", "pixel", "image+pixel")
#: What the image models' SYNTHETIC validation anomalies are filled with (``DxMIConfig.validation_source``).
VALIDATION_SOURCES = ("normal", "noise", "other")


def ddpm_last_alpha_bar(n_steps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> float:
    """Signal fraction left at the end of the K-step linear-beta DDPM chain (Ho et al. 2020).

    The same chain as :func:`dxmi_ad.nn.pixel.ddpm_alpha_bar` (its last entry), without torch, so that the
    configuration can be checked without importing the networks.

    Args:
        n_steps: Chain length ``K >= 1``.
        beta_start: First beta.
        beta_end: Last beta.

    Returns:
        ``alpha_bar_K = prod_k (1 - beta_k)``, in (0, 1).
    """
    step = (beta_end - beta_start) / (n_steps - 1) if n_steps > 1 else 0.0
    return math.prod(1 - (beta_start + step * k) for k in range(n_steps))

__all__ = ["DxMIConfig"]

_CHOICES = {
    "energy_model": ("autoencoder", "mlp", "shared"),
    "initial": ("gaussian", "autoencoder", "feature_noise"),
    "parameterization": ("residual", "eps"),
    "lr_schedule": ("constant", "cosine"),
    "activation": ("silu", "leaky_relu", "relu", "gelu"),
    "mode": ("vector", "pixel"),
    "reschedule": ("var", "uniform"),
    "time_cost": ("none", "sigmoid", "linear"),
    "validation_metric": VALIDATION_METRICS,
    "validation_source": VALIDATION_SOURCES,
}


@dataclass(frozen=True, kw_only=True)
class DxMIConfig:
    """Settings of a vector-space DxMI model (paper symbol in brackets; docs/paper_map.md defaults).

    Attributes:
        dim: Data dimension ``D`` (features per vector). Set from the data by the estimator.
        n_steps: Number of sampler steps [T] (paper: 5).
        energy_model: ``"autoencoder"`` (reconstruction energy, paper AD), ``"mlp"`` (free MLP energy, separate from the
            value) or ``"shared"`` (``E(x) = V(x, T)``, the paper's 2-D variant).
        spherical: Data lie on the unit sphere (L2-normalized features): the sampler mean and the autoencoder output
            are projected onto it.
        project_samples: Guard (named deviation; docs/paper_map.md leaves it open): project every sampler step's
            output ``x_{t+1}`` (so also ``x_T``) onto the unit sphere, so every input of the energy (energy step,
            terminal value target, terminal sampler loss) lies on the data's manifold and negatives cannot differ
            from data by their norm alone. Needs ``spherical``. Off by default (today's behaviour).
        initial: Start distribution pi(x_0): ``"gaussian"`` (N(0, I)); ``"autoencoder"`` (data perturbed through a
            frozen copy of the pretrained autoencoder, ``decode(normalize(enc(x) + s eps))``, App. C.3: on the decoder
            manifold); ``"feature_noise"`` (named deviation: ``x + s eps`` in feature space, re-projected to the
            sphere when ``spherical``: off the decoder manifold). ``s`` is drawn per row uniformly from
            ``[init_noise_low, init_noise_high]``.
        init_noise_low, init_noise_high: Range of the noise std ``s`` of the start: latent noise of the autoencoder
            start (MPDR: 0.05-0.3), feature-space noise of ``"feature_noise"``.
        initial_tracks_energy: With ``initial="autoencoder"``, perturb through the *current* energy autoencoder
            instead of the frozen pretrained copy (named deviation: MPDR's manifold projection uses the energy being
            trained, so its negatives follow the energy's manifold as it shrinks; DxMI App. C.3 uses a frozen copy).
            False = the paper.
        init_keep_residual: With ``initial="autoencoder"``, keep each data row's reconstruction residual in its start
            (named deviation): ``x_0 = x + decode(normalize(enc(x) + s eps)) - decode(enc(x))``, re-projected to the
            sphere when ``spherical``: the data point moved along the decoder manifold. The paper's start lies on the
            manifold, where the reconstruction error is near 0, so an energy can tell it from data by that alone.
            False = the paper.
        init_input_steps: MPDR-style input-space steps after the start (named deviation; MPDR ``mcmc_n_step_x``: 10):
            ``x <- x - init_input_step_size * grad_x U(x) + init_input_noise * eps``, re-projected to the sphere when
            ``spherical``, with ``U(x) = E(x) + init_recovery_weight * ||x - x_data||^2 / 2`` on the *current*
            energy (as MPDR's ``net_x``); no gradient reaches the energy's parameters. 0 = off (paper).
        init_input_step_size: Step size of those steps (MPDR ``mcmc_stepsize_x``: 0.1).
        init_input_noise: Noise std of those steps (MPDR ``mcmc_noise_x``: 0.005).
        init_recovery_weight: Weight of the recovery term tying the steps to the data row they started from
            (MPDR's ``proj_const`` = 1e-4 weighs a latent geodesic term instead; here input space, a named
            deviation). 0 = none.
        parameterization: Sampler mean, ``"residual"`` or ``"eps"`` (DDPM; needed for sampler pre-training).
        init_sigma: Initial sigma_t of the residual sampler.
        last_sigma: Fixed sigma of the last step when ``fix_last_sigma``.
        fix_last_sigma: Guard: keep the last step's sigma fixed at ``last_sigma`` (``fix_last`` of the authors'
            released samplers, 1e-3 in the CIFAR sampler); it is then not trained. Off by default for the vector
            sampler (today's behaviour; the paper's AD sampler is not released).
        sampler_hidden, sampler_layers: Sampler MLP (paper: 3 x 2048).
        value_hidden, value_layers: Value MLP (paper: 3 x 1024).
        energy_hidden, energy_layers: Energy MLP / autoencoder encoder and decoder (paper: 3 x 1024).
        energy_fourier_features, energy_fourier_scale: ``energy_model="mlp"`` only: the energy reads ``F`` random
            Fourier features of ``x`` (``sin``/``cos`` of ``2 pi x W``, ``W ~ N(0, scale^2)`` fixed; 0 = raw input,
            paper). A named deviation (issue #13, docs/paper_map.md): a plain MLP on raw 2-D input learns the
            8-Gaussians modes only after a long plateau.
        energy_quadratic_weight: ``energy_model="mlp"`` only: ``w >= 0`` adds ``w ||x||^2 / 2`` (a Gaussian base
            energy in the model's input units) to the MLP energy; 0 = paper. A named deviation (issue #13,
            docs/paper_map.md): the game shapes the energy only near data and samples, the base makes far rows score
            high.
        latent_dim: Autoencoder latent width (paper: 128).
        time_dim: Sinusoidal step-embedding width (paper: 128).
        activation: Hidden activation of sampler and value nets.
        entropy_weight: [tau1] weight of ``-log sigma_t`` (entropy) in the running cost.
        velocity_weight: [tau2] weight of ``||x_{t+1}-x_t||^2 / (2 s_t^2)`` (per-dimension mean) in the running cost.
        energy_l2_weight: [gamma] energy-magnitude regularizer ``gamma (E_p[E^2] + E_pi[E^2])``.
        negative_l2_weight: Guard (named deviation from the EV trainer, which has no regularizer): MPDR / NAE's
            ``gamma_neg`` (weight 1 there), adding ``negative_l2_weight * E_pi[E(x_T)^2]`` to the energy loss, on the
            negatives only (separate from gamma, which also penalizes the data). 0 = off.
        negative_phase_weight: Weight ``w`` in [0, 1] of the negative phase ``-E_pi[E(x_T)]`` in the energy loss
            (1 = Eq. 5). An ablation control, not a method (issue #13): with 0 (and ``negative_l2_weight`` /
            ``energy_l2_weight`` 0) the sampler's outputs never reach the energy's loss, and for the autoencoder
            energy the DxMI stage is its own fit to the data (the reconstruction error) continued at ``energy_lr``
            with ``energy_grad_clip``: what DxMI adds over a start trained longer at a lower learning rate is the
            difference between the two. (An MLP energy has no lower bound: alone, ``E_p[E]`` only falls.)
        noise_negative_fraction: Fraction ``f`` in [0, 1) of the energy step's negatives replaced by feature-space
            noise negatives ``x + s eps`` of the data batch (re-projected to the sphere when ``spherical``), ``s``
            uniform in ``[noise_negative_low, noise_negative_high]`` per row (named deviation, issue #13: the
            NAE / MPDR energies of this autoencoder class learn from noise-started negatives; here the first
            ``round(f B)`` of the ``B`` sampler outputs ``x_T`` are swapped for such rows in Eq. 5 only: the value
            target and the sampler loss still see every ``x_T``; the training log's ``E(samples)`` is then the mean
            over all negatives of Eq. 5). 0 = off (the paper).
        noise_negative_low, noise_negative_high: Range of the std ``s`` of those noise negatives (per feature; with
            192 features ``s = 0.2`` is already about 70 degrees from the data row on the sphere).
        health_window: Training-health check: iterations per window; a ``TrainingHealthWarning`` is issued once
            per run when ``E(samples) / E_max`` exceeds ``saturation_threshold`` at every iteration of a window
            (the energy separates samples by a trivial cue; :class:`~dxmi_ad.training.dxdp.DxDPTrainer`).
            0 disables the warning (the diagnostics are still returned).
        saturation_threshold: Fraction of the energy's maximum ``E_max`` counted as saturated, in (0, 1]. For the
            spherical-output autoencoder energy ``E_max = (|x| + 1)^2`` per sample (4 for unit-norm inputs).
        avr_momentum: [alpha] EMA of adaptive velocity regularization (paper: 0.99); ``None`` disables AVR
            (then ``s_t^2 = 1``).
        value_resample: Re-sample ``x_{t+1}`` from the current sampler in the TD target (EV trainer: True).
        batch_size: Data vectors per iteration [B] (paper AD: 784).
        n_iter: DxMI iterations.
        warmup_iter: Initial iterations in which the energy is frozen and only value and sampler train
            (a stabilising deviation, docs/paper_map.md; 0 = paper). One that covers every DxMI iteration
            (``warmup_iter >= n_iter``) is cut to a third of them when training (with a warning), and a shorter
            ``n_iter`` given on the command line scales it (:func:`dxmi_ad.training.fit.scale_schedule`).
        energy_update_every: Update the energy at one DxMI iteration in this many (after the warm-up); value and
            sampler update at every iteration. 1 = paper (Alg. 1: one energy step per iteration). A research switch
            (issue #13, named deviation, docs/paper_map.md): k > 1 gives the sampler k updates per energy update so
            that it can catch up with the energy (like the ``n_critic`` ratio of GAN training, reversed).
        energy_ema: Decay ``d`` in [0, 1) of an exponential moving average of the energy's parameters over the
            DxMI energy updates (0 = paper, off: the last iterate). The average starts at the energy's weights when
            DxMI starts (the pre-trained start) and moves ``avg += (1 - d) (theta - avg)`` after every energy
            update; the game (value targets, sampler loss, negatives) plays against the live energy, and the
            trained model scores with the average (model selection validates the averaged energy). Averaging
            the iterates of a game damps its oscillation (Polyak averaging; Yazici et al. 2019 for GANs). Issue #13,
            a named deviation (docs/paper_map.md): after ``k`` energy updates the start keeps weight ``d^k`` in the
            average (0.99 and 200 updates: 0.13). Not with the shared energy (it is the value net the game
            uses) nor with ``energy_refit_iter``.
        energy_refit_iter: Energy-only Adam steps after the DxMI stage (0 = paper, off): the sampler is frozen and
            each step pushes ``E`` down on a fresh data batch and up on fresh samples of the final sampler, with the
            game's loss (Eq. 5 with ``gamma`` / ``gamma_neg``) at the energy's learning rate (``value_lr`` for the
            shared variant), constant, a fresh Adam. It brings the energy to its best response to the final sampler
            (the inner problem of the bi-level objective, Eq. 5) where one energy step per iteration leaves it behind
            (issue #13, named deviation, docs/paper_map.md: on 8 Gaussians the game's energy stays a ring while the
            samples already carry the eight modes).
        sampler_lr, value_lr, energy_lr: Adam learning rates (paper AD: 1e-5, 1e-5, 1e-4).
        sigma_lr: Learning rate of the log-sigmas (paper: 100 x sampler_lr); ``None`` = 100 x sampler_lr.
        lr_schedule: ``"constant"`` (paper) or ``"cosine"`` decay to 0 over ``n_iter``.
        energy_grad_clip, sampler_grad_clip, value_grad_clip: Gradient-norm clipping (EV: 0.1, 0.1, none);
            ``None`` disables.
        ae_pretrain_iter, ae_lr: Reconstruction pre-training of the autoencoder energy.
        sampler_pretrain_iter, sampler_pretrain_lr: DDPM pre-training of an ``"eps"`` sampler (0 = none).
        seed: Random seed.
        mode: ``"vector"`` (MLPs on ``(N, D)`` vectors) or ``"pixel"`` (images ``(N, C, H, W)`` in [-1, 1]: a U-Net
            sampler and a normalization-free convolutional ResNet value shared with the energy, the paper's image
            generation variant, docs/paper_map.md). Pixel mode needs ``energy_model="shared"``,
            ``parameterization="eps"`` and ``initial="gaussian"``.
        image_channels, image_size: Image shape ``(C, H, W)`` with ``H = W = image_size`` (pixel mode; ``dim`` must
            be ``C * H * W``).
        unet_channels, unet_levels: Base width and number of down-samplings of the U-Net sampler.
        energy_channels: Base width ``nh`` of the ResNet value / energy (paper: 128).
        diffusion_steps: Length ``K`` of the DDPM chain the sampler is pre-trained on (linear betas 1e-4 .. 0.02,
            Ho et al. 2020); the T-step sampler re-uses that network at ``T`` re-scheduled noise levels.
        reschedule: How the K-step chain is cut to T steps: ``"var"`` (FastDPM's VAR schedule, the DxMI CIFAR-10
            starting point, docs/paper_map.md) or ``"uniform"`` (T evenly spaced levels of the K-step chain, DDIM-style
            skipping with the DDPM posterior).
        time_cost: Value target of the image variant (Eq. 12): ``"sigmoid"`` or ``"linear"`` time cost R(t) replaces
            the running costs in the TD target (they stay in the sampler loss); ``"none"`` keeps the running costs
            in the target (the anomaly-detection trainer).
        validate_every: Model selection (a deviation, ``docs/paper_map.md``): every this many DxMI iterations (and
            after pre-training and the last iteration) the model is scored on a validation split of held-out normal
            training data plus synthetic anomalies made from other normal training data; the best state is kept.
            0 = off (the paper: the last iterate). The test set is never read.
        validation_fraction: Fraction of each category's training images held out as that validation split
            (image models; in (0, 0.5]).
        validation_blend_low, validation_blend_high: Range of the blend factor of the image models' SYNTHETIC
            validation anomalies (anomalib's Perlin generator: 1 = the source image replaces the masked pixels,
            lower = fainter anomalies, a harder validation that saturates later); 0 < low <= high <= 1. Default
            0.5-1.0, anomalib's range.
        validation_region: Size of the image models' SYNTHETIC validation anomalies: None = anomalib's Perlin masks
            as drawn (5% of the image on average); a fraction in (0, 1] = each mask cut to a square
            window of that fraction of the image side (``dxmi_ad.validation.synthetic_anomalies``, ``region``):
            smaller, local anomalies, a harder validation.
        validation_source: What fills the masks of those SYNTHETIC anomalies (anomalib's Perlin generator, its
            colour augmentations included): ``"normal"`` (default) = other normal training images of the same
            category; ``"noise"`` = anomalib's default source, the Perlin noise pattern itself; ``"other"`` =
            normal training images of the other categories (foreign content, as DRAEM's texture sources; needs two
            categories or more).
        validation_metric: What the image models' validation score measures on that split: ``"image"`` (default)
            = image AUROC of ``pred_score``, normal vs SYNTHETIC anomalous images; ``"pixel"`` = pixel AUROC of
            the anomaly map against the synthetic masks (the normal images' pixels all negative), which rewards
            localization; ``"image+pixel"`` = their mean. The pixel score pools every pixel of the split at the
            image size, so each check costs more (about 2 s per 30 held-out images on 2 CPU cores). The vector
            models (``DxMIDetector``) have no pixels and always use the row AUROC.
        select_energy_only: With model selection, restore only the energy's state of the best validation AUROC
            (the validation scores the energy alone); the sampler and the value function keep their last state, so
            generation keeps every DxMI iteration. False: the whole model of the best iteration (sampler included).
            The shared energy is the value net, which is then restored with it. No effect when no selection runs
            (``validate_every=0``, or selection skipped with a warning). Issue #13 (a deviation, as selection).
        time_cost_scale: Scale of R(t); ``None`` = the paper's: 1 for ``"sigmoid"`` (``time_cost_sig``), c = 0.05 for
            ``"linear"``.
    """

    dim: int = 2
    n_steps: int = 5
    energy_model: str = "autoencoder"
    spherical: bool = False
    project_samples: bool = False
    initial: str = "autoencoder"
    init_noise_low: float = 0.05
    init_noise_high: float = 0.3
    parameterization: str = "residual"
    init_sigma: float = 0.05
    last_sigma: float = 1e-3
    fix_last_sigma: bool = False
    initial_tracks_energy: bool = False
    init_keep_residual: bool = False
    init_input_steps: int = 0
    init_input_step_size: float = 0.1
    init_input_noise: float = 0.005
    init_recovery_weight: float = 0.0
    sampler_hidden: int = 2048
    sampler_layers: int = 3
    value_hidden: int = 1024
    value_layers: int = 3
    energy_hidden: int = 1024
    energy_layers: int = 3
    energy_fourier_features: int = 0
    energy_fourier_scale: float = 1.0
    energy_quadratic_weight: float = 0.0
    latent_dim: int = 128
    time_dim: int = 128
    activation: str = "silu"
    entropy_weight: float = 0.1
    velocity_weight: float = 0.01
    energy_l2_weight: float = 0.0
    negative_l2_weight: float = 0.0
    negative_phase_weight: float = 1.0
    noise_negative_fraction: float = 0.0
    noise_negative_low: float = 0.2
    noise_negative_high: float = 1.0
    health_window: int = 20
    saturation_threshold: float = 0.95
    avr_momentum: float | None = 0.99
    value_resample: bool = True
    batch_size: int = 784
    n_iter: int = 1000
    warmup_iter: int = 0
    energy_update_every: int = 1
    energy_refit_iter: int = 0
    energy_ema: float = 0.0
    sampler_lr: float = 1e-5
    value_lr: float = 1e-5
    energy_lr: float = 1e-4
    sigma_lr: float | None = None
    lr_schedule: str = "constant"
    energy_grad_clip: float | None = 0.1
    sampler_grad_clip: float | None = 0.1
    value_grad_clip: float | None = None
    ae_pretrain_iter: int = 1000
    ae_lr: float = 1e-4
    sampler_pretrain_iter: int = 0
    sampler_pretrain_lr: float = 1e-3
    seed: int = 0
    mode: str = "vector"
    image_channels: int = 1
    image_size: int = 28
    unet_channels: int = 32
    unet_levels: int = 2
    energy_channels: int = 32
    diffusion_steps: int = 1000
    reschedule: str = "var"
    time_cost: str = "none"
    time_cost_scale: float | None = None
    validate_every: int = 0
    validation_fraction: float = 0.1
    validation_blend_low: float = 0.5
    validation_blend_high: float = 1.0
    validation_region: float | None = None
    validation_metric: str = "image"
    validation_source: str = "normal"
    select_energy_only: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Check types, ranges and choices; raises ``ValueError`` naming the field, the value and what is allowed."""
        for f in dataclasses.fields(self):
            value, kind = getattr(self, f.name), str(f.type)
            if kind == "bool" and not isinstance(value, bool):
                msg = f"{f.name} must be true or false, got {value!r}"
                raise ValueError(msg)
            if kind == "int" and (isinstance(value, bool) or not isinstance(value, int)):
                msg = f"{f.name} must be an integer, got {value!r}"
                raise ValueError(msg)
            if kind.startswith("float") and value is not None and (
                    isinstance(value, bool) or not isinstance(value, (int, float))):
                msg = f"{f.name} must be a number, got {value!r}"
                raise ValueError(msg)
            if kind.startswith("float") and value is not None and not math.isfinite(value):
                msg = f"{f.name} must be a finite number, got {value!r}"  # NaN passes every range test below
                raise ValueError(msg)
            if kind == "str" and not isinstance(value, str):
                msg = f"{f.name} must be a string, got {value!r}"
                raise ValueError(msg)
            if f.name == "extra" and not isinstance(value, dict):
                msg = f"extra must be a mapping, got {value!r}"
                raise ValueError(msg)
        for name, allowed in _CHOICES.items():
            if getattr(self, name) not in allowed:
                msg = f"{name} must be one of {allowed}, got {getattr(self, name)!r}"
                raise ValueError(msg)
        positive_ints = ("dim", "n_steps", "sampler_hidden", "sampler_layers", "value_hidden", "value_layers",
                         "energy_hidden", "energy_layers", "latent_dim", "time_dim", "batch_size", "image_channels",
                         "image_size", "unet_channels", "unet_levels", "energy_channels", "diffusion_steps")
        for name in positive_ints:
            if int(getattr(self, name)) < 1:
                msg = f"{name} must be >= 1, got {getattr(self, name)}"
                raise ValueError(msg)
        if self.time_dim % 2:
            msg = f"time_dim must be even, got {self.time_dim}"
            raise ValueError(msg)
        if not 0 < self.validation_fraction <= 0.5:
            msg = f"validation_fraction must be in (0, 0.5], got {self.validation_fraction}"
            raise ValueError(msg)
        if not 0 < self.validation_blend_low <= self.validation_blend_high <= 1:
            msg = ("need 0 < validation_blend_low <= validation_blend_high <= 1, got "
                   f"{self.validation_blend_low}, {self.validation_blend_high}")
            raise ValueError(msg)
        if self.validation_region is not None and not 0 < self.validation_region <= 1:
            msg = f"validation_region must be in (0, 1] (a fraction of the image side) or None, got {self.validation_region}"
            raise ValueError(msg)
        for name in ("n_iter", "warmup_iter", "ae_pretrain_iter", "sampler_pretrain_iter", "validate_every", "init_input_steps",
                     "health_window", "energy_refit_iter", "energy_fourier_features"):
            if int(getattr(self, name)) < 0:
                msg = f"{name} must be >= 0, got {getattr(self, name)}"
                raise ValueError(msg)
        if not 0 <= self.negative_phase_weight <= 1:
            msg = f"negative_phase_weight must be in [0, 1] (1 = Eq. 5), got {self.negative_phase_weight}"
            raise ValueError(msg)
        if not 0 <= self.noise_negative_fraction < 1:
            msg = (f"noise_negative_fraction must be in [0, 1) (the share of the energy's negatives that are noise; "
                   f"0 = off), got {self.noise_negative_fraction}")
            raise ValueError(msg)
        if not 0 <= self.noise_negative_low <= self.noise_negative_high:
            msg = ("need 0 <= noise_negative_low <= noise_negative_high, got "
                   f"{self.noise_negative_low}, {self.noise_negative_high}")
            raise ValueError(msg)
        if not 0 <= self.energy_ema < 1:
            msg = f"energy_ema must be in [0, 1) (an average's decay; 0 = off), got {self.energy_ema}"
            raise ValueError(msg)
        if self.energy_ema and self.energy_model == "shared":
            msg = ("energy_ema > 0 needs a separate energy (energy_model 'autoencoder' or 'mlp'): the shared energy "
                   "is the value net the game itself uses")
            raise ValueError(msg)
        if self.energy_ema and self.energy_refit_iter:
            msg = (f"energy_ema={self.energy_ema} and energy_refit_iter={self.energy_refit_iter} both choose the "
                   "final energy (the average of the game's iterates, or a refit of the last one): set one to 0")
            raise ValueError(msg)
        if int(self.energy_update_every) < 1:
            msg = f"energy_update_every must be >= 1, got {self.energy_update_every}"
            raise ValueError(msg)
        for name in ("entropy_weight", "velocity_weight", "energy_l2_weight", "negative_l2_weight",
                     "init_input_noise", "init_recovery_weight", "energy_quadratic_weight"):
            if getattr(self, name) < 0:
                msg = f"{name} must be >= 0, got {getattr(self, name)}"
                raise ValueError(msg)
        for name in ("sampler_lr", "value_lr", "energy_lr", "ae_lr", "sampler_pretrain_lr", "init_sigma",
                     "last_sigma", "init_input_step_size", "energy_fourier_scale"):
            if not getattr(self, name) > 0:
                msg = f"{name} must be > 0, got {getattr(self, name)}"
                raise ValueError(msg)
        if self.avr_momentum is not None and not 0 <= self.avr_momentum < 1:
            msg = f"avr_momentum must be in [0, 1) or None, got {self.avr_momentum}"
            raise ValueError(msg)
        if not 0 <= self.init_noise_low <= self.init_noise_high:
            msg = f"need 0 <= init_noise_low <= init_noise_high, got {self.init_noise_low}, {self.init_noise_high}"
            raise ValueError(msg)
        if not 0 < self.saturation_threshold <= 1:
            msg = f"saturation_threshold must be in (0, 1], got {self.saturation_threshold}"
            raise ValueError(msg)
        if self.project_samples and not self.spherical:
            msg = ("project_samples=true needs spherical=true (samples are projected onto the unit sphere of "
                   "L2-normalized features)")
            raise ValueError(msg)
        if self.init_input_steps and self.mode != "vector":
            msg = f"init_input_steps > 0 needs mode='vector', got mode={self.mode!r}"
            raise ValueError(msg)
        if self.energy_quadratic_weight and self.energy_model != "mlp":
            msg = (f"energy_quadratic_weight={self.energy_quadratic_weight} needs energy_model='mlp' (the base is "
                   f"added to the free MLP energy only), got energy_model={self.energy_model!r}")
            raise ValueError(msg)
        if self.energy_fourier_features and self.energy_model != "mlp":
            msg = (f"energy_fourier_features={self.energy_fourier_features} needs energy_model='mlp' (the features "
                   f"feed the free MLP energy only), got energy_model={self.energy_model!r}")
            raise ValueError(msg)
        if self.init_keep_residual and self.initial != "autoencoder":
            msg = f"init_keep_residual=True needs initial='autoencoder', got initial={self.initial!r}"
            raise ValueError(msg)
        if self.initial_tracks_energy and self.initial != "autoencoder":
            msg = f"initial_tracks_energy=True needs initial='autoencoder', got initial={self.initial!r}"
            raise ValueError(msg)
        if self.initial == "autoencoder" and self.energy_model != "autoencoder":
            msg = "initial='autoencoder' needs energy_model='autoencoder' (the start is perturbed by a frozen copy of it)"
            raise ValueError(msg)
        if self.sampler_pretrain_iter and (self.parameterization != "eps" or self.initial != "gaussian"):
            msg = ("sampler_pretrain_iter > 0 (DDPM pre-training) needs parameterization='eps' and initial='gaussian' "
                   "(a DDPM starts from N(0, I), not from autoencoder-perturbed data)")
            raise ValueError(msg)
        if self.time_cost_scale is not None and self.time_cost_scale < 0:
            msg = f"time_cost_scale must be >= 0 or null, got {self.time_cost_scale}"
            raise ValueError(msg)
        if self.mode == "pixel":
            wrong = {k: getattr(self, k) for k, v in (("energy_model", "shared"), ("parameterization", "eps"),
                                                      ("initial", "gaussian")) if getattr(self, k) != v}
            if wrong:
                msg = f"mode='pixel' needs energy_model='shared', parameterization='eps', initial='gaussian'; got {wrong}"
                raise ValueError(msg)
            shape = self.image_channels * self.image_size * self.image_size
            if self.dim != shape:
                msg = (f"dim must equal image_channels * image_size ** 2 = {shape} in pixel mode, got {self.dim} "
                       "(leave dim out: it is set from the image shape)")
                raise ValueError(msg)
            if not 4 <= self.image_size <= 64 or self.image_size % (2 ** self.unet_levels) and \
                    self.image_size < 2 ** (self.unet_levels + 1):
                msg = f"image_size must be in [4, 64] and allow {self.unet_levels} down-samplings, got {self.image_size}"
                raise ValueError(msg)
            if self.n_steps > self.diffusion_steps:
                msg = f"n_steps ({self.n_steps}) cannot exceed diffusion_steps ({self.diffusion_steps})"
                raise ValueError(msg)
            if ddpm_last_alpha_bar(self.diffusion_steps) > VAR_TOTAL_SIGNAL:
                msg = (f"diffusion_steps={self.diffusion_steps} is too short for betas 1e-4 .. 0.02: the chain never "
                       f"reaches noise (its last alpha_bar must be <= {VAR_TOTAL_SIGNAL:.4f}; use >= 400)")
                raise ValueError(msg)
        for name in ("energy_grad_clip", "sampler_grad_clip", "value_grad_clip", "sigma_lr"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                msg = f"{name} must be > 0 or null, got {value}"
                raise ValueError(msg)

    def updates_energy_at(self, iteration: int) -> bool:
        """Whether DxMI iteration ``iteration`` (0-based) updates the energy.

        After ``warmup_iter``, one iteration in ``energy_update_every`` (Alg. 1 with the warm-up and update-ratio
        deviations, docs/paper_map.md).
        """
        return iteration >= self.warmup_iter and (iteration - self.warmup_iter) % self.energy_update_every == 0

    @property
    def effective_time_cost_scale(self) -> float:
        """Scale of the time cost: ``time_cost_scale`` or the paper's (1 sigmoid, 0.05 linear; docs/paper_map.md)."""
        if self.time_cost_scale is not None:
            return self.time_cost_scale
        return 0.05 if self.time_cost == "linear" else 1.0

    @property
    def effective_sigma_lr(self) -> float:
        """Learning rate of the log-sigmas: ``sigma_lr`` or 100 x ``sampler_lr`` (docs/paper_map.md)."""
        return self.sigma_lr if self.sigma_lr is not None else 100.0 * self.sampler_lr

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dict of all fields."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DxMIConfig:
        """Build from a dict; unknown keys are reported all at once. The key ``energy`` (this field's name before
        version 0.2) is read as ``energy_model``.

        Raises:
            ValueError: Not a mapping, unknown keys, or out-of-range values.
        """
        if not isinstance(data, dict):
            msg = f"model settings must be a mapping of field: value, got {type(data).__name__} {data!r:.80}"
            raise ValueError(msg)
        data = cls.rename_old_keys(data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known, key=str)
        if unknown:
            msg = f"unknown config key(s) {unknown}; known keys: {sorted(known)}"
            raise ValueError(msg)
        return cls(**data)

    @staticmethod
    def rename_old_keys(data: dict[str, Any], where: str = "model settings") -> dict[str, Any]:
        """A copy of ``data`` with the field names of earlier versions renamed (``energy`` -> ``energy_model``,
        version 0.2), so that recipes, run directories and checkpoints written before still load.

        Raises:
            ValueError: Both the old and the new name, with different values (``where`` names the source).
        """
        if "energy" not in data:
            return dict(data)
        if "energy_model" in data and data["energy_model"] != data["energy"]:
            msg = (f"{where}: 'energy' (the name before version 0.2) and 'energy_model' disagree "
                   f"({data['energy']!r} vs {data['energy_model']!r}); keep energy_model")
            raise ValueError(msg)
        out = {k: v for k, v in data.items() if k not in ("energy", "energy_model")}
        out["energy_model"] = data.get("energy_model", data["energy"])
        return out

    def replace(self, **changes: Any) -> DxMIConfig:
        """A copy with some fields changed (validated; unknown keys rejected)."""
        return self.from_dict({**self.to_dict(), **changes})
