"""Calibrated decisions from anomaly scores: target false-positive rate, conformal p-values, FDR control, F1.

Every rule works on raw anomaly scores (energies, higher = more anomalous) of a **calibration set of normal data
held out from training and never the test set** (anomalib / pyod conventions):

* **target FPR** ``alpha``: threshold = the ``k``-th smallest calibration score with ``k = ceil((n + 1)(1 - alpha))``
  (split-conformal quantile); a new normal sample exchangeable with the calibration set is flagged with probability
  at most ``alpha``. Needs ``n >= ceil(1 / alpha - 1)``.
* **split-conformal p-value**: ``p(x) = (1 + #{calibration scores >= s(x)}) / (n + 1)`` in ``[1/(n+1), 1]``, never 0;
  for normal data ``P(p <= a) <= a``. Flagging ``p <= alpha`` is the same decision as the target-FPR threshold.
* **false discovery rate** ``q``: Benjamini-Hochberg over a batch of p-values (:func:`scipy.stats.false_discovery_control`).
* **F1-optimal** threshold from a labelled validation set (:func:`sklearn.metrics.precision_recall_curve`); refused,
  with a warning and the target-FPR rule kept, when the validation set lacks normals or anomalies (anomalib
  anomalib / pyod conventions: never silently flag everything).
* **normalized score** in ``[0, 1]`` with the decision threshold at 0.5, anomalib's min-max convention:
  ``clip((s - threshold) / (max - min) + 0.5, 0, 1)`` with min/max of the calibration scores.

Only the glue is ours: the statistics come from scipy and scikit-learn.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dxmi_ad._warn import caller_stacklevel

__all__ = ["DEFAULT_FPR", "Calibration", "CalibrationError", "bh_reject", "calibration_check", "check_rate",
           "conformal_p_values",
           "decision_summary",
           "conformal_threshold", "min_calibration_size", "resolve_fpr", "summarize_checks"]

RULES = ("fpr", "fdr", "f1")
CALIBRATION_FILE = "calibration.json"


class CalibrationError(ValueError):
    """A calibration set that cannot support the requested rule (too small, empty, non-finite scores)."""


def check_rate(name: str, value: Any) -> float:
    """Validate a target rate before any work: ``fpr`` / ``fdr`` must be a number in the open interval (0, 1).

    (``fdr = 1`` is refused too: Benjamini-Hochberg at q = 1 flags every file, since every p-value is <= 1.)

    Args:
        name: ``"fpr"`` or ``"fdr"`` (named in the message).
        value: The rate.

    Returns:
        The rate as a float.

    Raises:
        ValueError: Not a number, NaN, or outside (0, 1).
    """
    what = {"fpr": "target false-positive rate", "fdr": "target false discovery rate"}.get(name, "rate")
    ok = not isinstance(value, (bool, np.bool_)) and isinstance(value, (int, float, np.integer, np.floating))
    if not ok or not 0.0 < float(value) < 1.0:
        msg = f"{name}={value!r}: the {what} must be a number strictly between 0 and 1 (e.g. {name}=0.05)"
        raise ValueError(msg)
    return float(value)


def min_calibration_size(alpha: float) -> int:
    """Smallest calibration set for which a target rate ``alpha`` in (0, 1) can be met: ``ceil(1/alpha - 1)``.

    Raises:
        ValueError: ``alpha`` outside (0, 1) (see :func:`check_rate`).
    """
    alpha = check_rate("alpha", alpha) if not 0.0 < alpha < 1.0 else float(alpha)
    return max(1, math.ceil(1.0 / alpha - 1.0 - 1e-9))


DEFAULT_FPR = 0.01


def resolve_fpr(requested: float | None, n_calibration: int, default: float = DEFAULT_FPR, warn: bool = True) -> float:
    """The target false-positive rate to use: ``requested`` as given, or ``default`` when the calibration set can
    support it, else the smallest rate it supports (``1 / (n + 1)``) with a :class:`UserWarning`.

    Args:
        requested: The user's rate, or None for the default.
        n_calibration: Calibration set size (>= 1).
        default: The default rate.
        warn: Warn when the default cannot be met (False when the rate is only reported, e.g. under an FDR rule).

    Returns:
        The rate in (0, 1). A requested rate is returned unchanged (too-small sets are refused later, with the
        minimum size stated).
    """
    if requested is not None:
        return float(requested)
    if n_calibration >= min_calibration_size(default):
        return default
    rate = 1.0 / (n_calibration + 1)
    if warn:
        warnings.warn(f"{n_calibration} calibration samples cannot support the default target false-positive rate "
                      f"{default:g} (needs {min_calibration_size(default)}); using {rate:.3g}", UserWarning,
                      stacklevel=caller_stacklevel())
    return rate


def _check_scores(scores: np.ndarray, what: str) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64).ravel()
    if not len(s):
        msg = f"{what} is empty"
        raise CalibrationError(msg)
    bad = np.flatnonzero(~np.isfinite(s))
    if len(bad):
        msg = f"{what} has {len(bad)} non-finite score(s) (first at index {bad[0]})"
        raise CalibrationError(msg)
    return s


def conformal_threshold(calibration_scores: np.ndarray, alpha: float) -> float:
    """Split-conformal threshold for a target false-positive rate.

    Args:
        calibration_scores: ``(n,)`` scores of held-out normal samples (higher = more anomalous).
        alpha: Target false-positive rate in (0, 1).

    Returns:
        The threshold ``t`` (score units): flag ``s > t``. For a new normal sample exchangeable with the calibration
        set, ``P(s > t) <= alpha`` (equality in expectation when ``(n + 1) alpha`` is an integer and scores are
        continuous). ``t`` is the ``k``-th smallest calibration score, ``k = ceil((n + 1)(1 - alpha))``, plus a relative
        1e-9 (so that rounding in a re-computed calibration score does not flip its decision).

    Raises:
        CalibrationError: If ``n < ceil(1/alpha - 1)`` (the minimum is stated), or the scores are empty/non-finite.
        ValueError: If ``alpha`` is not in (0, 1).
    """
    if not 0.0 < alpha < 1.0:
        msg = f"the target false-positive rate must be in (0, 1), got {alpha}"
        raise ValueError(msg)
    s = np.sort(_check_scores(calibration_scores, "the calibration set"))
    n = len(s)
    need = min_calibration_size(alpha)
    if n < need:
        msg = (f"a target rate of {alpha:g} needs at least {need} calibration samples, got {n}: add held-out "
               f"normal data (Python: calibration_fraction, or calibrate(X) with more normal rows / images; command "
               f"line: train --calibration-fraction or --calibration-dir, calibrate --calibration-dir for images, "
               f"--calibration-csv for tables) or ask for a larger rate")
        raise CalibrationError(msg)
    k = min(math.ceil((n + 1) * (1.0 - alpha) - 1e-9), n)
    # s_(k) plus a relative 1e-9: a re-computed calibration score (last-bit rounding) keeps its own decision
    return float(s[k - 1] + 1e-9 * max(1.0, abs(s[k - 1])))


def conformal_p_values(calibration_scores: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Split-conformal p-values ``(1 + #{cal >= s}) / (n + 1)``.

    Args:
        calibration_scores: ``(n,)`` held-out normal scores.
        scores: ``(m,)`` scores to test (NaN gives NaN).

    Returns:
        ``(m,)`` float64 p-values in ``[1/(n+1), 1]`` (never 0).
    """
    cal = np.sort(_check_scores(calibration_scores, "the calibration set"))
    s = np.asarray(scores, dtype=np.float64)
    n_ge = len(cal) - np.searchsorted(cal, s, side="left")
    p = (1.0 + n_ge) / (len(cal) + 1.0)
    return np.where(np.isnan(s), np.nan, p)


