"""Few-step generation with pixel-space DxMI on real digits (scikit-learn digits 8x8, MNIST-5k 28x28).

For each dataset (all ten classes, unconditional) and each T in ``--steps``:

* ``DDPM K=1000``: the pre-trained sampler network with all 1000 steps (the many-step reference);
* ``DDPM -> T (start)``: the same network re-scheduled to T steps (FastDPM VAR, posterior sigmas): the paper's
  starting point (docs/paper_map.md, "FastDPM†");
* ``DxMI T``: DxMI fine-tuning from that start (recipes/pixel_<dataset>.yaml: sigmoid time cost, tau1 0.1, tau2 0.01);
* ``DxMI T, tau=0``: the entropy ablation (``entropy_weight`` 0);
* ``DxMI T + guidance``: value guidance lambda = 0.5 at sampling time (paper's sign).

Quality, on ``--n-samples`` generated images against all real images: Fréchet distance (FD) and k-NN precision /
recall (k = 3, Kynkäänniemi et al. 2019) in the 128-d feature space of a small digit CNN trained on the real data
(dxmi_ad.sample_quality; Inception weights cannot be had offline). The floor (two halves of the real set) is printed.
Goals (issue #7): DxMI at T=10 at most half the start's FD, within 2x of the 1000-step reference; tau = 0.1 better
than tau = 0. A PNG grid of 64 samples per setting is written to ``--out``.

    python benchmarks/generation.py [--datasets digits,mnist] [--steps 4,10] [--n-samples 1000] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

from dxmi_ad import recipes
from dxmi_ad.cli.pixel import write_grid
from dxmi_ad.data.tabular import load_mnist5k
from dxmi_ad.pixel import PixelDetector, pixel_config
from dxmi_ad.sample_quality import fit_digit_classifier, sample_quality


def load_images(name: str) -> tuple[np.ndarray, np.ndarray]:
    """All images ``(N, S, S)`` in [0, 1] and labels of ``digits`` or ``mnist``."""
    if name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        return (d.images / 16.0).astype(np.float32), d.target
    X, y = load_mnist5k()
    return (X / 255.0).reshape(-1, 28, 28).astype(np.float32), y


def recipe_for(name: str, overrides: dict) -> dict:
    """The dataset's pixel recipe with overrides (sizes, lengths)."""
    recipe = yaml.safe_load(recipes.path(f"pixel_{name}").read_text())
    return {**recipe, **overrides}


def run_dataset(name: str, steps: list[int], n_samples: int, out: Path, overrides: dict, seed: int) -> pd.DataFrame:
    """All rows of one dataset; writes grids and returns the table."""
    images, labels = load_images(name)
    size = images.shape[-1]
    t0 = time.perf_counter()
    clf = fit_digit_classifier(images, labels, seed=seed, num_threads=None)
    clf_s = time.perf_counter() - t0
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(images))
    floor = sample_quality(clf, images[perm[::2]], images[perm[1::2]])
    rows = [{"setting": "real vs real (floor)", "T": None, **floor, "train s": None, "sample s": None}]
    print(f"[{name}] classifier held-out accuracy {clf.val_accuracy:.3f} ({clf_s:.0f} s); floor {floor}", flush=True)
    recipe = recipe_for(name, overrides)
    t0 = time.perf_counter()
    pre = PixelDetector(pixel_config(1, size, **{**recipe, "seed": seed})).pretrain(images)
    pre_s = time.perf_counter() - t0
    print(f"[{name}] DDPM pre-training: {recipe['sampler_pretrain_iter']} iterations, {pre_s:.0f} s", flush=True)

    def measure(setting: str, T: int | None, det: PixelDetector, train_s: float | None, **kw) -> None:
        t = time.perf_counter()
        fake = det.sample(n_samples, seed=seed + 1, **kw)
        sample_s = time.perf_counter() - t
        q = sample_quality(clf, images, fake)
        rows.append({"setting": setting, "T": T, **q, "train s": train_s, "sample s": sample_s})
        write_grid(fake[:64], out / f"{name}_{setting.replace(' ', '_').replace('=', '').replace(',', '')}.png")
        print(f"[{name}] {setting:<28} FD {q['frechet']:8.3f}  P {q['precision']:.3f}  R {q['recall']:.3f}  "
              f"sample {sample_s:.1f} s", flush=True)

    measure("DDPM K=1000", 1000, pre, pre_s, steps=1000)
    for T in steps:
        measure(f"DDPM -> T={T} (start)", T, pre, None, steps=T)
        for label, extra in ((f"DxMI T={T}", {}), (f"DxMI T={T}, tau=0", {"entropy_weight": 0.0})):
            t = time.perf_counter()
            det = PixelDetector(pixel_config(1, size, **{**recipe, "n_steps": T, "seed": seed, **extra}))
            det.fit(images, calibration=0.0, init_sampler=pre)
            train_s = time.perf_counter() - t
            measure(label, T, det, train_s)
            if not extra:
                measure(f"DxMI T={T} + guidance 0.5", T, det, None, guidance=0.5)
    table = pd.DataFrame(rows)
    table.insert(0, "dataset", name)
    return table


def goals(table: pd.DataFrame) -> list[str]:
    """Issue #7's goals, checked on the T = 10 rows of each dataset."""
    lines = []
    for name, t in table.groupby("dataset"):
        fd = dict(zip(t["setting"], t["frechet"]))
        if "DxMI T=10" not in fd:
            continue
        start, dx, ref, tau0 = fd["DDPM -> T=10 (start)"], fd["DxMI T=10"], fd["DDPM K=1000"], fd["DxMI T=10, tau=0"]
        lines.append(f"{name}: DxMI T=10 FD {dx:.3f} vs start {start:.3f} (ratio {dx / start:.2f}; goal <= 0.5: "
                     f"{'met' if dx <= 0.5 * start else 'NOT met'}), vs 1000-step {ref:.3f} (ratio {dx / ref:.2f}; "
                     f"goal <= 2: {'met' if dx <= 2 * ref else 'NOT met'}), tau=0 {tau0:.3f} (tau=0.1 better: "
                     f"{'yes' if dx < tau0 else 'no'})")
    return lines


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="digits,mnist")
    parser.add_argument("--steps", default="4,10")
    parser.add_argument("--n-samples", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], help="recipe override KEY=VALUE (YAML value)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/generation"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    overrides = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    args.out.mkdir(parents=True, exist_ok=True)
    steps = [int(s) for s in args.steps.split(",")]
    t0 = time.perf_counter()
    table = pd.concat([run_dataset(d, steps, args.n_samples, args.out, overrides, args.seed)
                       for d in args.datasets.split(",")])
    print(f"\nGeneration quality (FD lower is better; precision/recall higher); n_samples={args.n_samples}, "
          f"threads={args.threads}, seed={args.seed}, overrides={overrides}, total {time.perf_counter() - t0:.0f} s")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}", na_rep=""))
    for line in goals(table):
        print(line)
    (args.out / "generation.json").write_text(json.dumps(table.to_dict(orient="records"), indent=1, default=str))
    print(f"grids and generation.json in {args.out}")


if __name__ == "__main__":
    main()
