"""timm models for the sweep: offline-safe pretrained weights and stage freezing."""

from __future__ import annotations

import os
from pathlib import Path

import timm
import torch

from ensemble.data.loader import IMAGENET_MEAN, IMAGENET_STD
from ensemble.errors import UserError


def create_model(
    backbone: str,
    num_classes: int,
    *,
    pretrained: bool = False,
    weights: str | os.PathLike | None = None,
    dropout: float = 0.0,
    drop_path: float = 0.0,
) -> torch.nn.Module:
    """A timm model with a fresh `num_classes` head.

    Pretrained weights come from a local file (`weights`: .safetensors or .pth) or,
    with `pretrained=True` and no file, from the user's Hugging Face hub cache only:
    the hub is never contacted (HF_HUB_OFFLINE), so a missing file fails at once
    with a clear message instead of retrying the network for a minute.
    """
    kwargs = {"num_classes": num_classes, "drop_rate": dropout}
    if drop_path:
        kwargs["drop_path_rate"] = drop_path
    if weights is not None:
        weights = Path(weights).expanduser()
        if not weights.is_file():
            raise UserError(f"weights file for {backbone!r} not found: {weights}. Fix the path under 'weights' in the space file.")
        return timm.create_model(backbone, pretrained=True, pretrained_cfg_overlay={"file": str(weights)}, **kwargs)
    if not pretrained:
        return timm.create_model(backbone, pretrained=False, **kwargs)
    previous = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        return timm.create_model(backbone, pretrained=True, **kwargs)
    except Exception as exc:  # timm raises hub/OS errors of several types when nothing is cached
        raise UserError(
            f"no pretrained weights for {backbone!r} in the local hub cache ({type(exc).__name__}). "
            f"Download them once on a machine with internet (timm.create_model({backbone!r}, pretrained=True)), "
            f"or set 'weights: {{{backbone}: /path/to/weights.safetensors}}' in the space file, or pretrained: false."
        ) from exc
    finally:
        if previous is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = previous


def backbone_normalization(backbone: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean/std the backbone was pretrained with (timm's pretrained config), else ImageNet's."""
    try:
        cfg = timm.models.get_pretrained_cfg(backbone)
    except Exception:  # noqa: BLE001 - timm raises RuntimeError/KeyError for models without configs
        cfg = None
    if cfg is None or cfg.mean is None:
        return IMAGENET_MEAN, IMAGENET_STD
    return tuple(cfg.mean), tuple(cfg.std)


def set_backbone_frozen(model: torch.nn.Module, frozen: bool) -> None:
    """Freeze (or unfreeze) everything but the classifier head.

    Frozen BatchNorm layers also stop updating their running statistics
    (`frozen_bn_eval` puts them in eval mode after each `model.train()`).
    """
    head = {id(p) for p in model.get_classifier().parameters()}
    for p in model.parameters():
        p.requires_grad = (not frozen) or id(p) in head


def frozen_bn_eval(model: torch.nn.Module) -> None:
    """Put norm layers whose parameters are all frozen into eval mode (call after model.train())."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            params = list(module.parameters())
            if params and not any(p.requires_grad for p in params):
                module.eval()
