"""Embed stage: the model's backbone turns every usable image into a vector, or a user's own
embeddings file (`embeddings=PATH`, lightly format) is checked and used instead.

With `executor=ray` the images are decoded and embedded on a Ray cluster
(app/executors/ray_embed.py); the artifacts are the same.

Writes the float32 matrix `data/embeddings.npy` row by row as it is computed, its rows' names and
labels in `data/embedding_rows.csv`, and the lightly CSV `data/embeddings.csv` beside them.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, List, Sequence, Tuple

import numpy as np
import torch
from omegaconf import DictConfig

from app import artifacts
from app.artifacts import EMBEDDING_MATRIX, EMBEDDING_MODEL, EMBEDDING_ROWS, EMBEDDINGS, EmbeddingModel
from app.config import embedding_model_name
from app.data.images import ImagesToEmbed, collate_pixels, make_loader, normalize_pixels
from app.device import loader_workers
from app.errors import UserError
from app.executors import executor_for
from app.models import build_backbone, weights_in_run
from app.progress import Progress
from app.sampling.embedding_matrix import EmbeddingsWriter, compact_rows, write_embeddings
from app.sampling.embeddings_io import read_embeddings_csv
from app.sampling.schema import SSL_WEIGHTS

log = logging.getLogger("thresher")

# (row indices, their float32 vectors, [(row, error)] of the images that failed to load, model seconds)
EmbeddedBatch = Tuple[np.ndarray, np.ndarray, List[Tuple[int, str]], float]


@dataclass
class EmbedResult:
    n_embedded: int
    embedding_dim: int
    images_per_s: float
    compute_efficiency: float = 0.0
    ssl_epochs: int = 0
    ssl_loss: List[float] = field(default_factory=list)
    # log(2*batch-1): SimCLR's loss when the backbone tells no two images apart.
    ssl_no_learning_loss: float = 0.0
    artifacts: List[str] = field(
        default_factory=lambda: [EMBEDDING_MATRIX, EMBEDDING_ROWS, EMBEDDINGS, EMBEDDING_MODEL])


def embed_stage(cfg: DictConfig, run_dir: Path, device: torch.device) -> EmbedResult:
    files, labels = artifacts.read_input_files(run_dir)
    if cfg.datapool.name:
        files, labels = not_yet_in_datapool(cfg, run_dir, files, labels)
    if cfg.embeddings:
        return use_given_embeddings(Path(cfg.embeddings), files, labels, run_dir)
    input_dir = artifacts.read_dataset(run_dir).location
    model_name = embedding_model_name(cfg)
    # The training model's weights fit the backbone only when it is that same classifier.
    weights = cfg.checkpoint or (cfg.model.weights if model_name == cfg.model.name else None)
    if weights == SSL_WEIGHTS:
        # model.weights=ssl: enable_training trains the SSL backbone from scratch here; without it,
        # the backbone an earlier run trained in this run directory makes the embeddings.
        weights = None if cfg.enable_training else weights_in_run(weights, run_dir)
    trains_it_too = "train" in cfg.stages and model_name == cfg.model.name and not cfg.model.weights
    from_scratch = (None if cfg.enable_training  # random on purpose: SSL trains it next
                    else "embeddings and training start from scratch" if trains_it_too
                    else "the embeddings are random features")
    model, dim = build_backbone(model_name, weights, "checkpoint" if cfg.checkpoint else "model.weights",
                                from_scratch=from_scratch)
    ssl_details = {}
    if cfg.enable_training:
        from app.sampling.ssl import train_backbone_simclr

        ssl_details = train_backbone_simclr(model, dim, cfg, input_dir, files, device, run_dir)
    artifacts.write_embedding_model(run_dir, EmbeddingModel(
        model=model_name, weights=weights, self_supervised_epochs=ssl_details.get("ssl_epochs", 0),
        randomly_initialised=not weights and not cfg.enable_training))
    executor = executor_for(cfg, run_dir)
    if executor.on_ray:
        from app.executors.ray_embed import embedded_batches_on_ray, embed_plan
        from app.executors.ray_session import connect

        parallel = embed_plan(executor, connect(executor.ray))["actors"]
        batches = embedded_batches_on_ray(executor, model_name, model.state_dict(), input_dir, files,
                                          cfg.data.image_size, cfg.sampler.batch_size,
                                          storage_options_for(cfg, input_dir))
    else:
        # channels_last: the convolutions' fast layout on the CPU (oneDNN) and on tensor cores.
        model.eval().to(device, memory_format=torch.channels_last)
        loader = make_loader(ImagesToEmbed(input_dir, files, cfg.data.image_size), cfg.sampler.batch_size,
                             loader_workers(cfg.hardware.num_workers, device), pin_memory=device.type == "cuda",
                             collate=collate_pixels)
        batches, parallel = embedded_batches(model, loader, device), 1
    writer = EmbeddingsWriter(run_dir, len(files), dim)
    try:
        embedded, failures, rate, efficiency = embed_into(writer, batches, len(files), parallel)
        for index, reason in failures:
            log.warning("image failed to load while embedding, skipped: %s (%s)", files[index], reason)
        artifacts.add_corrupt_files(run_dir, [(files[index], reason) for index, reason in failures])
        n_embedded = writer.finish(files, labels, embedded)
    except BaseException:
        writer.abandon()
        raise
    return EmbedResult(n_embedded=n_embedded, embedding_dim=dim, images_per_s=round(rate, 2),
                       compute_efficiency=round(efficiency if files else 0.0, 3), **ssl_details)


def embedded_batches(model: torch.nn.Module, loader, device: torch.device) -> Iterator[EmbeddedBatch]:
    """The model's vectors for every batch the loader gives, in this process."""
    with torch.inference_mode():
        for pixels, indices, failed in loader:
            vectors, spent = np.empty((0, 0), dtype=np.float32), 0.0
            if len(indices):
                images = normalize_pixels(pixels.to(device, non_blocking=True))
                began = time.perf_counter()
                vectors = model(images.contiguous(memory_format=torch.channels_last)).float().cpu().numpy()
                spent = time.perf_counter() - began
            yield indices.numpy(), vectors, failed, spent


