"""The whole training run of a vector-space DxMI model: pre-training stages, then DxMI iterations.

Stages (each skipped when its length is 0):

1. autoencoder reconstruction pre-training (``energy="autoencoder"``), then the frozen start copy (pitfall 17);
2. DDPM pre-training of the sampler (``sampler_pretrain_iter``, ``parameterization="eps"``);
3. ``n_iter`` DxMI iterations (:class:`~dxmi_ad.training.dxdp.DxDPTrainer`).

Everything random is drawn from one ``torch.Generator`` seeded by ``config.seed`` and module initialisation runs
under a forked, seeded global RNG, so a seed fixes the result on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from dxmi_ad.config import DxMIConfig
from dxmi_ad.nn.energy import AutoencoderEnergy
from dxmi_ad.nn.model import DxMIModel
from dxmi_ad.training.dxdp import DxDPTrainer, _batches, pretrain_autoencoder, pretrain_sampler

__all__ = ["ProgressCallback", "build_model", "train_model"]

ProgressCallback = Callable[[str, int, int, dict[str, float]], None]
"""Called as ``callback(stage, iteration, total, metrics)``; stage in {"autoencoder", "sampler", "dxmi"}."""


def build_model(config: DxMIConfig) -> DxMIModel:
    """Build a freshly initialised model deterministically from ``config.seed``.

    Args:
        config: Model config.

    Returns:
        A :class:`DxMIModel` on the CPU.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return DxMIModel(config)


def train_model(
    data: torch.Tensor,
    config: DxMIConfig,
    progress: ProgressCallback | None = None,
    log_every: int = 10,
    model: DxMIModel | None = None,
    device: str | torch.device = "cpu",
) -> tuple[DxMIModel, list[dict[str, Any]]]:
    """Train a DxMI model on normal vectors.

    Args:
        data: Normal training vectors of shape ``(N, D)``, float32, ``D == config.dim``.
        config: The run's config.
        progress: Optional progress callback (see :data:`ProgressCallback`).
        log_every: Iterations between history records / callbacks of the DxMI stage.
        model: Continue from this model instead of building a new one (its pre-training stages are skipped).
        device: Device of a newly built model (``"cpu"``, ``"cuda"``...).

    Returns:
        The trained model (eval mode) and the history: one dict per logged DxMI iteration (floats).

    Raises:
        ValueError: If ``data`` is not ``(N, D)`` with ``D == config.dim`` and ``N >= 2``.
    """
    if data.ndim != 2 or data.shape[1] != config.dim or data.shape[0] < 2:
        msg = f"training data must have shape (N >= 2, {config.dim}), got {tuple(data.shape)}"
        raise ValueError(msg)
    fresh = model is None
    if model is None:
        model = build_model(config).to(device)
    # One generator on the model's device drives every random draw (a CPU generator cannot drive CUDA sampling).
    generator = torch.Generator(device=model.velocity_scale_sq.device).manual_seed(config.seed)
    if data.shape[0] * data.shape[1] <= 50_000_000:  # small sets move to the device; large (memory-mapped) stay
        data = data.to(model.velocity_scale_sq.device)

    def report(stage: str, total: int) -> Callable[[int, float], None]:
        def cb(i: int, loss: float) -> None:
            if progress is not None and (i % log_every == 0 or i == total - 1):
                progress(stage, i + 1, total, {"loss": loss})

        return cb

    if fresh and isinstance(model.energy, AutoencoderEnergy) and config.ae_pretrain_iter:
        pretrain_autoencoder(model.energy, data, config.ae_pretrain_iter, config.ae_lr,
                             config.batch_size, generator, report("autoencoder", config.ae_pretrain_iter))
    if fresh:
        model.freeze_initial()
    if fresh and config.sampler_pretrain_iter:
        pretrain_sampler(model, data, config.sampler_pretrain_iter, config.sampler_pretrain_lr,
                         config.batch_size, generator, report("sampler", config.sampler_pretrain_iter))
    trainer = DxDPTrainer(model, config)
    history: list[dict[str, Any]] = []
    for i in range(config.n_iter):
        diag = trainer.step(_batches(data, config.batch_size, generator), generator)
        if i % log_every == 0 or i == config.n_iter - 1:
            rec = {k: (v.tolist() if v.ndim else float(v)) for k, v in diag.items()}
            rec["iteration"] = i + 1
            history.append(rec)
            if progress is not None:
                progress("dxmi", i + 1, config.n_iter, rec)
    model.eval()
    return model, history
