"""sampler=random: a uniform sample of the candidates without replacement, seeded by `seed`. It
picks without embeddings, so the embed stage is skipped unless something else needs them
(near-duplicate removal, a datapool, embeddings=); the same candidates give the same picks either
way."""
from __future__ import annotations

from typing import List

from app.sampling.samplers import Candidates, Sampler, Selection


def select_random(n_candidates: int, count: int, seed: int) -> List[int]:
    """A uniform sample without replacement; the same seed gives the same sample."""
    import numpy as np

    return np.random.default_rng(seed).permutation(n_candidates)[:count].tolist()


def select_random_units(candidates: Candidates, count: int, pool, seed: int, device, config) -> Selection:
    return Selection(select_random(len(candidates.units), count, seed), None, "n_samples")


SAMPLER = Sampler(name="random", select=select_random_units, needs_embeddings=False, optional_embeddings=True)
