"""Near-duplicate removal at scale: app.sampling.near_duplicates against the blockwise all-pairs
method it replaced (copied below as the reference), on clustered L2-normalised data with ~5% near
copies.

    .venv/bin/python bench/bench_near_duplicates.py [--sizes 100000 1000000] [--reference-limit 100000]

The reference is O(N²·d): beyond --reference-limit it runs on a prefix of that many points and its
time is extrapolated by N² (marked as such). Where both ran on the same points the outputs must be
equal (same removed and match indices, distances within float32 rounding of the reference's cdist).
"""
from __future__ import annotations

import argparse
import os
import resource
import time
from typing import List, Tuple

import numpy as np
import torch

from app.sampling.near_duplicates import find_near_duplicates

DIM = 512
THRESHOLD = 0.05
NEAR_COPY_FRACTION = 0.05


def clustered_points(n: int, dim: int = DIM, seed: int = 0) -> np.ndarray:
    """n unit vectors around n/1000 centres (spread ~0.3 apart within a centre), with ~5% near
    copies (distance ~0.01 to an earlier point) scattered through the order."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(1, n // 1000), dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    points = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 65536):
        stop = min(start + 65536, n)
        noise = rng.standard_normal((stop - start, dim), dtype=np.float32) * np.float32(0.3 / np.sqrt(dim))
        points[start:stop] = centres[rng.integers(0, len(centres), stop - start)] + noise
    copies = np.sort(rng.choice(np.arange(1, n), int(n * NEAR_COPY_FRACTION), replace=False))
    sources = (rng.random(len(copies)) * copies).astype(np.int64)
    points[copies] = points[sources] + rng.standard_normal((len(copies), dim), dtype=np.float32) * np.float32(
        0.01 / np.sqrt(dim))
    for start in range(0, n, 65536):
        block = points[start:start + 65536]
        block /= np.linalg.norm(block, axis=1, keepdims=True)
    return points


def reference_blockwise(embeddings: np.ndarray, threshold: float, block: int = 2048) -> List[Tuple[int, int, float]]:
    """The method before this change: every query block against every earlier block, torch.cdist."""
    points = torch.as_tensor(embeddings, dtype=torch.float32)
    n = points.shape[0]
    kept = torch.ones(n, dtype=torch.bool)
    removed: List[Tuple[int, int, float]] = []
    for start in range(0, n, block):
        stop = min(start + block, n)
        queries = points[start:stop]
        best = torch.full((stop - start,), float("inf"))
        best_index = torch.full((stop - start,), -1, dtype=torch.long)
        for key_start in range(0, start, block):
            key_stop = min(key_start + block, start)
            distances = torch.cdist(queries, points[key_start:key_stop])
            distances[:, ~kept[key_start:key_stop]] = float("inf")
            value, index = distances.min(dim=1)
            closer = value < best
            best = torch.where(closer, value, best)
            best_index = torch.where(closer, index + key_start, best_index)
        inside = torch.cdist(queries, queries).numpy()
        best_np, best_index_np = best.numpy(), best_index.numpy()
        block_kept = np.ones(stop - start, dtype=bool)
        for offset in range(stop - start):
            earlier = np.flatnonzero(block_kept[:offset])
            distance, match = best_np[offset], best_index_np[offset]
            if len(earlier):
                nearest = earlier[np.argmin(inside[offset, earlier])]
                if inside[offset, nearest] < distance:
                    distance, match = inside[offset, nearest], start + nearest
            if distance < threshold:
                block_kept[offset] = False
                removed.append((start + offset, int(match), float(distance)))
        kept[start:stop] = torch.as_tensor(block_kept)
    return removed


def same_output(new, reference) -> bool:
    return ([r[:2] for r in new] == [r[:2] for r in reference]
            and all(abs(a[2] - b[2]) < 1e-3 for a, b in zip(new, reference)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--reference-limit", type=int, default=100_000)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (on a loaded machine 1 avoids OpenMP barrier stalls)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch threads {torch.get_num_threads()}, d={DIM}, threshold={THRESHOLD}, loadavg "
          f"{os.getloadavg()[0]:.2f}")
    for n in args.sizes:
        points = clustered_points(n)
        started = time.perf_counter()
        found = find_near_duplicates(points, THRESHOLD)
        new_s = time.perf_counter() - started
        prefix = min(n, args.reference_limit)
        started = time.perf_counter()
        reference = reference_blockwise(points[:prefix], THRESHOLD)
        reference_s = time.perf_counter() - started
        new_on_prefix = found if prefix == n else find_near_duplicates(points[:prefix], THRESHOLD)
        estimate = reference_s * (n / prefix) ** 2
        mark = "" if prefix == n else f" (extrapolated by N² from {prefix:,})"
        print(f"N={n:,}: new {new_s:.1f} s, removed {len(found):,}; reference {estimate:.0f} s{mark}; "
              f"speed-up {estimate / new_s:.0f}x; equal output on {prefix:,}: "
              f"{same_output(new_on_prefix, reference)}; peak RSS "
              f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GB; loadavg {os.getloadavg()[0]:.2f}")
        del points


if __name__ == "__main__":
    main()
