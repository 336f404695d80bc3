"""`sampler.near_duplicate_distance`: drop images that lie closer than a threshold to an earlier
image that is kept, before selection.

Greedy in input order, so the result depends neither on block sizes nor on the clustering below:
image i goes when some kept image j < i lies within the threshold, and its match is the nearest
such j (the lowest index among equally near ones).

Why clusters: comparing every block with every earlier block is O(N²·d), hours at 1e6 × 512. The
points are partitioned by a few seeded k-means iterations (about sqrt(N) centroids). A point p of
cluster a lies at least (|p−c_b|² − |p−c_a|²) / (2|c_a−c_b|) from every point of cluster b (its
distance to their bisecting hyperplane), so p is compared only with the kept earlier points of the
clusters whose bisector it is within the threshold of. The clustering decides only the speed: the
test is a bound with slack for float32 rounding, and every decision uses distances recomputed in
float64, so the output is that of the brute-force greedy pass.

Memory: O(N·d) for the caller's matrix (not copied when it is float32 on the CPU) plus O(block·K)
and the candidate pairs of one block: a few per point for real near duplicates; blocks shrink to
MIN_BLOCK rows when a threshold beyond the data's spread makes every block-mate a candidate.
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import numpy as np
import torch

# Below this many points one cluster is as fast as many (nothing to gain from k-means).
SMALL_N = 20_000
MAX_CLUSTERS = 1024
KMEANS_ITERATIONS = 6
KMEANS_SAMPLE_PER_CLUSTER = 24
KMEANS_SEED = 0
# Candidate pairs whose exact distances are recomputed at once (float64, block × d each).
EXACT_CHUNK = 16384
# Query blocks start at MIN_BLOCK rows and double up to `block` while a block yields at most
# PAIRS_PER_QUERY candidate pairs a query (large blocks re-read the kept points less often), and
# halve when it yields more (a threshold beyond the data's spread makes every block-mate a
# candidate: block² / 2 pairs), so memory stays bounded whatever the threshold.
MIN_BLOCK = 2048
PAIRS_PER_QUERY = 16


def find_near_duplicates(embeddings: np.ndarray, threshold: float, device: torch.device = torch.device("cpu"),
                         block: int = 32768, n_clusters: Optional[int] = None) -> List[Tuple[int, int, float]]:
    """(removed index, the kept index it duplicates, their distance), in input order.

    `n_clusters`: how many k-means cells bound the search (None: 1 below SMALL_N points, else about
    sqrt(N)); it changes the time, never the result."""
    from app.progress import Progress

    points = torch.as_tensor(embeddings, dtype=torch.float32).to(device)
    n = len(points)
    if n == 0 or threshold <= 0:
        return []
    if n_clusters is None:
        n_clusters = 1 if n < SMALL_N else min(MAX_CLUSTERS, int(math.sqrt(n)))
    centroids = _kmeans(points, max(1, min(n_clusters, n)))
    cells = _Cells(points, centroids, threshold)
    squared_norms = torch.empty(n, dtype=torch.float32, device=device)
    kept_by_cell: List[torch.Tensor] = [torch.empty(0, dtype=torch.long, device=device)] * len(centroids)
    removed: List[Tuple[int, int, float]] = []
    size, start = min(MIN_BLOCK, block), 0
    with Progress(n, "select: near duplicates") as bar:
        while start < n:
            stop = min(start + size, n)
            queries = points[start:stop]
            squared_norms[start:stop] = (queries * queries).sum(dim=1)
            cell, relevant = cells.locate(queries)
            query, match = _candidate_pairs(points, squared_norms, start, stop, cell, relevant, kept_by_cell,
                                            threshold)
            distance = _exact_distances(points, query, match)
            close = distance < threshold
            block_kept = _resolve_block(start, stop, query[close].cpu().numpy(), match[close].cpu().numpy(),
                                        distance[close].cpu().numpy(), removed)
            kept = torch.as_tensor(np.flatnonzero(block_kept) + start, device=device)
            kept_cell = cell[kept - start]
            order = torch.argsort(kept_cell, stable=True)
            counts = torch.bincount(kept_cell, minlength=len(centroids)).tolist()
            for c, indices in zip(range(len(centroids)), torch.split(kept[order], counts)):
                if len(indices):
                    kept_by_cell[c] = torch.cat([kept_by_cell[c], indices])
            bar.update(stop - start, removed=len(removed))
            crowded = len(query) > PAIRS_PER_QUERY * (stop - start)
            size = max(min(MIN_BLOCK, block), size // 2) if crowded else min(block, 2 * size)
            start = stop
    return removed


def _float32_unit(device: torch.device) -> float:
    """The rounding unit of a float32 product on `device` (TF32 keeps 10 mantissa bits)."""
    tf32 = device.type == "cuda" and (torch.backends.cuda.matmul.allow_tf32
                                      or torch.get_float32_matmul_precision() != "highest")
    return 2.0 ** -11 if tf32 else 2.0 ** -24


def _kmeans(points: torch.Tensor, k: int) -> torch.Tensor:
    """k centroids from a few seeded Lloyd iterations on a subsample (they only steer the search)."""
    n = len(points)
    if k == 1:
        return points[:1].clone()
    generator = torch.Generator().manual_seed(KMEANS_SEED)
    sample_size = min(n, k * KMEANS_SAMPLE_PER_CLUSTER)
    sample = points[torch.randperm(n, generator=generator)[:sample_size].to(points.device)]
    centroids = sample[torch.randperm(sample_size, generator=generator)[:k].to(points.device)].clone()
    for _ in range(KMEANS_ITERATIONS):
        nearest = (0.5 * (centroids * centroids).sum(dim=1) - sample @ centroids.T).argmin(dim=1)
        sums = torch.zeros_like(centroids).index_add_(0, nearest, sample)
        counts = torch.bincount(nearest, minlength=k).to(sums.dtype)
        filled = counts > 0  # an empty cell keeps its centroid
        centroids[filled] = sums[filled] / counts[filled, None]
    return centroids


class _Cells:
    """The k-means cells and which cells a point may have a neighbour within the threshold in."""

    def __init__(self, points: torch.Tensor, centroids: torch.Tensor, threshold: float):
        self.centroids = centroids
        self.half_norms = 0.5 * (centroids * centroids).sum(dim=1)
        wide = centroids.double()
        # |c_a − c_b| in float64 from the differences (no cancellation), a few rows at a time
        self.separation = torch.cat([(wide[i:i + 64, None, :] - wide[None, :, :]).norm(dim=2)
                                     for i in range(0, len(wide), 64)]).float()
        self.threshold = threshold
        # The score of a point at a centroid, |c|²/2 − p·c, is off by at most `error` in float32;
        # a point's assignment and its bisector distances each move by twice that (times |c_a−c_b|).
        max_point_norm = max(float(points[i:i + 65536].norm(dim=1).max()) for i in range(0, len(points), 65536))
        max_centroid_norm = float(centroids.norm(dim=1).max())
        error = 2 * points.shape[1] * _float32_unit(points.device) * (
            max_point_norm * max_centroid_norm + max_centroid_norm ** 2)
        self.slack = 4 * error + 1e-12

    def locate(self, queries: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Each query's cell, and block × K: the cells it may have a neighbour closer than the threshold in.

        With score_c = |c|²/2 − p·c, p's distance to the bisector of (c_a, c_b) is
        (score_b − score_a) / |c_a − c_b|; cell b is out of reach when that is ≥ the threshold."""
        scores = self.half_norms[None, :] - queries @ self.centroids.T
        own, cell = scores.min(dim=1)
        relevant = scores - own[:, None] < self.threshold * self.separation[cell] + self.slack
        return cell, relevant


