"""Shared fixtures: deterministic CPU torch with the machine's two cores."""

from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _torch_cpu_threads() -> None:
    torch.set_num_threads(int(os.environ.get("DXMI_AD_TEST_THREADS", "2")))


# Settings small enough for scikit-learn's estimator checks (dozens of fits).
TINY = dict(n_iter=4, ae_pretrain_iter=8, hidden=32, n_layers=1, latent_dim="auto", batch_size=32, warmup_iter=1,
            device="cpu")
