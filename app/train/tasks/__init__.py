"""The training tasks, by model.task: a spec module each (see base.TaskSpec for what a spec
decides). A new task is a module here, a line in TASKS, and its conf/model/*.yaml files.

Importing this package imports no torch: app.config checks model.task, model.name, data and
trainer.key_metric against the specs' names before anything heavy loads.
"""
from __future__ import annotations

from typing import Dict

from app.errors import UserError
from app.train.tasks.base import TaskSpec
from app.train.tasks.classification import ClassificationTask
from app.train.tasks.detection import DetectionTask
from app.train.tasks.keypoints import KeypointsTask

TASKS: Dict[str, TaskSpec] = {spec.name: spec for spec in (ClassificationTask(), DetectionTask(), KeypointsTask())}


def spec_for(task: str) -> TaskSpec:
    """The spec of model.task `task`."""
    try:
        return TASKS[task]
    except KeyError:
        raise UserError(f"model.task={task!r} is not allowed: choose from {', '.join(TASKS)}") from None


__all__ = ["TASKS", "TaskSpec", "spec_for"]
