"""Select stage: choose the images to keep, by `sampler.method` and `sampler.stopping_condition`.

The sampler named by `sampler.method` comes from the registry (app.sampling.samplers); this stage
does what every sampler shares around its `select`: reading the candidates (embeddings, or the
scanned file list for a sampler that needs none), near duplicates, normalisation, frame
sequences, the datapool, the budget, and the artifacts.

Writes `filenames/sampled_filenames.txt` and `filenames/removed_filenames.txt` (input order),
`data/selection.csv` (pick order, with each pick's distance to the earlier picks for coreset),
`data/selected_embeddings.csv`; with `dump_dataset`, the selected images under `sampled/`; with a
`datapool.name`, the selection becomes this run's part of the pool (app.sampling.datapool).
"""
from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import numpy as np
from omegaconf import DictConfig

from app import artifacts
from app.artifacts import NEAR_DUPLICATES, REMOVED, SAMPLED, SAMPLED_IMAGES, SELECTED_EMBEDDINGS, SELECTION
from app.errors import UserError
from app.sampling.samplers import Candidates, Sampler, get_sampler
from app.sampling.schema import Budget, output_image_size

log = logging.getLogger("thresher")


@dataclass
class SelectResult:
    method: str
    n_candidates: int
    n_selected: int
    stopped_by: str
    n_near_duplicates: Optional[int] = None
    n_datapool: Optional[int] = None
    n_dumped: Optional[int] = None
    artifacts: List[str] = field(default_factory=lambda: [SAMPLED, REMOVED, SELECTION])


def target_count(n_samples, n_candidates: int) -> int:
    """How many to pick: a count, a fraction of the candidates, or all of them when off."""
    return images_to_pick(Budget.parse(n_samples), n_candidates)


def images_to_pick(budget: Budget, n_candidates: int) -> int:
    """`budget.count_for(n_candidates)`, with a warning when a count asks for more than there are."""
    if budget.count is not None and budget.count > n_candidates:
        log.warning("sampler.stopping_condition.n_samples=%d but only %d images are left: selecting all",
                    budget.count, n_candidates)
    return budget.count_for(n_candidates)


def select_stage(cfg: DictConfig, run_dir: Path, device) -> SelectResult:
    method = cfg.sampler.method
    sampler = get_sampler(method)
    n_datapool = None
    if not sampler.needs_embeddings:
        files, labels = artifacts.read_input_files(run_dir)
        all_files, embeddings, near_duplicates, pool = files, None, None, None
        picks, distances, stopped_by = choose(cfg, files, None, None, device, sampler)
        order = sorted(set(picks))
    else:
        from app.sampling.embeddings_io import read_embeddings_csv

        files, embeddings, labels = read_embeddings_csv(run_dir / artifacts.EMBEDDINGS)
        all_files = files
        near_duplicates = None
        if cfg.sampler.near_duplicate_distance > 0:
            files, embeddings, labels, near_duplicates = drop_near_duplicates(cfg, files, embeddings, labels,
                                                                              run_dir, device)
        # One lock from reading the pool to writing it: a concurrent run selects relative to this update.
        with locked_datapool_for(cfg, run_dir) as pool:
            if pool is not None:
                files, embeddings, labels = leave_out_datapool_members(pool, files, embeddings, labels)
            picks, distances, stopped_by = choose(cfg, files, embeddings, pool, device, sampler)
            order = sorted(set(picks))
            if pool is not None:
                from app.sampling.datapool import commit_run_selection, run_id_for

                n_datapool = commit_run_selection(pool, run_id_for(run_dir), [files[i] for i in order],
                                                  embeddings[order], [labels[i] for i in order],
                                                  cfg.datapool.keep_history)
    sampled = [files[i] for i in order]

    artifacts.write_sampled(run_dir, sampled)
    sampled_set = set(sampled)
    artifacts.write_removed(run_dir, (f for f in all_files if f not in sampled_set))
    artifacts.write_selection(run_dir, [files[i] for i in picks], distances)
    result = SelectResult(method=method, n_candidates=len(all_files), n_selected=len(picks),
                          stopped_by=stopped_by, n_datapool=n_datapool)
    if near_duplicates is not None:
        result.n_near_duplicates = near_duplicates
        result.artifacts.append(NEAR_DUPLICATES)
    if embeddings is not None and cfg.dump_sampled_embeddings:
        from app.sampling.embeddings_io import write_embeddings_csv

        write_embeddings_csv(run_dir / SELECTED_EMBEDDINGS, sampled, embeddings[order],
                             [labels[i] for i in order])
        result.artifacts.append(SELECTED_EMBEDDINGS)
    if cfg.dump_dataset:
        from app.sampling.dump import dump_images

        failures = dump_images(artifacts.read_dataset(run_dir).location, sampled, run_dir / SAMPLED_IMAGES,
                               output_image_size(cfg.output_image_size), cfg.output_image_format)
        result.n_dumped = len(sampled) - len(failures)
        result.artifacts.append(SAMPLED_IMAGES)
    from app.report import write_report

    report = write_report(run_dir, cfg.report.n_example_images, cfg.report.memory_requirement_in_GB, cfg.seed,
                          pool_embeddings=None if pool is None else pool.embeddings,
                          show_video_sampling_timeline=cfg.report.show_video_sampling_timeline)
    result.artifacts += report.artifacts
    log.info("select: %s kept %d of %d images (stopped by %s); report: %s", method, len(picks), len(all_files),
             stopped_by, run_dir / artifacts.REPORT_HTML)
    return result


