"""Greedy k-center (Gonzalez) coreset selection: exact, and fast on a million points.

What is selected. Every pick is the point farthest from all centers so far: the `pool` (points
selected in earlier runs, never returned) and the earlier picks. Without a pool the first pick is
random (from `seed`); with one, the first pick is the point farthest from the pool. "Distance" is
`exact_squared_distances`: the squared Euclidean distance of the float32 vectors evaluated in
float64 with a fixed summation order, so it is the same number on every device and in every batch
shape. Ties go to the lowest index; a picked point is never picked again. `reference_select_coreset`
writes that definition out plainly, reading every point once per pick. `select_coreset` returns the
same picks and the same distances bit for bit, on any data; tests/test_coreset.py checks it.

How it is fast (all of it in torch, so it runs on a GPU too, with a host synchronisation per round
of picks or per block of work, not per pick):
1. Estimates by GEMM. Squared distances are estimated as |x|² + |c|² − 2x·c, many at once, in
   float64: a dot product of length d errs by at most about d·2⁻⁵³·|x|·|c| whatever the summation
   order, so every estimate lies within `eps` = 1.1·(d + 32)·2⁻⁵³·(2·largest norm)² (about 1e-13
   for unit vectors) of the exact value, and so does each point's estimate of its distance to the
   nearest center. Float32 estimates would be 2x faster here but useless: near the top the greedy
   leaves thousands of points within 1e-5 of each other, far inside float32's error bound.
2. Lazy updates. Distances to the nearest center only shrink as centers are added, so a point's
   estimate stays an upper bound when it has not seen the newest centers (it is "stale"). Each
   round brings only the points with the largest estimates up to date, and each of those only
   until its estimate falls under the bound of the points left out. In high dimensions a typical
   point sinks far under the farthest one after some thousands of centers and is left alone.
3. Triangle inequality. A point x whose nearest center is c cannot get closer to a new center q when
   d(c, q) >= 2·d(x, c). Points close to their center meet only the new centers that pass this test
   for their center's group (screened with float32 center-to-center distances and their own error
   bound): this is what makes clustered data cheap.
4. Batched picks. Among the up-to-date points above every stale bound, one GEMM gives the distances
   from the top `b` to all of them, and the greedy picks are simulated in sequence as long as the
   farthest point stays among those `b`.
5. Copies. Equal rows are equally far from everything: the lowest index stands for them all, and
   the other copies come last, at distance 0, in index order, as the reference has them.

What makes it exact. A pick is taken only when its estimate beats the estimate of every other
candidate, and the bound of every stale point, by more than 2·eps: then its exact distance is the
largest, strictly. When that margin is missing (a tie), every point within 2·eps of the top is
brought up to date and its exact distance computed with `exact_squared_distances` against the
centers whose estimate is within 2·eps of its nearest (the exact nearest center must be among
them); the largest wins, ties to the lowest index. The distance reported for every pick is
computed the same way, and min_distance is checked on it. Centers skipped by the triangle
inequality are farther, by a margin of more than 2·eps, than the point's own center.

Memory: the caller's float32 points are used where they are (no copy), and blocks of them are
converted to float64 where a GEMM or an exact distance needs them; the conversion is exact, so the
float64 values are those of the float32 points and the bounds above hold as they are. Beyond the
points: the centers (float64 and float32, at most N + pool rows), a few vectors of length N, and
blocks of bounded size; never a copy of the points, never an N×N matrix.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import torch

# Float32 entries per temporary GEMM block (64 MiB), float64 entries per exact block, and float64
# entries per block of points converted in a pass over all of them (8 MiB).
_BLOCK = 1 << 24
_EXACT_BLOCK = 1 << 22
_PASS_BLOCK = 1 << 20
_UNIT_ROUNDOFF = 2.0 ** -53


@dataclass
class _Sizes:
    """Block sizes, and where the adaptive sizes start. They change speed, never the picks; the tests
    shrink them to run every path on small data."""
    rows: int = 4096            # points per block when points meet unseen centers
    centers: int = 1024         # centers per such block
    groups: int = 2048          # owner groups per center-to-center block (triangle inequality)
    group_points: int = 1024    # points per GEMM in the triangle-inequality path
    candidates: int = 8192      # top points brought up to date per round, at first (adapts)
    min_candidates: int = 1024
    batch: int = 128            # candidates one round computes distances from, at first (adapts)
    min_batch: int = 32
    max_batch: int = 1024
    simulated: int = 2048       # fewest candidates a round simulates picks on
    steps_per_check_cpu: int = 1    # simulated picks between looks at the stopping flag (a sync on a GPU)
    steps_per_check_gpu: int = 16


_SIZES = _Sizes()


@dataclass
class CoresetSelection:
    indices: List[int]          # in pick order
    distances: List[float]      # each pick's distance to the nearest earlier pick or pool point (inf for a random first pick)
    stopped_by: str             # "n_samples", "min_distance" or "exhausted"


def select_coreset(embeddings: np.ndarray, n_samples: int, min_distance: float = -1.0, seed: int = 0,
                   device: torch.device = torch.device("cpu"),
                   pool: Optional[np.ndarray] = None) -> CoresetSelection:
    """Pick up to `n_samples` points by greedy k-center; stop early when the farthest remaining point
    is closer than `min_distance` to the centers (when min_distance >= 0). `pool`: embeddings of
    points selected before, which count as centers from the start and are not returned."""
    points, pool_rows = _as_tensors(embeddings, pool, device)
    n = points.shape[0]
    if n == 0 or n_samples <= 0:
        return CoresetSelection([], [], "n_samples")
    first = None if pool_rows.shape[0] else int(np.random.default_rng(seed).integers(n))
    # Copies of a point are equally far from everything: the lowest index stands for them all, and
    # the others come last, at distance 0, in index order (exactly what the reference does). The
    # greedy sees them as picked from the start, so it needs no matrix of the distinct rows.
    stands_for = _distinct_rows(points)
    copies = (stands_for != torch.arange(n, device=stands_for.device)).nonzero().squeeze(1)
    with _full_float32_matmul():
        kcenter = _GreedyKCenter(points, pool_rows, copies)
        picks, distances, stopped_by = kcenter.select(min(n_samples, n - copies.numel()), min_distance,
                                                      None if first is None else int(stands_for[first]))
    if first is not None:
        picks[0] = first  # the random pick may be any copy, not the lowest
    return _copies_last(picks, distances, stopped_by, n, n_samples, min_distance)


def _copies_last(indices: List[int], distances: List[float], stopped_by: str, n: int, n_samples: int,
                 min_distance: float) -> CoresetSelection:
    """The selection from the greedy's picks: when the greedy ran out of points at a positive
    distance, every point left is a copy of a center or of a pool point (distance 0), and they come
    next in index order, unless min_distance > 0 stops there."""
    if stopped_by != "min_distance" and len(indices) < min(n_samples, n):
        if min_distance > 0:
            stopped_by = "min_distance"
        else:
            left = np.ones(n, dtype=bool)
            left[indices] = False
            more = np.flatnonzero(left)[:min(n_samples, n) - len(indices)].tolist()
            indices += more
            distances += [0.0] * len(more)
            stopped_by = "n_samples"
    if len(indices) == n and n_samples > n:
        stopped_by = "exhausted"
    return CoresetSelection(indices, distances, stopped_by)


def reference_select_coreset(embeddings: np.ndarray, n_samples: int, min_distance: float = -1.0, seed: int = 0,
                             pool: Optional[np.ndarray] = None,
                             device: torch.device = torch.device("cpu")) -> CoresetSelection:
    """The definition `select_coreset` is held to: textbook greedy k-center that reads every point
    once per pick with `exact_squared_distances`. Slow (minutes for a million points per hundred
    picks); for tests and benchmarks."""
    points, pool_rows = _as_tensors(embeddings, pool, device)
    n = points.shape[0]
    if n == 0 or n_samples <= 0:
        return CoresetSelection([], [], "n_samples")
    _check_finite((points.to(torch.float64) ** 2).sum(dim=1), "embeddings")
    _check_finite((pool_rows.to(torch.float64) ** 2).sum(dim=1), "pool")
    nearest = torch.full((n,), math.inf, dtype=torch.float64, device=device)
    # Points in float64 once (the conversion is exact), in blocks that stay in cache.
    points64 = points.to(torch.float64)
    rows = max(1, (1 << 20) // points.shape[1])

    def add_center(center: torch.Tensor) -> None:
        for start in range(0, n, rows):
            part = nearest[start:start + rows]
            torch.minimum(part, exact_squared_distances(points64[start:start + rows], center), out=part)

    picks: List[int] = []
    distances: List[float] = []
    if pool_rows.shape[0]:
        for row in pool_rows:
            add_center(row)
    else:
        first = int(np.random.default_rng(seed).integers(n))
        picks, distances = [first], [math.inf]
        add_center(points[first])
        nearest[first] = -math.inf
    stopped_by = "n_samples"
    while len(picks) < min(n_samples, n):
        candidate = int(torch.argmax(nearest))  # first maximum: ties go to the lowest index
        distance = math.sqrt(float(nearest[candidate]))
        if min_distance >= 0 and distance < min_distance:
            stopped_by = "min_distance"
            break
        picks.append(candidate)
        distances.append(distance)
        add_center(points[candidate])
        nearest[candidate] = -math.inf  # picked: never again
    if len(picks) == n and n_samples > n:
        stopped_by = "exhausted"
    return CoresetSelection(picks, distances, stopped_by)


def exact_squared_distances(points: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances of float32 rows (broadcast against each other), in float64.

    The differences and squares are elementwise; the sum over the d coordinates is a fixed pairwise
    tree (zero-padded to a power of two) made of elementwise additions. Every operation is one
    correctly rounded IEEE operation, so a pair gives the same bits on any device, alone or in a
    batch of any shape; the relative error is below 1e-14."""
    terms = points.to(torch.float64) - centers.to(torch.float64)
    terms.mul_(terms)
    width = terms.shape[-1]
    padded = 1 << max(0, (width - 1).bit_length())
    if padded != width:
        terms = torch.nn.functional.pad(terms, (0, padded - width))
    while padded > 1:  # in place: the same additions as building a new tensor per level, less memory traffic
        padded //= 2
        terms[..., :padded] += terms[..., padded:2 * padded]
    return terms[..., 0]


