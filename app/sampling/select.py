"""Select stage: choose the images to keep, by `sampler.method` and `sampler.stopping_condition`.

Writes `filenames/sampled_filenames.txt` and `filenames/removed_filenames.txt` (input order),
`data/selection.csv` (pick order, with each pick's distance to the earlier picks for coreset),
`data/selected_embeddings.csv`; with `dump_dataset`, the selected images under `sampled/`; with a
`datapool.name`, the selection becomes this run's part of the pool (app.sampling.datapool).
"""
from __future__ import annotations

import json
import logging
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import numpy as np
from omegaconf import DictConfig

from app import atomic
from app.config import UserError, n_samples_kind, output_image_size
from app.data.scan import DATASET, INPUT_FILES, read_input_files

log = logging.getLogger("thresher")

SAMPLED = "filenames/sampled_filenames.txt"
REMOVED = "filenames/removed_filenames.txt"
SELECTION = "data/selection.csv"
SELECTED_EMBEDDINGS = "data/selected_embeddings.csv"
NEAR_DUPLICATES = "filenames/near_duplicate_filenames.txt"


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
    n_datapool = None
    if method == "none":
        files, labels = read_input_files(run_dir / INPUT_FILES)
        all_files, embeddings, near_duplicates, pool = files, None, None, None
        picks, distances, stopped_by = list(range(len(files))), None, "none"
        order = picks
    else:
        from app.sampling.embed import EMBEDDINGS, read_embeddings_csv

        files, embeddings, labels = read_embeddings_csv(run_dir / EMBEDDINGS)
        all_files = files
        near_duplicates = None
        if cfg.sampler.near_duplicate_distance > 0:
            files, embeddings, labels, near_duplicates = drop_near_duplicates(cfg, files, embeddings, labels,
                                                                              run_dir, device)
        # One lock from reading the pool to writing it: a concurrent run selects relative to this update.
        with locked_datapool_for(cfg, run_dir) as pool:
            if pool is not None:
                files, embeddings, labels = leave_out_datapool_members(pool, files, embeddings, labels)
            picks, distances, stopped_by = choose(cfg, files, embeddings, pool, device)
            order = sorted(set(picks))
            if pool is not None:
                from app.sampling.datapool import commit_run_selection, run_id_for

                n_datapool = commit_run_selection(pool, run_id_for(run_dir), [files[i] for i in order],
                                                  embeddings[order], [labels[i] for i in order],
                                                  cfg.datapool.keep_history)
    sampled = [files[i] for i in order]

    atomic.write_lines(run_dir / SAMPLED, sampled)
    sampled_set = set(sampled)
    atomic.write_lines(run_dir / REMOVED, (f for f in all_files if f not in sampled_set))
    write_selection_csv(run_dir / SELECTION, [files[i] for i in picks], distances)
    result = SelectResult(method=method, n_candidates=len(all_files), n_selected=len(picks),
                          stopped_by=stopped_by, n_datapool=n_datapool)
    if near_duplicates is not None:
        result.n_near_duplicates = near_duplicates
        result.artifacts.append(NEAR_DUPLICATES)
    if embeddings is not None and cfg.dump_sampled_embeddings:
        from app.sampling.embed import write_embeddings_csv

        write_embeddings_csv(run_dir / SELECTED_EMBEDDINGS, sampled, embeddings[order],
                             [labels[i] for i in order])
        result.artifacts.append(SELECTED_EMBEDDINGS)
    if cfg.dump_dataset:
        from app.sampling.dump import SAMPLED_IMAGES, dump_images

        input_dir = Path(json.loads((run_dir / DATASET).read_text())["input_dir"])
        failures = dump_images(input_dir, sampled, run_dir / SAMPLED_IMAGES,
                               output_image_size(cfg.output_image_size), cfg.output_image_format)
        result.n_dumped = len(sampled) - len(failures)
        result.artifacts.append(SAMPLED_IMAGES)
    from app.report import write_report

    report = write_report(run_dir, cfg.report.n_example_images, cfg.report.memory_requirement_in_GB, cfg.seed,
                          pool_embeddings=None if pool is None else pool.embeddings,
                          show_video_sampling_timeline=cfg.report.show_video_sampling_timeline)
    result.artifacts += report.artifacts
    log.info("select: %s kept %d of %d images (stopped by %s); report: %s", method, len(picks), len(all_files),
             stopped_by, run_dir / "report.html")
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
    atomic.write_lines(run_dir / NEAR_DUPLICATES, (f"{files[i]}\t{files[j]}\t{d:.6g}" for i, j, d in found))
    gone = {i for i, _, _ in found}
    keep = [i for i in range(len(files)) if i not in gone]
    log.info("select: %d near duplicates (distance < %g) left out", len(gone), cfg.sampler.near_duplicate_distance)
    return [files[i] for i in keep], embeddings[keep], [labels[i] for i in keep], len(gone)


def choose(cfg: DictConfig, files: List[str], embeddings: np.ndarray, pool, device):
    """(picks in pick order, their distances or None, what stopped the selection)."""
    from app.sampling.coreset import normalize_rows, select_coreset

    stop = cfg.sampler.stopping_condition
    length = cfg.sampler.selected_sequence_length
    if cfg.sampler.normalize_embeddings:
        embeddings = normalize_rows(embeddings)
    pool_vectors = None
    if pool is not None and pool.embeddings is not None:
        pool_vectors = normalize_rows(pool.embeddings) if cfg.sampler.normalize_embeddings else pool.embeddings
    units = [[i] for i in range(len(embeddings))]
    vectors = embeddings
    if length > 1:
        from app.sampling.sequences import frame_sequences, sequence_embeddings

        units = frame_sequences(files, length)
        vectors = sequence_embeddings(embeddings, units)
        if cfg.sampler.normalize_embeddings:
            vectors = normalize_rows(vectors)
    count = target_count(stop.n_samples, len(embeddings))
    n_units = len(units) if n_samples_kind(stop.n_samples) == "off" else -(-count // length)
    if cfg.sampler.method == "random":
        chosen_units = select_random(len(units), min(n_units, len(units)), cfg.seed)
        distances, stopped_by = None, "n_samples"
    else:
        chosen = select_coreset(vectors, min(n_units, len(units)), stop.min_distance, cfg.seed, device,
                                pool=pool_vectors)
        chosen_units, distances, stopped_by = chosen.indices, chosen.distances, chosen.stopped_by
    picks = [i for unit in chosen_units for i in units[unit]]
    if distances is not None and length > 1:
        distances = [d for unit, d in zip(chosen_units, distances) for _ in units[unit]]
    return picks, distances, stopped_by


def select_random(n_candidates: int, count: int, seed: int) -> List[int]:
    """A uniform sample without replacement; the same seed gives the same sample."""
    return np.random.default_rng(seed).permutation(n_candidates)[:count].tolist()


def write_selection_csv(path: Path, picked_files: List[str], distances: Optional[List[float]]) -> None:
    rows = ([name, order, "" if distances is None else f"{distances[order]:.6g}"]
            for order, name in enumerate(picked_files))
    atomic.write_csv(path, ["filenames", "pick", "distance"], rows)
