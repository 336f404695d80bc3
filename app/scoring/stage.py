"""Score stage: a trained checkpoint (`scorer.checkpoint`, e.g. an earlier run's best.pt) scores
every candidate image for active learning, so that a sampler can pick the images the model is
least sure of. Skipped by the runner when scorer=none.

Reads the scan's `data/input_files.csv` less the images set aside as corrupt, feeds them through the
train stage's validation transform in batches on the run's device, and writes
`data/scores.csv` (app.scoring.scores_io) in the scan's order, one row per scored image. An
image that fails to load is listed in `filenames/corrupt_filenames.txt` and left out, never the
end of the run. The formulas are in app.scoring.scorers.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from omegaconf import DictConfig

from app import artifacts
from app.artifacts import SCORES
from app.data.augment import build_transform
from app.data.images import make_loader
from app.device import loader_workers
from app.errors import UserError
from app.models import load_torch_file
from app.progress import Progress
from app.report.scores import write_scores_report
from app.scoring import scorers
from app.scoring.schema import METHOD_TASKS
from app.scoring.scores_io import write_scores
from app.train.data import TrainingImages
from app.train.tasks import TaskSpec, spec_for

log = logging.getLogger("thresher")
KEY = "scorer.checkpoint"


@dataclass
class ScoreResult:
    method: str
    checkpoint: str  # the file's name only: the path may hold a user's folder names
    n_scored: int
    score_mean: float
    score_max: float
    images_per_s: float
    artifacts: List[str] = field(default_factory=lambda: [SCORES])


@dataclass
class ScoringModel:
    """The checkpoint's model, ready to predict, and the class names its outputs index."""
    model: torch.nn.Module
    classes: List[str]


def score_stage(cfg: DictConfig, run_dir: Path, device: torch.device) -> ScoreResult:
    scorer, spec = cfg.scorer, spec_for(cfg.model.task)
    if METHOD_TASKS.get(scorer.method) != spec.name:  # validate refuses this; a direct call may not
        raise UserError(f"scorer={scorer.method} cannot score a {spec.name} model")
    files = candidate_files(run_dir)
    if not files:
        raise UserError("no usable image to score: every scanned image is listed as corrupt")
    checkpoint = Path(scorer.checkpoint)
    loaded = load_scoring_model(cfg, run_dir, spec, checkpoint)
    model = loaded.model.eval().to(device)
    transform = build_transform(cfg.data.augment, cfg.data.image_size, train=False,
                                normalize=spec.normalize_images)
    # Labels are not needed: -1 passes through the transform as no target.
    images = TrainingImages(artifacts.read_dataset(run_dir).location, files, [-1] * len(files), transform)
    loader = make_loader(images, scorer.batch_size, loader_workers(cfg.hardware.num_workers, device),
                         pin_memory=device.type == "cuda", collate=collate_for_scoring)
    log.info("score: %s of %s (%s) on %d images, batch %d, device %s", scorer.method, checkpoint.name,
             cfg.model.name, len(files), scorer.batch_size, device)

    values = np.zeros(len(files), dtype=np.float64)
    predicted = np.full(len(files), -1, dtype=np.int64)
    scored = np.zeros(len(files), dtype=bool)
    failures: List[Tuple[int, str]] = []
    with torch.inference_mode(), Progress(len(files), "score") as bar:
        for batch, indices, failed in loader:
            failures += failed
            if batch is not None:
                rows = indices.numpy()
                values[rows], predicted[rows] = score_batch(spec, model, batch.to(device, non_blocking=True), scorer)
                scored[rows] = True
            bar.update(len(indices) + len(failed))
        rate = bar.rate
    if scorer.method == "object_frequency":  # counts so far: rescaled over all the scored images
        values[scored] = scorers.rescale_to_min_score(values[scored], scorer.min_score)

    for index, reason in failures:
        log.warning("image failed to load while scoring, skipped: %s (%s)", files[index], reason)
    artifacts.add_corrupt_files(run_dir, [(files[index], reason) for index, reason in failures])
    kept = np.flatnonzero(scored)
    if not len(kept):
        raise UserError(f"none of the {len(files)} images could be read for scoring (e.g. {failures[0][1]})")
    write_scores(run_dir, ((files[i], values[i], predicted[i]) for i in kept))

    report_files = write_scores_report(run_dir, scorer.method, checkpoint.name, [files[i] for i in kept],
                                       values[kept], predicted[kept], loaded.classes)
    log.info("score: %d images scored by %s, mean %.4f, max %.4f: %s", len(kept), scorer.method,
             float(values[kept].mean()), float(values[kept].max()), SCORES)
    return ScoreResult(method=scorer.method, checkpoint=checkpoint.name, n_scored=int(len(kept)),
                       score_mean=round(float(values[kept].mean()), 5), score_max=round(float(values[kept].max()), 5),
                       images_per_s=round(rate, 2), artifacts=[SCORES, *report_files])


def candidate_files(run_dir: Path) -> List[str]:
    """The scan's usable images, less those the scan or the embed stage listed as corrupt."""
    files, _ = artifacts.read_input_files(run_dir)
    corrupt = {name for name, _ in artifacts.read_corrupt_files(run_dir)}
    return [name for name in files if name not in corrupt] if corrupt else files


