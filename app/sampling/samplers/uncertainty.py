"""sampler=uncertainty: the candidates the scorer is least sure of, highest score first (a
sequence's score is the mean of its frames'; app.scoring writes them to data/scores.csv). Equal
scores are ordered by a permutation seeded by `seed`, so ties do not always favour the first files.
It picks without embeddings: the embed stage runs only for near duplicates, a datapool or
embeddings=."""
from __future__ import annotations

from app.sampling.samplers import Candidates, Sampler, Selection


def highest_scores_first(scores, seed: int):
    """Unit indices by score, highest first; ties (and NaN, last) in a seeded order."""
    import numpy as np

    scores = np.asarray(scores, dtype=np.float64)
    tie_break = np.random.default_rng(seed).permutation(len(scores))
    # lexsort sorts by the last key first: -score ascending is score descending.
    return np.lexsort((tie_break, np.nan_to_num(-scores, nan=np.inf)))


def select_uncertain_units(candidates: Candidates, count: int, pool, seed: int, device, config) -> Selection:
    picks = highest_scores_first(candidates.scores, seed)[:count]
    return Selection(picks.tolist(), None, "n_samples" if len(picks) == count else "exhausted")


SAMPLER = Sampler(name="uncertainty", select=select_uncertain_units, needs_embeddings=False,
                  optional_embeddings=True, needs_scores=True)
