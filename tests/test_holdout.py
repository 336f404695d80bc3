"""Evaluation a user can trust: data.holdout_fraction holds the same images out of every run and
never lets a stage select from them; data.val_input_dir validates on a separate labelled folder;
without any validation set there is no key metric and no best.pt, said once in the log."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app import artifacts
from app.errors import UserError
from conftest import compose, main_in_process, make_class_folder, run_in_process, summary_of

# Tiny shapes, CPU; the smallest model the task offers, so training tests stay short.
TINY = ["data.n_images=30", "data.shapes_image_size=32", "data.image_size=32", "hardware=cpu", "trainer.epochs=1",
        "trainer.batch_size=8", "model=mobilenet_v3_small", "report.n_example_images=0"]
HOLDOUT = "data.holdout_fraction=0.3"


def read_names(path: Path):
    with open(path, newline="") as handle:
        return [row["filenames"] for row in csv.DictReader(handle)]


def lines(path: Path):
    return [line for line in path.read_text().splitlines() if line]


def make_folder(root: Path, per_class: int, classes=("a", "b"), seed: int = 0) -> Path:
    return make_class_folder(root, dict.fromkeys(classes, per_class), seed=seed)


# ---------------------------------------------------------------------------------------------
# The held-out images: chosen by name, the same in every run, never selected from
# ---------------------------------------------------------------------------------------------
def held_out_runs(samplers, monkeypatch, tmp_path, cache_dir):
    """{name: run directory} of scan → select runs with HOLDOUT, one per (name, overrides)."""
    runs = {}
    for name, overrides in samplers.items():
        code, run_dir = run_in_process([*TINY, HOLDOUT, "stages=[scan,embed,select]", f"run_directory={name}",
                                        *overrides], monkeypatch, tmp_path, cache_dir)
        assert code == 0
        runs[name] = run_dir
    held = {name: read_names(run_dir / artifacts.HOLDOUT_FILES) for name, run_dir in runs.items()}
    first = next(iter(held.values()))
    assert all(names == first for names in held.values()) and 0 < len(first) < 30
    for run_dir in runs.values():
        candidates = set(read_names(run_dir / artifacts.INPUT_FILES))
        chosen = set(lines(run_dir / artifacts.SAMPLED)) | set(lines(run_dir / artifacts.REMOVED))
        assert candidates.isdisjoint(first) and len(candidates) + len(first) == 30
        assert chosen.isdisjoint(first)
        assert summary_of(run_dir)["stages"]["scan"]["n_held_out"] == len(first)
    return runs, first


def test_the_held_out_images_are_the_same_whatever_the_seed_or_budget_and_never_candidates(
        monkeypatch, tmp_path, cache_dir):
    held_out_runs({"seed0": ["sampler=random", "seed=0", "sampler.stopping_condition.n_samples=5"],
                   "seed7": ["sampler=random", "seed=7", "sampler.stopping_condition.n_samples=11"]},
                  monkeypatch, tmp_path, cache_dir)


@pytest.mark.slow
def test_the_held_out_images_are_never_embedded_and_the_same_for_coreset(monkeypatch, tmp_path, cache_dir):
    runs, held = held_out_runs({"random": ["sampler=random", "sampler.stopping_condition.n_samples=5"],
                                "coreset": ["sampler=coreset", "seed=3", "sampler.stopping_condition.n_samples=9",
                                            "sampler.embedding_model=mobilenet_v3_small"]},
                               monkeypatch, tmp_path, cache_dir)
    embedded = set(read_names(runs["coreset"] / artifacts.EMBEDDING_ROWS))
    assert len(embedded) == 30 - len(held) and embedded.isdisjoint(held)


def test_about_the_fraction_asked_is_held_out_and_a_video_goes_whole():
    from app.data.scan import split_held_out

    names = [f"class_{i % 4}/image_{i:05d}.jpg" for i in range(4000)]
    kept, held = split_held_out(names, 0.2)
    assert abs(len(held) / len(names) - 0.2) < 0.03
    assert sorted(kept + held) == sorted(names) and set(kept).isdisjoint(held)
    assert split_held_out(names, 0.2) == (kept, held), "the same names hold out the same images"

    frames = [f"clip{v}-{n:03d}-mp4.png" for v in range(40) for n in range(5)]
    _, held_frames = split_held_out(frames, 0.3, frames=frames)
    videos = {name.split("-")[0] for name in held_frames}
    assert held_frames and len(held_frames) == 5 * len(videos)


def test_a_fraction_that_holds_out_nothing_or_everything_is_refused():
    from app.data.scan import split_held_out

    with pytest.raises(UserError, match=r"data.holdout_fraction=1e-09 holds out none of the 3 usable images"):
        split_held_out(["a/1.png", "a/2.png", "b/3.png"], 1e-9)
    with pytest.raises(UserError, match=r"holds out all 1 usable images, leaving none to select from"):
        split_held_out(["a/1.png"], 0.999999999)


@pytest.mark.usefixtures("registered")
@pytest.mark.parametrize("overrides, words", [
    (["data.holdout_fraction=1"], "data.holdout_fraction=1.0 is not allowed: use a fraction in [0, 1)"),
    (["data=folder", "data.input_dir=.", "data.holdout_fraction=0.2", "data.val_input_dir=."],
     "data.val_input_dir='.' is not allowed: data.holdout_fraction=0.2 already holds out a validation set"),
    (["data=coco", "data.val_input_dir=."], "data=coco takes its labels from its annotations"),
    (["data.holdout_fraction=0.2", "trainer.val_filenames_file=VAL"],
     "data.holdout_fraction=0.2 gives the validation set and the whole selection trains"),
    (["data=folder", "data.input_dir=.", "data.val_input_dir=/no/such/folder"],
     "data.val_input_dir='/no/such/folder' is not allowed: it must be an existing folder of labelled images"),
])
def test_conflicting_or_impossible_validation_settings_are_refused_in_one_line(overrides, words, tmp_path,
                                                                               monkeypatch):
    from app.config import validate

    monkeypatch.chdir(tmp_path)
    (tmp_path / "VAL").write_text("circle/x.png\n")
    with pytest.raises(UserError) as refused:
        validate(compose(*overrides))
    assert words in str(refused.value) and "\n" not in str(refused.value)


@pytest.mark.usefixtures("registered")
def test_a_validation_key_metric_is_allowed_when_the_held_out_images_validate():
    from app.config import validate

    validate(compose("trainer.key_metric=val_top1", "trainer.val_fraction=0", HOLDOUT))
    with pytest.raises(UserError, match="leave no validation set"):
        validate(compose("trainer.key_metric=val_top1", "trainer.val_fraction=0"))


def test_a_rescan_without_a_fraction_drops_the_earlier_held_out_list(monkeypatch, tmp_path, cache_dir):
    code, run_dir = run_in_process([*TINY, HOLDOUT, "stages=[scan]", "run_directory=r"], monkeypatch, tmp_path,
                                   cache_dir)
    assert code == 0 and (run_dir / artifacts.HOLDOUT_FILES).is_file()
    code, run_dir = run_in_process([*TINY, "stages=[scan]", "run_directory=r", "overwrite=true"], monkeypatch,
                                   tmp_path, cache_dir)
    assert code == 0 and not (run_dir / artifacts.HOLDOUT_FILES).exists()
    assert len(read_names(run_dir / artifacts.INPUT_FILES)) == 30


# ---------------------------------------------------------------------------------------------
# What the train stage validates on (built without training: app.train.data.training_data)
# ---------------------------------------------------------------------------------------------
def test_training_data_trains_on_the_whole_selection_and_validates_on_the_held_out_images(
        monkeypatch, tmp_path, cache_dir):
    from app.train.data import training_data

    overrides = [*TINY, HOLDOUT, "sampler=random", "sampler.stopping_condition.n_samples=8", "stages=[scan,select]",
                 "run_directory=t", "trainer.val_fraction=0.5"]
    code, run_dir = run_in_process(overrides, monkeypatch, tmp_path, cache_dir)
    assert code == 0
    data = training_data(compose(*overrides), run_dir)
    assert [data.files[i] for i in data.train_index] == lines(run_dir / artifacts.SAMPLED)
    assert [data.files[i] for i in data.val_index] == read_names(run_dir / artifacts.HOLDOUT_FILES)
    assert "data.holdout_fraction=0.3" in data.validation_source


def test_training_data_validates_on_every_usable_image_of_val_input_dir(monkeypatch, tmp_path, cache_dir, caplog):
    from app.train.data import TrainingImages, training_data

    images, val = make_folder(tmp_path / "images", 6), make_folder(tmp_path / "val", 3, seed=1)
    (val / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    (val / "loose.png").write_bytes((val / "a" / "a_000.png").read_bytes())  # outside any class folder
    overrides = ["data=folder", f"data.input_dir={images}", f"data.val_input_dir={val}", "data.image_size=32",
                 "hardware=cpu", "sampler=random", "sampler.stopping_condition.n_samples=6", "stages=[scan,select]",
                 "run_directory=v", "report.n_example_images=0"]
    code, run_dir = run_in_process(overrides, monkeypatch, tmp_path, cache_dir)
    assert code == 0
    data = training_data(compose(*overrides), run_dir)
    assert len(data.train_index) == 6
    assert sorted(data.files[i] for i in data.val_index) == [f"{c}/{c}_{i:03d}.png" for c in "ab" for i in range(3)]
    assert "corrupt validation image skipped: b/broken.png" in caplog.text
    assert "1 validation image(s) of data.val_input_dir" in caplog.text
    # the validation images are read from val_input_dir, the training ones from input_dir
    dataset = TrainingImages(data.input_dir, data.files, data.targets, lambda image, target: (image, target),
                             second_root=(data.val_index[0], data.val_input_dir))
    first_val = dataset[data.val_index[0]][0]
    assert np.array_equal(np.asarray(first_val), np.asarray(Image.open(val / data.files[data.val_index[0]])))


def test_a_validation_folder_with_a_class_the_training_data_lacks_is_refused_naming_it(
        monkeypatch, capsys, tmp_path, cache_dir):
    images = make_folder(tmp_path / "images", 4)
    val = make_folder(tmp_path / "val", 2, classes=("a", "b", "zebra"))
    code, _, err = main_in_process(["data=folder", f"data.input_dir={images}", f"data.val_input_dir={val}",
                                    "data.image_size=32", "hardware=cpu", "sampler=none", "stages=[scan,select,train]",
                                    "report.n_example_images=0"], monkeypatch, capsys, tmp_path, cache_dir)
    assert code == 2
    message = [line for line in err.splitlines() if line.startswith("thresher: error")]
    assert len(message) == 1 and "class folder 'zebra', which data.input_dir does not have" in message[0]


# ---------------------------------------------------------------------------------------------
# Training: the held-out set validates; no validation set, no key metric and no best.pt
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_training_validates_on_the_held_out_images_and_says_so(monkeypatch, capsys, tmp_path, cache_dir):
    code, _, _ = main_in_process([*TINY, HOLDOUT, "sampler=random", "sampler.stopping_condition.n_samples=8",
                                  "run_directory=h"], monkeypatch, capsys, tmp_path, cache_dir)
    assert code == 0
    run_dir = tmp_path / "runs/h"
    n_held = len(read_names(run_dir / artifacts.HOLDOUT_FILES))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert (metrics["n_train"], metrics["n_val"], metrics["key_metric"]) == (8, n_held, "val_top1")
    assert (run_dir / "checkpoints/best.pt").is_file()
    log = (run_dir / "thresher.log").read_text()
    assert f"train: validating on the held-out images (data.holdout_fraction=0.3, data/holdout_files.csv): " \
           f"{n_held} images; the whole selection (8 images) trains" in log
    counts = json.loads((run_dir / "report.json").read_text())["class_counts"]
    assert counts["validation"]["n_images"] == counts["held_out"]["n_images"] == n_held


@pytest.mark.slow
def test_without_a_validation_set_there_is_no_key_metric_and_no_best_checkpoint(monkeypatch, capsys, tmp_path,
                                                                                 cache_dir):
    from app.run import key_metric_of

    code, out, _ = main_in_process([*TINY, "sampler=none", "trainer.val_fraction=0", "run_directory=n"],
                                   monkeypatch, capsys, tmp_path, cache_dir)
    assert code == 0
    run_dir = tmp_path / "runs/n"
    assert (run_dir / "checkpoints/last.pt").is_file() and not (run_dir / "checkpoints/best.pt").exists()
    log = (run_dir / "thresher.log").read_text()
    assert log.count("no validation set (trainer.val_fraction=0, no data.holdout_fraction / data.val_input_dir): "
                     "best.pt is not written; key metric: none") == 1
    train = summary_of(run_dir)["stages"]["train"]
    assert (train["key_metric"], train["key_metric_value"], train["best_epoch"]) == (None, None, None)
    assert key_metric_of(run_dir) is None, "a sweeper gets nothing rather than a training loss"
    assert "no validation set (no key metric, no best.pt)" in out
    assert "no key metric" in (run_dir / "report.html").read_text()
