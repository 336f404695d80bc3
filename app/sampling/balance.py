"""sampler.balance: the same number of picks from every class, for any sampler.

The budget (in units) is split as equally as possible over the classes present among the
candidates: a class with fewer candidates than its share gives the rest to the others, and what
does not divide evenly goes to the larger classes (`class_quotas`). The sampler then selects within
each class, with the same seed and the datapool's vectors, and the classes' picks are interleaved
round robin (class order, each class in its own pick order), so the first picks are balanced too.
Labels come from the class folders (`known`) or from the score stage's predicted_label
(`predicted`); a unit labelled -1 (unknown) belongs to no class and is left out, with a warning.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Dict, List, Sequence

import numpy as np

from app.errors import UserError
from app.sampling.samplers import Candidates, Sampler, Selection

log = logging.getLogger("thresher")


@dataclass
class BalancedSelection:
    selection: Selection
    picks_per_class: Dict[int, int]  # class label -> units picked, every class present


def class_quotas(available: Sequence[int], total: int) -> np.ndarray:
    """How many units each class gets of `total`: equal shares, capped by what a class has, the
    remainder going to the classes with more candidates (the smallest class is served first)."""
    available = np.asarray(available, dtype=np.int64)
    quotas = np.zeros(len(available), dtype=np.int64)
    left = min(int(total), int(available.sum()))
    smallest_first = np.argsort(available, kind="stable")
    for position, index in enumerate(smallest_first):
        share = left // (len(available) - position)
        quotas[index] = min(available[index], share)
        left -= quotas[index]
    return quotas


def select_balanced(sampler: Sampler, candidates: Candidates, count: int, pool, seed: int, device, config,
                    balance: str) -> BalancedSelection:
    """The sampler's selection within each class of `candidates.labels`, interleaved."""
    labels = candidates.labels
    known = labels >= 0
    classes, available = np.unique(labels[known], return_counts=True)
    if not len(classes):
        why = ("they are in no class folder" if balance == "known"
               else "the scorer predicted none; a detection scorer predicts no class")
        raise UserError(f"sampler.balance={balance}: none of the {len(labels)} candidates has a class label "
                        f"({why}): use sampler.balance=null")
    if not known.all():
        log.warning("sampler.balance=%s: %d of %d candidates have no class label and are left out of the "
                    "selection", balance, int((~known).sum()), len(labels))
    quotas = class_quotas(available, count)
    per_class: List[List[int]] = []
    distances_per_class: List[List[float]] = []
    stopped = set()
    for label, quota in zip(classes, quotas):
        members = np.flatnonzero(labels == label)
        if quota == 0:
            per_class.append([])
            distances_per_class.append([])
            continue
        chosen = sampler.select(subset(candidates, members), count=int(quota), pool=pool, seed=seed, device=device,
                                config=config)
        per_class.append(members[np.asarray(chosen.picks, dtype=np.int64)].tolist())
        distances_per_class.append(chosen.distances if chosen.distances is not None else [])
        stopped.add(chosen.stopped_by)
    has_distances = all(len(d) == len(p) for d, p in zip(distances_per_class, per_class))
    picks, distances = [], []
    for round_ in range(max((len(p) for p in per_class), default=0)):
        for class_picks, class_distances in zip(per_class, distances_per_class):
            if round_ < len(class_picks):
                picks.append(class_picks[round_])
                if has_distances:
                    distances.append(class_distances[round_])
    sampler_measures = any(len(d) for d in distances_per_class)
    stopped_by = "+".join(sorted(stopped)) if stopped else "n_samples"
    selection = Selection(picks, distances if sampler_measures and has_distances else None, stopped_by)
    return BalancedSelection(selection, {int(label): len(p) for label, p in zip(classes, per_class)})


class UnitSubset(Sequence):
    """Some of the units, renumbered from 0: no copy of the unit lists."""

    def __init__(self, units: Sequence[List[int]], members: np.ndarray):
        self.units, self.members = units, members

    def __len__(self) -> int:
        return len(self.members)

    def __getitem__(self, unit: int) -> List[int]:
        return self.units[int(self.members[unit])]


def subset(candidates: Candidates, members: np.ndarray) -> Candidates:
    """The candidates of one class: units, vectors, scores and labels of `members` only."""
    pick = (lambda values: None if values is None else values[members])
    return replace(candidates, units=UnitSubset(candidates.units, members), vectors=pick(candidates.vectors),
                   scores=pick(candidates.scores), labels=pick(candidates.labels))
