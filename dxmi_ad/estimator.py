"""``DxMIDetector``: DxMI as a scikit-learn outlier detector, and a pyod-convention adapter.

Polarity (the project's naming rules): :meth:`DxMIDetector.energy` is the anomaly score (higher = more anomalous); the
scikit-learn contract methods ``score_samples`` / ``decision_function`` are the opposite (higher = more normal,
negative ``decision_function`` = outlier), as for IsolationForest and LocalOutlierFactor. :class:`PyODDxMIDetector`
serves tools that expect pyod's convention (``decision_function`` = energy, ``predict`` in {0, 1}).

References:
    DxMI (Yoon et al., NeurIPS 2024, arXiv:2407.00626), anomaly-detection recipe App. C.3 (docs/paper_map.md).
"""

from __future__ import annotations

import copy
import os
import warnings
from numbers import Integral, Real
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from sklearn.base import BaseEstimator, OutlierMixin
from sklearn.utils._param_validation import Interval, InvalidParameterError, StrOptions
from sklearn.utils.validation import check_is_fitted, validate_data

from dxmi_ad._warn import caller_stacklevel
from dxmi_ad.calibration import CALIBRATION_FILE
from dxmi_ad.checkpoint import load_model_dir, save_model_dir
from dxmi_ad.config import DxMIConfig
from dxmi_ad.decision import (
    MAX_CALIBRATION_FRACTION,
    CalibratedDetector,
    check_rates,
    holdout_split,
    kept_rule,
    refuse_unsupported_rates,
)
from dxmi_ad.nn.energy import autoencoder_latent_dim
from dxmi_ad.training.fit import ProgressCallback, build_model, selection_of, train_model

__all__ = ["DxMIDetector", "PyODDxMIDetector"]

_FLOAT32_MAX = float(np.finfo(np.float32).max)  # the model computes in float32
_START_BANK = 2048  # training rows kept (scaled) to start the autoencoder-perturbed sampler at generation time


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        msg = f"device={device!r} was requested but CUDA is not available; use device='cpu' or 'auto'"
        raise ValueError(msg)
    return torch.device(device)


#: Fewest held-out normal rows for model selection (``DxMIDetector(validate_every=...)``); fewer: no selection.
MIN_VALIDATION_ROWS = 10

#: ``energy_model="auto"``: the MLP energy for 2 to this many features, the autoencoder otherwise (issue #13,
#: "vectors"; chosen on synthetic choice sets, see :class:`DxMIDetector`).
LOW_DIM_FEATURES = 3

#: DataFrame column names that ``fit`` warns about: a label used as a feature is a common slip (lower case, stripped).
_LABEL_NAMES = frozenset({"label", "labels", "target", "y", "class", "anomaly", "is_anomaly", "outlier", "is_outlier",
                          "ground_truth"})

#: Values of the parameters left at None, per energy model ("mlp" also serves "shared"). The autoencoder column is
#: the paper's AD recipe at CPU size (App. C.3); the MLP column is the 2-D recipe's (paper §5.1) at a defaults' size.
ENERGY_DEFAULTS: dict[str, dict[str, Any]] = {
    "autoencoder": {"n_iter": 150, "sampler_pretrain_iter": 0, "batch_size": 128, "energy_lr": 1e-5,
                    "value_lr": 1e-4, "warmup_iter": 50, "velocity_weight": 0.01, "energy_l2_weight": 0.0},
    "mlp": {"n_iter": 300, "sampler_pretrain_iter": 500, "batch_size": 256, "energy_lr": 1e-3,
            "value_lr": 1e-3, "warmup_iter": 0, "velocity_weight": 0.1, "energy_l2_weight": 1.0},
}

#: :class:`~dxmi_ad.config.DxMIConfig` fields set with the MLP / shared energy (``config_overrides`` win): random
#: Fourier features of the input and a Gaussian base energy ``0.1 ||x||^2 / 2`` for the MLP energy (both sized for
#: standardized input, the default; with ``standardize=False`` they act in the data's own units),
#: leaky ReLU, cosine decay, a fixed last sigma of 0.01 and, with selection, the energy of the best validated
#: iteration beside the last iteration's sampler.
MLP_ENERGY_CONFIG: dict[str, Any] = {"energy_fourier_features": 64, "energy_fourier_scale": 0.6,
                                     "energy_quadratic_weight": 0.1, "activation": "leaky_relu",
                                     "lr_schedule": "cosine", "last_sigma": 0.01, "select_energy_only": True}


def _refuse_text_columns(X: Any, where: str) -> None:
    """Refuse a DataFrame with non-numeric columns, naming them (scikit-learn would say only "could not convert
    string to float").

    Raises:
        ValueError: The columns whose dtype is not numeric or bool, with a sample value and the fix.
    """
    dtypes = getattr(X, "dtypes", None)
    if dtypes is None or not hasattr(X, "columns"):
        return
    from pandas.api.types import is_bool_dtype, is_numeric_dtype

    def convertible(column: Any) -> bool:  # e.g. an object column of numeric strings, which validate_data converts
        try:
            np.asarray(column, dtype=np.float64)
        except (TypeError, ValueError):
            return False
        return True

    text = [c for c, t in dtypes.items() if not (is_numeric_dtype(t) or is_bool_dtype(t) or convertible(X[c]))]
    if text:
        first = next((v for v in X[text[0]] if not convertible([v])), None)  # a value that cannot become a number
        msg = (f"{where}: column(s) {', '.join(map(repr, map(str, text)))} of the DataFrame are not numeric (e.g. "
               f"{first!r}); every column is a feature: drop identifier and text columns first, e.g. "
               f"X.drop(columns={[str(c) for c in text]!r})")
        raise ValueError(msg)