def _candidate_pairs(points, squared_norms, start, stop, cell, relevant, kept_by_cell, threshold):
    """(query, match) index pairs that may lie within the threshold: each query of the block against
    the kept earlier points and the earlier block-mates of the cells it may reach. A superset of the
    pairs closer than the threshold (float32 distances with a rounding slack)."""
    device = points.device
    unit = _float32_unit(device)
    slack = 4 * points.shape[1] * unit
    limit = threshold * threshold
    block_order = torch.argsort(cell, stable=True)
    block_counts = torch.bincount(cell, minlength=len(kept_by_cell)).tolist()
    members = dict(zip(range(len(kept_by_cell)), torch.split(block_order + start, block_counts)))
    cell_of_pair, query_of_pair = relevant.T.nonzero(as_tuple=True)
    pair_counts = torch.bincount(cell_of_pair, minlength=len(kept_by_cell)).tolist()
    queries_found, matches_found = [], []
    for c, local in zip(range(len(kept_by_cell)), torch.split(query_of_pair, pair_counts)):
        n_earlier = len(kept_by_cell[c])
        if not len(local) or (n_earlier == 0 and block_counts[c] == 0):
            continue
        keys = torch.cat([kept_by_cell[c], members[c]])
        query = local + start
        query_norms, key_norms = squared_norms[query][:, None], squared_norms[keys][None, :]
        squared = query_norms + key_norms - 2 * (points[query] @ points[keys].T)
        close = squared < limit + slack * (query_norms + key_norms)
        close[:, n_earlier:] &= keys[None, n_earlier:] < query[:, None]  # block-mates: earlier ones only
        rows, columns = close.nonzero(as_tuple=True)
        queries_found.append(query[rows])
        matches_found.append(keys[columns])
    if not queries_found:
        empty = torch.empty(0, dtype=torch.long, device=device)
        return empty, empty
    return torch.cat(queries_found), torch.cat(matches_found)


