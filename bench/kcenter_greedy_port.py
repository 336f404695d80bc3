"""A numpy port of the k-Center-Greedy sampler of google/active-learning, for benchmarks.

Original: https://github.com/google/active-learning, sampling_methods/kcenter_greedy.py
(Copyright 2017 Google Inc., Apache License 2.0), which implements Sener & Savarese, "A Geometric
Approach to Active Learning for Convolutional Neural Networks" (2017). This port is written anew
and keeps its algorithm: `min_distances` is an (N, 1) array; each new center updates it with
np.minimum of the distances from every point to that center, computed by scikit-learn's
`pairwise_distances(features, features[[center]], metric="euclidean")`; each pick is
np.argmax(min_distances). Since scikit-learn is not a thresher dependency, `euclidean_distances`
below does what scikit-learn does for float32 input: chunks of both arrays upcast to float64,
|x|² − 2x·y + |y|², stored as float32, clipped at 0, square root.

Two changes, both so that contenders can be compared: the first center is passed in (the original
draws it with np.random.choice), and there is no model.transform step (features are given).
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

import numpy as np


def _batch_size(n_x: int, n_y: int, n_features: int) -> int:
    """Rows per upcast chunk: about 10% more memory than X, Y and the result take, at least 10 MiB
    (scikit-learn's rule for dense arrays, in 8-byte units)."""
    maxmem = max(((n_x + n_y) * n_features + n_x * n_y) / 10, 10 * 2 ** 17)
    tmp = 2 * n_features
    return max(int((-tmp + math.sqrt(tmp ** 2 + 4 * maxmem)) / 2), 1)


def euclidean_distances(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Distances between the rows of float32 x and y, as scikit-learn computes them."""
    distances = np.empty((x.shape[0], y.shape[0]), dtype=np.float32)
    batch = _batch_size(x.shape[0], y.shape[0], x.shape[1])
    for xs in range(0, x.shape[0], batch):
        x_chunk = x[xs:xs + batch].astype(np.float64)
        xx = np.einsum("ij,ij->i", x_chunk, x_chunk)[:, None]
        for ys in range(0, y.shape[0], batch):
            y_chunk = y[ys:ys + batch].astype(np.float64)
            yy = np.einsum("ij,ij->i", y_chunk, y_chunk)[None, :]
            block = -2 * (x_chunk @ y_chunk.T)
            block += xx
            block += yy
            distances[xs:xs + batch, ys:ys + batch] = block
    np.maximum(distances, 0, out=distances)
    return np.sqrt(distances, out=distances)


class KCenterGreedy:
    """kCenterGreedy of google/active-learning, minus the model (features are given)."""

    def __init__(self, features: np.ndarray):
        self.features = features
        self.min_distances: Optional[np.ndarray] = None
        self.n_obs = features.shape[0]
        self.already_selected: List[int] = []

    def update_distances(self, cluster_centers: Sequence[int], only_new: bool = True,
                         reset_dist: bool = False) -> None:
        if reset_dist:
            self.min_distances = None
        if only_new:
            cluster_centers = [c for c in cluster_centers if c not in self.already_selected]
        if cluster_centers:
            dist = euclidean_distances(self.features, self.features[list(cluster_centers)])
            if self.min_distances is None:
                self.min_distances = np.min(dist, axis=1).reshape(-1, 1)
            else:
                self.min_distances = np.minimum(self.min_distances, dist)

    def select_batch_(self, already_selected: Sequence[int], n: int, first: int) -> List[int]:
        self.update_distances(already_selected, only_new=True, reset_dist=False)
        new_batch: List[int] = []
        for _ in range(n):
            index = first if self.min_distances is None else int(np.argmax(self.min_distances))
            assert index not in already_selected
            self.update_distances([index], only_new=True, reset_dist=False)
            new_batch.append(index)
        self.already_selected = list(already_selected)
        return new_batch
