"""timm models for the sweep: offline-safe pretrained weights, stage freezing, retrieval embedding nets."""

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


class EmbeddingNet(torch.nn.Module):
    """A retrieval model: timm backbone (pooled features) -> neck (linear + batch norm) -> training head.

    `embed(x)` gives the embedding (not normalised: prediction averages TTA views first,
    then L2-normalises); `forward(x, labels)` the head's logits for the loss. The head
    classifies the training folds' identities only, so predict builds the net with
    `n_classes=0` (no head) and loads the checkpoint without the head's weights.
    """

    def __init__(self, backbone: torch.nn.Module, embedding_dim: int, n_classes: int, head: str = "softmax",
                 scale: float = 30.0, margin: float = 0.3, subcenters: int = 3):
        super().__init__()
        from ensemble.heads import create_head

        self.backbone = backbone
        self.neck = torch.nn.Sequential(torch.nn.Linear(backbone.num_features, embedding_dim, bias=False),
                                        torch.nn.BatchNorm1d(embedding_dim))
        self.head = create_head(head, embedding_dim, n_classes, scale=scale, margin=margin,
                                subcenters=subcenters) if n_classes else None

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.neck(self.backbone(x))

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.embed(x), labels)

    def get_classifier(self) -> torch.nn.Module:
        """What stays trainable while the backbone is frozen: the neck and the head."""
        return torch.nn.ModuleList([self.neck] + ([self.head] if self.head is not None else []))


def create_embedding_model(backbone: str, n_classes: int, params: dict, **kwargs) -> EmbeddingNet:
    """A retrieval EmbeddingNet from a model's params (embedding_dim, head, scale, margin, subcenters).

    `kwargs` go to `create_model` (pretrained, weights, dropout, drop_path); `n_classes=0`: no head."""
    net = create_model(backbone, 0, **kwargs)  # num_classes=0: timm's pooled features
    return EmbeddingNet(net, params["embedding_dim"], n_classes, params["head"], params["scale"], params["margin"],
                        params["subcenters"])


def without_head(state_dict: dict) -> dict:
    """A retrieval checkpoint's weights minus the training head (it only classified training identities)."""
    return {k: v for k, v in state_dict.items() if not k.startswith("head.")}


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
