"""Embeddings as the stages exchange them: a float32 N×d matrix in `data/embeddings.npy` and its
rows' file names and labels in `data/embedding_rows.csv` (row i of one is row i of the other).

Why `.npy`: numpy reads it with memory mapping and no extra dependency, the embed stage writes it
row by row as it computes (`np.lib.format.open_memmap`), and a reader gets exactly the float32
values the model produced, with no text parsing. The lightly CSV (`data/embeddings.csv`,
app.sampling.embeddings_io) is written beside it for tools that know that format.

A low-floor module (numpy and the standard library only): the datapool, the report and the select
stage read embeddings without importing torch.
"""
from __future__ import annotations

import csv
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, List, Sequence

import numpy as np

from app import atomic
from app.artifacts import EMBEDDING_MATRIX, EMBEDDING_ROWS, EMBEDDINGS

# Rows per chunk when copying or converting a matrix: 64 MiB of float32 at d = 512.
CHUNK_ROWS = 32768


@dataclass
class Embeddings:
    """Row i: the file `files[i]`, its label `labels[i]` (int64) and its vector `vectors[i]` (float32)."""

    files: List[str]
    labels: np.ndarray
    vectors: np.ndarray

    def __len__(self) -> int:
        return len(self.files)

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])


def has_embeddings(run_dir: Path) -> bool:
    return (Path(run_dir) / EMBEDDING_MATRIX).is_file() and (Path(run_dir) / EMBEDDING_ROWS).is_file()


def read_rows(run_dir: Path):
    """(file names, labels as int64) of the matrix's rows."""
    files: List[str] = []
    labels: List[int] = []
    with open(Path(run_dir) / EMBEDDING_ROWS, newline="", encoding="utf-8", errors="surrogateescape") as handle:
        reader = csv.reader(handle)
        next(reader, None)
        for name, label in reader:
            files.append(name)
            labels.append(int(label))
    return files, np.asarray(labels, dtype=np.int64)


def read_embeddings(run_dir: Path, mmap: bool = False) -> Embeddings:
    """The run's embeddings. `mmap=True` maps the matrix read-only (pages are read when touched);
    otherwise it is read into memory once, as one float32 array that the caller may change."""
    files, labels = read_rows(run_dir)
    path = Path(run_dir) / EMBEDDING_MATRIX
    vectors = np.load(path, mmap_mode="r") if mmap else np.load(path)
    if vectors.dtype != np.float32 or vectors.ndim != 2 or vectors.shape[0] != len(files):
        raise ValueError(f"{path} holds {vectors.dtype} {vectors.shape}, expected float32 ({len(files)}, d)")
    return Embeddings(files, labels, vectors)


def read_matrix_rows(run_dir: Path, rows: np.ndarray) -> np.ndarray:
    """A copy of some rows of the matrix, read through a mapping that is closed again at once: the
    pages it touched (and their read-around) leave the process's memory with it."""
    mapped = np.load(Path(run_dir) / EMBEDDING_MATRIX, mmap_mode="r")
    copied = np.array(mapped[np.asarray(rows)], dtype=np.float32)
    del mapped  # the last reference: unmapped here
    return copied


def write_embeddings(run_dir: Path, files: Sequence[str], labels: Sequence[int], vectors: np.ndarray,
                     lightly_csv: bool = True) -> None:
    """Write a matrix held in memory (or mapped): the matrix, its rows, and the lightly CSV."""
    run_dir = Path(run_dir)
    if not hasattr(vectors, "shape"):
        vectors = np.asarray(vectors, dtype=np.float32)
    write_matrix(run_dir, vectors)
    write_rows(run_dir, files, labels)
    if lightly_csv:
        from app.sampling.embeddings_io import write_embeddings_csv

        write_embeddings_csv(run_dir / EMBEDDINGS, files, vectors, labels)


def write_matrix(run_dir: Path, vectors) -> None:
    """The matrix alone, copied in chunks (`vectors`: an array, a memmap, or anything sliced like one)."""
    with atomic.atomic_path(Path(run_dir) / EMBEDDING_MATRIX) as tmp:
        target = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=vectors.shape)
        for start in range(0, len(vectors), CHUNK_ROWS):
            target[start:start + CHUNK_ROWS] = vectors[start:start + CHUNK_ROWS]
        target.flush()
        del target


