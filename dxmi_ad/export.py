"""Deployment export of an image model: the whole scorer as one ONNX or TorchScript file.

The exported graph is :class:`Scorer`: pre-processing (uint8 -> [0, 1] when exported for uint8 input; bilinear
resize to the model input size), the frozen backbone with ImageNet normalization, the per-location DxMI energy head
and the bilinear upsampling of the energy map back to the input size. Input: an image batch ``(B, 3, H, W)`` RGB,
``float32`` in [0, 1] or ``uint8`` in [0, 255] (chosen at export); ``H, W`` are fixed at export (default: the model
input size), the batch size is dynamic. Outputs: ``pred_score (B,)`` (the maximum or top-k mean of the
per-location energy map, by the model's ``scoring`` settings; higher = more anomalous) and ``anomaly_map (B, H,
W)``. The decision threshold and rule of the model's calibration are stored in the file's metadata (ONNX ``metadata_props``; TorchScript extra file ``dxmi_ad.json``), so a serving runtime flags
``pred_score > threshold`` exactly as ``dxmi-ad score`` does.

ONNX export uses torch's dynamo exporter (``torch.onnx.export(..., dynamo=True)``, which needs ``onnxscript``;
anomalib / pyod conventions); TorchScript uses :func:`torch.jit.trace`.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dxmi_ad.checkpoint import atomic_replace
from dxmi_ad.data.images import resize_images
from dxmi_ad.metrics import dumps_json

__all__ = ["FORMATS", "Scorer", "export_metadata", "export_model", "load_torchscript", "onnx_metadata", "run_onnx"]

FORMATS = ("onnx", "torchscript")
METADATA_FILE = "dxmi_ad.json"


class Scorer(nn.Module):
    """The image scorer as one traceable module (see the module docstring).

    Args:
        detector: A trained :class:`~dxmi_ad.image.ImageDetector`.
        input_dtype: ``"float32"`` (values in [0, 1]) or ``"uint8"`` (values in [0, 255]).

    Raises:
        ValueError: An untrained detector or an unknown ``input_dtype``.
    """

    def __init__(self, detector: Any, input_dtype: str = "float32") -> None:
        super().__init__()
        if detector.model_ is None:
            msg = "the detector is not trained"
            raise ValueError(msg)
        if input_dtype not in ("float32", "uint8"):
            msg = f"input_dtype must be 'float32' or 'uint8', got {input_dtype!r}"
            raise ValueError(msg)
        self.extractor = detector._extractor()
        self.scorer = detector.scorer()  # the same MapScorer (energy + blur) as ImageDetector.predict
        self.size = int(detector.features.image_size)
        self.uint8 = input_dtype == "uint8"
        self.eval()

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``images (B, 3, H, W)`` -> ``pred_score (B,)``, ``anomaly_map (B, H, W)`` (float32)."""
        h, w = images.shape[-2], images.shape[-1]
        x = images.float() / 255.0 if self.uint8 else images.float()
        x = resize_images(x, self.size)  # the same resize as file loading and ImageDetector.predict
        return self.scorer(self.extractor(x), (h, w))


def export_metadata(detector: Any, input_dtype: str, input_size: tuple[int, int]) -> dict[str, Any]:
    """The metadata stored in an exported file: threshold, rule, input contract, versions."""
    from dataclasses import asdict

    import dxmi_ad

    cal = detector.calibration_
    return {
        "producer": f"dxmi-ad {dxmi_ad.__version__}", "input": "images (B, 3, H, W) RGB",
        "input_dtype": input_dtype, "input_range": "[0, 255]" if input_dtype == "uint8" else "[0, 1]",
        "input_size": list(input_size), "model_input_size": detector.features.image_size,
        "outputs": {"pred_score": f"(B,) {detector.scoring.describe()}, higher = more anomalous",
                    "anomaly_map": "(B, H, W) bilinearly upsampled (blurred) energy map"},
        "scoring": detector.scoring.to_dict(),
        "threshold": None if cal is None else cal.decision_threshold,
        "decision": "pred_score > threshold" if cal is not None and cal.rule != "fdr" else
        "Benjamini-Hochberg on conformal p-values (see calibration_scores)" if cal is not None else None,
        "calibration": None if cal is None else {k: v for k, v in cal.to_dict().items() if k != "files"},
        "features": asdict(detector.features), "categories": detector.categories,
    }


