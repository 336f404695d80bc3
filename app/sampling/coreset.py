"""Greedy k-center (Gonzalez): each pick is the point farthest from every point picked so far.

Memory is O(N·d): one running vector of distances to the nearest pick, never an N×N matrix.
Deterministic: the first pick comes from the seed, ties go to the lowest index.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

import numpy as np
import torch


@dataclass
class CoresetSelection:
    indices: List[int]          # in pick order
    distances: List[float]      # each pick's distance to the nearest earlier pick (inf for the first)
    stopped_by: str             # "n_samples", "min_distance" or "exhausted"


def select_coreset(embeddings: np.ndarray, n_samples: int, min_distance: float = -1.0, seed: int = 0,
                   device: torch.device = torch.device("cpu")) -> CoresetSelection:
    """Pick up to `n_samples` points; stop early when the farthest remaining point is closer than
    `min_distance` to the picks (when min_distance >= 0)."""
    points = torch.as_tensor(embeddings, dtype=torch.float32, device=device)
    n = points.shape[0]
    if n == 0 or n_samples <= 0:
        return CoresetSelection([], [], "n_samples")
    nearest = torch.full((n,), float("inf"), device=device)
    first = int(np.random.default_rng(seed).integers(n))
    picks, distances = [first], [float("inf")]
    stopped_by = "n_samples"
    current = first
    while len(picks) < min(n_samples, n):
        step = torch.linalg.vector_norm(points - points[current], dim=1)
        nearest = torch.minimum(nearest, step)
        current = int(torch.argmax(nearest))  # first maximum: ties go to the lowest index
        distance = float(nearest[current])
        if min_distance >= 0 and distance < min_distance:
            stopped_by = "min_distance"
            break
        picks.append(current)
        distances.append(distance)
    if len(picks) == n and n_samples > n:
        stopped_by = "exhausted"
    return CoresetSelection(picks, distances, stopped_by)


def normalize_rows(embeddings: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    return embeddings / np.maximum(norms, 1e-12)