def locked_datapool_for(cfg: DictConfig, run_dir: Path):
    """The datapool without this run's earlier members, locked for this run's update; None
    (and no lock) without a datapool.name."""
    if not cfg.datapool.name:
        return nullcontext(None)
    from app.sampling.datapool import datapool_folder, locked_datapool, run_id_for

    return locked_datapool(datapool_folder(cfg.work_dir, cfg.datapool.name), run_id_for(run_dir))


def leave_out_datapool_members(pool, files: List[str], embeddings: np.ndarray, labels: List[int]):
    """The embed stage left out the members of its time; a run that updated the pool since then
    made some of the candidates members too."""
    from app.sampling.datapool import check_dimension

    check_dimension(pool, embeddings.shape[1])
    fresh = [i for i, name in enumerate(files) if name not in pool.members]
    if len(fresh) < len(files):
        log.info("datapool %s: %d candidates are members already (another run added them after this run's "
                 "embed stage): left out", pool.folder.name, len(files) - len(fresh))
    if not fresh:
        raise UserError(f"every candidate of this run is already in datapool {pool.folder.name!r} (added by "
                        f"another run meanwhile): nothing new to select")
    return [files[i] for i in fresh], embeddings[fresh], [labels[i] for i in fresh]


def drop_near_duplicates(cfg: DictConfig, files: List[str], embeddings: np.ndarray, labels: List[int],
                         run_dir: Path, device):
    """Leave out images within sampler.near_duplicate_distance of an earlier kept one; list them."""
    from app.sampling.coreset import normalize_rows
    from app.sampling.near_duplicates import find_near_duplicates

    vectors = normalize_rows(embeddings) if cfg.sampler.normalize_embeddings else embeddings
    found = find_near_duplicates(vectors, cfg.sampler.near_duplicate_distance, device)
    artifacts.write_near_duplicates(run_dir, ((files[i], files[j], d) for i, j, d in found))
    gone = {i for i, _, _ in found}
    keep = [i for i in range(len(files)) if i not in gone]
    log.info("select: %d near duplicates (distance < %g) left out", len(gone), cfg.sampler.near_duplicate_distance)
    return [files[i] for i in keep], embeddings[keep], [labels[i] for i in keep], len(gone)


def choose(cfg: DictConfig, files: List[str], embeddings: Optional[np.ndarray], pool, device,
           sampler: Optional[Sampler] = None):
    """(picks in pick order, their distances or None, what stopped the selection), by the sampler
    that sampler.method names; `embeddings` is None for a sampler that needs none."""
    sampler = sampler or get_sampler(cfg.sampler.method)
    length = cfg.sampler.selected_sequence_length
    units = [[i] for i in range(len(files))]
    if length > 1:
        from app.sampling.sequences import frame_sequences

        units = frame_sequences(files, length)
    vectors = pool_vectors = None
    if sampler.needs_embeddings:
        vectors, pool_vectors = unit_vectors(cfg, embeddings, units, pool)
    budget = Budget.parse(cfg.sampler.stopping_condition.n_samples)
    count = images_to_pick(budget, len(files))
    n_units = len(units) if budget.is_off else min(-(-count // length), len(units))
    chosen = sampler.select(Candidates(files, units, vectors), count=n_units, pool=pool_vectors, seed=cfg.seed,
                            device=device, config=cfg.sampler)
    picks = [i for unit in chosen.picks for i in units[unit]]
    distances = chosen.distances
    if distances is not None and length > 1:
        distances = [d for unit, d in zip(chosen.picks, distances) for _ in units[unit]]
    return picks, distances, chosen.stopped_by


def unit_vectors(cfg: DictConfig, embeddings: np.ndarray, units: List[List[int]], pool):
    """One vector per unit (a sequence: the mean of its frames) and the datapool's vectors, both
    L2-normalised with sampler.normalize_embeddings; the pool's are None without one."""
    from app.sampling.coreset import normalize_rows

    normalize = cfg.sampler.normalize_embeddings
    if normalize:
        embeddings = normalize_rows(embeddings)
    pool_vectors = None
    if pool is not None and pool.embeddings is not None:
        pool_vectors = normalize_rows(pool.embeddings) if normalize else pool.embeddings
    vectors = embeddings
    if cfg.sampler.selected_sequence_length > 1:
        from app.sampling.sequences import sequence_embeddings

        vectors = sequence_embeddings(embeddings, units)
        if normalize:
            vectors = normalize_rows(vectors)
    return vectors, pool_vectors
