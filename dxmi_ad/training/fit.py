"""The whole training run of a vector-space DxMI model: pre-training stages, then DxMI iterations.

Stages (each skipped when its length is 0):

1. autoencoder reconstruction pre-training (``energy="autoencoder"``), then the frozen start copy (pitfall 17);
2. DDPM pre-training of the sampler (``sampler_pretrain_iter``, ``parameterization="eps"``);
3. ``n_iter`` DxMI iterations (:class:`~dxmi_ad.training.dxdp.DxDPTrainer`).

Everything random is drawn from one ``torch.Generator`` seeded by ``config.seed`` and module initialisation runs
under a forked, seeded global RNG, so a seed fixes the result on the CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dxmi_ad.checkpoint import load_model_dir, save_model_dir
from dxmi_ad.config import DxMIConfig
from dxmi_ad.nn.energy import AutoencoderEnergy
from dxmi_ad.nn.model import DxMIModel
from dxmi_ad.training.dxdp import DxDPTrainer, _batches, pretrain_autoencoder, pretrain_sampler
from dxmi_ad.training.runtime import (
    Runtime,
    all_reduce_mean,
    latest_checkpoint,
    load_checkpoint,
    release_process_group,
    save_checkpoint,
)

__all__ = ["ProgressCallback", "build_model", "restore_model", "sample_shape", "train_model"]

ProgressCallback = Callable[[str, int, int, dict[str, float]], None]
"""Called as ``callback(stage, iteration, total, metrics)``; stage in {"autoencoder", "sampler", "dxmi"}."""


def sample_shape(config: DxMIConfig) -> tuple[int, ...]:
    """Shape of one state: ``(D,)`` for vector models, ``(C, H, W)`` in pixel mode."""
    if config.mode == "pixel":
        return (config.image_channels, config.image_size, config.image_size)
    return (config.dim,)


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


def restore_model(config: dict[str, Any], tensors: dict[str, torch.Tensor], directory: Any) -> DxMIModel:
    """Rebuild a saved model (eval mode) from its stored config dict and tensors.

    Raises:
        ValueError: An invalid config or tensors that do not fit it (the message names ``directory``).
    """
    try:
        model = build_model(DxMIConfig.from_dict(config))
        model.load_checkpoint_tensors(tensors)
    except (KeyError, TypeError, ValueError) as err:
        msg = f"{directory} holds an invalid or tampered model description: {err}"
        raise ValueError(msg) from err
    return model.eval()


def train_model(
    data: torch.Tensor,
    config: DxMIConfig,
    progress: ProgressCallback | None = None,
    log_every: int = 10,
    model: DxMIModel | None = None,
    device: str | torch.device = "cpu",
    runtime: Runtime | None = None,
) -> tuple[DxMIModel, list[dict[str, Any]]]:
    """Train a DxMI model on normal vectors.

    Args:
        data: Normal training vectors of shape ``(N, D)``, float32, ``D == config.dim`` (a memory-mapped tensor
            is not copied); in pixel mode images ``(N, C, H, W)`` in [-1, 1].
        config: The run's config.
        progress: Optional progress callback (see :data:`ProgressCallback`); rank 0 only, and not with
            ``ddp_spawn`` (callbacks do not cross process boundaries).
        log_every: Iterations between history records / callbacks of the DxMI stage.
        model: Continue from this model instead of building a new one (its pre-training stages are skipped).
        device: Device of a newly built model (``"cpu"``, ``"cuda"``...) when ``runtime`` is None.
        runtime: Devices, precision, data-parallel strategy, checkpoints and resume through Lightning Fabric
            (:class:`~dxmi_ad.training.runtime.Runtime`); None = this process on ``device``, no checkpoints.

    Returns:
        The trained model (eval mode, on the CPU when trained through Fabric) and the history: one dict per logged
        DxMI iteration (floats). Under DDP every rank returns its (identical) model.

    Raises:
        ValueError: If ``data`` is not ``(N, D)`` with ``D == config.dim`` (pixel mode: ``(N, C, H, W)``) and
            ``N >= 2``, or a checkpoint does not fit the run.
        FileNotFoundError: ``runtime.resume`` without a complete checkpoint.
    """
    shape = sample_shape(config)
    if tuple(data.shape[1:]) != shape or data.shape[0] < 2:
        msg = f"training data must have shape (N >= 2, {', '.join(map(str, shape))}), got {tuple(data.shape)}"
        raise ValueError(msg)
    if runtime is None:
        return _train(None, data, config, progress, log_every, model, torch.device(device), None)
    if runtime.resume and latest_checkpoint(runtime.checkpoint_dir) is None:
        msg = f"no complete checkpoint in {runtime.checkpoint_dir} to resume from"
        raise FileNotFoundError(msg)
    world = runtime.devices * runtime.num_nodes
    if data.shape[0] < 2 * world:
        msg = f"{data.shape[0]} training vectors cannot be sharded over {world} processes (need >= 2 each)"
        raise ValueError(msg)
    fabric = runtime.fabric()
    # Fabric walks the launch arguments and refuses frozen dataclasses: configs travel as plain dicts.
    if "spawn" not in str(runtime.strategy):  # this process is one of the ranks: it keeps its own result
        return fabric.launch(_fabric_worker, data, config.to_dict(), progress, log_every, model,
                             dataclasses.asdict(runtime), None)
    # Spawned workers hand results back through a pipe that blocks on large payloads: rank 0 writes the trained
    # state to a safetensors file and returns only its path.
    with tempfile.TemporaryDirectory(prefix="dxmi-ad-fabric-") as tmp:
        out_dir = fabric.launch(_fabric_worker, data, config.to_dict(), None, log_every, model,
                                dataclasses.asdict(runtime), tmp)
        tensors, meta = load_model_dir(out_dir)
    out = model if model is not None else build_model(config)
    out.load_checkpoint_tensors(tensors)
    return out.cpu().eval(), meta["history"]


def _fabric_worker(fabric: Any, data: torch.Tensor, config: dict[str, Any], progress: ProgressCallback | None,
                   log_every: int, model: DxMIModel | None, runtime: dict[str, Any], out_dir: str | None) -> Any:
    model_out, history = _train(fabric, data, DxMIConfig.from_dict(config),
                                progress if fabric.global_rank == 0 else None, log_every, model, fabric.device,
                                Runtime(**runtime))
    if out_dir is not None and fabric.global_rank == 0:
        save_model_dir(out_dir, model_out.checkpoint_tensors(), {"history": history})
    release_process_group(fabric)  # after the last collective (the barrier inside waits for rank 0's write)
    return out_dir if out_dir is not None else (model_out.cpu().eval(), history)


def _train(
    fabric: Any,
    data: torch.Tensor,
    config: DxMIConfig,
    progress: ProgressCallback | None,
    log_every: int,
    model: DxMIModel | None,
    device: torch.device,
    runtime: Runtime | None,
) -> tuple[DxMIModel, list[dict[str, Any]]]:
    rank, world = (fabric.global_rank, fabric.world_size) if fabric is not None else (0, 1)
    sync = all_reduce_mean(fabric)
    fresh = model is None
    if model is None:
        model = build_model(config)  # the same seeded initialisation on every rank
    model = model.to(device)
    dev = model.velocity_scale_sq.device
    # One generator per rank drives every random draw of that rank (rank 0's stream = the single-process one).
    generator = torch.Generator(device=dev).manual_seed(config.seed + 1_000_003 * rank)
    if world > 1:
        data = data[rank::world]  # this rank's shard (a strided view; memory maps stay on disk)
    if data.numel() <= 50_000_000:  # small sets move to the device; large (memory-mapped) stay
        data = data.to(dev)

    def report(stage: str, total: int) -> Callable[[int, float], None]:
        def cb(i: int, loss: float) -> None:
            if progress is not None and (i % log_every == 0 or i == total - 1):
                progress(stage, i + 1, total, {"loss": loss})

        return cb

    ckdir = runtime.checkpoint_dir if runtime is not None else None
    resume_from = latest_checkpoint(ckdir) if runtime is not None and runtime.resume else None
    if fabric is not None and world > 1 and runtime.resume:
        # every rank must take the same branch (collectives follow): rank 0's view decides; the checkpoint folder
        # has to be shared by all nodes
        name = fabric.broadcast(resume_from.name if resume_from is not None else None, src=0)
        resume_from = Path(ckdir) / name if name is not None else None
        if resume_from is not None and not (resume_from / "model.safetensors").is_file():
            msg = f"rank {rank} cannot read {resume_from}: the checkpoint folder must be shared by every node"
            raise FileNotFoundError(msg)
    trainer = DxDPTrainer(model, config, sync=sync)
    history: list[dict[str, Any]] = []
    start = 0
    if resume_from is not None:
        start, history = load_checkpoint(resume_from, model, trainer, rank, world, generator)
        if progress is not None:
            progress("resume", start, config.n_iter, {})
    else:
        if fresh and isinstance(model.energy, AutoencoderEnergy) and config.ae_pretrain_iter:
            pretrain_autoencoder(model.energy, data, config.ae_pretrain_iter, config.ae_lr, config.batch_size,
                                 generator, report("autoencoder", config.ae_pretrain_iter), sync)
        if fresh:
            model.freeze_initial()
        if fresh and config.sampler_pretrain_iter:
            pretrain_sampler(model, data, config.sampler_pretrain_iter, config.sampler_pretrain_lr,
                             config.batch_size, generator, report("sampler", config.sampler_pretrain_iter), sync)

    def checkpoint(iteration: int) -> None:
        states = [generator.get_state()]
        if fabric is not None and world > 1:
            gathered = fabric.all_gather(generator.get_state().to(dev))  # (world, L)
            states = [g.cpu() for g in gathered]
        error = None
        if rank == 0:
            try:
                save_checkpoint(ckdir, iteration, model, trainer, states, history, runtime.keep_checkpoints)
            except OSError as err:  # e.g. a full disk: every rank must stop, not wait at the barrier
                error = f"writing the checkpoint of iteration {iteration} failed: {err}"
        if fabric is not None and world > 1:
            error = fabric.broadcast(error, src=0)
        if error is not None:
            raise RuntimeError(error)

    if ckdir is not None and resume_from is None:
        checkpoint(0)  # after pre-training: a crash in the DxMI stage never repeats it
    stop = config.n_iter if runtime is None or runtime.stop_after is None else min(config.n_iter, runtime.stop_after)
    bf16 = runtime is not None and runtime.precision == "bf16-mixed" and fabric is not None
    for i in range(start, stop):
        with fabric.autocast() if bf16 else contextlib.nullcontext():
            diag = trainer.step(_batches(data, config.batch_size, generator), generator)
        if i % log_every == 0 or i == config.n_iter - 1:
            rec = {k: (v.float().tolist() if v.ndim else float(v)) for k, v in diag.items()}
            rec["iteration"] = i + 1
            history.append(rec)
            if progress is not None:
                progress("dxmi", i + 1, config.n_iter, rec)
        if ckdir is not None and runtime.checkpoint_every and (i + 1) % runtime.checkpoint_every == 0:
            checkpoint(i + 1)
    if fabric is not None and world > 1:  # safety net: every rank must hold the same model
        flat = torch.cat([t.detach().float().reshape(-1) for t in model.checkpoint_tensors().values()])
        sums = fabric.all_gather(torch.stack([flat.sum(), flat.abs().sum()]))  # (world, 2)
        if not bool((sums == sums[0]).all()):
            msg = f"data-parallel ranks diverged (parameter checksums {sums.tolist()}); please report this"
            raise RuntimeError(msg)
    model.eval()
    return model, history
