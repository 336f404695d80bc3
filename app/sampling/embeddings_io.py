"""Embeddings in lightly's CSV format (`filenames,embedding_0,...,embedding_{D-1},labels`), read
and written in one place, as lightly's utils/io.py does.

A low-floor module without torch: the datapool, the report and the config check read a CSV
without loading the embed stage.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import List, Sequence, Tuple

import numpy as np

from app import atomic
from app.errors import UserError


def embeddings_header(dim: int) -> List[str]:
    return ["filenames", *(f"embedding_{i}" for i in range(dim)), "labels"]


def is_embeddings_header(header: Sequence[str]) -> bool:
    """Whether `header` is the lightly header for some dimension >= 1."""
    header = list(header)
    return len(header) >= 3 and header == embeddings_header(len(header) - 2)


def write_embeddings_csv(path: Path, files: List[str], embeddings: np.ndarray, labels: List[int]) -> None:
    """The lightly format: header `filenames,embedding_0,...,embedding_{D-1},labels`."""
    rows = ([name, *(f"{v:.7g}" for v in vector.tolist()), label]
            for name, vector, label in zip(files, embeddings, labels))
    atomic.write_csv(path, embeddings_header(embeddings.shape[1]), rows)


def read_embeddings_csv(path: Path, strict: bool = False) -> Tuple[List[str], np.ndarray, List[int]]:
    """Read the lightly format. `strict` (a file the user brought) checks every line and refuses a
    malformed one with its line number and what is wrong."""

    def refuse(line: int, reason: str) -> UserError:
        return UserError(f"embeddings={str(path)!r} is malformed at line {line}: {reason}")

    # A name that is not UTF-8 reads (surrogate-escaped) as no file the scan uses, instead of failing.
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None:
            raise refuse(1, "the file is empty; expected the header filenames,embedding_0,...,labels")
        dim = len(header) - 2
        if strict and not is_embeddings_header(header):
            raise refuse(1, f"the header must be filenames,embedding_0,...,embedding_{{D-1}},labels, "
                            f"not {','.join(header[:3])}{',...' if len(header) > 3 else ''}")
        files, rows, labels, seen = [], [], [], set()
        for line, row in enumerate(reader, start=2):
            if strict:
                if len(row) != dim + 2:
                    raise refuse(line, f"{len(row)} fields, the header has {dim + 2}")
                if not row[0]:
                    raise refuse(line, "the file name is empty")
                if row[0] in seen:
                    raise refuse(line, f"{row[0]!r} appears twice")
                seen.add(row[0])
                try:
                    values = [float(v) for v in row[1:1 + dim]]
                except ValueError as error:
                    raise refuse(line, f"not a number: {error}") from None
                if not all(math.isfinite(v) for v in values):
                    raise refuse(line, "an embedding value is NaN or infinite")
                try:
                    int(row[-1])
                except ValueError:
                    raise refuse(line, f"the label {row[-1]!r} is not an integer") from None
            files.append(row[0])
            rows.append(row[1:1 + dim])
            labels.append(int(row[-1]))
    if strict and not files:
        raise refuse(2, "the file has a header but no rows")
    vectors = np.array(rows, dtype=np.float32).reshape(len(rows), dim)
    return files, vectors, labels
