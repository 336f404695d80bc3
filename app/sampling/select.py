"""Select stage: choose the images to keep, by `sampler.method` and `sampler.stopping_condition`.

The sampler named by `sampler.method` comes from the registry (app.sampling.samplers); this stage
does what every sampler shares around its `select`: reading the candidates (embeddings, or the
scanned file list for a sampler that needs none), near duplicates, normalisation, frame
sequences, the datapool, the budget, and the artifacts.

Writes `filenames/sampled_filenames.txt` and `filenames/removed_filenames.txt` (input order),
`data/selection.csv` (pick order, with each pick's distance to the earlier picks for coreset),
`data/selected_embeddings.csv`; with `dump_dataset`, the selected images under `sampled/`; with a
`datapool.name`, the selection becomes this run's part of the pool (app.sampling.datapool).

A sampler that needs scores gets the score stage's (data/scores.csv) per candidate, joined by file
name; `sampler.balance` splits the budget over the classes (app.sampling.balance) around any sampler.
"""
from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
from omegaconf import DictConfig

from app import artifacts
from app.artifacts import (NEAR_DUPLICATES, REMOVED, SAMPLED, SAMPLED_IMAGES, SCORES, SELECTED_EMBEDDINGS,
                           SELECTION)
from app.errors import UserError
from app.executors import executor_for
from app.sampling.samplers import Candidates, Sampler, get_sampler, needs_embeddings
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
    # sampler.balance, and then the images picked per class (by class name; predicted labels by index)
    balance: Optional[str] = None
    picks_per_class: Optional[Dict[str, int]] = None
    report_s: Optional[float] = None  # of the stage's time, the report's
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
    if needs_embeddings(cfg):
        choice = choose_from_embeddings(cfg, run_dir, device, sampler)
    else:
        files, labels = artifacts.read_input_files(run_dir)
        chosen = choose(cfg, files, None, None, device, sampler, run_dir=run_dir,
                        known_labels=np.asarray(labels, dtype=np.int64))
        choice = Choice(files, files, None, chosen.picks, chosen.distances, chosen.stopped_by,
                        picks_per_class=chosen.picks_per_class)
    files, picks = choice.files, choice.picks
    order = sorted(set(picks))
    sampled = [files[i] for i in order]

    artifacts.write_sampled(run_dir, sampled)
    sampled_set = set(sampled)
    artifacts.write_removed(run_dir, (f for f in choice.all_files if f not in sampled_set))
    artifacts.write_selection(run_dir, (files[i] for i in picks), choice.distances)
    result = SelectResult(method=method, n_candidates=len(choice.all_files), n_selected=len(picks),
                          stopped_by=choice.stopped_by, n_datapool=choice.n_datapool)
    if choice.picks_per_class is not None:
        result.balance = cfg.sampler.balance
        result.picks_per_class = class_names_for(cfg.sampler.balance, choice.picks_per_class, run_dir)
        log.info("select: sampler.balance=%s picked per class: %s", cfg.sampler.balance,
                 ", ".join(f"{name} {n}" for name, n in result.picks_per_class.items()))
    if choice.n_near_duplicates is not None:
        result.n_near_duplicates = choice.n_near_duplicates
        result.artifacts.append(NEAR_DUPLICATES)
    if choice.rows is not None and cfg.dump_sampled_embeddings:
        from app.sampling.embedding_matrix import read_matrix_rows
        from app.sampling.embeddings_io import write_embeddings_csv

        rows = choice.rows[order]
        write_embeddings_csv(run_dir / SELECTED_EMBEDDINGS, sampled, read_matrix_rows(run_dir, rows),
                             choice.labels[rows])
        result.artifacts.append(SELECTED_EMBEDDINGS)
    if cfg.dump_dataset:
        from app.sampling.dump import dump_images

        failures = dump_images(artifacts.read_dataset(run_dir).location, sampled, run_dir / SAMPLED_IMAGES,
                               output_image_size(cfg.output_image_size), cfg.output_image_format)
        result.n_dumped = len(sampled) - len(failures)
        result.artifacts.append(SAMPLED_IMAGES)
    from app.report import write_report

    began = time.perf_counter()
    report = write_report(run_dir, cfg.report.n_example_images, cfg.report.memory_requirement_in_GB, cfg.seed,
                          pool_embeddings=choice.pool_embeddings, points=choice.points,
                          files=None if choice.points is None else choice.all_files,
                          show_video_sampling_timeline=cfg.report.show_video_sampling_timeline)
    result.artifacts += report.artifacts
    result.report_s = round(time.perf_counter() - began, 2)
    log.info("select: %s kept %d of %d images (stopped by %s); report: %s", method, len(picks),
             len(choice.all_files), choice.stopped_by, run_dir / artifacts.REPORT_HTML)
    return result


