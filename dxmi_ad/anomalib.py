"""DxMI as an anomalib model: ``dxmi_ad.anomalib.Dxmi`` works with anomalib's ``Engine``, data modules and CLI.

Layout as anomalib's own models (ECOSYSTEM.md §1.2-1.4, §1.13):

* :class:`DxmiTorchModel`: a plain ``nn.Module`` (frozen backbone -> per-location DxMI energy) returning
  ``InferenceBatch(pred_score, anomaly_map)``; the same :class:`~dxmi_ad.features.extractor.FeatureExtractor` and
  :class:`~dxmi_ad.nn.model.DxMIModel` as the CLI, so ``pred_score`` = max per-location energy and ``anomaly_map`` =
  the energy map upsampled bilinearly (PAPER.md §3.3).
* :class:`Dxmi`: the ``AnomalibModule`` around it, with **manual optimization**: every training batch's feature
  vectors feed ``updates_per_batch`` optimizer updates of the same engine the CLI uses
  (:class:`~dxmi_ad.training.dxdp.AutoencoderPretrainer` for the first ``ae_pretrain_iter`` updates, then
  :class:`~dxmi_ad.training.dxdp.DxDPTrainer`: energy, T value TD steps, one sampler step per update). The length of
  training is the user's: ``Engine(max_epochs=...)`` / ``max_steps`` are never overridden
  (``trainer_arguments`` only sets ``num_sanity_val_steps=0`` and ``devices=1``; thread 13 of ECOSYSTEM.md §4).

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

from dxmi_ad.checkpoint import read_yaml_mapping
from dxmi_ad.config import DxMIConfig
from dxmi_ad.features.extractor import FeatureExtractor
from dxmi_ad.image import score_maps
from dxmi_ad.nn.model import DxMIModel
from dxmi_ad.training.dxdp import AutoencoderPretrainer, DxDPTrainer, _batches
from dxmi_ad import recipes
from dxmi_ad.training.fit import build_model

__all__ = ["Dxmi", "DxmiTorchModel"]

DEFAULT_RECIPE = recipes.path("textures")


class DxmiTorchModel(nn.Module):
    """Frozen backbone + DxMI energy head, anomalib's torch-model contract.

    Args:
        extractor: The frozen feature extractor (input ``(B, 3, H, W)`` in [0, 1]; it applies ImageNet normalization).
        dxmi: The DxMI model on the extractor's ``C``-dimensional location vectors.
    """

    def __init__(self, extractor: FeatureExtractor, dxmi: DxMIModel) -> None:
        super().__init__()
        self.extractor = extractor
        self.dxmi = dxmi

    def vectors(self, images: torch.Tensor) -> torch.Tensor:
        """Location vectors ``(B * h * w, C)`` of images ``(B, 3, H, W)`` (no gradient: the backbone is frozen)."""
        feats = self.extractor(images)
        return feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1])

    def forward(self, images: torch.Tensor) -> InferenceBatch:
        """``images (B, 3, H, W)`` in [0, 1] -> ``InferenceBatch(pred_score (B,), anomaly_map (B, 1, H, W))``.

        Raises:
            ValueError: If ``images`` is not ``(B, 3, H, W)`` (e.g. a grayscale batch; convert to 3 channels).
        """
        pred_score, amap = score_maps(self.dxmi.energy, self.extractor(images), images.shape[-2:])
        return InferenceBatch(pred_score=pred_score, anomaly_map=amap[:, None])


class Dxmi(AnomalibModule):
    """DxMI anomaly detection as an anomalib ``AnomalibModule`` (one class, manual optimization).

    Args:
        backbone: timm backbone (default: the offline ImageNet EfficientNet-Lite0 of the CLI).
        out_indices: Backbone stages, resized to one grid and concatenated (PAPER.md §3.3).
        image_size: Side of the square model input (the pre-processor resizes to it).
        pretrained: ImageNet weights (False: random, only on purpose).
        weights: Backbone weights file.
        recipe: Image recipe YAML whose ``model`` section sets the DxMI config (a path or a shipped recipe name; default ``textures``, :mod:`dxmi_ad.recipes`).
        model_overrides: DxMIConfig fields applied over the recipe (e.g. ``{"ae_pretrain_iter": 500}``).
        updates_per_batch: Optimizer updates per training batch (default: the batch's vectors / ``batch_size``,
            i.e. about one pass over them).
        seed: Seed of the networks and of every draw during training.
        pre_processor, post_processor, evaluator, visualizer: anomalib components (True = default, False = none).

    Raises:
        dxmi_ad.features.extractor.PretrainedWeightsError: No pretrained weights (lists the options).
    """

    def __init__(
        self,
        backbone: str = "tf_efficientnet_lite0",
        out_indices: tuple[int, ...] | list[int] = (0, 1, 2, 3),
        image_size: int = 224,
        pretrained: bool = True,
        weights: str | None = None,
        recipe: str | None = None,
        model_overrides: dict[str, Any] | None = None,
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
        extractor = FeatureExtractor(backbone, tuple(out_indices), pretrained, weights)
        params = dict(read_yaml_mapping(recipes.resolve(recipe) if recipe else DEFAULT_RECIPE).get("model") or {})
        params.update(model_overrides or {})
        self.dxmi_config = DxMIConfig.from_dict({**params, "dim": extractor.channels, "seed": seed})
        self.model = DxmiTorchModel(extractor, build_model(self.dxmi_config))
        self.updates_per_batch = updates_per_batch
        self.features = {"backbone": backbone, "out_indices": tuple(out_indices), "image_size": self.image_size,
                         "pretrained": pretrained, "weights": weights}
        self._generator = torch.Generator().manual_seed(seed)
        self._ae: AutoencoderPretrainer | None = None
        self._dxdp: DxDPTrainer | None = None
        self._pending_state: tuple[dict, dict] | None = None
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
    def training_step(self, batch: Batch, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        """``updates_per_batch`` updates on the batch's location vectors: autoencoder pre-training first, then DxMI.

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
        n_updates = self.updates_per_batch or max(1, math.ceil(len(vectors) / cfg.batch_size))
        out: dict[str, torch.Tensor] = {}
        for _ in range(n_updates):
            x = _batches(vectors, cfg.batch_size, gen)
            if int(self.updates_done) < cfg.ae_pretrain_iter:
                if self._ae is None:
                    self._ae = AutoencoderPretrainer(dxmi.energy, cfg.ae_lr)
                loss = self._ae.step(x)
                out = {"loss": torch.tensor(loss)}
                self.log("train/ae_loss", loss, prog_bar=True)
            else:
                if int(self.updates_done) == cfg.ae_pretrain_iter:  # pre-training just ended (never on resume)
                    dxmi.freeze_initial()  # the start network copies the pretrained autoencoder (pitfall 17)
                if self._dxdp is None:
                    self._dxdp = DxDPTrainer(dxmi, cfg)
                    if self._pending_state is not None:  # resumed from a Lightning checkpoint
                        self._dxdp.load_state(*self._pending_state)
                        self._pending_state = None
                diag = self._dxdp.step(x, gen)
                out = {"loss": diag["energy_data"] - diag["energy_samples"], **diag}
                self.log_dict({f"train/{k}": v for k, v in diag.items() if v.ndim == 0}, prog_bar=False)
            self.updates_done += 1
        return out

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the DxMI optimizers' state (Lightning checkpoints are anomalib's format; the weights are in it)."""
        if self._dxdp is not None:
            checkpoint["dxmi_trainer"] = {"tensors": self._dxdp.state_tensors(), "meta": self._dxdp.state_meta()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the DxMI optimizers' state when training continues from a Lightning checkpoint."""
        state = checkpoint.get("dxmi_trainer")
        if state is not None:
            self._pending_state = (state["tensors"], state["meta"])

    def on_train_end(self) -> None:
        """Warn when the run was too short to finish the autoencoder pre-training."""
        if int(self.updates_done) < self.dxmi_config.ae_pretrain_iter:
            warnings.warn(f"training stopped after {int(self.updates_done)} updates, before the autoencoder "
                          f"pre-training ({self.dxmi_config.ae_pretrain_iter} updates) finished and before any DxMI update; "
                          "raise max_epochs / updates_per_batch", UserWarning, stacklevel=1)
        self.model.dxmi.eval()

    def validation_step(self, batch: Batch, *args: Any, **kwargs: Any) -> Batch:
        """Scores and maps of a validation batch (read by the post-processor and evaluator callbacks)."""
        del args, kwargs
        return batch.update(**self.model(batch.image)._asdict())

    # ------------------------------------------------------------------ interop
    def to_detector(self) -> Any:
        """The trained model as a dxmi-ad :class:`~dxmi_ad.image.ImageDetector` (shares the networks).

        Its calibration is unset: call ``calibrate(samples)`` on held-out normal images before using decisions.
        """
        from dxmi_ad.image import FeatureSettings, ImageDetector

        det = ImageDetector(self.dxmi_config, FeatureSettings(**self.features))
        det.extractor = self.model.extractor
        det.model = self.model.dxmi.eval()
        return det
