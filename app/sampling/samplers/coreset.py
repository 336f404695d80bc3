"""sampler=coreset: greedy k-center on the embeddings (app.sampling.coreset): each pick is the
candidate farthest from the picks so far and the datapool; it stops at the budget or when the
farthest candidate is closer than stopping_condition.min_distance."""
from __future__ import annotations

from app.sampling.samplers import Candidates, Sampler, Selection


def select_coreset_units(candidates: Candidates, count: int, pool, seed: int, device, config) -> Selection:
    from app.sampling.coreset import select_coreset

    chosen = select_coreset(candidates.vectors, count, config.stopping_condition.min_distance, seed, device,
                            pool=pool)
    return Selection(chosen.indices, chosen.distances, chosen.stopped_by)


SAMPLER = Sampler(name="coreset", select=select_coreset_units, needs_embeddings=True, uses_min_distance=True)
