"""The datapool: every selection made under one `datapool.name`, kept across runs in
`<work_dir>/datapool/<name>/`:

    embeddings.csv    the members' embeddings in lightly's format (lightly.utils.io.load_embeddings)
    members.csv       filenames,run_id,added_at: which run added each member, row for row
    history/<UTC time>_<run id>/   both files as they were before that run's update (keep_history)
    .lock             held from reading the pool to writing it; names its holder

A later run leaves the pool's members out of embedding and out of the candidates, and selects what
lies far from them: they act as centers from the start and count towards nothing new.

An update is a transaction: one run at a time holds the lock from reading the pool to writing it,
its selection replaces what the same run added before (a rerun adds no second set), and a crash
leaves the pool as it was before the update or after it, never in between.
"""
from __future__ import annotations

import csv
import fcntl
import logging
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np

from app import atomic
from app.artifacts import read_run_id
from app.errors import UserError
from app.sampling.embeddings_io import read_embeddings_csv, write_embeddings_csv

log = logging.getLogger("thresher")

EMBEDDINGS = "embeddings.csv"
MEMBERS = "members.csv"
MEMBERS_HEADER = ["filenames", "run_id", "added_at"]
HISTORY = "history"
LOCK = ".lock"
# An update writes both files into DRAFT, then renames DRAFT to READY: that rename is the commit.
# Moving READY's files into place is repeatable, so whoever takes the lock next finishes it.
DRAFT = ".update-draft"
READY = ".update-ready"
# The run of members added before members.csv existed (a pool from an older thresher).
UNKNOWN_RUN = ""


@dataclass
class Datapool:
    """The members, columnar: one name per member, the rest in arrays. A member's update (the run
    that added it and when) is `updates[update_of[i]]`: a few distinct values, not one per member."""

    folder: Path
    files: List[str]
    embeddings: Optional[np.ndarray]  # None while the pool is empty
    labels: np.ndarray  # int64
    update_of: np.ndarray  # int32, an index into updates
    updates: List[Tuple[str, str]]  # (run_id, added_at as UTC ISO time)

    @cached_property
    def members(self) -> frozenset:
        return frozenset(self.files)

    @property
    def run_ids(self) -> List[str]:
        return [self.updates[u][0] for u in self.update_of]

    @property
    def added_at(self) -> List[str]:
        return [self.updates[u][1] for u in self.update_of]

    def without_run(self, run_id: str) -> "Datapool":
        own = [u for u, (owner, _) in enumerate(self.updates) if owner == run_id]
        keep = np.flatnonzero(~np.isin(self.update_of, own))
        if len(keep) == len(self.files):
            return self
        return Datapool(self.folder, [self.files[i] for i in keep],
                        self.embeddings[keep] if len(keep) else None, self.labels[keep], self.update_of[keep],
                        self.updates)


def run_id_for(run_dir: Path) -> str:
    """The run an update belongs to (the id in the run directory's marker): rerunning that run's
    select, or the run after overwrite=true, replaces its members."""
    return read_run_id(run_dir) or Path(run_dir).name


def datapool_folder(work_dir: str, name: str) -> Path:
    return Path(work_dir) / "datapool" / name


def load_datapool(folder: Path) -> Datapool:
    """The pool as the last update left it; waits while an update is under way."""
    if not folder.is_dir():
        return _empty(folder)
    with _locked(folder, "a run reading the pool"):
        return _read(folder)


@contextmanager
def locked_datapool(folder: Path, run_id: str) -> Iterator[Datapool]:
    """The pool without what `run_id` added before, locked until the block ends: choose relative
    to it, then `commit_run_selection`. Another run waits here and then sees this run's update."""
    with _locked(folder, f"run {run_id}"):
        pool = _read(folder)
        others = pool.without_run(run_id)
        if len(others.files) < len(pool.files):
            log.info("datapool %s: run %s added %d members before; its new selection replaces them",
                     folder.name, run_id, len(pool.files) - len(others.files))
        yield others


def check_dimension(pool: Datapool, dim: int) -> None:
    if pool.embeddings is not None and pool.embeddings.shape[1] != dim:
        raise UserError(f"datapool {pool.folder} holds {pool.embeddings.shape[1]}-dimensional embeddings "
                        f"and this run makes {dim}-dimensional ones (another model?): use another "
                        f"datapool.name")


def commit_run_selection(pool: Datapool, run_id: str, files: List[str], embeddings: np.ndarray,
                         labels: List[int], keep_history: bool) -> int:
    """Make `pool` (from `locked_datapool`, inside its block) plus this run's selection the pool's
    new state; with keep_history, the previous state goes to history/ first. Returns the size."""
    if not pool.members.isdisjoint(files) or _first_repeated(files) is not None:
        raise ValueError(f"datapool {pool.folder}: the selection would put a file into the pool twice")
    folder = pool.folder
    if keep_history and (folder / EMBEDDINGS).is_file():
        _keep_in_history(folder, run_id)
    added_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    all_files = pool.files + list(files)
    merged = embeddings if pool.embeddings is None else np.concatenate([pool.embeddings, embeddings])
    updates = pool.updates + [(run_id, added_at)]
    update_of = np.concatenate([pool.update_of, np.full(len(files), len(updates) - 1, dtype=np.int32)])
    draft = folder / DRAFT
    write_embeddings_csv(draft / EMBEDDINGS, all_files, merged,
                         np.concatenate([pool.labels, np.asarray(labels, dtype=np.int64)]))
    atomic.write_csv(draft / MEMBERS, MEMBERS_HEADER,
                     ((name, *updates[u]) for name, u in zip(all_files, update_of.tolist())))
    os.replace(draft, folder / READY)  # the commit point
    atomic.fsync(folder)
    _finish_update(folder)
    log.info("datapool %s: %d members (+%d from run %s)", folder.name, len(all_files), len(files), run_id)
    return len(all_files)


