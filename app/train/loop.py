"""Train stage: fit a torchvision classifier, detector or keypoint model on the selected images.

Reads the scan's `data/input_files.csv` and, when the select stage ran, its
`filenames/sampled_filenames.txt`. Writes `checkpoints/last.pt` after every epoch and when stopped
(SIGTERM/SIGINT, at a step boundary), `checkpoints/best.pt` by the key metric, snapshots every
`save_epochs`, and `metrics.csv`/`metrics.json`. A rerun in the same run directory continues
from `last.pt` at the batch where it stopped.

The loop reads top to bottom like torchvision's references: build, maybe resume, then for each
epoch train (one `train_step` a batch), evaluate, step the scheduler, save.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from app import atomic
from app.progress import Progress
from app.run import Interrupted
from app.train import checkpoints
from app.train.data import (EpochBatches, TrainingImages, keypoint_flip_index, loader_settings, make_collate,
                            model_input_shape, training_data)
from app.train.loggers import MetricLoggers, write_metrics_csv
from app.train.optim import build_optimizer, build_scheduler, check_optim_config, step_scheduler
from app.train.stopping import stop_at_step_boundary

log = logging.getLogger("thresher")

METRICS = "metrics.json"


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
    key_metric: str
    key_metric_value: Optional[float]
    best_epoch: int
    images_per_s: float
    compute_efficiency: float
    processes: int = 1
    resumed_from: Optional[str] = None
    artifacts: List[str] = field(default_factory=lambda: [checkpoints.LAST, checkpoints.BEST, METRICS,
                                                          "metrics.csv"])


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
    from app.data.augment import build_transform, input_size_ok
    from app.train.metrics import make_evaluator
    from app.train.task_models import build_model, expects_normalized_images

    trainer, task = cfg.trainer, cfg.model.task
    main_process = rank == 0
    set_determinism(trainer.deterministic, device)
    data = training_data(cfg, run_dir)
    key_metric, key_mode = key_metric_for(trainer, task, bool(data.val_index))
    if main_process:
        log.info("train: %s (%s) on %d images, %d for validation, %d classes, %d epochs, batch %d%s, device %s",
                 cfg.model.name, task, len(data.train_index), len(data.val_index), len(data.classes),
                 trainer.epochs, trainer.batch_size, f" x {world_size} processes" if world_size > 1 else "", device)

    model = build_model(task, cfg.model.name, len(data.classes), data.num_keypoints, cfg.model.weights,
                        cfg.data.image_size).to(device)
    if trainer.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(trainer.optimizer, model.parameters())
    scheduler = build_scheduler(trainer.scheduler, optimizer)
    amp_dtype = autocast_dtype(trainer.amp, device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)

    split_id = fingerprint([data.files[i] for i in data.train_index])
    position = Position()
    last = checkpoints.latest(run_dir)
    if last is not None:
        position = resume(last, model, optimizer, scheduler, scaler, task, cfg.model.name, data.classes, split_id)
        if main_process:
            log.info("train: resuming from %s: %d epoch(s) done, then %d batch(es) of epoch %d", last,
                     position.epoch, position.batch, position.epoch + 1)
    resumed_from = f"epoch {position.epoch}, batch {position.batch}" if last is not None else None

    trained = model  # what is called in the loop; `model` stays the plain module that is saved
    if world_size > 1:
        trained = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if trainer.compile:
        trained = torch.compile(trained)

    settings = loader_settings(cfg.hardware, device, trainer.batch_size, model_input_shape(cfg.data))
    collate = make_collate(task, data.targets)
    normalize = expects_normalized_images(task)
    flip_index = keypoint_flip_index(data.annotations.keypoint_names) if task == "keypoints" else None
    train_set = TrainingImages(data.input_dir, data.files, data.targets,
                               build_transform(cfg.data.augment, cfg.data.image_size, train=True, normalize=normalize,
                                               keypoint_flip_index=flip_index),
                               size_ok=functools.partial(input_size_ok, augment=cfg.data.augment))
    val_set = TrainingImages(data.input_dir, data.files, data.targets,
                             build_transform(cfg.data.augment, cfg.data.image_size, train=False, normalize=normalize))
    batches = EpochBatches(data.train_index, trainer.batch_size, cfg.seed, shuffle=True, rank=rank,
                           world_size=world_size)
    loader_generator = torch.Generator()
    train_loader = torch.utils.data.DataLoader(train_set, batch_sampler=batches, collate_fn=collate,
                                               generator=loader_generator, **settings)
    val_batches = EpochBatches(data.val_index, trainer.batch_size, cfg.seed, shuffle=False)
    val_loader = torch.utils.data.DataLoader(val_set, batch_sampler=val_batches, collate_fn=collate, **settings)

    config = OmegaConf.to_container(cfg, resolve=False)
    loggers = MetricLoggers(run_dir, cfg.logger, config, resume_step=position.step) if main_process else None

    saver = checkpoints.BackgroundSaver()

    def full_state(position: Position) -> Dict[str, Any]:
        return {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "scaler": scaler.state_dict(), "epoch": position.epoch, "batch": position.batch,
            "global_step": position.step, "sums": position.sums, "history": position.history,
            "best": position.best, "rng": checkpoints.rng_state(), "task": task, "model_name": cfg.model.name,
            "classes": list(data.classes), "num_keypoints": data.num_keypoints,
            "image_size": cfg.data.image_size, "split": split_id, "config": config}

    def save_stopped(position: Position) -> None:
        saver.save([(run_dir / checkpoints.LAST, full_state(position))], background=False)

    try:
        with stop_at_step_boundary() as stop:
            for epoch in range(position.epoch, trainer.epochs):
                batches.set_epoch(epoch, position.batch)
                loader_generator.manual_seed(cfg.seed * 1_000_003 + epoch)
                if position.batch == 0:
                    position.sums = {}
                desc = f"train {epoch + 1}/{trainer.epochs}"
                stopped = train_one_epoch(trained, optimizer, scaler, amp_dtype, train_loader, device, position,
                                          trainer.grad_clip_norm, trainer.channels_last, stop, world_size,
                                          loggers, desc, batches.n_samples(), main_process)
                if stopped:
                    if main_process:
                        save_stopped(position)
                        log.warning("train: stopped at epoch %d, batch %d; saved %s", epoch + 1, position.batch,
                                    checkpoints.LAST)
                    raise Interrupted(stop.signum)
                record = epoch_record(epoch, position, optimizer)
                if main_process and data.val_index:
                    evaluator = make_evaluator(task, data.annotations)
                    if not evaluate(model, val_loader, device, evaluator, amp_dtype, trainer.channels_last, stop):
                        save_stopped(position)
                        raise Interrupted(stop.signum)
                    record.update(evaluator.compute())
                step_scheduler(scheduler, record, key_metric)
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
    final = position.history[-1]
    best = position.best or {}
    return TrainResult(
        task=task, model=cfg.model.name, n_train=len(data.train_index), n_val=len(data.val_index),
        epochs=trainer.epochs, train_loss=round(final["train_loss"], 5), key_metric=key_metric,
        key_metric_value=_rounded(final.get(key_metric)), best_epoch=int(best.get("epoch", final["epoch"])),
        images_per_s=round(sum(h["images_per_s"] for h in position.history) / len(position.history), 2),
        compute_efficiency=round(final["compute_efficiency"], 3), processes=world_size, resumed_from=resumed_from)


def train_one_epoch(model, optimizer, scaler, amp_dtype, loader, device, position: Position, clip_norm,
                    channels_last: bool, stop, world_size: int, loggers, desc: str, total: int,
                    main_process: bool) -> bool:
    """Train the rest of an epoch from `position.batch`; True when a stop was requested."""
    model.train()
    sums = position.sums
    # Only the first process shows progress; the others would repeat it.
    with Progress(total, desc, live=None if main_process else False, every_s=10.0 if main_process else 1e12) as bar:
        bar.update(min(position.batch * loader.batch_sampler.batch_size, total))
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
                loss, parts = train_step(model, optimizer, scaler, amp_dtype, images, targets, device, clip_norm,
                                         channels_last)
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
                loggers.log_step(position.step, {"loss": loss, **parts, "lr": optimizer.param_groups[0]["lr"]})
            seen = max(sums.get("seen", 0), 1)
            bar.update((0 if images is None else len(images)) + len(failures), loss=sums.get("loss", 0.0) / seen,
                       eff=sums["compute_s"] / max(sums["compute_s"] + sums["wait_s"], 1e-9))
            if _any_rank(bool(stop), world_size, device):
                return True
    return False


def train_step(model, optimizer, scaler, amp_dtype, images, targets, device, clip_norm, channels_last: bool):
    """One optimisation step; returns (loss, its parts) as Python floats."""
    from app.train.task_models import move_batch, training_loss

    images, targets = move_batch(images, targets, device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        loss, parts = training_loss(model, images, targets)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if clip_norm is not None:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
    scaler.step(optimizer)
    scaler.update()
    return float(loss.detach()), {k: float(v) for k, v in parts.items()}


@torch.inference_mode()
def evaluate(model, loader, device, evaluator, amp_dtype, channels_last: bool, stop) -> bool:
    """Feed the validation set to `evaluator`; False when a stop was requested midway."""
    from app.train.task_models import predict

    model.eval()
    with Progress(len(loader.batch_sampler.indices), "validate") as bar:
        for images, targets, _, failures in loader:
            if stop:
                return False
            if images is not None:
                images = images.to(device, non_blocking=True)
                if channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                    outputs = predict(model, images)
                evaluator.update(to_device(outputs, torch.device("cpu")), targets)
            bar.update((0 if images is None else len(images)) + len(failures))
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
        files.append((run_dir / checkpoints.BEST, checkpoints.for_inference(state)))
    if trainer.save_epochs and record["epoch"] % trainer.save_epochs == 0:
        files.append((run_dir / checkpoints.epoch_checkpoint(record["epoch"]), state))
    files.insert(0, (run_dir / checkpoints.LAST, state))
    saver.save(files)
    write_metrics_csv(run_dir, position.history)
    atomic.write_json(run_dir / METRICS, {
        "task": cfg.model.task, "model": cfg.model.name, "classes": list(data.classes),
        "n_train": len(data.train_index), "n_val": len(data.val_index), "key_metric": key_metric,
        "best": position.best, "epochs": position.history, "final": record})
    loggers.log_epoch(position.step, record)
    shown = ", ".join(f"{k} {v:.4g}" for k, v in record.items() if k.startswith("val_") and isinstance(v, float))
    log.info("epoch %d/%d: loss %.4f%s, %.1f img/s, compute efficiency %.2f", record["epoch"], trainer.epochs,
             record["train_loss"], f", {shown}" if shown else "", record["images_per_s"],
             record["compute_efficiency"])


def resume(path: Path, model, optimizer, scheduler, scaler, task: str, model_name: str, classes,
           split_id: str) -> Position:
    state = checkpoints.load(path)
    checkpoints.check_compatible(state, task, model_name, classes, path)
    if state.get("split") not in (None, split_id):
        from app.config import UserError

        raise UserError(f"{path} was trained on another selection or validation split than this run has: "
                        f"choose another run_directory, or overwrite=true to start again")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    if state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    checkpoints.restore_rng_state(state["rng"])
    return Position(epoch=int(state["epoch"]), batch=int(state["batch"]), step=int(state.get("global_step", 0)),
                    sums=dict(state.get("sums") or {}), history=list(state.get("history") or []),
                    best=state.get("best"))


def key_metric_for(trainer, task: str, has_validation: bool):
    if trainer.key_metric:
        return trainer.key_metric, trainer.key_metric_mode
    if not has_validation:
        return "train_loss", "min"
    from app.train.metrics import key_metric

    return key_metric(task), "max"


def autocast_dtype(amp: Optional[str], device: torch.device) -> Optional[torch.dtype]:
    """bf16 or fp16 autocast on CUDA; bf16 also on the CPU; fp16 on the CPU is not offered by torch."""
    if amp is None:
        return None
    if device.type != "cuda" and amp == "fp16":
        log.warning("trainer.amp=fp16 needs CUDA; training in float32 on %s (bf16 works on the CPU)", device)
        return None
    if amp == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        log.warning("this GPU has no bf16: using fp16 with a gradient scaler instead")
        return torch.float16
    return torch.bfloat16 if amp == "bf16" else torch.float16


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
