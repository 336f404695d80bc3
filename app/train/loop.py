"""Train stage: fit a torchvision classifier, detector or keypoint model on the selected images.

Reads the scan's `data/input_files.csv` and, when the select stage ran, its
`filenames/sampled_filenames.txt`. Writes `checkpoints/last.pt` after every epoch and when stopped
(SIGTERM/SIGINT, at a step boundary), `checkpoints/best.pt` by the key metric, snapshots every
`save_epochs`, and `metrics.csv`/`metrics.json`. Without a validation set there is no key metric
and no best.pt (unless trainer.key_metric=train_loss asks for one): a model picked by its training
loss would pass for a validated one. A rerun in the same run directory continues
from `last.pt` at the batch where it stopped.

The loop reads top to bottom like torchvision's references: build the setup (app.train.setup, as
the profile does), maybe resume, then for each epoch train (one `setup.train_step` a batch),
evaluate, step the scheduler, save. What differs between tasks is asked of the task's spec
(app.train.tasks).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from omegaconf import DictConfig, OmegaConf

from app import atomic
from app.artifacts import BEST, LAST, METRICS_CSV, METRICS_JSON, epoch_checkpoint
from app.lifecycle import Interrupted, stop_at_step_boundary
from app.models import with_weights_in_run
from app.progress import Progress
from app.train import checkpoints
from app.train.data import EpochBatches, training_data
from app.train.loggers import MetricLoggers, write_metrics_csv
from app.train.optim import check_optim_config, step_scheduler
from app.train.setup import TrainingSetup
from app.train.tasks import TaskSpec, spec_for

log = logging.getLogger("thresher")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite: continuing would only spread it through the weights."""


@dataclass
class TrainResult:
    task: str
    model: str
    n_train: int
    n_val: int
    epochs: int
    train_loss: float
    key_metric: Optional[str]  # None: no validation set and no trainer.key_metric
    key_metric_value: Optional[float]
    best_epoch: Optional[int]  # None: no best.pt (no key metric)
    images_per_s: float
    compute_efficiency: float
    processes: int = 1
    resumed_from: Optional[str] = None
    artifacts: List[str] = field(default_factory=lambda: [LAST, BEST, METRICS_JSON,
                                                          METRICS_CSV])


@dataclass
class Position:
    """Where training stands: `epoch` complete epochs, then `batch` batches of the next one."""
    epoch: int = 0
    batch: int = 0
    step: int = 0
    sums: Dict[str, float] = field(default_factory=dict)
    history: List[Dict[str, Any]] = field(default_factory=list)
    best: Optional[Dict[str, Any]] = None


def check_train_config(cfg: DictConfig) -> None:
    """Checks that need torch, run before the first stage so a bad value does not wait for the
    selection. Capturable and fused optimizers keep their state on the device, so with those the
    optimizer is rehearsed where training will run; otherwise on the CPU, taking no device memory."""
    params = cfg.trainer.optimizer.params
    device = "cpu"
    if params.get("capturable") or params.get("fused"):
        from app.device import resolve_device

        device = resolve_device(cfg.hardware.device)
    check_optim_config(cfg.trainer, device)


def train_stage(cfg: DictConfig, run_dir: Path, device: torch.device) -> TrainResult:
    from app.train.distributed import launch_if_distributed

    launched = launch_if_distributed(cfg, run_dir, device)
    if launched is not None:
        return TrainResult(**launched)
    return fit(cfg, run_dir, device)


