"""The datapool: every selection made under one `datapool.name`, kept in
`<work_dir>/datapool/<name>/embeddings.csv` (lightly format) across runs.

A later run leaves the pool's members out of embedding and out of the candidates, and selects what
lies far from them: they act as centers from the start and count towards nothing new.
"""
from __future__ import annotations

import fcntl
import logging
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional

import numpy as np

from app.config import UserError, run_stamp

log = logging.getLogger("thresher")


@dataclass
class Datapool:
    folder: Path
    files: List[str]
    embeddings: Optional[np.ndarray]  # None while the pool is empty
    labels: List[int]

    @property
    def members(self) -> set:
        return set(self.files)


def datapool_folder(work_dir: str, name: str) -> Path:
    return Path(work_dir) / "datapool" / name


def load_datapool(folder: Path) -> Datapool:
    from app.sampling.embed import read_embeddings_csv

    path = folder / "embeddings.csv"
    if not path.is_file():
        return Datapool(folder, [], None, [])
    files, embeddings, labels = read_embeddings_csv(path, strict=True)
    return Datapool(folder, files, embeddings, labels)


@contextmanager
def locked(folder: Path) -> Iterator[None]:
    """One run at a time updates a pool: two selections must not overwrite each other."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def check_dimension(pool: Datapool, dim: int) -> None:
    if pool.embeddings is not None and pool.embeddings.shape[1] != dim:
        raise UserError(f"datapool {pool.folder} holds {pool.embeddings.shape[1]}-dimensional embeddings "
                        f"and this run makes {dim}-dimensional ones (another model?): use another "
                        f"datapool.name")


def add_to_datapool(pool: Datapool, files: List[str], embeddings: np.ndarray, labels: List[int],
                    keep_history: bool) -> int:
    """Append the new selection; the previous state goes to history/ first when keep_history."""
    from app.sampling.embed import write_embeddings_csv

    path = pool.folder / "embeddings.csv"
    if keep_history and path.is_file():
        history = pool.folder / "history"
        history.mkdir(exist_ok=True)
        shutil.copyfile(path, history / f"{run_stamp()}.csv")
    merged_files = pool.files + files
    merged = embeddings if pool.embeddings is None else np.concatenate([pool.embeddings, embeddings])
    write_embeddings_csv(path, merged_files, merged, pool.labels + labels)
    log.info("datapool %s: %d members (+%d)", pool.folder.name, len(merged_files), len(files))
    return len(merged_files)