def bh_reject(p_values: np.ndarray, q: float) -> np.ndarray:
    """Benjamini-Hochberg decisions at false discovery rate ``q`` (NaN p-values are never rejected).

    Args:
        p_values: ``(m,)`` p-values.
        q: Target FDR in (0, 1).

    Returns:
        ``(m,)`` bool, True = discovery (flagged anomalous).
    """
    from scipy.stats import false_discovery_control

    if not 0.0 < q < 1.0:
        msg = f"the target false discovery rate must be in (0, 1), got {q}"
        raise ValueError(msg)
    p = np.asarray(p_values, dtype=np.float64)
    out = np.zeros(p.shape, bool)
    ok = np.isfinite(p)
    if ok.any():
        out[ok] = false_discovery_control(p[ok], method="bh") <= q
    return out


def _f1_threshold(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    from sklearn.metrics import precision_recall_curve

    precision, recall, thr = precision_recall_curve(labels, scores)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(precision),
                   where=(precision + recall) > 0)[:-1]
    best = int(np.argmax(f1))
    # sklearn flags s >= thr; our rule is s > threshold: step just below the chosen score
    return float(np.nextafter(thr[best], -np.inf)), float(f1[best])


@dataclass
class Calibration:
    """Calibration scores and the decision rule a model uses (stored in ``calibration.json`` of a run).

    Attributes:
        scores: ``(n,)`` sorted float64 anomaly scores of the held-out normal calibration set.
        rule: ``"fpr"`` (threshold at a target false-positive rate), ``"fdr"`` (Benjamini-Hochberg over each scored
            batch) or ``"f1"`` (F1-optimal threshold on a labelled validation set).
        fpr: Target false-positive rate of the ``"fpr"`` rule (and of the reported threshold under ``"fdr"``).
        fdr: Target false discovery rate of the ``"fdr"`` rule.
        threshold: Decision threshold in score units (``s > threshold`` is anomalous) of the ``"fpr"``/``"f1"``
            rules; under ``"fdr"`` the target-FPR threshold, reported for reference.
        source: Where the calibration scores came from (e.g. ``"20% of training normals (seed 0)"``, a folder).
        validation: Summary of the validation set used by ``"f1"`` (counts, F1), or empty.
        note: How the threshold was set when a caller replaced it (e.g. a contamination quantile), or empty.
        files: The calibration files (image models), in the order of ``scores``.
    """

    scores: np.ndarray
    rule: str = "fpr"
    fpr: float = 0.01
    fdr: float | None = None
    threshold: float = float("nan")
    source: str = ""
    validation: dict[str, Any] = field(default_factory=dict)
    note: str = ""
    files: list[str] = field(default_factory=list)

    @classmethod
    def fit(
        cls,
        scores: np.ndarray,
        fpr: float = 0.01,
        fdr: float | None = None,
        validation: tuple[np.ndarray, np.ndarray] | None = None,
        source: str = "",
    ) -> Calibration:
        """Build the rule from calibration scores.

        Args:
            scores: ``(n,)`` held-out normal scores.
            fpr: Target false-positive rate in (0, 1) (``"fpr"`` rule, the default).
            fdr: Target FDR in (0, 1): selects the ``"fdr"`` rule.
            validation: ``(scores (m,), labels (m,) in {0, 1})``: selects the ``"f1"`` rule when both classes are
                present (otherwise a :class:`UserWarning` and the ``"fpr"`` rule).
            source: Description of the calibration data.

        Returns:
            The calibration.

        Raises:
            CalibrationError: A calibration set too small for ``fpr``/``fdr`` (the minimum size is stated), or empty.
            ValueError: ``fpr``/``fdr`` outside (0, 1), or both ``fdr`` and ``validation``.
        """
        fpr = check_rate("fpr", fpr)  # ranges first: fdr=0 must not reach a division
        if fdr is not None:
            fdr = check_rate("fdr", fdr)
        s = np.sort(_check_scores(scores, "the calibration set"))
        if fdr is not None and validation is not None:
            msg = "choose one rule: a target FDR or an F1-optimal threshold from a validation set, not both"
            raise ValueError(msg)
        rule, info = "fpr", {}
        if fdr is None and validation is None:
            threshold = conformal_threshold(s, fpr)
        else:  # reported for reference only; not needed by the fdr / f1 rules
            threshold = conformal_threshold(s, fpr) if len(s) >= min_calibration_size(fpr) else float("nan")
        if fdr is not None:
            if len(s) < min_calibration_size(fdr):
                msg = (f"a target FDR of {fdr:g} needs at least {min_calibration_size(fdr)} calibration samples "
                       f"(the smallest p-value is 1/(n+1)), got {len(s)}")
                raise CalibrationError(msg)
            bh_reject(np.ones(1), fdr)  # validates q
            rule = "fdr"
        if validation is not None:
            vs = _check_scores(validation[0], "the validation set")
            vl = np.asarray(validation[1]).astype(int).ravel()
            n_anom, n_norm = int(vl.sum()), int((vl == 0).sum())
            info = {"n_normal": n_norm, "n_anomalous": n_anom}
            if n_anom == 0 or n_norm == 0:
                missing = "anomalies" if n_anom == 0 else "normal samples"
                warnings.warn(f"the validation set has no {missing}: an F1-optimal threshold is undefined; keeping "
                              f"the target false-positive-rate threshold (fpr={fpr:g})", UserWarning, stacklevel=caller_stacklevel())
                info["note"] = f"F1 rule refused: no {missing}"
                threshold = conformal_threshold(s, fpr)
            else:
                threshold, best = _f1_threshold(vs, vl)
                rule = "f1"
                info["f1"] = best
        return cls(scores=s, rule=rule, fpr=float(fpr), fdr=None if fdr is None else float(fdr),
                   threshold=float(threshold), source=source, validation=info)

    # ------------------------------------------------------------------ decisions
    def p_values(self, scores: np.ndarray) -> np.ndarray:
        """Conformal p-values ``(m,)`` of scores ``(m,)`` (see :func:`conformal_p_values`)."""
        return conformal_p_values(self.scores, scores)

    def decide(self, scores: np.ndarray) -> np.ndarray:
        """Decisions ``(m,)`` bool (True = anomalous) for a batch of scores ``(m,)`` under the stored rule.

        Under ``"fdr"`` the decision of a sample depends on the batch it is scored with (Benjamini-Hochberg).
        NaN scores are never flagged.
        """
        s = np.asarray(scores, dtype=np.float64)
        if self.rule == "fdr":
            return bh_reject(self.p_values(s), float(self.fdr))
        with np.errstate(invalid="ignore"):
            return s > self.threshold

    def normalized(self, scores: np.ndarray) -> np.ndarray:
        """Scores mapped to ``[0, 1]`` with the threshold at 0.5 (anomalib's min-max convention), ``(m,)``.

        NaN under the ``"fdr"`` rule: decisions there depend on the batch, no fixed threshold maps to 0.5.
        """
        s = np.asarray(scores, dtype=np.float64)
        if self.rule == "fdr":
            return np.full(s.shape, np.nan)
        span = max(float(self.scores[-1] - self.scores[0]), 1e-12)
        return np.clip((s - self.threshold) / span + 0.5, 0.0, 1.0)

    @property
    def decision_threshold(self) -> float | None:
        """The fixed threshold that decides (``"fpr"``/``"f1"``), or None under ``"fdr"`` (batch-dependent)."""
        return None if self.rule == "fdr" or not np.isfinite(self.threshold) else float(self.threshold)

    def describe(self) -> str:
        """One line: the rule, its target, its threshold (none under ``"fdr"``: decisions depend on the batch) and
        the calibration size.
        """
        if self.rule == "fdr":
            target = f"target FDR {self.fdr:g} (Benjamini-Hochberg per scored batch); no fixed threshold"
        elif self.rule == "f1":
            target = (f"F1-optimal on the validation set (F1 {self.validation.get('f1', float('nan')):.3f}); "
                      f"threshold {self.threshold:.6g}")
        else:
            target = f"target FPR {self.fpr:g}; threshold {self.threshold:.6g}"
        return (f"{target}; {len(self.scores)} calibration samples"
                + (f" ({self.source})" if self.source else "") + (f"; {self.note}" if self.note else ""))

    def support(self) -> list[str]:
        """What this calibration set can and cannot support under the stored rule, in numbers.

        With ``n`` calibration scores, p-values move in steps of ``1/(n+1)`` and the smallest is ``1/(n+1)``:

        * ``"fpr"``: the threshold is the ``k``-th smallest score, ``k = ceil((n+1)(1-fpr))``; every target in
          ``[(n+1-k)/(n+1), (n+2-k)/(n+1))`` gives the same threshold, and the expected FPR on new normal data is
          ``(n+1-k)/(n+1)``.
        * ``"fdr"``: Benjamini-Hochberg flags ``k`` of ``m`` items (files or rows) only if ``p_(k) <= q k / m``; as
          no p-value is below ``1/(n+1)``, a batch of ``m`` items flags nothing unless at least ``ceil(m / (q (n+1)))``
          items are flagged together (an item can be flagged alone only in batches of ``m <= q (n+1)``).
        * ``"f1"``: the p-value floor only.

        Returns:
            One or more sentences (plain text, no trailing newline each).
        """
        n = len(self.scores)
        step = 1.0 / (n + 1)
        head = f"{n} calibration scores: p-values move in steps of 1/{n + 1} = {step:.3g} (the smallest p-value)"
        if self.rule == "fdr":
            q = float(self.fdr)
            per = q * (n + 1)
            alone = math.floor(per + 1e-9)
            examples = ", ".join(f"{math.ceil(m / per - 1e-9)} of {m}" for m in (10, 100, 1000))
            return [head + ".",
                    f"fdr={q:g}: Benjamini-Hochberg flags k of the m items (files or rows) in one batch only if "
                    f"{step:.3g} <= {q:g}*k/m, i.e. k >= m/{per:.3g}: an item can be flagged alone only in batches "
                    f"of at most {alone}; otherwise at least {examples} items must stand out together, "
                    "or nothing is flagged.",
                    f"to let one item in a batch of m be flagged alone, use at least m/{q:g} - 1 calibration "
                    f"samples (m = 100: {math.ceil(100 / q - 1 - 1e-9)}).",
                    "there is no fixed threshold: an item's decision depends on the other items in its batch."]
        if self.rule == "f1":
            return [head + "; the threshold comes from the validation set (F1), not from this set."]
        k = min(math.ceil((n + 1) * (1.0 - self.fpr) - 1e-9), n)
        lo, hi = (n + 1 - k) / (n + 1), (n + 2 - k) / (n + 1)
        which = "the maximum" if k == n else f"rank {k} of the {n} (ascending)"
        lines = [head + ".",
                 f"fpr={self.fpr:g} sets the threshold at {which} calibration score{'s' if k != n else ''}, as does "
                 f"every target in [{n + 1 - k}/{n + 1}, {n + 2 - k}/{n + 1}) = [{lo:.3g}, {hi:.3g}); expected "
                 f"false-positive rate on new normal data {n + 1 - k}/{n + 1} = {lo:.3g}."]
        if k == n:
            lines.append(f"no smaller rate is resolvable: a target below 1/{n + 1} = {step:.3g} is refused (fpr=a "
                         f"needs at least ceil(1/a - 1) calibration samples: fpr=0.01 needs "
                         f"{min_calibration_size(0.01)}).")
        return lines

    def expected_fpr(self) -> float:
        """The false-positive rate the stored threshold gives on new normal data exchangeable with the calibration
        set, ``(1 + #{calibration scores > threshold}) / (n + 1)``.

        For the conformal threshold of the ``"fpr"`` rule (the ``k``-th smallest score) this is
        ``(n + 1 - k) / (n + 1)``: at most the target, coarser than it on a small set; it also holds for a threshold
        set otherwise (a contamination quantile). NaN under ``"fdr"`` (no fixed threshold) or without a finite
        threshold.
        """
        if self.rule == "fdr" or not np.isfinite(self.threshold):
            return float("nan")
        return (1 + int((self.scores > self.threshold).sum())) / (len(self.scores) + 1)

    def summary(self) -> str:
        """:meth:`describe` followed by :meth:`support`, one sentence per line: what the CLI prints."""
        return "\n".join([self.describe(), *("  " + line for line in self.support())])

    # ------------------------------------------------------------------ persistence
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (scores as a list of floats)."""
        return {"rule": self.rule, "fpr": self.fpr, "fdr": self.fdr,
                "threshold": self.threshold if np.isfinite(self.threshold) else None,  # strict JSON: no NaN
                "source": self.source, "validation": self.validation, "note": self.note, "n": len(self.scores),
                "scores": [float(v) for v in self.scores], "files": list(self.files)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Calibration:
        """Inverse of :meth:`to_dict`; every field is checked, since a record read from a run directory is untrusted.

        Raises:
            ValueError: A malformed or inconsistent record, naming the field: not a JSON object; ``rule`` not one of
                ``fpr``/``fdr``/``f1``; ``scores`` not a non-empty list of finite numbers (or ``n`` not its length);
                ``fpr`` not in (0, 1); ``fdr`` not null or in (0, 1) (required by the ``fdr`` rule); ``threshold``
                not a finite number (null only under the ``fdr`` rule, whose decisions do not use it: a NaN
                threshold would silently call every score normal); ``source``/``note`` not strings;
                ``validation`` not an object; ``files`` not a list of strings.
        """
        if not isinstance(d, dict):
            msg = f"a calibration record must be a JSON object, got a JSON {type(d).__name__}"
            raise ValueError(msg)
        missing = [k for k in ("rule", "scores", "fpr", "threshold") if k not in d]
        if missing:
            msg = f"missing field(s) {missing}"
            raise ValueError(msg)

        def number(key: str, low: float = -math.inf, high: float = math.inf, closed: bool = True) -> float | None:
            v = d.get(key)
            if v is None:
                return None
            numeric = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
            if not numeric or not ((low <= v <= high) if closed else (low < v < high)):
                what = "a finite number" if closed else f"a number in ({low:g}, {high:g})"
                msg = f"field {key!r} must be {what}, got {v!r}"
                raise ValueError(msg)
            return float(v)

        rule = d["rule"]
        if rule not in RULES:
            msg = f"field 'rule': unknown rule {rule!r} (expected one of {RULES})"
            raise ValueError(msg)
        raw = d["scores"]
        if (not isinstance(raw, list) or not raw
                or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in raw)):
            msg = f"field 'scores' must be a non-empty list of numbers, got {raw!r:.80}"
            raise ValueError(msg)
        try:
            scores = np.sort(_check_scores(np.asarray(raw, dtype=np.float64), "field 'scores'"))
        except CalibrationError as err:
            raise ValueError(str(err)) from err
        if "n" in d and d["n"] != len(scores):
            msg = f"field 'n' ({d['n']!r}) is not the number of stored scores ({len(scores)})"
            raise ValueError(msg)
        fpr = number("fpr", 0.0, 1.0, closed=False)
        if fpr is None:
            msg = "field 'fpr' must be a number in (0, 1), got null"
            raise ValueError(msg)
        fdr = number("fdr", 0.0, 1.0, closed=False)
        if rule == "fdr" and fdr is None:
            msg = "field 'fdr' is required by rule 'fdr' (a number in (0, 1)), got null"
            raise ValueError(msg)
        threshold = number("threshold")
        if threshold is None and rule != "fdr":
            msg = f"field 'threshold' must be a finite number under rule {rule!r} (it decides), got null"
            raise ValueError(msg)
        for key in ("source", "note"):
            if not isinstance(d.get(key, ""), str):
                msg = f"field {key!r} must be a string, got {d[key]!r:.80}"
                raise ValueError(msg)
        validation = d.get("validation") or {}
        if not isinstance(validation, dict):
            msg = f"field 'validation' must be a JSON object, got {validation!r:.80}"
            raise ValueError(msg)
        files = d.get("files", [])
        if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
            msg = f"field 'files' must be a list of file names, got {files!r:.80}"
            raise ValueError(msg)
        return cls(scores=scores, rule=rule, fpr=fpr, fdr=fdr,
                   threshold=float("nan") if threshold is None else threshold,
                   source=d.get("source", ""), validation=dict(validation), note=d.get("note", ""),
                   files=list(files))

    def save(self, directory: str | Path) -> Path:
        """Write ``calibration.json`` into a model folder, atomically; returns its path."""
        import json

        from dxmi_ad.checkpoint import atomic_write_text

        path = Path(directory) / CALIBRATION_FILE
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1))
        return path

    @classmethod
    def load(cls, directory: str | Path) -> Calibration:
        """Read ``calibration.json`` of a model folder.

        Raises:
            FileNotFoundError: No calibration file (the message names it).
            ValueError: A malformed file or field (the message names the file and the field).
        """
        import json

        path = Path(directory) / CALIBRATION_FILE
        if not path.is_file():
            msg = f"{path} is missing: calibrate the model with `dxmi-ad calibrate --model {directory}`"
            raise FileNotFoundError(msg)
        try:
            return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except ValueError as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            msg = f"{path}: {err}"
            raise ValueError(msg) from err

    @classmethod
    def load_if_present(cls, directory: str | Path, warn: bool = True) -> Calibration | None:
        """:meth:`load`, or None (with a logged warning unless ``warn`` is False) when the folder has no
        ``calibration.json``: scores still work; decisions and p-values need `dxmi-ad calibrate`.
        """
        if (Path(directory) / CALIBRATION_FILE).is_file():
            return cls.load(directory)
        if warn:
            import logging

            logging.getLogger("dxmi_ad").warning(
                "%s has no %s: scores work; decisions and p-values need `dxmi-ad calibrate --model %s "
                "--calibration-dir DIR`", directory, CALIBRATION_FILE, directory)
        return None


def calibration_check(
    calibration_scores: np.ndarray,
    normal_scores: np.ndarray,
    anomaly_scores: np.ndarray,
    fpr: float = 0.05,
    fdr: float = 0.1,
    n_splits: int = 100,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Raw material to show that the calibrated rules keep their promise on unseen data (one normal class).

    Single split: the given calibration set thresholds ``normal_scores`` (unseen normals) at ``fpr``; p-values of
    both test groups. Repeated splits: the calibration and unseen-normal scores are pooled and re-split ``n_splits``
    times into a calibration set of the same size and the rest (no retraining: the scorer is fixed); each split
    gives the realised FPR at ``fpr`` and the false discovery proportion of Benjamini-Hochberg at ``fdr`` on a
    batch of the remaining normals plus all anomalies.

    Args:
        calibration_scores: ``(n,)`` held-out normal scores.
        normal_scores: ``(m,)`` unseen normal scores (never used to calibrate in the single split).
        anomaly_scores: ``(k,)`` anomalous scores.
        fpr: Target false-positive rate.
        fdr: Target false discovery rate.
        n_splits: Number of random re-splits.
        seed: Seed of the re-splits.

    Returns:
        ``flags_normal`` (m,) bool, ``p_normal`` (m,), ``p_anomaly`` (k,), ``n_calibration`` (1,),
        ``fpr_splits`` (n_splits,), ``fdp_splits`` (n_splits,), ``discoveries_splits`` (n_splits,),
        ``p_normal_splits`` (n_splits, m): the p-values of the held-out normals of each re-split (the null of the
        uniformity test in :func:`summarize_checks`).
    """
    cal = _check_scores(calibration_scores, "the calibration set")
    normal = _check_scores(normal_scores, "the normal test scores")
    anomaly = np.asarray(anomaly_scores, dtype=np.float64)
    t = conformal_threshold(cal, fpr)
    out = {"flags_normal": normal > t, "p_normal": conformal_p_values(cal, normal),
           "p_anomaly": conformal_p_values(cal, anomaly), "n_calibration": np.array([len(cal)])}
    pool = np.r_[cal, normal]
    rng = np.random.default_rng(seed)
    fprs, fdps, disc, p_rest = [], [], [], []
    for _ in range(n_splits):
        perm = rng.permutation(len(pool))
        c, rest = pool[perm[:len(cal)]], pool[perm[len(cal):]]
        fprs.append(float((rest > conformal_threshold(c, fpr)).mean()))
        p_both = conformal_p_values(c, np.r_[rest, anomaly])
        p_rest.append(p_both[:len(rest)])
        flagged = bh_reject(p_both, fdr)
        false = int(flagged[:len(rest)].sum())
        fdps.append(false / max(int(flagged.sum()), 1))
        disc.append(int(flagged.sum()))
    out.update(fpr_splits=np.array(fprs), fdp_splits=np.array(fdps), discoveries_splits=np.array(disc),
               p_normal_splits=np.array(p_rest))
    return out


