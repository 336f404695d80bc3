"""The score stage's file (artifacts.SCORES): one row per scored image,
`filenames,score,predicted_label`, in the scan's order. `score` is the scorer's (higher: more worth
labelling); `predicted_label` is the model's class index, -1 where it predicts none (detection, or
an image it could not read). Read into arrays, not a Python object per value, so a million rows
stay small."""
from __future__ import annotations

import csv
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, List, Tuple

import numpy as np

from app import atomic
from app.artifacts import SCORES

HEADER = ("filenames", "score", "predicted_label")


@dataclass
class Scores:
    files: List[str]
    scores: np.ndarray  # float64, one per file
    predicted: np.ndarray  # int64, one per file; -1: none

    def by_file(self) -> dict:
        """file name -> row, for joining the scores onto candidates in another order."""
        return {name: row for row, name in enumerate(self.files)}


def write_scores(run_dir: Path, rows: Iterable[Tuple[str, float, int]]) -> None:
    """(file name, score, predicted label) per image, atomically."""
    atomic.write_csv(Path(run_dir) / SCORES, HEADER,
                     ((name, repr(float(score)), int(label)) for name, score, label in rows))


def read_scores(run_dir: Path) -> Scores:
    files: List[str] = []
    scores, predicted = array("d"), array("q")
    with open(Path(run_dir) / SCORES, newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        header = next(reader)
        name_at, score_at, label_at = (header.index(column) for column in HEADER)
        for row in reader:
            files.append(row[name_at])
            scores.append(float(row[score_at]))
            predicted.append(int(row[label_at]))
    return Scores(files, np.frombuffer(scores, dtype=np.float64).copy(),
                  np.frombuffer(predicted, dtype=np.int64).copy())
