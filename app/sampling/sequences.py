"""Selection of whole frame sequences (`sampler.selected_sequence_length`): frames are cut into
runs of that length, and a run is picked or left as a whole.

Frames of a video (`drive-042-mp4.png`, app/data/video.py) are grouped by their video and ordered
by frame number; a run never spans a gap where frames were left out (corrupt or duplicate), so
it is always consecutive frames. Other files are grouped by folder, in name order.
"""
from __future__ import annotations

from collections import defaultdict
from typing import List

import numpy as np

from app.data.video import parse_frame_name


def frame_sequences(files: List[str], length: int) -> List[List[int]]:
    """Indices into `files`, grouped in runs of at most `length` consecutive frames of one video
    (or files of one folder); a group's last run, and a run that ends at a gap, may be shorter."""
    groups = defaultdict(list)
    for index, name in enumerate(files):
        frame = parse_frame_name(name)
        if frame is not None:
            groups[("video", frame[0])].append((frame[1], index))
        else:
            groups[("folder", name.rsplit("/", 1)[0] if "/" in name else "")].append((name, index))
    sequences = []
    for key in sorted(groups):
        ordered = sorted(groups[key])
        run: List[int] = []
        previous = None
        for position, index in ordered:
            gap = key[0] == "video" and previous is not None and position != previous + 1
            if run and (len(run) == length or gap):
                sequences.append(run)
                run = []
            run.append(index)
            previous = position
        if run:
            sequences.append(run)
    return sequences


def sequence_embeddings(embeddings: np.ndarray, sequences: List[List[int]]) -> np.ndarray:
    """A sequence is represented by the mean of its frames' embeddings."""
    return np.stack([embeddings[members].mean(axis=0) for members in sequences]).astype(np.float32)
