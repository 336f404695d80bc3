"""The samplers, by name: what each needs and how it selects. `sampler.method` names one.

Adding a sampler is one module here and one YAML in conf/sampler/; nothing else changes:

1. `app/sampling/samplers/<name>.py` defines `SAMPLER = Sampler(name="<name>", select=...)`, with
   `needs_embeddings=False` when it picks from the file list alone (the runner then skips the
   embed stage and refuses `embeddings=`, `enable_training=true` and `near_duplicate_distance`
   for it), and also `optional_embeddings=True` when the stage's own uses of embeddings still
   apply to it (near duplicates, a datapool, `embeddings=`: the embed stage then runs for them;
   `needs_embeddings(cfg)` decides), `needs_scores=True` when it picks by the score stage's
   per-file scores (data/scores.csv; config validation then asks for a scorer and its checkpoint),
   `uses_min_distance=True` when it stops on `stopping_condition.min_distance` (refused
   for the others), and `check=` for config-time checks of its own keys (raise
   app.errors.UserError). `select(candidates, count=, pool=, seed=, device=, config=)` returns a
   `Selection` of up to `count` candidate units, in pick order (see `SelectFunction`). Import
   numpy and torch inside `select`, not at the top: this package is read when a config is
   checked, which stays fast and torch-free.
2. `conf/sampler/<name>.yaml` sets `method: <name>` and its values, and names its schema first in
   its defaults list, `defaults: [/sampler_<name>_schema@_here_]`, as conf/data/*.yaml do. The
   schema is app.sampling.schema.SamplerConfig (the keys every sampler has: `stopping_condition.n_samples` and
   `.min_distance`, `normalize_embeddings`, `near_duplicate_distance`, `selected_sequence_length`,
   and the embed stage's `batch_size` and `embedding_model`) unless the module passes `schema=`:
   a dataclass deriving from SamplerConfig that adds the sampler's own keys, typed and checked
   like every other key (`thresher sampler=<name> sampler.<key>=...`; a typo is refused).

The modules are found by listing this package (app.config.register_configs stores each schema as
`sampler_<name>_schema`, outside the group, so `--help` lists only the YAML options), so
validation refuses a `sampler.method` that no module registers, with a did-you-mean, and the select stage dispatches through `get_sampler`. The select stage does what
is common to every sampler before and after `select`: near-duplicate removal, L2 normalisation
(`normalize_embeddings`), whole frame sequences as units (`selected_sequence_length`), the datapool
(its vectors come in as `pool`; the picks are committed to it), the scores (`candidates.scores`,
for a sampler with `needs_scores`), resolving the budget (app.sampling.schema.Budget) to a count of
units, `sampler.balance` (app.sampling.balance: `select` runs once per class, on that class's
candidates and share of the budget), and the artifacts.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional

if TYPE_CHECKING:  # for the annotations only: the registry itself loads neither
    import numpy as np
    from omegaconf import DictConfig

    from app.executors import Executor


@dataclass
class Candidates:
    """What a sampler picks from: `units` are what is picked as a whole, each a list of indices
    into `files` (one image each; a run of consecutive frames with selected_sequence_length > 1)."""
    files: List[str]
    units: List[List[int]]
    # One row per unit (a sequence: the mean of its frames), L2-normalised when
    # sampler.normalize_embeddings; None for a sampler that does not need embeddings.
    vectors: Optional["np.ndarray"] = None
    # Where heavy work may run (app.executors): executor=ray gives a cluster, which the coreset
    # uses for its distances; a sampler that has no use for it ignores it.
    executor: Optional["Executor"] = None
    # One float64 per unit (a sequence: the mean of its frames'), from the score stage; higher:
    # more worth labelling. None unless the sampler needs scores.
    scores: Optional["np.ndarray"] = None
    # One int64 class label per unit (sampler.balance's source: known, from the class folders, or
    # predicted by the scorer; a sequence: its frames' most common), -1: unknown; None when unused.
    labels: Optional["np.ndarray"] = None


@dataclass
class Selection:
    """A sampler's answer: unit indices in pick order, each pick's distance to the earlier picks
    and the pool (None when the sampler measures none), and what stopped it (recorded in
    summary.json as stopped_by: n_samples, min_distance, exhausted, ...)."""
    picks: List[int]
    distances: Optional[List[float]]
    stopped_by: str


# select(candidates, count=, pool=, seed=, device=, config=) -> Selection. `count`: the budget
# (sampler.stopping_condition.n_samples) resolved for these candidates, in units; `pool`: the
# datapool's vectors, normalised as the candidates' are (centers picked in earlier runs, never
# returned), or None; `device`: a torch.device; `config`: cfg.sampler, under the sampler's schema.
SelectFunction = Callable[..., Selection]


@dataclass(frozen=True)
class Sampler:
    name: str
    select: SelectFunction
    needs_embeddings: bool = True
    # Picks without embeddings, but the select stage's uses of them (near duplicates, a datapool,
    # embeddings=) apply: the embed stage runs only when one of them is asked for.
    optional_embeddings: bool = False
    needs_scores: bool = False
    uses_min_distance: bool = False
    # A dataclass deriving from app.sampling.schema.SamplerConfig, for a sampler with keys of its own;
    # None: SamplerConfig.
    schema: Optional[type] = None
    # Config-time checks of the sampler's own keys: check(cfg.sampler) raises UserError.
    check: Optional[Callable[["DictConfig"], None]] = None


_registry: Optional[Dict[str, Sampler]] = None


def registry() -> Dict[str, Sampler]:
    """Every sampler module's SAMPLER, by name, in name order; found once, on first use."""
    global _registry
    if _registry is None:
        found: Dict[str, Sampler] = {}
        for info in sorted(pkgutil.iter_modules(__path__), key=lambda info: info.name):
            if info.name.startswith("_"):
                continue
            module = importlib.import_module(f"{__name__}.{info.name}")
            sampler = getattr(module, "SAMPLER", None)
            if not isinstance(sampler, Sampler):
                raise TypeError(f"{module.__name__} is in the sampler package but defines no SAMPLER = Sampler(...)")
            if sampler.name in found:
                raise ValueError(f"two sampler modules register the name {sampler.name!r}")
            found[sampler.name] = sampler
        _registry = dict(sorted(found.items()))
    return _registry


