"""Per-class counts of the selection, for report.json and report.html: how many candidates and
selected images each class has, by the known labels (class folders) and, when the score stage
ran, by the model's predicted labels; and what the held-out or validation set holds per class.
app.report.page renders them (class_count_sections).

A diversity sampler can under-sample compact classes (k-center leans to outliers): a class whose
share of the selection is under half its share of the candidates is flagged, so a user sees it
before training on the selection. Counts are numpy bincounts over label arrays, no object per image.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from app import artifacts
from app.report.page import read_report, write_report_files

# A class is flagged when its share of the selection is below this part of its share of the candidates.
UNDER_SAMPLED_RATIO = 0.5


def per_class(labels, selected, classes: Sequence[str]) -> Dict[str, Any]:
    """Rows per class of candidates, selected, the class's share selected, and its shares of the
    candidates and of the selection; `labels` int64 per candidate (-1: none), `selected` bool."""
    import numpy as np

    labels, selected = np.asarray(labels, dtype=np.int64), np.asarray(selected, dtype=bool)
    n_classes = len(classes)
    known = (labels >= 0) & (labels < n_classes)
    candidates = np.bincount(labels[known], minlength=n_classes)
    chosen = np.bincount(labels[known & selected], minlength=n_classes)
    n_candidates, n_selected = max(len(labels), 1), max(int(selected.sum()), 1)
    rows = []
    for name, n, k in zip(classes, candidates.tolist(), chosen.tolist()):
        share_of_candidates, share_of_selection = n / n_candidates, k / n_selected
        rows.append({"class": name, "candidates": n, "selected": k,
                     "selected_fraction": round(k / n, 4) if n else None,
                     "share_of_candidates": round(share_of_candidates, 4),
                     "share_of_selection": round(share_of_selection, 4),
                     "under_sampled": bool(n and selected.any()
                                           and share_of_selection < UNDER_SAMPLED_RATIO * share_of_candidates)})
    return {"per_class": rows, "without_label": {"candidates": int((~known).sum()),
                                                 "selected": int((~known & selected).sum())}}


def class_counts(run_dir: Path, sampled: List[str], removed: List[str]) -> Optional[Dict[str, Any]]:
    """The class_counts section of the selection report; None when the data has no class names
    (a flat folder) or no candidates."""
    import numpy as np

    run_dir = Path(run_dir)
    if not (run_dir / artifacts.DATASET).is_file() or not (sampled or removed):
        return None
    classes = list(artifacts.read_dataset(run_dir).classes)
    if not classes:
        return None
    candidates = sampled + removed
    chosen = set(sampled)
    selected = np.fromiter((name in chosen for name in candidates), dtype=bool, count=len(candidates))
    section: Dict[str, Any] = {"classes": classes, "under_sampled_ratio": UNDER_SAMPLED_RATIO}
    if (run_dir / artifacts.INPUT_FILES).is_file():
        files, labels = artifacts.read_input_files(run_dir)
        section["known_labels"] = per_class(_labels_of(candidates, files, labels), selected, classes)
    if (run_dir / artifacts.SCORES).is_file():
        from app.scoring.scores_io import read_scores

        scores = read_scores(run_dir)
        section["predicted_labels"] = per_class(_labels_of(candidates, scores.files, scores.predicted), selected,
                                                classes)
    held_out = artifacts.read_holdout_files(run_dir)
    if held_out is not None:
        section["held_out"] = validation_counts(held_out[1], classes,
                                                f"the held-out images ({artifacts.HOLDOUT_FILES})")
    return section


def _labels_of(names: Sequence[str], files: Sequence[str], labels):
    """The label of each of `names`, looked up in (files, labels); -1 where it is not listed."""
    import numpy as np

    index = {name: row for row, name in enumerate(files)}
    labels = np.asarray(labels, dtype=np.int64)
    rows = np.fromiter((index.get(name, -1) for name in names), dtype=np.int64, count=len(names))
    return np.where(rows >= 0, labels[np.maximum(rows, 0)] if len(labels) else -1, -1)


def validation_counts(labels, classes: Sequence[str], source: str) -> Dict[str, Any]:
    """Images per class of a held-out or validation set."""
    import numpy as np

    labels = np.asarray(labels, dtype=np.int64)
    known = (labels >= 0) & (labels < len(classes))
    counts = np.bincount(labels[known], minlength=len(classes)).tolist()
    return {"source": source, "n_images": int(len(labels)), "per_class": dict(zip(classes, counts)),
            "without_label": int((~known).sum())}


def record_validation_counts(run_dir: Path, data) -> None:
    """The train stage's validation set per class, into report.json's class_counts (classification
    only: a detection image holds several classes)."""
    if not data.val_index or not all(isinstance(data.targets[i], int) for i in data.val_index[:1]):
        return
    source = data.validation_source or "a split of the selection (trainer.val_fraction / val_filenames_file)"
    report = read_report(Path(run_dir))
    section = report.setdefault("class_counts", {"classes": list(data.classes)})
    section["validation"] = validation_counts([data.targets[i] for i in data.val_index], data.classes, source)
    write_report_files(Path(run_dir), report)
