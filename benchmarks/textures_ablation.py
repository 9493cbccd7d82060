"""Ablation of the issue-#13 switches on the embedded textures: guards, start distributions, selection, map blur.

Per seed, one autoencoder is pre-trained on the training locations (a validation split of 10% of each texture's
training images is held out first); every DxMI variant starts from a copy of it. Choices are made on the validation
split (held-out normal images + SYNTHETIC Perlin anomalies made from other training images, never the test set):
the blur sigma of the energy map is the one with the best validation AUROC for the autoencoder alone (then kept for
every row), and the ``+ selection`` rows keep the iterate with the best validation AUROC.

Printed: per variant and seed, mean image / pixel AUROC over brick, grass, gravel (real CC0 photos, SYNTHETIC
defects) without blur and with the chosen blur, validation AUROC, E(data) / E(samples) at the end, seconds; then the
mean and standard deviation over seeds and the change against the autoencoder alone.

    python benchmarks/textures_ablation.py [--seeds 0 1 2] [--n-iter 300] [--only NAME ...] [--threads 2]
        [--set ae_pretrain_iter=3000 ...] [--unseen-kinds] [--trace-test] [--blurs 0 0.5] [--top-k 1 3 10]
        [--variant NAME KEY=V ...] [--rechoose] [--start-cache DIR]

``--start-cache DIR`` keeps each seed's pre-trained autoencoder start (the slow stage: 16-30 min per seed at the
paper's size on 2 cores) in DIR and reads it back in later runs with the same settings, so new DxMI rows cost only
their own training.

``--unseen-kinds`` adds columns ``unseen ...``: the same models on the same test tiles with defect kinds that neither
the benchmarks nor selection use (smudge, noise, mirror), so a choice is also checked on defects it was not made on.

``--top-k 1 3 10`` lets validation choose ``scoring.top_k`` (``pred_score`` = mean of the k largest cells of the
energy map) jointly with the blur; every (blur, top_k) pair's validation and TEST image AUROC for the autoencoder
alone is printed as a grid (the test figures are reported, never used for the choice).

``--extra-validation noise other`` adds columns ``val noise`` / ``val other``: the validation AUROC of every row
with the same held-out normals and synthetic anomalies filled from another source (``validation_source``), to see
which validation ranks the energies as the test's defects do; reported, never used for a choice.

``--trace-test`` is a DIAGNOSTIC: at every validation point of every DxMI row it also scores the TEST set (mean image
/ pixel AUROC, no blur) and prints the trace beside the validation AUROC, so a reader sees how far the best iterate
on the test set (an oracle no user has) lies above the start and whether validation follows it. Selection still reads
only the validation split; the test figures are printed, never used.

``--probe-negatives`` adds columns on what the game's negatives look like at the end of training, on 4096 training
vectors (the same seeded rows for every row of a seed): ``|x0-x|`` (start from its data row), ``|xT-x0|`` (how far
the sampler moved it), ``|xT-x|`` (the negative from its data row), all mean Euclidean norms of unit vectors, and
the mean energies ``E(x)``, ``E(x0)``, ``E(xT)`` under the trained energy and ``E0(xT)`` under the frozen start.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from dxmi_ad import recipes
from dxmi_ad.checkpoint import atomic_directory, load_model_dir, read_yaml_mapping, save_model_dir
from dxmi_ad.cli.common import CLIError
from dxmi_ad.cli.common import _parse_sets as parse_sets
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
from dxmi_ad.nn.model import DxMIModel
from dxmi_ad.scoring import ScoringSettings
from dxmi_ad.training.fit import build_model, train_model, with_config

PAPER_LRS = {"energy_lr": 1e-4, "sampler_lr": 1e-5, "value_lr": 1e-5, "sigma_lr": 1e-3}
GUARDS = {"project_samples": True, "fix_last_sigma": True, "last_sigma": 1e-3, "negative_l2_weight": 1.0}
NO_GUARDS = {"project_samples": False, "fix_last_sigma": False, "negative_l2_weight": 0.0}
# name -> overrides of the recipe's model section. Every variant is trained once with validation every
# --validate-every iterations; two rows come out of that run: the last iterate (the paper) and "+ selection" (the
# best validated state, the autoencoder start included).
VARIANTS: dict[str, dict] = {
    "DxMI recipe (as shipped)": {},  # the README's older rows "DxMI recipe (energy lr 1e-6)": the recipe then
    # negatives off the decoder manifold: MPDR's latent noise range, then also its input-space steps (on the recipe)
    "DxMI recipe, MPDR latent noise 0.05-0.3": {"init_noise_low": 0.05, "init_noise_high": 0.3},
    "DxMI recipe, MPDR latent noise + 10 input steps": {"init_noise_low": 0.05, "init_noise_high": 0.3,
                                                         "init_input_steps": 10, "init_input_step_size": 0.1,
                                                         "init_input_noise": 0.005},
    # MPDR's projection through the energy being trained, so the negatives follow its manifold (initial_tracks_energy)
    "DxMI recipe, start tracks the energy": {"initial_tracks_energy": True},
    "DxMI recipe, start tracks the energy, MPDR latent noise 0.05-0.3": {"initial_tracks_energy": True,
                                                                        "init_noise_low": 0.05, "init_noise_high": 0.3},
    # the start with each data row's reconstruction residual kept (init_keep_residual): moved along the manifold
    "DxMI recipe, start keeps the residual": {"init_keep_residual": True},
    "DxMI recipe, start keeps the residual, MPDR latent noise 0.05-0.3": {"init_keep_residual": True,
                                                                         "init_noise_low": 0.05, "init_noise_high": 0.3},
    # the sampler's own noise (4 steps of sigma 0.01 per feature: about 0.28 in norm on 192 features) swamps the
    # start's structure; a 10x quieter sampler keeps it (init_sigma)
    "DxMI recipe, sampler sigma 1e-3": {"init_sigma": 1e-3},
    "DxMI recipe, sampler sigma 1e-3, start keeps the residual": {"init_sigma": 1e-3, "init_keep_residual": True},
    "DxMI recipe, sampler sigma 1e-3, start keeps the residual, MPDR latent noise 0.05-0.3": {
        "init_sigma": 1e-3, "init_keep_residual": True, "init_noise_low": 0.05, "init_noise_high": 0.3},
    "DxMI recipe, sampler sigma 1e-3, MPDR latent noise 0.05-0.3": {
        "init_sigma": 1e-3, "init_noise_low": 0.05, "init_noise_high": 0.3},
    "DxMI recipe, sampler sigma 1e-3, start keeps the residual, latent noise 0.1-0.5": {
        "init_sigma": 1e-3, "init_keep_residual": True, "init_noise_low": 0.1, "init_noise_high": 0.5},
    "DxMI recipe, sampler sigma 1e-3, start keeps the residual, MPDR latent noise 0.05-0.3, 900 iterations": {
        "init_sigma": 1e-3, "init_keep_residual": True, "init_noise_low": 0.05, "init_noise_high": 0.3,
        "n_iter": 900},
    "DxMI recipe, sampler sigma 3e-3, start keeps the residual, MPDR latent noise 0.05-0.3": {
        "init_sigma": 3e-3, "init_keep_residual": True, "init_noise_low": 0.05, "init_noise_high": 0.3},
    # each guard off in turn, then all three (the recipe carries them; with_config rebuilds the sampler, so the
    # construction-time guards really change)
    "DxMI recipe without project_samples": {"project_samples": False},
    "DxMI recipe without fix_last_sigma": {"fix_last_sigma": False},
    "DxMI recipe without negative_l2_weight": {"negative_l2_weight": 0.0},
    "DxMI paper lrs, no guards": {**PAPER_LRS, **NO_GUARDS},
    "DxMI paper lrs + guards": {**PAPER_LRS, **GUARDS},
    "DxMI paper lrs + guards + feature-noise start": {**PAPER_LRS, **GUARDS, "initial": "feature_noise",
                                                      "init_noise_low": 0.02, "init_noise_high": 0.1},
    "tau=0, paper lrs + guards": {**PAPER_LRS, **GUARDS, "entropy_weight": 0.0, "velocity_weight": 0.0},
    # the sampler catching up: one energy update in 10 iterations (energy_update_every), at the paper's lrs and with
    # the sampler and value 10x faster
    "DxMI paper lrs + guards, energy 1 in 10": {**PAPER_LRS, **GUARDS, "energy_update_every": 10},
    "DxMI fast sampler + guards, energy 1 in 10": {**PAPER_LRS, **GUARDS, "energy_update_every": 10,
                                                   "sampler_lr": 1e-4, "value_lr": 1e-4},
}
BLURS = (0.0, 0.5, 1.0, 2.0)


def _start_key(config: DxMIConfig, feats: FeatureSettings) -> str:
    """What the autoencoder start depends on: its settings (seed and validation split included), the features and
    the dataset's version, hashed."""
    from dxmi_ad.data import textures

    settings = config.to_dict()
    # switches that act after the start only (what fills the validation anomalies, the average of the DxMI energy's
    # iterates, the negative phase's weight, the noise negatives) never change it, and came after starts were
    # cached: without them in the key, those are found
    for name in ("validation_source", "energy_ema", "negative_phase_weight", "noise_negative_fraction",
                 "noise_negative_low", "noise_negative_high"):
        settings.pop(name, None)
    blob = json.dumps({"config": settings, "features": dataclasses.asdict(feats),
                       "textures": textures._VERSION, "torch": torch.__version__}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@torch.no_grad()
def probe_negatives(model: DxMIModel, vectors: torch.Tensor, seed: int, n: int = 4096) -> dict[str, float]:
    """Distances and energies of ``model``'s negatives on ``n`` seeded rows of ``vectors`` (``--probe-negatives``).

    Args:
        model: A trained model with a data-perturbing start (``initial="autoencoder"`` or ``"feature_noise"``).
        vectors: ``(N, D)`` training vectors (unit norm for spherical features).
        seed: Seed of the rows and of the start's and sampler's noise.
        n: Rows probed (all when ``N < n``).

    Returns:
        Mean ``|x0-x|``, ``|xT-x0|``, ``|xT-x|`` (Euclidean) and mean ``E(x)``, ``E(x0)``, ``E(xT)`` (trained energy),
        ``E0(xT)`` (the frozen start's energy; NaN without one). The sampler's negatives only: the feature-noise
        negatives of ``noise_negative_fraction`` are not probed.

    Raises:
        ValueError: From :meth:`DxMIModel.initial_states` if the model's start cannot perturb the probed rows.
    """
    gen = torch.Generator().manual_seed(seed)
    x = vectors[torch.randperm(len(vectors), generator=gen)[:n]]
    was = model.training
    model.eval()
    x0 = model.initial_states(len(x), x, gen)
    xt = model.sampler.sample(x0, gen)[-1]
    out = {"|x0-x|": (x0 - x).norm(dim=1).mean().item(), "|xT-x0|": (xt - x0).norm(dim=1).mean().item(),
           "|xT-x|": (xt - x).norm(dim=1).mean().item(), "E(x)": model.score(x).mean().item(),
           "E(x0)": model.score(x0).mean().item(), "E(xT)": model.score(xt).mean().item(),
           "E0(xT)": model.initial_ae(xt).mean().item() if model.initial_ae is not None else float("nan")}
    model.train(was)
    return out


def pretrained_start(vectors: torch.Tensor, config: DxMIConfig, feats: FeatureSettings,
                     cache: Path | None) -> tuple[DxMIModel, float, str]:
    """The autoencoder start of ``config`` (its ``n_iter`` set to 0): read from ``cache`` when a run with the same
    settings wrote it there, else trained (and written there).

    Args:
        vectors: ``(N, D)`` float32 training feature vectors (only read when the start is trained).
        config: The run's config (seed and validation split included; ``dim == D``).
        feats: The feature settings the vectors come from (part of the cache key).
        cache: Folder of cached starts, one ``start-<hash>/`` per settings (``model.safetensors`` +
            ``config.json``, written whole through a temporary folder); None = always train.

    Returns:
        ``(model, seconds, how)``: the start in eval mode, the seconds spent, ``"trained"`` or ``"cached"``.

    Raises:
        ValueError: If a cached start is damaged or does not fit the model of ``config``.
    """
    config = config.replace(n_iter=0)
    folder = cache / f"start-{_start_key(config, feats)}" if cache is not None else None
    t0 = time.perf_counter()
    if folder is not None and folder.is_dir():
        tensors, _ = load_model_dir(folder)
        model = build_model(config)
        model.load_checkpoint_tensors(tensors)
        return model.eval(), time.perf_counter() - t0, "cached"
    model, _ = train_model(vectors, config)
    seconds = time.perf_counter() - t0
    if folder is not None:
        with atomic_directory(folder) as tmp:  # a killed run leaves no half-written start behind
            save_model_dir(tmp, model.checkpoint_tensors(), {"config": config.to_dict(),
                                                            "features": dataclasses.asdict(feats),
                                                            "train_seconds": seconds})
    return model.eval(), seconds, "trained"


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="textures", help="a shipped recipe name or a YAML file")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--n-iter", type=int, default=300, help="DxMI iterations of every variant but the recipe")
    parser.add_argument("--validate-every", type=int, default=50)
    parser.add_argument("--extra-validation", nargs="*", default=[], choices=["normal", "noise", "other"],
                        metavar="SOURCE", help="also report the validation AUROC of every row with synthetic anomalies "
                        "filled from SOURCE (validation_source: normal, noise, other): columns 'val SOURCE', never "
                        "used for a choice")
    parser.add_argument("--only", nargs="+", default=None, help="variant names (substring match)")
    parser.add_argument("--skip", nargs="+", default=None, help="variant names to leave out (substring match)")
    parser.add_argument("--unseen-kinds", action="store_true",
                        help="also score every model on the same test tiles with defect kinds that neither the "
                             "benchmarks nor selection use (smudge, noise, mirror: dxmi_ad.data.textures.UNSEEN_KINDS)")
    parser.add_argument("--trace-test", action="store_true",
                        help="diagnostic: also score the test set at every validation point and print the trace "
                             "(never used for a choice)")
    parser.add_argument("--probe-negatives", action="store_true",
                        help="diagnostic: report the distances and energies of the game's negatives at the end")
    parser.add_argument("--blurs", type=float, nargs="+", default=list(BLURS),
                        help=f"candidate scoring.blur_sigma values, chosen on validation (default: {BLURS})")
    parser.add_argument("--top-k", type=int, nargs="+", default=None,
                        help="candidate scoring.top_k values, chosen on validation with the blur (default: the "
                             "recipe's scoring.top_k, 1 = the maximum when it has none)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=V",
                        help="override a key of the recipe's model section for every row, the autoencoder start "
                             "included (e.g. ae_pretrain_iter=3000), or of its features section with a features. "
                             "prefix (e.g. features.neighbourhood=3); repeatable")
    parser.add_argument("--start-cache", type=Path, default=None, metavar="DIR",
                        help="keep each seed's pre-trained autoencoder start in DIR (safetensors + JSON, one folder "
                             "per settings hash: config, seed, features, dataset and torch versions); a later run with "
                             "the same settings reads it instead of training it (its row's 'seconds' then say so)")
    parser.add_argument("--rechoose", action="store_true",
                        help="also choose the (blur, top_k) pair on validation for every row's own model, not only "
                             "for the autoencoder's (columns 'image own', 'pixel own'; the per-seed rows also print the "
                             "chosen pair as 'own scoring')")
    parser.add_argument("--variant", dest="extra", action="append", nargs="+", default=[], metavar="NAME [KEY=V]",
                        help="an extra DxMI row defined here: a name, then overrides of the recipe's model section "
                             "(e.g. --variant 'quiet, neg 2' init_sigma=0.001 negative_l2_weight=2); it runs the "
                             "recipe's n_iter unless n_iter is given; repeatable, always run (--only does not filter "
                             "it)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    recipe = read_yaml_mapping(recipes.resolve(args.recipe))
    parsed = parse_sets(args.sets)
    sets = {k.removeprefix("model."): v for k, v in parsed.items() if not k.startswith("features.")}
    feature_sets = {k.removeprefix("features."): v for k, v in parsed.items() if k.startswith("features.")}
    recipe = {**recipe, "model": {**recipe["model"], **sets}, "features": {**recipe["features"], **feature_sets}}
    if args.top_k is None:  # the recipe's own aggregation, so "as shipped" means as shipped
        args.top_k = [int((recipe.get("scoring") or {}).get("top_k", 1))]
    feats = FeatureSettings(**{**recipe["features"], "out_indices": tuple(recipe["features"]["out_indices"])})
    samples = list_mvtec(write_textures())
    train = [s for s in samples if s.split == "train"]
    test = [s for s in samples if s.split == "test"]
    unseen = [s for s in list_mvtec(write_textures(unseen_kinds=True)) if s.split == "test"] if args.unseen_kinds \
        else []
    size = (feats.image_size, feats.image_size)
    variants = {k: v for k, v in VARIANTS.items() if (not args.only or any(o in k for o in args.only))
                and not any(o in k for o in args.skip or [])}
    for name, *overrides in args.extra:  # "DxMI recipe, " so the row keeps the recipe's n_iter unless it sets one
        try:
            keys = parse_sets(overrides)
        except CLIError as err:  # an item that is not KEY=VALUE
            parser.error(f"--variant {name!r}: {str(err).replace('--set expects', 'expects')}")
        shared = sorted(k for k in keys if k.startswith(("validation_", "validate_", "features.", "seed")))
        if shared:  # the validation split, features and seed are built once per seed for every row
            parser.error(f"--variant {name!r}: {', '.join(shared)} apply to every row; give them with --set")
        if f"DxMI recipe, {name}" in variants or name in VARIANTS:
            parser.error(f"--variant {name!r}: a row of that name already exists")
        try:  # a typo fails here, before any training, not when the row is reached
            DxMIConfig.from_dict({**recipe["model"], **keys})
        except (TypeError, ValueError) as err:
            parser.error(f"--variant {name!r}: {err}")
        variants[f"DxMI recipe, {name}"] = keys
    rows, traces, grid = [], [], []
    test_feats = masks = None
    unseen_feats = unseen_masks = None
    for seed in args.seeds:
        cfg0 = DxMIConfig.from_dict({**recipe["model"], "seed": seed, "validate_every": args.validate_every})
        det = ImageDetector(cfg0, feats)
        fit_part, val_part = split_calibration(train, cfg0.validation_fraction, seed + 1)
        validate = det._validation(val_part, fit_part, skip_bad_files=False)
        extra_validate = {}  # the same held-out normals, other anomaly sources: reported, never used for a choice
        for src in args.extra_validation:
            det.config = cfg0.replace(validation_source=src)
            extra_validate[src] = det._validation(val_part, fit_part, skip_bad_files=False)
        det.config = cfg0
        if test_feats is None:
            test_feats, masks = features_and_masks(test, det._extractor(), feats.image_size)
            if unseen:
                unseen_feats, unseen_masks = features_and_masks(unseen, det._extractor(), feats.image_size)
        train_feats, _ = extract_training_features(fit_part, feats, det._extractor())
        n, h, w, c = train_feats.shape
        vectors = torch.from_numpy(np.asarray(train_feats).reshape(n * h * w, c))
        base_cfg = cfg0.replace(dim=c)
        base, ae_s, how = pretrained_start(vectors, base_cfg, feats, args.start_cache)
        print(f"seed {seed}: autoencoder start {how} in {ae_s:.0f} s", flush=True)
        def choose_scoring(model, validate=validate) -> tuple[ScoringSettings, dict]:
            """The (blur, top_k) pair of the best validation AUROC for ``model`` (ties: the smaller), and the grid."""
            by = {}
            for sigma in args.blurs:
                for k in args.top_k:
                    det.scoring = ScoringSettings(blur_sigma=sigma, top_k=k)
                    by[sigma, k] = validate(model)
            blur, top_k = max(by, key=lambda sk: (round(by[sk], 4), -sk[0], -sk[1]))
            return ScoringSettings(blur_sigma=blur, top_k=top_k), by

        # blur (and top_k) are chosen on validation data, for the autoencoder alone, then kept for every row
        chosen, val_by = choose_scoring(base)
        print(f"seed {seed}: validation AUROC of the autoencoder by (blur sigma, top_k) "
              f"{ {sk: round(v, 4) for sk, v in val_by.items()} } -> {chosen}", flush=True)
        def mean_metrics(model, scoring: ScoringSettings, kinds: str = "test") -> pd.Series:
            """Mean-over-categories metrics of ``model`` on the test tiles (``kinds="unseen"``: the unseen kinds).

            The detector's scoring and model are left as set here (callers set them before the next use).
            """
            samples, feats_, masks_ = (test, test_feats, masks) if kinds == "test" else (unseen, unseen_feats,
                                                                                        unseen_masks)
            det.scoring, det.model_ = scoring, model
            scored = {**det.score_feature_maps(feats_, size), "gt_mask": masks_}
            return metrics_table(samples, scored).set_index("category").loc["mean"]

        if len(args.top_k) > 1:  # the grid's test figures: reported, never used for the choice
            for (sigma, k), v in val_by.items():
                grid.append({"seed": seed, "blur": sigma, "top_k": k, "val AUROC": v,
                             "TEST image": mean_metrics(base, ScoringSettings(blur_sigma=sigma, top_k=k))[
                                 "image_AUROC"]})

        def evaluate(model, name: str, seconds: float, history: list, seed: int = seed,
                     chosen: ScoringSettings = chosen) -> None:
            out = {"variant": name, "seed": seed, "blur": chosen.blur_sigma, "top_k": chosen.top_k}
            for scoring, tag in ((ScoringSettings(), ""), (chosen, " blur")):
                mean = mean_metrics(model, scoring)
                out[f"image{tag}"] = mean["image_AUROC"]
                out[f"pixel{tag}"] = mean["pixel_AUROC"]
                if tag:
                    out["AUPRO blur"] = mean.get("pixel_AUPRO", np.nan)
                    out["val AUROC"] = validate(model)
                    for src, extra in extra_validate.items():
                        out[f"val {src}"] = extra(model)
                if unseen:  # the same model on defect kinds no choice was made on
                    mean = mean_metrics(model, scoring, "unseen")
                    out[f"unseen image{tag}"] = mean["image_AUROC"]
                    out[f"unseen pixel{tag}"] = mean["pixel_AUROC"]
            if args.rechoose:  # this model's own scoring, chosen on validation over the same grid
                best = chosen if model is base else choose_scoring(model)[0]
                mean = mean_metrics(model, best)
                out["image own"], out["pixel own"] = mean["image_AUROC"], mean["pixel_AUROC"]
                out["own scoring"] = f"{best.blur_sigma:g}/{best.top_k}"
                det.scoring = chosen
            if args.probe_negatives and model is not base:
                out.update(probe_negatives(model, vectors, seed))
            energies = [r for r in history if "energy_samples" in r]
            out["E(data)"] = energies[-1]["energy_data"] if energies else np.nan
            out["E(samples)"] = energies[-1]["energy_samples"] if energies else np.nan
            out["selected it"] = history[-1].get("selected_iteration", np.nan) if history else np.nan
            out["E(samples)/Emax"] = energies[-1].get("energy_saturation", np.nan) if energies else np.nan
            out["seconds"] = seconds
            rows.append(out)
            # a header again whenever the columns change (DxMI rows add the probe and own-scoring columns)
            new_columns = len(rows) == 1 or list(out) != list(rows[-2])
            print(pd.DataFrame([out]).to_string(index=False, header=new_columns,
                                                float_format=lambda v: f"{v:.3f}"), flush=True)

        def test_auroc(model) -> dict[str, float]:
            """Mean test image / pixel AUROC without blur (``--trace-test`` only; the scorer's blur is restored)."""
            scoring = det.scoring
            mean = mean_metrics(model, ScoringSettings(blur_sigma=0.0))
            det.scoring = scoring
            return {"TEST image": mean["image_AUROC"], "TEST pixel": mean["pixel_AUROC"]}

        evaluate(base, "autoencoder alone", ae_s, [])
        for name, overrides in variants.items():
            n_iter = {} if name.startswith("DxMI recipe") else {"n_iter": args.n_iter}
            cfg = base_cfg.replace(**{**overrides, **n_iter})
            start = with_config(base, cfg)  # construction-time switches (sampler sigmas, guards) included
            det.scoring = chosen  # selection scores with the chosen blur and top_k
            seen: list[dict[str, torch.Tensor]] = []

            def watched(model, seen=seen, name=name, seed=seed) -> float:  # keeps the state of the last call
                seen[:] = [{k: v.detach().clone() for k, v in model.checkpoint_tensors().items()}]
                score = validate(model)
                if args.trace_test:  # diagnostic only: printed, never returned to selection
                    check = sum(t["variant"] == name and t["seed"] == seed for t in traces)
                    traces.append({"variant": name, "seed": seed, "check": check, "val AUROC": score,
                                   **test_auroc(model)})
                return score

            t0 = time.perf_counter()
            model, history = train_model(vectors, cfg, model=start, validate=watched)
            seconds = time.perf_counter() - t0
            last = copy.deepcopy(model)
            last.load_checkpoint_tensors(seen[0])
            evaluate(last.eval(), name, seconds, [r for r in history if "selected_iteration" not in r])
            evaluate(model, f"{name} + selection", seconds, history)
    if grid:
        g = pd.DataFrame(grid).groupby(["blur", "top_k"])[["val AUROC", "TEST image"]]
        print("\nAutoencoder alone by (blur, top_k): validation and TEST image AUROC, mean ± std over seeds (the test "
              "figures were not used for any choice)")
        print(pd.concat([g.mean(), g.std().add_suffix(" std")], axis=1).to_string(float_format=lambda v: f"{v:.4f}"))
    if traces:
        trace = pd.DataFrame(traces)
        print("\nDIAGNOSTIC (--trace-test): validation AUROC and TEST AUROC (no blur) at every validation point (check "
              f"k = iteration k x {args.validate_every}, check 0 = the start, the last = the last iteration); the test "
              "figures were not used for any choice")
        print(trace.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
        g = trace.groupby(["variant", "seed"], sort=False)
        summary = pd.DataFrame({
            "start": g["TEST image"].first(),
            "selected (best validation)": g.apply(
                lambda t: t["TEST image"].iloc[int(np.argmax(t["val AUROC"].to_numpy()))]),
            "oracle (best test)": g["TEST image"].max(), "last": g["TEST image"].last()})
        summary["oracle - start"] = summary["oracle (best test)"] - summary["start"]
        print(summary.to_string(float_format=lambda v: f"{v:.4f}"))
    table = pd.DataFrame(rows)
    cols = ["image", "pixel", "image blur", "pixel blur", "AUPRO blur", "val AUROC"]
    cols += [f"val {src}" for src in args.extra_validation]
    cols += [f"unseen {c}" for c in ("image", "pixel", "image blur", "pixel blur")] if unseen else []
    cols += ["image own", "pixel own"] if args.rechoose else []
    mean = table.groupby("variant", sort=False)[cols].mean()
    std = table.groupby("variant", sort=False)[cols].std()
    ae = mean.loc["autoencoder alone"]
    out = pd.DataFrame({c: [f"{m:.3f} ± {s:.3f}" for m, s in zip(mean[c], std[c].fillna(0))] for c in cols},
                       index=mean.index)
    out["d image blur"] = [f"{v:+.3f}" for v in mean["image blur"] - ae["image blur"]]
    out["d pixel blur"] = [f"{v:+.3f}" for v in mean["pixel blur"] - ae["pixel blur"]]
    out["seconds"] = table.groupby("variant", sort=False)["seconds"].mean().round(0).astype(int)
    print(f"\nTextures ablation (mean over brick, grass, gravel; SYNTHETIC defects), seeds {args.seeds}, mean ± std; "
          f"recipe {args.recipe} {' '.join(args.sets)}; DxMI rows start from the seed's autoencoder, {args.n_iter} iterations (rows named "
          f"'DxMI recipe...', --variant rows included: the recipe's n_iter unless they set one); blur and top_k chosen on validation per seed ('blur' columns); threads {args.threads}")
    print(out.to_string())


if __name__ == "__main__":
    main()