@contextmanager
def _locked(folder: Path, holder: str) -> Iterator[None]:
    """One process at a time reads or updates a pool. Taking the lock finishes an update that a
    crash interrupted after its commit, and drops one interrupted before."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK, "a+") as lock:
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            log.info("datapool %s: waiting for the datapool lock held by %s", folder.name,
                     lock.read().strip() or "another run")
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            lock.seek(0)
            lock.truncate()
            lock.write(f"{holder} (pid {os.getpid()})\n")
            lock.flush()
            _finish_update(folder)
            shutil.rmtree(folder / DRAFT, ignore_errors=True)
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def _finish_update(folder: Path) -> None:
    """Move a committed update's files into place (each move is atomic, and a repeat does no harm)."""
    ready = folder / READY
    if not ready.is_dir():
        return
    for name in (EMBEDDINGS, MEMBERS):
        if (ready / name).is_file():
            os.replace(ready / name, folder / name)
    atomic.fsync(folder)
    ready.rmdir()


def _keep_in_history(folder: Path, run_id: str) -> None:
    """Copy the current state to a new history/<UTC time>_<run id>/; no earlier one is overwritten."""
    stamped = f"{datetime.now(timezone.utc).strftime('%Y-%m-%d_%H-%M-%S')}_{run_id}"
    kept, attempt = folder / HISTORY / stamped, 1
    while kept.exists():  # another update in the same second
        attempt += 1
        kept = folder / HISTORY / f"{stamped}_{attempt}"
    kept.mkdir(parents=True)
    for name in (EMBEDDINGS, MEMBERS):
        if (folder / name).is_file():
            with atomic.atomic_path(kept / name) as tmp:
                shutil.copyfile(folder / name, tmp)


def _empty(folder: Path) -> Datapool:
    return Datapool(folder, [], None, np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int32), [])


def _read(folder: Path) -> Datapool:
    """Read both files and check that they agree; a pool that does not is refused, not repaired."""
    if not (folder / EMBEDDINGS).is_file():
        if (folder / MEMBERS).is_file():
            raise _unusable(folder, f"{MEMBERS} has no {EMBEDDINGS} beside it")
        return _empty(folder)
    try:
        files, embeddings, labels = read_embeddings_csv(folder / EMBEDDINGS)
    except (UserError, ValueError, IndexError) as error:
        raise _unusable(folder, f"{EMBEDDINGS} is not a lightly embeddings file ({error})") from None
    repeated = _first_repeated(files)
    if repeated is not None:
        raise _unusable(folder, f"{repeated!r} appears twice in {EMBEDDINGS} (an older thresher let two "
                                f"runs add it at once)", f"keep one row per file in {EMBEDDINGS}")
    if (folder / MEMBERS).is_file():
        update_of, updates = _read_members(folder, files)
    else:  # a pool from before members.csv: its members stay, added by no run that a rerun replaces
        update_of, updates = np.zeros(len(files), dtype=np.int32), [(UNKNOWN_RUN, "")]
    return Datapool(folder, files, embeddings if files else None, np.asarray(labels, dtype=np.int64),
                    update_of, updates)


def _read_members(folder: Path, files: List[str]) -> Tuple[np.ndarray, List[Tuple[str, str]]]:
    """members.csv streamed: each row's update, checked row by row against the embeddings' files."""
    update_of = np.empty(len(files), dtype=np.int32)
    index: Dict[Tuple[str, str], int] = {}
    with open(folder / MEMBERS, newline="", encoding="utf-8", errors="surrogateescape") as handle:
        reader = csv.reader(handle)
        if next(reader, None) != MEMBERS_HEADER:
            raise _unusable(folder, f"{MEMBERS} is not a {','.join(MEMBERS_HEADER)} file")
        row_count = 0
        for row_count, row in enumerate(reader, start=1):
            if len(row) != len(MEMBERS_HEADER):
                raise _unusable(folder, f"{MEMBERS} is not a {','.join(MEMBERS_HEADER)} file")
            if row_count > len(files) or row[0] != files[row_count - 1]:
                raise _unusable(folder, f"{MEMBERS} and {EMBEDDINGS} list different files (edited by hand?)")
            update_of[row_count - 1] = index.setdefault((row[1], row[2]), len(index))
    if row_count != len(files):
        raise _unusable(folder, f"{MEMBERS} and {EMBEDDINGS} list different files (edited by hand?)")
    return update_of, list(index)


def _first_repeated(files: List[str]) -> Optional[str]:
    seen = set()
    for name in files:
        if name in seen:
            return name
        seen.add(name)
    return None


def _unusable(folder: Path, problem: str, remedy: str = "") -> UserError:
    remedy = remedy or f"restore {EMBEDDINGS} and {MEMBERS} from the newest folder in {folder / HISTORY}"
    return UserError(f"datapool {folder} cannot be used: {problem}: {remedy}, or use another datapool.name")
