"""DxMI as an anomalib model: ``dxmi_ad.anomalib.Dxmi`` works with anomalib's ``Engine``, data modules and CLI.

Layout as anomalib's own models (anomalib / pyod conventions):

* :class:`DxmiTorchModel`: a plain ``nn.Module`` (frozen backbone -> per-location DxMI energy) returning
  ``InferenceBatch(pred_score, anomaly_map)``; the same :class:`~dxmi_ad.features.extractor.FeatureExtractor` and
  :class:`~dxmi_ad.nn.model.DxMIModel` as the CLI, so ``pred_score`` = the maximum (or, with ``scoring.top_k``, the mean
  of the k largest) of the per-location energy map and ``anomaly_map`` = the energy map upsampled bilinearly
  (docs/paper_map.md).
* :class:`Dxmi`: the ``AnomalibModule`` around it, with **manual optimization**: every training batch's feature
  vectors feed ``updates_per_batch`` optimizer updates of the same engine the CLI uses
  (:class:`~dxmi_ad.training.dxdp.AutoencoderPretrainer` for the first ``ae_pretrain_iter`` updates, then
  :class:`~dxmi_ad.training.dxdp.DxDPTrainer`: energy, T value TD steps, one sampler step per update). The length of
  training is the user's: ``Engine(max_epochs=...)`` / ``max_steps`` are never overridden
  (``trainer_arguments`` only sets ``num_sanity_val_steps=0`` and ``devices=1``; anomalib / pyod conventions).

Named deviation from the CLI's training run: the CLI draws DxMI batches from all training vectors at once; here each
update draws from the vectors of the current image batch (anomalib streams images). ``to_detector()`` turns a
trained module into an :class:`~dxmi_ad.image.ImageDetector` (``save`` it and ``dxmi-ad evaluate`` / ``score`` /
``export`` work on it).

Usage::

    from anomalib.data import Folder
    from anomalib.engine import Engine
    from dxmi_ad.anomalib import Dxmi

    engine = Engine(max_epochs=20)
    engine.fit(Dxmi(), datamodule=Folder(name="parts", root="data", normal_dir="good", abnormal_dir="bad"))
    engine.test(...)

    anomalib fit --model dxmi_ad.anomalib.Dxmi --data anomalib.data.Folder --data.root data ...
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import torch
from anomalib import LearningType
from anomalib.data import Batch, InferenceBatch
from anomalib.models.components import AnomalibModule
from anomalib.pre_processing import PreProcessor
from torch import nn
from torchvision.transforms.v2 import Compose, Resize

from dxmi_ad import recipes
from dxmi_ad._warn import caller_stacklevel
from dxmi_ad.checkpoint import read_yaml_mapping
from dxmi_ad.config import DxMIConfig
from dxmi_ad.features.extractor import FeatureExtractor
from dxmi_ad.nn.model import DxMIModel
from dxmi_ad.scoring import MapScorer, ScoringSettings
from dxmi_ad.training.dxdp import DxDPTrainer, random_batch
from dxmi_ad.training.fit import build_model, count_updates, scale_schedule
from dxmi_ad.training.schedule import StagedTraining, StageSchedule, plan_stages

__all__ = ["Dxmi", "DxmiTorchModel"]

DEFAULT_RECIPE = recipes.path("textures")


class DxmiTorchModel(nn.Module):
    """Frozen backbone + DxMI energy head, anomalib's torch-model contract.

    Args:
        extractor: The frozen feature extractor (input ``(B, 3, H, W)`` in [0, 1]; it applies ImageNet normalization).
        dxmi: The DxMI model on the extractor's ``C``-dimensional location vectors.
        scoring: Energy-map blur and top-k mean (:class:`~dxmi_ad.scoring.ScoringSettings`); default: the maximum.
    """

    def __init__(self, extractor: FeatureExtractor, dxmi: DxMIModel, scoring: ScoringSettings | None = None) -> None:
        super().__init__()
        self.extractor = extractor
        self.dxmi = dxmi
        self.scoring = scoring or ScoringSettings()

    def vectors(self, images: torch.Tensor) -> torch.Tensor:
        """Location vectors ``(B * h * w, C)`` of images ``(B, 3, H, W)`` (no gradient: the backbone is frozen)."""
        feats = self.extractor(images)
        return feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1])

    def forward(self, images: torch.Tensor) -> InferenceBatch:
        """``images (B, 3, H, W)`` in [0, 1] -> ``InferenceBatch(pred_score (B,), anomaly_map (B, 1, H, W))``.

        Raises:
            ValueError: If ``images`` is not ``(B, 3, H, W)`` (e.g. a grayscale batch; convert to 3 channels).
        """
        scorer = MapScorer(self.dxmi.energy, self.scoring)  # the scorer of ImageDetector and the exported graph
        pred_score, amap = scorer(self.extractor(images), images.shape[-2:])
        return InferenceBatch(pred_score=pred_score, anomaly_map=amap[:, None])


class Dxmi(AnomalibModule):
    """DxMI anomaly detection as an anomalib ``AnomalibModule`` (one class, manual optimization).

    Args:
        backbone: timm backbone (default: the offline ImageNet EfficientNet-Lite0 of the CLI).
        out_indices: Backbone stages, resized to one grid and concatenated (docs/paper_map.md).
        image_size: Side of the square model input (the pre-processor resizes to it).
        pretrained: ImageNet weights (False: random, only on purpose).
        weights: Backbone weights file.
        neighbourhood: ``k x k`` average of every stage's map (PatchCore's local aggregation, 3; 1 = none).
        recipe: Image recipe YAML whose ``model`` section sets the DxMI config (a path or a shipped recipe name; default ``textures``, :mod:`dxmi_ad.recipes`).
        model_overrides: DxMIConfig fields applied over the recipe (e.g. ``{"ae_pretrain_iter": 500}``).
        blur_sigma: Gaussian blur of the energy map before the maximum, in grid cells
            (:class:`~dxmi_ad.scoring.ScoringSettings`); None = the recipe's ``scoring`` section (0 when it has none).
        top_k: ``pred_score`` = mean of the ``top_k`` largest cells of the (blurred) energy map; None = the recipe's
            ``scoring`` section (the default ``textures`` recipe: 3; 1, the maximum, when it has none).
        updates_per_batch: Optimizer updates per training batch (default: the batch's vectors / ``batch_size``,
            i.e. about one pass over them).
        seed: Seed of the networks and of every draw during training.
        pre_processor, post_processor, evaluator, visualizer: anomalib components (True = default, False = none).

    Raises:
        dxmi_ad.features.extractor.PretrainedWeightsError: No pretrained weights (lists the options).
        ValueError: A recipe or override with ``energy_refit_iter > 0`` (the refit runs in ``train_model`` only).
    """

    def __init__(
        self,
        backbone: str = "tf_efficientnet_lite0",
        out_indices: tuple[int, ...] | list[int] = (0, 1, 2, 3),
        image_size: int = 224,
        pretrained: bool = True,
        weights: str | None = None,
        neighbourhood: int = 1,
        recipe: str | None = None,
        model_overrides: dict[str, Any] | None = None,
        blur_sigma: float | None = None,
        top_k: int | None = None,
        updates_per_batch: int | None = None,
        seed: int = 0,
        pre_processor: nn.Module | bool = True,
        post_processor: nn.Module | bool = True,
        evaluator: Any = True,
        visualizer: Any = True,
    ) -> None:
        self.image_size = int(image_size)
        super().__init__(pre_processor=pre_processor, post_processor=post_processor, evaluator=evaluator,
                         visualizer=visualizer)
        self.automatic_optimization = False
        extractor = FeatureExtractor(backbone, tuple(out_indices), pretrained, weights, neighbourhood=neighbourhood)
        recipe_map = read_yaml_mapping(recipes.resolve(recipe) if recipe else DEFAULT_RECIPE)
        params = DxMIConfig.rename_old_keys(dict(recipe_map.get("model") or {}), "recipe")
        scoring = dict(recipe_map.get("scoring") or {})
        if blur_sigma is not None:
            scoring["blur_sigma"] = blur_sigma
        if top_k is not None:
            scoring["top_k"] = top_k
        self.scoring = ScoringSettings.from_dict(scoring)
        self._recipe_params = {**DxMIConfig().to_dict(), **params}  # the schedule scales from these (training_step)
        self._overrides = DxMIConfig.rename_old_keys(dict(model_overrides or {}), "model_overrides")
        params.update(self._overrides)
        self.dxmi_config = DxMIConfig.from_dict({**params, "dim": extractor.channels, "seed": seed})
        if self.dxmi_config.energy_refit_iter:  # the refit runs after the last DxMI iteration of train_model only
            msg = (f"energy_refit_iter={self.dxmi_config.energy_refit_iter}: the energy refit runs in `dxmi-ad train` "
                   "and DxMIDetector, not in anomalib's Engine; set it to 0 in the recipe or model_overrides")
            raise ValueError(msg)
        if self.dxmi_config.energy_ema:  # the averaged energy is swapped in at the end of train_model only
            msg = (f"energy_ema={self.dxmi_config.energy_ema}: the average of the energy's iterates is used by "
                   "`dxmi-ad train` and DxMIDetector, not by anomalib's Engine; set it to 0 in the recipe or "
                   "model_overrides")
            raise ValueError(msg)
        if self.dxmi_config.energy_model == "autoencoder":  # bottleneck < feature channels, refused before any training
            from dxmi_ad.nn.energy import autoencoder_latent_dim

            autoencoder_latent_dim(self.dxmi_config.dim, self.dxmi_config.latent_dim, self.dxmi_config.spherical)
        self.model = DxmiTorchModel(extractor, build_model(self.dxmi_config), self.scoring)
        self.updates_per_batch = updates_per_batch
        self.features = {"backbone": backbone, "out_indices": tuple(out_indices), "image_size": self.image_size,
                         "pretrained": pretrained, "weights": weights, "neighbourhood": int(neighbourhood)}
        self._generator = torch.Generator().manual_seed(seed)
        self._staged: StagedTraining | None = None
        self._pending_state: tuple[dict, dict] | None = None
        self.schedule: StageSchedule | None = None  # set from the trainer at the first training step
        self.register_buffer("updates_done", torch.zeros((), dtype=torch.long))

    # ------------------------------------------------------------------ anomalib contract
    def configure_pre_processor(self, image_size: tuple[int, int] | None = None) -> PreProcessor:
        """Resize to ``image_size`` (default the model's); no Normalize (the extractor applies ImageNet's)."""
        size = image_size or (getattr(self, "image_size", 224),) * 2
        return PreProcessor(transform=Compose([Resize(size, antialias=True)]))

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """Only hard requirements: no sanity validation, one device (epochs and steps stay the user's)."""
        return {"num_sanity_val_steps": 0, "devices": 1}

    @property
    def learning_type(self) -> LearningType:
        """One-class: trained on normal images only."""
        return LearningType.ONE_CLASS

    def configure_optimizers(self) -> None:
        """None: the DxMI engine owns its Adam optimizers (manual optimization)."""
        return

    # ------------------------------------------------------------------ training
    def plan_schedule(self, n_images: int, images_per_batch: int, locations_per_image: int, epochs: int,
                      drop_last: bool = False, batches_per_epoch: int | None = None) -> StageSchedule:
        """Fit the recipe's stages into the updates this run will make (:func:`~dxmi_ad.training.fit.scale_schedule`).

        A run makes :func:`~dxmi_ad.training.fit.count_updates` updates (e.g. 100 images in batches of 32 at 224 px
        for 30 epochs: 750). When that is fewer than the recipe's ``ae_pretrain_iter + sampler_pretrain_iter +
        n_iter`` (textures: 6000 + 0 + 300), the pre-training stages keep their share of it and DxMI runs the rest
        (714 + 36 updates, the warm-up scaled to 12); lengths given in ``model_overrides`` are kept as given. An
        info line says what was scaled. Called by the first :meth:`training_step`; ``dxmi_config`` is updated.

        Args:
            n_images: Training images per epoch.
            images_per_batch: The training loader's batch size.
            locations_per_image: Feature vectors per image (``h x w`` of the backbone grid).
            epochs: ``max_epochs`` of the trainer.
            drop_last: Whether the loader drops its last incomplete batch.
            batches_per_epoch: Batches run per epoch (Lightning's ``num_training_batches``), None = all.

        Returns:
            The stages the run goes through.

        Raises:
            ValueError: Pre-training fixed in ``model_overrides`` takes every update of the run, or a warm-up fixed
                there is not shorter than the DxMI stage (the message gives the arithmetic).
        """
        total = count_updates(n_images, images_per_batch, locations_per_image, self.dxmi_config.batch_size, epochs,
                              self.updates_per_batch, drop_last, batches_per_epoch)
        changes, notes = scale_schedule(self._recipe_params, self._overrides, total)
        if changes:
            self.dxmi_config = self.dxmi_config.replace(**changes)
        from lightning.pytorch.utilities import rank_zero_info

        for note in notes:
            rank_zero_info(f"Dxmi: {note}")
        self.schedule = plan_stages(self.dxmi_config)
        return self.schedule

    def _plan_from_trainer(self, locations_per_image: int) -> None:
        """:meth:`plan_schedule` from the attached trainer; an unbounded run (no ``max_epochs``) keeps the recipe."""
        self.schedule = plan_stages(self.dxmi_config)
        try:
            trainer = self.trainer
            epochs = trainer.max_epochs
            loader = trainer.train_dataloader
            n_images, per_batch = len(loader.dataset), int(loader.batch_size)
            drop_last = bool(getattr(loader, "drop_last", False))
            batches = trainer.num_training_batches
        except (AttributeError, RuntimeError, TypeError):  # no trainer / an iterable loader without a length
            return
        if epochs is None or epochs < 0:
            return
        batches = int(batches) if isinstance(batches, int) or (isinstance(batches, float) and math.isfinite(batches)) \
            else None
        self.plan_schedule(n_images, per_batch, locations_per_image, int(epochs), drop_last, batches)

    def training_step(self, batch: Batch, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        """``updates_per_batch`` updates on the batch's location vectors, through the stages of the CLI's training run:
        autoencoder pre-training, DDPM pre-training of the sampler (``sampler_pretrain_iter``), then DxMI; the stage
        lengths are fitted to the run's length at the first step (:meth:`plan_schedule`).

        Returns:
            The last update's diagnostics (``loss`` = autoencoder loss or ``energy_data - energy_samples``).
        """
        del args, kwargs
        cfg = self.dxmi_config
        dxmi = self.model.dxmi
        gen = self._generator
        if gen.device != self.device:
            self._generator = gen = torch.Generator(device=self.device).manual_seed(cfg.seed + int(self.updates_done))
        vectors = self.model.vectors(batch.image)
        if self.schedule is None:
            self._plan_from_trainer(max(1, len(vectors) // max(1, len(batch.image))))
            cfg = self.dxmi_config
        n_updates = self.updates_per_batch or max(1, math.ceil(len(vectors) / cfg.batch_size))
        if self._staged is None:  # the one schedule of every training path (dxmi_ad.training.schedule)
            done = int(self.updates_done)
            trainer = None
            if self._pending_state is not None:  # resumed from a Lightning checkpoint
                trainer = DxDPTrainer(dxmi, cfg)
                trainer.load_state(*self._pending_state)
                self._pending_state = None
            self._staged = StagedTraining(dxmi, cfg, self.schedule, trainer=trainer, done=done)
        names = {"ae_loss": "train/ae_loss", "ddpm_loss": "train/sampler_ddpm_loss"}
        out: dict[str, torch.Tensor] = {}
        for _ in range(n_updates):
            diag = self._staged.step(random_batch(vectors, cfg.batch_size, gen), gen)
            if "ae_loss" in diag or "ddpm_loss" in diag:
                (key, loss), = diag.items()
                out = {"loss": loss}
                self.log(names[key], loss, prog_bar=True)
            else:
                out = {"loss": diag["energy_data"] - diag["energy_samples"], **diag}
                self.log_dict({f"train/{k}": v for k, v in diag.items() if v.ndim == 0}, prog_bar=False)
            self.updates_done += 1
        return out

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the resolved scoring settings and the DxMI optimizers' state (Lightning checkpoints are anomalib's
        format; the weights are in it).
        """
        checkpoint["dxmi_scoring"] = self.scoring.to_dict()  # the recipe it came from may change later
        if self._staged is not None and self._staged.stage == "dxmi":
            trainer = self._staged.trainer
            checkpoint["dxmi_trainer"] = {"tensors": trainer.state_tensors(), "meta": trainer.state_meta()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the scoring the checkpoint was made with, and the DxMI optimizers' state when training continues.

        A checkpoint written before ``scoring.top_k`` existed scored with the maximum: it keeps ``top_k = 1`` even
        where the recipe now asks for more, so anomalib's stored thresholds still match the scores.
        """
        saved = checkpoint.get("dxmi_scoring")
        self.scoring = ScoringSettings.from_dict(saved) if saved is not None else ScoringSettings(
            blur_sigma=self.scoring.blur_sigma, top_k=1)
        self.model.scoring = self.scoring
        state = checkpoint.get("dxmi_trainer")
        if state is not None:
            self._pending_state = (state["tensors"], state["meta"])

    def on_train_end(self) -> None:
        """Warn when the run was too short to finish the autoencoder pre-training."""
        stages = self.schedule or plan_stages(self.dxmi_config)
        if int(self.updates_done) <= stages.ae_pretrain + stages.sampler_pretrain:
            warnings.warn(f"training stopped after {int(self.updates_done)} updates, before the pre-training "
                          f"({stages.ae_pretrain + stages.sampler_pretrain} updates) finished and before any DxMI "
                          "update; raise max_epochs / updates_per_batch", UserWarning, stacklevel=1)
        self.model.dxmi.eval()

    def validation_step(self, batch: Batch, *args: Any, **kwargs: Any) -> Batch:
        """Scores and maps of a validation batch (read by the post-processor and evaluator callbacks)."""
        del args, kwargs
        return batch.update(**self.model(batch.image)._asdict())

    # ------------------------------------------------------------------ interop
    def to_detector(self, calibration_images: Any = None, fpr: float | None = None, fdr: float | None = None,
                    batch_size: int = 32) -> Any:
        """The trained model as a dxmi-ad :class:`~dxmi_ad.image.ImageDetector` (shares the networks).

        Args:
            calibration_images: Normal images the model did **not** train on (never the test set), to carry a
                decision rule: a folder (its images, recursively, hidden names skipped), a list of files, or an
                image batch / list accepted by :meth:`ImageDetector.predict` (tensor, numpy, PIL). None: no rule.
            fpr: Target false-positive rate of the decision rule (see :meth:`ImageDetector.calibrate`; default
                0.01, or the smallest rate the calibration set supports, warned).
            fdr: Benjamini-Hochberg false discovery rate instead of ``fpr``.
            batch_size: Images per forward pass while scoring the calibration images.

        Returns:
            The detector. Without ``calibration_images`` it has no calibration, so it makes no decisions: a
            :class:`UserWarning` says so, ``predict`` returns no ``pred_label``, and after ``save`` ``dxmi-ad score``
            leaves ``pred_label`` empty until ``dxmi-ad calibrate --model RUN --calibration-dir DIR`` is run.

        Raises:
            ValueError: Unreadable calibration files (named), NaN pixels, or no images in the folder.
            dxmi_ad.calibration.CalibrationError: Too few calibration images for the rate (minimum stated).
        """
        import numpy as np

        from dxmi_ad.image import FeatureSettings, ImageDetector

        det = ImageDetector(self.dxmi_config, FeatureSettings(**self.features), scoring=self.scoring)
        det.extractor = self.model.extractor
        det.model_ = self.model.dxmi.eval()
        if calibration_images is None:
            warnings.warn("to_detector() without calibration_images: the detector has no decision rule (no "
                          "pred_label, empty pred_label column); pass normal images the model did not train on, or run "
                          "`dxmi-ad calibrate --model RUN --calibration-dir DIR` after saving", UserWarning,
                          stacklevel=caller_stacklevel())
            return det
        if isinstance(calibration_images, (str, Path)) and Path(calibration_images).is_dir():
            from dxmi_ad.data.images import find_images

            source = f"{calibration_images} (normal images held out from anomalib training)"
            calibration_images = find_images([calibration_images], require=True).files
        else:
            source = "normal images held out from anomalib training"
        items = (list(calibration_images) if isinstance(calibration_images, (list, tuple))
                 else calibration_images)
        scores = []
        with torch.no_grad():
            if isinstance(items, list):
                for i in range(0, len(items), batch_size):
                    scores.append(det.predict(items[i:i + batch_size])["pred_score"].double().numpy())
            else:
                scores.append(det.predict(items)["pred_score"].double().numpy())
        scores = np.concatenate(scores)
        det.calibrate(scores=scores, fpr=fpr, fdr=fdr, source=f"{len(scores)} {source}")
        return det
