"""The decision layer every detector shares: hold-out, rate checks, calibration, threshold, p-values, saving the rule.

:class:`DxMIDetector` (vectors), :class:`~dxmi_ad.image.ImageDetector` and :class:`~dxmi_ad.pixel.PixelDetector`
differ in what they score (rows, images through a backbone, raw pixels); what they decide with those scores is the
same, and lives here once (pyod's ``BaseDetector`` habit):

* a seeded hold-out of normal training data as the calibration set (:func:`holdout_split`, one fraction range);
* rate checks before any work (:func:`check_rates`) and the minimum calibration size for a rate, refused before
  training (:func:`refuse_unsupported_rates`);
* the :class:`~dxmi_ad.calibration.Calibration` (split-conformal threshold, p-values, Benjamini-Hochberg), stored in
  the fitted attribute ``calibration_`` and saved beside the weights as ``calibration.json``;
* one error for "not calibrated" (:class:`NotCalibratedError`) and one meaning of ``threshold``: the fixed energy
  above which a sample is anomalous, or None when no fixed threshold decides (no rule, or the FDR rule, where the
  decision depends on the batch).

Examples:
    >>> import numpy as np
    >>> fit_rows, cal_rows = holdout_split(10, 0.2, seed=0)
    >>> len(fit_rows), len(cal_rows)
    (8, 2)
    >>> holdout_split(3, 0.5, seed=0)[1].size  # at least 2 rows stay for training
    1
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

from dxmi_ad._warn import caller_stacklevel
from dxmi_ad.calibration import (
    CALIBRATION_FILE,
    DEFAULT_FPR,
    Calibration,
    CalibrationError,
    check_rate,
    min_calibration_size,
    resolve_fpr,
)

__all__ = ["MAX_CALIBRATION_FRACTION", "BatchFDRWarning", "CalibratedDetector", "CoarseRateWarning", "NotCalibratedError",
           "check_calibration_fraction", "check_rates", "holdout_split", "kept_rule", "refuse_unsupported_rates"]

MAX_CALIBRATION_FRACTION = 0.9
"""Largest share of the normal training data that may be held out for calibration (the rest trains)."""
#: ``calibrate(fpr=a)`` warns when the calibration set resolves ``a`` to an expected false-positive rate below this
#: fraction of it (p-values move in steps of ``1/(n+1)``: e.g. ``fpr=0.05`` with 30 samples gives ``1/31 = 0.032``).
COARSE_FPR_RATIO = 0.8


class CoarseRateWarning(UserWarning):
    """``calibrate(fpr=a)``: the calibration set resolves ``a`` only coarsely (see :meth:`Calibration.support`).

    The command line prints the support lines itself and does not repeat this warning.
    """


class BatchFDRWarning(UserWarning):
    """Under the ``"fdr"`` rule Benjamini-Hochberg flagged nothing in a batch although some of its items scored above
    every calibration score: with ``n`` calibration scores the smallest p-value is ``1/(n+1)``, and one item can be
    flagged alone only in batches of at most ``fdr * (n + 1)`` items (see :meth:`Calibration.support`).
    """


def warn_if_fdr_flags_nothing(calibration: Calibration, scores: np.ndarray, flagged: np.ndarray) -> None:
    """Issue a :class:`BatchFDRWarning` when the ``"fdr"`` rule flagged none of ``scores`` ``(m,)`` although some
    lie above every calibration score (the batch is too large for the calibration set to flag them).

    Args:
        calibration: The rule (nothing happens unless ``calibration.rule == "fdr"``).
        scores: The batch's scores ``(m,)``, NaN allowed.
        flagged: The decisions ``(m,)`` bool of that batch.
    """
    if calibration.rule != "fdr" or flagged.any():
        return
    s = np.asarray(scores, dtype=np.float64)
    above = int(np.sum(s > calibration.scores.max()))  # NaN compares False
    if not above:
        return
    n, q, m = len(calibration.scores), float(calibration.fdr), int((~np.isnan(s)).sum())
    warnings.warn(f"Benjamini-Hochberg (fdr={q:g}) flagged none of the {m} items although {above} scored above every "
                  f"one of the {n} calibration scores: their p-value 1/{n + 1} is too large for a batch of {m} (one "
                  f"item can be flagged alone only in batches of at most {int(q * (n + 1) + 1e-9)}); use at least "
                  f"{int(np.ceil(m / q - 1 - 1e-9))} calibration samples, smaller batches, or the fpr rule",
                  BatchFDRWarning, stacklevel=caller_stacklevel())


def kept_rule(calibration: Calibration | None) -> tuple[float | None, float | None]:
    """``(fpr, fdr)`` to pass when new calibration data comes without a rate: the current rule's target.

    A target the current set only fell back to (the default rate it could not support, ``1/(n+1)``, see
    :func:`~dxmi_ad.calibration.resolve_fpr`) is not kept: ``(None, None)`` lets the new set resolve the default
    again. ``(None, None)`` too without a calibration, or under the ``"f1"`` rule.

    Args:
        calibration: The detector's current calibration, or None.

    Returns:
        ``(fpr, None)`` under ``"fpr"``, ``(None, fdr)`` under ``"fdr"``, else ``(None, None)``.
    """
    if calibration is None or calibration.rule not in ("fpr", "fdr"):
        return None, None
    if calibration.rule == "fdr":
        return None, calibration.fdr
    fallback = resolve_fpr(None, len(calibration.scores), warn=False)
    if calibration.fpr != DEFAULT_FPR and abs(calibration.fpr - fallback) < 1e-12:
        return None, None  # the smallest rate the old set supported, not a target anyone chose
    return calibration.fpr, None


class NotCalibratedError(RuntimeError, ValueError):
    """A decision, p-value or re-calibration was asked of a detector that has no calibration.

    A ``RuntimeError`` (the state of the object is wrong) and a ``ValueError`` (scikit-learn's ``NotFittedError``
    habit), so callers written against either keep working.
    """


def check_rates(fpr: Any = None, fdr: Any = None) -> None:
    """Check ``fpr`` / ``fdr`` (each None or strictly in (0, 1)) before any work is done.

    Raises:
        ValueError: A rate outside (0, 1), or not a number (the message names the option); both given (one
            decision rule at a time, as the command line's ``--fpr`` / ``--fdr``).
    """
    for name, value in (("fpr", fpr), ("fdr", fdr)):
        if value is not None:
            check_rate(name, value)
    if fpr is not None and fdr is not None:
        msg = (f"choose one decision rule: fpr={fpr:g} (a fixed threshold) or fdr={fdr:g} (Benjamini-Hochberg per "
               "scored batch), not both")
        raise ValueError(msg)


def check_calibration_fraction(fraction: Any) -> float:
    """Check a calibration fraction: a number in ``[0, MAX_CALIBRATION_FRACTION]``.

    Raises:
        ValueError: Anything else (the message gives the range).
    """
    ok = not isinstance(fraction, (bool, np.bool_)) and isinstance(fraction, (int, float, np.integer, np.floating))
    if not ok or not 0.0 <= float(fraction) <= MAX_CALIBRATION_FRACTION:
        msg = f"the calibration fraction must be a number in [0, {MAX_CALIBRATION_FRACTION}], got {fraction!r}"
        raise ValueError(msg)
    return float(fraction)


def holdout_split(n: int, fraction: float, seed: int, keep: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of ``n`` normal training items into training and calibration indices.

    The calibration set is ``floor(fraction * n)`` items drawn with ``numpy.random.default_rng(seed)``; when fewer
    than ``keep`` items would remain for training, nothing is held out (the training data then calibrate and
    p-values run optimistic: the caller says so in the calibration's ``source``).

    Args:
        n: Number of items (rows, images, feature maps), >= 0.
        fraction: Share held out, in ``[0, MAX_CALIBRATION_FRACTION]``.
        seed: Seed of the draw.
        keep: Fewest items that must stay for training.

    Returns:
        ``(fit, calibration)``: sorted int64 index arrays, disjoint, together ``range(n)``.

    Raises:
        ValueError: A fraction outside its range (:func:`check_calibration_fraction`).
    """
    n_cal = int(check_calibration_fraction(fraction) * n)
    if n_cal < 1 or n - n_cal < keep:
        return np.arange(n), np.arange(0)
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[n_cal:]), np.sort(order[:n_cal])