@dataclass
class Choice:
    """What a sampler chose. `picks` index `files`, the candidates left after near duplicates and
    datapool members; `rows`: each candidate's row in the embeddings matrix (None without
    embeddings). `points`: every row of the matrix, L2-normalised, for the report, when that is
    what the selection worked on (None: the report reads the matrix itself)."""

    all_files: List[str]
    files: List[str]
    rows: Optional[np.ndarray]
    picks: List[int]
    distances: Optional[List[float]]
    stopped_by: str
    n_near_duplicates: Optional[int] = None
    n_datapool: Optional[int] = None
    pool_embeddings: Optional[np.ndarray] = None
    points: Optional[np.ndarray] = None
    labels: Optional[np.ndarray] = None  # of every row of the matrix
    picks_per_class: Optional[Dict[int, int]] = None  # with sampler.balance: images picked per class label


def class_names_for(balance: str, picks_per_class: Dict[int, int], run_dir: Path) -> Dict[str, int]:
    """Known labels by their class folder's name; predicted ones by index (the scorer's classes
    need not be this data's)."""
    classes = artifacts.read_dataset(run_dir).classes if balance == "known" else []
    return {classes[label] if 0 <= label < len(classes) else str(label): n for label, n in picks_per_class.items()}


def choose_from_embeddings(cfg: DictConfig, run_dir: Path, device, sampler: Sampler) -> Choice:
    """Read the matrix once into memory and work on it in place: normalised, then compacted to the
    candidates, so the stage holds one N×d float32 array whatever it leaves out."""
    from app.sampling.embedding_matrix import compact_rows, normalize_in_place, read_embeddings, read_matrix_rows

    stored = read_embeddings(run_dir)
    all_files, vectors = stored.files, stored.vectors
    rows = np.arange(len(all_files))
    if cfg.sampler.normalize_embeddings:
        normalize_in_place(vectors)
    whole = True
    n_near_duplicates = None
    if cfg.sampler.near_duplicate_distance > 0:
        keep, n_near_duplicates = drop_near_duplicates(cfg, all_files, vectors, run_dir, device)
        if len(keep) < len(rows):
            vectors, rows, whole = compact_rows(vectors, keep), rows[keep], False
    files = all_files if whole else [all_files[i] for i in rows]
    # One lock from reading the pool to writing it: a concurrent run selects relative to this update.
    with locked_datapool_for(cfg, run_dir) as pool:
        if pool is not None:
            fresh = fresh_candidates(pool, files, vectors.shape[1])
            if len(fresh) < len(files):
                vectors, rows, whole = compact_rows(vectors, fresh), rows[fresh], False
                files = [files[i] for i in fresh]
        chosen = choose(cfg, files, vectors, pool, device, sampler, normalized=True, run_dir=run_dir)
        picks = chosen.picks
        n_datapool = None
        if pool is not None:
            from app.sampling.datapool import commit_run_selection, run_id_for

            order = sorted(set(picks))
            n_datapool = commit_run_selection(pool, run_id_for(run_dir), [files[i] for i in order],
                                              read_matrix_rows(run_dir, rows[order]), stored.labels[rows[order]],
                                              cfg.datapool.keep_history)
    points = vectors if whole and cfg.sampler.normalize_embeddings else None
    return Choice(all_files, files, rows, picks, chosen.distances, chosen.stopped_by, n_near_duplicates, n_datapool,
                  None if pool is None else pool.embeddings, points, stored.labels, chosen.picks_per_class)


