"""The active-learning scores, as pure functions of a model's outputs: higher means more worth
labelling. Classification scores come from a batch's softmax probabilities in one tensor
operation each; detection scores from torchvision's per-image {"boxes", "labels", "scores"} dicts,
one small tensor operation per image.

Classification, with p the class probabilities of one image (C classes, p1 >= p2 the two largest):
  least_confidence = 1 - p1
  margin           = 1 - (p1 - p2)
  entropy          = -sum(p log p) / log C     (0: certain, 1: uniform)
Detection, over the boxes the detector returns for an image:
  object_frequency: the Lightly Worker's object-frequency scorer. Boxes with a detection score of at
    least `box_score_threshold` are objects; each class's first object counts 1 and every further
    object of that class `frequency_penalty` (1: a plain count, 0: the number of classes seen); the
    counts are rescaled linearly to [min_score, 1] over the scored images (all 1 when they are alike).
  objectness_least_confidence: 1 - the detection score of the most confident box; 0 for an image
    with no box at all (nothing found, nothing to be unsure about, as the Worker scores it). The
    Worker averages over the boxes; torchvision's detectors return up to 100 boxes down to a score of
    0.05, whose mean says more about how many weak boxes there are than about the model's doubt.
"""
from __future__ import annotations

import math
from typing import Sequence, Tuple

import numpy as np
import torch

from app.scoring.schema import CLASSIFICATION_METHODS


def classification_scores(probabilities: torch.Tensor, method: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """(score, predicted class) per row of `probabilities` [N, C] (softmax output)."""
    if method not in CLASSIFICATION_METHODS:
        raise ValueError(f"{method!r} is not a classification score: {CLASSIFICATION_METHODS}")
    probabilities = probabilities.float()
    n_classes = probabilities.shape[1]
    top = probabilities.topk(min(2, n_classes), dim=1).values
    if method == "least_confidence":
        scores = 1.0 - top[:, 0]
    elif method == "margin":
        second = top[:, 1] if n_classes > 1 else torch.zeros_like(top[:, 0])
        scores = 1.0 - (top[:, 0] - second)
    else:
        entropy = -torch.special.xlogy(probabilities, probabilities).sum(dim=1)
        scores = entropy / math.log(n_classes) if n_classes > 1 else torch.zeros_like(entropy)
    return scores.clamp_(0.0, 1.0), probabilities.argmax(dim=1)


def object_counts(detections: Sequence[dict], frequency_penalty: float, box_score_threshold: float) -> np.ndarray:
    """Per image, its objects counted with each class's repeats discounted (before rescaling)."""
    counts = np.zeros(len(detections), dtype=np.float64)
    for row, detection in enumerate(detections):
        labels = detection["labels"][detection["scores"] >= box_score_threshold]
        if labels.numel():
            per_class = torch.bincount(labels.long().cpu())
            per_class = per_class[per_class > 0].double()
            counts[row] = float(per_class.numel() + frequency_penalty * (per_class - 1).sum())
    return counts


def rescale_to_min_score(counts: np.ndarray, min_score: float) -> np.ndarray:
    """`counts` mapped linearly onto [min_score, 1] (the fewest objects min_score, the most 1); all 1
    when every count is the same, as the Worker's np.interp gives."""
    if not len(counts):
        return counts.astype(np.float64)
    low, high = float(counts.min()), float(counts.max())
    if high == low:
        return np.ones(len(counts), dtype=np.float64)
    return min_score + (1.0 - min_score) * (counts - low) / (high - low)


def object_frequency(detections: Sequence[dict], frequency_penalty: float, min_score: float,
                     box_score_threshold: float) -> np.ndarray:
    """The object-frequency score of each image of `detections`, rescaled over these images."""
    return rescale_to_min_score(object_counts(detections, frequency_penalty, box_score_threshold), min_score)


def objectness_least_confidence(detections: Sequence[dict]) -> np.ndarray:
    """1 - the highest box score of each image; 0 for an image without boxes."""
    scores = np.zeros(len(detections), dtype=np.float64)
    for row, detection in enumerate(detections):
        if detection["scores"].numel():
            scores[row] = 1.0 - float(detection["scores"].max())
    return scores
