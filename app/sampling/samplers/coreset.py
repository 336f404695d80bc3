"""sampler=coreset: greedy k-center on the embeddings (app.sampling.coreset): each pick is the
candidate farthest from the picks so far and the datapool; it stops at the budget or when the
farthest candidate is closer than stopping_condition.min_distance. With executor=ray the distances
are computed by actors on the cluster, each holding a shard of the vectors; the picks are the same."""
from __future__ import annotations

from app.sampling.samplers import Candidates, Sampler, Selection


def select_coreset_units(candidates: Candidates, count: int, pool, seed: int, device, config) -> Selection:
    executor = candidates.executor
    if executor is not None and executor.on_ray:
        chosen = select_coreset_units_on_ray(candidates, count, pool, seed, config)
    else:
        from app.sampling.coreset import select_coreset

        chosen = select_coreset(candidates.vectors, count, config.stopping_condition.min_distance, seed, device,
                                pool=pool)
    return Selection(chosen.indices, chosen.distances, chosen.stopped_by)


def select_coreset_units_on_ray(candidates: Candidates, count: int, pool, seed: int, config):
    """The same picks, with the vectors sharded over actors on the Ray cluster: each reads its rows
    of a file in the run directory (app/executors/ray_coreset.py)."""
    import numpy as np

    from app.executors.ray_coreset import select_coreset_on_ray
    from app.executors.ray_session import shared_file

    executor = candidates.executor
    with shared_file(executor, "coreset_points.npy", lambda path: np.save(path, candidates.vectors)) as points:
        return select_coreset_on_ray(str(points), count, config.stopping_condition.min_distance, seed, pool=pool,
                                     actors=executor.ray.coreset_actors or 2,
                                     num_cpus_per_actor=executor.ray.num_cpus_per_actor)


SAMPLER = Sampler(name="coreset", select=select_coreset_units, needs_embeddings=True, uses_min_distance=True)
