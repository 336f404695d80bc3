"""Typed configuration: the schemas Hydra composes against, and the checks that refuse a bad run.

Everything here is importable without torch, so composing and checking a config stays fast and a
user error is reported before any heavy work starts.
"""
from __future__ import annotations

import difflib
import math
import os
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

STAGES = ("scan", "embed", "select", "train")
SAMPLER_METHODS = ("coreset", "random", "none")
# Classifiers the training stage can build, by torchvision name (checked without importing it).
CLASSIFIERS = (
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "mobilenet_v3_small", "mobilenet_v3_large", "mobilenet_v2",
    "efficientnet_b0", "efficientnet_b1", "efficientnet_b2", "efficientnet_b3",
    "convnext_tiny", "regnet_y_400mf", "shufflenet_v2_x1_0",
)
OPTIMIZERS = ("SGD", "Adam", "AdamW", "RMSprop", "Adagrad", "Adadelta", "Adamax", "NAdam", "RAdam")
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
    weights: Optional[str] = None


@dataclass
class ShapesDataConfig:
    name: str = "shapes"
    n_images: int = 300
    shapes_image_size: int = 96
    n_corrupt: int = 0
    image_size: int = 64


@dataclass
class FolderDataConfig:
    name: str = "folder"
    input_dir: str = "/data/input"
    image_size: int = 64
    # A file naming the images to use, one path per line relative to input_dir; no folder walk.
    relevant_filenames_file: Optional[str] = None


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


@dataclass
class HardwareConfig:
    device: str = "auto"
    # None: none on the CPU (worker processes only compete with compute there), one per core
    # (at most 8) on CUDA; -1: one per core.
    num_workers: Optional[int] = None


@dataclass
class TrainerConfig:
    epochs: int = 3
    batch_size: int = 32
    optimizer: str = "AdamW"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    val_fraction: float = 0.2


@dataclass
class ThresherConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: Any = MISSING
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
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
    remove_exact_duplicates: bool = True
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
    """`run_directory` (relative to work_dir unless absolute) or `<work_dir>/<UTC stamp>_<note>`."""
    if run_directory:
        return str(Path(work_dir) / run_directory)  # an absolute run_directory wins the join
    note = safe_note(note)
    return str(Path(work_dir) / (f"{run_stamp()}_{note}" if note else run_stamp()))


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("thresher_run_dir"):
        OmegaConf.register_new_resolver("thresher_run_dir", run_directory_path)


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
    for key, allowed in unknown_keys(cfg):
        raise UserError(f"{key}: no such key{did_you_mean(key, allowed)}")
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
    _validate_bring_your_own(cfg)
    _validate_outputs(cfg)

    trainer = cfg.trainer
    if trainer.epochs < 1:
        raise _refuse("trainer.epochs", trainer.epochs, "use an integer >= 1")
    if trainer.batch_size < 1:
        raise _refuse("trainer.batch_size", trainer.batch_size, "use an integer >= 1")
    if not trainer.lr > 0:
        raise _refuse("trainer.lr", trainer.lr, "use a learning rate > 0")
    if trainer.weight_decay < 0:
        raise _refuse("trainer.weight_decay", trainer.weight_decay, "use a value >= 0")
    if not 0 <= trainer.val_fraction < 1:
        raise _refuse("trainer.val_fraction", trainer.val_fraction, "use a fraction in [0, 1)")
    if trainer.optimizer not in OPTIMIZERS:
        raise _refuse("trainer.optimizer", trainer.optimizer,
                      f"choose a torch.optim name: {', '.join(OPTIMIZERS)}", OPTIMIZERS)

    if not DEVICE_PATTERN.match(str(cfg.hardware.device)):
        raise _refuse("hardware.device", cfg.hardware.device, "use auto, cpu, cuda, cuda:N or mps",
                      ["auto", "cpu", "cuda", "mps"])
    if cfg.hardware.num_workers is not None and cfg.hardware.num_workers < -1:
        raise _refuse("hardware.num_workers", cfg.hardware.num_workers,
                      "use an integer >= 0, -1 for one per CPU core, or null for automatic")

    if cfg.model.name not in CLASSIFIERS:
        raise _refuse("model.name", cfg.model.name,
                      f"choose a torchvision classifier: {', '.join(CLASSIFIERS)}", CLASSIFIERS)
    weights = cfg.model.weights
    if weights and not WEIGHTS_NAME_PATTERN.match(weights) and not Path(weights).is_file():
        raise _refuse("model.weights", weights,
                      "use null, an existing state-dict file, or a torchvision weights name "
                      "such as ResNet18_Weights.IMAGENET1K_V1")

    _validate_data(cfg.data, needs_input="scan" in stages or cfg.sanity_check)
    _validate_work_dir(cfg.work_dir)
    if cfg.overwrite and cfg.resume:
        raise _refuse("resume", True, "choose overwrite=true or resume=true, not both")


def _validate_bring_your_own(cfg: DictConfig) -> None:
    for key in ("embeddings", "checkpoint"):
        value = cfg[key]
        if value and not Path(value).is_file():
            raise _refuse(key, value, "it must be an existing file (in Docker, under a mounted folder)")
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
    if data.name == "shapes":
        if data.n_images < 3:
            raise _refuse("data.n_images", data.n_images, "use an integer >= 3 (one per class)")
        if data.shapes_image_size < 32:
            raise _refuse("data.shapes_image_size", data.shapes_image_size, "use an integer >= 32")
        if not 0 <= data.n_corrupt < data.n_images:
            raise _refuse("data.n_corrupt", data.n_corrupt,
                          f"use an integer in [0, data.n_images={data.n_images})")
    elif data.name == "folder":
        input_dir = Path(data.input_dir)
        if needs_input and not input_dir.is_dir():
            raise _refuse("data.input_dir", str(input_dir),
                          "it must be an existing folder of images (in Docker, mount it at /data/input)")
        relevant = data.relevant_filenames_file
        if needs_input and relevant and not Path(relevant).is_file():
            raise _refuse("data.relevant_filenames_file", relevant,
                          "it must be an existing text file, one image path per line relative to data.input_dir")
    else:
        raise _refuse("data.name", data.name, "choose shapes or folder", ["shapes", "folder"])


def shapes_cache_dir() -> Path:
    """Where generated datasets live: $THRESHER_CACHE_DIR, else $XDG_CACHE_HOME/thresher."""
    if os.environ.get("THRESHER_CACHE_DIR"):
        return Path(os.environ["THRESHER_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "thresher"
