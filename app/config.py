"""Typed configuration: the schema Hydra composes against, and the checks that refuse a bad run.

Each package keeps its own schemas and their checks beside it: app/data/schema.py (data,
augment), app/sampling/schema.py (sampler, ssl, datapool, report, the dump), app/train/schema.py
(trainer, hardware, logger), app/profile/schema.py (profile), app/scoring/schema.py (scorer).
Here: ThresherConfig, which composes them with the run's top-level keys and the model, their
registration with Hydra, the run-directory resolvers, and `validate`, which calls each package's
checks in turn. Everything here is importable without torch, so composing and checking a config
stays fast and a user error is reported before any heavy work starts.
"""
from __future__ import annotations

import csv
import os
import re
import zipfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from app.config_checks import did_you_mean, refuse
from app.data.locations import is_url, staging_dir
from app.data.schema import (CocoDataConfig, FolderDataConfig, OxfordPetDataConfig, ShapesDataConfig,
                             check_protocol_installed, has_validation_data, validate_data,
                             validate_validation_split)
from app.errors import UserError
from app.executors.schema import ExecutorConfig, RayConfig, validate_executor
from app.profile.schema import ProfileConfig, validate_profile
from app.sampling.samplers import can_use_embeddings, needs_embeddings, registry as sampler_registry
from app.sampling.schema import (SSL_WEIGHTS, DatapoolConfig, ReportConfig, SamplerConfig, SSLConfig,
                                 uses_no_embeddings,
                                 validate_datapool, validate_outputs, validate_report, validate_sampler,
                                 validate_sampler_needs, validate_ssl)
from app.scoring.schema import ScorerConfig, validate_scorer
from app.train.schema import (HardwareConfig, LoggerConfig, TrainerConfig, validate_hardware, validate_key_metric,
                              validate_logger, validate_trainer)
from app.train.tasks import TASKS
from app.train.tasks.base import WEIGHTS_NAME_PATTERN

# The order stages run in; `profile` measures what `train` would do, so it goes first.
STAGES = ("scan", "embed", "score", "select", "profile", "train")
# Per model.task, from its spec in app.train.tasks (read without importing torch): the torchvision
# models it builds; the validation metrics it reports, higher is better, the first the default
# trainer.key_metric (every task also reports train_loss, lower is better); the data options that
# carry its labels.
TASK_MODELS = {task: spec.model_names for task, spec in TASKS.items()}
TASK_METRICS = {task: spec.metrics for task, spec in TASKS.items()}
TASK_DATA = {task: spec.data_formats for task, spec in TASKS.items()}
# The embed stage builds the classification task's torchvision classifiers.
CLASSIFIERS = TASK_MODELS["classification"]


# ---------------------------------------------------------------------------------------------
# Schemas
# ---------------------------------------------------------------------------------------------
@dataclass
class ModelConfig:
    """Kept here, beside the run's keys: the embed, train and profile stages all read it, and its
    checks read every task's spec (app.train.tasks)."""
    name: str = "resnet18"
    # classification, detection or keypoints; the number of classes comes from the data.
    task: str = "classification"
    # null (random initialisation), a torchvision weights name read from $TORCH_HOME, a path, or
    # ssl: the self-supervised backbone that enable_training=true trains (checkpoints/ssl_backbone.pt;
    # same architecture as the embedding model). enable_training alone changes only the embeddings.
    weights: Optional[str] = None


