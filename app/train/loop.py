"""Train stage: fit the torchvision classifier on the selected images.

Reads the scan's `data/input_files.csv` and, when the select stage ran, its
`filenames/sampled_filenames.txt`; writes `checkpoints/last.pt` after every epoch (and on
SIGTERM/SIGINT) and `metrics.json`.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from app import atomic
from app.config import UserError
from app.data.images import ImageFiles, image_transform, make_loader
from app.data.scan import DATASET, INPUT_FILES, read_input_files
from app.device import loader_workers
from app.models import build_classifier
from app.progress import Progress
from app.sampling.select import SAMPLED

log = logging.getLogger("thresher")

LAST_CHECKPOINT = "checkpoints/last.pt"
METRICS = "metrics.json"


@dataclass
class TrainResult:
    n_train: int
    n_val: int
    epochs: int
    train_loss: float
    train_accuracy: float
    val_accuracy: Optional[float]
    images_per_s: float
    artifacts: List[str] = field(default_factory=lambda: [LAST_CHECKPOINT, METRICS])


def training_files(run_dir: Path):
    """The labelled images to train on: the selection when there is one, else every usable image."""
    files, labels = read_input_files(run_dir / INPUT_FILES)
    classes = json.loads((run_dir / DATASET).read_text())["classes"]
    input_dir = Path(json.loads((run_dir / DATASET).read_text())["input_dir"])
    if (run_dir / SAMPLED).is_file():
        selected = set(atomic.read_lines(run_dir / SAMPLED))
        pairs = [(f, label) for f, label in zip(files, labels) if f in selected]
    else:
        pairs = list(zip(files, labels))
    unlabelled = sum(1 for _, label in pairs if label < 0)
    if unlabelled:
        log.warning("train: %d selected images lie outside any class folder and are left out", unlabelled)
    pairs = [(f, label) for f, label in pairs if label >= 0]
    if len(classes) < 2:
        raise UserError(f"training needs at least 2 classes, one sub-folder each, in {input_dir}; found "
                        f"{len(classes)}: sort the images into class folders, or leave train out of stages")
    if len(pairs) < 2:
        raise UserError(f"training needs at least 2 labelled images; the selection has {len(pairs)}: "
                        f"raise sampler.stopping_condition.n_samples")
    return input_dir, classes, pairs


def split_validation(n: int, val_fraction: float, seed: int):
    order = np.random.default_rng(seed).permutation(n)
    n_val = min(int(round(val_fraction * n)), n - 1)
    return sorted(order[n_val:].tolist()), sorted(order[:n_val].tolist())


def train_stage(cfg: DictConfig, run_dir: Path, device: torch.device) -> TrainResult:
    trainer = cfg.trainer
    input_dir, classes, pairs = training_files(run_dir)
    train_idx, val_idx = split_validation(len(pairs), trainer.val_fraction, cfg.seed)
    files = [f for f, _ in pairs]
    labels = [label for _, label in pairs]
    log.info("train: %s on %d images (%d for validation), %d classes, %d epochs, device %s",
             cfg.model.name, len(train_idx), len(val_idx), len(classes), trainer.epochs, device)

    torch.manual_seed(cfg.seed)
    model = build_classifier(cfg.model.name, len(classes), cfg.model.weights).to(device)
    optimizer = getattr(torch.optim, trainer.optimizer.type)(model.parameters(), **trainer.optimizer.params)
    loss_function = nn.CrossEntropyLoss()
    workers = loader_workers(cfg.hardware.num_workers, device)
    pin = device.type == "cuda"
    train_set = ImageFiles(input_dir, [files[i] for i in train_idx], [labels[i] for i in train_idx],
                           image_transform(cfg.data.image_size, train=True))
    val_set = ImageFiles(input_dir, [files[i] for i in val_idx], [labels[i] for i in val_idx],
                         image_transform(cfg.data.image_size))
    generator = torch.Generator().manual_seed(cfg.seed)
    train_loader = make_loader(train_set, trainer.batch_size, workers, shuffle=True, generator=generator,
                               pin_memory=pin)
    val_loader = make_loader(val_set, trainer.batch_size, workers, pin_memory=pin)

    history: List[Dict] = []
    completed = 0
    try:
        for epoch in range(1, trainer.epochs + 1):
            record = train_one_epoch(model, optimizer, loss_function, train_loader, device,
                                     f"train {epoch}/{trainer.epochs}", len(train_set))
            completed = epoch
            record["epoch"] = epoch
            record["val_accuracy"] = evaluate(model, val_loader, device) if len(val_set) else None
            history.append(record)
            log.info("epoch %d/%d: loss %.4f, train accuracy %.3f, val accuracy %s, %.1f img/s", epoch,
                     trainer.epochs, record["train_loss"], record["train_accuracy"],
                     "n/a" if record["val_accuracy"] is None else f"{record['val_accuracy']:.3f}",
                     record["images_per_s"])
            save_checkpoint(run_dir, model, optimizer, epoch, cfg, classes)
            write_metrics(run_dir, history, len(train_set), len(val_set), classes)
    except BaseException:
        # SIGTERM mid-epoch: keep the weights as they are, marked with the last complete epoch.
        save_checkpoint(run_dir, model, optimizer, completed, cfg, classes, partial_epoch=True)
        raise
    last = history[-1]
    return TrainResult(n_train=len(train_set), n_val=len(val_set), epochs=trainer.epochs,
                       train_loss=round(last["train_loss"], 5),
                       train_accuracy=round(last["train_accuracy"], 4),
                       val_accuracy=None if last["val_accuracy"] is None else round(last["val_accuracy"], 4),
                       images_per_s=round(float(np.mean([h["images_per_s"] for h in history])), 2))


def train_one_epoch(model, optimizer, loss_function, loader, device, desc: str, total: int) -> Dict:
    model.train()
    seen = correct = 0
    loss_sum = 0.0
    began = time.perf_counter()
    with Progress(total, desc) as bar:
        for images, targets, _, failed in loader:
            if failed:
                log.warning("train: %d image(s) failed to load and were skipped", len(failed))
            if len(targets) == 0:
                bar.update(len(failed))
                continue
            images = images.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            logits = model(images)
            loss = loss_function(logits, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            batch = len(targets)
            loss_sum += float(loss.detach()) * batch
            correct += int((logits.argmax(1) == targets).sum())
            seen += batch
            bar.update(batch + len(failed), loss=loss_sum / seen)
    elapsed = time.perf_counter() - began
    return {"train_loss": loss_sum / max(seen, 1), "train_accuracy": correct / max(seen, 1),
            "images_per_s": seen / elapsed if elapsed > 0 else 0.0}


@torch.inference_mode()
def evaluate(model, loader, device) -> float:
    model.eval()
    seen = correct = 0
    for images, targets, _, _ in loader:
        if len(targets) == 0:
            continue
        logits = model(images.to(device, non_blocking=True))
        correct += int((logits.argmax(1).cpu() == targets).sum())
        seen += len(targets)
    return correct / max(seen, 1)


def save_checkpoint(run_dir: Path, model, optimizer, epoch: int, cfg: DictConfig, classes: List[str],
                    partial_epoch: bool = False) -> None:
    """`epoch` counts complete epochs; `partial_epoch` marks weights saved partway through the next."""
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
             "partial_epoch": partial_epoch,
             "model_name": cfg.model.name, "classes": classes, "image_size": cfg.data.image_size,
             "config": OmegaConf.to_container(cfg, resolve=False)}
    with atomic.atomic_path(run_dir / LAST_CHECKPOINT) as tmp:
        torch.save(state, tmp)


def write_metrics(run_dir: Path, history: List[Dict], n_train: int, n_val: int, classes: List[str]) -> None:
    atomic.write_json(run_dir / METRICS, {"n_train": n_train, "n_val": n_val, "classes": classes,
                                          "epochs": history, "final": history[-1]})
