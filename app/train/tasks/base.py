"""The interface every training task implements, as DeepLabCut 3's runners do: one class per task,
and the loop, the profile, the annotations reader and the config checks ask it instead of
branching on the task's name.

A spec's class attributes are plain data (names, data formats, metric names), so composing and
checking a config reads them without torch. Its methods do the work and import torch, torchvision
and the task-neutral building blocks (app.models, app.train.detection_models, app.train.metrics)
when called. Those imports must stay below app.config: it imports the specs.

Batches (what app.train.data's collate makes, what `move_batch`, `training_loss` and `predict`
take): images are a float tensor [B,3,H,W] (or a list of [3,H,W]); the targets are the task's
(`collate_targets`).
"""
from __future__ import annotations

import re
from typing import Any, List, Optional, Sequence, Tuple

# How a torchvision weights name looks (ResNet18_Weights.IMAGENET1K_V1): model.weights is one of
# these or a state-dict file. Here, below app.config and app.models, since both read it.
WEIGHTS_NAME_PATTERN = re.compile(r"^\w+_Weights\.\w+$")


class TaskSpec:
    """One training task: what config validation checks, how the model is built, how a batch is
    moved and trained on, what is predicted and how it is scored."""

    # model.task
    name: str = ""
    # The torchvision models model.name may be, checked without importing torchvision.
    model_names: Tuple[str, ...] = ()
    # The data options whose labels this task trains on.
    data_formats: Tuple[str, ...] = ()
    # The data options whose class sub-folders are the labels (no annotation file is read).
    labels_from_folders: Tuple[str, ...] = ()
    # What the annotations must give per image: boxes of objects (and then class 0 is the
    # background, as torchvision's detectors count it), and keypoints inside each box.
    boxes: bool = False
    keypoints: bool = False
    # The validation metrics app.train.metrics reports for the task, higher is better; the first
    # is the default trainer.key_metric. Every task also reports train_loss, lower is better.
    metrics: Tuple[str, ...] = ()
    # Whether the loop normalises images with the ImageNet mean and std (classifiers), or feeds
    # them in [0, 1] (torchvision's detectors normalise inside the model).
    normalize_images: bool = True
    # (classes, keypoints) of torchvision's pretrained head, for inference on unlabelled images.
    default_head: Tuple[int, int] = (0, 0)

    @property
    def key_metric(self) -> str:
        """The metric that picks best.pt when trainer.key_metric is null."""
        return self.metrics[0]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"

    # -----------------------------------------------------------------------------------------
    # Labels
    # -----------------------------------------------------------------------------------------
    def training_target(self, annotation_target: dict) -> Any:
        """What the dataset holds per image, from the annotations' target for it."""
        return annotation_target

    def keypoint_flip_index(self, annotations) -> Optional[List[int]]:
        """Where keypoint k comes from after a horizontal flip; None when nothing swaps."""
        return None

    # -----------------------------------------------------------------------------------------
    # Model, step and prediction (torch, imported when called)
    # -----------------------------------------------------------------------------------------
    def build_model(self, name: str, num_classes: int, num_keypoints: int, weights: Optional[str],
                    image_size: int):
        """A torchvision model with `num_classes` outputs (the background counted in when `boxes`).
        weights: null (random), a torchvision weights name read from $TORCH_HOME/hub/checkpoints
        (never downloaded), or a state-dict file; every tensor whose shape fits is loaded."""
        raise NotImplementedError

    def collate_targets(self, items: Sequence[tuple], labels: Sequence[Any]):
        """The batch's targets from the dataset's (image, target, index, error) items that loaded;
        `labels` are the dataset's targets by index."""
        raise NotImplementedError

    def move_batch(self, images, targets, device, non_blocking: bool = False):
        """images and targets onto `device`."""
        raise NotImplementedError

    def training_loss(self, model, images, targets):
        """(the loss to backpropagate, its parts to log as Python floats); the model in train mode."""
        raise NotImplementedError

    def predict(self, model, images) -> List[dict]:
        """One dict per image, in eval mode without gradients (the mode is restored after)."""
        import torch

        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                return self.predictions(model, images)
        finally:
            model.train(was_training)

    def predictions(self, model, images) -> List[dict]:
        """What `predict` returns, the model already in eval mode."""
        raise NotImplementedError

    def make_evaluator(self, annotations):
        """An app.train.metrics evaluator reporting `metrics`; annotations
        (app.train.annotations.Annotations) give the classes and the keypoint count."""
        raise NotImplementedError
