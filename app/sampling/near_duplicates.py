"""`sampler.near_duplicate_distance`: drop images that lie closer than a threshold to an earlier
image that is kept, before selection.

Greedy in input order, so the result does not depend on block sizes: image i goes when some kept
image j < i lies within the threshold. Nearest neighbours are searched blockwise (queries × keys
in chunks), so memory stays O(N·d + block²) and no N×N matrix is ever made.
"""
from __future__ import annotations

from typing import List, Tuple

import numpy as np
import torch


def find_near_duplicates(embeddings: np.ndarray, threshold: float, device: torch.device = torch.device("cpu"),
                         block: int = 2048) -> List[Tuple[int, int, float]]:
    """(removed index, the kept index it duplicates, their distance), in input order."""
    points = torch.as_tensor(embeddings, dtype=torch.float32, device=device)
    n = points.shape[0]
    kept = torch.ones(n, dtype=torch.bool, device=device)
    removed: List[Tuple[int, int, float]] = []
    for start in range(0, n, block):
        stop = min(start + block, n)
        queries = points[start:stop]
        # the nearest kept image among the earlier blocks
        best = torch.full((stop - start,), float("inf"), device=device)
        best_index = torch.full((stop - start,), -1, dtype=torch.long, device=device)
        for key_start in range(0, start, block):
            key_stop = min(key_start + block, start)
            keys = points[key_start:key_stop]
            distances = torch.cdist(queries, keys)
            distances[:, ~kept[key_start:key_stop]] = float("inf")
            value, index = distances.min(dim=1)
            closer = value < best
            best = torch.where(closer, value, best)
            best_index = torch.where(closer, index + key_start, best_index)
        # within the block, in order: an earlier block-mate counts only if it was kept
        inside = torch.cdist(queries, queries).cpu().numpy()
        best_np, best_index_np = best.cpu().numpy(), best_index.cpu().numpy()
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
        kept[start:stop] = torch.as_tensor(block_kept, device=device)
    return removed
