"""The train stage's part of the report: the training curve and the key metric beside the
selection, so that report.html tells the story of the whole run on one page."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List

from app.artifacts import REPORT_HTML, REPORT_JSON, TRAINING_CURVE_PNG
from app.report import plots
from app.report.page import read_report, write_report_files

# The per-epoch values the report keeps (metrics.json holds every one).
EPOCH_KEYS = ("epoch", "train_loss", "lr", "images_per_s")


def write_training_report(run_dir: Path, metrics: Dict) -> List[str]:
    """Plot the curve of `metrics` (the content of metrics.json), put the training section into
    report.json beside the selection's or the profile's, and render report.html; returns the files
    written."""
    key_metric, best = metrics["key_metric"], metrics.get("best") or {}
    epochs = metrics["epochs"]
    # key_metric None: no validation set, so only the training loss is drawn and there is no best.pt
    plots.plot_training_curve(epochs, key_metric or "train_loss", best.get("epoch"), run_dir / TRAINING_CURVE_PNG)
    caption = (f"{key_metric} (right axis) and the training loss (left) after each epoch; the ring marks the "
               f"best epoch, whose weights are checkpoints/best.pt." if key_metric else
               "The training loss after each epoch (no validation set: no key metric, no best.pt).")
    kept = (*EPOCH_KEYS, *([key_metric] if key_metric else []))
    section = {
        "task": metrics["task"], "model": metrics["model"], "n_train": metrics["n_train"], "n_val": metrics["n_val"],
        "key_metric": key_metric, "best": best or None, "final": {k: metrics["final"].get(k) for k in kept},
        "epochs": [{k: record.get(k) for k in kept} for record in epochs],
        "plots": [TRAINING_CURVE_PNG], "plot_captions": {TRAINING_CURVE_PNG: caption}}
    report = read_report(run_dir)
    report["training"] = section
    write_report_files(run_dir, report)
    return [REPORT_JSON, REPORT_HTML, TRAINING_CURVE_PNG]
