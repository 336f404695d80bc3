"""Typed configuration: the schemas Hydra composes against, and the checks that refuse a bad run.

Everything here is importable without torch, so composing and checking a config stays fast and a
user error is reported before any heavy work starts.
"""
from __future__ import annotations

import csv
import difflib
import math
import os
import re
import zipfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

# The order stages run in; `profile` measures what `train` would do, so it goes first.
STAGES = ("scan", "embed", "select", "profile", "train")
PROFILE_MODES = ("train", "infer", "latency")
SAMPLER_METHODS = ("coreset", "random", "none")
# Classifiers the training stage can build, by torchvision name (checked without importing it).
CLASSIFIERS = (
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "mobilenet_v3_small", "mobilenet_v3_large", "mobilenet_v2",
    "efficientnet_b0", "efficientnet_b1", "efficientnet_b2", "efficientnet_b3",
    "convnext_tiny", "regnet_y_400mf", "shufflenet_v2_x1_0",
)
DETECTORS = ("fasterrcnn_resnet50_fpn", "fasterrcnn_resnet50_fpn_v2", "fasterrcnn_mobilenet_v3_large_fpn",
             "fasterrcnn_mobilenet_v3_large_320_fpn", "retinanet_resnet50_fpn", "fcos_resnet50_fpn")
KEYPOINT_MODELS = ("keypointrcnn_resnet50_fpn",)
TASK_MODELS = {"classification": CLASSIFIERS, "detection": DETECTORS, "keypoints": KEYPOINT_MODELS}
# The validation metrics each task reports (app.train.metrics computes them), higher is better; the
# first is the default trainer.key_metric. Every task also reports train_loss, lower is better.
TASK_METRICS = {"classification": ("val_top1",), "detection": ("val_map", "val_map50"),
                "keypoints": ("val_keypoints_map", "val_keypoints_map50", "val_map", "val_map50")}
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
CROP_SAMPLING = ("uniform", "keypoint", "density", "hybrid")
AMP_DTYPES = ("bf16", "fp16")
LOGGERS = ("csv", "tensorboard", "wandb")
DATA_FORMATS = ("shapes", "folder", "coco", "oxford_pet")
DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
WEIGHTS_NAME_PATTERN = re.compile(r"^\w+_Weights\.\w+$")


class UserError(Exception):
    """A mistake in what the user asked for: reported as one line, exit code 2, no traceback."""


# ---------------------------------------------------------------------------------------------
# Schemas
# ---------------------------------------------------------------------------------------------
@dataclass
class ModelConfig:
    name: str = "resnet18"
    # classification, detection or keypoints; the number of classes comes from the data.
    task: str = "classification"
    # null (random initialisation), a torchvision weights name read from $TORCH_HOME, or a path.
    weights: Optional[str] = None


@dataclass
class ResizeConfig:
    # null: data.image_size. keep_ratio scales to fit inside, then pads the rest (DeepLabCut's resize).
    height: Optional[int] = None
    width: Optional[int] = None
    keep_ratio: bool = True


@dataclass
class ColorJitterConfig:
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0


@dataclass
class AugmentConfig:
    """Training augmentations (torchvision.transforms.v2: boxes and keypoints follow the image);
    the names are DeepLabCut's. Validation images are only scaled, resized and padded."""
    resize: ResizeConfig = field(default_factory=ResizeConfig)
    # The first scaling, applied to every image (training and validation).
    global_scale: float = 1.0
    # Images whose longer side, after global_scale, is outside [min, max] are left out of training.
    min_input_size: int = 16
    max_input_size: int = 4096
    # [width, height] of a random crop taken from a crop_ratio share of the images; null: no crop.
    crop_size: Optional[List[int]] = None
    crop_ratio: float = 0.4
    # The crop centre moves by up to this share of the crop size around the sampled point.
    max_shift: float = 0.4
    # uniform: anywhere; keypoint: around a random visible keypoint; density: where annotations
    # are densest; hybrid: one of the three at random.
    crop_sampling: str = "hybrid"
    sharpening: bool = False
    sharpenratio: float = 0.3
    edge: bool = False
    # Probability of a horizontal flip.
    hflip: float = 0.5
    color_jitter: ColorJitterConfig = field(default_factory=ColorJitterConfig)


@dataclass
class DataConfig:
    """What every data option shares: the model input size and the augmentations."""
    name: str = MISSING
    image_size: int = 64
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class ShapesDataConfig(DataConfig):
    name: str = "shapes"
    n_images: int = 300
    shapes_image_size: int = 96
    n_corrupt: int = 0


@dataclass
class FolderDataConfig(DataConfig):
    name: str = "folder"
    input_dir: str = "/data/input"
    # A file naming the images to use, one path per line relative to input_dir; no folder walk.
    relevant_filenames_file: Optional[str] = None


@dataclass
class CocoDataConfig(FolderDataConfig):
    """Images under input_dir, boxes and keypoints in a COCO JSON file (file_name relative to it)."""
    name: str = "coco"
    annotations: str = "/data/input/annotations.json"


@dataclass
class OxfordPetDataConfig(DataConfig):
    """The Oxford-IIIT Pet layout: images/, annotations/xmls/ (head boxes), annotations/trainval.txt."""
    name: str = "oxford_pet"
    root: str = "/data/input"
    # species: cat and dog; breed: the 37 breeds.
    classes: str = "species"


