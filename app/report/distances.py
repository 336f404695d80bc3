"""Distances for the report, in bounded memory: never an N×N matrix over all points.

Nearest neighbours are found block by block (a block of queries against a block of points, keeping
the running minimum), so memory is O(N·d + block²) whatever N is. Pairwise-distance histograms are
taken on a seeded random subsample whose full pairwise matrix would fit in the memory budget.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np

# Rows and columns of one distance block: 2048² float32 is 16 MiB, with temporaries well under 100.
BLOCK = 2048
# Distances between L2-normalised vectors lie in [0, 2].
DISTANCE_RANGE = (0.0, 2.0)
HISTOGRAM_BINS = 50
# Pairwise distances are counted in fine bins over the whole range, then merged into
# HISTOGRAM_BINS over the range actually occupied (it is not known before the pass). A multiple
# of HISTOGRAM_BINS, so merged bins always fit.
FINE_BINS = 2000
BYTES_PER_DISTANCE = 4  # float32


def _block_distances(queries: np.ndarray, points: np.ndarray, points_sq: np.ndarray) -> np.ndarray:
    """Euclidean distances of a block of queries to a block of points, via the Gram matrix."""
    squared = (queries * queries).sum(axis=1)[:, None] + points_sq[None, :] - 2.0 * (queries @ points.T)
    np.maximum(squared, 0.0, out=squared)
    return np.sqrt(squared, out=squared)


def nearest_neighbours(queries: np.ndarray, points: np.ndarray, exclude_self: bool = False,
                       block: int = BLOCK, progress: Optional[str] = None) -> Tuple[np.ndarray, np.ndarray]:
    """For each query, the distance to and index of its nearest point.

    `exclude_self`: queries and points are the same set, and a point is not its own neighbour (an
    exact duplicate elsewhere still counts, at distance 0). A query with no candidate gets inf, -1.
    The search runs in float32; each found distance is then recomputed exactly in float64, since the
    Gram-matrix shortcut loses precision for near duplicates, which are the pairs that matter here.
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    points = np.ascontiguousarray(points, dtype=np.float32)
    n_queries, n_points = len(queries), len(points)
    best = np.full(n_queries, np.inf, dtype=np.float32)
    index = np.full(n_queries, -1, dtype=np.int64)
    if n_queries == 0 or n_points == 0:
        return best.astype(np.float64), index
    points_sq = (points * points).sum(axis=1)

    bar = None
    if progress and n_queries * n_points >= 4 * block * block:
        from app.progress import Progress

        bar = Progress(n_queries, progress, unit="query")
    try:
        for q0 in range(0, n_queries, block):
            q1 = min(q0 + block, n_queries)
            for p0 in range(0, n_points, block):
                p1 = min(p0 + block, n_points)
                distances = _block_distances(queries[q0:q1], points[p0:p1], points_sq[p0:p1])
                if exclude_self and p0 < q1 and q0 < p1:
                    rows = np.arange(max(q0, p0), min(q1, p1))
                    distances[rows - q0, rows - p0] = np.inf
                column = distances.argmin(axis=1)
                found = distances[np.arange(q1 - q0), column]
                better = found < best[q0:q1]
                best[q0:q1][better] = found[better]
                index[q0:q1][better] = column[better] + p0
            if bar is not None:
                bar.update(q1 - q0)
    finally:
        if bar is not None:
            bar.close()

    exact = np.full(n_queries, np.inf)
    has = index >= 0
    difference = queries[has].astype(np.float64) - points[index[has]].astype(np.float64)
    exact[has] = np.linalg.norm(difference, axis=1)
    return exact, index


def distance_stats(distances: np.ndarray) -> Dict[str, Optional[float]]:
    """min, p5, median, mean, p95, max of the finite distances (None for each when there are none)."""
    values = np.asarray(distances, dtype=np.float64)
    values = values[np.isfinite(values)]
    keys = ("min", "p5", "median", "mean", "p95", "max")
    if values.size == 0:
        return {"n_points": 0, **{key: None for key in keys}}
    p5, median, p95 = np.percentile(values, [5, 50, 95])
    numbers = (values.min(), p5, median, values.mean(), p95, values.max())
    return {"n_points": int(values.size), **{key: round(float(v), 6) for key, v in zip(keys, numbers)}}


def max_points_for_memory(memory_requirement_in_GB: float) -> int:
    """The most points whose full pairwise float32 matrix fits in the budget (at least 2)."""
    budget = max(float(memory_requirement_in_GB), 0.0) * 1e9
    return max(2, int(np.sqrt(budget / BYTES_PER_DISTANCE)))


