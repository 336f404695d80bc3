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
# Nearest-neighbour statistics search for every query while queries × points stays within this
# many distances (1e8 × d=512 is about 1e11 multiply-adds: seconds), else for a seeded subsample of
# queries (at least MIN_NEAREST_QUERIES), each still against the whole set.
MAX_NEAREST_PAIRS = 2e8
# 200 queries against 1e6 points: about 1e11 multiply-adds, a few seconds on 2 cores (under a
# tenth of the coreset's time there), and enough values for the statistics' quantiles.
MIN_NEAREST_QUERIES = 200
# A pairwise histogram needs no more pairs than these points make (3.4e7) to settle its shape;
# beyond them a seeded subsample is used even when the memory budget would allow more.
HISTOGRAM_MAX_POINTS = 8192
# The PCA axes are fitted on at most this many evenly spaced rows, then every row is projected.
PCA_FIT_ROWS = 16384


def _block_distances(queries: np.ndarray, points: np.ndarray, points_sq: np.ndarray) -> np.ndarray:
    """Euclidean distances of a block of queries to a block of points, via the Gram matrix."""
    squared = (queries * queries).sum(axis=1)[:, None] + points_sq[None, :] - 2.0 * (queries @ points.T)
    np.maximum(squared, 0.0, out=squared)
    return np.sqrt(squared, out=squared)


