"""Seeded k-means for sampler=typical: k-means++ seeding, then a capped number of Lloyd iterations.

Distances to the centers are computed for a chunk of rows at a time (|c|² − 2x·c by GEMM), so
memory stays at the points, the centers and one chunk × K block: never an N × K matrix, never a
Python object per point. The same points, seed and device give the same clusters.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from app.progress import Progress

# Lloyd iterations at most: TypiClust needs coarse clusters, and the assignments of 1e4 points
# settle within a few dozen iterations. They stop earlier once at most this share of the points
# changes cluster in an iteration (0 below 1000 points: until nothing changes).
MAX_ITERATIONS = 30
SETTLED_SHARE = 0.001
# Entries of a chunk × K distance block (16 MiB of float32).
_CHUNK_ENTRIES = 1 << 22


@dataclass
class Clustering:
    assignments: np.ndarray  # int64, the cluster of each point
    centers: np.ndarray      # float32, K × d
    iterations: int          # Lloyd iterations run (they stop early once the assignments settle)


def kmeans(points: np.ndarray, k: int, seed: int, device: Optional[torch.device] = None,
           max_iterations: int = MAX_ITERATIONS) -> Clustering:
    """Cluster the rows of `points` (float32, N × d) into `k` clusters (1 <= k <= N). A cluster
    that loses all its points keeps its center (it may end up empty)."""
    device = device or torch.device("cpu")
    x = torch.as_tensor(np.ascontiguousarray(points, dtype=np.float32)).to(device)
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k={k} clusters for {n} points")
    squared_norms = (x * x).sum(dim=1)
    centers = _kmeans_plus_plus(x, squared_norms, k, np.random.default_rng(seed))
    assignments = torch.full((n,), -1, dtype=torch.int64, device=device)
    iterations = 0
    with Progress(max_iterations, "select: k-means", unit="iter") as progress:
        for iterations in range(1, max_iterations + 1):
            new_assignments = nearest_centers(x, centers)
            changed = int((new_assignments != assignments).sum())
            assignments = new_assignments
            centers = _means(x, assignments, centers)
            progress.update(1, changed=changed)
            if changed <= int(SETTLED_SHARE * n):
                break
    return Clustering(assignments.cpu().numpy(), centers.cpu().numpy(), iterations)


def nearest_centers(x: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """Each row's nearest center (the lowest index on a tie), a chunk of rows at a time."""
    center_norms = (centers * centers).sum(dim=1)
    rows = max(1, _CHUNK_ENTRIES // centers.shape[0])
    nearest = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
    for start in range(0, x.shape[0], rows):
        chunk = x[start:start + rows]
        # |x|² is the same for every center of a row: it does not change the argmin.
        nearest[start:start + rows] = (center_norms[None, :] - 2.0 * (chunk @ centers.T)).argmin(dim=1)
    return nearest


def _means(x: torch.Tensor, assignments: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """Each cluster's mean; an empty one keeps its center. The sums are one sparse product of the
    K × N membership matrix with the points (10x faster than index_add_ on a CPU)."""
    k, n = previous.shape[0], x.shape[0]
    membership = torch.sparse_coo_tensor(torch.stack([assignments, torch.arange(n, device=x.device)]),
                                         torch.ones(n, device=x.device), (k, n), check_invariants=False)
    sums = torch.sparse.mm(membership, x)
    counts = torch.bincount(assignments, minlength=k)
    filled = counts > 0
    centers = previous.clone()
    centers[filled] = sums[filled] / counts[filled, None].float()
    return centers


def _kmeans_plus_plus(x: torch.Tensor, squared_norms: torch.Tensor, k: int, rng: np.random.Generator) -> torch.Tensor:
    """k-means++ (Arthur and Vassilvitskii 2007): each next center is drawn with probability
    proportional to the squared distance to the nearest center so far; the draws come from `rng`."""
    n = x.shape[0]
    chosen = [int(rng.integers(n))]
    nearest = _squared_distances_to(x, squared_norms, x[chosen[0]])
    for _ in range(1, k):
        cumulative = torch.cumsum(nearest.double(), dim=0)
        total = float(cumulative[-1])
        if total > 0:
            index = int(torch.searchsorted(cumulative, torch.tensor([rng.random() * total], dtype=torch.float64,
                                                                     device=x.device), right=True)[0])
            index = min(index, n - 1)
        else:  # every point sits on a center: any other point will do
            index = int(rng.integers(n))
        chosen.append(index)
        nearest = torch.minimum(nearest, _squared_distances_to(x, squared_norms, x[index]))
    return x[torch.tensor(chosen, device=x.device)].clone()


def _squared_distances_to(x: torch.Tensor, squared_norms: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    return (squared_norms - 2.0 * (x @ center) + (center * center).sum()).clamp_(min=0.0)
