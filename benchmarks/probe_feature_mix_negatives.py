"""Probe (issue #13): data-built feature mixes as extra energy negatives on the textures features.

Not product code: it patches the trainer here rather than adding a config switch, because the measurement says
the idea hurts. The energy loss of the "DxMI paper lrs + guards" row of ``benchmarks/textures_ablation.py`` gains
``w * (-E(mix) + E(mix)^2)`` (w = 1), ``mix = normalize((1 - a) x_i + a x_j)``, ``a ~ U(0.3, 0.7)``, ``x_j`` another
training location of the batch; the ablation script then runs it (3 seeds, 300 iterations, about 10 minutes on 2
cores). Measured: image / pixel AUROC 0.735 / 0.764 against the autoencoder's 0.762 / 0.768 (README, textures
ablation).

    python benchmarks/probe_feature_mix_negatives.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import benchmarks.textures_ablation as abl
from dxmi_ad.training import dxdp

STASH: dict = {}
REAL_STEP = dxdp.DxDPTrainer.step
REAL_LOSS = dxdp.energy_loss


def step(self, x_data, generator=None):
    """The trainer's step, remembering the data batch and the model for :func:`loss`."""
    STASH["x"], STASH["model"] = x_data, self.model
    return REAL_STEP(self, x_data, generator)


def loss(e_data, e_samples, l2, neg_l2):
    """The energy loss plus the mixes' term when ``config.extra["mix_weight"]`` is set."""
    out, d = REAL_LOSS(e_data, e_samples, l2, neg_l2)
    w = STASH["model"].config.extra.get("mix_weight", 0.0)
    if w:
        x = STASH["x"]
        g = torch.Generator().manual_seed(int(1e6 * float(x[0, 0].abs())) % (2**31))
        a = torch.empty(len(x), 1).uniform_(0.3, 0.7, generator=g).to(x)
        j = torch.randperm(len(x), generator=g).to(x.device)
        e_mix = STASH["model"].energy(F.normalize((1 - a) * x + a * x[j], dim=1))
        out = out + w * (-e_mix.mean() + e_mix.pow(2).mean())
    return out, d


if __name__ == "__main__":
    dxdp.DxDPTrainer.step = step
    dxdp.energy_loss = loss
    abl.VARIANTS["DxMI paper lrs + guards + feature mixes (w=1)"] = {**abl.PAPER_LRS, **abl.GUARDS,
                                                                      "extra": {"mix_weight": 1.0}}
    sys.argv = [sys.argv[0], "--n-iter", "300", "--validate-every", "100", "--only", "feature mixes"]
    abl.main()
