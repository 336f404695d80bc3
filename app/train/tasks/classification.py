"""Image classification: one class per image, a torchvision classifier, cross-entropy, top-1.

Batches: images normalised with the ImageNet mean and std; targets an int64 tensor [B] of class
indices 0..C-1. Predictions: {"labels": int64 scalar, "scores": softmax [C]} per image.
"""
from __future__ import annotations

from typing import Any, List, Optional, Sequence

from app.train.tasks.base import TaskSpec


class ClassificationTask(TaskSpec):
    name = "classification"
    # The embed stage builds the same classifiers (sampler.embedding_model).
    model_names = (
        "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
        "mobilenet_v3_small", "mobilenet_v3_large", "mobilenet_v2",
        "efficientnet_b0", "efficientnet_b1", "efficientnet_b2", "efficientnet_b3",
        "convnext_tiny", "regnet_y_400mf", "shufflenet_v2_x1_0",
    )
    data_formats = ("shapes", "folder", "coco", "oxford_pet")
    labels_from_folders = ("folder", "shapes")
    metrics = ("val_top1",)
    normalize_images = True
    default_head = (1000, 0)  # ImageNet

    def training_target(self, annotation_target: dict) -> int:
        return int(annotation_target["label"])

    def build_model(self, name: str, num_classes: int, num_keypoints: int, weights: Optional[str],
                    image_size: int):
        from app.models import build_classifier

        return build_classifier(name, num_classes, weights)

    def collate_targets(self, items: Sequence[tuple], labels: Sequence[Any]):
        import torch

        # The label is the dataset's, by index: a classification target passes the transform as None.
        return torch.tensor([labels[item[2]] for item in items], dtype=torch.long)

    def move_batch(self, images, targets, device, non_blocking: bool = False):
        return images.to(device, non_blocking=non_blocking), targets.to(device, non_blocking=non_blocking)

    def training_loss(self, model, images, targets):
        """Cross-entropy of the logits; parts: loss_cross_entropy and the batch's accuracy."""
        import torch
        from torch.nn import functional as F

        logits = model(images)
        loss = F.cross_entropy(logits, targets)
        accuracy = (logits.detach().argmax(1) == targets).float().mean()
        loss_value, accuracy_value = torch.stack([loss.detach().float(), accuracy]).tolist()  # one device sync
        return loss, {"loss_cross_entropy": loss_value, "accuracy": accuracy_value}

    def predictions(self, model, images) -> List[dict]:
        probabilities = model(images).float().softmax(1)
        return [{"labels": p.argmax(), "scores": p} for p in probabilities]

    def make_evaluator(self, annotations):
        from app.train.metrics import ClassificationEvaluator

        return ClassificationEvaluator()
