"""Validation metrics for each task: top-1 accuracy, COCO box mAP and COCO keypoint (OKS) mAP.

Detection and keypoint metrics are pycocotools' COCOeval, run on COCO objects built in memory
from what `update` collected (no files, its prints silenced), so the numbers are the ones the
COCO leaderboards and torchvision's references report:
- val_map: box AP averaged over IoU 0.50:0.95, val_map50: box AP at IoU 0.50;
- val_keypoints_map, val_keypoints_map50: the same over OKS. OKS needs a per-keypoint sigma:
  COCO's own 17 when K == 17 (the person keypoints), otherwise DEFAULT_KEYPOINT_SIGMA for every
  keypoint (DeepLabCut's default oks_sigma). The object scale is the ground-truth box area
  (COCO uses the segmentation area, which box annotations do not have).
Metrics of an empty validation set, of one without any ground-truth object, or without a single
prediction are 0.0, never NaN, so a "best" checkpoint can still be chosen and logs stay numeric.

Each task spec (app.train.tasks) makes its evaluator and lists the names it reports.
"""
from __future__ import annotations

import contextlib
import io
from typing import Dict, List, Sequence

import numpy as np
import torch

DEFAULT_KEYPOINT_SIGMA = 0.1
COCO_PERSON_KEYPOINTS = 17


class Evaluator:
    """Collects a validation epoch batch by batch (rank 0 evaluates the whole set), then `compute`s."""
    records: list

    def update(self, outputs: Sequence[dict], targets) -> None:
        raise NotImplementedError

    def compute(self) -> Dict[str, float]:
        raise NotImplementedError


class ClassificationEvaluator(Evaluator):
    """val_top1: the share of images whose most likely class is the labelled one."""

    def __init__(self) -> None:
        self.records: List[bool] = []

    def update(self, outputs: Sequence[dict], targets) -> None:
        predicted = torch.stack([torch.as_tensor(o["labels"]).reshape(()) for o in outputs]).cpu() \
            if len(outputs) else torch.zeros(0, dtype=torch.int64)
        self.records.extend((predicted == torch.as_tensor(targets).cpu().reshape(-1)).tolist())

    def compute(self) -> Dict[str, float]:
        return {"val_top1": float(np.mean(self.records)) if self.records else 0.0}


def _numpy(target: dict, key: str, shape) -> np.ndarray:
    value = target.get(key)
    if value is None:
        return np.zeros(shape, dtype=np.float64)
    return value.detach().cpu().double().numpy().reshape(shape)


class CocoEvaluator(Evaluator):
    """Box mAP (and OKS mAP when num_keypoints > 0) of torchvision detector outputs against the
    targets, both in the same pixel coordinates."""

    def __init__(self, classes: Sequence[str], num_keypoints: int = 0) -> None:
        self.classes = list(classes)  # classes[0] is the background
        self.num_keypoints = num_keypoints
        self.records: List[tuple] = []  # (ground truth, predictions) per image, numpy on the CPU

    def update(self, outputs: Sequence[dict], targets: Sequence[dict]) -> None:
        k = self.num_keypoints
        for output, target in zip(outputs, targets):
            truth = {"boxes": _numpy(target, "boxes", (-1, 4)),
                     "labels": _numpy(target, "labels", (-1,)).astype(np.int64)}
            found = {"boxes": _numpy(output, "boxes", (-1, 4)),
                     "labels": _numpy(output, "labels", (-1,)).astype(np.int64),
                     "scores": _numpy(output, "scores", (-1,))}
            if k:
                truth["keypoints"] = _numpy(target, "keypoints", (-1, k, 3))
                found["keypoints"] = _numpy(output, "keypoints", (-1, k, 3))
            self.records.append((truth, found))

    def compute(self) -> Dict[str, float]:
        names = ["val_map", "val_map50"] + (["val_keypoints_map", "val_keypoints_map50"] if self.num_keypoints else [])
        zeros = {name: 0.0 for name in names}
        if not self.records or not any(len(found["scores"]) for _, found in self.records):
            return zeros
        ground_truth, detections = self._coco_objects()
        results = dict(zip(["val_map", "val_map50"], self._evaluate(ground_truth, detections, "bbox")))
        if self.num_keypoints:
            results.update(zip(["val_keypoints_map", "val_keypoints_map50"],
                               self._evaluate(ground_truth, detections, "keypoints")))
        return results

    def _coco_objects(self):
        from pycocotools.coco import COCO

        k = self.num_keypoints
        images = [{"id": i, "width": 0, "height": 0} for i in range(len(self.records))]
        categories = [{"id": i, "name": name, "keypoints": [f"kp{j}" for j in range(k)], "skeleton": []}
                      for i, name in enumerate(self.classes) if i > 0]
        truths, found_all = [], []
        for image_id, (truth, found) in enumerate(self.records):
            for index, (box, label) in enumerate(zip(truth["boxes"], truth["labels"])):
                x0, y0, x1, y1 = box.tolist()
                annotation = {"id": len(truths) + 1, "image_id": image_id, "category_id": int(label),
                              "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0}
                if k:
                    points = truth["keypoints"][index]
                    annotation["keypoints"] = points.reshape(-1).tolist()
                    annotation["num_keypoints"] = int((points[:, 2] > 0).sum())
                truths.append(annotation)
            for index, (box, label, score) in enumerate(zip(found["boxes"], found["labels"], found["scores"])):
                x0, y0, x1, y1 = box.tolist()
                detection = {"id": len(found_all) + 1, "image_id": image_id, "category_id": int(label),
                             "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0),
                             "score": float(score), "iscrowd": 0}
                if k:
                    detection["keypoints"] = found["keypoints"][index].reshape(-1).tolist()
                found_all.append(detection)
        objects = []
        for listed in (truths, found_all):
            coco = COCO()
            coco.dataset = {"images": images, "categories": categories, "annotations": listed}
            with contextlib.redirect_stdout(io.StringIO()):
                coco.createIndex()
            objects.append(coco)
        return objects

    def _evaluate(self, ground_truth, detections, iou_type: str) -> List[float]:
        from pycocotools.cocoeval import COCOeval

        evaluation = COCOeval(ground_truth, detections, iou_type)
        if iou_type == "keypoints" and self.num_keypoints != COCO_PERSON_KEYPOINTS:
            evaluation.params.kpt_oks_sigmas = np.full(self.num_keypoints, DEFAULT_KEYPOINT_SIGMA)
        with contextlib.redirect_stdout(io.StringIO()):
            evaluation.evaluate()
            evaluation.accumulate()
            evaluation.summarize()
        # stats[i] is -1 where there is nothing to measure (no ground truth): report 0.0.
        return [max(float(evaluation.stats[i]), 0.0) for i in (0, 1)]