def _exact_distances(points: torch.Tensor, query: torch.Tensor, match: torch.Tensor) -> torch.Tensor:
    """Distances of the pairs in float64 from the differences: exact enough that ties and the
    threshold are decided as a brute-force pass decides them."""
    out = torch.empty(len(query), dtype=torch.float64, device=points.device)
    for i in range(0, len(query), EXACT_CHUNK):
        difference = points[query[i:i + EXACT_CHUNK]].double() - points[match[i:i + EXACT_CHUNK]].double()
        out[i:i + EXACT_CHUNK] = difference.norm(dim=1)
    return out


def _resolve_block(start: int, stop: int, query: np.ndarray, match: np.ndarray, distance: np.ndarray,
                   removed: List[Tuple[int, int, float]]) -> np.ndarray:
    """The greedy pass over one block, given its pairs closer than the threshold: a query goes when
    its nearest candidate that is kept (any earlier-block one; a block-mate only if kept) is found.
    Appends to `removed` in input order; returns which of the block's points stay."""
    block_kept = np.ones(stop - start, dtype=bool)
    order = np.lexsort((match, distance, query))  # by query, then distance, then the lower index
    query, match, distance = query[order], match[order], distance[order]
    queries, first = np.unique(query, return_index=True)
    last = np.append(first[1:], len(query))
    settled = match[first] < start  # the nearest candidate is kept already: no block-mate can change it
    block_kept[queries[settled] - start] = False
    found = {int(q): (int(match[f]), float(distance[f])) for q, f in zip(queries[settled], first[settled])}
    for q, f, e in zip(queries[~settled], first[~settled], last[~settled]):
        candidates = match[f:e]
        usable = (candidates < start) | block_kept[np.maximum(candidates - start, 0)]
        hit = int(usable.argmax())
        if usable[hit]:
            block_kept[q - start] = False
            found[int(q)] = (int(candidates[hit]), float(distance[f + hit]))
    removed.extend((q, *found[q]) for q in sorted(found))
    return block_kept
