"""Keypoints: detection plus K keypoints inside each box, torchvision's Keypoint R-CNN, COCO OKS mAP.

Batches as for detection, each target dict with "keypoints" float32 [N,K,3] (x, y, visibility
0/1/2) too; predictions add "keypoints" [N,K,3] and "keypoints_scores". A horizontal flip swaps
left and right keypoints (`keypoint_flip_index`).
"""
from __future__ import annotations

import re
from typing import Any, Dict, List, Optional, Sequence

from app.errors import UserError
from app.train.tasks.detection import DetectionTask

# Name pairs that mark a left and a right keypoint: COCO's left_eye/right_eye, eye_left, L_eye...
_SIDES = [("left", "right"), ("Left", "Right"), ("LEFT", "RIGHT"), ("l_", "r_"), ("L_", "R_")]


class KeypointsTask(DetectionTask):
    name = "keypoints"
    model_names = ("keypointrcnn_resnet50_fpn",)
    data_formats = ("shapes", "coco")
    keypoints = True
    metrics = ("val_keypoints_map", "val_keypoints_map50", "val_map", "val_map50")
    default_head = (2, 17)  # COCO person: background and person, 17 keypoints

    def keypoint_flip_index(self, annotations) -> Optional[List[int]]:
        return None if annotations is None else keypoint_flip_index(annotations.keypoint_names)

    def model_arguments(self, num_keypoints: int) -> Dict[str, Any]:
        if num_keypoints < 1:
            raise UserError("model.task=keypoints needs annotations with at least one keypoint")
        return {"num_keypoints": num_keypoints}

    def make_evaluator(self, annotations):
        from app.train.metrics import CocoEvaluator

        return CocoEvaluator(annotations.classes, annotations.num_keypoints)


def keypoint_flip_index(names: Sequence[str]) -> Optional[List[int]]:
    """After a horizontal flip a left keypoint is the right one: COCO's `left_eye`/`right_eye` (or
    `eye_left`, `L_eye`...) swap places. None when no name has a partner."""

    def partner(name: str) -> Optional[str]:
        for a, b in _SIDES:
            for x, y in ((a, b), (b, a)):
                if x in name:
                    return re.sub(re.escape(x), y, name, count=1)
        return None

    position = {name: i for i, name in enumerate(names)}
    index = [position.get(partner(name) or "", i) for i, name in enumerate(names)]
    return index if index != list(range(len(names))) else None
