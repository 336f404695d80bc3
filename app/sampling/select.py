"""Select stage: choose the images to keep, by `sampler.method` and `sampler.stopping_condition`.

Writes `filenames/sampled_filenames.txt` and `filenames/removed_filenames.txt` (input order) and
`data/selection.csv` (pick order, with each pick's distance to the earlier picks for coreset).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import numpy as np
from omegaconf import DictConfig

from app import atomic
from app.config import n_samples_kind
from app.data.scan import INPUT_FILES, read_input_files

log = logging.getLogger("thresher")

SAMPLED = "filenames/sampled_filenames.txt"
REMOVED = "filenames/removed_filenames.txt"
SELECTION = "data/selection.csv"


@dataclass
class SelectResult:
    method: str
    n_candidates: int
    n_selected: int
    stopped_by: str
    artifacts: List[str] = field(default_factory=lambda: [SAMPLED, REMOVED, SELECTION])


def target_count(n_samples, n_candidates: int) -> int:
    """How many to pick: a count, a fraction of the candidates, or all of them when off."""
    kind = n_samples_kind(n_samples)
    if kind == "off":
        return n_candidates
    if kind == "fraction":
        # floor, as a fraction of a budget should not round up; the epsilon absorbs 0.29 * 100 = 28.999...
        return max(1, int(n_samples * n_candidates + 1e-9))
    if n_samples > n_candidates:
        log.warning("sampler.stopping_condition.n_samples=%d but only %d images are left: selecting all",
                    n_samples, n_candidates)
    return min(int(n_samples), n_candidates)


def select_stage(cfg: DictConfig, run_dir: Path, device) -> SelectResult:
    method = cfg.sampler.method
    stop = cfg.sampler.stopping_condition
    distances: Optional[List[float]] = None
    if method == "none":
        files, _ = read_input_files(run_dir / INPUT_FILES)
        picks, stopped_by = list(range(len(files))), "none"
    else:
        from app.sampling.embed import EMBEDDINGS, read_embeddings_csv

        files, embeddings, _ = read_embeddings_csv(run_dir / EMBEDDINGS)
        count = target_count(stop.n_samples, len(files))
        if method == "random":
            picks = select_random(len(files), count, cfg.seed)
            stopped_by = "n_samples"
        else:
            from app.sampling.coreset import normalize_rows, select_coreset

            if cfg.sampler.normalize_embeddings:
                embeddings = normalize_rows(embeddings)
            chosen = select_coreset(embeddings, count, stop.min_distance, cfg.seed, device)
            picks, distances, stopped_by = chosen.indices, chosen.distances, chosen.stopped_by

    picked = set(picks)
    atomic.write_lines(run_dir / SAMPLED, (files[i] for i in sorted(picked)))
    atomic.write_lines(run_dir / REMOVED, (f for i, f in enumerate(files) if i not in picked))
    write_selection_csv(run_dir / SELECTION, [files[i] for i in picks], distances)
    log.info("select: %s kept %d of %d images (stopped by %s)", method, len(picks), len(files), stopped_by)
    return SelectResult(method=method, n_candidates=len(files), n_selected=len(picks), stopped_by=stopped_by)


def select_random(n_candidates: int, count: int, seed: int) -> List[int]:
    """A uniform sample without replacement; the same seed gives the same sample."""
    return np.random.default_rng(seed).permutation(n_candidates)[:count].tolist()


def write_selection_csv(path: Path, picked_files: List[str], distances: Optional[List[float]]) -> None:
    rows = ([name, order, "" if distances is None else f"{distances[order]:.6g}"]
            for order, name in enumerate(picked_files))
    atomic.write_csv(path, ["filenames", "pick", "distance"], rows)