def normalize_rows(embeddings: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    return embeddings / np.maximum(norms, 1e-12)


def _as_tensors(embeddings, pool, device):
    points = torch.as_tensor(np.asarray(embeddings, dtype=np.float32), device=device)
    if points.ndim != 2:
        raise ValueError(f"embeddings must be a 2-d array (points × dimensions), got shape {tuple(points.shape)}")
    pool_array = np.zeros((0, points.shape[1]), np.float32) if pool is None else np.asarray(pool, dtype=np.float32)
    if pool_array.size == 0:
        pool_array = np.zeros((0, points.shape[1]), np.float32)
    if pool_array.ndim != 2 or pool_array.shape[1] != points.shape[1]:
        raise ValueError(f"pool must have shape (m, {points.shape[1]}) like the embeddings, got {pool_array.shape}")
    pool_rows = torch.as_tensor(pool_array, device=device)
    return points, pool_rows


def _distinct_rows(points: torch.Tensor) -> torch.Tensor:
    """For every row, the lowest index of the rows equal to it (its own index when it is the first).
    Rows are grouped by a hash of their bits and compared before they are merged, so a hash collision
    only costs a merge."""
    n, d = points.shape
    hashes = _row_hashes(points)
    rows = max(1, (1 << 20) // d)
    order = torch.argsort(hashes, stable=True)
    sorted_hashes = hashes[order]
    repeats = (sorted_hashes[1:] == sorted_hashes[:-1]).nonzero().squeeze(1) + 1
    everything = torch.arange(n, device=points.device)
    if repeats.numel() == 0:
        return everything
    run_starts = torch.ones(n, dtype=torch.bool, device=points.device)
    run_starts[repeats] = False
    run_first = order[run_starts.nonzero().squeeze(1)][run_starts.cumsum(0) - 1]  # stable sort: lowest index first
    stands_for = everything.clone()
    members, firsts = order[repeats], run_first[repeats]
    for start in range(0, members.numel(), rows):
        m, f = members[start:start + rows], firsts[start:start + rows]
        equal = (points[m] == points[f]).all(dim=1)
        stands_for[m[equal]] = f[equal]
    return stands_for


def _row_hashes(points: torch.Tensor) -> torch.Tensor:
    """An int64 hash of each float32 row's values (equal rows, -0.0 and 0.0 alike, hash equal)."""
    n, d = points.shape
    generator = torch.Generator().manual_seed(20240611)
    multipliers = (torch.randint(-2 ** 62, 2 ** 62, (d,), generator=generator) * 2 + 1).to(points.device)
    hashes = torch.empty(n, dtype=torch.int64, device=points.device)
    rows = max(1, (1 << 20) // d)
    for start in range(0, n, rows):
        bits = (points[start:start + rows] + 0.0).view(torch.int32).to(torch.int64)  # + 0.0: -0.0 is 0.0
        hashes[start:start + rows] = (bits * multipliers).sum(dim=1)  # wraps around: a hash, not a number
    return hashes


def estimate_error(largest: float, d: int) -> float:
    """Bound on |GEMM estimate − exact| of a squared distance between d-dimensional rows whose
    squared norms are at most `largest`."""
    return 1.1 * (d + 32) * _UNIT_ROUNDOFF * 4.0 * largest


def _squared_norms(rows: torch.Tensor) -> torch.Tensor:
    """Float64 squared norms of float32 rows, converted a block at a time."""
    norms = torch.empty(rows.shape[0], dtype=torch.float64, device=rows.device)
    step = max(1, _PASS_BLOCK // max(1, rows.shape[1]))
    for start in range(0, rows.shape[0], step):
        block = rows[start:start + step].to(torch.float64)
        norms[start:start + step] = (block * block).sum(dim=1)
    return norms


def _check_finite(squared_norms: torch.Tensor, name: str) -> None:
    """A row's float64 squared norm is finite exactly when all its float32 coordinates are."""
    bad = ~torch.isfinite(squared_norms)
    if bool(bad.any()):
        raise ValueError(f"{name} row {int(bad.nonzero()[0])} is not finite (NaN or inf); "
                         f"every coordinate must be a finite number")


@contextlib.contextmanager
def _full_float32_matmul():
    """The float32 screening of center-to-center distances assumes true float32 products: no TF32
    or bfloat16 shortcuts in matmul."""
    precision = torch.get_float32_matmul_precision()
    cuda_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(precision)
        torch.backends.cuda.matmul.allow_tf32 = cuda_tf32


class _GreedyKCenter:
    """The state of one selection: see the module docstring for the method.

    For every point: `nearest`, the estimated squared distance to its nearest center among the
    centers it has seen (-inf once picked); `seen`, how many centers it has seen (centers are
    numbered in the order they were added, pool first); `owner`, the center that estimate belongs to.
    A point is up to date when seen == the number of centers. `points` and `pool_rows` stay float32
    (the caller's); the rows a GEMM needs are converted to float64 as it needs them. `copies`: rows
    equal to a lower one, never picked here (select_coreset adds them last)."""

    def __init__(self, points: torch.Tensor, pool_rows: torch.Tensor, copies: torch.Tensor):
        self.device = points.device
        n, d = points.shape
        self.n, self.d = n, d
        self.points = points
        self.norms = _squared_norms(points)
        self.pool_rows, self.pool_norms = pool_rows, _squared_norms(pool_rows)
        self.copies = copies
        _check_finite(self.norms, "embeddings")
        _check_finite(self.pool_norms, "pool")
        self.set_largest(float(torch.cat([self.norms.max().reshape(1), self.pool_norms.max().reshape(1)
                                          if pool_rows.shape[0] else self.norms.new_zeros(1)]).max()))
        self.centers = self.norms.new_empty((max(16, pool_rows.shape[0] + 64), d))
        self.centers32 = points.new_empty(self.centers.shape)
        self.center_norms = self.norms.new_empty(self.centers.shape[0])
        self.n_centers = 0
        self.nearest = self.norms.new_empty(n)
        self.seen = torch.zeros(n, dtype=torch.int64, device=self.device)
        self.owner = torch.zeros(n, dtype=torch.int64, device=self.device)
        self.candidates_wanted = _SIZES.candidates
        self.batch_wanted = _SIZES.batch

    def set_largest(self, largest: float) -> None:
        """Error bounds from the largest squared norm of any point or center (a shard of the points
        takes the largest of all shards, since its centers come from them)."""
        # |estimate − exact| <= eps for every pair (float64 GEMM and exact_squared_distances both).
        self.eps = estimate_error(largest, self.d)
        # Center-to-center distances for the triangle inequality are only screened, in float32.
        self.eps32 = 1.1 * (self.d + 16) * 2.0 ** -24 * 4.0 * largest
        # The triangle inequality can only ever skip a center for a point whose squared distance is
        # below largest norm² (the diameter bounds d(c, q)); it pays off well below that.
        self.prune_below = 0.5 * largest

    # -- centers and distances -------------------------------------------------------------------

    def _add_centers(self, rows: torch.Tensor, norms: torch.Tensor) -> None:
        """Float32 rows become the next centers (kept in float64 for the GEMMs, float32 for screening)."""
        need = self.n_centers + rows.shape[0]
        if need > self.centers.shape[0]:
            grown = max(need, 2 * self.centers.shape[0])
            centers = self.centers.new_empty((grown, self.d))
            centers[:self.n_centers] = self.centers[:self.n_centers]
            centers32 = self.centers32.new_empty((grown, self.d))
            centers32[:self.n_centers] = self.centers32[:self.n_centers]
            center_norms = self.center_norms.new_empty(grown)
            center_norms[:self.n_centers] = self.center_norms[:self.n_centers]
            self.centers, self.centers32, self.center_norms = centers, centers32, center_norms
        self.centers[self.n_centers:need] = rows
        self.centers32[self.n_centers:need] = rows.to(torch.float32)
        self.center_norms[self.n_centers:need] = norms
        self.n_centers = need

    @staticmethod
    def _estimate(rows, row_norms, centers, center_norms) -> torch.Tensor:
        """Estimated squared distances, rows × centers, by one GEMM (float64: error <= eps)."""
        sums = row_norms[:, None] + center_norms[None, :]
        return torch.addmm(sums, rows, centers.T, beta=1.0, alpha=-2.0).clamp_(min=0.0)

    def _exact_nearest(self, rows: torch.Tensor, row_norms: torch.Tensor, limits: torch.Tensor) -> torch.Tensor:
        """Exact squared distance from each float32 row to its nearest center among centers [0, limit).

        The exact nearest center's estimate is within 2·eps of the smallest estimate, so only the
        centers that close are recomputed exactly."""
        out = torch.full((rows.shape[0],), math.inf, dtype=torch.float64, device=self.device)
        if rows.shape[0] == 0:
            return out
        width = int(limits.max())
        if width == 0:
            return out
        step = max(1, min(_BLOCK // width, _EXACT_BLOCK // self.d))
        columns = torch.arange(width, device=self.device)
        for start in range(0, rows.shape[0], step):
            part = slice(start, start + step)
            estimates = self._estimate(rows[part].to(torch.float64), row_norms[part], self.centers[:width],
                                       self.center_norms[:width])
            beyond = columns[None, :] >= limits[part, None]
            estimates.masked_fill_(beyond, math.inf)
            smallest = estimates.min(dim=1).values
            close = (estimates <= (smallest + 2 * self.eps)[:, None]) & ~beyond
            which_row, which_center = close.nonzero(as_tuple=True)
            exact = exact_squared_distances(rows[part][which_row], self.centers[which_center])
            out[part] = out[part].scatter_reduce(0, which_row, exact, reduce="amin")
        return out

    def top_estimates(self, wanted: int, n_unpicked: int):
        """The `wanted` unpicked points with the largest estimates, and a bound that every other
        point's estimate is at or under (-inf when none is left out)."""
        if wanted < n_unpicked:
            top = torch.topk(self.nearest, wanted + 1)
            return top.indices[:wanted], float(top.values[wanted])
        return (self.nearest > -math.inf).nonzero().squeeze(1), -math.inf

    # -- bringing points up to date --------------------------------------------------------------

    def _meet(self, index: torch.Tensor, columns: torch.Tensor) -> None:
        """Lower the estimates of points `index` with the centers numbered `columns`."""
        columns_rows, columns_norms = self.centers[columns], self.center_norms[columns]
        estimates = self._estimate(self.points[index].to(torch.float64), self.norms[index], columns_rows,
                                   columns_norms)
        smallest, which = estimates.min(dim=1)
        current = self.nearest[index]
        closer = smallest < current
        self.nearest[index] = torch.where(closer, smallest, current)
        owner = columns[which]
        self.owner[index] = torch.where(closer, owner, self.owner[index])

    def _bring_up_to_date(self, index: torch.Tensor, bound: float = -math.inf) -> None:
        """Show points `index` the centers they have not seen, or, for points far from every center,
        only as many (oldest first) as it takes to bring their estimate to `bound` or below: a point
        under the bound cannot be the next pick, and an estimate stays an upper bound."""
        if index.numel() == 0:
            return
        far = self.nearest[index] >= self.prune_below
        self._meet_all(index[far], bound)
        near = index[~far]
        self._meet_pruned(near)
        self.seen[near] = self.n_centers

    def _meet_all(self, index: torch.Tensor, bound: float) -> None:
        """Unseen centers in blocks, points grouped by how many they have seen; a point leaves as
        soon as its estimate is at or under `bound`."""
        if index.numel() == 0:
            return
        index = index[torch.argsort(self.seen[index])]
        for start in range(0, index.numel(), _SIZES.rows):
            part = index[start:start + _SIZES.rows]
            nearest, owner, seen = self.nearest[part], self.owner[part], self.seen[part]
            rows, row_norms = self.points[part].to(torch.float64), self.norms[part]
            active = torch.arange(part.numel(), device=self.device)  # positions in `part` still going
            first = int(seen.min())
            while active.numel() and first < self.n_centers:
                end = min(self.n_centers, first + _SIZES.centers)
                estimates = self._estimate(rows, row_norms, self.centers[first:end], self.center_norms[first:end])
                smallest, which = estimates.min(dim=1)
                current = nearest[active]
                closer = smallest < current
                nearest[active] = torch.where(closer, smallest, current)
                owner[active] = torch.where(closer, which + first, owner[active])
                seen[active] = torch.clamp(seen[active], min=end)
                going = nearest[active] > bound
                n_going = int(going.sum())
                if n_going < 0.75 * active.numel():  # drop the points that are done
                    active, rows, row_norms = active[going], rows[going], row_norms[going]
                first = end
            self.nearest[part], self.owner[part], self.seen[part] = nearest, owner, seen

    def _meet_pruned(self, index: torch.Tensor) -> None:
        """Unseen centers that pass the triangle-inequality test for the point's owner group.

        Group the points by owner c; r = the group's largest estimate. A center q with
        d(c, q)² >= 4·(r + eps) + eps (in exact terms) is no closer to any of them than c is."""
        if index.numel() == 0:
            return
        owners = self.owner[index]
        groups, group_of = torch.unique(owners, return_inverse=True)
        n_groups = groups.shape[0]
        radius = self.nearest.new_full((n_groups,), -math.inf).scatter_reduce(
            0, group_of, self.nearest[index], reduce="amax")
        first_unseen = torch.full((n_groups,), self.n_centers, dtype=torch.int64, device=self.device)
        first_unseen = first_unseen.scatter_reduce(0, group_of, self.seen[index], reduce="amin")
        # Groups in order of their first unseen center, points in the order of their group.
        group_order = torch.argsort(first_unseen)
        rank = torch.empty_like(group_order)
        rank[group_order] = torch.arange(n_groups, device=self.device)
        point_rank = rank[group_of]
        point_order = torch.argsort(point_rank, stable=True)
        index, point_rank = index[point_order], point_rank[point_order]
        groups, first_unseen, radius = groups[group_order], first_unseen[group_order], radius[group_order]
        threshold = (4 * (radius + 2 * self.eps) + 2 * self.eps32).to(torch.float32)
        group_ends = torch.bincount(point_rank, minlength=n_groups).cumsum(0).tolist()
        first_unseen_host = first_unseen.tolist()
        start_group = 0
        while start_group < n_groups:
            first = first_unseen_host[start_group]
            width = self.n_centers - first
            end_group = int(min(n_groups, start_group + max(1, min(_SIZES.groups, _BLOCK // max(width, 1)))))
            block = slice(start_group, end_group)
            near = self.centers32[groups[block]]
            later = self.centers32[first:self.n_centers]
            between = self._estimate(near, (near * near).sum(dim=1), later, (later * later).sum(dim=1))
            numbers = torch.arange(first, self.n_centers, device=self.device)
            relevant = (between < threshold[block, None]) & (numbers[None, :] >= first_unseen[block, None])
            point_start = group_ends[start_group - 1] if start_group else 0
            point_end = group_ends[end_group - 1]
            for part_start in range(point_start, point_end, _SIZES.group_points):
                part = slice(part_start, min(point_end, part_start + _SIZES.group_points))
                local = torch.unique_consecutive(point_rank[part]) - start_group
                columns = relevant[local].any(dim=0).nonzero().squeeze(1) + first
                if columns.numel():
                    self._meet(index[part], columns)
            start_group = end_group

    # -- picks -------------------------------------------------------------------------------------

    def _round(self, remaining: int):
        """Bring the points with the largest estimates up to date, then take as many certain picks
        as possible among them. Returns (picks tensor, why the round stopped)."""
        n_centers = self.n_centers
        n_unpicked = int((self.nearest > -math.inf).sum())
        top, stale_bound = self.top_estimates(min(self.candidates_wanted, n_unpicked), n_unpicked)
        self._bring_up_to_date(top[self.seen[top] < n_centers], stale_bound)
        current = top[self.nearest[top] > stale_bound]
        if current.numel() == 0:
            self.candidates_wanted = min(self.n, 2 * self.candidates_wanted)
            return current, "stale"
        # Simulate on the top few times `batch` of them only; the others wait (stale) like the rest.
        batch = int(min(self.batch_wanted, current.numel(), remaining))
        simulated = min(current.numel(), max(_SIZES.simulated, 4 * batch))
        outside_bound = stale_bound
        if simulated < current.numel():
            best_current = torch.topk(self.nearest[current], simulated + 1)
            outside_bound = max(stale_bound, float(best_current.values[simulated]))
            current = current[best_current.indices[:simulated]]
        current = current.sort().values
        values = self.nearest[current].clone()
        owners = self.owner[current].clone()
        batch_positions = torch.topk(values, batch).indices
        rows = self.points[current].to(torch.float64)
        between = self._estimate(rows[batch_positions], self.norms[current[batch_positions]], rows,
                                 self.norms[current])
        row_of = torch.full((current.numel(),), -1, dtype=torch.int64, device=self.device)
        row_of[batch_positions] = torch.arange(batch, device=self.device)
        picked, values, owners, best, last_flags = simulate_picks(values, owners, between, row_of, batch,
                                                                  outside_bound, self.eps, n_centers)
        taken = picked[picked >= 0]
        if taken.numel() == batch:
            reason = "batch"
        elif not bool(last_flags[0]):
            reason = "batch"
        elif not bool(last_flags[1]):
            reason = "tie"
        elif bool(best - stale_bound > 2 * self.eps):
            reason = "batch"  # stopped by the points left out of the simulation
        else:
            reason = "stale"
        self.nearest[current] = values
        self.owner[current] = owners
        self.seen[current] = n_centers + taken.numel()
        chosen = current[taken]
        self._add_centers(self.points[chosen], self.norms[chosen])
        # Adapt: a round cut short by stale bounds wants more points brought up to date; a round that
        # used its whole batch wants a bigger batch.
        if reason == "stale" and 2 * taken.numel() < batch:
            self.candidates_wanted = min(self.n, 2 * self.candidates_wanted)
        elif reason == "batch" and 2 * taken.numel() >= batch and batch == self.batch_wanted:
            if self.batch_wanted < _SIZES.max_batch:
                self.batch_wanted = min(_SIZES.max_batch, 2 * self.batch_wanted)
            else:
                self.candidates_wanted = max(_SIZES.min_candidates, self.candidates_wanted * 3 // 4)
        elif taken.numel() < batch // 4:
            self.batch_wanted = max(_SIZES.min_batch, self.batch_wanted // 2)
        return chosen, reason

    def _settle_tie(self):
        """One pick by exact distances: bring every point that might be the farthest up to date,
        then recompute the exact distance of each point within 2·eps of the top."""
        while True:
            unpicked = self.nearest > -math.inf
            current = unpicked & (self.seen == self.n_centers)
            top = float(self.nearest[current].max()) if bool(current.any()) else -math.inf
            stale = unpicked & (self.seen < self.n_centers) & (self.nearest >= top - 2 * self.eps)
            n_stale = int(stale.sum())
            if n_stale == 0:
                break
            if n_stale > self.candidates_wanted:
                index = torch.topk(torch.where(stale, self.nearest, -math.inf), self.candidates_wanted).indices
            else:
                index = stale.nonzero().squeeze(1)
            self._bring_up_to_date(index, top - 2 * self.eps)
        near = (current & (self.nearest >= top - 2 * self.eps)).nonzero().squeeze(1)
        exact = self._exact_nearest(self.points[near], self.norms[near],
                                    torch.full_like(near, self.n_centers))
        best = exact.max()
        winner = near[(exact == best).nonzero()[0, 0]]
        return winner, float(best)

    def _take(self, index: torch.Tensor) -> None:
        """Make points `index` centers outside a round (they are then up to date with themselves)."""
        self.nearest[index] = -math.inf
        self._add_centers(self.points[index], self.norms[index])

    def select(self, target: int, min_distance: float, first: Optional[int]):
        """Up to `target` picks, the first one `first` unless there is a pool. Returns (picks, their
        distances, "n_samples" | "min_distance" | "zeros"); "zeros" when every point left is a copy
        of a center (distance 0), which `select_coreset` finishes."""
        picks: List[int] = []
        distances: List[float] = []
        if self.pool_rows.shape[0]:
            self._add_centers(self.pool_rows, self.pool_norms)
        else:
            picks, distances = [first], [math.inf]
            self._add_centers(self.points[first:first + 1], self.norms[first:first + 1])
        self._meet_first_center()
        self.nearest[self.copies] = -math.inf
        if first is not None:
            self.nearest[first] = -math.inf
        progress = _progress(target, self.n * self.d)
        stopped_by = "n_samples"
        while len(picks) < target and stopped_by == "n_samples":
            before = self.n_centers
            chosen, _ = self._round(target - len(picks))
            if chosen.numel():
                limits = torch.arange(before, before + chosen.numel(), device=self.device)
                exact = self._exact_nearest(self.points[chosen], self.norms[chosen], limits).tolist()
                new = list(zip(chosen.tolist(), exact))
            else:  # a near tie, or a stale point too close to call: settle one pick exactly
                winner, best = self._settle_tie()
                if best == 0.0:
                    stopped_by = "zeros"
                    break
                new = [(int(winner), best)]
                self._take(winner.reshape(1))
            for index, squared in new:
                distance = math.sqrt(squared)
                if min_distance >= 0 and distance < min_distance:
                    stopped_by = "min_distance"
                    break
                picks.append(index)
                distances.append(distance)
            if progress is not None:
                progress.update(len(new))
        if progress is not None:
            progress.close()
        return picks, distances, stopped_by

    def _meet_first_center(self) -> None:
        rows = max(1, _PASS_BLOCK // self.d)
        for start in range(0, self.n, rows):
            part = slice(start, start + rows)
            self.nearest[part] = self._estimate(self.points[part].to(torch.float64), self.norms[part],
                                                self.centers[:1], self.center_norms[:1])[:, 0]
        self.owner.zero_()
        self.seen.fill_(1)


def simulate_picks(values: torch.Tensor, owners: torch.Tensor, between: torch.Tensor, row_of: torch.Tensor,
                   batch: int, outside_bound: float, eps: float, first_center: int):
    """Up to `batch` greedy picks among up-to-date candidates, each taken only when its estimate
    beats every other candidate's and `outside_bound` by more than 2·eps. values/owners: the
    candidates' estimates and their centers; between: estimates from the batch rows (row_of maps a
    candidate to its row, -1 if none) to every candidate. The picks become centers numbered from
    `first_center`. Returns (picked positions, -1 past the last pick; values; owners; the last
    step's best estimate; which test the last step passed: in batch, clear of the batch, clear of
    the bound)."""
    device = values.device
    picked = torch.full((batch,), -1, dtype=torch.int64, device=device)
    going = torch.ones((), dtype=torch.bool, device=device)
    best = last_flags = None
    check_every = _SIZES.steps_per_check_cpu if device.type == "cpu" else _SIZES.steps_per_check_gpu
    runner_up = torch.full((1,), -math.inf, dtype=torch.float64, device=device)
    for step in range(batch):
        top = torch.topk(values, min(2, values.numel()))
        best, position = top.values[0], top.indices[0]
        second = top.values[1] if values.numel() > 1 else runner_up[0]
        row = row_of[position]
        in_batch = row >= 0
        clear_of_batch = best - second > 2 * eps
        clear_of_stale = best - outside_bound > 2 * eps
        ok = going & in_batch & clear_of_batch & clear_of_stale
        distances = between[row.clamp(min=0)]
        closer = ok & (distances < values)
        values = torch.where(closer, distances, values)
        owners = torch.where(closer, first_center + step, owners)
        values[position] = torch.where(ok, -math.inf, values[position])
        picked[step] = torch.where(ok, position, -1)
        going = ok
        last_flags = (in_batch, clear_of_batch, clear_of_stale)
        if (step + 1) % check_every == 0 and not bool(going):
            break
    return picked, values, owners, best, last_flags


def _progress(total: int, work: int):
    """A progress line for selections that take a while; none for small ones."""
    if work < 50_000_000:
        return None
    from app.progress import Progress

    return Progress(total, "coreset", unit="pick")
