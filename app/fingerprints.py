"""What each stage depended on, so that a rerun reuses a finished stage only when nothing it read
has changed.

A stage's fingerprint covers the config keys it reads (the ones that change its result, not the
ones that only change its speed), the identity of the files those keys name (absolute path, size,
modification time, and a SHA-256 where the file is small enough to hash cheaply) and the
fingerprints of the stages whose artifacts it reads. It imports no torch: the runner computes it
before deciding what to run.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

from omegaconf import DictConfig, ListConfig, OmegaConf

# Files up to this size are hashed; larger ones are known by path, size and modification time.
HASH_LIMIT_BYTES = 256 * 2**20


@dataclass(frozen=True)
class StageDependencies:
    """The config keys a stage's result depends on, which of them name files, and the stages whose
    artifacts it reads. `excluded` keys are left out of a group named in `keys`."""

    keys: Tuple[str, ...]
    files: Tuple[str, ...] = ()
    after: Tuple[str, ...] = ()
    excluded: Tuple[str, ...] = ()


# hardware.*, logger.* and the loader settings change how fast a stage runs, not what it makes.
STAGE_DEPENDENCIES: Dict[str, StageDependencies] = {
    "scan": StageDependencies(
        keys=("data.name", "data.input_dir", "data.root", "data.relevant_filenames_file", "data.n_images",
              "data.shapes_image_size", "data.n_corrupt", "data.classes", "data.holdout_fraction",
              "enable_corruptness_check", "corruptness_check", "remove_exact_duplicates", "datasource"),
        files=("data.input_dir", "data.root", "data.relevant_filenames_file")),
    "embed": StageDependencies(
        keys=("data.image_size", "model.name", "model.weights", "sampler.embedding_model", "embeddings",
              "checkpoint", "enable_training", "ssl", "datapool.name", "seed"),
        files=("embeddings", "checkpoint", "model.weights"),
        after=("scan",)),
    "score": StageDependencies(
        # the checkpoint by its identity (path, size, mtime, content hash): retrained weights score again;
        # data.image_size and data.augment.resize: the validation transform the images are scored through
        keys=("scorer", "model.name", "model.task", "data.image_size", "data.augment.resize"),
        files=("scorer.checkpoint",),
        excluded=("scorer.batch_size",),
        after=("scan",)),
    "select": StageDependencies(
        keys=("sampler", "datapool", "dump_dataset", "output_image_size", "output_image_format",
              "dump_sampled_embeddings", "report", "seed"),
        excluded=("sampler.batch_size",),  # the embedding batch: the embed stage's speed
        after=("scan", "embed", "score")),
    "profile": StageDependencies(
        keys=("profile", "model", "trainer", "data.image_size", "data.augment", "hardware", "seed"),
        files=("model.weights",),
        after=("scan", "score", "select")),
    "train": StageDependencies(
        # trainer.epochs is left out: resume=true with more epochs trains a finished run on.
        keys=("model", "trainer", "data.image_size", "data.augment", "data.annotations", "data.classes",
              "data.val_input_dir", "seed"),
        files=("model.weights", "data.annotations", "trainer.val_filenames_file", "data.val_input_dir"),
        excluded=("trainer.epochs",),
        after=("scan", "score", "select")),
}


@dataclass(frozen=True)
class Fingerprint:
    """`digest` decides; `values` (one JSON-able value per dependency) explain what changed."""

    digest: str
    values: Dict[str, Any]


def stage_fingerprint(stage: str, cfg: DictConfig, upstream: Mapping[str, Optional[str]]) -> Fingerprint:
    """The fingerprint of `stage` under `cfg`, given the recorded fingerprints of earlier stages."""
    dependencies = STAGE_DEPENDENCIES[stage]
    values: Dict[str, Any] = {}
    for key in dependencies.keys:
        value = OmegaConf.select(cfg, key, default=None)
        if isinstance(value, (DictConfig, ListConfig)):
            value = OmegaConf.to_container(value, resolve=True)
            for excluded in dependencies.excluded:
                head, _, tail = excluded.partition(".")
                if head == key and isinstance(value, dict):
                    value.pop(tail, None)
        values[key] = file_identity(str(value)) if key in dependencies.files and value else value
    for key in dependencies.files:  # a file named inside a group (trainer.val_filenames_file)
        value = OmegaConf.select(cfg, key, default=None)
        if key not in dependencies.keys and value:
            values[f"{key} (file)"] = file_identity(str(value))
    for earlier in dependencies.after:
        if upstream.get(earlier):
            values[f"{earlier} stage"] = upstream[earlier]
    canonical = json.dumps(values, sort_keys=True, default=str)
    return Fingerprint(hashlib.sha256(canonical.encode("utf-8", "surrogateescape")).hexdigest()[:16], values)


def file_identity(location: str) -> Any:
    """A file or folder as a rerun can recognise it: a URL as written; a local path made absolute,
    with size, modification time and content hash for a file. A name that is not a path (a
    torchvision weights name) stays as it is."""
    from app.data.locations import is_url

    if is_url(location):
        return location
    path = Path(os.path.expanduser(location))
    try:
        stat = path.stat()
    except OSError:
        return {"path": str(path.absolute()), "exists": False} if ("/" in location or path.suffix) else location
    identity: Dict[str, Any] = {"path": str(path.absolute())}
    if path.is_file():
        identity.update(size=stat.st_size, mtime_ns=stat.st_mtime_ns)
        if stat.st_size <= HASH_LIMIT_BYTES:
            identity["sha256"] = sha256_of(path)
    return identity


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def describe_change(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> str:
    """'data.input_dir was '/a', now '/b'' for the first few dependencies that differ."""
    changed = changed_keys(recorded, current)
    if not changed:
        return "a value that is not shown (a secret) changed"
    parts = [f"the {key} made its artifacts again" if key.endswith(" stage")
             else f"{key} was {_shown(recorded.get(key))}, now {_shown(current.get(key))}" for key in changed[:3]]
    more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
    return "; ".join(parts) + more


def _shown(value: Any) -> str:
    if isinstance(value, dict) and "path" in value:
        details = ", ".join(f"{k} {v}" for k, v in value.items() if k in ("size", "exists"))
        return repr(value["path"]) + (f" ({details}, content {value.get('sha256', '?')[:8]})" if details else "")
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def changed_keys(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> List[str]:
    return [key for key in sorted(set(recorded) | set(current)) if recorded.get(key) != current.get(key)]