def fit(cfg: DictConfig, run_dir: Path, device: torch.device, rank: int = 0, world_size: int = 1) -> TrainResult:
    trainer, task = cfg.trainer, cfg.model.task
    main_process = rank == 0
    set_determinism(trainer.deterministic, device)
    data = training_data(cfg, run_dir)
    key_metric, key_mode = key_metric_for(trainer, spec_for(task), bool(data.val_index))
    if main_process:
        log.info("train: %s (%s) on %d images, %d for validation, %d classes, %d epochs, batch %d%s, device %s",
                 cfg.model.name, task, len(data.train_index), len(data.val_index), len(data.classes),
                 trainer.epochs, trainer.batch_size, f" x {world_size} processes" if world_size > 1 else "", device)
        log_validation_set(data, trainer, key_metric)

    split_id = fingerprint([data.files[i] for i in data.train_index])
    last = checkpoints.latest(run_dir)
    state = resumable_state(last, task, cfg.model.name, data.classes, split_id) if last is not None else None
    setup = TrainingSetup.build(with_weights_in_run(cfg, run_dir, announce=main_process), data, device, rank=rank,
                                world_size=world_size, state=state)
    position = Position()
    if state is not None:
        position = resumed_position(state)
        if main_process:
            log.info("train: resuming from %s: %d epoch(s) done, then %d batch(es) of epoch %d", last,
                     position.epoch, position.batch, position.epoch + 1)
    resumed_from = f"epoch {position.epoch}, batch {position.batch}" if last is not None else None

    settings = setup.loader_settings(trainer.batch_size)
    batches = EpochBatches(data.train_index, trainer.batch_size, cfg.seed, shuffle=True, rank=rank,
                           world_size=world_size)
    loader_generator = torch.Generator()
    train_loader = torch.utils.data.DataLoader(setup.dataset(train=True), batch_sampler=batches,
                                               collate_fn=setup.collate, generator=loader_generator, **settings)
    val_batches = EpochBatches(data.val_index, trainer.batch_size, cfg.seed, shuffle=False)
    val_loader = torch.utils.data.DataLoader(setup.dataset(train=False), batch_sampler=val_batches,
                                             collate_fn=setup.collate, **settings)

    config = OmegaConf.to_container(cfg, resolve=False)
    loggers = MetricLoggers(run_dir, cfg.logger, config, resume_step=position.step) if main_process else None

    saver = checkpoints.BackgroundSaver()

    def full_state(position: Position) -> Dict[str, Any]:
        return {
            "model": setup.model.state_dict(), "optimizer": setup.optimizer.state_dict(),
            "scheduler": setup.scheduler.state_dict() if setup.scheduler is not None else None,
            "scaler": setup.scaler.state_dict(), "epoch": position.epoch, "batch": position.batch,
            "global_step": position.step, "sums": position.sums, "history": position.history,
            "best": position.best, "rng": checkpoints.rng_state(), "task": task, "model_name": cfg.model.name,
            "classes": list(data.classes), "num_keypoints": data.num_keypoints,
            "image_size": cfg.data.image_size, "split": split_id, "config": config}

    def save_stopped(position: Position) -> None:
        saver.save([(run_dir / LAST, full_state(position))], background=False)

    try:
        with stop_at_step_boundary() as stop:
            for epoch in range(position.epoch, trainer.epochs):
                batches.set_epoch(epoch, position.batch)
                loader_generator.manual_seed(cfg.seed * 1_000_003 + epoch)
                if position.batch == 0:
                    position.sums = {}
                desc = f"train {epoch + 1}/{trainer.epochs}"
                stopped = train_one_epoch(setup, train_loader, position, stop, loggers, desc)
                if stopped:
                    if main_process:
                        save_stopped(position)
                        log.warning("train: stopped at epoch %d, batch %d; saved %s", epoch + 1, position.batch,
                                    LAST)
                    raise Interrupted(stop.signum)
                record = epoch_record(epoch, position, setup.optimizer)
                if main_process and data.val_index:
                    evaluator = setup.make_evaluator()
                    if not evaluate(setup, val_loader, evaluator, stop):
                        save_stopped(position)
                        raise Interrupted(stop.signum)
                    record.update(evaluator.compute())
                step_scheduler(setup.scheduler, record, key_metric)
                position.epoch, position.batch, position.sums = epoch + 1, 0, {}
                position.history.append(record)
                if main_process:
                    finish_epoch(run_dir, position, record, key_metric, key_mode, trainer,
                                 saver, full_state(position), loggers, data, cfg)
                if world_size > 1:
                    torch.distributed.barrier()
    finally:
        saver.wait()  # the stage is finished only when last.pt is on disk
        if loggers is not None:
            loggers.close()
    report_files = []
    if main_process:
        from app.report.class_counts import record_validation_counts
        from app.report.training import write_training_report

        record_validation_counts(run_dir, data)
        report_files = write_training_report(run_dir, json.loads((run_dir / METRICS_JSON).read_text()))
    final = position.history[-1]
    best = position.best or {}
    return TrainResult(
        task=task, model=cfg.model.name, n_train=len(data.train_index), n_val=len(data.val_index),
        epochs=trainer.epochs, train_loss=round(final["train_loss"], 5), key_metric=key_metric,
        key_metric_value=_rounded(final.get(key_metric)), best_epoch=int(best["epoch"]) if best else None,
        images_per_s=round(sum(h["images_per_s"] for h in position.history) / len(position.history), 2),
        compute_efficiency=round(final["compute_efficiency"], 3), processes=world_size, resumed_from=resumed_from,
        artifacts=[LAST, *([BEST] if position.best else []), METRICS_JSON, METRICS_CSV, *report_files])