def collate_for_scoring(batch) -> Tuple[Optional[torch.Tensor], torch.Tensor, List[Tuple[int, str]]]:
    """(images [B,3,H,W] or None, their indices, (index, error) of the images that failed) from
    TrainingImages items."""
    good = [item for item in batch if item[0] is not None]
    failures = [(item[2], item[3]) for item in batch if item[0] is None]
    images = torch.stack([item[0] for item in good]) if good else None
    return images, torch.tensor([item[2] for item in good], dtype=torch.long), failures


def score_batch(spec: TaskSpec, model: torch.nn.Module, images: torch.Tensor, scorer: DictConfig):
    """(scores, predicted labels) as numpy arrays for one batch; for object_frequency the scores are
    the raw counts, rescaled once every image is scored."""
    outputs = spec.predictions(model, images)
    if spec.name == "classification":
        probabilities = torch.stack([output["scores"] for output in outputs])
        values, labels = scorers.classification_scores(probabilities, scorer.method)
        return values.double().cpu().numpy(), labels.cpu().numpy()
    unlabelled = np.full(len(outputs), -1, dtype=np.int64)  # a detection has no one label per image
    if scorer.method == "object_frequency":
        return scorers.object_counts(outputs, scorer.frequency_penalty, scorer.box_score_threshold), unlabelled
    return scorers.objectness_least_confidence(outputs), unlabelled


# ---------------------------------------------------------------------------------------------
# The checkpoint
# ---------------------------------------------------------------------------------------------
def read_checkpoint(path: Path) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """(state dict, what a thresher checkpoint says about it: task, model_name, classes,
    image_size; {} for a plain state dict), or a UserError saying what is wrong."""
    state = load_torch_file(KEY, path)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        return state["model"], {key: state.get(key) for key in ("task", "model_name", "classes", "image_size")}
    if isinstance(state, dict) and state and all(torch.is_tensor(value) for value in state.values()):
        return state, {}
    raise UserError(f"{KEY}={str(path)!r} holds neither a thresher checkpoint nor a state dict "
                    f"({type(state).__name__}): use an earlier run's checkpoints/best.pt")


def expected_classes(cfg: DictConfig, run_dir: Path, spec: TaskSpec) -> Optional[List[str]]:
    """The classes this run's data has for the task, as training would read them; None when the
    data has none (an unlabelled folder: the checkpoint's classes are taken as they are)."""
    if cfg.data.name in spec.labels_from_folders:
        return list(artifacts.read_dataset(run_dir).classes) or None
    if cfg.data.name in spec.data_formats:
        from app.train.annotations import load_annotations

        return list(load_annotations(cfg.data, artifacts.read_dataset(run_dir).location, spec.name).classes)
    return None


def _shown(classes: List[str]) -> str:
    names = [name for name in classes if name != "__background__"]
    return ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")


def load_scoring_model(cfg: DictConfig, run_dir: Path, spec: TaskSpec, path: Path) -> ScoringModel:
    """The run's model (model.name, model.task) with every tensor of the checkpoint loaded; refused
    when the checkpoint is of another model, task or class count than this run and its data."""
    state, meta = read_checkpoint(path)
    for key, wanted, setting in (("task", spec.name, "model.task"), ("model_name", cfg.model.name, "model.name")):
        if meta.get(key) not in (None, wanted):
            raise UserError(f"{KEY}={str(path)!r} holds a {meta.get('model_name')} {meta.get('task')} model, this "
                            f"run has {setting}={wanted}: set model.name={meta.get('model_name')} "
                            f"model.task={meta.get('task')}, or use a checkpoint of {cfg.model.name}")
    saved = list(meta.get("classes") or [])
    data_classes = expected_classes(cfg, run_dir, spec)
    if saved and data_classes is not None and len(saved) != len(data_classes):
        raise UserError(f"{KEY}={str(path)!r} was trained on {len(saved)} classes ({_shown(saved)}), the data has "
                        f"{len(data_classes)} ({_shown(data_classes)}): score with a checkpoint trained on these "
                        f"classes")
    if saved and data_classes is not None and saved != data_classes:
        log.warning("score: %s names its classes %s, the data %s: predicted_label indexes the checkpoint's",
                    path.name, _shown(saved), _shown(data_classes))
    classes = saved or data_classes
    if not classes:
        raise UserError(f"{KEY}={str(path)!r} is a plain state dict and data={cfg.data.name} names no classes: "
                        f"use a thresher checkpoint (checkpoints/best.pt records its classes)")
    if meta.get("image_size") not in (None, cfg.data.image_size):
        log.warning("score: %s was trained at image_size %s, the images are scored at data.image_size=%s",
                    path.name, meta["image_size"], cfg.data.image_size)
    model = spec.build_model(cfg.model.name, len(classes), 0, str(path), cfg.data.image_size)
    own = model.state_dict()
    unfit = [key for key, value in own.items() if not key.endswith("num_batches_tracked")
             and (key not in state or tuple(state[key].shape) != tuple(value.shape))]
    if unfit:
        first = unfit[0]
        found = tuple(state[first].shape) if first in state else "missing"
        raise UserError(f"{KEY}={str(path)!r} does not fit {cfg.model.name} with {len(classes)} classes: "
                        f"{len(unfit)} of {len(own)} tensors missing or of another shape (first {first}: "
                        f"{found}, the model needs {tuple(own[first].shape)})")
    return ScoringModel(model, list(classes))
