"""Embed stage: the model's backbone turns every usable image into a vector, or a user's own
embeddings file (`embeddings=PATH`, lightly format) is checked and used instead.

Writes `data/embeddings.csv` in the lightly format (filenames, embedding_0..D-1, labels).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Tuple

import numpy as np
import torch
from omegaconf import DictConfig

from app import artifacts
from app.artifacts import EMBEDDING_MODEL, EMBEDDINGS, EmbeddingModel
from app.config import embedding_model_name
from app.data.images import ImageFiles, image_transform, make_loader
from app.device import loader_workers
from app.errors import UserError
from app.models import build_backbone
from app.progress import Progress
from app.sampling.embeddings_io import read_embeddings_csv, write_embeddings_csv

log = logging.getLogger("thresher")


@dataclass
class EmbedResult:
    n_embedded: int
    embedding_dim: int
    images_per_s: float
    compute_efficiency: float = 0.0
    ssl_epochs: int = 0
    ssl_loss: List[float] = field(default_factory=list)
    artifacts: List[str] = field(default_factory=lambda: [EMBEDDINGS, EMBEDDING_MODEL])


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
    model, dim = build_backbone(model_name, weights, "checkpoint" if cfg.checkpoint else "model.weights")
    ssl_details = {}
    if cfg.enable_training:
        from app.sampling.ssl import train_backbone_simclr

        ssl_details = train_backbone_simclr(model, dim, cfg, input_dir, files, device, run_dir)
    artifacts.write_embedding_model(run_dir, EmbeddingModel(
        model=model_name, weights=weights, self_supervised_epochs=ssl_details.get("ssl_epochs", 0),
        randomly_initialised=not weights and not cfg.enable_training))
    model.eval().to(device)
    dataset = ImageFiles(input_dir, files, labels, image_transform(cfg.data.image_size))
    loader = make_loader(dataset, cfg.sampler.batch_size, loader_workers(cfg.hardware.num_workers, device),
                         pin_memory=device.type == "cuda")

    embeddings = np.zeros((len(files), dim), dtype=np.float32)
    embedded = np.zeros(len(files), dtype=bool)
    failures: List[Tuple[str, str]] = []
    # compute efficiency = model time / loop time, as lightly reports it: near 1 means the device is
    # kept busy, near 0 means loading images is the bottleneck (raise hardware.num_workers).
    compute_s, started = 0.0, time.perf_counter()
    with torch.inference_mode(), Progress(len(files), "embed") as bar:
        for images, _, indices, failed in loader:
            failures += [(files[i], reason) for i, reason in failed]
            if len(indices):
                began = time.perf_counter()
                vectors = model(images.to(device, non_blocking=True)).float().cpu().numpy()
                compute_s += time.perf_counter() - began
                embeddings[indices.numpy()] = vectors
                embedded[indices.numpy()] = True
            efficiency = compute_s / max(time.perf_counter() - started, 1e-9)
            bar.update(len(indices) + len(failed), eff=round(efficiency, 2))
        rate = bar.rate
    for name, reason in failures:
        log.warning("image failed to load while embedding, skipped: %s (%s)", name, reason)
    artifacts.add_corrupt_files(run_dir, failures)

    keep = np.flatnonzero(embedded)
    write_embeddings_csv(run_dir / EMBEDDINGS, [files[i] for i in keep], embeddings[keep],
                         [labels[i] for i in keep])
    return EmbedResult(n_embedded=len(keep), embedding_dim=dim, images_per_s=round(rate, 2),
                       compute_efficiency=round(efficiency if files else 0.0, 3), **ssl_details)


def not_yet_in_datapool(cfg: DictConfig, run_dir: Path, files: List[str], labels: List[int]):
    """Images other runs put into the datapool are neither embedded again nor candidates again;
    this run's own earlier members are candidates again, since its new selection replaces them."""
    from app.sampling.datapool import datapool_folder, load_datapool, run_id_for

    pool = load_datapool(datapool_folder(cfg.work_dir, cfg.datapool.name))
    members = pool.without_run(run_id_for(run_dir)).members
    kept = [(f, label) for f, label in zip(files, labels) if f not in members]
    if len(kept) < len(files):
        log.info("datapool %s: %d images already in the pool are left out", cfg.datapool.name,
                 len(files) - len(kept))
    if not kept:
        raise UserError(f"every usable image is already in datapool {cfg.datapool.name!r}: nothing new to select")
    return [f for f, _ in kept], [label for _, label in kept]


def use_given_embeddings(path: Path, files: List[str], labels: List[int], run_dir: Path) -> EmbedResult:
    """Check a user's embeddings file and keep the rows of the images the scan found usable."""
    given_files, vectors, _ = read_embeddings_csv(path, strict=True)
    row_of = {name: i for i, name in enumerate(given_files)}
    usable = [i for i, name in enumerate(files) if name in row_of]
    unknown = len(given_files) - len(usable)
    if unknown:
        log.warning("embeddings=%s: %d rows name files that are not usable images here (corrupt, "
                    "duplicate, or not in the input): left out", path, unknown)
    if len(usable) < len(files):
        log.warning("embeddings=%s has no row for %d usable images: they are left out of the selection",
                    path, len(files) - len(usable))
    if not usable:
        raise UserError(f"embeddings={str(path)!r} names none of the {len(files)} usable images: are the "
                        f"file names relative to the input folder?")
    kept = vectors[[row_of[files[i]] for i in usable]]
    write_embeddings_csv(run_dir / EMBEDDINGS, [files[i] for i in usable], kept, [labels[i] for i in usable])
    return EmbedResult(n_embedded=len(usable), embedding_dim=int(vectors.shape[1]), images_per_s=0.0)
