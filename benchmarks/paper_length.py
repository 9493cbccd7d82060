"""A paper-length DxMI run, for as long as a time limit allows: the training-health trace over time.

The paper trains 100 epochs (about 90k iterations) with its network sizes (energy 3 x 1024 autoencoder, sampler
3 x 2048, value 3 x 1024, batch 784). This script runs that recipe (``--recipe mvtec``'s ``model`` section, guards
and model selection included) on the embedded textures with the offline Lite0 features (the paper's EfficientNet-b4
weights are not shipped), stops when ``--minutes`` run out (the iteration budget is measured on a short probe
first), and prints, every ``--every`` iterations: E(data), E(samples), their gap, E(samples) / E_max, and the
validation AUROC (held-out normal training images vs SYNTHETIC Perlin anomalies; never the test set); then the test
image / pixel AUROC of the selected and of the last state.

    python benchmarks/paper_length.py --device cuda --minutes 4      # one GPU (benchmarks/gpu_check.sh)
    python benchmarks/paper_length.py --device cpu --minutes 3 --scale 0.25   # a CPU smoke run, smaller nets
"""

from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import pandas as pd
import torch

from dxmi_ad import recipes
from dxmi_ad.checkpoint import read_yaml_mapping
from dxmi_ad.config import DxMIConfig
from dxmi_ad.data.mvtec import list_mvtec
from dxmi_ad.data.textures import write_textures
from dxmi_ad.evaluation import metrics_table
from dxmi_ad.image import (
    FeatureSettings,
    ImageDetector,
    extract_training_features,
    features_and_masks,
    split_calibration,
)
from dxmi_ad.training.fit import train_model, with_config


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="mvtec", help="recipe whose model section is run (default: the paper's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--minutes", type=float, default=4.0, help="wall-clock budget of the DxMI stage")
    parser.add_argument("--ae-minutes", type=float, default=1.0, help="budget of the autoencoder pre-training")
    parser.add_argument("--every", type=int, default=200, help="iterations between trace rows and validations")
    parser.add_argument("--scale", type=float, default=1.0, help="network width factor (CPU smoke runs: 0.25)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_section = dict(read_yaml_mapping(recipes.resolve(args.recipe))["model"])
    for key in ("energy_hidden", "sampler_hidden", "value_hidden"):
        model_section[key] = max(16, int(model_section[key] * args.scale))
    feats = FeatureSettings()  # offline Lite0 (the paper's b4 weights are not shipped)
    samples = list_mvtec(write_textures())
    train = [s for s in samples if s.split == "train"]
    test = [s for s in samples if s.split == "test"]
    config = DxMIConfig.from_dict({**model_section, "validate_every": args.every, "seed": 0})
    det = ImageDetector(config, feats)
    fit_part, val_part = split_calibration(train, config.validation_fraction, 1, minimum=1)
    validate = det._validation(val_part, fit_part, skip_bad_files=False)
    test_feats, masks = features_and_masks(test, det._extractor(), feats.image_size)
    train_feats, _ = extract_training_features(fit_part, feats, det._extractor())
    n, h, w, c = train_feats.shape
    vectors = torch.from_numpy(np.asarray(train_feats).reshape(n * h * w, c))
    config = config.replace(dim=c)

    def budget(cfg: DxMIConfig, minutes: float, stage: str, **kw: object) -> int:
        probe = 20
        t0 = time.perf_counter()
        kwargs = {"ae_pretrain_iter": probe, "n_iter": 0} if stage == "ae" else {"n_iter": probe, "warmup_iter": 0}
        kwargs["validate_every"] = 0
        train_model(vectors, cfg.replace(**kwargs), device=args.device, **kw)
        per_it = (time.perf_counter() - t0) / probe
        return max(probe, int(minutes * 60 / per_it))

    ae_iter = min(config.ae_pretrain_iter, budget(config, args.ae_minutes, "ae"))
    t0 = time.perf_counter()
    base, _ = train_model(vectors, config.replace(ae_pretrain_iter=ae_iter, n_iter=0, validate_every=0),
                          device=args.device)
    ae_s = time.perf_counter() - t0
    n_iter = min(config.n_iter, budget(config, args.minutes, "dxmi", model=copy.deepcopy(base)))
    n_iter = max(args.every, n_iter - n_iter % args.every)
    config = config.replace(ae_pretrain_iter=ae_iter, n_iter=n_iter)
    start = with_config(base, config)
    rows: dict[int, dict] = {}
    t_start = time.perf_counter()

    def trace(stage: str, i: int, total: int, rec: dict) -> None:
        row = rows.setdefault(i, {"iteration": i})
        row["seconds"] = time.perf_counter() - t_start
        if "val_auroc" in rec:
            row["val AUROC"] = rec["val_auroc"]
        if "energy_data" in rec:
            row.update({"E(data)": rec["energy_data"], "E(samples)": rec["energy_samples"],
                        "gap": rec.get("energy_gap"), "E/Emax": rec.get("energy_saturation")})

    model, history = train_model(vectors, config, progress=trace, log_every=args.every, model=start,
                                 device=args.device, validate=validate)
    print(f"\nPaper-length trace: recipe {args.recipe} (model section, width x{args.scale}), Lite0 textures features "
          f"({c}-d, {len(vectors)} training vectors), device {args.device}; autoencoder {ae_iter} it in {ae_s:.0f} s; "
          f"DxMI {n_iter} it (budget {args.minutes} min); selected iteration {history[-1].get('selected_iteration')}")
    print(pd.DataFrame(sorted(rows.values(), key=lambda r: r["iteration"])).to_string(
        index=False, float_format=lambda v: f"{v:.4f}"))
    size = (feats.image_size, feats.image_size)
    for name, m in (("selected", model), ("autoencoder start", base)):
        det.model_ = m.cpu().eval()
        scored = {**det.score_feature_maps(test_feats, size), "gt_mask": masks}
        mean = metrics_table(test, scored).set_index("category").loc["mean"]
        print(f"test ({name}): image AUROC {mean['image_AUROC']:.3f}, pixel AUROC {mean['pixel_AUROC']:.3f}")


if __name__ == "__main__":
    main()
