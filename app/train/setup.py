"""What training runs on, built once from the config, the data and the device: the task's model on
the device (channels_last, DDP, torch.compile), the autocast dtype and gradient scaler, the
optimizer and scheduler, the datasets with their collate and DataLoader settings, and the one
training step and prediction. The train stage (app.train.loop) and the profile
(app.profile.stage) both build it here, so what the profile measures is what training runs.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from app.data.augment import build_transform, input_size_ok
from app.train.data import TrainingData, TrainingImages, loader_settings, make_collate, model_input_shape
from app.train.optim import build_optimizer, build_scheduler
from app.train.tasks import TaskSpec, spec_for

log = logging.getLogger("thresher")


@dataclass
class TrainingSetup:
    """The task, the model and what steps it, and the data it is fed; `build` makes one."""
    task: TaskSpec
    device: torch.device
    data: TrainingData
    data_cfg: DictConfig
    hardware: DictConfig
    # The plain module: what checkpoints save and rank 0 validates.
    model: nn.Module
    # What the training step calls: `model`, or its DistributedDataParallel and torch.compile wrappers.
    trained: nn.Module
    # None when built for inference only.
    optimizer: Optional[torch.optim.Optimizer]
    scheduler: Any
    scaler: torch.amp.GradScaler
    amp_dtype: Optional[torch.dtype]
    channels_last: bool
    grad_clip_norm: Optional[float]
    collate: Callable
    rank: int = 0
    world_size: int = 1

    @classmethod
    def build(cls, cfg: DictConfig, data: TrainingData, device: torch.device, *, train: bool = True, rank: int = 0,
              world_size: int = 1, state: Optional[Dict[str, Any]] = None) -> "TrainingSetup":
        """train: with an optimizer and scheduler, the model in train mode (else eval mode).
        state: a checkpoint to continue from (app.train.checkpoints), loaded before the model is
        wrapped for DDP, so every process starts from rank 0's weights."""
        trainer, task = cfg.trainer, spec_for(cfg.model.task)
        model = task.build_model(cfg.model.name, len(data.classes), data.num_keypoints, cfg.model.weights,
                                 cfg.data.image_size).to(device)
        if trainer.channels_last:
            model = model.to(memory_format=torch.channels_last)
        optimizer = scheduler = None
        if train:
            optimizer = build_optimizer(trainer.optimizer, model.parameters())
            scheduler = build_scheduler(trainer.scheduler, optimizer)
        amp_dtype = autocast_dtype(trainer.amp, device)
        scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
        if state is not None:
            _load_training_state(state, model, optimizer, scheduler, scaler)
        trained = model
        if world_size > 1:
            trained = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)
        if trainer.compile:
            trained = torch.compile(trained)
        model.train(train)
        return cls(task=task, device=device, data=data, data_cfg=cfg.data, hardware=cfg.hardware, model=model,
                   trained=trained, optimizer=optimizer, scheduler=scheduler, scaler=scaler, amp_dtype=amp_dtype,
                   channels_last=bool(trainer.channels_last), grad_clip_norm=trainer.grad_clip_norm,
                   collate=make_collate(task, data.targets), rank=rank, world_size=world_size)

    # -----------------------------------------------------------------------------------------
    # Data
    # -----------------------------------------------------------------------------------------
    def dataset(self, train: bool) -> TrainingImages:
        """The images with data.augment's training augmentations (and its min/max_input_size
        check), or with the validation transform."""
        augment = self.data_cfg.augment
        flip_index = self.task.keypoint_flip_index(self.data.annotations) if train else None
        transform = build_transform(augment, self.data_cfg.image_size, train=train,
                                    normalize=self.task.normalize_images, keypoint_flip_index=flip_index)
        size_ok = functools.partial(input_size_ok, augment=augment) if train else None
        second_root = None
        if self.data.val_input_dir is not None and self.data.val_index:  # data.val_input_dir's images
            second_root = (self.data.val_index[0], self.data.val_input_dir)
        return TrainingImages(self.data.input_dir, self.data.files, self.data.targets, transform, size_ok=size_ok,
                              second_root=second_root)

    def loader_settings(self, batch_size: int, num_workers: Optional[int] = None) -> Dict[str, Any]:
        """DataLoader keyword arguments from the hardware group (num_workers: another count)."""
        hardware = self.hardware
        if num_workers is not None:
            hardware = OmegaConf.merge(hardware, {"num_workers": num_workers})
        return loader_settings(hardware, self.device, batch_size, model_input_shape(self.data_cfg))

    # -----------------------------------------------------------------------------------------
    # Steps
    # -----------------------------------------------------------------------------------------
    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                              enabled=self.amp_dtype is not None)

    def train_step(self, images, targets) -> Tuple[float, Dict[str, float]]:
        """One optimisation step; returns (loss, its parts) as Python floats."""
        images, targets = self.task.move_batch(images, targets, self.device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with self.autocast():
            loss, parts = self.task.training_loss(self.trained, images, targets)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.grad_clip_norm is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.trained.parameters(), self.grad_clip_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return float(loss.detach()), {k: float(v) for k, v in parts.items()}

    @torch.inference_mode()
    def predict(self, images, model: Optional[nn.Module] = None) -> List[dict]:
        """The task's predictions for a batch, on the device. model: `self.model` by default (rank 0
        validates alone, so not through DDP), or `self.trained`."""
        images = images.to(self.device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with self.autocast():
            return self.task.predict(self.model if model is None else model, images)

    def make_evaluator(self):
        return self.task.make_evaluator(self.data.annotations)


def _load_training_state(state: Dict[str, Any], model: nn.Module, optimizer, scheduler, scaler) -> None:
    model.load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    if state.get("scaler"):
        scaler.load_state_dict(state["scaler"])


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