@dataclass
class StoppingCondition:
    # int >= 1 (a count), float in (0, 1] (a fraction) or -1 (off); Any keeps int and float apart.
    n_samples: Any = -1
    min_distance: float = -1.0


@dataclass
class SamplerConfig:
    method: str = "coreset"
    stopping_condition: StoppingCondition = field(default_factory=StoppingCondition)
    # Frames of one folder, in name order, are picked in runs of this length (1: single images).
    selected_sequence_length: int = 1
    # Before selecting, drop images closer than this to an earlier kept image; -1 for off.
    near_duplicate_distance: float = -1.0
    normalize_embeddings: bool = True
    batch_size: int = 64
    # The classifier whose penultimate layer embeds the images; null: model.name when that is a
    # classifier, else resnet18.
    embedding_model: Optional[str] = None


@dataclass
class DatapoolConfig:
    # A name keeps the selection in <work_dir>/datapool/<name>/ across runs; null: no pool.
    name: Optional[str] = None
    keep_history: bool = True


@dataclass
class SSLConfig:
    """Self-supervised training of the embedding backbone (enable_training=true)."""
    method: str = "simclr"
    epochs: int = 5
    batch_size: int = 64
    lr: float = 0.06
    temperature: float = 0.5
    projection_dim: int = 128


@dataclass
class ReportConfig:
    n_example_images: int = 6
    memory_requirement_in_GB: float = 2.0
    # A plot of which frames of each input video were selected (the Lightly Worker's name).
    show_video_sampling_timeline: bool = True


@dataclass
class CorruptnessCheckConfig:
    # A video frame whose corruption score (0: clean, 1: unusable) is above this is corrupt.
    corruption_threshold: float = 0.1


@dataclass
class DatasourceConfig:
    """Where the input comes from, under the Lightly Worker's names."""
    # false: with a datapool.name, a later run scans only files and objects it has not seen (key
    # and ETag, or size and mtime for a folder); true: all of them again.
    process_all: bool = False
    # Trust the video container's frame count instead of decoding every frame to count them.
    use_frame_count_metadata: bool = False


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
    epochs: int = 3
    batch_size: int = 32
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    # Keep checkpoints/epoch_NNN.pt every this many epochs (0: only last.pt and best.pt).
    save_epochs: int = 0
    # Clip the gradients' total norm to this (null: no clipping).
    grad_clip_norm: Optional[float] = None
    # Automatic mixed precision on CUDA: null, bf16 or fp16 (fp16 with a gradient scaler).
    amp: Optional[str] = None
    channels_last: bool = False
    compile: bool = False
    # torch.use_deterministic_algorithms and seeded workers: a resumed run equals an uninterrupted one.
    deterministic: bool = False
    # The metric that picks checkpoints/best.pt; null: the task's (val_top1, val_map, val_keypoints_map).
    key_metric: Optional[str] = None
    key_metric_mode: str = "max"
    val_fraction: float = 0.2
    # One file name per line (as in data/input_files.csv): these validate, the rest train.
    val_filenames_file: Optional[str] = None


@dataclass
class ProfileConfig:
    """stages=[profile]: warm-up steps, then measured steps, for every batch size x worker count."""
    # train: training steps as the train stage runs them; infer: forward passes (no gradients);
    # latency: infer one image at a time, as for live use, with per-image latency percentiles.
    mode: str = "train"
    warmup_steps: int = 5
    steps: int = 20
    # The sweep; null: trainer.batch_size (1 in latency mode) and hardware.num_workers (0 in
    # latency mode: each frame is loaded as it comes).
    batch_sizes: Optional[List[int]] = None
    num_workers: Optional[List[int]] = None
    # A torch.profiler Chrome trace of trace_steps further steps of every setting, in profile/traces/.
    trace: bool = False
    trace_steps: int = 5
    # The recommendation: the smallest batch size and fewest workers within this share of the best
    # throughput (larger batches and more workers cost memory and CPU for nothing more).
    tolerance: float = 0.05


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


@dataclass
class ThresherConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: Any = MISSING
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    work_dir: str = "runs"
    note: str = ""
    run_directory: Optional[str] = None
    overwrite: bool = False
    resume: bool = False
    seed: int = 0
    token: Optional[str] = None
    stages: List[str] = field(default_factory=lambda: list(STAGES))
    sanity_check: bool = False
    enable_corruptness_check: bool = True
    corruptness_check: CorruptnessCheckConfig = field(default_factory=CorruptnessCheckConfig)
    remove_exact_duplicates: bool = True
    datasource: DatasourceConfig = field(default_factory=DatasourceConfig)
    # fsspec options per protocol (s3, gs, az) for bucket URLs in data.input_dir and work_dir;
    # credentials come in as ${secret:NAME}; null values are left out.
    storage_options: Dict[str, Any] = field(default_factory=dict)
    # Bring your own: a lightly-format embeddings CSV (skips embedding), backbone weights.
    embeddings: Optional[str] = None
    checkpoint: Optional[str] = None
    enable_training: bool = False
    ssl: SSLConfig = field(default_factory=SSLConfig)
    datapool: DatapoolConfig = field(default_factory=DatapoolConfig)
    dump_dataset: bool = False
    # -1: as they are; an int: the shorter edge; [h, w]: exactly that size.
    output_image_size: Any = -1
    output_image_format: str = "png"
    dump_sampled_embeddings: bool = True
    report: ReportConfig = field(default_factory=ReportConfig)


