"""Where and how a DxMI training run executes: Lightning Fabric devices/precision/DDP, checkpoints and resume.

* **Devices** through Lightning Fabric (``accelerator``, ``devices``, ``num_nodes``, ``strategy``, ``precision``);
  no process management of our own: ``strategy="ddp"`` uses Fabric's launcher (or torchrun's environment),
  ``"ddp_spawn"`` spawns workers from Python (notebooks, tests).
* **Data parallel DxMI**: every rank samples its own trajectories from its own shard of the data (rows
  ``rank::world``) with its own random stream; the gradients of every energy, value and sampler update (and of the
  pre-training stages) and the adaptive-velocity statistic are averaged over ranks with Fabric's ``all_reduce``
  before clipping and the optimizer step, so all ranks keep identical parameters and the same s_t. Only rank 0
  writes checkpoints and results.
* **Checkpoints**: ``checkpoint_dir/iter-<n>/`` holds ``model.safetensors`` (every network, the AVR buffer, the
  optimizers' tensors, each rank's generator state) and ``config.json`` (iteration, learning rates, history,
  world size), written to a temporary folder (files fsynced) and renamed; the last ``keep_checkpoints`` are kept.
  A run killed while writing leaves only a temporary folder (its name holds the writer's process id), which resume
  ignores (it continues from the newest complete checkpoint) and the next checkpoint write removes. On the CPU a resumed run ends with the same weights as an uninterrupted one.
* **Precision**: ``32-true`` (default) or ``bf16-mixed`` (Fabric autocast). ``16-mixed`` would need loss scaling
  across the three optimizers and is refused with that reason.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dxmi_ad.checkpoint import atomic_directory, load_model_dir, remove_stale_temporaries, save_model_dir
from dxmi_ad.config import DxMIConfig

__all__ = ["Runtime", "is_global_zero", "latest_checkpoint"]

PRECISIONS = ("32-true", "bf16-mixed")
_CKPT = re.compile(r"^iter-(\d{8})$")


@dataclass(frozen=True)
class Runtime:
    """Execution settings of a training run (the same keys as the CLI flags and the recipes' ``runtime:``).

    Attributes:
        accelerator: ``"auto"``, ``"cpu"``, ``"cuda"`` (Fabric names).
        devices: Devices per node.
        num_nodes: Nodes (multi-node: launch with torchrun or Fabric's launcher on every node).
        strategy: ``"auto"``, ``"ddp"`` (Fabric's subprocess launcher / torchrun) or ``"ddp_spawn"``.
        precision: ``"32-true"`` or ``"bf16-mixed"``.
        checkpoint_dir: Folder of periodic checkpoints (None: none).
        checkpoint_every: DxMI iterations between checkpoints (0: none; one is always written after pre-training
            when ``checkpoint_dir`` is set).
        keep_checkpoints: How many of the newest checkpoints to keep (>= 1).
        resume: Continue from the newest complete checkpoint in ``checkpoint_dir`` (error if there is none).
        stop_after: Stop after this many DxMI iterations in total (for tests and time-boxed runs; None: ``n_iter``).
    """

    accelerator: str = "auto"
    devices: int = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32-true"
    checkpoint_dir: Path | None = None
    checkpoint_every: int = 0
    keep_checkpoints: int = 3
    resume: bool = False
    stop_after: int | None = None

    def __post_init__(self) -> None:
        """Check types and ranges (``ValueError`` naming the field): values may come from a recipe file."""
        for name in ("devices", "num_nodes", "checkpoint_every", "keep_checkpoints"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                msg = f"runtime {name} must be an integer, got {value!r}"
                raise ValueError(msg)
        for name in ("accelerator", "strategy", "precision"):
            if not isinstance(getattr(self, name), str):
                msg = f"runtime {name} must be a string, got {getattr(self, name)!r}"
                raise ValueError(msg)
        if self.stop_after is not None and (isinstance(self.stop_after, bool) or not isinstance(self.stop_after, int)
                                            or self.stop_after < 0):
            msg = f"runtime stop_after must be an integer >= 0 or None, got {self.stop_after!r}"
            raise ValueError(msg)
        if self.precision not in PRECISIONS:
            reason = (" (fp16 needs loss scaling across the energy, value and sampler optimizers, which DxMI's "
                      "one-step updates do not support here; use bf16-mixed)") if self.precision.startswith("16") else ""
            msg = f"precision must be one of {PRECISIONS}, got {self.precision!r}{reason}"
            raise ValueError(msg)
        if self.devices < 1 or self.num_nodes < 1 or self.keep_checkpoints < 1 or self.checkpoint_every < 0:
            msg = "devices, num_nodes and keep_checkpoints must be >= 1 and checkpoint_every >= 0"
            raise ValueError(msg)
        if self.resume and self.checkpoint_dir is None:
            msg = "resume needs a checkpoint_dir"
            raise ValueError(msg)

    def fabric(self) -> Any:
        """A :class:`lightning.fabric.Fabric` for these settings (not launched)."""
        from lightning.fabric import Fabric

        return Fabric(accelerator=self.accelerator, devices=self.devices, num_nodes=self.num_nodes,
                      strategy=self.strategy, precision=self.precision)


def latest_checkpoint(directory: Path | None) -> Path | None:
    """The newest complete checkpoint folder (``iter-<n>``) in ``directory``; temporary folders are ignored."""
    if directory is None or not Path(directory).is_dir():
        return None
    done = sorted(p for p in Path(directory).iterdir() if p.is_dir() and _CKPT.match(p.name)
                  and (p / "model.safetensors").is_file() and (p / "config.json").is_file())
    return done[-1] if done else None


def data_fingerprint(data: torch.Tensor) -> dict[str, Any]:
    """A cheap fingerprint of the training tensor ``(N, ...)``: its shape and the float64 sums of its first and last
    1024 rows (read once; a memory map stays on disk). A checkpoint records it, so a run resumed on other data or
    other preprocessing (e.g. another ``standardize``, which the model config does not hold) is refused.
    """
    head, tail = data[:1024].double().cpu(), data[-1024:].double().cpu()
    return {"shape": list(data.shape), "head": float(head.sum()), "tail": float(tail.sum())}


def _same_fingerprint(stored: dict[str, Any], current: dict[str, Any]) -> bool:
    """Equal shapes and sums within 1e-6 relative (float sums differ slightly across thread counts)."""
    close = all(abs(stored[k] - current[k]) <= 1e-6 * max(1.0, abs(current[k])) for k in ("head", "tail"))
    return list(stored["shape"]) == list(current["shape"]) and close


def save_checkpoint(directory: Path, iteration: int, model: Any, trainer: Any, generator_states: list[torch.Tensor],
                    history: list[dict], keep: int,
                    best: tuple[float, int, dict[str, torch.Tensor]] | None = None,
                    fingerprint: dict[str, Any] | None = None) -> Path:
    """Write ``directory/iter-<iteration>`` atomically and prune old ones (rank 0 only).

    Args:
        directory: Checkpoint folder.
        iteration: DxMI iterations done (0 = right after pre-training).
        model: The :class:`~dxmi_ad.nn.model.DxMIModel`.
        trainer: Its :class:`~dxmi_ad.training.dxdp.DxDPTrainer` (optimizer states, iteration).
        generator_states: Every rank's ``torch.Generator.get_state()`` (uint8 CPU tensors), in rank order.
        history: Logged diagnostics so far.
        keep: How many of the newest checkpoints to keep.
        best: Model selection so far: ``(score, iteration, model tensors)`` of the best validated state, or None
            (restored by :func:`load_selection`, so a resumed run selects exactly as an uninterrupted one).
        fingerprint: :func:`data_fingerprint` of the training data (checked on resume), or None.

    Returns:
        The written folder.

    Raises:
        OSError: The folder cannot be written (nothing half-written is left under the final name).
    """
    final = Path(directory) / f"iter-{iteration:08d}"
    # temporary folders of checkpoints a killed process was writing: never carried into the finished run
    remove_stale_temporaries(directory, r"iter-\d{8}")
    tensors = {f"model.{k}": v for k, v in model.checkpoint_tensors().items()}
    meta: dict[str, Any] = {"kind": "DxMITrainingCheckpoint", "iteration": iteration, "history": history,
                            "config": model.config.to_dict(), "world_size": len(generator_states)}
    if fingerprint is not None:
        meta["data"] = fingerprint
    tensors.update(trainer.state_tensors())
    meta["trainer"] = trainer.state_meta()
    tensors.update({f"rng.rank{r}": s for r, s in enumerate(generator_states)})
    if best is not None:
        tensors.update({f"best.{k}": v for k, v in best[2].items()})
        meta["best"] = {"score": float(best[0]), "iteration": int(best[1])}
    with atomic_directory(final) as tmp:
        save_model_dir(tmp, tensors, meta)
    old = sorted(p for p in Path(directory).iterdir() if p.is_dir() and _CKPT.match(p.name))
    for p in old[:-keep]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def load_checkpoint(path: Path, model: Any, trainer: Any, rank: int, world: int,
                    generator: torch.Generator, fingerprint: dict[str, Any] | None = None) -> tuple[int, list[dict]]:
    """Restore a checkpoint written by :func:`save_checkpoint` into ``model``, ``trainer`` and this rank's
    ``generator``.

    Returns:
        ``(iteration, history)``.

    Raises:
        ValueError: A checkpoint of another model config or world size, or (when both record one) of other
            training data: :func:`data_fingerprint` differs (other rows, or other preprocessing).
    """
    tensors, meta = load_model_dir(path)
    if meta.get("kind") != "DxMITrainingCheckpoint":
        msg = f"{path} is not a DxMI training checkpoint"
        raise ValueError(msg)
    stored = DxMIConfig.rename_old_keys(meta["config"], str(path))  # checkpoints of earlier versions still resume
    current = model.config.to_dict()
    # a field added since the checkpoint was written holds its default there (what that version ran)
    stored = {**{k: v for k, v in DxMIConfig().to_dict().items() if k not in stored}, **stored}
    if stored != current:
        diff = sorted(k for k in set(stored) | set(current) if stored.get(k) != current.get(k))
        msg = f"{path} was written with other settings ({', '.join(diff)}); resume with the same recipe"
        raise ValueError(msg)
    stored_data = meta.get("data")  # checkpoints written before the fingerprint existed have none
    if fingerprint is not None and stored_data is not None and not _same_fingerprint(stored_data, fingerprint):
        msg = (f"{path} was written on other training data or preprocessing (shape {stored_data['shape']} vs "
               f"{fingerprint['shape']}, or other values: e.g. another `standardize`); resume with the same data "
               "and recipe, or start a new run")
        raise ValueError(msg)
    if meta["world_size"] != world:
        msg = f"{path} was written by {meta['world_size']} processes; resume with the same number ({world} now)"
        raise ValueError(msg)
    model.load_checkpoint_tensors({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    generator.set_state(tensors[f"rng.rank{rank}"])  # generator states are CPU byte tensors on every device
    trainer.load_state({k: v.to(model.velocity_scale_sq.device) for k, v in tensors.items() if k.startswith("opt.")},
                       meta["trainer"])
    return int(meta["iteration"]), list(meta.get("history", []))


def load_selection(path: Path) -> tuple[float, int, dict[str, torch.Tensor]] | None:
    """The model-selection state stored in a checkpoint by :func:`save_checkpoint` (None when it holds none).

    Raises:
        ValueError: A malformed ``best`` record (the message names the checkpoint).
    """
    tensors, meta = load_model_dir(path)
    record = meta.get("best")
    if record is None:
        return None
    try:
        score, iteration = float(record["score"]), int(record["iteration"])
    except (KeyError, TypeError, ValueError) as err:
        msg = f"{path}: malformed model-selection record {record!r}"
        raise ValueError(msg) from err
    return score, iteration, {k[5:]: v for k, v in tensors.items() if k.startswith("best.")}


def all_reduce_mean(fabric: Any) -> Callable[[torch.Tensor], None] | None:
    """The DxDP ``sync`` hook over Fabric's ``all_reduce`` (None in a single process)."""
    if fabric is None or fabric.world_size == 1:
        return None

    def sync(flat: torch.Tensor) -> None:
        flat.copy_(fabric.all_reduce(flat, reduce_op="mean"))

    return sync


def release_process_group(fabric: Any) -> None:
    """Wait for every rank, then destroy the default process group (no-op in a single process).

    Call it when a rank has finished its last collective. A process that exits with a live gloo group can
    abort at interpreter shutdown ("terminate called without an active exception", SIGABRT): gloo's worker
    threads still hold work objects while Python is torn down (pytorch/pytorch#190489). Destroying the group
    while the interpreter is alive avoids it.
    """
    import torch.distributed as dist

    if fabric is None or fabric.world_size == 1 or not (dist.is_available() and dist.is_initialized()):
        return
    fabric.barrier()
    dist.destroy_process_group()


def is_global_zero() -> bool:
    """True in a single process and on rank 0 (only rank 0 writes results).

    Uses the process group once it exists, else the launcher's environment (torchrun: ``RANK``; Fabric's
    subprocess launcher: ``NODE_RANK`` / ``LOCAL_RANK``), so it is right before training starts too.
    """
    import os

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    if "RANK" in os.environ:
        return int(os.environ["RANK"]) == 0
    return int(os.environ.get("NODE_RANK", "0")) == 0 and int(os.environ.get("LOCAL_RANK", "0")) == 0
