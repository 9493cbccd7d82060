"""dxmi-ad: anomaly detection with energy-based models trained by DxMI (Yoon et al., NeurIPS 2024).

The trained energy E(x) is the anomaly score (higher = more anomalous); the few-step diffusion sampler trained
jointly with it stays available for generation.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["DxMIConfig", "DxMIDetector", "PyODDxMIDetector", "__version__"]


def __getattr__(name: str):  # lazy: importing the package does not import scikit-learn
    if name in ("DxMIDetector", "PyODDxMIDetector"):
        from dxmi_ad import estimator

        return getattr(estimator, name)
    if name == "DxMIConfig":
        from dxmi_ad.config import DxMIConfig

        return DxMIConfig
    msg = f"module 'dxmi_ad' has no attribute {name!r}"
    raise AttributeError(msg)
