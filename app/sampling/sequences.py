"""Selection of whole frame sequences (`sampler.selected_sequence_length`): the files of one folder
in name order are cut into runs of that length, and a run is picked or left as a whole."""
from __future__ import annotations

from collections import defaultdict
from typing import List

import numpy as np


def frame_sequences(files: List[str], length: int) -> List[List[int]]:
    """Indices into `files`, grouped in runs of `length` consecutive frames of one folder (a
    folder's last run may be shorter)."""
    by_folder = defaultdict(list)
    for index, name in enumerate(files):
        by_folder[name.rsplit("/", 1)[0] if "/" in name else ""].append(index)
    sequences = []
    for folder in sorted(by_folder):
        ordered = sorted(by_folder[folder], key=lambda i: files[i])
        sequences += [ordered[start:start + length] for start in range(0, len(ordered), length)]
    return sequences


def sequence_embeddings(embeddings: np.ndarray, sequences: List[List[int]]) -> np.ndarray:
    """A sequence is represented by the mean of its frames' embeddings."""
    return np.stack([embeddings[members].mean(axis=0) for members in sequences]).astype(np.float32)
