"""Embed stage: the model's backbone turns every usable image into a vector.

Writes `data/embeddings.csv` in the lightly format (filenames, embedding_0..D-1, labels).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Tuple

import numpy as np
import torch
from omegaconf import DictConfig

from app import atomic
from app.data.images import ImageFiles, image_transform, make_loader
from app.data.scan import DATASET, INPUT_FILES, add_corrupt, read_input_files
from app.device import loader_workers
from app.models import build_backbone
from app.progress import Progress

log = logging.getLogger("thresher")

EMBEDDINGS = "data/embeddings.csv"


@dataclass
class EmbedResult:
    n_embedded: int
    embedding_dim: int
    images_per_s: float
    artifacts: List[str] = field(default_factory=lambda: [EMBEDDINGS])


def embed_stage(cfg: DictConfig, run_dir: Path, device: torch.device) -> EmbedResult:
    import json

    files, labels = read_input_files(run_dir / INPUT_FILES)
    input_dir = Path(json.loads((run_dir / DATASET).read_text())["input_dir"])
    model, dim = build_backbone(cfg.model.name, cfg.model.weights)
    model.eval().to(device)
    dataset = ImageFiles(input_dir, files, labels, image_transform(cfg.data.image_size))
    loader = make_loader(dataset, cfg.sampler.batch_size, loader_workers(cfg.hardware.num_workers, device),
                         pin_memory=device.type == "cuda")

    embeddings = np.zeros((len(files), dim), dtype=np.float32)
    embedded = np.zeros(len(files), dtype=bool)
    failures: List[Tuple[str, str]] = []
    with torch.inference_mode(), Progress(len(files), "embed") as bar:
        for images, _, indices, failed in loader:
            failures += [(files[i], reason) for i, reason in failed]
            if len(indices):
                vectors = model(images.to(device, non_blocking=True)).float().cpu().numpy()
                embeddings[indices.numpy()] = vectors
                embedded[indices.numpy()] = True
            bar.update(len(indices) + len(failed))
        rate = bar.rate
    for name, reason in failures:
        log.warning("image failed to load while embedding, skipped: %s (%s)", name, reason)
    add_corrupt(run_dir, failures)

    keep = np.flatnonzero(embedded)
    write_embeddings_csv(run_dir / EMBEDDINGS, [files[i] for i in keep], embeddings[keep],
                         [labels[i] for i in keep])
    return EmbedResult(n_embedded=len(keep), embedding_dim=dim, images_per_s=round(rate, 2))


def write_embeddings_csv(path: Path, files: List[str], embeddings: np.ndarray, labels: List[int]) -> None:
    """The lightly format: header `filenames,embedding_0,...,embedding_{D-1},labels`."""
    header = ["filenames", *(f"embedding_{i}" for i in range(embeddings.shape[1])), "labels"]
    rows = ([name, *(f"{v:.7g}" for v in vector.tolist()), label]
            for name, vector, label in zip(files, embeddings, labels))
    atomic.write_csv(path, header, rows)


def read_embeddings_csv(path: Path) -> Tuple[List[str], np.ndarray, List[int]]:
    import csv

    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        header = next(reader)
        rows = list(reader)
    dim = len(header) - 2
    files = [row[0] for row in rows]
    vectors = np.array([row[1:1 + dim] for row in rows], dtype=np.float32).reshape(len(rows), dim)
    labels = [int(row[-1]) for row in rows]
    return files, vectors, labels