def nearest_neighbours(queries: np.ndarray, points: np.ndarray, exclude_self: bool = False,
                       block: int = BLOCK, progress: Optional[str] = None, query_rows: Optional[np.ndarray] = None,
                       point_rows: Optional[np.ndarray] = None,
                       self_index: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
    """For each query, the distance to and index of its nearest point.

    `query_rows` / `point_rows`: the queries and points are these rows of the matrices (all when
    None), gathered a block at a time so a subset costs no copy of it; a returned index is a
    position among the points. `self_index[i]`: the point that query i is (not its own neighbour);
    `exclude_self`: queries and points are the same set. An exact duplicate elsewhere still counts,
    at distance 0. A query with no candidate gets inf, -1.
    The search runs in float32; each found distance is then recomputed exactly in float64, since the
    Gram-matrix shortcut loses precision for near duplicates, which are the pairs that matter here.
    """
    query_set, point_set = _Rows(queries, query_rows), _Rows(points, point_rows)
    n_queries, n_points = len(query_set), len(point_set)
    if exclude_self:
        self_index = np.arange(n_queries)
    exact = np.full(n_queries, np.inf)
    index = np.full(n_queries, -1, dtype=np.int64)
    if n_queries == 0 or n_points == 0:
        return exact, index
    points_sq = np.concatenate([np.einsum("ij,ij->i", point_set[p0:p0 + block], point_set[p0:p0 + block])
                                for p0 in range(0, n_points, block)])

    bar = None
    if progress and n_queries * n_points >= 4 * block * block:
        from app.progress import Progress

        bar = Progress(n_queries, progress, unit="query")
    try:
        for q0 in range(0, n_queries, block):
            q1 = min(q0 + block, n_queries)
            query_block = query_set[q0:q1]
            scaled_queries = -2.0 * query_block
            best = np.full(q1 - q0, np.inf, dtype=np.float32)
            rows = np.arange(q1 - q0)
            for p0 in range(0, n_points, block):
                p1 = min(p0 + block, n_points)
                # |p|² − 2 q·p orders the points as their distances to q do (|q|² is the same for
                # the row): one product and one pass, no square roots; the winner is recomputed below
                scores = scaled_queries @ point_set[p0:p1].T
                scores += points_sq[None, p0:p1]
                if self_index is not None:
                    mine = (self_index[q0:q1] >= p0) & (self_index[q0:q1] < p1)
                    scores[rows[mine], self_index[q0:q1][mine] - p0] = np.inf
                column = scores.argmin(axis=1)
                found = scores[rows, column]
                better = found < best
                best[better] = found[better]
                index[q0:q1][better] = column[better] + p0
            has = index[q0:q1] >= 0
            difference = query_block[has].astype(np.float64) - point_set.take(index[q0:q1][has]).astype(np.float64)
            exact[q0:q1][has] = np.linalg.norm(difference, axis=1)
            if bar is not None:
                bar.update(q1 - q0)
    finally:
        if bar is not None:
            bar.close()
    return exact, index


class _Rows:
    """Rows `rows` of a matrix (all when None) as float32, sliced a block at a time."""

    def __init__(self, matrix: np.ndarray, rows: Optional[np.ndarray]):
        self.matrix, self.rows = matrix, rows

    def __len__(self) -> int:
        return len(self.matrix) if self.rows is None else len(self.rows)

    def __getitem__(self, part: slice) -> np.ndarray:
        chosen = self.matrix[part] if self.rows is None else self.matrix[self.rows[part]]
        return np.ascontiguousarray(chosen, dtype=np.float32)

    def take(self, positions: np.ndarray) -> np.ndarray:
        return np.asarray(self.matrix[positions if self.rows is None else self.rows[positions]], dtype=np.float32)


@dataclass
class NearestSample:
    """Nearest-neighbour distances of a seeded subsample of a query set (or of all of it)."""

    distances: np.ndarray
    index: np.ndarray  # each sampled query's nearest point, a position in the point set
    queries: np.ndarray  # the sampled queries, positions in the query set, ascending
    n_queries: int  # the query set's size

    @property
    def subsampled(self) -> bool:
        return len(self.queries) < self.n_queries


def query_sample(n_queries: int, n_points: int, rng: np.random.Generator) -> np.ndarray:
    """Which queries to search for, ascending: all when queries × points ≤ MAX_NEAREST_PAIRS, else
    a seeded subsample of max(MIN_NEAREST_QUERIES, MAX_NEAREST_PAIRS / points), so the work stays
    bounded at any N."""
    max_pairs, min_queries = MAX_NEAREST_PAIRS, MIN_NEAREST_QUERIES
    if n_queries * n_points <= max_pairs or n_queries <= min_queries:
        return np.arange(n_queries)
    size = min(n_queries, max(min_queries, int(max_pairs // max(n_points, 1))))
    return np.sort(rng.choice(n_queries, size, replace=False))


def sampled_nearest_neighbours(points: np.ndarray, rng: np.random.Generator, query_rows: Optional[np.ndarray] = None,
                               point_rows: Optional[np.ndarray] = None, candidates: Optional[np.ndarray] = None,
                               within_set: bool = False, progress: Optional[str] = None) -> NearestSample:
    """Exact nearest neighbours of a seeded subsample of the queries (rows `query_rows` of
    `points`) among rows `point_rows` of `candidates` (default `points`). `within_set`: the queries
    are the points themselves (`query_rows` = `point_rows`), and a point is not its own neighbour."""
    candidates = points if candidates is None else candidates
    if within_set:
        query_rows = point_rows
    n_queries = len(points) if query_rows is None else len(query_rows)
    n_points = len(candidates) if point_rows is None else len(point_rows)
    sample = query_sample(n_queries, n_points, rng)
    rows = sample if query_rows is None else query_rows[sample]
    distances, index = nearest_neighbours(points, candidates, query_rows=rows, point_rows=point_rows,
                                          self_index=sample if within_set else None, progress=progress)
    return NearestSample(distances, index, sample, n_queries)


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
    pairwise matrix would not fit in `memory_requirement_in_GB` (or they are more than
    HISTOGRAM_MAX_POINTS). The matrix is never held whole: it is walked block by block above the
    diagonal, so the budget is an upper bound."""
    n_points = len(points)
    n_used = min(n_points, max_points_for_memory(memory_requirement_in_GB), HISTOGRAM_MAX_POINTS)
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
            # equal bins take numpy's arithmetic path (no sort); in float64 it bins exactly as the edges do
            counts += np.histogram(values.astype(np.float64), bins=bins, range=DISTANCE_RANGE)[0]
            total += float(values.sum(dtype=np.float64))
    n_pairs = n_used * (n_used - 1) // 2
    mean = round(total / n_pairs, 6) if n_pairs else None
    return PairwiseHistogram(n_points, n_used, n_pairs, mean, edges, counts)


def pca_2d(points: np.ndarray, block: int = 65536, fit_rows: int = PCA_FIT_ROWS) -> np.ndarray:
    """The first two principal components of every point. The axes come from the SVD of the d×d
    covariance of at most `fit_rows` evenly spaced rows (two axes need no more, and it keeps the
    fit O(fit_rows·d²) at any N); signs fixed so the result is deterministic."""
    n, dim = points.shape
    if n == 0:
        return np.zeros((0, 2))
    fit = np.asarray(points[::max(1, -(-n // fit_rows))], dtype=np.float64)
    mean = fit.mean(axis=0)
    fit -= mean
    components, _, _ = np.linalg.svd(fit.T @ fit)
    del fit
    axes = components[:, :2]
    if axes.shape[1] < 2:
        axes = np.pad(axes, ((0, 0), (0, 2 - axes.shape[1])))
    signs = np.sign(axes[np.abs(axes).argmax(axis=0), [0, 1]])
    axes = axes * np.where(signs == 0, 1.0, signs)
    projected = np.empty((n, 2))
    axes32, offset = axes.astype(np.float32), mean @ axes  # float32 is plenty for a scatter plot
    for start in range(0, n, block):
        projected[start:start + block] = np.asarray(points[start:start + block], dtype=np.float32) @ axes32 - offset
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
