"""Scoring throughput of one image model in PyTorch eager, TorchScript and onnxruntime, same inputs, same threads.

Trains (or loads, with --model) an image model of the embedded textures with recipes/textures.yaml, exports it to
both formats and times ``(B, 3, 224, 224)`` float batches of the textures test set through each runtime (after one
warm-up batch). Also prints the largest relative difference of each runtime's ``pred_score`` to eager's.

    python benchmarks/export.py [--threads 2] [--batch 32] [--model RUN_DIR]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]


def _time(fn, batches: list[torch.Tensor]) -> tuple[float, np.ndarray]:
    fn(batches[0])  # warm-up
    t0 = time.perf_counter()
    scores = [np.asarray(fn(b)) for b in batches]
    return sum(len(b) for b in batches) / (time.perf_counter() - t0), np.concatenate(scores)


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch and onnxruntime intra-op threads")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--model", type=Path, default=None, help="an existing image run directory")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import onnxruntime as ort
    import yaml

    import dxmi_ad
    from dxmi_ad.config import DxMIConfig
    from dxmi_ad.data.mvtec import list_mvtec
    from dxmi_ad.data.textures import write_textures
    from dxmi_ad.export import export_model, load_torchscript
    from dxmi_ad.image import FeatureSettings, ImageDetector, iter_batches

    samples = list_mvtec(write_textures())
    if args.model:
        det = dxmi_ad.load(args.model)
    else:
        recipe = yaml.safe_load((ROOT / "dxmi_ad" / "recipes" / "textures.yaml").read_text())
        feats = FeatureSettings(**{**recipe["features"], "out_indices": tuple(recipe["features"]["out_indices"])})
        det = ImageDetector(DxMIConfig.from_dict(recipe["model"]), feats).fit(samples)
    size = det.features.image_size
    test = [s for s in samples if s.split == "test"]
    batches = [images for _, images, _, _ in iter_batches(test, size, args.batch)]
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path, ts_path = Path(tmp) / "m.onnx", Path(tmp) / "m.pt"
        export_model(det, onnx_path, "onnx")
        export_model(det, ts_path, "torchscript")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = args.threads
        opts.inter_op_num_threads = 1
        session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
        module, _ = load_torchscript(ts_path)
        extractor = det._extractor()
        runs = {
            "PyTorch eager (ImageDetector.predict)": lambda b: det.predict(b)["pred_score"].numpy(),
            "TorchScript (torch.jit.load)": lambda b: module(b)[0].numpy(),
            "onnxruntime (CPUExecutionProvider)": lambda b: session.run(["pred_score"], {"images": b.numpy()})[0],
            "backbone only (eager, for reference)": lambda b: extractor(b).flatten(1)[:, 0].numpy(),
        }
        rows, ref = {}, None
        with torch.no_grad():
            for name, fn in runs.items():
                ips, scores = _time(fn, batches)
                if ref is None:
                    ref = scores
                diff = float(np.max(np.abs(scores - ref)) / np.max(np.abs(ref))) if "backbone" not in name else np.nan
                rows[name] = {"images/s": ips, "ratio to eager": np.nan, "max rel. diff of pred_score": diff}
    table = pd.DataFrame(rows).T
    table["ratio to eager"] = table["images/s"] / table["images/s"].iloc[0]
    print(f"Scoring throughput, textures test set ({sum(len(b) for b in batches)} images, {size} px, batch "
          f"{args.batch}); backbone {det.features.backbone}; threads={args.threads}; torch {torch.__version__}, "
          f"onnxruntime {ort.__version__}")
    print(table.to_string(float_format=lambda v: f"{v:.3g}"))


if __name__ == "__main__":
    main()
