"""The training schemas (trainer with its optimizer and scheduler, hardware, logger) and their
checks. Importable without torch, like app.config, which composes these into ThresherConfig and
calls the checks; torch itself tries the optimizer's and scheduler's arguments later
(app.train.loop.check_train_config)."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

from omegaconf import DictConfig

from app.config_checks import refuse
from app.train.tasks import TASKS

# torch.optim and torch.optim.lr_scheduler names, listed so a typo is refused before torch loads;
# their keyword arguments and values are tried on a stand-in parameter before the first stage runs.
OPTIMIZERS = ("SGD", "Adam", "AdamW", "RMSprop", "Adagrad", "Adadelta", "Adamax", "NAdam", "RAdam",
              "ASGD", "Rprop", "Adafactor")
# torch.optim optimizers that cannot step a torchvision model in thresher's loop, and why.
UNSTEPPABLE_OPTIMIZERS = {
    "LBFGS": "it needs a closure at every step, which the training loop does not pass",
    "SparseAdam": "it needs sparse gradients, and torchvision models have dense ones",
    "Muon": "it takes only 2-D parameters, and every torchvision model has 1-D ones (biases, norms)",
}
SCHEDULERS = ("StepLR", "MultiStepLR", "ExponentialLR", "CosineAnnealingLR", "CosineAnnealingWarmRestarts",
              "LinearLR", "ConstantLR", "PolynomialLR", "OneCycleLR", "CyclicLR", "ReduceLROnPlateau")
# Schedulers whose required argument is a Python function, which a config cannot hold.
FUNCTION_SCHEDULERS = ("LambdaLR", "MultiplicativeLR")
AMP_DTYPES = ("bf16", "fp16")
LOGGERS = ("csv", "tensorboard", "wandb")
DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


@dataclass
class HardwareConfig:
    device: str = "auto"
    # None: none on the CPU (worker processes only compete with compute there), one per core
    # (at most 8) on CUDA; -1: one per core.
    num_workers: Optional[int] = None
    # Batches each worker loads ahead (torch's default 2); only with workers.
    prefetch_factor: Optional[int] = None
    # null: on when the device is CUDA.
    pin_memory: Optional[bool] = None
    persistent_workers: bool = False
    # Training processes on this machine (DDP through torchrun when > 1); -1: one per visible GPU.
    nproc_per_node: int = 1
    # Multi-node: torchrun's rendezvous (every node runs the same command with its node_rank).
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: Optional[str] = None
    rdzv_id: str = "thresher"
    # null: nccl on CUDA, gloo on the CPU.
    ddp_backend: Optional[str] = None


@dataclass
class OptimizerConfig:
    """Any torch.optim class by name, with its keyword arguments (DeepLabCut's type/params)."""
    type: str = "AdamW"
    params: Dict[str, Any] = field(default_factory=lambda: {"lr": 1e-3, "weight_decay": 1e-4})


@dataclass
class SchedulerConfig:
    """Any torch.optim.lr_scheduler class by name, stepped once an epoch; null for a constant rate.
    warmup_epochs ramps the rate linearly from warmup_start_factor first."""
    type: Optional[str] = None
    params: Dict[str, Any] = field(default_factory=dict)
    warmup_epochs: int = 0
    warmup_start_factor: float = 0.1


@dataclass
class TrainerConfig:
    epochs: int = 6
    batch_size: int = 32
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    # Keep checkpoints/epoch_NNN.pt every this many epochs (0: only last.pt and best.pt).
    save_epochs: int = 0
    # best.pt and epoch_NNN.pt with the optimizer, scheduler and AMP scaler states too, so training can
    # continue from them; false: the weights only (a third of the size for resnet18 under AdamW).
    # last.pt always has them: a rerun resumes from it.
    save_optimizer_state: bool = False
    # Clip the gradients' total norm to this (null: no clipping).
    grad_clip_norm: Optional[float] = None
    # Automatic mixed precision on CUDA: null, bf16 or fp16 (fp16 with a gradient scaler).
    amp: Optional[str] = None
    channels_last: bool = False
    compile: bool = False
    # torch.use_deterministic_algorithms and seeded workers: a resumed run equals an uninterrupted one.
    deterministic: bool = False
    # The metric that picks checkpoints/best.pt; null: the task's (val_top1, val_map, val_keypoints_map),
    # or, with no validation set, none: no best.pt (train_loss with key_metric_mode=min asks for one).
    key_metric: Optional[str] = None
    key_metric_mode: str = "max"
    # The share of the selection that validates instead of training; not used when data.holdout_fraction
    # or data.val_input_dir gives a validation set apart from the selection (all of it trains then).
    val_fraction: float = 0.2
    # One file name per line (as in data/input_files.csv): these validate, the rest train.
    val_filenames_file: Optional[str] = None


@dataclass
class LoggerConfig:
    """Where training metrics go besides metrics.csv, which is always written."""
    type: str = "csv"
    project: str = "thresher"
    # null: the run directory's name.
    run_name: Optional[str] = None
    entity: Optional[str] = None
    # wandb: online, offline (no network needed; `wandb sync` later) or disabled.
    mode: str = "online"
    log_every_n_steps: int = 10


def validate_trainer(trainer: DictConfig, task: str) -> None:
    for key in ("epochs", "batch_size"):
        if trainer[key] < 1:
            raise refuse(f"trainer.{key}", trainer[key], "use an integer >= 1")
    if trainer.save_epochs < 0:
        raise refuse("trainer.save_epochs", trainer.save_epochs, "use an integer >= 0 (0: only last.pt and best.pt)")
    if trainer.optimizer.type in UNSTEPPABLE_OPTIMIZERS:
        raise refuse("trainer.optimizer.type", trainer.optimizer.type,
                     f"{UNSTEPPABLE_OPTIMIZERS[trainer.optimizer.type]}; choose {', '.join(OPTIMIZERS)}")
    if trainer.optimizer.type not in OPTIMIZERS:
        raise refuse("trainer.optimizer.type", trainer.optimizer.type,
                     f"choose a torch.optim name: {', '.join(OPTIMIZERS)}", OPTIMIZERS)
    lr = trainer.optimizer.params.get("lr")
    if lr is not None and not (isinstance(lr, (int, float)) and lr > 0):
        raise refuse("trainer.optimizer.params.lr", lr, "use a learning rate > 0")
    scheduler = trainer.scheduler
    if scheduler.type in FUNCTION_SCHEDULERS:
        raise refuse("trainer.scheduler.type", scheduler.type,
                     f"it needs a Python function (lr_lambda), which a config cannot give; choose "
                     f"{', '.join(SCHEDULERS)}, or null")
    if scheduler.type is not None and scheduler.type not in SCHEDULERS:
        raise refuse("trainer.scheduler.type", scheduler.type,
                     f"choose a torch.optim.lr_scheduler name: {', '.join(SCHEDULERS)}, or null", SCHEDULERS)
    if scheduler.warmup_epochs < 0:
        raise refuse("trainer.scheduler.warmup_epochs", scheduler.warmup_epochs, "use an integer >= 0")
    if not 0 < scheduler.warmup_start_factor <= 1:
        raise refuse("trainer.scheduler.warmup_start_factor", scheduler.warmup_start_factor,
                     "use a factor in (0, 1]")
    if trainer.grad_clip_norm is not None and not trainer.grad_clip_norm > 0:
        raise refuse("trainer.grad_clip_norm", trainer.grad_clip_norm, "use a norm > 0, or null for no clipping")
    if trainer.amp is not None and trainer.amp not in AMP_DTYPES:
        raise refuse("trainer.amp", trainer.amp, "use bf16, fp16, or null", AMP_DTYPES)
    if trainer.key_metric_mode not in ("max", "min"):
        raise refuse("trainer.key_metric_mode", trainer.key_metric_mode, "use max or min", ("max", "min"))
    if not 0 <= trainer.val_fraction < 1:
        raise refuse("trainer.val_fraction", trainer.val_fraction, "use a fraction in [0, 1)")
    if trainer.val_filenames_file and not Path(trainer.val_filenames_file).is_file():
        raise refuse("trainer.val_filenames_file", trainer.val_filenames_file,
                     "it must be an existing text file, one file name per line")


def validate_key_metric(trainer: DictConfig, task: str, held_out: bool = False) -> None:
    """best.pt is chosen by trainer.key_metric: it must be a metric the task reports, compared the
    right way round, and a validation metric needs a validation set (`held_out`: the data gives
    one, data.holdout_fraction or data.val_input_dir)."""
    metric, mode = trainer.key_metric, trainer.key_metric_mode
    reported = (*TASKS[task].metrics, "train_loss")
    if metric not in reported:
        raise refuse("trainer.key_metric", metric,
                     f"model.task={task} reports {', '.join(reported)} (or null for {reported[0]})", reported)
    wanted = "min" if metric == "train_loss" else "max"
    if mode != wanted:
        raise refuse("trainer.key_metric_mode", mode,
                     f"trainer.key_metric={metric} is better when {'lower' if wanted == 'min' else 'higher'}: "
                     f"use {wanted}")
    if metric != "train_loss" and trainer.val_fraction == 0 and not trainer.val_filenames_file and not held_out:
        raise refuse("trainer.key_metric", metric, "trainer.val_fraction=0 and no trainer.val_filenames_file, "
                     "data.holdout_fraction or data.val_input_dir leave no validation set to measure it on: "
                     "set data.holdout_fraction or trainer.val_fraction, or use train_loss (with "
                     "key_metric_mode=min)")


def validate_hardware(hardware: DictConfig) -> None:
    if not DEVICE_PATTERN.match(str(hardware.device)):
        raise refuse("hardware.device", hardware.device, "use auto, cpu, cuda, cuda:N or mps",
                     ["auto", "cpu", "cuda", "mps"])
    if hardware.num_workers is not None and hardware.num_workers < -1:
        raise refuse("hardware.num_workers", hardware.num_workers,
                     "use an integer >= 0, -1 for one per CPU core, or null for automatic")
    if hardware.prefetch_factor is not None and hardware.prefetch_factor < 1:
        raise refuse("hardware.prefetch_factor", hardware.prefetch_factor, "use an integer >= 1, or null")
    if hardware.nproc_per_node == 0 or hardware.nproc_per_node < -1:
        raise refuse("hardware.nproc_per_node", hardware.nproc_per_node,
                     "use an integer >= 1, or -1 for one per visible GPU")
    if hardware.nnodes < 1:
        raise refuse("hardware.nnodes", hardware.nnodes, "use an integer >= 1")
    if not 0 <= hardware.node_rank < hardware.nnodes:
        raise refuse("hardware.node_rank", hardware.node_rank, f"use an integer in [0, hardware.nnodes={hardware.nnodes})")
    if hardware.nnodes > 1 and not hardware.rdzv_endpoint:
        raise refuse("hardware.rdzv_endpoint", hardware.rdzv_endpoint,
                     "with hardware.nnodes > 1, name the rendezvous host:port that every node reaches")
    if hardware.ddp_backend is not None and hardware.ddp_backend not in ("nccl", "gloo"):
        raise refuse("hardware.ddp_backend", hardware.ddp_backend, "use nccl, gloo, or null", ("nccl", "gloo"))


def validate_logger(logger: DictConfig) -> None:
    if logger.type not in LOGGERS:
        raise refuse("logger.type", logger.type, f"choose from {', '.join(LOGGERS)}", LOGGERS)
    if logger.mode not in ("online", "offline", "disabled"):
        raise refuse("logger.mode", logger.mode, "use online, offline or disabled",
                     ("online", "offline", "disabled"))
    if logger.log_every_n_steps < 1:
        raise refuse("logger.log_every_n_steps", logger.log_every_n_steps, "use an integer >= 1")