def decision_summary(calibration: Calibration, scores: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """How the stored rule decides on a labelled set: realised FPR, TPR and false discovery proportion.

    Args:
        calibration: The rule.
        scores: ``(n,)`` scores (NaN = unreadable, left out).
        labels: ``(n,)`` 0 = normal, 1 = anomalous.

    Returns:
        ``rule``, ``target_fpr``, ``target_fdr``, ``threshold``, ``n_calibration``, ``realised_fpr`` and ``tpr``
        (fractions, None without normals / anomalies), ``false_discovery_proportion`` and ``counts``
        (``n_normal``, ``fp``, ``n_anomalous``, ``tp``, ``flagged``).
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels)
    ok = np.isfinite(s)
    flagged = calibration.decide(np.where(ok, s, np.nan))
    normal, anom = ok & (y == 0), ok & (y == 1)
    counts = {"n_normal": int(normal.sum()), "fp": int(flagged[normal].sum()), "n_anomalous": int(anom.sum()),
              "tp": int(flagged[anom].sum()), "flagged": int(flagged.sum())}
    return {"rule": calibration.rule, "target_fpr": calibration.fpr, "target_fdr": calibration.fdr,
            "threshold": calibration.decision_threshold, "n_calibration": len(calibration.scores),
            "realised_fpr": counts["fp"] / counts["n_normal"] if counts["n_normal"] else None,
            "tpr": counts["tp"] / counts["n_anomalous"] if counts["n_anomalous"] else None,
            "false_discovery_proportion": counts["fp"] / max(counts["flagged"], 1), "counts": counts}


def _resplit_ks_pvalue(p_normal: np.ndarray, p_splits: list[np.ndarray]) -> float:
    """Rank of the KS statistic of ``p_normal`` (pooled) among those of the pooled re-splits ``(n_splits, m_i)``."""
    from scipy.stats import kstest

    observed = kstest(p_normal, "uniform").statistic
    null = np.array([kstest(np.concatenate(row), "uniform").statistic for row in zip(*p_splits)])
    return float((1 + (null >= observed - 1e-12).sum()) / (1 + len(null)))


def summarize_checks(checks: list[dict[str, np.ndarray]], fpr: float = 0.05, fdr: float = 0.1) -> dict[str, float]:
    """Pool :func:`calibration_check` results (e.g. one per normal class) into the figures the promises are judged by.

    Returns:
        ``fpr_single`` (pooled realised FPR of the single splits), ``fpr_low``/``fpr_high`` (binomial 99% interval of
        ``fpr`` for that many normals: the test-sample noise only), ``fpr_low_cal``/``fpr_high_cal`` (99% interval
        that also counts the calibration draw: for continuous exchangeable scores the FPR given a calibration set of
        ``n`` is Beta(n + 1 - k, k) distributed, ``k = ceil((n + 1)(1 - fpr))``; pooled beta-binomial, simulated),
        ``n_normal``, ``ks_pvalue`` (are the unseen normals' p-values as uniform as exchangeability allows: the
        Kolmogorov-Smirnov statistic of the pooled normal p-values against U(0, 1), :func:`scipy.stats.kstest`,
        ranked among the same statistic on every re-split, ``(1 + #{D_split >= D}) / (1 + n_splits)``; the plain
        one-sample KS p-value is not used because, given ONE calibration draw, conformal p-values are uniform only
        marginally: on exchangeable re-splits of the textures it fell below 0.01 in 35% of them),
        ``anomaly_p_median``, ``anomaly_p_below_fpr`` (fraction
        of anomalies with ``p <= fpr``), ``fpr_resplit_mean`` / ``_se``, ``fdp_mean`` / ``fdp_se`` (over all
        re-splits), ``mean_discoveries``.
    """
    from scipy.stats import binom

    flags = np.concatenate([c["flags_normal"] for c in checks])
    p_norm = np.concatenate([c["p_normal"] for c in checks])
    p_anom = np.concatenate([c["p_anomaly"] for c in checks])
    fprs = np.concatenate([c["fpr_splits"] for c in checks])
    fdps = np.concatenate([c["fdp_splits"] for c in checks])
    m = len(flags)
    lo, hi = binom.interval(0.99, m, fpr)
    rng = np.random.default_rng(0)
    counts = np.zeros(20_000)
    for c in checks:
        n = int(c["n_calibration"][0])
        k = min(math.ceil((n + 1) * (1.0 - fpr) - 1e-9), n)
        counts += rng.binomial(len(c["flags_normal"]), rng.beta(n + 1 - k, k, size=len(counts)))
    lo_cal, hi_cal = np.quantile(counts, [0.005, 0.995])
    return {
        "n_normal": m, "fpr_single": float(flags.mean()), "fpr_low": float(lo / m), "fpr_high": float(hi / m),
        "fpr_low_cal": float(lo_cal / m), "fpr_high_cal": float(hi_cal / m),
        "ks_pvalue": _resplit_ks_pvalue(p_norm, [c["p_normal_splits"] for c in checks]),
        "anomaly_p_median": float(np.median(p_anom)), "anomaly_p_below_fpr": float((p_anom <= fpr).mean()),
        "fpr_resplit_mean": float(fprs.mean()), "fpr_resplit_se": float(fprs.std(ddof=1) / np.sqrt(len(fprs))),
        "fdp_mean": float(fdps.mean()), "fdp_se": float(fdps.std(ddof=1) / np.sqrt(len(fdps))),
        "mean_discoveries": float(np.concatenate([c["discoveries_splits"] for c in checks]).mean()),
    }