def train_one_epoch(setup: TrainingSetup, loader, position: Position, stop, loggers, desc: str) -> bool:
    """Train the rest of an epoch from `position.batch`; True when a stop was requested."""
    setup.trained.train()
    main_process = setup.rank == 0
    total = loader.batch_sampler.n_samples()
    sums = position.sums
    # Only the first process shows progress; the others would repeat it.
    resumed = min(position.batch * loader.batch_sampler.batch_size, total)
    with Progress(total, desc, live=None if main_process else False, every_s=10.0 if main_process else 1e12,
                  initial=resumed) as bar:
        iterator = iter(loader)
        waited_since = time.perf_counter()
        while True:
            try:
                batch = next(iterator)
            except StopIteration:
                break
            except Exception:
                if stop:  # Ctrl-C reached the loader's workers too
                    return True
                raise
            images, targets, _, failures = batch
            if failures:
                log.warning("train: %d image(s) skipped: %s", len(failures), failures[0][1])
            computing_since = time.perf_counter()
            if images is not None:
                loss, parts = setup.train_step(images, targets)
                if not math.isfinite(loss):
                    raise TrainingDiverged(f"the training loss became {loss} at epoch {position.epoch + 1}, batch "
                                           f"{position.batch + 1}: lower trainer.optimizer.params.lr, set "
                                           f"trainer.grad_clip_norm, or use trainer.amp=bf16 instead of fp16")
                n = len(images)
                sums["loss"] = sums.get("loss", 0.0) + loss * n
                sums["seen"] = sums.get("seen", 0) + n
                for key, value in parts.items():
                    sums[key] = sums.get(key, 0.0) + value * n
            done = time.perf_counter()
            sums["compute_s"] = sums.get("compute_s", 0.0) + done - computing_since
            sums["wait_s"] = sums.get("wait_s", 0.0) + computing_since - waited_since
            waited_since = done
            position.batch += 1
            position.step += 1
            if loggers is not None and images is not None:
                loggers.log_step(position.step, {"loss": loss, **parts, "lr": setup.optimizer.param_groups[0]["lr"]})
            seen = max(sums.get("seen", 0), 1)
            bar.update((0 if images is None else len(images)) + len(failures), loss=sums.get("loss", 0.0) / seen,
                       eff=sums["compute_s"] / max(sums["compute_s"] + sums["wait_s"], 1e-9))
            if _any_rank(bool(stop), setup.world_size, setup.device):
                return True
    return False


@torch.inference_mode()
def evaluate(setup: TrainingSetup, loader, evaluator, stop) -> bool:
    """Feed the validation set to `evaluator` (the plain model, on this process alone); False when
    a stop was requested midway."""
    setup.model.eval()
    failed = []
    with Progress(len(loader.batch_sampler.indices), "validate") as bar:
        for images, targets, _, failures in loader:
            if stop:
                return False
            if images is not None:
                outputs = setup.predict(images)
                evaluator.update(to_device(outputs, torch.device("cpu")), targets)
            failed += failures
            bar.update((0 if images is None else len(images)) + len(failures))
    if failed:
        log.warning("validate: %d image(s) could not be loaded and are not counted (e.g. %s: %s)", len(failed),
                    setup.data.files[failed[0][0]], failed[0][1])
    return True


def epoch_record(epoch: int, position: Position, optimizer) -> Dict[str, Any]:
    sums = position.sums
    seen = max(sums.get("seen", 0), 1)
    busy = sums.get("compute_s", 0.0) + sums.get("wait_s", 0.0)
    record = {"epoch": epoch + 1, "step": position.step, "lr": optimizer.param_groups[0]["lr"],
              "train_loss": sums.get("loss", 0.0) / seen,
              **{f"train_{k}": v / seen for k, v in sums.items()
                 if k not in ("loss", "seen", "compute_s", "wait_s")},
              "images_per_s": sums.get("seen", 0) / busy if busy else 0.0,
              "compute_efficiency": sums.get("compute_s", 0.0) / busy if busy else 0.0}
    return record


