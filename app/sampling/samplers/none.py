"""sampler=none: keep every image that passed the scan. It needs no embeddings, so the embed stage
is skipped; the budget (stopping_condition.n_samples) does not apply."""
from __future__ import annotations

from app.sampling.samplers import Candidates, Sampler, Selection


def keep_every_unit(candidates: Candidates, count: int, pool, seed: int, device, config) -> Selection:
    return Selection(list(range(len(candidates.units))), None, "none")


SAMPLER = Sampler(name="none", select=keep_every_unit, needs_embeddings=False)
