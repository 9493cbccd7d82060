"""dxmi-ad: anomaly detection with energy-based models trained by DxMI (Yoon et al., NeurIPS 2024).

The trained energy E(x) is the anomaly score (higher = more anomalous); the few-step diffusion sampler trained
jointly with it stays available for generation.
"""

from __future__ import annotations

__version__ = "0.2.0"

__all__ = ["DxMIConfig", "DxMIDetector", "PyODDxMIDetector", "__version__", "load"]


def load(path):
    """Load a saved model folder (a run directory of `dxmi-ad train`, or ``DxMIDetector.save``).

    Args:
        path: The folder (``model.safetensors`` + ``config.json`` + ``calibration.json``).

    Returns:
        An :class:`~dxmi_ad.image.ImageDetector` (image models: ``predict`` returns ``pred_score``, ``anomaly_map``,
        ``pred_label``, ``p_value``, ``normalized_score``), a :class:`~dxmi_ad.pixel.PixelDetector` (pixel-mode
        models: the same outputs, plus ``sample``) or a :class:`DxMIDetector` / :class:`PyODDxMIDetector`
        (vector models: ``energy``, ``p_value``, calibrated ``predict``).

    Raises:
        FileNotFoundError: Missing folder or files (named).
        ValueError: Files that do not describe a dxmi-ad model.
    """
    import json
    from pathlib import Path

    from dxmi_ad.checkpoint import CONFIG_FILE

    cfg = Path(path) / CONFIG_FILE
    if not cfg.is_file():
        msg = f"{cfg} not found: {path} is not a dxmi-ad model folder"
        raise FileNotFoundError(msg)
    try:
        meta = json.loads(cfg.read_text(encoding="utf-8"))
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        msg = f"{cfg} is not a valid model description: {err}"
        raise ValueError(msg) from err
    if not isinstance(meta, dict):
        msg = f"{cfg} must hold a JSON object (a model description), got a JSON {type(meta).__name__}"
        raise ValueError(msg)
    kind = meta.get("kind")
    if kind == "ImageDetector":
        from dxmi_ad.image import ImageDetector

        return ImageDetector.load(path)
    if kind == "PixelDetector":
        from dxmi_ad.pixel import PixelDetector

        return PixelDetector.load(path)
    from dxmi_ad import estimator

    cls = estimator.PyODDxMIDetector if kind == "PyODDxMIDetector" else estimator.DxMIDetector
    return cls.load(path)


def __getattr__(name: str):  # lazy: importing the package does not import scikit-learn
    if name in ("DxMIDetector", "PyODDxMIDetector"):
        from dxmi_ad import estimator

        return getattr(estimator, name)
    if name == "DxMIConfig":
        from dxmi_ad.config import DxMIConfig

        return DxMIConfig
    msg = f"module 'dxmi_ad' has no attribute {name!r}"
    raise AttributeError(msg)