def finish_epoch(run_dir: Path, position: Position, record: Dict[str, Any], key_metric: str, key_mode: str,
                 trainer, saver, state: Dict[str, Any], loggers, data, cfg) -> None:
    """Checkpoints (written in the background), metrics files and the epoch's log line."""
    value = record.get(key_metric)
    best = position.best
    files = []
    if value is not None and (best is None or (value > best["value"] if key_mode == "max" else value < best["value"])):
        position.best = state["best"] = {"epoch": record["epoch"], "metric": key_metric, "value": value}
        files.append((run_dir / BEST, checkpoints.for_snapshot(state, trainer.save_optimizer_state)))
    if trainer.save_epochs and record["epoch"] % trainer.save_epochs == 0:
        snapshot = checkpoints.for_snapshot(state, trainer.save_optimizer_state)
        files.append((run_dir / epoch_checkpoint(record["epoch"]), snapshot))
    files.insert(0, (run_dir / LAST, state))
    saver.save(files)
    write_metrics_csv(run_dir, position.history)
    atomic.write_json(run_dir / METRICS_JSON, {
        "task": cfg.model.task, "model": cfg.model.name, "classes": list(data.classes),
        "n_train": len(data.train_index), "n_val": len(data.val_index), "key_metric": key_metric,
        "best": position.best, "epochs": position.history, "final": record})
    loggers.log_epoch(position.step, record)
    shown = ", ".join(f"{k} {v:.4g}" for k, v in record.items() if k.startswith("val_") and isinstance(v, float))
    log.info("epoch %d/%d: loss %.4f%s, %.1f img/s, compute efficiency %.2f", record["epoch"], trainer.epochs,
             record["train_loss"], f", {shown}" if shown else "", record["images_per_s"],
             record["compute_efficiency"])


def resumable_state(path: Path, task: str, model_name: str, classes, split_id: str) -> Dict[str, Any]:
    """The checkpoint to continue from (TrainingSetup.build loads its weights and optimizer
    state), refused when it is of another model, class list or split."""
    state = checkpoints.load(path)
    checkpoints.check_compatible(state, task, model_name, classes, path)
    if state.get("split") not in (None, split_id):
        from app.errors import UserError

        raise UserError(f"{path} was trained on another selection or validation split than this run has: "
                        f"choose another run_directory, or overwrite=true to start again")
    return state


def resumed_position(state: Dict[str, Any]) -> Position:
    """Where the checkpoint stopped; every random number generator continues from there too."""
    checkpoints.restore_rng_state(state["rng"])
    return Position(epoch=int(state["epoch"]), batch=int(state["batch"]), step=int(state.get("global_step", 0)),
                    sums=dict(state.get("sums") or {}), history=list(state.get("history") or []),
                    best=state.get("best"))


def key_metric_for(trainer, task: TaskSpec, has_validation: bool) -> Tuple[Optional[str], Optional[str]]:
    """(metric, mode) that picks best.pt: trainer.key_metric, else the task's; (None, None) without
    a validation set, so that nothing passes a training-loss pick off as a validated one."""
    if trainer.key_metric:
        return trainer.key_metric, trainer.key_metric_mode
    if not has_validation:
        return None, None
    return task.key_metric, "max"


def log_validation_set(data, trainer, key_metric: Optional[str]) -> None:
    """Say once what the model is validated on, or that nothing is and what follows from that."""
    if data.validation_source is not None:
        log.info("train: validating on %s: %d images; the whole selection (%d images) trains, "
                 "trainer.val_fraction is not used", data.validation_source, len(data.val_index),
                 len(data.train_index))
    elif data.val_index:
        how = (f"trainer.val_filenames_file={trainer.val_filenames_file}" if trainer.val_filenames_file
               else f"trainer.val_fraction={trainer.val_fraction:g}")
        log.info("train: validating on %d images of the selection (%s)", len(data.val_index), how)
    elif key_metric is None:
        split = ("trainer.val_fraction=0" if not trainer.val_fraction
                 else f"trainer.val_fraction={trainer.val_fraction:g} of {len(data.train_index)} images is none")
        log.warning("train: no validation set (%s, no data.holdout_fraction / data.val_input_dir): best.pt is "
                    "not written; key metric: none", split)
    else:
        log.warning("train: no validation set: best.pt is picked by trainer.key_metric=%s", key_metric)


def set_determinism(deterministic: bool, device: torch.device) -> None:
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def fingerprint(files: List[str]) -> str:
    return hashlib.sha256("\n".join(files).encode()).hexdigest()[:16]


def to_device(value, device):
    """Tensors in nested dicts, lists and tuples moved to `device`."""
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(v, device) for v in value)
    return value


def _any_rank(flag: bool, world_size: int, device: torch.device) -> bool:
    """Every process stops at the same step, or the others would wait for it forever."""
    if world_size == 1:
        return flag
    tensor = torch.tensor([1.0 if flag else 0.0], device=device)
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return bool(tensor.item())


def _rounded(value) -> Optional[float]:
    return None if value is None else round(float(value), 5)
