"""The stages of one training run, in one place: what a config will run, and the object that runs them.

A run goes through (each stage skipped when its length is 0):

1. autoencoder reconstruction pre-training (``energy_model="autoencoder"``, App. C.3), then the frozen copy that
   starts the sampler (docs/paper_map.md);
2. DDPM pre-training of the sampler (``sampler_pretrain_iter``, ``parameterization="eps"``; Table 1 "Pretrain");
3. ``n_iter`` DxMI iterations (:class:`~dxmi_ad.training.dxdp.DxDPTrainer`, Algorithm 1), the first ``warmup_iter``
   with the energy frozen (a named deviation);
4. ``energy_refit_iter`` energy-only steps against the frozen final sampler
   (:class:`~dxmi_ad.training.dxdp.EnergyRefitter`, a named deviation; :func:`~dxmi_ad.training.fit.train_model` only).

:func:`plan_stages` says how long each stage is; :class:`StagedTraining` advances a model through them one batch at a
time. Both the CLI / library loop (:func:`~dxmi_ad.training.fit.train_model`) and the anomalib module's
``training_step`` use them, so the order of the stages is written once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch

from dxmi_ad.config import DxMIConfig
from dxmi_ad.nn.model import DxMIModel
from dxmi_ad.training.dxdp import AutoencoderPretrainer, DxDPTrainer, SamplerPretrainer

__all__ = ["SCHEDULE_KEYS", "WARMUP_SHARE", "StageSchedule", "StagedTraining", "is_autoencoder", "plan_stages"]


SCHEDULE_KEYS = ("ae_pretrain_iter", "sampler_pretrain_iter", "n_iter", "warmup_iter")
"""The lengths that make up a training schedule (DxMIConfig / DxMIDetector parameters of the same names)."""

WARMUP_SHARE = 1 / 3
"""Share of the DxMI iterations a warm-up may take when it would otherwise take all of them (the textures recipes
give it 100 of 300 iterations, the estimator defaults 50 of 150)."""


@dataclasses.dataclass(frozen=True)
class StageSchedule:
    """The stages a training run will go through, in updates (optimizer steps), in order.

    Attributes:
        ae_pretrain: Autoencoder reconstruction pre-training updates (0 unless the energy is an autoencoder).
        sampler_pretrain: DDPM pre-training updates of the sampler.
        dxmi: DxMI iterations.
        warmup: The first DxMI iterations, in which the energy is frozen (value and sampler only).
        energy_refit: Energy-only updates after the DxMI stage (``energy_refit_iter``; 0 without DxMI iterations).
            Run by :func:`~dxmi_ad.training.fit.train_model` only: :class:`StagedTraining` (the anomalib module,
            which refuses a refit) never enters it.
    """

    ae_pretrain: int
    sampler_pretrain: int
    dxmi: int
    warmup: int
    energy_refit: int = 0

    @property
    def energy_updates(self) -> int:
        """DxMI iterations that update the energy: ``dxmi - warmup`` (never negative)."""
        return max(0, self.dxmi - self.warmup)

    @property
    def total(self) -> int:
        """All updates of the run."""
        return self.ae_pretrain + self.sampler_pretrain + self.dxmi + self.energy_refit

    def describe(self) -> str:
        """One line, e.g. ``"714 autoencoder + 36 DxMI updates (12 with the energy frozen)"``."""
        parts = [f"{self.ae_pretrain} autoencoder"] if self.ae_pretrain else []
        parts += [f"{self.sampler_pretrain} sampler (DDPM)"] if self.sampler_pretrain else []
        parts.append(f"{self.dxmi} DxMI")
        parts += [f"{self.energy_refit} energy refit"] if self.energy_refit else []
        frozen = f" ({self.warmup} with the energy frozen)" if self.warmup and self.dxmi else ""
        return " + ".join(parts) + f" updates{frozen}"


def is_autoencoder(params: Mapping[str, Any]) -> bool:
    """Whether a config mapping trains an autoencoder energy (the default)."""
    return DxMIConfig.rename_old_keys(dict(params)).get("energy_model", "autoencoder") == "autoencoder"


def plan_stages(config: DxMIConfig | Mapping[str, Any]) -> StageSchedule:
    """The stages a fresh training run of ``config`` goes through (what :func:`train_model` runs).

    Args:
        config: A :class:`DxMIConfig` or a mapping with the :data:`SCHEDULE_KEYS` (and ``energy`` /
            ``energy_model``; missing lengths count as 0).

    Returns:
        The :class:`StageSchedule`; a warm-up that would cover every DxMI iteration is cut to the first
        :data:`WARMUP_SHARE` of them (see :func:`train_model`).
    """
    params = config.to_dict() if isinstance(config, DxMIConfig) else dict(config)
    n_iter = int(params.get("n_iter") or 0)
    warmup = int(params.get("warmup_iter") or 0)
    if 0 < n_iter <= warmup:
        warmup = int(n_iter * WARMUP_SHARE)
    ae = int(params.get("ae_pretrain_iter") or 0) if is_autoencoder(params) else 0
    return StageSchedule(ae, int(params.get("sampler_pretrain_iter") or 0), n_iter, warmup,
                         int(params.get("energy_refit_iter") or 0) if n_iter else 0)


class StagedTraining:
    """Advance a model through its :class:`StageSchedule` one batch at a time.

    The autoencoder stage ends with :meth:`~dxmi_ad.nn.model.DxMIModel.freeze_initial` (the start network copies the
    pretrained autoencoder), the sampler stage with the AVR velocity scales of the pre-trained sampler; the DxMI
    stage runs :meth:`DxDPTrainer.step`.

    Args:
        model: The model (trained in place).
        config: Its config (learning rates, batch size).
        stages: The lengths (:func:`plan_stages`); pass ``StageSchedule(0, 0, n, w)`` to skip pre-training (a model
            that continues from another one).
        sync: Data-parallel gradient averaging hook (see :class:`DxDPTrainer`), or None.
        trainer: The DxMI stage's trainer (built on first use when None; give one to restore optimizer state).
        done: Updates already made (a resumed run starts there; no stage before it is repeated).
        pretrained: The start network is already frozen (a resumed run, or a model that continues from another).

    Attributes:
        done: Updates made so far.
    """

    def __init__(self, model: DxMIModel, config: DxMIConfig, stages: StageSchedule,
                 sync: Callable[[torch.Tensor], None] | None = None, trainer: DxDPTrainer | None = None,
                 done: int = 0, pretrained: bool = False) -> None:
        self.model, self.config, self.stages, self.sync = model, config, stages, sync
        self.done = int(done)
        self._trainer = trainer
        self._ae: AutoencoderPretrainer | None = None
        self._sampler: SamplerPretrainer | None = None
        self._frozen = pretrained or self.done > stages.ae_pretrain

    @property
    def stage(self) -> str:
        """``"autoencoder"``, ``"sampler"`` or ``"dxmi"``: the stage of the next update."""
        if self.done < self.stages.ae_pretrain:
            return "autoencoder"
        if self.done < self.stages.ae_pretrain + self.stages.sampler_pretrain:
            return "sampler"
        return "dxmi"

    @property
    def trainer(self) -> DxDPTrainer:
        """The DxMI stage's :class:`DxDPTrainer` (built on first use, with the warm-up the schedule planned)."""
        if self._trainer is None:
            config = self.config.replace(warmup_iter=self.stages.warmup) \
                if self.stages.warmup != self.config.warmup_iter else self.config
            self._trainer = DxDPTrainer(self.model, config, sync=self.sync)
        return self._trainer

    def _end_of_autoencoder(self) -> None:
        if not self._frozen:
            if self.stages.ae_pretrain:
                self.model.energy.eval()
            self.model.freeze_initial()
            self._frozen = True

    def step(self, x: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """One update on a batch ``x`` (``(B, D)`` vectors, or ``(B, C, H, W)`` images in pixel mode).

        Returns:
            The stage's diagnostics: ``ae_loss`` (autoencoder), ``ddpm_loss`` (sampler), or the DxMI step's
            (``energy_data``, ``energy_samples``... see :meth:`DxDPTrainer.step`); scalar tensors.
        """
        stage = self.stage
        if stage == "autoencoder":
            if self._ae is None:
                self._ae = AutoencoderPretrainer(self.model.energy, self.config.ae_lr, self.sync)
            out = {"ae_loss": torch.tensor(self._ae.step(x))}
        else:
            self._end_of_autoencoder()
            if stage == "sampler":
                if self._sampler is None:
                    self._sampler = SamplerPretrainer(self.model, self.config.sampler_pretrain_lr,
                                                      self.stages.sampler_pretrain, self.sync)
                out = {"ddpm_loss": torch.tensor(self._sampler.step(x, generator))}
                if self.done + 1 == self.stages.ae_pretrain + self.stages.sampler_pretrain:
                    self._sampler.finish()
            else:
                out = self.trainer.step(x, generator)
        self.done += 1
        return out

    def pretrain(self, batches: Callable[[], torch.Tensor], generator: torch.Generator,
                 report: Callable[[str, int, int, float], None] | None = None) -> None:
        """Run every pre-training update left (autoencoder, then sampler); the start network is frozen even when
        both stages are empty.

        Args:
            batches: Draws the next training batch.
            generator: The run's generator (sampler noise).
            report: Called as ``report(stage, i, stage_length, loss)`` after each update (``i`` from 0).
        """
        lengths = {"autoencoder": (0, self.stages.ae_pretrain),
                   "sampler": (self.stages.ae_pretrain, self.stages.sampler_pretrain)}
        while self.stage != "dxmi":
            stage = self.stage
            out = self.step(batches(), generator)
            if report is not None:
                start, length = lengths[stage]
                report(stage, self.done - 1 - start, length, float(next(iter(out.values()))))
        self._end_of_autoencoder()