def sampler_names() -> List[str]:
    return list(registry())


def get_sampler(name: Any) -> Sampler:
    """The sampler `sampler.method` names; validation has refused an unknown name before."""
    return registry()[str(name)]


def can_use_embeddings(method: Any) -> bool:
    """Whether sampler.method=`method` selects by embeddings or lets the stage use them."""
    sampler = get_sampler(method)
    return sampler.needs_embeddings or sampler.optional_embeddings


def embeddings_wanted_by(cfg: "DictConfig") -> List[str]:
    """Why this run needs the embed stage, one phrase per reason; [] when nothing does. A sampler
    with optional embeddings needs them only for the stage's own uses of them: near duplicates,
    a datapool (which keeps its members' vectors for later runs), or embeddings= given."""
    from omegaconf import OmegaConf

    sampler = get_sampler(cfg.sampler.method)
    if sampler.needs_embeddings:
        return [f"sampler={sampler.name} selects by them"]
    if not sampler.optional_embeddings:
        return []
    reasons = []
    near = OmegaConf.select(cfg, "sampler.near_duplicate_distance", default=-1.0)
    if near is not None and near > 0:
        reasons.append(f"sampler.near_duplicate_distance={near} compares them")
    pool = OmegaConf.select(cfg, "datapool.name", default=None)
    if pool:
        reasons.append(f"datapool.name={pool} keeps its members' vectors")
    if OmegaConf.select(cfg, "embeddings", default=None):
        reasons.append("embeddings= gives them")
    return reasons


def needs_embeddings(cfg: "DictConfig") -> bool:
    """Whether this run needs the embed stage (see embeddings_wanted_by)."""
    return bool(embeddings_wanted_by(cfg))


def needs_scores(cfg: "DictConfig") -> bool:
    """Whether the select stage reads data/scores.csv: the sampler picks by scores, or
    sampler.balance=predicted splits the budget by the scorer's predicted labels."""
    from omegaconf import OmegaConf

    return (get_sampler(cfg.sampler.method).needs_scores
            or OmegaConf.select(cfg, "sampler.balance", default=None) == "predicted")