@dataclass
class CorruptnessCheckConfig:
    # Video frames scoring above this (0: clean, 1: unusable) are corrupt: decoder-flagged frames
    # score 1, a frame whose lower part is one flat fill (a partly decoded frame) its share of rows.
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
class ThresherConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: Any = MISSING
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    # Where scan, embed and the coreset run: executor=local (here) or executor=ray (the ray.* cluster).
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    # Run directories go under work_dir (conf/config.yaml reads $THRESHER_WORK_DIR, else runs),
    # named <UTC timestamp>_<note>, unless run_directory is set.
    work_dir: str = "runs"
    note: str = ""
    run_directory: Optional[str] = None
    # Existing finished run in run_directory: refuse, unless one of these says what to do.
    overwrite: bool = False
    resume: bool = False
    seed: int = 0
    # Read from a secret: ${secret:THRESHER_TOKEN,null} in conf/config.yaml; never written or printed.
    token: Optional[str] = None
    # The stages to run, in pipeline order; profile is left out unless named.
    stages: List[str] = field(default_factory=lambda: ["scan", "embed", "score", "select", "train"])
    # Check the install, the input and output folders and the device, then exit.
    sanity_check: bool = False
    # The Lightly Worker's selection switches, under their names.
    enable_corruptness_check: bool = True
    corruptness_check: CorruptnessCheckConfig = field(default_factory=CorruptnessCheckConfig)
    # Identical files (same bytes): the first in name order stays, the rest are listed as duplicates.
    remove_exact_duplicates: bool = True
    datasource: DatasourceConfig = field(default_factory=DatasourceConfig)
    # fsspec options per protocol (s3, gs, az) for bucket URLs in data.input_dir and work_dir;
    # credentials come in as ${secret:NAME} (their defaults are in conf/config.yaml); null values
    # are left out.
    storage_options: Dict[str, Any] = field(default_factory=dict)
    # Bring your own: a lightly-format embeddings CSV (skips embedding) and backbone weights for it.
    embeddings: Optional[str] = None
    checkpoint: Optional[str] = None
    # Train the embedding backbone self-supervised (SimCLR, with lightly) on the input first.
    enable_training: bool = False
    ssl: SSLConfig = field(default_factory=SSLConfig)
    # A named pool keeps every selection in <work_dir>/datapool/<name>/; later runs select what is
    # new and far from it.
    datapool: DatapoolConfig = field(default_factory=DatapoolConfig)
    # Copy the selected images to <run>/sampled/, resized by output_image_size in output_image_format.
    dump_dataset: bool = False
    # -1: as they are; an int: the shorter edge; [h, w]: exactly that size.
    output_image_size: Any = -1
    output_image_format: str = "png"
    dump_sampled_embeddings: bool = True
    report: ReportConfig = field(default_factory=ReportConfig)
    # Active-learning scores from a trained checkpoint (the score stage; scorer=none skips it).
    scorer: ScorerConfig = field(default_factory=ScorerConfig)


def register_configs() -> None:
    """Put the schemas where the yaml files' defaults lists find them: at the top of the config
    store, outside the groups, so that `--help`, Hydra's lists of options and tab completion show
    only the YAML options. conf/data/shapes.yaml types itself with `- /data_shapes_schema@_here_`
    (`@_here_`: the schema's keys go to the YAML's own package, `data`)."""
    store = ConfigStore.instance()
    store.store(name="thresher_schema", node=ThresherConfig)
    store.store(name="scorer_schema", node=ScorerConfig)  # one schema for every conf/scorer option
    store.store(name=schema_name("data", "shapes"), node=ShapesDataConfig)
    store.store(name=schema_name("data", "folder"), node=FolderDataConfig)
    store.store(name=schema_name("data", "coco"), node=CocoDataConfig)
    store.store(name=schema_name("data", "oxford_pet"), node=OxfordPetDataConfig)
    for name, sampler in sampler_registry().items():
        store.store(name=schema_name("sampler", name), node=sampler.schema or SamplerConfig)


