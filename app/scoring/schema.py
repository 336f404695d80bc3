"""The scorer's schema and its checks: which active-learning score the score stage computes, from
which trained checkpoint. Importable without torch, like app.config, which composes it into
ThresherConfig and calls `validate_scorer`; the checkpoint's contents are checked when the stage
loads it (app.scoring.stage)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

from omegaconf import DictConfig

from app.config_checks import is_int, refuse
from app.errors import UserError

# scorer.method -> the model.task it scores; `none` skips the score stage.
CLASSIFICATION_METHODS = ("least_confidence", "margin", "entropy")
DETECTION_METHODS = ("object_frequency", "objectness_least_confidence")
METHOD_TASKS: Dict[str, str] = {**{m: "classification" for m in CLASSIFICATION_METHODS},
                                **{m: "detection" for m in DETECTION_METHODS}}
METHODS = ("none", *METHOD_TASKS)
# A model to suggest for a method whose task differs from model.task.
SUGGESTED_MODEL = {"classification": "resnet18", "detection": "fasterrcnn_mobilenet_v3_large_fpn"}


@dataclass
class ScorerConfig:
    """conf/scorer/*.yaml: one option per method, the Lightly Worker's scorer and scorer_config."""
    # none (no score stage), least_confidence, margin, entropy (classification), object_frequency,
    # objectness_least_confidence (detection).
    method: str = "none"
    # A trained model of this run's model.name and model.task: a thresher checkpoint (an earlier
    # run's checkpoints/best.pt) or a state-dict file. Required for every method but none.
    checkpoint: Optional[str] = None
    # object_frequency: the first object of a class counts 1, each further one of that class only
    # this much (1: plain object count; 0: count classes).
    frequency_penalty: float = 0.25
    # object_frequency: the scores are rescaled to [min_score, 1] over the scored images.
    min_score: float = 0.9
    # Detection: a predicted box counts as an object from this detection score on.
    box_score_threshold: float = 0.5
    # Images per forward pass.
    batch_size: int = 64


def validate_scorer(scorer: DictConfig, model_task: str, check_file: Callable[[str, str], None]) -> None:
    """Refuse a method the model's task cannot score, a checkpoint that is missing (or given to
    scorer=none), values out of range. `check_file(key, value)` refuses a file torch cannot load
    (app.config's check, passed in so this module stays below app.config)."""
    method = scorer.method
    if method not in METHODS:
        raise refuse("scorer.method", method, f"choose from {', '.join(METHODS)}", METHODS)
    if method == "none":
        if scorer.checkpoint:
            raise refuse("scorer.checkpoint", scorer.checkpoint, "scorer=none scores nothing: choose a scorer "
                         f"({', '.join(METHOD_TASKS)}) or leave scorer.checkpoint null")
        return
    task = METHOD_TASKS[method]
    if model_task != task:
        others = [m for m, t in METHOD_TASKS.items() if t == model_task]
        raise UserError(f"scorer={method} scores {task} models and model.task is {model_task}: use "
                        f"model={SUGGESTED_MODEL[task]} (or another {task} model)"
                        + (f", or a {model_task} scorer: {', '.join(others)}" if others else ""))
    if not scorer.checkpoint:
        raise UserError(f"scorer={method} needs scorer.checkpoint: the trained model that scores the images, "
                        f"e.g. scorer.checkpoint=runs/<earlier run>/checkpoints/best.pt")
    check_file("scorer.checkpoint", scorer.checkpoint)
    _in_range("scorer.frequency_penalty", scorer.frequency_penalty, 0.0, 1.0)
    _in_range("scorer.min_score", scorer.min_score, 0.0, 1.0)
    _in_range("scorer.box_score_threshold", scorer.box_score_threshold, 0.0, 1.0)
    if not (is_int(scorer.batch_size) and scorer.batch_size >= 1):
        raise refuse("scorer.batch_size", scorer.batch_size, "use an integer >= 1")


def _in_range(key: str, value: Any, low: float, high: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and low <= value <= high):
        raise refuse(key, value, f"use a number in [{low:g}, {high:g}]")
