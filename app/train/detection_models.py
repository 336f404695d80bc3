"""torchvision's detectors (Faster R-CNN, RetinaNet, FCOS, Keypoint R-CNN) built for thresher's
tasks: sized for the loop's square images, with every fitting tensor of the given weights loaded
and, from loaded backbone weights, fine-tuned the way torchvision fine-tunes them. The detection
and keypoints task specs build their models here.
"""
from __future__ import annotations

import logging
from typing import Dict, Optional

import torch
import torchvision
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from app.errors import UserError
from app.models import load_weights, warn_randomly_initialised

log = logging.getLogger("thresher")

# torchvision builds these with trainable BatchNorm even when fine-tuning from weights.
_TRAINABLE_BATCHNORM = ("fasterrcnn_resnet50_fpn_v2",)
# The backbone layers torchvision keeps trainable when fine-tuning (its trainable_backbone_layers=3).
_TRAINABLE_BACKBONE_LAYERS = 3


def build_detector(task: str, name: str, num_classes: int, weights: Optional[str], image_size: int,
                   **kwargs) -> nn.Module:
    """torchvision's detector `name` for `task` with `num_classes` outputs (the background counted
    in) and `kwargs` (num_keypoints); weights as for app.models.load_weights: every tensor whose
    shape fits is loaded, so a COCO checkpoint or an ImageNet backbone fine-tunes on other classes."""
    kwargs.update(weights=None, weights_backbone=None, num_classes=num_classes,
                  # The loop feeds square images of image_size: the model must not rescale them to 800.
                  min_size=image_size, max_size=image_size)
    try:
        model = torchvision.models.get_model(name, **kwargs)
    except (ValueError, TypeError) as error:
        raise UserError(f"model.name={name!r} cannot be built for {task}: {error}") from None
    state = load_weights(weights)
    if state is None:
        warn_randomly_initialised(name, f"{task} training starts from scratch")
        return model
    fitting = _fitting_tensors(model, state)
    if not fitting:
        raise UserError(f"model.weights={weights!r} has no tensor that fits {name}: is it for another model?")
    model.load_state_dict(fitting, strict=False)
    own = model.state_dict()
    log.info("model %s: loaded %d of its %d tensors from %s (the rest, e.g. a predictor for another class "
             "or keypoint count, start new)", name, len(fitting), len(own), weights)
    if any(key.startswith("backbone.body.") for key in fitting):
        _as_torchvision_finetunes(model, name)
    return model


def _fitting_tensors(model: nn.Module, state: dict) -> Dict[str, torch.Tensor]:
    """The tensors of `state` whose name and shape fit the model; a classifier's state dict (an
    ImageNet backbone) is matched against model.backbone.body."""
    own = model.state_dict()

    def fits(renamed: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        return {k: v for k, v in renamed.items() if k in own and torch.is_tensor(v) and own[k].shape == v.shape}

    candidates = [
        state,
        {f"backbone.body.{k}": v for k, v in state.items()},  # resnet: conv1.weight, layer1...
        {f"backbone.body.{k.removeprefix('features.')}": v for k, v in state.items()
         if k.startswith("features.")},  # mobilenet: features.0.0.weight
    ]
    return max((fits(c) for c in candidates), key=len)


def _as_torchvision_finetunes(model: nn.Module, name: str) -> None:
    """With loaded backbone weights, do what torchvision does when it builds a detector from
    weights: freeze the backbone's BatchNorm statistics (detection batches are too small to
    estimate them) and its early layers."""
    body = model.backbone.body
    if name not in _TRAINABLE_BATCHNORM:
        _freeze_batchnorm(body)
    if "resnet" in name:
        trainable = ("layer4", "layer3", "layer2", "layer1", "conv1")[:_TRAINABLE_BACKBONE_LAYERS]
        for parameter_name, parameter in body.named_parameters():
            if not parameter_name.startswith(trainable):
                parameter.requires_grad_(False)
    elif "mobilenet" in name:
        blocks = list(body.children())
        stages = [0] + [i for i, block in enumerate(blocks) if getattr(block, "_is_cn", False)] + [len(blocks) - 1]
        for block in blocks[:stages[len(stages) - _TRAINABLE_BACKBONE_LAYERS]]:
            block.requires_grad_(False)


def _freeze_batchnorm(module: nn.Module) -> None:
    for child_name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            with torch.no_grad():
                for key in ("weight", "bias", "running_mean", "running_var"):
                    value = getattr(child, key)
                    if value is not None:
                        getattr(frozen, key).copy_(value)
            setattr(module, child_name, frozen)
        else:
            _freeze_batchnorm(child)
