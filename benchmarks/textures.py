"""DxMI beside anomalib's PaDiM and PatchCore on the embedded textures (real photos, SYNTHETIC defects).

One run, same data, same offline EfficientNet-Lite ImageNet weights (Lite0, the recipe's; ``--backbone`` for Lite1 /
Lite2 in every row). Rows: the autoencoder energy alone (DxMI's
starting point), DxMI tau = 0.1, DxMI tau = 0 (the paper's entropy ablation), anomalib PaDiM and PatchCore. Columns:
image and pixel AUROC per texture and mean, training seconds, end-to-end scoring images/s, and the backbone-only
images/s. Settings: recipes/textures.yaml; peers use the backbone's blocks 1 + 2 (strides 4, 8: the usual middle layers;
the full stride-2..16 stack at stride-2 resolution is out of reach for PaDiM's covariances and PatchCore's
coreset on 2 CPU cores); PatchCore's memory bank is a 10% k-center coreset of 20,000 randomly drawn patch vectors
(docs/paper_map.md: k-center greedy over all 1.5M patches would take hours on the CPU).

``--hold-out F`` trains every row on the training tiles that a held-out block of the fraction F leaves (the
textures' ``train/tiles.csv``; :func:`dxmi_ad.image.split_calibration`): 0.1 is the training set of
``textures_ablation.py``'s rows (its validation split), 0.2 the one ``dxmi-ad train`` fits on (its calibration
split), so peers and DxMI are compared on the same tiles. ``--repeats N`` runs each row N times (anomalib's coreset
draws from unseeded generators, so PatchCore moves from run to run).

    python benchmarks/textures.py [--backbone tf_efficientnet_lite2] [--only PatchCore PaDiM] [--peer-inputs]
        [--hold-out 0.1] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

from dxmi_ad.config import DxMIConfig
from dxmi_ad.data.mvtec import list_mvtec
from dxmi_ad.data.textures import write_textures
from dxmi_ad.evaluation import metrics_table
from dxmi_ad.features.extractor import efficientnet_lite_state_dict
from dxmi_ad.image import FeatureSettings, ImageDetector, iter_batches, split_calibration
from dxmi_ad.scoring import ScoringSettings

RECIPE = Path(__file__).resolve().parents[1] / "dxmi_ad" / "recipes" / "textures.yaml"


def _dxmi(samples: list, test: list, model: dict, feats: dict, scoring: dict | None = None
          ) -> tuple[pd.DataFrame, float, float]:
    det = ImageDetector(DxMIConfig.from_dict(model), FeatureSettings(**feats),
                        scoring=ScoringSettings.from_dict(scoring))
    t0 = time.perf_counter()
    det.fit(samples, calibration=0.0)  # all training images, like the peers (no held-out calibration split)
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    scored = det.score_samples(test)
    return metrics_table(test, scored), train_s, len(test) / (time.perf_counter() - t0)


def _anomalib(kind: str, samples: list, test: list, size: int, backbone: str = "tf_efficientnet_lite0"
              ) -> tuple[pd.DataFrame, float, float]:
    from anomalib.models.image.padim.torch_model import PadimModel
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel

    layers = ["blocks.1", "blocks.2"]
    if kind == "PaDiM":
        model = PadimModel(backbone=backbone, layers=layers, pre_trained=False, n_features=64)
    else:
        model = PatchcoreModel(layers=layers, backbone=backbone, pre_trained=False, num_neighbors=9)
    own = model.feature_extractor.feature_extractor.state_dict()
    weights = efficientnet_lite_state_dict(int(backbone.removeprefix("tf_efficientnet_lite")))
    model.feature_extractor.feature_extractor.load_state_dict({k: v for k, v in weights.items() if k in own},
                                                              strict=True)
    mean = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
    std = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
    train = [s for s in samples if s.split == "train"]
    t0 = time.perf_counter()
    model.train()
    with torch.no_grad():
        for _, images, _, _ in iter_batches(train, size, 32):
            model((images - mean) / std)
    if kind == "PaDiM":
        model.fit()
    else:
        # k-center greedy over 1.5M patch vectors takes hours on 2 CPU cores (docs/paper_map.md): draw 20,000 vectors at
        # random first, then a 10% coreset of those (named deviation from PatchCore's coreset over all patches).
        store = torch.vstack(model.embedding_store)
        keep = torch.randperm(len(store), generator=torch.Generator().manual_seed(0))[:20_000]
        model.embedding_store = [store[keep]]
        model.subsample_embedding(0.1)
    train_s = time.perf_counter() - t0
    model.eval()
    n = len(test)
    scores, maps, masks = np.full(n, np.nan), np.zeros((n, size, size), np.float16), np.zeros((n, size, size), bool)
    t0 = time.perf_counter()
    with torch.no_grad():
        for idx, images, m, _ in iter_batches(test, size, 32):
            out = model((images - mean) / std)
            scores[idx] = out.pred_score.numpy().ravel()
            maps[idx] = out.anomaly_map[:, 0].numpy().astype(np.float16) if out.anomaly_map.ndim == 4 else \
                out.anomaly_map.numpy().astype(np.float16)
            masks[idx] = m.numpy()
    ips = n / (time.perf_counter() - t0)
    return metrics_table(test, {"pred_score": scores, "anomaly_map": maps, "gt_mask": masks}), train_s, ips


def _backbone_ips(test: list, feats: dict) -> float:
    fe = FeatureSettings(**feats).build()
    t0 = time.perf_counter()
    for _, images, _, _ in iter_batches(test, feats["image_size"], 32):
        fe(images)
    return len(test) / (time.perf_counter() - t0)


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, default=RECIPE)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--peer-inputs", action="store_true",
                        help="also train DxMI on the peers' inputs (recipe textures_patchcore_inputs: Lite0 blocks 1 + 2, "
                             "3x3 neighbourhood average), so methods are compared on the same features")
    parser.add_argument("--backbone", choices=[f"tf_efficientnet_lite{v}" for v in range(3)], default=None,
                        help="the offline backbone of every row, DxMI's and the peers' (default: the recipe's)")
    parser.add_argument("--only", nargs="+", default=None, help="rows to run (substring match, e.g. PatchCore)")
    parser.add_argument("--hold-out", type=float, default=0.0,
                        help="train every row on what a held-out block of this fraction leaves (0.1: the ablation's "
                             "training tiles, 0.2: dxmi-ad train's); 0 = every training tile")
    parser.add_argument("--seed", type=int, default=1, help="seed of the --hold-out split (the ablation's seed 0 + 1)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each row (mean and std printed)")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    torch.set_num_threads(args.threads)
    recipe = yaml.safe_load(args.recipe.read_text())
    feats = {**recipe["features"], "out_indices": tuple(recipe["features"]["out_indices"])}
    feats["backbone"] = args.backbone or feats["backbone"]
    scoring = recipe.get("scoring")
    samples = list_mvtec(write_textures())
    test = [s for s in samples if s.split == "test"]
    train = [s for s in samples if s.split == "train"]
    if args.hold_out:
        train = split_calibration(train, args.hold_out, args.seed)[0]
    samples = train + test
    print(f"{len(train)} training tiles (--hold-out {args.hold_out:g}, seed {args.seed}), {len(test)} test tiles",
          flush=True)
    rows = {}
    peer = yaml.safe_load((RECIPE.parent / "textures_patchcore_inputs.yaml").read_text())
    peer_feats = {**peer["features"], "out_indices": tuple(peer["features"]["out_indices"]),
                  "backbone": feats["backbone"]}
    runs = {
        "autoencoder alone": lambda: _dxmi(samples, test, {**recipe["model"], "n_iter": 0}, feats, scoring),
        "DxMI tau=0.1": lambda: _dxmi(samples, test, recipe["model"], feats, scoring),
        "DxMI tau=0": lambda: _dxmi(samples, test, {**recipe["model"], "entropy_weight": 0.0,
                                                    "velocity_weight": 0.0}, feats, scoring),
        **({} if not args.peer_inputs else {
            "autoencoder alone, peer inputs": lambda: _dxmi(samples, test, {**peer["model"], "n_iter": 0},
                                                           peer_feats, peer.get("scoring")),
            "DxMI tau=0.1, peer inputs": lambda: _dxmi(samples, test, peer["model"], peer_feats, peer.get("scoring")),
        }),
        "PaDiM (anomalib)": lambda: _anomalib("PaDiM", samples, test, feats["image_size"], feats["backbone"]),
        "PatchCore (anomalib)": lambda: _anomalib("PatchCore", samples, test, feats["image_size"], feats["backbone"]),
    }
    runs = {k: v for k, v in runs.items() if not args.only or any(o in k for o in args.only)}
    for name, run in runs.items():
        repeats = []
        for r in range(args.repeats):
            table, train_s, ips = run()
            per = table.set_index("category")
            row = {f"{c} img": per.loc[c, "image_AUROC"] for c in per.index}
            row.update({f"{c} pix": per.loc[c, "pixel_AUROC"] for c in per.index})
            row.update({"train s": train_s, "score img/s": ips})
            repeats.append(row)
            print(f"{name} (run {r + 1} of {args.repeats}): " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()),
                  flush=True)
        runs_df = pd.DataFrame(repeats)
        rows[name] = runs_df.mean().to_dict()
        if args.repeats > 1:  # the spread of the mean over textures, run to run
            for kind in ("img", "pix"):
                rows[name][f"mean {kind} std"] = float(runs_df[f"mean {kind}"].std(ddof=1))
    backbone = _backbone_ips(test, feats)
    table = pd.DataFrame(rows).T
    order = [c for c in table.columns if c.endswith(" img")] + [c for c in table.columns if c.endswith(" pix")]
    print(f"\nTextures (real CC0 photos, SYNTHETIC defects); AUROC fractions; recipe={args.recipe.name}; "
          f"backbone {feats['backbone']} (peers: its blocks 1 + 2); "
          f"image size {feats['image_size']}; torch threads={args.threads}")
    spread = [c for c in table.columns if c.endswith(" std")]
    print(table[[*order, *spread, "train s", "score img/s"]].to_string(float_format=lambda v: f"{v:.3f}"))
    print(f"backbone only ({feats['backbone']}, stages {feats['out_indices']}): {backbone:.1f} images/s")


if __name__ == "__main__":
    main()
