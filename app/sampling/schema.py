"""The selection's schemas (sampler, ssl, datapool, report, and the dump of the selected images)
and their checks, with the sampler budget parsed once (Budget). Importable without torch, like
app.config, which composes these into ThresherConfig and calls the checks."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from app.config_checks import is_int, one_of, refuse
from app.data.locations import is_url
from app.errors import UserError
from app.sampling.samplers import can_use_embeddings, get_sampler, needs_scores, registry as sampler_registry

OUTPUT_IMAGE_FORMATS = ("png", "jpg", "jpeg", "webp", "bmp", "tiff")
# sampler.balance: the labels the budget is split by (app.sampling.balance); null: off.
BALANCES = ("known", "predicted")
SSL_OPTIMIZERS = ("adamw", "sgd")
# model.weights=ssl: start from the run's self-supervised backbone (enable_training=true).
SSL_WEIGHTS = "ssl"


@dataclass
class StoppingCondition:
    # int >= 1 (a count), float in (0, 1] (a fraction) or -1 (off); Any keeps int and float apart.
    n_samples: Any = -1
    min_distance: float = -1.0


@dataclass
class SamplerConfig:
    """The keys every sampler has; a sampler with keys of its own derives its schema from this
    (app/sampling/samplers/__init__.py says how)."""
    method: str = "coreset"
    stopping_condition: StoppingCondition = field(default_factory=StoppingCondition)
    # Frames of one folder, in name order, are picked in runs of this length (1: single images).
    selected_sequence_length: int = 1
    # Before selecting, drop images closer than this to an earlier kept image; -1 for off.
    near_duplicate_distance: float = -1.0
    normalize_embeddings: bool = True
    # Images per forward pass of the embedding model: each batch has a fixed cost, and 64 made the
    # local embed 1.5x slower than 256 on 2 CPU cores at 24 px (BENCHMARKS.md).
    batch_size: int = 256
    # The classifier whose penultimate layer embeds the images; null: model.name when that is a
    # classifier, else resnet18.
    embedding_model: Optional[str] = None
    # Split the budget equally over the classes: known (the class folders), predicted (the score
    # stage's predicted_label), or null (off). app/sampling/balance.py.
    balance: Optional[str] = None


@dataclass
class DatapoolConfig:
    # A name keeps the selection in <work_dir>/datapool/<name>/ across runs; null: no pool.
    name: Optional[str] = None
    keep_history: bool = True


@dataclass
class SSLConfig:
    """Self-supervised training of the embedding backbone (enable_training=true). The defaults
    bring SimCLR's loss well below its no-learning level log(2*batch_size-1) on a few thousand
    small (32 px) images in minutes on a CPU; the log says how far it fell."""
    method: str = "simclr"
    epochs: int = 20
    batch_size: int = 64
    # adamw, or sgd (momentum 0.9, weight decay 5e-4; it needs a larger lr, e.g. 0.06 to 0.5).
    optimizer: str = "adamw"
    # The peak learning rate, reached after warmup_epochs (at most ssl.epochs) of linear warmup, then a
    # cosine decay to 0.
    lr: float = 0.001
    weight_decay: float = 1e-4  # adamw's
    warmup_epochs: int = 1
    temperature: float = 0.2
    projection_dim: int = 128
    # The smallest random crop, as a share of the image's area (lightly's default 0.08 is for 224 px).
    min_scale: float = 0.2


@dataclass
class ReportConfig:
    n_example_images: int = 6
    memory_requirement_in_GB: float = 2.0
    # A plot of which frames of each input video were selected (the Lightly Worker's name).
    show_video_sampling_timeline: bool = True


@dataclass(frozen=True)
class Budget:
    """sampler.stopping_condition.n_samples, parsed once: at most `count` images, a `fraction` of
    the candidates, or neither (off: all of them)."""
    count: Optional[int] = None
    fraction: Optional[float] = None

    @classmethod
    def parse(cls, n_samples: Any) -> "Budget":
        """An int >= 1 is a count, a float in (0, 1] a fraction, -1 (or -1.0) off; raises UserError
        for anything else."""
        if is_int(n_samples) and n_samples == -1:
            return cls()
        if is_int(n_samples) and n_samples >= 1:
            return cls(count=n_samples)
        if isinstance(n_samples, float) and math.isfinite(n_samples):
            if n_samples == -1.0:
                return cls()
            if 0.0 < n_samples <= 1.0:
                return cls(fraction=n_samples)
        raise refuse("sampler.stopping_condition.n_samples", n_samples,
                     "use a count (an integer >= 1), a fraction in (0, 1], or -1 for off")

    @property
    def is_off(self) -> bool:
        return self.count is None and self.fraction is None

    def count_for(self, n_candidates: int) -> int:
        """How many of `n_candidates` to select: the count (all when there are fewer), the fraction
        rounded down but at least 1, or all when off."""
        if self.fraction is not None:
            # floor, as a fraction of a budget should not round up; the epsilon absorbs 0.29 * 100 = 28.999...
            return max(1, int(self.fraction * n_candidates + 1e-9))
        if self.count is not None:
            return min(self.count, n_candidates)
        return n_candidates


def validate_sampler(sampler: DictConfig) -> None:
    """The keys every sampler has, what the chosen sampler declares it uses (app.sampling.samplers),
    then its own checks."""
    samplers = sampler_registry()
    if sampler.method not in samplers:
        raise refuse("sampler.method", sampler.method, f"choose from {', '.join(samplers)}", samplers)
    spec = samplers[sampler.method]
    Budget.parse(sampler.stopping_condition.n_samples)
    min_distance = sampler.stopping_condition.min_distance
    if not (min_distance == -1 or (math.isfinite(min_distance) and min_distance >= 0)):
        raise refuse("sampler.stopping_condition.min_distance", min_distance,
                     "use a distance >= 0, or -1 for off")
    if min_distance >= 0 and not spec.uses_min_distance:
        users = one_of([f"sampler={name}" for name, other in samplers.items() if other.uses_min_distance])
        raise refuse("sampler.stopping_condition.min_distance", min_distance,
                     f"it applies to {users} only, not sampler={sampler.method}; use -1")
    if sampler.batch_size < 1:
        raise refuse("sampler.batch_size", sampler.batch_size, "use an integer >= 1")
    near = sampler.near_duplicate_distance
    if not (near == -1 or (math.isfinite(near) and near > 0)):
        raise refuse("sampler.near_duplicate_distance", near, "use a distance > 0, or -1 for off")
    if near > 0 and not can_use_embeddings(sampler.method):
        raise refuse("sampler.near_duplicate_distance", near,
                     f"it needs embeddings; sampler={sampler.method} has none")
    if sampler.selected_sequence_length < 1:
        raise refuse("sampler.selected_sequence_length", sampler.selected_sequence_length,
                     "use an integer >= 1 (1 selects single images)")
    if sampler.balance is not None:
        if sampler.balance not in BALANCES:
            raise refuse("sampler.balance", sampler.balance, "choose known (the class folders' labels), predicted "
                         "(the scorer's predicted labels) or null (off)", BALANCES)
        if Budget.parse(sampler.stopping_condition.n_samples).is_off:
            raise refuse("sampler.balance", sampler.balance, "it splits the budget over the classes, and "
                         "sampler.stopping_condition.n_samples is off (-1): set a budget, or sampler.balance=null")
    if spec.check is not None:
        spec.check(sampler)


def validate_sampler_needs(cfg: DictConfig) -> None:
    """What the sampler, and sampler.balance, need from the rest of the run: scores need the
    score stage: a scorer and its checkpoint."""
    if not needs_scores(cfg):
        return
    asks = (f"sampler={cfg.sampler.method}" if get_sampler(cfg.sampler.method).needs_scores
            else "sampler.balance=predicted")
    checkpoint = "scorer.checkpoint=<a trained checkpoint, e.g. an earlier run's checkpoints/best.pt>"
    if OmegaConf.select(cfg, "scorer.method", default="none") in (None, "none"):
        raise UserError(f"{asks} needs scores: set a scorer and its checkpoint, e.g. scorer=least_confidence "
                        f"{checkpoint}")
    if not OmegaConf.select(cfg, "scorer.checkpoint", default=None):
        raise UserError(f"{asks} needs scores: set {checkpoint}")


def uses_no_embeddings(method: str) -> str:
    users = one_of([name for name, spec in sampler_registry().items() if spec.needs_embeddings])
    if can_use_embeddings(method):  # it could, but nothing in this run asks for them
        return (f"sampler={method} picks without embeddings and nothing else uses them here "
                f"(sampler.near_duplicate_distance, datapool.name would); choose {users}")
    return f"sampler={method} uses no embeddings; choose {users}"


def output_image_size(value: Any) -> Optional[tuple]:
    """None (keep), (shorter_edge,) or (height, width); raises for anything else."""
    if is_int(value) and value == -1:
        return None
    if is_int(value) and value >= 1:
        return (value,)
    if isinstance(value, (list, tuple)) or OmegaConf.is_list(value):
        items = list(value)
        if len(items) == 2 and all(is_int(v) and v >= 1 for v in items):
            return (items[0], items[1])
    raise refuse("output_image_size", value, "use -1 (as they are), an int for the shorter edge, or [h, w]")


def validate_outputs(cfg: DictConfig) -> None:
    output_image_size(cfg.output_image_size)
    if str(cfg.output_image_format).lower() not in OUTPUT_IMAGE_FORMATS:
        raise refuse("output_image_format", cfg.output_image_format,
                     f"choose from {', '.join(OUTPUT_IMAGE_FORMATS)}", OUTPUT_IMAGE_FORMATS)


def validate_ssl(ssl: DictConfig) -> None:
    """Self-supervised training of the embedding backbone (enable_training=true)."""
    if ssl.method != "simclr":
        raise refuse("ssl.method", ssl.method, "choose simclr", ["simclr"])
    for key, minimum in (("epochs", 1), ("batch_size", 2), ("projection_dim", 1)):
        if ssl[key] < minimum:
            raise refuse(f"ssl.{key}", ssl[key], f"use an integer >= {minimum}")
    if ssl.optimizer not in SSL_OPTIMIZERS:
        raise refuse("ssl.optimizer", ssl.optimizer, f"choose {' or '.join(SSL_OPTIMIZERS)}", SSL_OPTIMIZERS)
    for key in ("lr", "temperature"):
        if not ssl[key] > 0:
            raise refuse(f"ssl.{key}", ssl[key], "use a value > 0")
    if ssl.weight_decay < 0:
        raise refuse("ssl.weight_decay", ssl.weight_decay, "use a value >= 0")
    if ssl.warmup_epochs < 0:
        raise refuse("ssl.warmup_epochs", ssl.warmup_epochs, "use an integer >= 0")
    if not 0 < ssl.min_scale <= 1:
        raise refuse("ssl.min_scale", ssl.min_scale, "use a share of the image's area in (0, 1]")


def validate_datapool(datapool: DictConfig, work_dir: str) -> None:
    if datapool.name is not None and not re.fullmatch(r"[A-Za-z0-9._-]+", str(datapool.name)):
        raise refuse("datapool.name", datapool.name, "use letters, digits, '.', '_' and '-'")
    if datapool.name is not None and is_url(work_dir):
        # A pool's updates rely on a file lock and atomic renames, which a bucket does not have.
        raise refuse("datapool.name", datapool.name, f"the datapool lives under work_dir, and "
                     f"work_dir={work_dir!r} is a bucket, where two runs could not update it safely: "
                     f"use a local work_dir for runs with a datapool")


def validate_report(report: DictConfig) -> None:
    if report.n_example_images < 0:
        raise refuse("report.n_example_images", report.n_example_images, "use an integer >= 0")
    if not report.memory_requirement_in_GB > 0:
        raise refuse("report.memory_requirement_in_GB", report.memory_requirement_in_GB,
                     "use a size in GB > 0")
