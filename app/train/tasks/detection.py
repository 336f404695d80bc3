"""Object detection: boxes with classes, torchvision's detectors, their summed losses, COCO box mAP.

Batches: images a float tensor [B,3,H,W] in [0, 1], NOT normalised (torchvision's detectors
normalise inside, in GeneralizedRCNNTransform), already resized and padded to data.image_size (a
list of [3,H,W] tensors works too); targets a list of B dicts {"boxes" float32 [N,4] XYXY pixels
of the resized image, "labels" int64 [N] in 1..C}; N may be 0 (a negative image). Predictions:
torchvision's {"boxes", "labels", "scores"} per image, in input pixels.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

from app.errors import UserError
from app.train.tasks.base import TaskSpec


class DetectionTask(TaskSpec):
    name = "detection"
    model_names = ("fasterrcnn_resnet50_fpn", "fasterrcnn_resnet50_fpn_v2", "fasterrcnn_mobilenet_v3_large_fpn",
                   "fasterrcnn_mobilenet_v3_large_320_fpn", "retinanet_resnet50_fpn", "fcos_resnet50_fpn")
    data_formats = ("shapes", "coco", "oxford_pet")
    boxes = True
    metrics = ("val_map", "val_map50")
    normalize_images = False
    default_head = (91, 0)  # COCO

    def build_model(self, name: str, num_classes: int, num_keypoints: int, weights: Optional[str],
                    image_size: int):
        from app.train.detection_models import build_detector

        if num_classes < 2:
            raise UserError(f"{self.name} needs at least one class besides the background; the annotations have "
                            f"{num_classes - 1}")
        return build_detector(self.name, name, num_classes, weights, image_size, **self.model_arguments(num_keypoints))

    def model_arguments(self, num_keypoints: int) -> Dict[str, Any]:
        """Keyword arguments for torchvision.models.get_model besides the class count and sizes."""
        return {}

    def collate_targets(self, items: Sequence[tuple], labels: Sequence[Any]):
        return [item[1] for item in items]

    def move_batch(self, images, targets, device, non_blocking: bool = False):
        if isinstance(images, (list, tuple)):
            images = [image.to(device, non_blocking=non_blocking) for image in images]
        else:
            images = images.to(device, non_blocking=non_blocking)
        targets = [{k: v.to(device, non_blocking=non_blocking) for k, v in t.items()} for t in targets]
        return images, targets

    def training_loss(self, model, images, targets):
        """The sum of torchvision's loss dict; parts: loss_classifier, loss_box_reg, loss_objectness, ..."""
        import torch

        if not model.training:
            raise RuntimeError("training_loss needs model.train(): a detector in eval mode predicts instead")
        losses = model(_image_list(images), targets)
        loss = sum(losses.values())
        values = torch.stack([v.detach().float() for v in losses.values()]).tolist()  # one device sync
        return loss, dict(zip(losses.keys(), values))

    def predictions(self, model, images) -> List[dict]:
        return model(_image_list(images))

    def make_evaluator(self, annotations):
        from app.train.metrics import CocoEvaluator

        return CocoEvaluator(annotations.classes, 0)


def _image_list(images) -> list:
    """torchvision's detectors take a list of [3,H,W] images."""
    return images if isinstance(images, list) else list(images)