def locked_datapool_for(cfg: DictConfig, run_dir: Path):
    """The datapool without this run's earlier members, locked for this run's update; None
    (and no lock) without a datapool.name."""
    if not cfg.datapool.name:
        return nullcontext(None)
    from app.sampling.datapool import datapool_folder, locked_datapool, run_id_for

    return locked_datapool(datapool_folder(cfg.work_dir, cfg.datapool.name), run_id_for(run_dir))


def fresh_candidates(pool, files: List[str], dim: int) -> np.ndarray:
    """The candidates that are not members: the embed stage left out the members of its time; a
    run that updated the pool since then made some of the candidates members too."""
    from app.sampling.datapool import check_dimension

    check_dimension(pool, dim)
    members = pool.members
    fresh = np.fromiter((i for i, name in enumerate(files) if name not in members), dtype=np.int64)
    if len(fresh) < len(files):
        log.info("datapool %s: %d candidates are members already (another run added them after this run's "
                 "embed stage): left out", pool.folder.name, len(files) - len(fresh))
    if not len(fresh):
        raise UserError(f"every candidate of this run is already in datapool {pool.folder.name!r} (added by "
                        f"another run meanwhile): nothing new to select")
    return fresh


def drop_near_duplicates(cfg: DictConfig, files: List[str], vectors: np.ndarray, run_dir: Path, device):
    """(the rows to keep, how many left out): images within sampler.near_duplicate_distance of an
    earlier kept one go, listed in NEAR_DUPLICATES. `vectors` are normalised already when
    sampler.normalize_embeddings asks for it."""
    from app.sampling.near_duplicates import find_near_duplicates

    found = find_near_duplicates(vectors, cfg.sampler.near_duplicate_distance, device)
    artifacts.write_near_duplicates(run_dir, ((files[i], files[j], d) for i, j, d in found))
    keep = np.ones(len(files), dtype=bool)
    keep[[i for i, _, _ in found]] = False
    log.info("select: %d near duplicates (distance < %g) left out", len(found), cfg.sampler.near_duplicate_distance)
    return np.flatnonzero(keep), len(found)