def write_rows(run_dir: Path, files: Iterable[str], labels: Iterable[int]) -> None:
    atomic.write_csv(Path(run_dir) / EMBEDDING_ROWS, ["filenames", "labels"],
                     ((name, int(label)) for name, label in zip(files, labels)))


class EmbeddingsWriter:
    """The embed stage's output, written as it is computed: `put` rows by their index in the input
    list, then `finish` with the rows that were embedded. Until `finish` the matrix lives in a
    temporary file beside the target, so an interrupted stage leaves no half-written artifact."""

    def __init__(self, run_dir: Path, n_rows: int, dim: int):
        self.run_dir = Path(run_dir)
        self.target = self.run_dir / EMBEDDING_MATRIX
        self.target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.target.name}.", suffix=".tmp", dir=self.target.parent)
        os.close(fd)
        self.tmp = Path(tmp)
        self.matrix = np.lib.format.open_memmap(self.tmp, mode="w+", dtype=np.float32, shape=(n_rows, dim))

    def put(self, rows: np.ndarray, vectors: np.ndarray) -> None:
        rows = np.asarray(rows)
        if len(rows) and rows[-1] - rows[0] == len(rows) - 1 and np.all(np.diff(rows) == 1):
            self.matrix[rows[0]:rows[-1] + 1] = vectors  # the usual case: a contiguous batch
        else:
            self.matrix[rows] = vectors

    def finish(self, files: Sequence[str], labels: Sequence[int], embedded: np.ndarray,
               lightly_csv: bool = True) -> int:
        """Keep the rows where `embedded` is true, in input order; returns how many."""
        keep = np.flatnonzero(embedded)
        whole = len(keep) == len(self.matrix)
        files = list(files) if whole else [files[i] for i in keep]
        labels = np.asarray(labels, dtype=np.int64)[keep]
        if whole:
            self.matrix.flush()
            atomic.default_mode(self.tmp)
            atomic.fsync(self.tmp)
            os.replace(self.tmp, self.target)
            atomic.fsync(self.target.parent)
            vectors = np.load(self.target, mmap_mode="r")
        else:  # rows failed to load: copy the others into a matrix without gaps
            write_matrix(self.run_dir, _Rows(self.matrix, keep))
            vectors = np.load(self.target, mmap_mode="r")
        del self.matrix
        self.tmp.unlink(missing_ok=True)
        write_rows(self.run_dir, files, labels)
        if lightly_csv:
            from app.sampling.embeddings_io import write_embeddings_csv

            write_embeddings_csv(self.run_dir / EMBEDDINGS, files, vectors, labels)
        return len(keep)

    def abandon(self) -> None:
        self.matrix = None
        self.tmp.unlink(missing_ok=True)


class _Rows:
    """Rows `keep` of a matrix, sliced like an array without copying all of them at once."""

    def __init__(self, matrix: np.ndarray, keep: np.ndarray):
        self.matrix, self.keep = matrix, keep
        self.shape = (len(keep), matrix.shape[1])
        self.dtype = matrix.dtype

    def __len__(self) -> int:
        return len(self.keep)

    def __getitem__(self, item: slice) -> np.ndarray:
        return self.matrix[self.keep[item]]

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self.matrix[self.keep], dtype=dtype)


def compact_rows(matrix: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """`matrix[keep]` for ascending `keep`, made in place in chunks (no second N×d array): the
    first len(keep) rows of `matrix`, returned as a view."""
    keep = np.asarray(keep)
    for start in range(0, len(keep), CHUNK_ROWS):
        part = keep[start:start + CHUNK_ROWS]
        # part[i] >= start + i, and later chunks read only rows beyond this one's sources
        matrix[start:start + len(part)] = matrix[part]
    return matrix[:len(keep)]


def normalize_in_place(vectors: np.ndarray) -> np.ndarray:
    """L2-normalise each row in place, in chunks (a zero row stays zero); returns `vectors`."""
    for start in range(0, len(vectors), CHUNK_ROWS):
        block = vectors[start:start + CHUNK_ROWS]
        norms = np.sqrt(np.einsum("ij,ij->i", block, block, dtype=np.float64)).astype(np.float32)
        norms[norms == 0] = 1.0
        block /= norms[:, None]
    return vectors