def schema_name(group: str, option: str) -> str:
    """The config-store name of the schema that conf/<group>/<option>.yaml names first in its
    defaults list, as `- /<group>_<option>_schema@_here_`."""
    return f"{group}_{option}_schema"


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
    stage (app.data.locations.staging_dir)."""
    if is_url(work_dir):
        work_dir = str(staging_dir(str(work_dir)))
    if run_directory:
        return str(Path(work_dir) / run_directory)  # an absolute run_directory wins the join
    note = safe_note(note)
    return str(Path(work_dir) / (f"{run_stamp()}_{note}" if note else run_stamp()))


def resolve_run_directory(work_dir: str, note: Optional[str], run_directory: Optional[str]) -> str:
    """hydra.run.dir and hydra.sweep.dir: absolute, so that a job run in another process or on
    another machine (hydra/launcher=ray, joblib) writes where the command was started."""
    return os.path.abspath(run_directory_path(work_dir, note, run_directory))


def register_resolvers() -> None:
    from app.secrets import register_secret_resolver

    if not OmegaConf.has_resolver("thresher_run_dir"):
        # Cached in the config: Hydra copies the sweep's cache into each job's config, so every job
        # gets the folder the sweep resolved at its start, whichever process resolves it again.
        OmegaConf.register_new_resolver("thresher_run_dir", resolve_run_directory, use_cache=True)
    register_secret_resolver()


# ---------------------------------------------------------------------------------------------
# Checks that the schema cannot express: each package's own (its schema module), called in turn
# ---------------------------------------------------------------------------------------------
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
            raise refuse("stages", stage, f"choose from {', '.join(STAGES)}", STAGES)
    if not stages:
        raise refuse("stages", stages, f"name at least one of {', '.join(STAGES)}")
    if len(set(stages)) != len(stages):
        raise refuse("stages", stages, "name each stage once")

    validate_sampler(cfg.sampler)
    validate_sampler_needs(cfg)
    threshold = cfg.corruptness_check.corruption_threshold
    if not 0 <= threshold <= 1:
        raise refuse("corruptness_check.corruption_threshold", threshold, "use a score in [0, 1]")
    _validate_bring_your_own(cfg)
    validate_outputs(cfg)

    validate_trainer(cfg.trainer, cfg.model.task)
    validate_hardware(cfg.hardware)
    _validate_model(cfg.model, cfg.sampler.embedding_model)
    if cfg.model.weights == SSL_WEIGHTS:
        _validate_ssl_weights(cfg)
    validate_scorer(cfg.scorer, cfg.model.task, _validate_torch_file)
    if cfg.trainer.key_metric is not None:
        validate_key_metric(cfg.trainer, cfg.model.task, held_out=has_validation_data(cfg.data))
    validate_logger(cfg.logger)
    validate_executor(cfg.executor, cfg.ray)
    if "profile" in stages:
        validate_profile(cfg.profile)

    validate_data(cfg.data, needs_input="scan" in stages or "profile" in stages or cfg.sanity_check)
    validate_validation_split(cfg)
    if trains(cfg):
        _validate_task_data(cfg.model.task, cfg.data.name)
    if cfg.hardware.node_rank > 0 and stages != ["train"]:
        raise refuse("stages", stages, f"on hardware.node_rank={cfg.hardware.node_rank} only training runs: "
                     f"select on node 0 first, then use stages=[train] with the same run_directory")
    _validate_work_dir(cfg.work_dir)
    if cfg.overwrite and cfg.resume:
        raise refuse("resume", True, "choose overwrite=true or resume=true, not both")


def trains(cfg: DictConfig) -> bool:
    """Whether the run trains a model: the train stage, or the profile stage in train mode."""
    stages = list(cfg.stages)
    return "train" in stages or ("profile" in stages and cfg.profile.mode == "train")


def _validate_model(model: DictConfig, embedding_model: Optional[str]) -> None:
    if model.task not in TASK_MODELS:
        raise refuse("model.task", model.task, f"choose from {', '.join(TASK_MODELS)}", TASK_MODELS)
    allowed = TASK_MODELS[model.task]
    if model.name not in allowed:
        other = next((task for task, names in TASK_MODELS.items() if model.name in names), None)
        hint = f" ({model.name} is a {other} model: set model.task={other})" if other else ""
        raise UserError(f"model.name={model.name!r} is not allowed: choose a torchvision {model.task} model: "
                        f"{', '.join(allowed)}{hint or did_you_mean(model.name, allowed)}")
    weights = model.weights
    if weights == SSL_WEIGHTS:
        pass  # the run's own SSL backbone: _validate_ssl_weights checks it
    elif weights and (Path(weights).exists() or not WEIGHTS_NAME_PATTERN.match(weights)):
        _validate_torch_file("model.weights", weights, "use null, an existing state-dict file, or a torchvision "
                             "weights name such as ResNet18_Weights.IMAGENET1K_V1")
    if embedding_model is not None and embedding_model not in CLASSIFIERS:
        raise refuse("sampler.embedding_model", embedding_model,
                     f"choose a torchvision classifier: {', '.join(CLASSIFIERS)}, or null", CLASSIFIERS)


def _validate_ssl_weights(cfg: DictConfig) -> None:
    """model.weights=ssl starts from this run's SSL backbone (checkpoints/ssl_backbone.pt): it
    must be the same architecture, and enable_training makes it, or an earlier run left it."""
    from app.artifacts import SSL_CHECKPOINT

    if cfg.model.name not in CLASSIFIERS:
        raise refuse("model.weights", SSL_WEIGHTS, f"the SSL backbone is a classifier's; model.name="
                     f"{cfg.model.name} needs null, a state-dict file or a torchvision weights name")
    ssl_model = embedding_model_name(cfg)
    if ssl_model != cfg.model.name:
        raise refuse("model.weights", SSL_WEIGHTS, f"the SSL backbone is sampler.embedding_model={ssl_model}, "
                     f"not model.name={cfg.model.name}: set sampler.embedding_model=null or the same model")
    if cfg.enable_training:
        return
    found = None
    if cfg.run_directory and not is_url(cfg.work_dir):
        found = Path(run_directory_path(cfg.work_dir, cfg.note, cfg.run_directory)) / SSL_CHECKPOINT
    if found is None or not found.is_file():
        where = f"{found} does not exist" if found is not None else "a new run directory has none"
        raise refuse("model.weights", SSL_WEIGHTS, f"it needs the run directory's {SSL_CHECKPOINT} ({where}): "
                     f"set enable_training=true to train it, or run_directory= a run that did")


def _validate_task_data(task: str, data_name: str) -> None:
    if data_name not in TASK_DATA[task]:
        raise UserError(f"data={data_name} has no {task} labels: model.task={task} trains on data="
                        f"{' or data='.join(TASK_DATA[task])}")


def embedding_model_name(cfg: DictConfig) -> str:
    """The classifier that embeds the images for selection."""
    if cfg.sampler.embedding_model:
        return cfg.sampler.embedding_model
    # model.name is a classifier exactly when model.task is classification (validate checks it)
    return cfg.model.name if cfg.model.name in CLASSIFIERS else "resnet18"


EXISTING_FILE = "it must be an existing file (in Docker, under a mounted folder)"


def _validate_torch_file(key: str, value: str, missing: str = EXISTING_FILE) -> None:
    """Weights are read only in the embed or train stage: refuse a file torch cannot load now, by
    its first bytes. torch.save writes a zip archive holding data.pkl (a pickle before torch 1.6)."""
    path = Path(value)
    if not path.is_file():
        raise refuse(key, value, missing)
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
                raise refuse(key, value, "the file is empty; use a state dict saved with torch.save")
    except (OSError, zipfile.BadZipFile) as error:
        raise refuse(key, value, f"it cannot be read: {getattr(error, 'strerror', None) or error}") from None
    raise refuse(key, value, "it is not a PyTorch file (torch.save writes a zip archive holding data.pkl); "
                 "use a state dict saved with torch.save")


def _validate_embeddings_file(value: str) -> None:
    """An embeddings file is read in the embed stage, after the scan: refuse one that is not a
    lightly CSV by its header now (the embed stage checks every row)."""
    from app.sampling.embeddings_io import is_embeddings_header

    path = Path(value)
    if not path.is_file():
        raise refuse("embeddings", value, EXISTING_FILE)
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            header = next(csv.reader(handle), None)
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise refuse("embeddings", value, f"it is not a readable CSV file ({type(error).__name__}: {error}); "
                     "expected the lightly format filenames,embedding_0,...,labels") from None
    if not is_embeddings_header(header or ()):
        shown = ",".join((header or [])[:3]) + (",..." if len(header or ()) > 3 else "")
        raise UserError(f"embeddings={value!r} is malformed at line 1: the header must be "
                        f"filenames,embedding_0,...,embedding_{{D-1}},labels, not {shown or 'an empty line'}")


def _validate_bring_your_own(cfg: DictConfig) -> None:
    if cfg.embeddings:
        _validate_embeddings_file(cfg.embeddings)
    if cfg.checkpoint:
        _validate_torch_file("checkpoint", cfg.checkpoint)
    if cfg.embeddings and not can_use_embeddings(cfg.sampler.method):
        raise refuse("embeddings", cfg.embeddings, uses_no_embeddings(cfg.sampler.method))
    if cfg.enable_training:
        if cfg.embeddings:
            raise refuse("enable_training", True, "it trains the backbone that makes the embeddings, so it "
                         "cannot be combined with embeddings=...; drop one of them")
        if not needs_embeddings(cfg):  # sampler=random: unless a datapool or near duplicates use them
            raise refuse("enable_training", True, uses_no_embeddings(cfg.sampler.method))
        validate_ssl(cfg.ssl)
    validate_datapool(cfg.datapool, cfg.work_dir)
    validate_report(cfg.report)


def _validate_work_dir(work_dir: str) -> None:
    """Run directories are made under work_dir: its nearest existing folder must be writable."""
    if is_url(work_dir):
        check_protocol_installed("work_dir", work_dir)
        return
    path = Path(work_dir).absolute()
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is None or not existing.is_dir():
        raise refuse("work_dir", str(work_dir), "it must be a folder (or creatable inside one)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise refuse("work_dir", str(work_dir),
                     f"{existing} is not writable by uid {os.getuid()}: choose another work_dir; in Docker, "
                     f"run as a user who can write the /data/output mount: docker run --user "
                     f"\"$(id -u):$(id -g)\", or docker-compose with THRESHER_USER=\"$(id -u):$(id -g)\"")


