"""The score stage's part of the report: which checkpoint scored how many images, how the scores
spread (a histogram) and the images most worth labelling, beside the other stages' sections
(app.report.page renders it)."""
from __future__ import annotations

from pathlib import Path
from typing import List, Sequence

import numpy as np

from app.artifacts import REPORT_HTML, REPORT_JSON, SCORES, SCORES_HISTOGRAM_PNG
from app.report import plots
from app.report.page import read_report, write_report_files

N_TOP = 5
# What each score means, for the page; app.scoring.scorers has the formulas.
MEANINGS = {
    "least_confidence": "1 − the highest class probability",
    "margin": "1 − (highest − second highest class probability)",
    "entropy": "entropy of the class probabilities ÷ log(classes): 0 certain, 1 uniform",
    "object_frequency": "objects per image, each class's repeats counted frequency_penalty each, "
                        "rescaled to [min_score, 1]",
    "objectness_least_confidence": "1 − the score of the most confident box (0 when no box)",
}


def write_scores_report(run_dir: Path, method: str, checkpoint_name: str, files: Sequence[str], scores: np.ndarray,
                        predicted: np.ndarray, classes: Sequence[str]) -> List[str]:
    """Plot the histogram, put the scores section into report.json beside the others and render
    report.html; returns the files written."""
    plot_scores_histogram(scores, method, run_dir / SCORES_HISTOGRAM_PNG)
    # the highest first; ties in the scan's order (a stable sort of the negated scores)
    top = np.argsort(-scores, kind="stable")[:N_TOP]
    section = {
        "method": method, "meaning": MEANINGS.get(method, ""), "checkpoint": checkpoint_name,
        "n_scored": int(len(scores)), "file": SCORES,
        "stats": {"min": float(scores.min()), "median": float(np.median(scores)), "mean": float(scores.mean()),
                  "max": float(scores.max())},
        "top": [{"filename": files[i], "score": float(scores[i]), "predicted_label": int(predicted[i]),
                 "predicted_class": classes[predicted[i]] if 0 <= predicted[i] < len(classes) else None}
                for i in top],
        "plots": [SCORES_HISTOGRAM_PNG],
        "plot_captions": {SCORES_HISTOGRAM_PNG: f"How the {len(scores):,} images' {method} scores spread; "
                                                f"higher: more worth labelling."}}
    report = read_report(run_dir)
    report["scores"] = section
    write_report_files(run_dir, report)
    return [REPORT_JSON, REPORT_HTML, SCORES_HISTOGRAM_PNG]


def plot_scores_histogram(scores: np.ndarray, method: str, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 3.2), dpi=plots.DPI, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.hist(scores, bins=40, range=(0.0, max(1.0, float(scores.max()))), color=plots.COLOURS["selection"],
              edgecolor="white", linewidth=0.4)
    axes.set_xlabel(f"{method} score (higher: more worth labelling)")
    axes.set_ylabel("images")
    axes.set_title(f"Scores: {method}, {len(scores):,} images, mean {scores.mean():.3f}", fontsize=10)
    axes.grid(alpha=0.3)
    plots.save_png(figure, path)

