"""DxMI training and scoring throughput, fp32 vs bf16, projected wall time of the paper's recipe, memory when streaming.

Rows: the paper's MVTec settings (docs/paper_map.md: 272-d unit vectors, batch 784, T = 5, sampler 3x2048, value and
energy 3x1024, latent 128) on synthetic vectors of that shape, and the CPU default (recipes/textures.yaml, 192-d).
Columns: DxMI iterations/s and training vectors/s (batch x iterations/s), scoring vectors/s of the energy head, and
the projected wall time of the paper's full recipe (711,284 vectors x 100 epochs / 784 = 90,725 iterations) at the
measured rate. Then peak RSS of a training run whose features are memory-mapped from disk at 1x and 4x the texture
set (fresh process each): streaming keeps it flat.

    python benchmarks/throughput.py [--device cpu|cuda] [--threads 2] [--iters 5] [--skip-memory]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
PAPER_ITERS = 711_284 * 100 / 784
PAPER = {"dim": 272, "n_steps": 5, "batch_size": 784, "sampler_hidden": 2048, "sampler_layers": 3,
         "value_hidden": 1024, "value_layers": 3, "energy_hidden": 1024, "energy_layers": 3, "latent_dim": 128,
         "spherical": True, "energy_model": "autoencoder", "initial": "autoencoder", "entropy_weight": 0.1,
         "velocity_weight": 0.01, "ae_pretrain_iter": 0, "n_iter": 0}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(config: dict, device: torch.device, iters: int, precision: str) -> dict:
    """Iterations/s of DxMI training and vectors/s of scoring for one config on one device."""
    from dxmi_ad.config import DxMIConfig
    from dxmi_ad.training.dxdp import DxDPTrainer
    from dxmi_ad.training.fit import build_model

    cfg = DxMIConfig.from_dict(config)
    model = build_model(cfg).to(device)
    model.freeze_initial()
    gen = torch.Generator(device=device).manual_seed(0)
    data = torch.nn.functional.normalize(torch.randn(cfg.batch_size * 4, cfg.dim, generator=gen, device=device), dim=1)
    trainer = DxDPTrainer(model, cfg)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
    with autocast:
        trainer.step(data[:cfg.batch_size], gen)  # warm-up
    finite = True
    _sync(device)
    t0 = time.perf_counter()
    for i in range(iters):
        with autocast:
            diag = trainer.step(data[(i % 4) * cfg.batch_size:(i % 4 + 1) * cfg.batch_size], gen)
    _sync(device)
    it_s = iters / (time.perf_counter() - t0)
    finite = bool(torch.isfinite(diag["energy_data"]) & torch.isfinite(diag["value_loss"]))
    score_x = data.repeat(16, 1)
    with torch.no_grad(), autocast:
        model.score(score_x[:1024])
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(3):
            model.score(score_x)
        _sync(device)
    score_vs = 3 * len(score_x) / (time.perf_counter() - t0)
    return {"iterations/s": it_s, "train vectors/s": it_s * cfg.batch_size, "score vectors/s": score_vs,
            "paper recipe (90,725 it) h": PAPER_ITERS / it_s / 3600, "losses finite": finite}


def peak_rss(scale: int, n_iter: int) -> float:
    """Peak RSS (MiB) of a fresh process training the CPU recipe head on memory-mapped features x ``scale``."""
    code = f"""
import resource, numpy as np, torch, yaml, tempfile, os
from dxmi_ad.config import DxMIConfig
from dxmi_ad.training.fit import train_model
torch.set_num_threads(1)
recipe = yaml.safe_load(open({str(ROOT / "dxmi_ad" / "recipes" / "textures.yaml")!r}))
n = 495 * 196 * {scale}
with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "f.npy")
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, 192))
    for i in range(0, n, 100_000):
        block = np.random.default_rng(i).standard_normal((min(100_000, n - i), 192)).astype(np.float32)
        mm[i:i + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    mm.flush(); del mm
    data = torch.from_numpy(np.load(path, mmap_mode="r+"))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cfg = DxMIConfig.from_dict({{**recipe["model"], "dim": 192, "ae_pretrain_iter": {n_iter}, "n_iter": {n_iter}}})
    train_model(data, cfg)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, n * 192 * 4 / 2**20)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1800)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    rss, size = map(float, out.stdout.split()[-2:])
    return rss, size


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5, help="timed iterations per row (paper size)")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--json", type=Path, default=None, help="also write the table as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    recipe = yaml.safe_load((ROOT / "dxmi_ad" / "recipes" / "textures.yaml").read_text())
    cpu_default = {**recipe["model"], "dim": 192, "spherical": True, "ae_pretrain_iter": 0, "n_iter": 0}
    bf16_ok = device.type == "cuda" and torch.cuda.is_bf16_supported() or device.type == "cpu"
    rows = {}
    for name, cfg, iters in (("paper MVTec sizes (272-d, B=784, 3x2048/3x1024)", PAPER, args.iters),
                             ("CPU default (recipes/textures.yaml, 192-d)", cpu_default, args.iters * 8)):
        for precision in ("32-true", "bf16-mixed") if bf16_ok else ("32-true",):
            rows[f"{name}, {precision}"] = measure(cfg, device, iters if device.type == "cpu" else iters * 20,
                                                   precision)
            print(f"{name}, {precision}: {rows[f'{name}, {precision}']}", flush=True)
    table = pd.DataFrame(rows).T
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} threads"
    print(f"\nDxMI throughput on {name}; torch {torch.__version__}; timed iterations after one warm-up")
    print(table.to_string(float_format=lambda v: f"{v:.4g}"))
    if args.json:
        args.json.write_text(json.dumps({"device": name, "rows": table.to_dict(orient="index")}, default=str))
    if not args.skip_memory and device.type == "cpu":
        mem = {}
        for scale in (1, 4):
            rss, size = peak_rss(scale, 50)
            mem[f"{scale}x texture features"] = {"feature file MiB": size, "peak RSS MiB": rss}
        print("\nPeak RSS while training the CPU default head on memory-mapped features (50 + 50 iterations):")
        print(pd.DataFrame(mem).T.to_string(float_format=lambda v: f"{v:.0f}"))


if __name__ == "__main__":
    main()
