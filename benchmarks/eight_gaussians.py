"""Paper Table 1 on this machine: DxMI on 2-D 8 Gaussians (T = 5; the energy network: recipe and ablation).

Prints sliced Wasserstein-2 (1,000 projections, 10k generated vs 10k test samples; and its mean over 10
independent 10k data draws, a less noisy estimate: ``sw_over_draws``) and the AUC of the energy
separating 10k test points from 10k uniform points on [-4, 4]^2 (the box matching the paper's ideal AUC of about
0.906, docs/paper_map.md), beside the paper's numbers, with seconds per run. Settings: recipes/eight_gaussians.yaml.

    python benchmarks/eight_gaussians.py [--n-iter N] [--seed 0] [--defaults-seeds 3] [--ceilings]
        [--ablation [--ablation-rows TEXT ...]]
        [--energy-by-dimension 2,3,4,5,6,8 [--dimension-seeds 3]]

``--defaults-seeds N`` adds the rows a user who tunes nothing gets: ``DxMIDetector()`` (no recipe; on 2-D data
``energy_model="auto"`` builds the MLP energy) and ``DxMIDetector(energy_model="autoencoder")`` (the defaults of wider
tables) fitted on the same 50k training points with seeds 0..N-1 (AUC against the uniform box on the test and on the
validation draws, fit seconds), mean and standard deviation.
``--ablation`` trains the recipe with its issue-#13 switches undone one by one (energy-only selection, selection,
Fourier features, the leaky ReLU, the separate energy: back to the paper's shared energy V(x, T); gamma 1) and with the
energy refit (``energy_refit_iter``) for ``--ablation-seeds`` seeds and prints the AUC on VALIDATION draws (fresh 8
Gaussians vs the uniform box, seeds the test never uses: the choice is made there), the test AUC and SW beside it.
``--energy-by-dimension 2,3,4,5,6,8`` compares ``DxMIDetector(energy_model="autoencoder")`` with
``energy_model="mlp"`` (each with its defaults) on 8-Gaussian mixtures in D dimensions against the Gaussian with the
same mean and covariance (near anomalies) and on a standard normal blob against the blob shifted by 2 in every
feature (far anomalies): the synthetic choice set behind ``energy_model="auto"``'s switch (``LOW_DIM_FEATURES``).
``--ceilings`` prints two reference AUCs on the same test points and box: the true mixture density, and the best
an autoencoder energy with a circle of codes can do here (the squared distance to the ring through the centres,
the closed curve that passes through all eight modes; ``DxMIDetector()`` on 2-D data has such a code).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

from dxmi_ad import DxMIDetector, recipes
from dxmi_ad.data.synthetic import EIGHT_GAUSSIANS_CENTRES, EIGHT_GAUSSIANS_STD, eight_gaussians, uniform_box
from dxmi_ad.metrics import auroc, sliced_wasserstein

RECIPE = Path(__file__).resolve().parents[1] / "dxmi_ad" / "recipes" / "eight_gaussians.yaml"
# (label, pretrain, tau, paper SW, paper AUC) -- docs/paper_map.md
ROWS = [
    ("DDPM T=5 (pretrained sampler alone)", True, None, 0.967, None),
    ("DxMI pretrain tau=0", True, 0.0, 0.074, 0.707),
    ("DxMI pretrain tau=0.01", True, 0.01, 0.074, 0.751),
    ("DxMI pretrain tau=0.1", True, 0.1, 0.068, 0.898),
    ("DxMI pretrain tau=1", True, 1.0, 1.030, 0.842),
    ("DxMI no pretrain tau=0.1", False, 0.1, 0.076, 0.883),
]


SW_DRAWS = 10  # independent 10k data draws per SW estimate (seeds 1000..1009; never the test or validation draws)


def sw_over_draws(samples: np.ndarray, draws: int = SW_DRAWS) -> tuple[float, float]:
    """``(mean, std)`` of the sliced Wasserstein-2 of ``samples`` ``(10000, 2)`` to ``draws`` independent 10k-point
    draws of the data. One draw is a noisy yardstick: the same samples measured 0.074 against the test draw and 0.101
    against the validation draw (seed 0 of the recipe; over 10 draws 0.093 +/- 0.010), and two data samples are
    0.044 +/- 0.009 apart (the floor)."""
    if not np.isfinite(samples).all():
        return float("inf"), float("nan")
    values = [sliced_wasserstein(samples, eight_gaussians(len(samples), 1000 + k)) for k in range(draws)]
    return float(np.mean(values)), float(np.std(values))


def mode_width(samples: np.ndarray) -> float:
    """Root mean square distance per axis of ``samples (n, 2)`` to their nearest of the eight centres (the data:
    0.354 = :data:`~dxmi_ad.data.synthetic.EIGHT_GAUSSIANS_STD`); inf if any sample is not finite (as the SW columns). The sampler's modes come
    out wider than the data's; the gamma-regularised game's fixed point explains part of that (README, "Why the
    modes are too wide")."""
    if not np.isfinite(samples).all():
        return float("inf")
    centres = EIGHT_GAUSSIANS_CENTRES
    d = np.linalg.norm(samples[:, None, :] - centres[None], axis=2)
    return float(np.sqrt(((samples - centres[d.argmin(1)]) ** 2).mean()))


def run(n_iter: int | None, seed: int, quick: bool = False) -> pd.DataFrame:
    """Train every row of Table 1 and measure it (``n_iter`` None: the recipe's); returns the table."""
    recipe = recipes.detector_params(yaml.safe_load(RECIPE.read_text()), str(RECIPE))
    n_iter = recipe["n_iter"] if n_iter is None else n_iter
    train = eight_gaussians(50_000, seed)
    test, noise = eight_gaussians(10_000, seed + 123), uniform_box(10_000, seed + 7)
    records = []
    for label, pretrain, tau, paper_sw, paper_auc in ROWS[:4] if quick else ROWS:
        params = {**recipe, "random_state": seed, "device": "cpu", "n_iter": 0 if tau is None else n_iter}
        if tau is not None:
            params.update(entropy_weight=tau, velocity_weight=tau)
        if not pretrain:
            params["sampler_pretrain_iter"] = 0
        t0 = time.perf_counter()
        det = DxMIDetector(**params).fit(train)
        seconds = time.perf_counter() - t0
        samples = det.sample(10_000, random_state=seed + 11)
        sw = sliced_wasserstein(samples, test) if np.isfinite(samples).all() else float("inf")
        auc = auroc(det.energy(test), det.energy(noise)) if tau is not None else float("nan")
        records.append({"method": label, "SW": sw, f"SW, {SW_DRAWS} draws": sw_over_draws(samples)[0],
                        "paper SW": paper_sw, "mode width": mode_width(samples), "AUC": auc,
                        "paper AUC": paper_auc, "seconds": seconds,
                        "last sigma_t": np.round(det.model_.sampler.sigmas().detach().numpy(), 3).tolist()})
    return pd.DataFrame(records)


def defaults_rows(seeds: int) -> pd.DataFrame:
    """``DxMIDetector()`` with nothing set (``energy_model="auto"``: the MLP energy on 2-D data) and with
    ``energy_model="autoencoder"`` (the defaults of wider tables), per seed: AUC on the test draws and on the
    validation draws (each vs its uniform box), fit seconds; plus mean / std per energy."""
    train = eight_gaussians(50_000, 0)
    test, noise = eight_gaussians(10_000, 123), uniform_box(10_000, 7)
    val, val_noise = eight_gaussians(10_000, 555), uniform_box(10_000, 556)
    rows = []
    for energy in ("auto", "autoencoder"):
        for seed in range(seeds):
            t0 = time.perf_counter()
            det = DxMIDetector(energy_model=energy, random_state=seed).fit(train)
            seconds = time.perf_counter() - t0
            rows.append({"energy_model": energy, "seed": seed, "AUC": auroc(det.energy(test), det.energy(noise)),
                         "validation AUC": auroc(det.energy(val), det.energy(val_noise)), "seconds": seconds})
    table = pd.DataFrame(rows)
    cols = ["AUC", "validation AUC", "seconds"]
    stats = table.groupby("energy_model", sort=False)[cols]
    summary = pd.concat([stats.mean().assign(seed="mean"), stats.std(ddof=0).assign(seed="std")]).reset_index()
    return pd.concat([table, summary])


def mixture_with_moment_matched_anomalies(dim: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A synthetic choice set for the energy by dimension: ``(train (20000, dim), normal (5000, dim), anomalies
    (5000, dim))``; normal rows from 8 Gaussians (std 0.5) with centres uniform in ``[-3, 3]^dim``, anomalies from
    the Gaussian with the training rows' mean and covariance (same first two moments, no modes)."""
    rng = np.random.default_rng(100 + dim + 1000 * seed)
    centres = rng.uniform(-3, 3, size=(8, dim))

    def draw(n: int) -> np.ndarray:
        return (centres[rng.integers(8, size=n)] + 0.5 * rng.standard_normal((n, dim))).astype(np.float32)

    train, normal = draw(20_000), draw(5_000)
    fake = rng.multivariate_normal(train.mean(0), np.cov(train.T), size=5_000).astype(np.float32)
    return train, normal, fake


def shifted_blob(dim: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The far-outlier counterpart: ``(train (2000, dim), normal (500, dim), anomalies (500, dim))``, standard
    normal rows against the same shifted by 2 in every feature."""
    rng = np.random.default_rng(200 + dim + 1000 * seed)
    train, normal = rng.standard_normal((2_000, dim)), rng.standard_normal((500, dim))
    return train, normal, rng.standard_normal((500, dim)) + 2.0


def energy_by_dimension(dims: list[int], seeds: int) -> pd.DataFrame:
    """AUROC of ``DxMIDetector`` defaults with the autoencoder and with the MLP energy on the mixtures of
    :func:`mixture_with_moment_matched_anomalies` (near anomalies) and on :func:`shifted_blob` (far anomalies), data
    seeds ``0..seeds-1``, model seed 0: where ``energy_model="auto"`` switches (``LOW_DIM_FEATURES``)."""
    rows = []
    for dim in dims:
        for seed in range(seeds):
            for task, make in (("mixture vs moment-matched Gaussian", mixture_with_moment_matched_anomalies),
                               ("blob vs blob + 2", shifted_blob)):
                train, normal, fake = make(dim, seed)
                for energy in ("autoencoder", "mlp"):
                    t0 = time.perf_counter()
                    det = DxMIDetector(energy_model=energy, random_state=0).fit(train)
                    rows.append({"task": task, "features": dim, "data seed": seed, "energy_model": energy,
                                 "AUC": auroc(det.energy(normal), det.energy(fake)),
                                 "seconds": time.perf_counter() - t0})
    table = pd.DataFrame(rows)
    return table.pivot_table(index=["task", "features"], columns="energy_model", values="AUC",
                             aggfunc=["mean", "std"])


# (label, model-key overrides of the recipe) -- the recipe's issue-#13 switches undone one at a time, and the refit
_GAMMA_1 = {"energy_l2_weight": 1.0}  # the paper's default gamma (§3.2), the recipe's before 0.5
_NO_BASE = {**_GAMMA_1, "energy_quadratic_weight": 0.0}
_LAST_ITERATE = {**_NO_BASE, "energy_fourier_features": 0, "validate_every": 0, "select_energy_only": False}
ABLATION = [
    ("paper: shared energy V(x, T), SiLU", {**_LAST_ITERATE, "energy_model": "shared", "activation": "silu"}),
    ("separate MLP energy, SiLU", {**_LAST_ITERATE, "activation": "silu"}),
    ("separate MLP energy, leaky ReLU", _LAST_ITERATE),
    ("  + energy refit (1000 steps)", {**_LAST_ITERATE, "energy_refit_iter": 1000}),
    ("  + Fourier features, last iterate", {**_NO_BASE, "validate_every": 0, "select_energy_only": False}),
    ("  + Fourier features + selection of the whole model", {**_NO_BASE, "select_energy_only": False}),
    ("  + Fourier features + selection of the energy (previous recipe)", _NO_BASE),
    ("  + the Gaussian base energy 0.1 |x|^2 / 2 (gamma 1: the recipe before gamma 0.5)", _GAMMA_1),
    ("recipe: + gamma 0.5 instead of 1", {}),
]


def ablation(seeds: int, n_iter: int | None = None, rows: list[str] | None = None) -> pd.DataFrame:
    """Each :data:`ABLATION` row (or those whose label contains one of ``rows``) for seeds ``0..seeds-1``:
    validation AUC (fresh draws, seeds 555 / 556), test AUC (the benchmark's draws), SW, the sampler's mode width
    and seconds; the rows with selection choose on the estimator's own held-out training rows (feature-swap
    anomalies), never on these draws."""
    raw = yaml.safe_load(RECIPE.read_text())
    train = eight_gaussians(50_000, 0)
    test, noise = eight_gaussians(10_000, 123), uniform_box(10_000, 7)
    val, val_noise = eight_gaussians(10_000, 555), uniform_box(10_000, 556)
    records = []
    for label, change in ABLATION:
        if rows and not any(r in label for r in rows):
            continue
        model = {**raw["model"], **change, **({"n_iter": n_iter} if n_iter else {})}
        params = recipes.detector_params({**raw, "model": model}, str(RECIPE))
        for seed in range(seeds):
            t0 = time.perf_counter()
            det = DxMIDetector(**{**params, "random_state": seed, "device": "cpu"}).fit(train)
            seconds = time.perf_counter() - t0
            samples = det.sample(10_000, random_state=seed + 11)
            records.append({"row": label, "seed": seed, "validation AUC": auroc(det.energy(val), det.energy(val_noise)),
                            "test AUC": auroc(det.energy(test), det.energy(noise)),
                            "SW": sliced_wasserstein(samples, test), f"SW, {SW_DRAWS} draws": sw_over_draws(samples)[0],
                            "mode width": mode_width(samples), "seconds": seconds})
    table = pd.DataFrame(records)
    if table.empty:
        msg = (f"nothing to run: --ablation-seeds {seeds}, --ablation-rows {rows} "
               f"(rows: {[label.strip() for label, _ in ABLATION]})")
        raise SystemExit(msg)
    columns = ["validation AUC", "test AUC", "SW", f"SW, {SW_DRAWS} draws", "mode width", "seconds"]
    return table.groupby("row", sort=False)[columns].agg(["mean", "std"])


def ceilings() -> pd.DataFrame:
    """AUC (test points vs the uniform box, the defaults rows' draws) of the true log-density and of the distance to
    the ring of radius ``4 / 1.414`` through the eight centres (the autoencoder class's best closed curve)."""
    test, noise = eight_gaussians(10_000, 123).astype(np.float64), uniform_box(10_000, 7).astype(np.float64)
    centers, sigma = EIGHT_GAUSSIANS_CENTRES, EIGHT_GAUSSIANS_STD

    def neg_log_density(x: np.ndarray) -> np.ndarray:
        d2 = ((x[:, None, :] - centers[None]) ** 2).sum(-1)
        return -np.log(np.exp(-d2 / (2 * sigma**2)).sum(1))

    def ring_distance(x: np.ndarray) -> np.ndarray:
        return (np.linalg.norm(x, axis=1) - 4.0 / 1.414) ** 2

    return pd.DataFrame([{"score": "true density (-log p)", "AUC": auroc(neg_log_density(test), neg_log_density(noise))},
                         {"score": "distance to the ring through the centres (autoencoder ceiling)",
                          "AUC": auroc(ring_distance(test), ring_distance(noise))}])


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-iter", type=int, default=None, help="DxMI iterations per run (default: the recipe's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--defaults-seeds", type=int, default=0, help="also DxMIDetector() defaults, N seeds")
    parser.add_argument("--defaults-only", action="store_true", help="only the defaults rows")
    parser.add_argument("--ceilings", action="store_true", help="only the reference AUCs (see the module docstring)")
    parser.add_argument("--ablation", action="store_true", help="only the ablation of the recipe's switches")
    parser.add_argument("--ablation-seeds", type=int, default=3, help="seeds per ablation row")
    parser.add_argument("--ablation-rows", nargs="+", default=None, metavar="TEXT",
                        help="only the ablation rows whose label contains one of these texts")
    parser.add_argument("--ablation-n-iter", type=int, default=None, help="DxMI iterations per ablation run "
                        "(default: the recipe's)")
    parser.add_argument("--energy-by-dimension", default=None, metavar="DIMS",
                        help="only the autoencoder vs MLP defaults on mixtures of these dimensions, e.g. 2,3,4,5,6,8")
    parser.add_argument("--dimension-seeds", type=int, default=3, help="data seeds per dimension")
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.energy_by_dimension:
        dims = [int(d) for d in args.energy_by_dimension.split(",")]
        print(f"DxMIDetector defaults by energy: 8-Gaussian mixtures in D dims vs their moment-matched Gaussian, "
              f"{args.dimension_seeds} data seeds (mean, std), torch threads=2")
        print(energy_by_dimension(dims, args.dimension_seeds).to_string(float_format=lambda v: f"{v:.3f}"))
        return
    if args.ceilings:
        print(ceilings().to_string(index=False, float_format=lambda v: f"{v:.4f}"))
        return
    if args.ablation:
        print(f"8 Gaussians ablation, recipe={RECIPE.name} with one switch undone per row, "
              f"{args.ablation_seeds} seeds (mean, std), torch threads=2")
        table = ablation(args.ablation_seeds, args.ablation_n_iter, args.ablation_rows)
        print(table.to_string(float_format=lambda v: f"{v:.3f}"))
        return
    if args.defaults_seeds:
        print("DxMIDetector() defaults on 8 Gaussians (50k training points), torch threads=2")
        print(defaults_rows(args.defaults_seeds).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    if args.defaults_only:
        return
    table = run(args.n_iter, args.seed)
    floor = sliced_wasserstein(eight_gaussians(10_000, 99), eight_gaussians(10_000, 123))
    floor_mean, floor_std = sw_over_draws(eight_gaussians(10_000, 99))
    print(f"8 Gaussians, T=5, n_iter={args.n_iter or 'recipe'}, seed={args.seed}, recipe={RECIPE.name}, torch threads=2")
    print(f"finite-sample SW floor (two independent 10k data samples): {floor:.3f} against the test draw, "
          f"{floor_mean:.3f} +/- {floor_std:.3f} over {SW_DRAWS} draws; 'SW' is against the test draw, "
          f"'SW, {SW_DRAWS} draws' the mean over {SW_DRAWS} independent draws (less noisy)")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