def register_configs() -> None:
    """Put the schemas where the yaml files' defaults lists find them."""
    store = ConfigStore.instance()
    store.store(name="thresher_schema", node=ThresherConfig)
    store.store(group="data", name="shapes_schema", node=ShapesDataConfig)
    store.store(group="data", name="folder_schema", node=FolderDataConfig)
    store.store(group="data", name="coco_schema", node=CocoDataConfig)
    store.store(group="data", name="oxford_pet_schema", node=OxfordPetDataConfig)


# ---------------------------------------------------------------------------------------------
# Run-directory naming, as resolvers so Hydra's own run dir is the same folder
# ---------------------------------------------------------------------------------------------
_STARTED_AT = datetime.now(timezone.utc)


def run_stamp() -> str:
    """The UTC start time of this process, fixed once so every use names the same folder."""
    return _STARTED_AT.strftime("%Y-%m-%d_%H-%M-%S")


def safe_note(note: Optional[str]) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(note or "")).strip("_")


def run_directory_path(work_dir: str, note: Optional[str], run_directory: Optional[str]) -> str:
    """`run_directory` (relative to work_dir unless absolute) or `<work_dir>/<UTC stamp>_<note>`.
    A bucket work_dir (s3://...) stands for a local staging folder that is copied up after every
    stage (app.data.sources.staging_dir)."""
    if is_url(work_dir):
        from app.data.sources import staging_dir

        work_dir = str(staging_dir(str(work_dir)))
    if run_directory:
        return str(Path(work_dir) / run_directory)  # an absolute run_directory wins the join
    note = safe_note(note)
    return str(Path(work_dir) / (f"{run_stamp()}_{note}" if note else run_stamp()))


def register_resolvers() -> None:
    from app.secrets import register_secret_resolver

    if not OmegaConf.has_resolver("thresher_run_dir"):
        OmegaConf.register_new_resolver("thresher_run_dir", run_directory_path)
    register_secret_resolver()


# ---------------------------------------------------------------------------------------------
# Checks that the schema cannot express
# ---------------------------------------------------------------------------------------------
def closest(word: str, candidates: Iterable[str]) -> List[str]:
    """The nearest candidates, ignoring case; a dotted key is compared with its siblings by last
    part, so `trainer.batch_sise` finds `trainer.batch_size` and not every `trainer.*`."""
    word = str(word)
    unique = list(dict.fromkeys(str(c) for c in candidates))
    if "." in word:
        parent, leaf = word.rsplit(".", 1)
        siblings = {c.rsplit(".", 1)[1]: c for c in unique
                    if c.startswith(parent + ".") and "." not in c[len(parent) + 1:]}
        if siblings:
            return [siblings[n] for n in _nearest(leaf, list(siblings))]
    return _nearest(word, unique)


def _nearest(word: str, candidates: List[str]) -> List[str]:
    """Candidates at least 60% alike, and nearly as alike as the best one, best first."""
    scored = sorted(((difflib.SequenceMatcher(None, word.lower(), c.lower()).ratio(), c)
                     for c in candidates), key=lambda pair: -pair[0])
    if not scored or scored[0][0] < 0.6:
        return []
    return [c for score, c in scored[:3] if score >= max(0.6, scored[0][0] - 0.08)]


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    near = closest(word, candidates)
    return f" (did you mean {' or '.join(near)}?)" if near else ""


