"""The exact greedy k-center coreset of app/sampling/coreset.py on a Ray cluster, the points sharded
across actors: the same picks, the same distances bit for bit, the same stop as `select_coreset`.

Each actor holds a contiguous block of rows (read from the .npy with a memory map, so the driver
never holds the matrix) and the greedy's state for them: a `_GreedyKCenter` over its shard, with
every center (pool rows, then picks, numbered alike on every actor), its float64 GEMM estimates,
lazy updates and triangle inequality. The error bound `eps` comes from the largest norm of all
shards and the pool, so it holds for every estimate anywhere.

A round is one call to every actor, in parallel. An actor adds the centers picked in the round
before, computes the exact distances of its own picks among them (against the centers before each,
as the local code does), brings its points with the largest estimates up to date and reports its
best up-to-date points (global index, estimate, center, vector) and `bound`: every other point of
its shard has an estimate at or below it. It always reports every point within 2·eps of its own
best estimate, with exact distances, and keeps `bound` below that group (bringing stale points up
to date until it is).

The driver then simulates picks among the reported points exactly as the local code simulates a
round (`coreset.simulate_picks`: GEMM estimates between the top `batch` of them and all of them),
taking a pick only while its estimate beats every other reported estimate and every actor's bound
by more than 2·eps: then its exact distance is the largest of all points, strictly. When the top is
a near tie, the first pick of the round is settled by exact distances: every point within 2·eps
of the best estimate anywhere was reported with its exact distance, so the largest exact distance
(ties to the lowest index) among them is the farthest point. A pick's distance reaches the driver
one round later, from its actor, and min_distance truncates the picks there. The updated estimates
of the reported points go back to their actors with the new centers, so no actor repeats the
driver's GEMM. The batch and the report sizes adapt as the local ones do.

Copies (equal rows) are found as `select_coreset` finds them: the actors hash their rows, the
driver sorts the N hashes (8 bytes a point) and compares the rows of colliding hashes, fetched a
block at a time.
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Union

import numpy as np
import torch

from app.sampling import coreset
from app.sampling.coreset import CoresetSelection, _GreedyKCenter


@dataclass
class RayCoresetStats:
    rounds: int = 0             # pick rounds: one call to every actor each
    round_trips: int = 0        # every wave of calls the driver waited for, setup included
    bytes_sent: int = 0         # array payloads to the actors (a broadcast counts once per actor)
    bytes_received: int = 0     # array payloads from the actors
    actors: int = 0
    setup_s: float = 0.0        # actors started, shards loaded, copies found, first centers met
    picks_s: float = 0.0        # the rounds


@dataclass
class RayCoresetSelection(CoresetSelection):
    stats: RayCoresetStats = field(default_factory=RayCoresetStats, compare=False)


def select_coreset_on_ray(points_file: Union[str, os.PathLike, np.ndarray], n_samples: int,
                          min_distance: float = -1.0, seed: int = 0, pool: Optional[np.ndarray] = None,
                          actors: int = 2, num_cpus_per_actor: int = 1,
                          block_sizes: Optional[coreset._Sizes] = None) -> RayCoresetSelection:
    """`select_coreset(points, n_samples, min_distance, seed, pool=pool)` on the running Ray cluster,
    the points split across `actors` actors (fewer when the cluster's CPUs hold fewer). `points_file`: a float32 .npy (N × d) that every actor
    can read at that path; an array is written to a temporary .npy first (a single-machine cluster
    only). `block_sizes`: the local code's block sizes, for tests (the actors run in other processes)."""
    import ray

    if not ray.is_initialized():
        raise RuntimeError("select_coreset_on_ray needs a running Ray: call ray.init() (or connect) first")
    if isinstance(points_file, np.ndarray):
        if points_file.ndim != 2:
            raise ValueError(f"embeddings must be a 2-d array (points × dimensions), got shape {points_file.shape}")
        folder = tempfile.mkdtemp(prefix="thresher-coreset-")
        try:
            path = os.path.join(folder, "points.npy")
            np.save(path, np.asarray(points_file, dtype=np.float32))
            return select_coreset_on_ray(path, n_samples, min_distance, seed, pool, actors, num_cpus_per_actor,
                                         block_sizes)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    points = np.load(points_file, mmap_mode="r")
    if points.ndim != 2 or points.dtype != np.float32:
        raise ValueError(f"{points_file} must hold a 2-d float32 array (points × dimensions), "
                         f"got {points.dtype} of shape {points.shape}")
    n, d = points.shape
    del points
    if n == 0 or n_samples <= 0:
        return RayCoresetSelection([], [], "n_samples")
    pool_rows = _pool_array(pool, d)
    sizes = block_sizes or coreset._SIZES
    n_actors = max(1, min(actors, n, _actors_that_fit(ray, num_cpus_per_actor)))
    bounds = np.linspace(0, n, n_actors + 1).round().astype(np.int64)
    shard_class = ray.remote(num_cpus=num_cpus_per_actor)(_Shard)
    pool_ref = ray.put(pool_rows)
    shards = [shard_class.remote(os.fspath(points_file), int(bounds[i]), int(bounds[i + 1]), pool_ref,
                                 num_cpus_per_actor, sizes, n_actors) for i in range(n_actors)]
    try:
        driver = _Driver(ray, shards, bounds, n, d, pool_rows, sizes)
        return driver.select(n_samples, min_distance, seed)
    finally:
        for shard in shards:
            ray.kill(shard)


def _actors_that_fit(ray, num_cpus_per_actor: float) -> int:
    """How many actors the cluster's CPUs hold at once: more would wait for CPUs forever (the
    picks do not depend on the number of actors)."""
    if num_cpus_per_actor <= 0:
        return 1 << 30
    cpus = ray.cluster_resources().get("CPU", 0.0)
    if cpus < num_cpus_per_actor:
        raise ValueError(f"num_cpus_per_actor={num_cpus_per_actor} is more than the Ray cluster's {cpus:g} CPUs; "
                         f"use at most {cpus:g}")
    return int(cpus // num_cpus_per_actor)


def _pool_array(pool, d: int) -> np.ndarray:
    rows = np.zeros((0, d), np.float32) if pool is None else np.asarray(pool, dtype=np.float32)
    if rows.size == 0:
        return np.zeros((0, d), np.float32)
    if rows.ndim != 2 or rows.shape[1] != d:
        raise ValueError(f"pool must have shape (m, {d}) like the embeddings, got {rows.shape}")
    return np.ascontiguousarray(rows)


def _nbytes(payload) -> int:
    if isinstance(payload, np.ndarray):
        return payload.nbytes
    if isinstance(payload, dict):
        return sum(_nbytes(value) for value in payload.values())
    if isinstance(payload, (list, tuple)):
        return sum(_nbytes(value) for value in payload)
    return 8


class _Driver:
    """The picks: the actors' reports in, the simulated picks and the new centers out."""

    def __init__(self, ray, shards, bounds, n, d, pool_rows, sizes):
        self.ray, self.shards, self.bounds, self.n, self.d = ray, shards, bounds, n, d
        self.pool_rows, self.sizes = pool_rows, sizes
        self.stats = RayCoresetStats(actors=len(shards))

    def _wave(self, calls, sent=0):
        """Wait for one call per actor (or any list of calls): one round trip."""
        from ray.exceptions import RayTaskError

        try:
            replies = self.ray.get(calls)
        except RayTaskError as error:
            if isinstance(error.cause, ValueError):  # a user's bad input, as select_coreset raises it
                raise error.cause from None
            raise
        self.stats.round_trips += 1
        self.stats.bytes_sent += sent
        self.stats.bytes_received += _nbytes(replies)
        return replies

    def _owner_of(self, indices: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.bounds, indices, side="right") - 1

    def _rows(self, indices: np.ndarray) -> np.ndarray:
        """The float32 rows at global `indices`, fetched from their actors."""
        owners = self._owner_of(indices)
        asked = [indices[owners == a] for a in range(len(self.shards))]
        replies = self._wave([shard.rows.remote(part) for shard, part in zip(self.shards, asked) if part.size],
                             sent=sum(part.nbytes for part in asked))
        rows = np.empty((indices.size, self.d), np.float32)
        filled = iter(replies)
        for a, part in enumerate(asked):
            if part.size:
                rows[owners == a] = next(filled)
        return rows

    def _copies(self, hashes: np.ndarray) -> np.ndarray:
        """For every row equal to a lower one (its hash run's first): (row, that lower row), as
        coreset._distinct_rows pairs them."""
        order = np.argsort(hashes, kind="stable")
        sorted_hashes = hashes[order]
        repeats = np.flatnonzero(sorted_hashes[1:] == sorted_hashes[:-1]) + 1
        if repeats.size == 0:
            return np.zeros((0, 2), np.int64)
        run_starts = np.ones(self.n, dtype=bool)
        run_starts[repeats] = False
        run_first = order[np.flatnonzero(run_starts)][np.cumsum(run_starts) - 1]
        members, firsts = order[repeats], run_first[repeats]
        step = max(1, (1 << 22) // self.d)
        equal = np.zeros(members.size, dtype=bool)
        for start in range(0, members.size, step):
            m, f = members[start:start + step], firsts[start:start + step]
            equal[start:start + step] = (self._rows(m) == self._rows(f)).all(axis=1)
        return np.stack([members[equal], firsts[equal]], axis=1)

    def select(self, n_samples: int, min_distance: float, seed: int) -> RayCoresetSelection:
        started = time.perf_counter()
        described = self._wave([shard.describe.remote() for shard in self.shards])
        n, d = self.n, self.d
        largest = max([norm for norm, _ in described] +
                      ([float(coreset._squared_norms(torch.as_tensor(self.pool_rows)).max())]
                       if len(self.pool_rows) else []))
        hashes = np.concatenate([h for _, h in described])
        del described
        copies = self._copies(hashes)
        del hashes
        first = None if len(self.pool_rows) else int(np.random.default_rng(seed).integers(n))
        stands_for_first = first
        if first is not None:
            match = copies[copies[:, 0] == first]
            stands_for_first = int(match[0, 1]) if match.size else first
        first_row = None if first is None else self._rows(np.array([stands_for_first]))
        self.eps = coreset.estimate_error(largest, d)
        owners = self._owner_of(copies[:, 0])
        self._wave([shard.begin.remote(largest, copies[owners == a, 0], first_row, stands_for_first)
                    for a, shard in enumerate(self.shards)],
                   sent=len(self.shards) * (8 + (0 if first_row is None else first_row.nbytes)) + copies[:, 0].nbytes)
        target = min(n_samples, n - len(copies))
        self.stats.setup_s = time.perf_counter() - started
        picks, distances, stopped_by = self._greedy(target, min_distance, stands_for_first)
        self.stats.picks_s = time.perf_counter() - started - self.stats.setup_s
        if first is not None:
            picks[0] = first  # the random pick may be any copy, not the lowest
        chosen = coreset._copies_last(picks, distances, stopped_by, n, n_samples, min_distance)
        return RayCoresetSelection(chosen.indices, chosen.distances, chosen.stopped_by, self.stats)

    def _greedy(self, target: int, min_distance: float, first: Optional[int]):
        """Up to `target` picks, as _GreedyKCenter.select makes them."""
        picks: List[int] = [] if first is None else [first]
        distances: List[float] = [] if first is None else [math.inf]
        n_centers = len(self.pool_rows) or 1
        n_actors = len(self.shards)
        self.batch_wanted = self.sizes.batch
        self.report = [self._report_floor()] * n_actors
        self.last_report = [(np.zeros(0, np.int64), np.zeros((0, self.d), np.float32))] * n_actors
        hints: List[Optional[str]] = [None] * n_actors
        updates: List[Optional[dict]] = [None] * n_actors
        centers = np.zeros((0, self.d), np.float32)
        center_indices = np.zeros(0, np.int64)
        progress = coreset._progress(target, self.n * self.d)
        stopped_by = "n_samples"
        search = len(picks) < target
        while search or center_indices.size:
            centers_ref = self.ray.put({"rows": centers, "indices": center_indices})
            calls = [shard.round.remote(centers_ref, updates[a], hints[a], self.report[a] if search else 0)
                     for a, shard in enumerate(self.shards)]
            replies = self._wave(calls, sent=n_actors * (centers.nbytes + center_indices.nbytes) + _nbytes(updates))
            self.stats.rounds += 1
            exact: Dict[int, float] = {}
            for reply in replies:
                exact.update(zip(reply["picked"].tolist(), reply["picked_exact"].tolist()))
            confirmed = 0
            for index in center_indices.tolist():
                distance = math.sqrt(exact[index])
                if min_distance >= 0 and distance < min_distance:
                    stopped_by = "min_distance"
                    break
                picks.append(index)
                distances.append(distance)
                confirmed += 1
            if progress is not None and confirmed:
                progress.update(confirmed)
            if stopped_by != "n_samples" or not search:
                break
            taken, updates, hints, zeros = self._simulate(replies, target - len(picks), n_centers)
            if zeros:
                stopped_by = "zeros"
                break
            center_indices = taken["indices"]
            centers = taken["rows"]
            n_centers += center_indices.size
            search = len(picks) + center_indices.size < target
        if progress is not None:
            progress.close()
        return picks, distances, stopped_by

    def _vectors(self, a: int, reply: dict) -> np.ndarray:
        """The vectors of what actor `a` reported: the fresh ones it sent, the others from its last report."""
        indices = reply["indices"]
        vectors = np.empty((indices.size, self.d), np.float32)
        vectors[reply["fresh"]] = reply["vectors"]
        kept = ~reply["fresh"]
        if kept.any():
            last_indices, last_vectors = self.last_report[a]
            order = np.argsort(last_indices)
            vectors[kept] = last_vectors[order[np.searchsorted(last_indices, indices[kept], sorter=order)]]
        self.last_report[a] = (indices, vectors)
        return vectors

    def _report_floor(self) -> int:
        """Points each actor reports: its share of what a local round simulates on, and an eighth
        more (a shard holding more than its share of the top makes its report grow)."""
        wanted = max(self.sizes.simulated, 4 * self.batch_wanted)
        return -(-wanted * 9 // (8 * len(self.shards)))

    def _simulate(self, replies, remaining: int, n_centers: int):
        """The round's picks among the reported points (see the module docstring). Returns (the picks'
        indices and rows, per actor the updated estimates of what it reported and a size hint,
        whether every point left is at distance 0)."""
        eps = self.eps
        counts = [reply["indices"].size for reply in replies]
        offsets = np.concatenate([[0], np.cumsum(counts)])
        indices = torch.as_tensor(np.concatenate([reply["indices"] for reply in replies]))
        values = torch.as_tensor(np.concatenate([reply["values"] for reply in replies]))
        owners = torch.as_tensor(np.concatenate([reply["owners"] for reply in replies]))
        vectors = torch.as_tensor(np.concatenate([self._vectors(a, reply) for a, reply in enumerate(replies)]))
        exact = torch.full_like(values, math.nan)
        for a, reply in enumerate(replies):
            exact[torch.as_tensor(reply["group"] + offsets[a])] = torch.as_tensor(np.array(reply["group_exact"]))
        actor_bounds = [reply["bound"] for reply in replies]
        outside_bound = max(actor_bounds)
        total = values.numel()
        if total == 0:
            raise RuntimeError("coreset on ray: no actor reported a point, yet picks are wanted")
        batch = int(min(self.batch_wanted, total, remaining))
        batch_positions = torch.topk(values, batch).indices
        top = torch.topk(values, min(2, total))
        best = float(top.values[0])
        second = float(top.values[1]) if total > 1 else -math.inf
        settled = None
        if not (best - second > 2 * eps and best - outside_bound > 2 * eps):
            # A near tie: every point within 2·eps of the best estimate came with its exact distance.
            group = (values >= best - 2 * eps).nonzero().squeeze(1)
            group_exact = exact[group]
            assert not bool(torch.isnan(group_exact).any()), "an actor left out a near tie's exact distance"
            largest = group_exact.max()
            if float(largest) == 0.0:
                return None, None, None, True
            tied = group[group_exact == largest]
            settled = int(tied[torch.argmin(indices[tied])])
            if not bool((batch_positions == settled).any()):
                batch_positions[-1] = settled
        rows = vectors.to(torch.float64)
        norms = coreset._squared_norms(vectors)
        between = _GreedyKCenter._estimate(rows[batch_positions], norms[batch_positions], rows, norms)
        row_of = torch.full((total,), -1, dtype=torch.int64)
        row_of[batch_positions] = torch.arange(batch)
        first_center, steps = n_centers, batch
        if settled is not None:
            distances = between[row_of[settled]]
            closer = distances < values
            values = torch.where(closer, distances, values)
            owners = torch.where(closer, n_centers, owners)
            values[settled] = -math.inf
            first_center, steps = n_centers + 1, batch - 1
        picked, values, owners, last_best, flags = coreset.simulate_picks(
            values, owners, between, row_of, steps, outside_bound, eps, first_center)
        taken = picked[picked >= 0]
        if settled is not None:
            taken = torch.cat([torch.tensor([settled]), taken])
        hints = self._adapt(batch, taken.numel(), flags, last_best, actor_bounds, replies)
        updates = [{"values": values[offsets[a]:offsets[a + 1]].numpy(),
                    "owners": owners[offsets[a]:offsets[a + 1]].numpy()} for a in range(len(replies))]
        return ({"indices": indices[taken].numpy(), "rows": vectors[taken].numpy()}, updates, hints, False)

    def _adapt(self, batch, n_taken, flags, last_best, actor_bounds, replies) -> List[Optional[str]]:
        """The local code's rules: a round cut short by an actor's stale points makes that actor
        bring more up to date, one cut short by what an actor reported makes it report more, and
        a round that used its whole batch wants a bigger batch."""
        hints: List[Optional[str]] = [None] * len(self.shards)
        sizes = self.sizes
        reason = "batch"
        if n_taken < batch and flags is not None and bool(flags[0]):
            reason = "tie" if not bool(flags[1]) else "bound"
        if reason == "bound" and 2 * n_taken < batch:
            for a, bound in enumerate(actor_bounds):
                if float(last_best) - bound <= 2 * self.eps:
                    if replies[a]["stale_limited"]:
                        hints[a] = "grow"
                    else:
                        self.report[a] = min(2 * self.report[a], max(sizes.simulated, 4 * sizes.max_batch))
        elif reason == "batch" and 2 * n_taken >= batch and batch == self.batch_wanted:
            if self.batch_wanted < sizes.max_batch:
                self.batch_wanted = min(sizes.max_batch, 2 * self.batch_wanted)
            else:
                hints = ["shrink"] * len(self.shards)
        elif n_taken < batch // 4:
            self.batch_wanted = max(sizes.min_batch, self.batch_wanted // 2)
        self.report = [max(size, self._report_floor()) for size in self.report]
        return hints


class _Shard:
    """An actor: rows [start, end) of the points and the greedy's state for them."""

    def __init__(self, points_file: str, start: int, end: int, pool: np.ndarray, threads: int,
                 sizes: coreset._Sizes, n_actors: int):
        torch.set_num_threads(max(1, int(threads)))
        coreset._SIZES = sizes  # this process's copy of the module: the driver's sizes
        self.offset = start
        self.points = torch.from_numpy(np.array(np.load(points_file, mmap_mode="r")[start:end], dtype=np.float32))
        self.pool = torch.from_numpy(np.array(pool, dtype=np.float32))
        self.n_actors = n_actors
        self.kcenter: Optional[_GreedyKCenter] = None
        self.reported = torch.zeros(0, dtype=torch.int64)

    def describe(self):
        """(largest squared norm of the shard, the rows' hashes); refuses non-finite rows."""
        try:
            self.kcenter = _GreedyKCenter(self.points, self.pool, torch.zeros(0, dtype=torch.int64))
        except ValueError as error:
            if "embeddings row" not in str(error):
                raise
            bad = int(np.flatnonzero(~np.isfinite(self.points.numpy()).all(axis=1))[0])
            raise ValueError(f"embeddings row {self.offset + bad} is not finite (NaN or inf); "
                             f"every coordinate must be a finite number") from None
        return float(self.kcenter.norms.max()), coreset._row_hashes(self.points).numpy()

    def rows(self, indices: np.ndarray) -> np.ndarray:
        return self.points[torch.as_tensor(indices - self.offset)].numpy()

    def begin(self, largest: float, copies: np.ndarray, first_row: Optional[np.ndarray], first: Optional[int]):
        """The first centers (the pool, or the random first pick), met by every point; copies and
        the first pick are never candidates."""
        kcenter = self.kcenter
        kcenter.set_largest(largest)
        kcenter.candidates_wanted = max(coreset._SIZES.min_candidates, coreset._SIZES.candidates // self.n_actors)
        if kcenter.pool_rows.shape[0]:
            kcenter._add_centers(kcenter.pool_rows, kcenter.pool_norms)
        else:
            row = torch.from_numpy(np.array(first_row))
            kcenter._add_centers(row, coreset._squared_norms(row))
        with coreset._full_float32_matmul():
            kcenter._meet_first_center()
        kcenter.nearest[torch.as_tensor(copies - self.offset, dtype=torch.int64)] = -math.inf
        if first is not None and self.offset <= first < self.offset + kcenter.n:
            kcenter.nearest[first - self.offset] = -math.inf
        return None

    def round(self, centers: dict, update: Optional[dict], hint: Optional[str], report: int) -> dict:
        """Take the new centers and the driver's estimates for what this actor reported last; the
        exact distances of this shard's new picks; then, if `report`, the next report."""
        kcenter = self.kcenter
        before = kcenter.n_centers
        rows = torch.from_numpy(np.array(centers["rows"], dtype=np.float32))
        if rows.shape[0]:
            kcenter._add_centers(rows, coreset._squared_norms(rows))
        if update is not None:
            kcenter.nearest[self.reported] = torch.from_numpy(np.array(update["values"]))
            kcenter.owner[self.reported] = torch.from_numpy(np.array(update["owners"]))
            kcenter.seen[self.reported] = kcenter.n_centers
        indices = np.asarray(centers["indices"], dtype=np.int64)
        mine = np.flatnonzero((indices >= self.offset) & (indices < self.offset + kcenter.n))
        local = torch.as_tensor(indices[mine] - self.offset)
        kcenter.nearest[local] = -math.inf
        limits = torch.as_tensor(before + mine, dtype=torch.int64)
        with coreset._full_float32_matmul():
            picked_exact = kcenter._exact_nearest(self.points[local], kcenter.norms[local], limits)
            if hint == "grow":
                kcenter.candidates_wanted = min(kcenter.n, 2 * kcenter.candidates_wanted)
            elif hint == "shrink":
                kcenter.candidates_wanted = max(coreset._SIZES.min_candidates, kcenter.candidates_wanted * 3 // 4)
            reply = self._report(report) if report else {}
        reply.update(picked=indices[mine], picked_exact=picked_exact.numpy())
        return reply

    def _report(self, report: int) -> dict:
        """The shard's best up-to-date points (at most `report`, more for a near tie at the top),
        and a bound on every other point's estimate, 2·eps under the best one at least."""
        kcenter = self.kcenter
        eps = kcenter.eps
        unpicked = kcenter.nearest > -math.inf
        n_unpicked = int(unpicked.sum())
        if n_unpicked == 0:
            return self._reply(torch.zeros(0, dtype=torch.int64), -math.inf, False, -math.inf)
        while True:
            wanted = min(kcenter.candidates_wanted, n_unpicked)
            top, stale_bound = kcenter.top_estimates(wanted, n_unpicked)
            kcenter._bring_up_to_date(top[kcenter.seen[top] < kcenter.n_centers], stale_bound)
            current = top[kcenter.nearest[top] > stale_bound]
            if current.numel():
                break
            kcenter.candidates_wanted = min(kcenter.n, 2 * kcenter.candidates_wanted)
        best = float(kcenter.nearest[current].max())
        if stale_bound >= best - 2 * eps:
            # Stale points near the top: bring every one that might reach the best up to date.
            while True:
                up_to_date = unpicked & (kcenter.seen == kcenter.n_centers)
                best = float(kcenter.nearest[up_to_date].max())
                stale = unpicked & ~up_to_date & (kcenter.nearest >= best - 2 * eps)
                n_stale = int(stale.sum())
                if n_stale == 0:
                    break
                if n_stale > kcenter.candidates_wanted:
                    index = torch.topk(torch.where(stale, kcenter.nearest, -math.inf),
                                       kcenter.candidates_wanted).indices
                else:
                    index = stale.nonzero().squeeze(1)
                kcenter._bring_up_to_date(index, best - 2 * eps)
            stale_left = unpicked & ~up_to_date
            stale_bound = float(kcenter.nearest[stale_left].max()) if bool(stale_left.any()) else -math.inf
            current = (up_to_date & (kcenter.nearest > stale_bound)).nonzero().squeeze(1)
        estimates = kcenter.nearest[current]
        size = max(report, int((estimates >= best - 2 * eps).sum()))
        bound, stale_limited = stale_bound, True
        if size < current.numel():
            chosen = torch.topk(estimates, size + 1)
            if float(chosen.values[size]) >= stale_bound:
                bound, stale_limited = float(chosen.values[size]), False
            current = current[chosen.indices[:size]]
        return self._reply(current, bound, stale_limited, best)

    def _reply(self, index: torch.Tensor, bound: float, stale_limited: bool, best: float) -> dict:
        """The report; vectors only for the points the driver did not get last round (it keeps those)."""
        kcenter = self.kcenter
        group = (kcenter.nearest[index] >= best - 2 * kcenter.eps).nonzero().squeeze(1)
        group_exact = kcenter._exact_nearest(self.points[index[group]], kcenter.norms[index[group]],
                                             torch.full_like(group, kcenter.n_centers))
        fresh = ~torch.isin(index, self.reported)
        self.reported = index
        return {"indices": (index + self.offset).numpy(), "values": kcenter.nearest[index].numpy(),
                "owners": kcenter.owner[index].numpy(), "fresh": fresh.numpy(),
                "vectors": self.points[index[fresh]].numpy(), "group": group.numpy(),
                "group_exact": group_exact.numpy(), "bound": bound, "stale_limited": stale_limited}