class OneImageEach(Sequence):
    """Units of one image each, [i] for unit i, made when asked for: no list per candidate."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, unit: int) -> List[int]:
        if not -self.n <= unit < self.n:
            raise IndexError(unit)
        return [unit % self.n]


@dataclass
class Chosen:
    """What `choose` returns: picks (indices into its `files`, in pick order), their distances or
    None, what stopped the selection, and with sampler.balance the images picked per class label."""
    picks: List[int]
    distances: Optional[List[float]]
    stopped_by: str
    picks_per_class: Optional[Dict[int, int]] = None


def choose(cfg: DictConfig, files: List[str], embeddings: Optional[np.ndarray], pool, device,
           sampler: Optional[Sampler] = None, normalized: bool = False, run_dir: Optional[Path] = None,
           known_labels: Optional[np.ndarray] = None) -> Chosen:
    """The selection among `files` by the sampler that sampler.method names; `embeddings` is None
    for a sampler that needs none; `run_dir`: where the scores (data/scores.csv) and the scan's
    labels are read, and where an executor=ray coreset shares its shards with the cluster;
    `known_labels`: the files' class labels when the caller has them (else read from the scan's
    list when sampler.balance=known). `normalized`: the rows are normalised already as
    sampler.normalize_embeddings asks."""
    sampler = sampler or get_sampler(cfg.sampler.method)
    length = cfg.sampler.selected_sequence_length
    units = OneImageEach(len(files))
    if length > 1:
        from app.sampling.sequences import frame_sequences

        units = frame_sequences(files, length)
    vectors = pool_vectors = None
    if sampler.needs_embeddings:
        vectors, pool_vectors = unit_vectors(cfg, embeddings, units, pool, normalized)
    balance = cfg.sampler.get("balance")
    scores = predicted = None
    if sampler.needs_scores or balance == "predicted":
        scores, predicted = scores_of(files, run_dir, cfg.sampler.method)
    labels = None
    if balance == "known":
        labels = known_labels if known_labels is not None else labels_from_scan(files, run_dir)
    elif balance == "predicted":
        labels = predicted
    budget = Budget.parse(cfg.sampler.stopping_condition.n_samples)
    count = images_to_pick(budget, len(files))
    n_units = len(units) if budget.is_off else min(-(-count // length), len(units))
    candidates = Candidates(files, units, vectors, executor_for(cfg, run_dir),
                            scores=None if scores is None else per_unit_scores(scores, units),
                            labels=None if labels is None else per_unit_labels(labels, units))
    picks_per_class = None
    if balance:
        from app.sampling.balance import select_balanced

        balanced = select_balanced(sampler, candidates, count=n_units, pool=pool_vectors, seed=cfg.seed,
                                   device=device, config=cfg.sampler, balance=balance)
        chosen = balanced.selection
        picks_per_class = {label: 0 for label in balanced.picks_per_class}
        for unit in chosen.picks:
            picks_per_class[int(candidates.labels[unit])] += len(units[unit])
    else:
        chosen = sampler.select(candidates, count=n_units, pool=pool_vectors, seed=cfg.seed, device=device,
                                config=cfg.sampler)
    picks = [i for unit in chosen.picks for i in units[unit]]
    distances = chosen.distances
    if distances is not None and length > 1:
        distances = [d for unit, d in zip(chosen.picks, distances) for _ in units[unit]]
    return Chosen(picks, distances, chosen.stopped_by, picks_per_class)


def scores_of(files: List[str], run_dir: Optional[Path], method: str):
    """(score, predicted label) arrays for `files`, from the score stage's data/scores.csv, joined
    by file name; refuses when a file has no score."""
    from app.scoring.scores_io import read_scores

    if run_dir is None or not (Path(run_dir) / SCORES).is_file():
        raise UserError(f"sampler={method} needs {SCORES} from the score stage, which is not in {run_dir}: add "
                        f"score to stages (with a scorer and scorer.checkpoint)")
    stored = read_scores(run_dir)
    rows = rows_by_name(files, stored.files)
    missing = np.flatnonzero(rows < 0)
    if len(missing):
        raise UserError(f"{len(missing)} of {len(files)} candidates have no score in {SCORES} (e.g. "
                        f"{files[missing[0]]!r}): the score stage did not score them; run it again "
                        f"(add score to stages)")
    return stored.scores[rows], stored.predicted[rows]


def labels_from_scan(files: List[str], run_dir: Optional[Path]) -> np.ndarray:
    """The class-folder labels of `files` (data/input_files.csv); -1 for a file not listed."""
    names, labels = artifacts.read_input_files(run_dir)
    rows = rows_by_name(files, names)
    return np.where(rows >= 0, np.asarray(labels, dtype=np.int64)[rows], -1)


def rows_by_name(files: List[str], names: List[str]) -> np.ndarray:
    """For each of `files`, its row in `names` (-1: not there)."""
    row_of = {name: row for row, name in enumerate(names)}
    return np.fromiter((row_of.get(name, -1) for name in files), dtype=np.int64, count=len(files))


def per_unit_scores(scores: np.ndarray, units) -> np.ndarray:
    """A unit's score: its image's, or the mean of its frames'."""
    if isinstance(units, OneImageEach):
        return np.asarray(scores, dtype=np.float64)
    return np.fromiter((scores[unit].mean() for unit in units), dtype=np.float64, count=len(units))


def per_unit_labels(labels: np.ndarray, units) -> np.ndarray:
    """A unit's class: its image's, or its frames' most common known label (-1 when none is known)."""
    if isinstance(units, OneImageEach):
        return np.asarray(labels, dtype=np.int64)

    def most_common(unit) -> int:
        known = labels[unit][labels[unit] >= 0]
        return int(np.bincount(known).argmax()) if len(known) else -1

    return np.fromiter((most_common(unit) for unit in units), dtype=np.int64, count=len(units))


def unit_vectors(cfg: DictConfig, embeddings: np.ndarray, units: List[List[int]], pool, normalized: bool = False):
    """One vector per unit (a sequence: the mean of its frames) and the datapool's vectors, both
    L2-normalised with sampler.normalize_embeddings; the pool's are None without one."""
    from app.sampling.coreset import normalize_rows

    normalize = cfg.sampler.normalize_embeddings
    if normalize and not normalized:
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
