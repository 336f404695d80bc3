"""The model for each training task, and the few calls that differ between tasks, so the loop
does not need to know which task it trains.

Batches (what app.train.data's collate makes and what `training_loss` / `predict` take):
- classification: images a float tensor [B,3,H,W], normalised with the ImageNet mean and std;
  targets an int64 tensor [B] of class indices 0..C-1.
- detection, keypoints: images a float tensor [B,3,H,W] in [0, 1], NOT normalised (torchvision's
  detectors normalise inside, in GeneralizedRCNNTransform), already resized and padded to
  data.image_size (a list of [3,H,W] tensors works too); targets a list of B dicts
  {"boxes" float32 [N,4] XYXY pixels of the resized image, "labels" int64 [N] in 1..C,
  "keypoints" float32 [N,K,3] for keypoints}; N may be 0 (a negative image).
"""
from __future__ import annotations

import logging
from typing import Dict, List, Optional, Tuple

import torch
import torchvision
from torch import nn
from torch.nn import functional as F
from torchvision.ops.misc import FrozenBatchNorm2d

from app.config import UserError
from app.models import build_classifier, load_weights

log = logging.getLogger("thresher")

# torchvision builds these with trainable BatchNorm even when fine-tuning from weights.
_TRAINABLE_BATCHNORM = ("fasterrcnn_resnet50_fpn_v2",)
# The backbone layers torchvision keeps trainable when fine-tuning (its trainable_backbone_layers=3).
_TRAINABLE_BACKBONE_LAYERS = 3


def expects_normalized_images(task: str) -> bool:
    """Whether the loop normalises images (classifiers) or leaves them in [0, 1] (detectors, which
    normalise inside the model)."""
    return task == "classification"


def build_model(task: str, name: str, num_classes: int, num_keypoints: int, weights: Optional[str],
                image_size: int) -> nn.Module:
    """A torchvision model for `task` with `num_classes` outputs (detection and keypoints count the
    background class in). weights: null (random), a torchvision weights name read from
    $TORCH_HOME/hub/checkpoints (never downloaded), or a state-dict file; every tensor whose
    shape fits is loaded, so a COCO checkpoint or an ImageNet backbone fine-tunes on other classes."""
    if task == "classification":
        return build_classifier(name, num_classes, weights)
    if task not in ("detection", "keypoints"):
        raise UserError(f"model.task={task!r} is not allowed: choose classification, detection or keypoints")
    if num_classes < 2:
        raise UserError(f"{task} needs at least one class besides the background; the annotations have "
                        f"{num_classes - 1}")
    kwargs = dict(weights=None, weights_backbone=None, num_classes=num_classes,
                  # The loop feeds square images of image_size: the model must not rescale them to 800.
                  min_size=image_size, max_size=image_size)
    if task == "keypoints":
        if num_keypoints < 1:
            raise UserError("model.task=keypoints needs annotations with at least one keypoint")
        kwargs["num_keypoints"] = num_keypoints
    try:
        model = torchvision.models.get_model(name, **kwargs)
    except (ValueError, TypeError) as error:
        raise UserError(f"model.name={name!r} cannot be built for {task}: {error}") from None
    state = load_weights(weights)
    if state is None:
        log.warning("model %s is RANDOMLY INITIALISED (model.weights=null): %s training starts from scratch",
                    name, task)
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


def move_batch(images, targets, device: torch.device, non_blocking: bool = False):
    """images and targets of either batch representation onto `device`."""
    if isinstance(images, torch.Tensor):
        images = images.to(device, non_blocking=non_blocking)
    else:
        images = [image.to(device, non_blocking=non_blocking) for image in images]
    if isinstance(targets, torch.Tensor):
        targets = targets.to(device, non_blocking=non_blocking)
    else:
        targets = [{k: v.to(device, non_blocking=non_blocking) for k, v in t.items()} for t in targets]
    return images, targets


def is_detector(model: nn.Module) -> bool:
    return isinstance(model, torchvision.models.detection.generalized_rcnn.GeneralizedRCNN) or \
        isinstance(model, (torchvision.models.detection.RetinaNet, torchvision.models.detection.FCOS))


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel or torch.compile, to ask what it is."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def training_loss(model: nn.Module, images, targets) -> Tuple[torch.Tensor, Dict[str, float]]:
    """The loss to backpropagate and its parts to log. classification: cross-entropy of the
    logits (parts: loss_cross_entropy and the batch's accuracy); detection and keypoints: the sum
    of torchvision's loss dict (parts: loss_classifier, loss_box_reg, loss_objectness, ...).
    The model must be in train mode."""
    if is_detector(_unwrap(model)):
        if not model.training:
            raise RuntimeError("training_loss needs model.train(): a detector in eval mode predicts instead")
        losses = model(list(images) if isinstance(images, torch.Tensor) else images, targets)
        loss = sum(losses.values())
        values = torch.stack([v.detach().float() for v in losses.values()]).tolist()  # one device sync
        return loss, dict(zip(losses.keys(), values))
    logits = model(images)
    loss = F.cross_entropy(logits, targets)
    accuracy = (logits.detach().argmax(1) == targets).float().mean()
    loss_value, accuracy_value = torch.stack([loss.detach().float(), accuracy]).tolist()
    return loss, {"loss_cross_entropy": loss_value, "accuracy": accuracy_value}


@torch.no_grad()
def predict(model: nn.Module, images) -> List[dict]:
    """One dict per image, in eval mode (the mode is restored after). classification:
    {"labels": int64 scalar, "scores": softmax [C]}; detection: torchvision's {"boxes", "labels",
    "scores"} (keypoints adds "keypoints" [N,K,3] and "keypoints_scores"), in input pixels."""
    was_training = model.training
    model.eval()
    try:
        if is_detector(_unwrap(model)):
            return model(list(images) if isinstance(images, torch.Tensor) else images)
        probabilities = model(images).float().softmax(1)
        return [{"labels": p.argmax(), "scores": p} for p in probabilities]
    finally:
        model.train(was_training)