def _refuse(key: str, value: Any, allowed: str, candidates: Iterable[str] = ()) -> UserError:
    return UserError(f"{key}={value!r} is not allowed: {allowed}{did_you_mean(value, candidates)}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def n_samples_kind(value: Any) -> str:
    """'off', 'count' or 'fraction'; raises for anything else."""
    if _is_int(value) and value == -1:
        return "off"
    if _is_int(value) and value >= 1:
        return "count"
    if isinstance(value, float) and math.isfinite(value):
        if value == -1.0:
            return "off"
        if 0.0 < value <= 1.0:
            return "fraction"
    raise _refuse("sampler.stopping_condition.n_samples", value,
                  "use a count (an integer >= 1), a fraction in (0, 1], or -1 for off")


def unknown_keys(node: DictConfig, prefix: str = "") -> List[tuple]:
    """Keys that no schema declares (added with `+key=`): (full key, the keys allowed there)."""
    import dataclasses

    schema = OmegaConf.get_type(node)
    allowed = [f.name for f in dataclasses.fields(schema)] if dataclasses.is_dataclass(schema) else None
    found = []
    for key in node:
        full = f"{prefix}{key}"
        if allowed is not None and key not in allowed:
            found.append((full, [f"{prefix}{a}" for a in allowed]))
        child = node._get_node(key)
        if isinstance(child, DictConfig):
            found += unknown_keys(child, f"{full}.")
    return found


def validate(cfg: DictConfig) -> None:
    """Refuse values out of range with one line naming the key, the value and what is allowed."""
    from app.secrets import check_secrets

    for key, allowed in unknown_keys(cfg):
        raise UserError(f"{key}: no such key{did_you_mean(key, allowed)}")
    check_secrets(cfg)
    stages = list(cfg.stages)
    for stage in stages:
        if stage not in STAGES:
            raise _refuse("stages", stage, f"choose from {', '.join(STAGES)}", STAGES)
    if not stages:
        raise _refuse("stages", stages, f"name at least one of {', '.join(STAGES)}")
    if len(set(stages)) != len(stages):
        raise _refuse("stages", stages, "name each stage once")

    sampler = cfg.sampler
    if sampler.method not in SAMPLER_METHODS:
        raise _refuse("sampler.method", sampler.method, f"choose from {', '.join(SAMPLER_METHODS)}",
                      SAMPLER_METHODS)
    n_samples_kind(sampler.stopping_condition.n_samples)
    min_distance = sampler.stopping_condition.min_distance
    if not (min_distance == -1 or (math.isfinite(min_distance) and min_distance >= 0)):
        raise _refuse("sampler.stopping_condition.min_distance", min_distance,
                      "use a distance >= 0, or -1 for off")
    if min_distance >= 0 and sampler.method != "coreset":
        raise _refuse("sampler.stopping_condition.min_distance", min_distance,
                      f"it applies to sampler=coreset only, not sampler={sampler.method}; use -1")
    if sampler.batch_size < 1:
        raise _refuse("sampler.batch_size", sampler.batch_size, "use an integer >= 1")
    near = sampler.near_duplicate_distance
    if not (near == -1 or (math.isfinite(near) and near > 0)):
        raise _refuse("sampler.near_duplicate_distance", near, "use a distance > 0, or -1 for off")
    if near > 0 and sampler.method == "none":
        raise _refuse("sampler.near_duplicate_distance", near, "it needs embeddings; sampler=none has none")
    if sampler.selected_sequence_length < 1:
        raise _refuse("sampler.selected_sequence_length", sampler.selected_sequence_length,
                      "use an integer >= 1 (1 selects single images)")
    threshold = cfg.corruptness_check.corruption_threshold
    if not 0 <= threshold <= 1:
        raise _refuse("corruptness_check.corruption_threshold", threshold, "use a score in [0, 1]")
    _validate_bring_your_own(cfg)
    _validate_outputs(cfg)

    _validate_trainer(cfg.trainer, cfg.model.task)
    _validate_hardware(cfg.hardware)
    _validate_model(cfg.model, cfg.sampler.embedding_model)
    if cfg.trainer.key_metric is not None:
        _validate_key_metric(cfg.trainer, cfg.model.task)
    _validate_logger(cfg.logger)
    if "profile" in stages:
        _validate_profile(cfg.profile)

    _validate_data(cfg.data, needs_input="scan" in stages or "profile" in stages or cfg.sanity_check)
    if trains(cfg):
        _validate_task_data(cfg.model.task, cfg.data.name)
    if cfg.hardware.node_rank > 0 and stages != ["train"]:
        raise _refuse("stages", stages, f"on hardware.node_rank={cfg.hardware.node_rank} only training runs: "
                      f"select on node 0 first, then use stages=[train] with the same run_directory")
    _validate_work_dir(cfg.work_dir)
    if is_url(cfg.data.get("input_dir")) or is_url(cfg.work_dir):
        # every stage of this process (and its forked loader workers) reaches the buckets with these
        from app.data.sources import configure_storage

        configure_storage(OmegaConf.to_container(cfg.storage_options, resolve=True))
    if cfg.overwrite and cfg.resume:
        raise _refuse("resume", True, "choose overwrite=true or resume=true, not both")


def trains(cfg: DictConfig) -> bool:
    """Whether the run trains a model: the train stage, or the profile stage in train mode."""
    stages = list(cfg.stages)
    return "train" in stages or ("profile" in stages and cfg.profile.mode == "train")


def _validate_trainer(trainer: DictConfig, task: str) -> None:
    for key in ("epochs", "batch_size"):
        if trainer[key] < 1:
            raise _refuse(f"trainer.{key}", trainer[key], "use an integer >= 1")
    if trainer.save_epochs < 0:
        raise _refuse("trainer.save_epochs", trainer.save_epochs, "use an integer >= 0 (0: only last.pt and best.pt)")
    if trainer.optimizer.type in UNSTEPPABLE_OPTIMIZERS:
        raise _refuse("trainer.optimizer.type", trainer.optimizer.type,
                      f"{UNSTEPPABLE_OPTIMIZERS[trainer.optimizer.type]}; choose {', '.join(OPTIMIZERS)}")
    if trainer.optimizer.type not in OPTIMIZERS:
        raise _refuse("trainer.optimizer.type", trainer.optimizer.type,
                      f"choose a torch.optim name: {', '.join(OPTIMIZERS)}", OPTIMIZERS)
    lr = trainer.optimizer.params.get("lr")
    if lr is not None and not (isinstance(lr, (int, float)) and lr > 0):
        raise _refuse("trainer.optimizer.params.lr", lr, "use a learning rate > 0")
    scheduler = trainer.scheduler
    if scheduler.type in FUNCTION_SCHEDULERS:
        raise _refuse("trainer.scheduler.type", scheduler.type,
                      f"it needs a Python function (lr_lambda), which a config cannot give; choose "
                      f"{', '.join(SCHEDULERS)}, or null")
    if scheduler.type is not None and scheduler.type not in SCHEDULERS:
        raise _refuse("trainer.scheduler.type", scheduler.type,
                      f"choose a torch.optim.lr_scheduler name: {', '.join(SCHEDULERS)}, or null", SCHEDULERS)
    if scheduler.warmup_epochs < 0:
        raise _refuse("trainer.scheduler.warmup_epochs", scheduler.warmup_epochs, "use an integer >= 0")
    if not 0 < scheduler.warmup_start_factor <= 1:
        raise _refuse("trainer.scheduler.warmup_start_factor", scheduler.warmup_start_factor,
                      "use a factor in (0, 1]")
    if trainer.grad_clip_norm is not None and not trainer.grad_clip_norm > 0:
        raise _refuse("trainer.grad_clip_norm", trainer.grad_clip_norm, "use a norm > 0, or null for no clipping")
    if trainer.amp is not None and trainer.amp not in AMP_DTYPES:
        raise _refuse("trainer.amp", trainer.amp, "use bf16, fp16, or null", AMP_DTYPES)
    if trainer.key_metric_mode not in ("max", "min"):
        raise _refuse("trainer.key_metric_mode", trainer.key_metric_mode, "use max or min", ("max", "min"))
    if not 0 <= trainer.val_fraction < 1:
        raise _refuse("trainer.val_fraction", trainer.val_fraction, "use a fraction in [0, 1)")
    if trainer.val_filenames_file and not Path(trainer.val_filenames_file).is_file():
        raise _refuse("trainer.val_filenames_file", trainer.val_filenames_file,
                      "it must be an existing text file, one file name per line")


def _validate_key_metric(trainer: DictConfig, task: str) -> None:
    """best.pt is chosen by trainer.key_metric: it must be a metric the task reports, compared the
    right way round, and a validation metric needs a validation set."""
    metric, mode = trainer.key_metric, trainer.key_metric_mode
    reported = (*TASK_METRICS[task], "train_loss")
    if metric not in reported:
        raise _refuse("trainer.key_metric", metric,
                      f"model.task={task} reports {', '.join(reported)} (or null for {reported[0]})", reported)
    wanted = "min" if metric == "train_loss" else "max"
    if mode != wanted:
        raise _refuse("trainer.key_metric_mode", mode,
                      f"trainer.key_metric={metric} is better when {'lower' if wanted == 'min' else 'higher'}: "
                      f"use {wanted}")
    if metric != "train_loss" and trainer.val_fraction == 0 and not trainer.val_filenames_file:
        raise _refuse("trainer.key_metric", metric, "trainer.val_fraction=0 and no trainer.val_filenames_file "
                      "leave no validation set to measure it on: use train_loss (with key_metric_mode=min), "
                      "or set trainer.val_fraction")


def _validate_hardware(hardware: DictConfig) -> None:
    if not DEVICE_PATTERN.match(str(hardware.device)):
        raise _refuse("hardware.device", hardware.device, "use auto, cpu, cuda, cuda:N or mps",
                      ["auto", "cpu", "cuda", "mps"])
    if hardware.num_workers is not None and hardware.num_workers < -1:
        raise _refuse("hardware.num_workers", hardware.num_workers,
                      "use an integer >= 0, -1 for one per CPU core, or null for automatic")
    if hardware.prefetch_factor is not None and hardware.prefetch_factor < 1:
        raise _refuse("hardware.prefetch_factor", hardware.prefetch_factor, "use an integer >= 1, or null")
    if hardware.nproc_per_node == 0 or hardware.nproc_per_node < -1:
        raise _refuse("hardware.nproc_per_node", hardware.nproc_per_node,
                      "use an integer >= 1, or -1 for one per visible GPU")
    if hardware.nnodes < 1:
        raise _refuse("hardware.nnodes", hardware.nnodes, "use an integer >= 1")
    if not 0 <= hardware.node_rank < hardware.nnodes:
        raise _refuse("hardware.node_rank", hardware.node_rank, f"use an integer in [0, hardware.nnodes={hardware.nnodes})")
    if hardware.nnodes > 1 and not hardware.rdzv_endpoint:
        raise _refuse("hardware.rdzv_endpoint", hardware.rdzv_endpoint,
                      "with hardware.nnodes > 1, name the rendezvous host:port that every node reaches")
    if hardware.ddp_backend is not None and hardware.ddp_backend not in ("nccl", "gloo"):
        raise _refuse("hardware.ddp_backend", hardware.ddp_backend, "use nccl, gloo, or null", ("nccl", "gloo"))


def _validate_model(model: DictConfig, embedding_model: Optional[str]) -> None:
    if model.task not in TASK_MODELS:
        raise _refuse("model.task", model.task, f"choose from {', '.join(TASK_MODELS)}", TASK_MODELS)
    allowed = TASK_MODELS[model.task]
    if model.name not in allowed:
        other = next((task for task, names in TASK_MODELS.items() if model.name in names), None)
        hint = f" ({model.name} is a {other} model: set model.task={other})" if other else ""
        raise UserError(f"model.name={model.name!r} is not allowed: choose a torchvision {model.task} model: "
                        f"{', '.join(allowed)}{hint or did_you_mean(model.name, allowed)}")
    weights = model.weights
    if weights and (Path(weights).exists() or not WEIGHTS_NAME_PATTERN.match(weights)):
        _validate_torch_file("model.weights", weights, "use null, an existing state-dict file, or a torchvision "
                             "weights name such as ResNet18_Weights.IMAGENET1K_V1")
    if embedding_model is not None and embedding_model not in CLASSIFIERS:
        raise _refuse("sampler.embedding_model", embedding_model,
                      f"choose a torchvision classifier: {', '.join(CLASSIFIERS)}, or null", CLASSIFIERS)


# Which data options carry the labels each task needs.
TASK_DATA = {"classification": ("shapes", "folder", "coco", "oxford_pet"),
             "detection": ("shapes", "coco", "oxford_pet"), "keypoints": ("shapes", "coco")}


def _validate_task_data(task: str, data_name: str) -> None:
    if data_name not in TASK_DATA[task]:
        raise UserError(f"data={data_name} has no {task} labels: model.task={task} trains on data="
                        f"{' or data='.join(TASK_DATA[task])}")


def embedding_model_name(cfg: DictConfig) -> str:
    """The classifier that embeds the images for selection."""
    if cfg.sampler.embedding_model:
        return cfg.sampler.embedding_model
    return cfg.model.name if cfg.model.task == "classification" else "resnet18"


def _validate_profile(profile: DictConfig) -> None:
    if profile.mode not in PROFILE_MODES:
        raise _refuse("profile.mode", profile.mode, f"choose from {', '.join(PROFILE_MODES)}", PROFILE_MODES)
    if profile.warmup_steps < 0:
        raise _refuse("profile.warmup_steps", profile.warmup_steps, "use an integer >= 0")
    if profile.steps < 2:
        raise _refuse("profile.steps", profile.steps, "use an integer >= 2 (percentiles need several steps)")
    if profile.trace_steps < 1:
        raise _refuse("profile.trace_steps", profile.trace_steps, "use an integer >= 1")
    if not 0 <= profile.tolerance < 1:
        raise _refuse("profile.tolerance", profile.tolerance, "use a share of the best throughput in [0, 1)")
    for key, minimum, allowed in (("batch_sizes", 1, "batch sizes >= 1"),
                                  ("num_workers", -1, "worker counts >= 0 (-1: one per CPU core)")):
        values = profile[key]
        if values is None:
            continue
        values = list(values)
        if not values or not all(_is_int(v) and v >= minimum for v in values):
            raise _refuse(f"profile.{key}", values, f"use a list of {allowed}, e.g. [1,2,4,8], or null")
        if len(set(values)) != len(values):
            raise _refuse(f"profile.{key}", values, "name each value once")
    if profile.mode == "latency" and profile.batch_sizes is not None and list(profile.batch_sizes) != [1]:
        raise _refuse("profile.batch_sizes", list(profile.batch_sizes),
                      "latency mode runs batch size 1, as live use does; use profile.mode=infer to sweep "
                      "batch sizes")


def _validate_logger(logger: DictConfig) -> None:
    if logger.type not in LOGGERS:
        raise _refuse("logger.type", logger.type, f"choose from {', '.join(LOGGERS)}", LOGGERS)
    if logger.mode not in ("online", "offline", "disabled"):
        raise _refuse("logger.mode", logger.mode, "use online, offline or disabled",
                      ("online", "offline", "disabled"))
    if logger.log_every_n_steps < 1:
        raise _refuse("logger.log_every_n_steps", logger.log_every_n_steps, "use an integer >= 1")


def _validate_augment(augment: DictConfig) -> None:
    key = "data.augment"
    for side in ("height", "width"):
        value = augment.resize[side]
        if value is not None and value < 16:
            raise _refuse(f"{key}.resize.{side}", value, "use an integer >= 16, or null for data.image_size")
    if not augment.global_scale > 0:
        raise _refuse(f"{key}.global_scale", augment.global_scale, "use a scale > 0")
    if not 1 <= augment.min_input_size <= augment.max_input_size:
        raise _refuse(f"{key}.min_input_size", augment.min_input_size,
                      f"use an integer in [1, data.augment.max_input_size={augment.max_input_size}]")
    if augment.crop_size is not None:
        crop = list(augment.crop_size)
        if len(crop) != 2 or not all(_is_int(v) and v >= 8 for v in crop):
            raise _refuse(f"{key}.crop_size", crop, "use [width, height] (integers >= 8), or null for no crop")
    for name in ("crop_ratio", "sharpenratio", "hflip"):
        if not 0 <= augment[name] <= 1:
            raise _refuse(f"{key}.{name}", augment[name], "use a probability in [0, 1]")
    if not 0 <= augment.max_shift <= 1:
        raise _refuse(f"{key}.max_shift", augment.max_shift, "use a share of the crop size in [0, 1]")
    if augment.crop_sampling not in CROP_SAMPLING:
        raise _refuse(f"{key}.crop_sampling", augment.crop_sampling, f"choose from {', '.join(CROP_SAMPLING)}",
                      CROP_SAMPLING)
    for name in ("brightness", "contrast", "saturation"):
        if augment.color_jitter[name] < 0:
            raise _refuse(f"{key}.color_jitter.{name}", augment.color_jitter[name], "use a value >= 0")
    if not 0 <= augment.color_jitter.hue <= 0.5:
        raise _refuse(f"{key}.color_jitter.hue", augment.color_jitter.hue, "use a value in [0, 0.5]")


EXISTING_FILE = "it must be an existing file (in Docker, under a mounted folder)"


def _validate_torch_file(key: str, value: str, missing: str = EXISTING_FILE) -> None:
    """Weights are read only in the embed or train stage: refuse a file torch cannot load now, by
    its first bytes. torch.save writes a zip archive holding data.pkl (a pickle before torch 1.6)."""
    path = Path(value)
    if not path.is_file():
        raise _refuse(key, value, missing)
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                if any(name.rpartition("/")[2] == "data.pkl" for name in archive.namelist()):
                    return
        else:
            with open(path, "rb") as handle:
                first = handle.read(1)
            if first == b"\x80":  # the opcode every pickle of protocol 2 or later starts with
                return
            if not first:
                raise _refuse(key, value, "the file is empty; use a state dict saved with torch.save")
    except (OSError, zipfile.BadZipFile) as error:
        raise _refuse(key, value, f"it cannot be read: {getattr(error, 'strerror', None) or error}") from None
    raise _refuse(key, value, "it is not a PyTorch file (torch.save writes a zip archive holding data.pkl); "
                  "use a state dict saved with torch.save")


def _validate_embeddings_file(value: str) -> None:
    """An embeddings file is read in the embed stage, after the scan: refuse one that is not a
    lightly CSV by its header now (the embed stage checks every row)."""
    path = Path(value)
    if not path.is_file():
        raise _refuse("embeddings", value, EXISTING_FILE)
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            header = next(csv.reader(handle), None)
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise _refuse("embeddings", value, f"it is not a readable CSV file ({type(error).__name__}: {error}); "
                      "expected the lightly format filenames,embedding_0,...,labels") from None
    dim = len(header or ()) - 2
    if (dim < 1 or header[0] != "filenames" or header[-1] != "labels"
            or header[1:-1] != [f"embedding_{i}" for i in range(dim)]):
        shown = ",".join((header or [])[:3]) + (",..." if len(header or ()) > 3 else "")
        raise UserError(f"embeddings={value!r} is malformed at line 1: the header must be "
                        f"filenames,embedding_0,...,embedding_{{D-1}},labels, not {shown or 'an empty line'}")


def _validate_bring_your_own(cfg: DictConfig) -> None:
    if cfg.embeddings:
        _validate_embeddings_file(cfg.embeddings)
    if cfg.checkpoint:
        _validate_torch_file("checkpoint", cfg.checkpoint)
    if cfg.embeddings and cfg.sampler.method == "none":
        raise _refuse("embeddings", cfg.embeddings, "sampler=none uses no embeddings; choose coreset or random")
    if cfg.enable_training:
        if cfg.embeddings:
            raise _refuse("enable_training", True, "it trains the backbone that makes the embeddings, so it "
                          "cannot be combined with embeddings=...; drop one of them")
        if cfg.sampler.method == "none":
            raise _refuse("enable_training", True, "sampler=none uses no embeddings; choose coreset or random")
        ssl = cfg.ssl
        if ssl.method != "simclr":
            raise _refuse("ssl.method", ssl.method, "choose simclr", ["simclr"])
        for key, minimum in (("epochs", 1), ("batch_size", 2), ("projection_dim", 1)):
            if ssl[key] < minimum:
                raise _refuse(f"ssl.{key}", ssl[key], f"use an integer >= {minimum}")
        for key in ("lr", "temperature"):
            if not ssl[key] > 0:
                raise _refuse(f"ssl.{key}", ssl[key], "use a value > 0")
    if cfg.datapool.name is not None and not re.fullmatch(r"[A-Za-z0-9._-]+", str(cfg.datapool.name)):
        raise _refuse("datapool.name", cfg.datapool.name, "use letters, digits, '.', '_' and '-'")
    if cfg.datapool.name is not None and is_url(cfg.work_dir):
        # A pool's updates rely on a file lock and atomic renames, which a bucket does not have.
        raise _refuse("datapool.name", cfg.datapool.name, f"the datapool lives under work_dir, and "
                      f"work_dir={cfg.work_dir!r} is a bucket, where two runs could not update it safely: "
                      f"use a local work_dir for runs with a datapool")
    if cfg.report.n_example_images < 0:
        raise _refuse("report.n_example_images", cfg.report.n_example_images, "use an integer >= 0")
    if not cfg.report.memory_requirement_in_GB > 0:
        raise _refuse("report.memory_requirement_in_GB", cfg.report.memory_requirement_in_GB,
                      "use a size in GB > 0")


OUTPUT_IMAGE_FORMATS = ("png", "jpg", "jpeg", "webp", "bmp", "tiff")


def output_image_size(value: Any) -> Optional[tuple]:
    """None (keep), (shorter_edge,) or (height, width); raises for anything else."""
    if _is_int(value) and value == -1:
        return None
    if _is_int(value) and value >= 1:
        return (value,)
    if isinstance(value, (list, tuple)) or OmegaConf.is_list(value):
        items = list(value)
        if len(items) == 2 and all(_is_int(v) and v >= 1 for v in items):
            return (items[0], items[1])
    raise _refuse("output_image_size", value, "use -1 (as they are), an int for the shorter edge, or [h, w]")


def _validate_outputs(cfg: DictConfig) -> None:
    output_image_size(cfg.output_image_size)
    if str(cfg.output_image_format).lower() not in OUTPUT_IMAGE_FORMATS:
        raise _refuse("output_image_format", cfg.output_image_format,
                      f"choose from {', '.join(OUTPUT_IMAGE_FORMATS)}", OUTPUT_IMAGE_FORMATS)


def _validate_work_dir(work_dir: str) -> None:
    """Run directories are made under work_dir: its nearest existing folder must be writable."""
    if is_url(work_dir):
        check_protocol_installed("work_dir", work_dir)
        return
    path = Path(work_dir).absolute()
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is None or not existing.is_dir():
        raise _refuse("work_dir", str(work_dir), "it must be a folder (or creatable inside one)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise _refuse("work_dir", str(work_dir),
                      f"{existing} is not writable by uid {os.getuid()}: choose another work_dir, or in "
                      f"Docker run with --user \"$(id -u):$(id -g)\" and a writable /data/output mount")


def _validate_data(data: DictConfig, needs_input: bool) -> None:
    if data.image_size < 16:
        raise _refuse("data.image_size", data.image_size, "use an integer >= 16")
    _validate_augment(data.augment)
    if data.name == "shapes":
        if data.n_images < 3:
            raise _refuse("data.n_images", data.n_images, "use an integer >= 3 (one per class)")
        if data.shapes_image_size < 32:
            raise _refuse("data.shapes_image_size", data.shapes_image_size, "use an integer >= 32")
        if not 0 <= data.n_corrupt < data.n_images:
            raise _refuse("data.n_corrupt", data.n_corrupt,
                          f"use an integer in [0, data.n_images={data.n_images})")
    elif data.name in ("folder", "coco"):
        input_dir = Path(data.input_dir)
        if is_url(data.input_dir):
            check_protocol_installed("data.input_dir", data.input_dir)
        elif needs_input and not input_dir.is_dir():
            raise _refuse("data.input_dir", str(input_dir),
                          "it must be an existing folder of images (in Docker, mount it at /data/input)")
        relevant = data.relevant_filenames_file
        if needs_input and relevant and not is_url(relevant) and not Path(relevant).is_file():
            raise _refuse("data.relevant_filenames_file", relevant,
                          "it must be an existing text file, one image path per line relative to data.input_dir")
        if data.name == "coco" and needs_input and not Path(data.annotations).is_file():
            raise _refuse("data.annotations", data.annotations, "it must be an existing COCO JSON file")
    elif data.name == "oxford_pet":
        root = Path(data.root)
        if needs_input and not (root / "images").is_dir():
            raise _refuse("data.root", str(root), "it must hold the Oxford-IIIT Pet layout: images/, "
                          "annotations/xmls/ and annotations/trainval.txt")
        if data.classes not in ("species", "breed"):
            raise _refuse("data.classes", data.classes, "use species or breed", ("species", "breed"))
    else:
        raise _refuse("data.name", data.name, f"choose from {', '.join(DATA_FORMATS)}", DATA_FORMATS)


# fsspec protocols thresher reads and writes, and the extra that installs each one's filesystem.
URL_PROTOCOLS = {"s3": ("s3fs", "s3"), "s3a": ("s3fs", "s3"), "gs": ("gcsfs", "gcs"), "gcs": ("gcsfs", "gcs"),
                 "az": ("adlfs", "azure"), "abfs": ("adlfs", "azure"), "abfss": ("adlfs", "azure"),
                 "memory": (None, None)}
URL_PATTERN = re.compile(r"^(?P<protocol>[a-z][a-z0-9+.-]*)://")


def is_url(location: Any) -> bool:
    """An fsspec URL such as s3://bucket/prefix (a plain path is not one)."""
    return bool(URL_PATTERN.match(str(location or "")))


def check_protocol_installed(key: str, url: str) -> None:
    """A bucket URL needs its fsspec filesystem: say which extra installs it, before any work."""
    import importlib.util

    protocol = URL_PATTERN.match(url)["protocol"]
    if protocol not in URL_PROTOCOLS:
        raise _refuse(key, url, "use a folder or an s3://, gs:// or az:// URL", [f"{p}://" for p in URL_PROTOCOLS])
    module, extra = URL_PROTOCOLS[protocol]
    if module and importlib.util.find_spec(module) is None:
        raise UserError(f"{key}={url!r} needs {module}, which is not installed: pip install 'thresher[{extra}]' "
                        f"(in Docker, build with --build-arg EXTRAS={extra})")


def shapes_cache_dir() -> Path:
    """Where generated datasets live: $THRESHER_CACHE_DIR, else $XDG_CACHE_HOME/thresher."""
    if os.environ.get("THRESHER_CACHE_DIR"):
        return Path(os.environ["THRESHER_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "thresher"