def export_model(
    detector: Any,
    path: str | Path,
    fmt: str = "onnx",
    input_dtype: str = "float32",
    input_size: tuple[int, int] | None = None,
) -> Path:
    """Export the scorer to ONNX or TorchScript, atomically.

    Args:
        detector: A trained :class:`~dxmi_ad.image.ImageDetector`.
        path: Output file (``.onnx`` / ``.pt`` recommended).
        fmt: ``"onnx"`` or ``"torchscript"``.
        input_dtype: ``"float32"`` ([0, 1]) or ``"uint8"`` ([0, 255]).
        input_size: ``(H, W)`` of the exported input in pixels (default: the model input size it was trained at,
            ``features.image_size`` of its config.json; no resize in the graph).

    Returns:
        The written path.

    Raises:
        ValueError: Unknown format/dtype, or an untrained detector.
        RuntimeError: The ONNX exporter's dependencies (onnx, onnxscript) are missing (the message says what to
            install).
    """
    if fmt not in FORMATS:
        msg = f"unknown export format {fmt!r}; expected one of {FORMATS}"
        raise ValueError(msg)
    from dxmi_ad.image import check_output_size

    scorer = Scorer(detector, input_dtype)
    try:
        size = check_output_size(input_size) or (scorer.size, scorer.size)  # default: the size it was trained at
    except ValueError as err:
        raise ValueError(str(err).replace("output_size", "input_size")) from None
    example = (torch.rand(2, 3, *size) * (255 if input_dtype == "uint8" else 1)).to(
        torch.uint8 if input_dtype == "uint8" else torch.float32)
    meta = export_metadata(detector, input_dtype, size)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "torchscript":
        with torch.no_grad(), warnings.catch_warnings():
            # shapes are fixed at export (documented); TorchScript is deprecated upstream but still the format
            # many C++ / mobile runtimes serve
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message=".*torch.jit", category=FutureWarning)
            traced = torch.jit.trace(scorer, (example,), check_trace=False)
            atomic_replace(path, lambda tmp: torch.jit.save(traced, str(tmp),
                                                            _extra_files={METADATA_FILE: dumps_json(meta)}))
        return path
    try:
        import onnx
        import onnxscript  # noqa: F401  (the dynamo exporter needs it)
    except ImportError as err:
        msg = f"ONNX export needs onnx and onnxscript ({err}); install them: pip install 'dxmi-ad[export]'"
        raise RuntimeError(msg) from err
    batch = torch.export.Dim("batch", min=1, max=4096)
    with tempfile.TemporaryDirectory() as tmpdir:
        raw = Path(tmpdir) / "model.onnx"
        with torch.no_grad():
            torch.onnx.export(scorer, (example,), str(raw), dynamo=True, input_names=["images"],
                              output_names=["pred_score", "anomaly_map"], verbose=False,
                              dynamic_shapes={"images": {0: batch}}, external_data=False)
        proto = onnx.load(str(raw))
    for key, value in (("dxmi_ad", dumps_json(meta)), ("threshold", dumps_json(meta["threshold"]))):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    atomic_replace(path, lambda tmp: onnx.save(proto, str(tmp)))
    return path


def run_onnx(path: str | Path, images: torch.Tensor | Any, threads: int | None = None) -> tuple[Any, Any]:
    """Score with an exported ONNX scorer on onnxruntime's CPU provider.

    Args:
        path: File written by :func:`export_model` with ``fmt="onnx"``.
        images: ``(B, 3, H, W)`` batch (tensor or array) of the dtype and size the file was exported for.
        threads: Intra-op threads (None: onnxruntime's default).

    Returns:
        ``(pred_score (B,), anomaly_map (B, H, W))`` float32 numpy arrays (energy units, higher = more anomalous).

    Raises:
        onnxruntime.capi.onnxruntime_pybind11_state.InvalidArgument: Input of the wrong dtype or shape.
    """
    import numpy as np
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    arr = images.numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    score, amap = session.run(["pred_score", "anomaly_map"], {"images": arr})
    return score, amap


def load_torchscript(path: str | Path) -> tuple[torch.jit.ScriptModule, dict[str, Any]]:
    """Load an exported TorchScript scorer and its metadata (TorchScript archives hold no pickled Python code).

    Returns:
        ``(module, metadata)``: ``module(images (B, 3, H, W)) -> (pred_score (B,), anomaly_map (B, H, W))``, and the
        dict of :func:`export_metadata`.

    Raises:
        RuntimeError: Not a TorchScript archive.
    """
    extra = {METADATA_FILE: ""}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit", category=FutureWarning)
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return module, json.loads(extra[METADATA_FILE] or "{}")


def onnx_metadata(path: str | Path) -> dict[str, Any]:
    """The dxmi-ad metadata stored in an exported ONNX file."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    props = {p.key: p.value for p in proto.metadata_props}
    return json.loads(props.get("dxmi_ad", "{}"))