def refuse_unsupported_rates(fpr: float | None, fdr: float | None, n_calibration: int, unit: str = "samples",
                             remedy: str = "raise the calibration fraction, add data, or ask for a larger rate") -> None:
    """Refuse, before training, a target rate that ``n_calibration`` calibration items cannot support.

    A rate ``a`` needs at least ``ceil(1/a - 1)`` calibration items (the smallest conformal p-value is
    ``1/(n+1)``; see :func:`~dxmi_ad.calibration.min_calibration_size`).

    Raises:
        dxmi_ad.calibration.CalibrationError: The rate and the minimum size, in the caller's ``unit``.
    """
    for rate in (fpr, fdr):
        if rate is not None and n_calibration < min_calibration_size(rate):
            msg = (f"a target rate of {rate:g} needs at least {min_calibration_size(rate)} calibration {unit}, "
                   f"got {n_calibration}: {remedy}")
            raise CalibrationError(msg)


class CalibratedDetector:
    """Mixin: the calibration-based decision rule of a detector (see the module docstring).

    A subclass sets ``calibration_`` through :meth:`_set_calibration` and scores with its own ``energy`` /
    ``predict``; decisions, p-values, the threshold and saving the rule come from here.

    Attributes:
        calibration_: The :class:`~dxmi_ad.calibration.Calibration` (held-out normal scores and the rule), or None.
    """

    calibration_: Calibration | None = None

    # ------------------------------------------------------------------ setting the rule
    def _set_calibration(
        self,
        scores: np.ndarray | None,
        fpr: float | None = None,
        fdr: float | None = None,
        validation: tuple[np.ndarray, np.ndarray] | None = None,
        source: str = "",
        files: list[str] | None = None,
    ) -> Calibration:
        """Build and store the rule from calibration ``scores`` ``(n,)`` (energy units), or, with ``scores`` None,
        from the stored calibration scores (keeping the stored target FPR unless a new rule is asked for).

        Args:
            scores: Held-out normal scores ``(n,)``, finite; or None to re-calibrate the stored ones.
            fpr: Target false-positive rate in (0, 1); default 0.01, or the smallest the set supports (warned).
            fdr: Target false discovery rate in (0, 1): Benjamini-Hochberg per scored batch.
            validation: ``(scores (m,), labels (m,))`` for the F1-optimal threshold.
            source: Where the scores came from (stored in the calibration).
            files: The calibration files in the order of ``scores`` (image models), or None.

        Returns:
            The new calibration (also in ``calibration_``).

        Raises:
            NotCalibratedError: ``scores`` None and nothing stored.
            dxmi_ad.calibration.CalibrationError: A set too small for the rate, empty, or non-finite scores.
            ValueError: Rates outside (0, 1).

        Warns:
            CoarseRateWarning: An ``fpr`` asked for that the set resolves to an expected false-positive rate below
                :data:`COARSE_FPR_RATIO` times it (the numbers are given).
        """
        check_rates(fpr, fdr)
        asked_fpr = fpr if fdr is None and validation is None else None
        if scores is None:
            stored = self._require_calibration("pass normal calibration data to calibrate()")
            scores, files, source = stored.scores, stored.files, source or stored.source
            if fpr is None and fdr is None and validation is None:
                fpr = stored.fpr  # re-calibrating the same scores keeps the stored target rate
        order = np.argsort(np.asarray(scores, dtype=np.float64), kind="stable")
        cal = Calibration.fit(scores, fpr=resolve_fpr(fpr, len(order), warn=fdr is None and validation is None),
                              fdr=fdr, validation=validation, source=source)
        cal.files = [files[i] for i in order] if files else []
        self.calibration_ = cal
        if asked_fpr is not None and cal.rule == "fpr" and cal.expected_fpr() < COARSE_FPR_RATIO * asked_fpr:
            n = len(cal.scores)
            warnings.warn(f"fpr={asked_fpr:g} is not resolvable with {n} calibration samples (p-values move in "
                          f"steps of 1/{n + 1}): the threshold gives an expected false-positive rate of "
                          f"{cal.expected_fpr():.3g}; calibration_.support() says what this set supports, and more "
                          "normal calibration data gives a finer rate", CoarseRateWarning, stacklevel=caller_stacklevel())
        return cal

    def _require_calibration(self, remedy: str = "call fit() or calibrate()") -> Calibration:
        """The stored calibration.

        Raises:
            NotCalibratedError: None stored (the message says what to do).
        """
        if getattr(self, "calibration_", None) is None:
            msg = f"this detector has no calibration (no decision rule): {remedy}"
            raise NotCalibratedError(msg)
        return self.calibration_

    # ------------------------------------------------------------------ using the rule
    @property
    def threshold(self) -> float | None:
        """The energy above which a sample is anomalous (``pred_score > threshold``), or None when no fixed threshold
        decides: not calibrated, or the FDR rule (decisions depend on the batch).
        """
        cal = getattr(self, "calibration_", None)
        return None if cal is None else cal.decision_threshold

    def p_values_of(self, scores: np.ndarray) -> np.ndarray:
        """Split-conformal p-values ``(m,)`` in ``[1/(n+1), 1]`` of scores ``(m,)`` (small = anomalous).

        Raises:
            NotCalibratedError: Before calibration.
        """
        return self._require_calibration().p_values(np.asarray(scores, dtype=np.float64))

    def decide(self, scores: np.ndarray) -> np.ndarray:
        """Decisions ``(m,)`` bool (True = anomalous) of scores ``(m,)`` under the stored rule; NaN never flagged.

        Under the ``"fdr"`` rule a :class:`BatchFDRWarning` says when nothing was flagged although some scores lie
        above every calibration score (the batch is too large for the calibration set).

        Raises:
            NotCalibratedError: Before calibration.
        """
        cal = self._require_calibration()
        s = np.asarray(scores, dtype=np.float64)
        flagged = cal.decide(s)
        warn_if_fdr_flags_nothing(cal, s, flagged)
        return flagged

    def decisions(self, scores: np.ndarray) -> dict[str, np.ndarray]:
        """``pred_label`` (bool, True = anomalous), ``p_value`` and ``normalized_score`` (in [0, 1], threshold at
        0.5; NaN under the FDR rule) of scores ``(m,)``, or ``{}`` when not calibrated (no rule: no decisions).
        """
        cal = getattr(self, "calibration_", None)
        if cal is None:
            return {}
        s = np.asarray(scores, dtype=np.float64)
        flagged = cal.decide(s)
        warn_if_fdr_flags_nothing(cal, s, flagged)
        return {"pred_label": flagged, "p_value": cal.p_values(s),
                "normalized_score": cal.normalized(s)}

    # ------------------------------------------------------------------ persistence
    def _save_calibration(self, directory: str | Path) -> None:
        """Write ``calibration.json`` beside the weights, or remove a stale one when there is no rule."""
        cal = getattr(self, "calibration_", None)
        if cal is not None:
            cal.save(directory)
        else:
            (Path(directory) / CALIBRATION_FILE).unlink(missing_ok=True)  # never a stale rule beside new weights

    def _load_calibration(self, directory: str | Path, warn: bool = True) -> Calibration | None:
        """Read ``calibration.json`` into ``calibration_`` (None, warned unless ``warn`` is False, when absent).

        Raises:
            ValueError: A malformed file (the file and field are named).
        """
        self.calibration_ = Calibration.load_if_present(directory, warn=warn)
        return self.calibration_