def print_progress(step_percent: float = 10.0) -> ProgressCallback:
    """The ``verbose=True`` progress printer: ``stage i/total (p%)`` plus E(data), E(samples) and the validation
    AUROC when reported, on stderr, when a stage starts, every ``step_percent`` percent of it and at its end.

    Args:
        step_percent: Percent of a stage between two lines, in (0, 100].

    Returns:
        A callable ``(stage, i, total, metrics) -> None``.
    """
    import sys

    shown = {"energy_data": "E(data)", "energy_samples": "E(samples)", "val_auroc": "validation AUROC"}
    last: dict[str, float] = {}

    def report(stage: str, i: int, total: int, metrics: dict[str, Any]) -> None:
        bucket = float(int(100.0 * i / total // step_percent)) if total else 0.0
        if stage in last and bucket <= last[stage] and i < total:
            return
        last[stage] = bucket
        text = "  ".join(f"{name} {metrics[k]:.4g}" for k, name in shown.items() if isinstance(metrics.get(k), float))
        pct = f" ({100.0 * i / total:.0f}%)" if total else ""
        print(f"dxmi-ad {stage} {i}/{total}{pct}  {text}".rstrip(), file=sys.stderr, flush=True)

    return report


class DxMIDetector(CalibratedDetector, OutlierMixin, BaseEstimator):
    """Anomaly detector whose score is the energy of an EBM trained by DxMI (the scikit-learn way).

    ``fit`` standardises the features, builds the energy (by default an autoencoder energy pre-trained on the normal
    rows; see ``energy_model``), then runs DxMI: the energy learns low values on data and high values on the outputs
    of a T-step diffusion sampler that is itself trained by DxDP to reach low energy with maximal entropy (paper
    §3-4).

    Named deviations from the paper's AD recipe (docs/paper_map.md), all CPU-motivated: the log-sigma learning rate is
    10 x ``sampler_lr`` (docs/paper_map.md: 100 x was unstable); with the autoencoder energy every sigma_t is learned
    (the AD sampler of the paper does not say whether the last is fixed); autoencoder pre-training uses lr 1e-3;
    the step embedding is 32-d for ``n_features <= 16`` (128 otherwise); ``warmup_iter`` freezes the energy first.

    Two sets of defaults (issue #13, "vectors"; :data:`ENERGY_DEFAULTS`), chosen by ``energy_model="auto"`` from the
    number of features, for the parameters left at None:

    * one feature, more than :data:`LOW_DIM_FEATURES` features, or no model selection (``validate_every=0``, too
      few rows to hold out): the autoencoder energy (paper App. C.3) with 1000 autoencoder steps, 150 DxMI
      iterations (50 of them warm-up), batch 128, energy lr 1e-5, value lr 1e-4, tau2 0.01, gamma 0: about 15 s
      per fit on 2 CPU cores whatever the table's size (the number of updates is fixed), e.g.
      10,000 x 100 (``benchmarks/digits.py --defaults --timing``); digits 0.980, wbc 0.927, wine 0.904 AUROC.
    * 2 to :data:`LOW_DIM_FEATURES` features, with model selection: a free MLP energy on random Fourier features
      of the standardized input plus a Gaussian base energy (the 2-D recipe of paper §5.1,
      :data:`MLP_ENERGY_CONFIG`) with 500 DDPM pre-training steps of the sampler, 300 DxMI iterations, batch 256,
      energy and value lr 1e-3, tau2 0.1, gamma 1, cosine decay and, with selection, the energy of the best
      validated iteration kept beside the last sampler: about 20-25 s per fit; 8 Gaussians AUC 0.898 +/- 0.002 against the uniform box (3 seeds), where the
      autoencoder energy's ceiling is 0.843 (its code on a circle can only learn the ring through the eight modes).
      The switch is set on synthetic choice sets (``benchmarks/eight_gaussians.py --energy-by-dimension``): mixtures
      against their moment-matched Gaussian (near anomalies) and a blob against the shifted blob (far ones).

    Parameters (all stored unchanged; the model is built in ``fit``):
        n_steps: Sampler steps T (paper: 5).
        energy_model: ``"auto"`` (see above: ``"mlp"`` for 2 to :data:`LOW_DIM_FEATURES` features when model
            selection runs, ``"autoencoder"`` otherwise; the choice is in ``config_.energy_model`` after ``fit``),
            ``"autoencoder"`` (paper AD energy), ``"mlp"`` or ``"shared"`` (``E = V(., T)``, 2-D variant).
            ``"mlp"`` and ``"shared"`` take the MLP defaults.
        entropy_weight: tau1, weight of the sampler entropy (paper tau = 0.1).
        velocity_weight: tau2, weight of the velocity cost (None: 0.01 autoencoder, 0.1 MLP).
        energy_l2_weight: gamma, energy-magnitude regularizer (None: 0 autoencoder, 1 MLP).
        n_iter: DxMI iterations (None: 150 autoencoder, 300 MLP).
        ae_pretrain_iter: Autoencoder pre-training steps (the autoencoder energy only).
        sampler_pretrain_iter: DDPM pre-training steps of the sampler (uses the ``"eps"`` parameterization; None:
            0 autoencoder, 500 MLP).
        batch_size: Rows per iteration (None: 128 autoencoder, 256 MLP).
        hidden: Width of every hidden layer (sampler, value, energy).
        n_layers: Hidden layers of every network.
        latent_dim: Autoencoder latent width; ``"auto"`` = ``min(32, max(3, n_features // 4), n_features)``
            (at least 1). The code lives on the sphere ``S^(k-1)`` (``k - 1`` dimensions), so it is always narrower
            than the input; an explicit ``latent_dim > n_features`` could learn the identity and is refused. With one feature
            the width is 1, whose spherical code is the two points {-1, +1} (see
            :func:`~dxmi_ad.nn.energy.autoencoder_latent_dim`); one feature with ``spherical=True`` is refused.
        energy_lr, value_lr, sampler_lr: Adam learning rates (None: energy 1e-5 and value 1e-4 autoencoder, both
            1e-3 MLP; sampler 1e-4).
        warmup_iter: DxMI iterations with the energy frozen (a named deviation; 0 = paper; None: 50 autoencoder, 0
            MLP).
        validate_every: Model selection (a named deviation: the paper keeps the last iterate; issue #13): every this
            many DxMI iterations, and before the first (the pre-trained start competes), the model is scored on
            held-out normal rows against SYNTHETIC anomalies made from them (half
            :func:`~dxmi_ad.data.synthetic.feature_swap_anomalies`: some features swapped with another row's; half
            :func:`~dxmi_ad.data.synthetic.outward_anomalies`: moved 1.5-3 x as far from the mean, not with
            ``spherical=True``, where the normalization would undo it), and the state with the best validation AUROC
            is kept (ties: the earlier). 0 disables (the last iterate is kept); skipped, with
            ``selected_iteration_ = None``, when there are fewer than :data:`MIN_VALIDATION_ROWS` validation rows,
            one feature, no DxMI iteration, or under a ``ddp_spawn`` runtime (with a warning).
        validation_fraction: Share of the training rows (after the calibration hold-out) held out for the
            selection, in (0, 0.5]; not trained on.
        init_noise_low, init_noise_high: Latent noise std range of the autoencoder-perturbed start pi(x_0).
        spherical: L2-normalise every row onto the unit sphere (as the paper does for image features) instead of
            standardising.
        standardize: ``True``: each feature to zero mean and unit variance (fitted on the training rows);
            ``"global"``: each feature to zero mean, all divided by ONE scale, the root mean variance of the features
            (for features in the same units, e.g. pixel intensities: per-feature scaling blows up the pixels that
            are nearly constant in the normal class; MNIST-5k, 10 one-class tasks: 0.956 against 0.909 mean AUROC,
            ``benchmarks/digits.py --scaling-choice``; the digits table in the README); ``False``: the raw values.
        contamination: ``"auto"`` (the threshold is calibrated: a target false-positive rate of 0.01 on the held-out
            calibration rows, or the smallest rate they support) or the expected fraction of outliers in the
            training set, in (0, 0.5] (scikit-learn semantics: that fraction of the rows passed to ``fit`` is
            flagged). Ignored when ``fpr`` or ``fdr`` is given.
        calibration_fraction: Fraction of the rows passed to ``fit`` held out from training (seeded draw) as the
            normal calibration set of ``p_value`` and of the ``fpr``/``fdr`` rules, in [0, 0.9]. With 0, or too few
            rows to hold any out, the training rows calibrate (p-values then run optimistic).
        fpr: Target false-positive rate in (0, 1): ``predict`` flags ``energy > threshold_`` with the split-conformal
            threshold of the calibration set (anomalib / pyod conventions); a set too small is refused with the minimum size.
        fdr: Target false discovery rate in (0, 1): ``predict`` applies Benjamini-Hochberg to the conformal p-values
            of each batch it is given (a row's decision then depends on its batch).
        config_overrides: Extra :class:`~dxmi_ad.config.DxMIConfig` fields (dict) applied last.
        runtime: Lightning Fabric execution settings as a dict of :class:`~dxmi_ad.training.runtime.Runtime` fields
            (``accelerator``, ``devices``, ``strategy``, ``precision``, ``checkpoint_dir``, ...), or None (this
            process on ``device``).
        device: ``"auto"``, ``"cpu"`` or ``"cuda[:i]"``.
        random_state: Seed (int) or None; fixes every result on the CPU.
        verbose: False: print nothing; True: a line on stderr per stage and every 10% of it (iteration, E(data),
            E(samples), validation AUROC); or a progress callback (callable ``(stage, i, total, metrics)``).

    Attributes:
        model_: The trained :class:`~dxmi_ad.nn.model.DxMIModel`.
        config_: Its resolved :class:`~dxmi_ad.config.DxMIConfig`.
        offset_: ``score_samples`` value at the decision boundary (``decision_function = score_samples - offset_``).
        threshold_: Energy at the decision boundary (``= -offset_``). Under the ``fdr`` rule there is no fixed
            boundary: ``threshold_`` / ``offset_`` are the target-FPR ones, kept for reference, and ``predict`` (per
            batch, Benjamini-Hochberg) can differ from ``sign(decision_function)``.
        n_features_in_: Number of features seen in ``fit``.
        history_: Logged DxMI diagnostics (list of dicts; with selection also ``val_auroc`` records).
        selected_iteration_: The DxMI iteration whose state was kept (0 = the pre-trained start), or None without
            selection.
        validation_auroc_: Its validation AUROC (held-out normal rows vs SYNTHETIC anomalies), or None.
        calibration_: The :class:`~dxmi_ad.calibration.Calibration` (held-out energies and decision rule).
        row_counts_: How ``fit`` used the rows it was given: ``{"fit": rows the networks trained on,
            "validation": rows held out for model selection, "calibration": rows held out for the decision rule}``
            (0 when none was held out; set by ``fit``, not stored by ``save``).

    Raises (from ``fit`` / scoring):
        ValueError: NaN/inf, not 2-D, fewer than 2 rows, a feature count that differs from ``fit``.
        sklearn.exceptions.NotFittedError: Scoring before ``fit``.

    Example:
        >>> from sklearn.datasets import load_digits
        >>> X, y = load_digits(return_X_y=True)
        >>> det = DxMIDetector(n_iter=20, ae_pretrain_iter=50, hidden=64, random_state=0).fit(X[y == 0])
        >>> det.energy(X[:3]).shape
        (3,)
    """

    _auto_contamination: float | None = None  # contamination="auto": calibrated threshold

    _parameter_constraints: dict[str, list[Any]] = {
        "n_steps": [Interval(Integral, 1, None, closed="left")],
        "energy_model": [StrOptions({"auto", "autoencoder", "mlp", "shared"})],
        "entropy_weight": [Interval(Real, 0, None, closed="left")],
        "velocity_weight": [Interval(Real, 0, None, closed="left"), None],
        "energy_l2_weight": [Interval(Real, 0, None, closed="left"), None],
        "n_iter": [Interval(Integral, 0, None, closed="left"), None],
        "ae_pretrain_iter": [Interval(Integral, 0, None, closed="left")],
        "sampler_pretrain_iter": [Interval(Integral, 0, None, closed="left"), None],
        "batch_size": [Interval(Integral, 1, None, closed="left"), None],
        "hidden": [Interval(Integral, 1, None, closed="left")],
        "n_layers": [Interval(Integral, 1, None, closed="left")],
        "latent_dim": [StrOptions({"auto"}), Interval(Integral, 1, None, closed="left")],
        "energy_lr": [Interval(Real, 0, None, closed="neither"), None],
        "value_lr": [Interval(Real, 0, None, closed="neither"), None],
        "sampler_lr": [Interval(Real, 0, None, closed="neither")],
        "warmup_iter": [Interval(Integral, 0, None, closed="left"), None],
        "validate_every": [Interval(Integral, 0, None, closed="left")],
        "validation_fraction": [Interval(Real, 0, 0.5, closed="right")],
        "init_noise_low": [Interval(Real, 0, None, closed="left")],
        "init_noise_high": [Interval(Real, 0, None, closed="left")],
        "spherical": ["boolean"],
        "standardize": ["boolean", StrOptions({"global"})],
        "contamination": [StrOptions({"auto"}), Interval(Real, 0, 0.5, closed="right")],
        "calibration_fraction": [Interval(Real, 0, MAX_CALIBRATION_FRACTION, closed="both")],
        "fpr": [Interval(Real, 0, 1, closed="neither"), None],
        "fdr": [Interval(Real, 0, 1, closed="neither"), None],
        "config_overrides": [dict, None],
        "runtime": [dict, None],
        "device": [str],
        "random_state": ["random_state"],
        "verbose": ["boolean", callable],
    }

    def __init__(
        self,
        *,
        n_steps: int = 5,
        energy_model: str = "auto",
        entropy_weight: float = 0.1,
        velocity_weight: float | None = None,
        energy_l2_weight: float | None = None,
        n_iter: int | None = None,
        ae_pretrain_iter: int = 1000,
        sampler_pretrain_iter: int | None = None,
        batch_size: int | None = None,
        hidden: int = 128,
        n_layers: int = 3,
        latent_dim: int | str = "auto",
        energy_lr: float | None = None,
        value_lr: float | None = None,
        sampler_lr: float = 1e-4,
        warmup_iter: int | None = None,
        validate_every: int = 50,
        validation_fraction: float = 0.1,
        init_noise_low: float = 0.01,
        init_noise_high: float = 0.1,
        spherical: bool = False,
        standardize: bool | Literal["global"] = True,
        contamination: str | float = "auto",
        calibration_fraction: float = 0.2,
        fpr: float | None = None,
        fdr: float | None = None,
        config_overrides: dict[str, Any] | None = None,
        runtime: dict[str, Any] | None = None,
        device: str = "auto",
        random_state: int | np.random.RandomState | None = None,
        verbose: bool | ProgressCallback = False,
    ) -> None:
        self.n_steps = n_steps
        self.energy_model = energy_model
        self.entropy_weight = entropy_weight
        self.velocity_weight = velocity_weight
        self.energy_l2_weight = energy_l2_weight
        self.n_iter = n_iter
        self.ae_pretrain_iter = ae_pretrain_iter
        self.sampler_pretrain_iter = sampler_pretrain_iter
        self.batch_size = batch_size
        self.hidden = hidden
        self.n_layers = n_layers
        self.latent_dim = latent_dim
        self.energy_lr = energy_lr
        self.value_lr = value_lr
        self.sampler_lr = sampler_lr
        self.warmup_iter = warmup_iter
        self.validate_every = validate_every
        self.validation_fraction = validation_fraction
        self.init_noise_low = init_noise_low
        self.init_noise_high = init_noise_high
        self.spherical = spherical
        self.standardize = standardize
        self.contamination = contamination
        self.calibration_fraction = calibration_fraction
        self.fpr = fpr
        self.fdr = fdr
        self.config_overrides = config_overrides
        self.runtime = runtime
        self.device = device
        self.random_state = random_state
        self.verbose = verbose

    # ------------------------------------------------------------------ configuration
    def _seed(self) -> int:
        rs = self.random_state
        if rs is None:
            return int(np.random.default_rng().integers(2**31 - 1))
        if isinstance(rs, Integral):
            return int(rs)
        return int(rs.randint(2**31 - 1))

    def resolved_energy_model(self, dim: int, selects: bool = True) -> str:
        """The energy ``fit`` builds for ``dim`` features: ``energy_model``, with ``"auto"`` resolved to ``"mlp"`` for
        2 to :data:`LOW_DIM_FEATURES` features when model selection runs (``selects``), and ``"autoencoder"``
        otherwise (one feature included): the MLP energy needs selection to keep its early peak (8 Gaussians: 0.824
        at the last iterate vs 0.874 selected), and selection needs two features and enough rows (see
        ``validate_every``).
        """
        if self.energy_model != "auto":
            return self.energy_model
        return "mlp" if selects and 2 <= dim <= LOW_DIM_FEATURES else "autoencoder"

    def resolved_params(self, dim: int, selects: bool = True) -> dict[str, Any]:
        """:meth:`get_params` with the parameters left at None filled from :data:`ENERGY_DEFAULTS`.

        Args:
            dim: Number of features (>= 1) of the data ``fit`` will see.
            selects: Whether model selection will run (see :meth:`resolved_energy_model`).

        Returns:
            The parameter dict, with the values of the energy ``fit`` builds for ``dim`` features; ``energy_model``
            stays as given (``"auto"`` included).
        """
        energy = self.resolved_energy_model(dim, selects)
        profile = ENERGY_DEFAULTS["autoencoder" if energy == "autoencoder" else "mlp"]
        return {k: profile[k] if v is None and k in profile else v for k, v in self.get_params().items()}

    def _make_config(self, dim: int, n_rows: int, selects: bool = True) -> DxMIConfig:
        """Resolve the constructor parameters into a :class:`DxMIConfig` for ``dim`` features (None parameters take
        the resolved energy model's :data:`ENERGY_DEFAULTS`; ``selects``: whether model selection will run).
        """
        energy = self.resolved_energy_model(dim, selects)
        is_ae = energy == "autoencoder"
        own = self.resolved_params(dim, selects)
        params: dict[str, Any] = {
            "dim": dim, "n_steps": self.n_steps, "energy_model": energy, "spherical": self.spherical,
            "initial": "autoencoder" if is_ae else "gaussian",
            "parameterization": "eps" if (own["sampler_pretrain_iter"] or not is_ae) else "residual",
            "fix_last_sigma": not is_ae,
            "init_noise_low": self.init_noise_low, "init_noise_high": max(self.init_noise_high, self.init_noise_low),
            "sampler_hidden": self.hidden, "value_hidden": self.hidden, "energy_hidden": self.hidden,
            "sampler_layers": self.n_layers, "value_layers": self.n_layers, "energy_layers": self.n_layers,
            "latent_dim": autoencoder_latent_dim(dim, "auto") if self.latent_dim == "auto" else self.latent_dim,
            "time_dim": 32 if dim <= 16 else 128,
            "entropy_weight": self.entropy_weight, "velocity_weight": own["velocity_weight"],
            "energy_l2_weight": own["energy_l2_weight"], "batch_size": min(own["batch_size"], max(n_rows, 2)),
            "n_iter": own["n_iter"], "warmup_iter": own["warmup_iter"], "ae_pretrain_iter": self.ae_pretrain_iter,
            "validate_every": self.validate_every, "validation_fraction": self.validation_fraction,
            "sampler_pretrain_iter": own["sampler_pretrain_iter"],
            "energy_lr": own["energy_lr"], "value_lr": own["value_lr"], "sampler_lr": self.sampler_lr,
            "ae_lr": 1e-3, "sigma_lr": 1e-2 * self.sampler_lr / 1e-3,
            "energy_grad_clip": None if energy == "shared" else 0.1,
            "seed": self._seed(),
        }
        if not is_ae:  # the 2-D recipe's network and schedule (Fourier features feed the free MLP energy only)
            params.update({k: v for k, v in MLP_ENERGY_CONFIG.items()
                           if energy == "mlp" or not k.startswith(("energy_fourier", "energy_quadratic"))})
        params.update(self.config_overrides or {})
        config = DxMIConfig.from_dict(params)
        if config.energy_model == "autoencoder":  # the bottleneck must be narrower than the input (refused otherwise)
            autoencoder_latent_dim(config.dim, config.latent_dim, config.spherical)
        return config

    # ------------------------------------------------------------------ model selection
    def _validation_split(self, X: np.ndarray, config: DxMIConfig, seed: int) -> tuple[np.ndarray, np.ndarray | None]:
        """``(training rows, validation rows or None)`` of the fit rows ``(n, D)`` (see ``validate_every``), read
        from the resolved ``config`` (``config_overrides`` may set ``validate_every`` / ``validation_fraction``).

        Warns:
            UserWarning: Selection asked for under a ``*spawn`` strategy (a callable does not cross process
                boundaries): the last iterate is kept.
        """
        if not config.validate_every or not config.n_iter or X.shape[1] < 2:
            return X, None
        if "spawn" in str((self.runtime or {}).get("strategy", "")):
            warnings.warn(f"validate_every={config.validate_every}: model selection does not run under the "
                          f"{self.runtime['strategy']!r} strategy (its workers are spawned processes); the last "
                          "iterate is kept (use strategy 'ddp' to select)", UserWarning, stacklevel=caller_stacklevel())
            return X, None
        fit_rows, val_rows = holdout_split(len(X), config.validation_fraction, seed + 1)
        if len(val_rows) < MIN_VALIDATION_ROWS:
            warnings.warn(f"validate_every={config.validate_every}: model selection skipped, {len(X)} training rows "
                          f"leave {len(val_rows)} validation rows (at least {MIN_VALIDATION_ROWS} needed; raise "
                          "validation_fraction or add rows); the last iterate is kept", UserWarning, stacklevel=caller_stacklevel())
            return X, None
        return X[fit_rows], X[val_rows]

    def _read_selection(self) -> None:
        """Set ``selected_iteration_`` / ``validation_auroc_`` from the selection record of ``history_`` (or None)."""
        self.selected_iteration_, self.validation_auroc_ = selection_of(self.history_) or (None, None)

    def _validator(self, X_val: np.ndarray, seed: int) -> Any:
        """``validate(model) -> AUROC`` of held-out normal rows ``X_val`` ``(m, D)`` against SYNTHETIC anomalies.

        The anomalies are made from those rows, ``max(2 m, 200)`` of them: half near-misses
        (:func:`~dxmi_ad.data.synthetic.feature_swap_anomalies`), half far rows
        (:func:`~dxmi_ad.data.synthetic.outward_anomalies`, 1.5-3 x as far from the mean; swaps only with
        ``spherical=True``): a model is kept only if it
        ranks both kinds (issue #13: with swaps alone, an MLP energy that ranked far rows below normal ones could
        win, on data whose features are independent the swaps look normal).
        """
        from dxmi_ad.data.synthetic import feature_swap_anomalies, outward_anomalies
        from dxmi_ad.metrics import auroc

        n_fake = max(2 * len(X_val), 200)
        n_out = 0 if self.spherical else n_fake // 2  # the L2 normalization would undo the outward move
        fake = np.concatenate([feature_swap_anomalies(X_val, n_fake - n_out, seed + 2),
                               outward_anomalies(X_val, n_out, seed + 3).astype(X_val.dtype)])
        rows = self._transform(np.concatenate([X_val, fake]))
        n_normal = len(X_val)

        def validate(model: Any) -> float:
            with torch.no_grad():
                e = model.score(rows.to(model.velocity_scale_sq.device)).double().cpu().numpy()
            return auroc(e[:n_normal], e[n_normal:])

        return validate

    # ------------------------------------------------------------------ preprocessing
    def _column_names(self, cols: np.ndarray) -> str:
        names = getattr(self, "feature_names_in_", None)
        shown = [repr(str(names[c])) if names is not None else str(int(c)) for c in np.unique(cols)[:5]]
        return ", ".join(shown) + (", ..." if len(np.unique(cols)) > 5 else "")

    def _refuse_rows(self, bad: np.ndarray, what: str) -> None:
        """Raise ``ValueError`` naming the rows and columns where ``bad`` ``(n, D)`` bool is True (if any)."""
        if not bad.any():
            return
        rows, cols = np.nonzero(bad)
        urows = np.unique(rows)
        shown = ", ".join(str(int(r)) for r in urows[:5]) + (", ..." if len(urows) > 5 else "")
        msg = (f"{what} in {len(urows)} row(s) (row indices {shown}; column(s) {self._column_names(cols)}): "
               "rescale these features (e.g. divide by a constant or take logs) or remove the rows")
        raise ValueError(msg)

    def _transform(self, X: np.ndarray) -> torch.Tensor:
        """Rows ``(n, D)`` -> the float32 tensor the model sees (L2-normalized or standardized).

        Computed in float64, then cast; values the float32 model cannot hold are refused.

        Raises:
            ValueError: Naming rows and columns: a value beyond the float32 range (``|x| > 3.4e38``) that reaches
                the model unnormalized, or a standardized value that overflows float32 (a row far outside the
                training range).
        """
        X = np.asarray(X, dtype=np.float64)
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            if self.spherical:  # scale each row by its largest entry first: the norm of 1e200-sized rows is finite
                peak = np.abs(X).max(axis=1, keepdims=True) if X.shape[1] else np.ones((len(X), 1))
                X = X / np.where(peak > 0, peak, 1.0)
                X = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
            else:
                self._refuse_rows(np.abs(X) > _FLOAT32_MAX, "values beyond the float32 range the model computes "
                                  f"in (|x| > {_FLOAT32_MAX:.3g})")
                if self.standardize:
                    X = (X - self.mean_) / self.scale_
            out = X.astype(np.float32)
        self._refuse_rows(~np.isfinite(out), "standardization overflows float32 (|x - mean| / scale > "
                          f"{_FLOAT32_MAX:.3g}, far outside the training range)")
        return torch.from_numpy(np.ascontiguousarray(out))

    def _check(self, X: Any) -> torch.Tensor:
        check_is_fitted(self, "model_")
        _refuse_text_columns(X, "scoring")
        X = validate_data(self, X, reset=False, dtype=[np.float64, np.float32])
        return self._transform(X)

    # ------------------------------------------------------------------ fit
    def fit(self, X: Any, y: Any = None) -> DxMIDetector:
        """Train on normal rows.

        Args:
            X: Training data of shape ``(n_samples, n_features)``, finite; ``n_samples >= 2``.
            y: Ignored (present for API consistency).

        Returns:
            self.

        Raises:
            ValueError: On NaN/inf, a non-2-D array, fewer than 2 rows, a DataFrame column that is not numeric
                (named: an identifier or text label must be dropped first), an invalid parameter (an explicit
                ``latent_dim >= n_features``: see the class docstring), values beyond the float32 range or a
                standardization that overflows float32 (the rows and columns are named).
        """
        self._validate_params()
        check_rates(self.fpr, self.fdr)  # one decision rule (the CLI refuses both too)
        _refuse_text_columns(X, "fit")
        X_all = validate_data(self, X, ensure_min_samples=2, dtype=[np.float64, np.float32]).astype(np.float64)
        labels = [str(n) for n in getattr(self, "feature_names_in_", []) if str(n).strip().lower() in _LABEL_NAMES]
        if labels:
            warnings.warn(f"column(s) {', '.join(map(repr, labels))} of the DataFrame look like labels and are used "
                          "as features: drop them (fit takes normal rows only; labels are for evaluation)",
                          UserWarning, stacklevel=caller_stacklevel())
        if self.spherical and X_all.shape[1] == 1:
            autoencoder_latent_dim(1, "auto", spherical=True)  # refused: one L2-normalized feature is only its sign
        if not self.spherical:  # before any statistic: 1e300 would overflow the scaler and blame the training
            self._refuse_rows(np.abs(X_all) > _FLOAT32_MAX, "values beyond the float32 range the model computes "
                              f"in (|x| > {_FLOAT32_MAX:.3g})")
        seed = self._seed()
        fit_rows, cal_rows = holdout_split(len(X_all), self.calibration_fraction, seed)
        if len(cal_rows):
            X, X_cal = X_all[fit_rows], X_all[cal_rows]
            source = f"{len(cal_rows)} of the {len(X_all)} training rows held out (seed {seed})"
        else:
            X, X_cal = X_all, None
            why = ("calibration_fraction=0: no rows held out" if self.calibration_fraction == 0
                   else "too few rows to hold out a calibration set")
            source = f"the training rows ({why}; p-values are optimistic)"
        refuse_unsupported_rates(self.fpr, self.fdr, len(X_cal) if X_cal is not None else len(X), "rows",
                                 "raise calibration_fraction, add rows, or ask for a larger rate")  # before training
        X_fit = X  # every row not held out for calibration (they calibrate when none is)
        X, X_val = self._validation_split(X, self._make_config(X.shape[1], X.shape[0]), seed)
        if self.spherical:  # rows are L2-normalized, not standardized (and may be too large for moments)
            self.mean_, self.scale_ = np.zeros(X.shape[1], np.float32), np.ones(X.shape[1], np.float32)
        else:
            self.mean_ = X.mean(0).astype(np.float32)
            scale = X.std(0)
            peak = np.abs(X).max(0)
            if self.standardize == "global":  # one scale for all features (the root mean variance), one guard
                scale, peak = np.full_like(scale, np.sqrt(np.mean(scale**2))), np.full_like(peak, peak.max())
            self.scale_ = np.where(scale > 1e-8 * np.maximum(1.0, peak), scale, 1.0).astype(np.float32)
        data = self._transform(X)
        self.config_ = self._make_config(X.shape[1], X.shape[0], selects=X_val is not None).replace(seed=seed)
        device = _resolve_device(self.device)
        progress = self.verbose if callable(self.verbose) else (print_progress() if self.verbose else None)
        runtime = None
        if self.runtime:
            from dxmi_ad.training.runtime import Runtime

            runtime = Runtime(**{**self.runtime, "checkpoint_dir": Path(self.runtime["checkpoint_dir"])
                                 if self.runtime.get("checkpoint_dir") else None})
        if X_val is None:
            self.config_ = self.config_.replace(validate_every=0)
        validate = self._validator(X_val, seed) if X_val is not None else None
        self.model_, self.history_ = train_model(data, self.config_, progress=progress, device=device,
                                                 runtime=runtime, validate=validate)
        self.model_.eval()
        self._read_selection()
        self.row_counts_ = {"fit": len(X), "validation": 0 if X_val is None else len(X_val),
                            "calibration": 0 if X_cal is None else len(X_cal)}
        keep = torch.randperm(len(data), generator=torch.Generator().manual_seed(self.config_.seed))[:_START_BANK]
        self.start_bank_ = data[keep].clone()
        all_energy = self._energy_rows(self._transform(X_all))  # validated arrays: no feature-name check again
        if not np.isfinite(all_energy).all():
            msg = "training diverged: non-finite energies on the training data; lower the learning rates"
            raise FloatingPointError(msg)
        cal_rows = X_cal if X_cal is not None else X_fit
        self._calibrate(self._energy_rows(self._transform(cal_rows)), source, all_energy)
        return self

    def _calibrate(self, cal_energy: np.ndarray | None, source: str, fit_energy: np.ndarray | None,
                   validation: tuple[np.ndarray, np.ndarray] | None = None, fpr: float | None = None,
                   fdr: float | None = None) -> None:
        """Set ``calibration_`` and ``offset_`` from calibration energies (see the class docstring)."""
        if fpr is None and fdr is None and validation is None:  # no new rule asked for: the estimator's own
            fpr, fdr = self.fpr, self.fdr
        cal = self._set_calibration(cal_energy, fpr, fdr, validation, source)
        explicit = fpr is not None or fdr is not None or validation is not None
        c = self._auto_contamination if self.contamination == "auto" else float(self.contamination)
        if not explicit and fit_energy is not None and c is not None:
            cal.threshold = float(np.quantile(fit_energy, 1.0 - c))
            cal.note = f"threshold: the {1 - c:g} quantile of the fit rows' energies (contamination {c:g})"
        self.calibration_ = cal
        self.offset_ = -float(cal.threshold)

    def calibrate(
        self,
        X: Any = None,
        fpr: float | None = None,
        fdr: float | None = None,
        X_validation: Any = None,
        y_validation: Any = None,
    ) -> DxMIDetector:
        """Re-calibrate the decision rule without retraining.

        Args:
            X: New normal calibration rows ``(n, n_features)`` (never the test set), or None to keep the stored
                calibration energies.
            fpr: Target false-positive rate in (0, 1). Default (no ``fpr``, ``fdr`` or validation set): the
                current rule and target are kept (as ``dxmi-ad calibrate`` does), so ``calibrate(X_new)`` only
                replaces the calibration rows; without a current fpr / fdr rule, the estimator's ``fpr``, else 0.01
                or the smallest rate the calibration set supports.
            fdr: Target false discovery rate in (0, 1): Benjamini-Hochberg per ``predict`` batch.
            X_validation: Labelled rows ``(m, n_features)`` for an F1-optimal threshold.
            y_validation: Their labels ``(m,)`` (1 = anomalous); without
                both classes a :class:`UserWarning` is issued and the target-FPR rule kept.

        Returns:
            self.

        Raises:
            NotFittedError: Before ``fit``.
            dxmi_ad.calibration.CalibrationError: A calibration set too small for the rate (minimum size stated).
            ValueError: ``fpr``/``fdr`` outside (0, 1) (checked first), bad rows (see :meth:`energy`), or ``fdr``
                together with a validation set.
        """
        check_is_fitted(self, "model_")
        check_rates(fpr, fdr)  # ranges before any scoring (fdr=0 used to divide by zero)
        energies, source = None, ""
        if X is not None:
            energies, source = self.energy(X), f"{len(np.asarray(X))} rows given to calibrate()"
        else:
            self._require_calibration("pass normal calibration rows, calibrate(X)")
        validation = None
        if X_validation is not None or y_validation is not None:
            if X_validation is None or y_validation is None:
                msg = "an F1 threshold needs both X_validation and y_validation"
                raise ValueError(msg)
            y = np.asarray(y_validation).astype(int).ravel()
            if len(y) != len(np.asarray(X_validation)) or not np.isin(y, (0, 1)).all():
                msg = "y_validation must hold one label in {0, 1} per row of X_validation"
                raise ValueError(msg)
            validation = (self.energy(X_validation), y)
        if fpr is None and fdr is None and validation is None:  # same rule and target, new rows
            fpr, fdr = kept_rule(getattr(self, "calibration_", None))
        self._calibrate(energies, source, None, validation, fpr, fdr)
        return self

    def p_value(self, X: Any) -> np.ndarray:
        """Split-conformal p-values against the held-out calibration energies.

        ``p = (1 + #{calibration energies >= E(x)}) / (n_cal + 1)``: small = anomalous; for normal rows
        exchangeable with the calibration set, ``P(p <= a) <= a``; never 0.

        Args:
            X: Data of shape ``(n_samples, n_features)``.

        Returns:
            float64 array of shape ``(n_samples,)`` in ``[1/(n_cal+1), 1]``.
        """
        check_is_fitted(self, "model_")
        self._require_calibration("call calibrate(X) with normal rows")
        return self.p_values_of(self.energy(X))

    # ------------------------------------------------------------------ scores
    def energy(self, X: Any) -> np.ndarray:
        """Energy E(x) of each row: the anomaly score (higher = more anomalous).

        Args:
            X: Data of shape ``(n_samples, n_features)``.

        Returns:
            float64 array of shape ``(n_samples,)`` (unitless energy; the model's q(x) ∝ exp(-E/tau)).

        Raises:
            NotFittedError: Before ``fit``.
            ValueError: On NaN/inf, wrong dimensionality or a feature count that differs from ``fit``.
        """
        return self._energy_rows(self._check(X))

    def _energy_rows(self, data: torch.Tensor) -> np.ndarray:
        """Energies ``(n,)`` float64 of already checked and transformed rows ``(n, D)`` (see :meth:`energy`)."""
        device = self.model_.velocity_scale_sq.device
        if device.type != "cpu":
            return self.model_.score(data.to(device)).cpu().numpy().astype(np.float64)
        # On the CPU, score with a float64 copy of the energy so that a row's score does not depend on which
        # other rows share its batch (float32 matrix products round differently with the batch size).
        scorer = getattr(self, "_scorer", None)
        if scorer is None or scorer[0] is not self.model_:
            self._scorer = scorer = (self.model_, copy.deepcopy(self.model_.energy).double().eval())
        with torch.no_grad():
            out = torch.cat([scorer[1](chunk) for chunk in data.double().split(65536)]) if len(data) else data[:0, 0]
        return out.numpy().astype(np.float64)

    def score_samples(self, X: Any) -> np.ndarray:
        """Opposite of the energy, scikit-learn convention: **the lower, the more abnormal**.

        Args:
            X: Data of shape ``(n_samples, n_features)``.

        Returns:
            Array of shape ``(n_samples,)`` equal to ``-energy(X)``.
        """
        return -self.energy(X)

    def decision_function(self, X: Any) -> np.ndarray:
        """``score_samples(X) - offset_``: negative values are outliers, positive are inliers.

        Under the ``fdr`` rule ``offset_`` is the target-FPR boundary (for reference): ``predict`` then decides per
        batch (Benjamini-Hochberg) and can differ from the sign of this function.

        Args:
            X: Data of shape ``(n_samples, n_features)``.

        Returns:
            Array of shape ``(n_samples,)``.
        """
        return self.score_samples(X) - self.offset_

    def predict(self, X: Any) -> np.ndarray:
        """+1 for inliers, -1 for outliers: ``energy > threshold_``, or Benjamini-Hochberg over the batch with ``fdr``.

        Args:
            X: Data of shape ``(n_samples, n_features)``.

        Returns:
            int array of shape ``(n_samples,)`` in {-1, +1}.
        """
        return np.where(self._flag(X), -1, 1)

    def _flag(self, X: Any) -> np.ndarray:
        check_is_fitted(self, "model_")
        self._require_calibration("call calibrate(X) with normal rows")
        return self.decide(self.energy(X))  # threshold_ == calibration_.threshold (offset_ is set from it)

    @property
    def threshold_(self) -> float:
        """Energy at the decision boundary (higher energies are outliers); ``-offset_``."""
        check_is_fitted(self, "offset_")
        return -self.offset_

    def sample(self, n_samples: int, random_state: int | None = None) -> np.ndarray:
        """Draw samples from the trained sampler (x_T), in the original feature units.

        Args:
            n_samples: Number of samples (>= 1).
            random_state: Seed of the draw (None: from ``random_state`` of the estimator, or fresh).

        Returns:
            float64 array of shape ``(n_samples, n_features)``.

        Raises:
            NotFittedError: Before ``fit``.
            ValueError: If ``n_samples < 1``.
        """
        check_is_fitted(self, "model_")
        if int(n_samples) < 1:
            msg = f"n_samples must be >= 1, got {n_samples}"
            raise ValueError(msg)
        seed = random_state if random_state is not None else self._seed()
        device = self.model_.velocity_scale_sq.device
        gen = torch.Generator(device=device).manual_seed(int(seed))
        data = None
        if self.model_.needs_start_data:  # the autoencoder and feature-noise starts perturb data rows
            idx = torch.randint(len(self.start_bank_), (int(n_samples),), generator=gen, device=device)
            data = self.start_bank_[idx.cpu()].to(device)
        x0 = self.model_.initial_states(int(n_samples), data, gen)
        xs = self.model_.sampler.sample(x0, gen)[-1].cpu().numpy().astype(np.float64)
        if not self.spherical and self.standardize:
            xs = xs * self.scale_ + self.mean_
        return xs

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike[str]) -> None:
        """Save the fitted detector to a folder (``model.safetensors`` + ``config.json``), atomically; no pickle.

        Args:
            path: Folder to write (created; existing files of the same names are replaced).

        Raises:
            NotFittedError: Before ``fit``.
        """
        check_is_fitted(self, "model_")
        params = {k: v for k, v in self.get_params().items() if k not in ("verbose", "random_state", "runtime")}
        tensors = {f"model.{k}": v for k, v in self.model_.checkpoint_tensors().items()}
        tensors.update({"scaler.mean": torch.from_numpy(self.mean_), "scaler.scale": torch.from_numpy(self.scale_),
                        "start_bank": self.start_bank_})
        if hasattr(self, "decision_scores_"):
            tensors["decision_scores"] = torch.from_numpy(np.asarray(self.decision_scores_, dtype=np.float64))
        meta = {"kind": type(self).__name__, "params": params, "config": self.config_.to_dict(),
                "n_features_in": int(self.n_features_in_), "history": self.history_[-1:]}
        if hasattr(self, "feature_names_in_"):  # fitted on a DataFrame: scoring checks the names (scikit-learn)
            meta["feature_names_in"] = [str(n) for n in self.feature_names_in_]
        save_model_dir(path, tensors, meta)
        self._save_calibration(path)

    @classmethod
    def load(cls, path: str | os.PathLike[str], device: str = "cpu") -> DxMIDetector:
        """Load a detector written by :meth:`save` (safetensors + JSON only: loading cannot run code).

        Args:
            path: The folder.
            device: Where to put the model.

        Returns:
            The fitted detector.

        Raises:
            FileNotFoundError: If the folder or its files are missing.
            ValueError: If the files do not describe a DxMIDetector or do not match its config.
        """
        tensors, meta = load_model_dir(path)
        if meta.get("kind") not in ("DxMIDetector", "PyODDxMIDetector"):
            msg = f"{Path(path)} does not hold a vector DxMIDetector (kind={meta.get('kind')!r})"
            raise ValueError(msg)
        try:
            det = cls(**{**meta["params"], "device": device})
            det._validate_params()
            det.config_ = DxMIConfig.from_dict(meta["config"])
            model = build_model(det.config_)
            model.load_checkpoint_tensors({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
            det.mean_ = tensors["scaler.mean"].numpy()
            det.scale_ = tensors["scaler.scale"].numpy()
            det.start_bank_ = tensors["start_bank"]
            if (Path(path) / CALIBRATION_FILE).is_file():
                det._load_calibration(path)
                det.offset_ = -float(det.calibration_.threshold)  # `dxmi-ad calibrate` may have changed it
            else:
                warnings.warn(f"{path} has no {CALIBRATION_FILE}: scores work, decisions need calibrate()",
                              UserWarning, stacklevel=caller_stacklevel())
                det.calibration_, det.offset_ = None, float("nan")
            det.n_features_in_ = int(meta["n_features_in"])
            names = meta.get("feature_names_in")
            if names is not None:
                if not isinstance(names, list) or len(names) != det.n_features_in_ or not all(
                        isinstance(n, str) for n in names):
                    msg = f"feature_names_in must be a list of {det.n_features_in_} strings"
                    raise ValueError(msg)
                det.feature_names_in_ = np.asarray(names, dtype=object)
        except (KeyError, TypeError, ValueError, InvalidParameterError) as err:
            msg = f"{Path(path)} holds an invalid or tampered model description: {err}"
            raise ValueError(msg) from err
        det.model_ = model.to(_resolve_device(device)).eval()
        det.history_ = meta.get("history", [])
        det._read_selection()
        if "decision_scores" in tensors:
            det.decision_scores_ = tensors["decision_scores"].numpy()
            if det.calibration_ is not None:
                det.labels_ = det.calibration_.decide(det.decision_scores_).astype(int)
        return det


class PyODDxMIDetector(DxMIDetector):
    """:class:`DxMIDetector` with pyod's conventions, for tools that expect a pyod ``BaseDetector``.

    * ``decision_function(X)`` = energy (higher = more anomalous);
    * ``predict(X)`` in {0 (inlier), 1 (outlier)}, ``energy > threshold_``;
    * after ``fit``: ``decision_scores_`` (training energies), ``threshold_`` (the ``1 - contamination`` percentile
      of them), ``labels_`` (training labels in {0, 1});
    * ``contamination="auto"`` (the default) means pyod's default 0.1; ``predict_proba`` is pyod's ``'linear'`` min-max of training
      scores (not calibrated); ``predict_confidence`` is pyod's ExCeeD confidence of each prediction.
    """

    _auto_contamination = 0.1  # contamination="auto" means pyod's default contamination of 0.1

    def fit(self, X: Any, y: Any = None) -> PyODDxMIDetector:
        """Train (see :meth:`DxMIDetector.fit`) and set ``decision_scores_``, ``threshold_``, ``labels_``."""
        super().fit(X, y)
        self.decision_scores_ = self.energy(X)
        self.labels_ = self.calibration_.decide(self.decision_scores_).astype(int)
        return self

    def decision_function(self, X: Any) -> np.ndarray:
        """Energy of each row, shape ``(n_samples,)``; higher = more anomalous (pyod convention)."""
        return self.energy(X)

    def predict(self, X: Any) -> np.ndarray:
        """0 = inlier, 1 = outlier (the stored rule: energy above ``threshold_``, or BH under ``fdr``), ``(n,)`` int."""
        return self._flag(X).astype(int)

    def calibrate(self, *args: Any, **kwargs: Any) -> PyODDxMIDetector:
        """As :meth:`DxMIDetector.calibrate`, then refresh ``labels_`` under the new rule."""
        super().calibrate(*args, **kwargs)
        if hasattr(self, "decision_scores_"):
            self.labels_ = self.calibration_.decide(self.decision_scores_).astype(int)
        return self

    def predict_confidence(self, X: Any) -> np.ndarray:
        """How consistently each prediction would be made under a slightly different training set, ``(n,)`` in [0, 1].

        pyod's ``predict_confidence`` (ExCeeD, Perini et al., ECML-PKDD 2020): with ``n`` training energies
        (``decision_scores_``), ``k`` of them at or below the row's energy and contamination ``c``, the outlier
        probability ``p = (1 + k) / (2 + n)`` gives ``conf = 1 - BinomCDF(n - floor(n c); n, p)`` for a row predicted
        anomalous and ``1 - conf`` for one predicted normal. The prediction is :meth:`predict` (the stored rule).

        Args:
            X: Data of shape ``(n_samples, n_features)``.

        Returns:
            float64 array of shape ``(n_samples,)`` in [0, 1].

        Raises:
            NotFittedError: Before ``fit``.
        """
        from scipy.stats import binom

        check_is_fitted(self, "decision_scores_")
        train = np.sort(np.asarray(self.decision_scores_, dtype=np.float64))
        n = len(train)
        energy = self.energy(X)
        k = np.searchsorted(train, energy, side="right")  # training energies <= each row's
        c = self._auto_contamination if self.contamination == "auto" else float(self.contamination)
        confidence = 1.0 - binom.cdf(n - int(n * c), n, (1.0 + k) / (2.0 + n))
        flagged = self.decide(energy)
        return np.where(flagged, confidence, 1.0 - confidence)

    def predict_proba(self, X: Any) -> np.ndarray:
        """``[P(inlier), P(outlier)]`` by min-max scaling of training energies (pyod ``'linear'``), ``(n, 2)``."""
        check_is_fitted(self, "decision_scores_")
        lo, hi = float(self.decision_scores_.min()), float(self.decision_scores_.max())
        p = np.clip((self.energy(X) - lo) / max(hi - lo, 1e-12), 0, 1)
        return np.stack([1 - p, p], axis=1)
