"""sampler=hybrid: diversity among the uncertain, as "coreset inside the top fraction": keep the
`uncertain_fraction` of the candidates with the highest scores (at least the budget; ties in a
seeded order, as sampler=uncertainty has them), then pick among them by greedy k-center
(app.sampling.coreset, the datapool's vectors counting as centers).

Why this of the two usual hybrids: weighting k-center distances by score mixes two scales
(a distance and a probability) through a factor that would need tuning per data set, and lets one
very uncertain outlier win on either count; a top fraction keeps each criterion in its own units,
is one key a user can reason about (1.0 is plain coreset; a fraction as small as the budget is
plain uncertainty), and reuses the exact coreset as it is.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from app.errors import UserError
from app.sampling.samplers import Candidates, Sampler, Selection
from app.sampling.schema import SamplerConfig


@dataclass
class HybridConfig(SamplerConfig):
    # The share of the candidates, highest scores first, that k-center picks among (at least the budget).
    uncertain_fraction: float = 0.3


def check(config) -> None:
    fraction = config.uncertain_fraction
    if not (math.isfinite(fraction) and 0.0 < fraction <= 1.0):
        raise UserError(f"sampler.uncertain_fraction={fraction} is not allowed: use a fraction in (0, 1] "
                        f"(1.0: plain coreset)")


def select_hybrid_units(candidates: Candidates, count: int, pool, seed: int, device, config) -> Selection:
    import numpy as np

    from app.sampling.coreset import select_coreset
    from app.sampling.samplers.uncertainty import highest_scores_first

    n = len(candidates.units)
    kept = min(n, max(count, math.ceil(config.uncertain_fraction * n - 1e-9)))
    # In index order, so that coreset's ties go to the lowest candidate index as they always do.
    top = np.sort(highest_scores_first(candidates.scores, seed)[:kept])
    chosen = select_coreset(candidates.vectors[top], count, -1.0, seed, device, pool=pool)
    return Selection(top[chosen.indices].tolist(), chosen.distances, chosen.stopped_by)


SAMPLER = Sampler(name="hybrid", select=select_hybrid_units, needs_embeddings=True, needs_scores=True,
                  schema=HybridConfig, check=check)