@dataclass
class PairwiseHistogram:
    """Counts of the pairwise distances (each unordered pair once) of possibly a subsample."""

    n_points: int
    n_used: int
    n_pairs: int
    mean: Optional[float]
    edges: np.ndarray
    counts: np.ndarray

    @property
    def subsampled(self) -> bool:
        return self.n_used < self.n_points

    def to_json(self) -> dict:
        return {"n_points": self.n_points, "n_used": self.n_used, "subsampled": self.subsampled,
                "n_pairs": self.n_pairs, "mean": self.mean,
                "bin_edges": [round(float(e), 6) for e in self.edges], "counts": self.counts.tolist()}


def pairwise_histogram(points: np.ndarray, memory_requirement_in_GB: float, rng: np.random.Generator,
                       bins: int = FINE_BINS, block: int = BLOCK) -> PairwiseHistogram:
    """Histogram of all pairwise distances of `points`, or of a seeded subsample of them when their
    pairwise matrix would not fit in `memory_requirement_in_GB`. The matrix is never held whole:
    it is walked block by block above the diagonal, so the budget is an upper bound."""
    n_points = len(points)
    n_used = min(n_points, max_points_for_memory(memory_requirement_in_GB))
    chosen = np.sort(rng.choice(n_points, n_used, replace=False)) if n_used < n_points else np.arange(n_points)
    sample = np.ascontiguousarray(points[chosen], dtype=np.float32)
    sample_sq = (sample * sample).sum(axis=1)
    edges = np.linspace(*DISTANCE_RANGE, bins + 1)
    counts = np.zeros(bins, dtype=np.int64)
    total = 0.0
    for r0 in range(0, n_used, block):
        r1 = min(r0 + block, n_used)
        for c0 in range(r0, n_used, block):
            c1 = min(c0 + block, n_used)
            distances = _block_distances(sample[r0:r1], sample[c0:c1], sample_sq[c0:c1])
            if c0 == r0:  # the diagonal block: only the pairs above its diagonal
                distances = distances[np.triu(np.ones(distances.shape, dtype=bool), k=1)]
            values = np.clip(distances.ravel(), *DISTANCE_RANGE)
            counts += np.histogram(values, bins=edges)[0]
            total += float(values.sum(dtype=np.float64))
    n_pairs = n_used * (n_used - 1) // 2
    mean = round(total / n_pairs, 6) if n_pairs else None
    return PairwiseHistogram(n_points, n_used, n_pairs, mean, edges, counts)


def pca_2d(points: np.ndarray, block: int = 65536) -> np.ndarray:
    """The first two principal components of every point, from the SVD of the d×d covariance
    (accumulated in blocks, so no N×d float64 copy); signs fixed so the result is deterministic."""
    points = np.asarray(points, dtype=np.float32)
    n, dim = points.shape
    if n == 0:
        return np.zeros((0, 2))
    mean = points.mean(axis=0, dtype=np.float64)
    covariance = np.zeros((dim, dim))
    for start in range(0, n, block):
        centred = points[start:start + block].astype(np.float64) - mean
        covariance += centred.T @ centred
    components, _, _ = np.linalg.svd(covariance)
    axes = components[:, :2]
    if axes.shape[1] < 2:
        axes = np.pad(axes, ((0, 0), (0, 2 - axes.shape[1])))
    signs = np.sign(axes[np.abs(axes).argmax(axis=0), [0, 1]])
    axes = axes * np.where(signs == 0, 1.0, signs)
    projected = np.empty((n, 2))
    for start in range(0, n, block):
        projected[start:start + block] = (points[start:start + block].astype(np.float64) - mean) @ axes
    return projected


def on_common_bins(histograms: List[PairwiseHistogram], n_bins: int = HISTOGRAM_BINS) -> List[PairwiseHistogram]:
    """The histograms (on the same fine edges) merged into at most `n_bins` shared bins that span
    only the distances that occur in any of them, so before and after compare bar for bar."""
    edges = histograms[0].edges
    occupied = np.flatnonzero(np.sum([h.counts for h in histograms], axis=0))
    if occupied.size == 0:
        return histograms
    low, high = int(occupied[0]), int(occupied[-1]) + 1
    group = max(1, -(-(high - low) // n_bins))
    high = low + group * -(-(high - low) // group)
    if high > len(edges) - 1:
        low, high = max(0, low - (high - (len(edges) - 1))), len(edges) - 1
    merged = []
    for h in histograms:
        counts = h.counts[low:high].reshape(-1, group).sum(axis=1)
        merged.append(PairwiseHistogram(h.n_points, h.n_used, h.n_pairs, h.mean, edges[low:high + 1:group], counts))
    return merged