def embed_into(writer: EmbeddingsWriter, batches: Iterable[EmbeddedBatch], n_files: int,
               parallel: int = 1) -> Tuple[np.ndarray, List[Tuple[int, str]], float, float]:
    """Write every embedded batch into the writer's rows; returns which rows were embedded, the
    (index, error) of the images that failed to load, images per second and compute efficiency."""
    embedded = np.zeros(n_files, dtype=bool)
    failures: List[Tuple[int, str]] = []
    # compute efficiency = model time / loop time (per model, with `parallel` models), as lightly
    # reports it: near 1 means the models are kept busy, near 0 means loading images is the
    # bottleneck (raise hardware.num_workers, or ray.num_cpus_per_task's share of the cluster).
    compute_s, efficiency, started = 0.0, 0.0, time.perf_counter()
    with Progress(n_files, "embed") as bar:
        for rows, vectors, failed, spent in batches:
            failures += failed
            if len(rows):
                writer.put(rows, vectors)
                embedded[rows] = True
            compute_s += spent
            efficiency = compute_s / max(parallel * (time.perf_counter() - started), 1e-9)
            bar.update(len(rows) + len(failed), eff=round(efficiency, 2))
        return embedded, failures, bar.rate, efficiency


def storage_options_for(cfg: DictConfig, location: str):
    """The run's bucket credentials for Ray workers that read the input from a bucket, else None."""
    from app.data.locations import is_url

    if not is_url(str(location)) or cfg.get("storage_options") is None:
        return None
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg.storage_options, resolve=True)


def not_yet_in_datapool(cfg: DictConfig, run_dir: Path, files: List[str], labels: Sequence[int]):
    """Images other runs put into the datapool are neither embedded again nor candidates again;
    this run's own earlier members are candidates again, since its new selection replaces them."""
    from app.sampling.datapool import datapool_folder, load_datapool, run_id_for

    pool = load_datapool(datapool_folder(cfg.work_dir, cfg.datapool.name))
    members = pool.without_run(run_id_for(run_dir)).members
    new = np.fromiter((name not in members for name in files), dtype=bool, count=len(files))
    if not new.all():
        log.info("datapool %s: %d images already in the pool are left out", cfg.datapool.name,
                 len(files) - int(new.sum()))
    if not new.any():
        raise UserError(f"every usable image is already in datapool {cfg.datapool.name!r}: nothing new to select")
    return [name for name, is_new in zip(files, new) if is_new], np.asarray(labels, dtype=np.int64)[new]


def use_given_embeddings(path: Path, files: List[str], labels: Sequence[int], run_dir: Path) -> EmbedResult:
    """Check a user's embeddings file and keep the rows of the images the scan found usable, in
    the scan's order."""
    import pyarrow.compute as pc

    given_files, vectors, _ = read_embeddings_csv(path, strict=True)
    # Each usable image's row in the file (null: none), matched in Arrow: no dict of a million names.
    row_of = pc.index_in(arrow_names(files), value_set=arrow_names(given_files))
    usable = np.flatnonzero(row_of.is_valid().to_numpy(zero_copy_only=False))
    rows = row_of.drop_null().to_numpy().astype(np.int64)
    unknown = len(given_files) - len(usable)
    del given_files
    if unknown:
        log.warning("embeddings=%s: %d rows name files that are not usable images here (corrupt, "
                    "duplicate, or not in the input): left out", path, unknown)
    if len(usable) < len(files):
        log.warning("embeddings=%s has no row for %d usable images: they are left out of the selection",
                    path, len(files) - len(usable))
    if not len(usable):
        raise UserError(f"embeddings={str(path)!r} names none of the {len(files)} usable images: are the "
                        f"file names relative to the input folder?")
    if vectors.flags.writeable and np.all(rows[1:] > rows[:-1]):  # in the scan's order: no second matrix
        kept = compact_rows(vectors, rows)
    else:
        kept = vectors[rows]
    write_embeddings(run_dir, [files[i] for i in usable], np.asarray(labels, dtype=np.int64)[usable], kept)
    return EmbedResult(n_embedded=len(usable), embedding_dim=int(vectors.shape[1]), images_per_s=0.0)


def arrow_names(names: Sequence[str]):
    """File names as an Arrow binary column, their bytes as on disk (a name that is not UTF-8 was
    read surrogate-escaped, which Arrow's strings refuse)."""
    import pyarrow as pa

    return pa.array((name.encode("utf-8", "surrogateescape") for name in names), pa.binary(), size=len(names))
