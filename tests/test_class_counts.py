"""Per-class counts of the selection in report.json and report.html: candidates, selected and the
share selected per class, by known labels and by the scorer's predicted labels, the held-out set's
counts, and a flag on a class the selection under-samples."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from app import artifacts
from app.report.class_counts import class_counts, per_class
from app.report.page import render_html
from app.scoring.scores_io import write_scores
from conftest import make_class_folder, run_in_process


def make_folder(root: Path, sizes: dict) -> Path:
    return make_class_folder(root, sizes, size=(16, 16))


def rows_by_class(section: dict) -> dict:
    return {row["class"]: row for row in section["per_class"]}


def test_the_report_counts_each_class_of_a_folder_with_known_class_sizes(monkeypatch, tmp_path, cache_dir):
    images = make_folder(tmp_path / "images", {"big": 12, "mid": 6, "small": 3})
    code, run_dir = run_in_process(["data=folder", f"data.input_dir={images}", "data.image_size=32", "hardware=cpu",
                                    "sampler=none", "stages=[scan,select]", "report.n_example_images=0"],
                                   monkeypatch, tmp_path, cache_dir)
    assert code == 0
    section = json.loads((run_dir / artifacts.REPORT_JSON).read_text())["class_counts"]
    assert section["classes"] == ["big", "mid", "small"]
    rows = rows_by_class(section["known_labels"])
    assert {name: (row["candidates"], row["selected"]) for name, row in rows.items()} == \
        {"big": (12, 12), "mid": (6, 6), "small": (3, 3)}
    assert rows["small"]["selected_fraction"] == 1.0 and rows["big"]["share_of_candidates"] == round(12 / 21, 4)
    assert not any(row["under_sampled"] for row in rows.values())
    assert "predicted_labels" not in section and "held_out" not in section
    assert "<h2>Classes</h2>" in (run_dir / artifacts.REPORT_HTML).read_text()


def test_a_class_under_half_its_candidate_share_is_flagged():
    # candidates: a 10, b 10 (half each); selected: a 9, b 1 -> b has 10% of the selection < half of 50%
    labels = np.array([0] * 10 + [1] * 10 + [-1] * 2)
    selected = np.zeros(22, dtype=bool)
    selected[:9] = True
    selected[10] = True
    rows = rows_by_class(per_class(labels, selected, ["a", "b"]))
    assert (rows["a"]["selected"], rows["b"]["selected"]) == (9, 1)
    assert rows["b"]["under_sampled"] and not rows["a"]["under_sampled"]
    assert rows["b"]["share_of_selection"] == 0.1 and rows["b"]["selected_fraction"] == 0.1
    # exactly half its share (a 6, b 2: 25% of the selection against 50%) is not flagged
    selected[:] = False
    selected[:6] = True
    selected[10:12] = True
    at_half = rows_by_class(per_class(labels, selected, ["a", "b"]))["b"]
    assert at_half["share_of_selection"] == 0.25 and not at_half["under_sampled"]


def test_predicted_labels_and_the_held_out_set_are_counted_when_the_run_has_them(tmp_path):
    run_dir = tmp_path / "run"
    files = [f"{c}/{i}.png" for c in ("a", "b") for i in range(4)]
    artifacts.write_dataset(run_dir, artifacts.Dataset(str(tmp_path), ["a", "b"]))
    artifacts.write_input_files(run_dir, files, [0] * 4 + [1] * 4)
    artifacts.write_holdout_files(run_dir, ["a/9.png", "b/9.png", "b/8.png"], [0, 1, 1])
    # the model predicts class a for everything but the last image
    write_scores(run_dir, ((name, 0.5, 0 if i < 7 else 1) for i, name in enumerate(files)))
    sampled = ["a/0.png", "a/1.png", "b/0.png", "b/3.png"]
    section = class_counts(run_dir, sampled, [f for f in files if f not in sampled])
    assert {c: (r["candidates"], r["selected"]) for c, r in rows_by_class(section["known_labels"]).items()} == \
        {"a": (4, 2), "b": (4, 2)}
    predicted = rows_by_class(section["predicted_labels"])
    assert {c: (r["candidates"], r["selected"]) for c, r in predicted.items()} == {"a": (7, 3), "b": (1, 1)}
    assert section["held_out"]["per_class"] == {"a": 1, "b": 2} and section["held_out"]["n_images"] == 3

    html = render_html(run_dir, {"class_counts": section})
    assert "By predicted label" in html and "Held out for evaluation" in html


def test_the_html_names_the_under_sampled_class(tmp_path):
    labels = np.array([0] * 10 + [1] * 10)
    selected = np.zeros(20, dtype=bool)
    selected[:9] = True
    selected[10] = True
    section = {"classes": ["a", "b"], "known_labels": per_class(labels, selected, ["a", "b"])}
    html = render_html(tmp_path, {"class_counts": section})
    assert "Under-sampled: b" in html and "⚠ b" in html and "⚠ a" not in html


def test_a_flat_folder_without_classes_has_no_class_counts(tmp_path):
    run_dir = tmp_path / "run"
    artifacts.write_dataset(run_dir, artifacts.Dataset(str(tmp_path), []))
    artifacts.write_input_files(run_dir, ["x.png", "y.png"], [0, 0])
    assert class_counts(run_dir, ["x.png"], ["y.png"]) is None
