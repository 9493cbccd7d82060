"""The whole training run of a vector-space DxMI model: pre-training stages, then DxMI iterations.

Stages (each skipped when its length is 0):

1. autoencoder reconstruction pre-training (``energy_model="autoencoder"``), then the frozen start copy (docs/paper_map.md);
2. DDPM pre-training of the sampler (``sampler_pretrain_iter``, ``parameterization="eps"``);
3. ``n_iter`` DxMI iterations (:class:`~dxmi_ad.training.dxdp.DxDPTrainer`), the first ``warmup_iter`` with the
   energy frozen;
4. ``energy_refit_iter`` energy-only steps against the frozen final sampler (:class:`~dxmi_ad.training.dxdp.EnergyRefitter`).

:func:`plan_stages` says what a config will run; :func:`scale_schedule` fits a recipe's lengths to what the user
asked for (a shorter ``n_iter``, or the fixed number of updates of an anomalib ``Engine`` run, counted by
:func:`count_updates`), so that the energy is always updated.

Everything random is drawn from one ``torch.Generator`` seeded by ``config.seed`` and module initialisation runs
under a forked, seeded global RNG, so a seed fixes the result on the CPU.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import tempfile
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from dxmi_ad._warn import caller_stacklevel
from dxmi_ad.checkpoint import load_model_dir, save_model_dir
from dxmi_ad.config import DxMIConfig
from dxmi_ad.nn.model import DxMIModel
from dxmi_ad.training.dxdp import DxDPTrainer, EnergyRefitter, random_batch
from dxmi_ad.training.runtime import (
    Runtime,
    all_reduce_mean,
    data_fingerprint,
    latest_checkpoint,
    load_checkpoint,
    load_selection,
    release_process_group,
    save_checkpoint,
)
from dxmi_ad.training.schedule import (
    SCHEDULE_KEYS,
    StagedTraining,
    StageSchedule,
    is_autoencoder,
    plan_stages,
)

__all__ = ["ProgressCallback", "StageSchedule", "build_model", "count_updates", "plan_stages", "restore_model",
           "sample_shape", "scale_schedule", "selection_of", "train_model", "with_config"]

ProgressCallback = Callable[[str, int, int, dict[str, float]], None]
"""Called as ``callback(stage, iteration, total, metrics)``; stage in {"autoencoder", "sampler", "dxmi", "energy refit",
"resume"}."""


def count_updates(n_images: int, images_per_batch: int, locations_per_image: int, batch_size: int, epochs: int,
                  updates_per_batch: int | None = None, drop_last: bool = False,
                  batches_per_epoch: int | None = None) -> int:
    """Optimizer updates of a run that streams images (anomalib's ``Engine``): the sum over every batch of
    ``updates_per_batch``, or ``ceil(images x locations / batch_size)`` (about one pass over its location vectors).

    Args:
        n_images: Training images per epoch.
        images_per_batch: The data loader's batch size (the last batch holds the rest unless ``drop_last``).
        locations_per_image: Feature vectors per image (``h x w`` of the backbone grid, e.g. 196 at 224 px).
        batch_size: Vectors per update (``DxMIConfig.batch_size``).
        epochs: Epochs (``Engine(max_epochs=...)``).
        updates_per_batch: Fixed updates per batch (``Dxmi(updates_per_batch=...)``), or None.
        drop_last: The loader drops the last incomplete batch.
        batches_per_epoch: Batches actually run per epoch (e.g. Lightning's ``num_training_batches`` under
            ``limit_train_batches``); None = all.

    Returns:
        The number of updates (0 for an empty data set).

    Example:
        >>> count_updates(100, 32, 196, 784, 30)  # batches of 32, 32, 32, 4 images: 8 + 8 + 8 + 1 updates
        750
    """
    if n_images <= 0 or images_per_batch <= 0 or epochs <= 0:
        return 0
    full, rest = divmod(n_images, images_per_batch)
    sizes = [images_per_batch] * full + ([rest] if rest and not drop_last else [])
    if batches_per_epoch is not None:
        sizes = sizes[:max(0, int(batches_per_epoch))]
    per_batch = [updates_per_batch or max(1, math.ceil(b * locations_per_image / batch_size)) for b in sizes]
    return sum(per_batch) * int(epochs)


def scale_schedule(recipe: Mapping[str, Any], overrides: Mapping[str, Any] | None = None,
                   total: int | None = None) -> tuple[dict[str, Any], list[str]]:
    """Make a recipe's schedule fit what the user asked for, so that every stage is reached.

    The lengths of a recipe (:data:`SCHEDULE_KEYS`) belong together: its warm-up is a share of its DxMI iterations,
    and in a run of a fixed length (anomalib's ``Engine(max_epochs=...)``) pre-training and DxMI share the
    updates. Lengths the user gave (``overrides``) are kept as given; the others are scaled:

    * ``total`` None (the CLI: ``n_iter`` is the length of the DxMI stage): when ``n_iter`` is set below the
      recipe's, a warm-up left at the recipe's value is scaled by the same factor (``--set n_iter=100`` on a recipe
      with ``n_iter: 300, warmup_iter: 100`` gives ``warmup_iter=33``); a longer ``n_iter`` keeps it. An
      ``energy_refit_iter`` left at the recipe's value is scaled the same way (any ``total``).
    * ``total`` given (every update of the run): when it is smaller than the recipe's stages together
      (``ae_pretrain_iter + sampler_pretrain_iter + n_iter``), the pre-training stages not set by the user keep
      their share of it; DxMI gets the remaining updates (``n_iter = total - pre-training``, also when ``total`` is
      larger) and the warm-up keeps its share of them.

    Args:
        recipe: The recipe's parameters before the user's changes, over the defaults (``n_iter``, ``warmup_iter``,
            ``ae_pretrain_iter``, ``sampler_pretrain_iter``, ``energy`` / ``energy_model``).
        overrides: What the user set (e.g. ``--set`` values, ``Dxmi(model_overrides=...)``).
        total: All updates the run will make, or None.

    Returns:
        ``(changes, notes)``: the schedule values to set over ``{**recipe, **overrides}`` (only those that differ)
        and one line per change saying what was scaled and why.

    Raises:
        ValueError: With the arithmetic, when the lengths the user gave leave no DxMI update that trains the energy
            (``warmup_iter >= n_iter``), or pre-training the user fixed already takes every update of ``total``.
    """
    overrides = dict(overrides or {})
    merged = {**recipe, **overrides}
    given = {k for k in SCHEDULE_KEYS if k in overrides}
    length = {k: int(merged.get(k) or 0) for k in SCHEDULE_KEYS}
    if not is_autoencoder(merged):
        length["ae_pretrain_iter"] = 0
    ref = {k: int(recipe.get(k) or 0) for k in SCHEDULE_KEYS}
    new = dict(length)
    notes: list[str] = []
    if total is not None:
        total = max(0, int(total))
        pre_keys = [k for k in ("ae_pretrain_iter", "sampler_pretrain_iter") if length[k]]
        fixed = sum(length[k] for k in pre_keys if k in given)
        if fixed >= total and pre_keys and "n_iter" not in given:
            msg = (f"the run makes {total} updates, but the pre-training set by you takes "
                   f"{' + '.join(f'{k}={length[k]}' for k in pre_keys if k in given)} = {fixed}: no DxMI update "
                   "would run; lower it or train for more epochs / updates_per_batch")
            raise ValueError(msg)
        wanted = sum(length[k] for k in pre_keys) + (length["n_iter"] if "n_iter" in given else ref["n_iter"])
        if total < wanted:
            free = [k for k in pre_keys if k not in given]
            share_total = sum(length[k] for k in free) + (0 if "n_iter" in given else ref["n_iter"])
            room = total - fixed - (length["n_iter"] if "n_iter" in given else 0)
            for k in free:
                new[k] = max(0, int(room * length[k] / share_total)) if share_total else 0
        if "n_iter" not in given:
            new["n_iter"] = max(0, total - new["ae_pretrain_iter"] - new["sampler_pretrain_iter"])
        if any(new[k] != length[k] for k in pre_keys):
            pre = " + ".join(f"{k}={length[k]}" for k in pre_keys)
            notes.append(f"the run makes {total} updates, fewer than the recipe's {pre} + n_iter={ref['n_iter']} "
                         f"= {wanted}: pre-training scaled to its share ("
                         + ", ".join(f"{k}={new[k]}" for k in pre_keys) + f"), then {new['n_iter']} DxMI updates")
    dxmi_ref = ref["n_iter"]
    if "warmup_iter" not in given and length["warmup_iter"] and dxmi_ref and new["n_iter"] < dxmi_ref:
        new["warmup_iter"] = int(length["warmup_iter"] * new["n_iter"] / dxmi_ref)
        notes.append(f"n_iter={new['n_iter']} is below the recipe's {dxmi_ref}: warmup_iter (energy frozen) scaled "
                     f"by the same factor, {length['warmup_iter']} -> {new['warmup_iter']}, so the energy is updated "
                     f"{new['n_iter'] - new['warmup_iter']} times (set warmup_iter to choose)")
    if 0 < new["n_iter"] <= new["warmup_iter"] and "warmup_iter" in given:
        msg = (f"warmup_iter={new['warmup_iter']} >= n_iter={new['n_iter']}: the energy is frozen for the first "
               f"warmup_iter DxMI iterations, so it would never be updated; set warmup_iter below n_iter")
        raise ValueError(msg)
    changes = {k: new[k] for k in SCHEDULE_KEYS if new[k] != length[k] or (k == "n_iter" and total is not None
                                                                          and new[k] != int(merged.get(k) or 0))}
    refit = int(merged.get("energy_refit_iter") or 0)
    if "energy_refit_iter" not in overrides and refit and dxmi_ref and new["n_iter"] < dxmi_ref:
        changes["energy_refit_iter"] = int(refit * new["n_iter"] / dxmi_ref)
        notes.append(f"n_iter={new['n_iter']} is below the recipe's {dxmi_ref}: energy_refit_iter scaled by the same "
                     f"factor, {refit} -> {changes['energy_refit_iter']} (set energy_refit_iter to choose)")
    return changes, notes


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


# Settings read when the sampler, the value function and the AVR buffer are built (DxMIModel.__init__), not later.
_SAMPLER_BUILD_FIELDS = ("mode", "dim", "n_steps", "sampler_hidden", "sampler_layers", "time_dim", "parameterization",
                         "init_sigma", "last_sigma", "fix_last_sigma", "spherical", "activation", "project_samples",
                         "value_hidden", "value_layers", "image_channels", "image_size", "unet_channels",
                         "unet_levels", "energy_channels", "diffusion_steps", "reschedule")


def with_config(model: DxMIModel, config: DxMIConfig) -> DxMIModel:
    """A copy of a (pre-trained) model that runs under ``config``, construction-time switches included.

    ``model.config`` alone is read at run time (the start distribution, the losses), but the sampler's noise levels
    (``init_sigma``), its guards (``fix_last_sigma``, ``last_sigma``, ``project_samples``), sizes and the AVR buffer
    are fixed when the model is built: setting ``config`` on a copy would silently keep the old ones. This builds a
    fresh model from ``config`` (seeded by ``config.seed``) and copies the energy and its frozen start copy (when
    ``model`` has none, the start copy is made from its energy, as after pre-training); the sampler, value function
    and AVR buffer are copied too when every setting they are built from is unchanged, else they are the fresh ones
    (so a pre-trained sampler is kept only under the same construction settings). The energy keeps ``model``'s
    weights and buffers whatever ``config`` says of it (e.g. its random Fourier features); where the energy is the
    value function (``energy_model="shared"``, pixel mode), the value is therefore always copied. The copy is
    float32, on ``model``'s device.

    Args:
        model: The model to continue from, e.g. ``train_model(data, config.replace(n_iter=0))``'s autoencoder start.
        config: The config to continue under; the energy's architecture must match ``model``'s.

    Returns:
        A new :class:`DxMIModel` (``model`` is not changed).

    Raises:
        ValueError: If the energy (or the start's copy) of ``config`` does not fit ``model``'s weights.
    """
    fresh = build_model(config)
    same_sampler = all(getattr(model.config, f) == getattr(config, f) for f in _SAMPLER_BUILD_FIELDS)
    parts = ["energy", "initial_ae"] + (["sampler", "value"] if same_sampler else [])
    try:
        for part in parts:
            src, dst = getattr(model, part), getattr(fresh, part)
            if src is not None and dst is not None:
                dst.load_state_dict(copy.deepcopy(src.state_dict()))
    except RuntimeError as err:
        msg = f"config does not fit the model's {part} weights: {err}"
        raise ValueError(msg) from err
    if model.initial_ae is None:  # no start copy to take over: the start is the (pre-trained) energy itself
        fresh.freeze_initial()
    if same_sampler:
        fresh.velocity_scale_sq.copy_(model.velocity_scale_sq)
    return fresh.to(next(model.parameters()).device).train(model.training)


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


def selection_of(history: list[dict[str, Any]]) -> tuple[int, float] | None:
    """The model selection recorded in a :func:`train_model` history.

    Args:
        history: The history list :func:`train_model` returns (dicts of floats).

    Returns:
        ``(selected_iteration, best_val_auroc)`` (iteration 0 = the pre-trained start; AUROC in [0, 1]), or None
        when the run did not select.
    """
    chosen = [r for r in history if "selected_iteration" in r]
    return (int(chosen[-1]["selected_iteration"]), float(chosen[-1]["best_val_auroc"])) if chosen else None


def train_model(
    data: torch.Tensor,
    config: DxMIConfig,
    progress: ProgressCallback | None = None,
    log_every: int = 10,
    model: DxMIModel | None = None,
    device: str | torch.device = "cpu",
    runtime: Runtime | None = None,
    validate: Callable[[DxMIModel], float] | None = None,
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
        validate: Model selection (``docs/paper_map.md``, a deviation: the paper keeps the last iterate):
            ``validate(model) -> score`` (higher = better, e.g. the AUROC on held-out normals vs synthetic
            anomalies; it must never read the test set) is called after pre-training and every
            ``config.validate_every`` DxMI iterations (and after the last, or after the energy refit when
            ``energy_refit_iter > 0``); the best state is restored at the end and
            recorded in the history (``val_auroc`` per call, then ``selected_iteration`` / ``best_val_auroc``).
            Ignored when ``config.validate_every`` is 0; not with ``ddp_spawn`` (a callable does not cross process
            boundaries). After ``--resume`` the selection restarts at the resumed iteration.

    Returns:
        The trained (or selected) model (eval mode, on the CPU when trained through Fabric) and the history: one dict
        per logged DxMI iteration (floats). Under DDP every rank returns its (identical) model.

    A warm-up that would cover every DxMI iteration (``warmup_iter >= n_iter > 0``: the energy would never be
    updated) is cut to the first :data:`WARMUP_SHARE` of them, with a ``UserWarning`` (see :func:`plan_stages`).

    Raises:
        ValueError: If ``data`` is not ``(N, D)`` with ``D == config.dim`` (pixel mode: ``(N, C, H, W)``) and
            ``N >= 2``, or a checkpoint does not fit the run.
        FileNotFoundError: ``runtime.resume`` without a complete checkpoint.
    """
    stages = plan_stages(config)
    if stages.warmup != config.warmup_iter:  # the warm-up would cover every DxMI iteration: the energy never moves
        warnings.warn(f"warmup_iter={config.warmup_iter} >= n_iter={config.n_iter}: the energy (frozen during the "
                      f"warm-up) would never be updated; the warm-up is cut to the first {stages.warmup} of the "
                      f"{config.n_iter} DxMI iterations (set warmup_iter below n_iter to choose)", UserWarning,
                      stacklevel=caller_stacklevel())
        config = config.replace(warmup_iter=stages.warmup)
    shape = sample_shape(config)
    if tuple(data.shape[1:]) != shape or data.shape[0] < 2:
        msg = f"training data must have shape (N >= 2, {', '.join(map(str, shape))}), got {tuple(data.shape)}"
        raise ValueError(msg)
    if config.mode != "pixel" and config.energy_model == "autoencoder":  # every trainer: bottleneck < input width
        from dxmi_ad.nn.energy import autoencoder_latent_dim

        autoencoder_latent_dim(config.dim, config.latent_dim, config.spherical)
    if not config.validate_every:
        validate = None
    elif validate is None:
        warnings.warn(f"validate_every={config.validate_every} but this training path has no validation split "
                      "(model selection is built by ImageDetector.fit from held-out training images): the last "
                      "iterate is kept", UserWarning, stacklevel=caller_stacklevel())
    if runtime is None:
        return _train(None, data, config, progress, log_every, model, torch.device(device), None, validate)
    if runtime.resume and latest_checkpoint(runtime.checkpoint_dir) is None:
        msg = f"no complete checkpoint in {runtime.checkpoint_dir} to resume from"
        raise FileNotFoundError(msg)
    world = runtime.devices * runtime.num_nodes
    if data.shape[0] < 2 * world:
        msg = f"{data.shape[0]} training vectors cannot be sharded over {world} processes (need >= 2 each)"
        raise ValueError(msg)
    if validate is not None and "spawn" in str(runtime.strategy):
        msg = "model selection (validate_every > 0) needs a strategy without spawned workers (e.g. ddp, not ddp_spawn)"
        raise ValueError(msg)
    fabric = runtime.fabric()
    # Fabric walks the launch arguments and refuses frozen dataclasses: configs travel as plain dicts.
    if "spawn" not in str(runtime.strategy):  # this process is one of the ranks: it keeps its own result
        return fabric.launch(_fabric_worker, data, config.to_dict(), progress, log_every, model,
                             dataclasses.asdict(runtime), None, validate)
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
                   log_every: int, model: DxMIModel | None, runtime: dict[str, Any], out_dir: str | None,
                   validate: Callable[[DxMIModel], float] | None = None) -> Any:
    model_out, history = _train(fabric, data, DxMIConfig.from_dict(config),
                                progress if fabric.global_rank == 0 else None, log_every, model, fabric.device,
                                Runtime(**runtime), validate)
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
    validate: Callable[[DxMIModel], float] | None = None,
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
    fingerprint = data_fingerprint(data) if runtime is not None and runtime.checkpoint_dir is not None else None
    if world > 1:
        data = data[rank::world]  # this rank's shard (a strided view; memory maps stay on disk)
    if data.numel() <= 50_000_000:  # small sets move to the device; large (memory-mapped) stay
        data = data.to(dev)

    def report(stage: str, i: int, total: int, loss: float) -> None:
        if progress is not None and (i % log_every == 0 or i == total - 1):
            progress(stage, i + 1, total, {"loss": loss})

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
        start, history = load_checkpoint(resume_from, model, trainer, rank, world, generator, fingerprint)
        if progress is not None:
            progress("resume", start, config.n_iter, {})
    else:  # a model given by the caller continues from its own pre-training
        stages = plan_stages(config) if fresh else StageSchedule(0, 0, config.n_iter, config.warmup_iter)
        staged = StagedTraining(model, config, stages, sync, trainer, pretrained=not fresh)
        staged.pretrain(lambda: random_batch(data, config.batch_size, generator), generator,
                        report)
        trainer.reset_energy_average()  # energy_ema: the average starts at the pre-trained energy

    best: tuple[float, int, dict[str, torch.Tensor]] | None = None  # model selection: (score, iteration, state)
    # the tensors selection keeps: every one, or the energy's (the shared energy is the value net)
    kept = ("value." if config.energy_model == "shared" else "energy.") if config.select_energy_only else ""

    def checkpoint(iteration: int) -> None:
        states = [generator.get_state()]
        if fabric is not None and world > 1:
            gathered = fabric.all_gather(generator.get_state().to(dev))  # (world, L)
            states = [g.cpu() for g in gathered]
        error = None
        if rank == 0:
            try:
                save_checkpoint(ckdir, iteration, model, trainer, states, history, runtime.keep_checkpoints, best,
                                fingerprint)
            except OSError as err:  # e.g. a full disk: every rank must stop, not wait at the barrier
                error = f"writing the checkpoint of iteration {iteration} failed: {err}"
        if fabric is not None and world > 1:
            error = fabric.broadcast(error, src=0)
        if error is not None:
            raise RuntimeError(error)

    def select(iteration: int) -> None:
        """Validate the current state (every rank: the same model and data) and keep it if it is the best so far."""
        nonlocal best
        model.eval()
        averaged = trainer.swap_energy_average()  # energy_ema: the averaged energy is the candidate
        try:
            score = float(validate(model))
            if math.isfinite(score) and (best is None or score > best[0]):
                best = (score, iteration, {k: v.detach().clone() for k, v in model.checkpoint_tensors().items()
                                           if k.startswith(kept)})
        finally:
            if averaged:
                trainer.swap_energy_average()
        history.append({"iteration": iteration, "val_auroc": score})
        if progress is not None:
            progress("dxmi", max(iteration, 1), config.n_iter, {"val_auroc": score})

    if resume_from is not None:
        best = load_selection(resume_from)  # the best state so far travels with the checkpoint: exact resume
    elif validate is not None:
        select(0)  # the pre-trained start competes too
    if ckdir is not None and resume_from is None:
        checkpoint(0)  # after pre-training: a crash in the DxMI stage never repeats it
    stop = config.n_iter if runtime is None or runtime.stop_after is None else min(config.n_iter, runtime.stop_after)
    bf16 = runtime is not None and runtime.precision == "bf16-mixed" and fabric is not None
    # after the last DxMI iteration only (a pre-training-only run, n_iter = 0, has no final sampler to refit against)
    refit = config.energy_refit_iter if 0 < config.n_iter == stop else 0
    for i in range(start, stop):
        with fabric.autocast() if bf16 else contextlib.nullcontext():
            diag = trainer.step(random_batch(data, config.batch_size, generator), generator)
        if i % log_every == 0 or i == config.n_iter - 1:
            rec = {k: (v.float().tolist() if v.ndim else float(v)) for k, v in diag.items()}
            rec["iteration"] = i + 1
            rec["energy_step"] = float(config.updates_energy_at(i))  # 1: this iteration updated the energy
            history.append(rec)
            if progress is not None:
                progress("dxmi", i + 1, config.n_iter, rec)
        if validate is not None and ((i + 1) % config.validate_every == 0 or i + 1 == stop) \
                and not (refit and i + 1 == stop):  # with a refit, the last iterate is validated after it
            select(i + 1)
        if ckdir is not None and runtime.checkpoint_every and (i + 1) % runtime.checkpoint_every == 0:
            checkpoint(i + 1)
    if refit:  # energy-only steps against the frozen final sampler (EnergyRefitter, a named deviation)
        refitter = EnergyRefitter(model, config, sync)
        for j in range(refit):
            diag = refitter.step(random_batch(data, config.batch_size, generator), generator)
            if j % log_every == 0 or j == refit - 1:
                history.append({**{k: float(v) for k, v in diag.items()}, "iteration": stop, "energy_refit_step": j + 1})
                if progress is not None:
                    progress("energy refit", j + 1, refit, {"energy_gap": float(diag["energy_gap"])})
        if validate is not None:
            select(stop)  # the refitted model is the last iterate's candidate
    if trainer.swap_energy_average():  # energy_ema: the trained model scores with the average of the iterates
        history.append({"iteration": stop, "energy_ema": config.energy_ema})
    if best is not None:
        if best[1] != stop:  # a partial state (select_energy_only) completes with the last iterate's other tensors
            current = model.checkpoint_tensors()
            if not set(best[2]) <= set(current) or (not kept and set(best[2]) != set(current)):
                msg = "the selected state does not match the model (a checkpoint of other settings?)"
                raise ValueError(msg)
            model.load_checkpoint_tensors({**current, **best[2]})
        history.append({"iteration": stop, "selected_iteration": best[1], "best_val_auroc": best[0],
                        "selected_energy_only": float(bool(kept))})
    if fabric is not None and world > 1:  # safety net: every rank must hold the same model
        flat = torch.cat([t.detach().float().reshape(-1) for t in model.checkpoint_tensors().values()])
        sums = fabric.all_gather(torch.stack([flat.sum(), flat.abs().sum()]))  # (world, 2)
        if not bool((sums == sums[0]).all()):
            msg = f"data-parallel ranks diverged (parameter checksums {sums.tolist()}); please report this"
            raise RuntimeError(msg)
    model.eval()
    return model, history
