"""The score stage: an earlier run's checkpoint scores every candidate for active learning
(scorer=least_confidence|margin|entropy for classifiers, object_frequency|objectness_least_confidence
for detectors), written to data/scores.csv and shown in the report; the formulas on hand-made
outputs; what is refused; skipped with scorer=none; reused on resume until the checkpoint changes."""
from __future__ import annotations

import json
import logging
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from app import artifacts
from app.config import validate
from app.errors import UserError
from app.scoring import scorers
from app.scoring.scores_io import read_scores
from conftest import compose, main_in_process, run_in_process, summary_of

# Tiny shapes, one epoch: the behaviour is under test, not the model's accuracy.
TINY = ["hardware=cpu", "data.n_images=40", "data.shapes_image_size=32", "data.image_size=16", "trainer.epochs=1",
        "trainer.batch_size=8"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache_dir) -> Path:
    """checkpoints/best.pt of a one-epoch resnet18 on the tiny shapes: what a user scores with."""
    root = tmp_path_factory.mktemp("trained")
    with pytest.MonkeyPatch.context() as monkeypatch:
        code, run_dir = run_in_process([*TINY, "sampler=none", "stages=[scan,train]", "run_directory=train"],
                                       monkeypatch, root, cache_dir)
    assert code == 0
    return run_dir / "checkpoints" / "best.pt"


@pytest.fixture
def score(monkeypatch, tmp_path, cache_dir, caplog):
    """Run `thresher *TINY stages=[scan,score] *overrides` in run_directory=job; (code, run dir, log)."""
    caplog.set_level(logging.INFO, logger="thresher")

    def run(*overrides):
        caplog.clear()
        code, run_dir = run_in_process([*TINY, "stages=[scan,score]", "run_directory=job", *overrides], monkeypatch,
                                       tmp_path, cache_dir)
        return code, run_dir, caplog.text
    return run


def test_an_earlier_runs_best_checkpoint_scores_every_candidate_into_scores_csv_and_the_report(
        trained, monkeypatch, capsys, tmp_path, cache_dir):
    code, out, err = main_in_process([*TINY, "scorer=margin", f"scorer.checkpoint={trained}", "sampler=none",
                                      "stages=[scan,score,select]", "run_directory=job"],
                                     monkeypatch, capsys, tmp_path, cache_dir)
    assert code == 0, err
    run_dir = tmp_path / "runs" / "job"
    files, _ = artifacts.read_input_files(run_dir)
    scores = read_scores(run_dir)
    assert scores.files == files and len(files) == 40  # every candidate, in the scan's order
    assert ((scores.scores >= 0) & (scores.scores <= 1)).all()
    assert set(scores.predicted.tolist()) <= {0, 1, 2}  # the shapes' three classes
    stage = summary_of(run_dir)["stages"]["score"]
    assert stage["status"] == "finished" and stage["n_scored"] == 40 and stage["checkpoint"] == "best.pt"
    assert stage["score_max"] == pytest.approx(scores.scores.max(), abs=1e-5)
    report = json.loads((run_dir / "report.json").read_text())  # the select stage kept the section
    section = report["scores"]
    assert section["method"] == "margin" and section["n_scored"] == 40 and section["checkpoint"] == "best.pt"
    top = [row["score"] for row in section["top"]]
    assert len(top) == 5 and top == sorted(top, reverse=True) and top[0] == pytest.approx(scores.scores.max())
    assert (run_dir / "plots/scores_histogram.png").stat().st_size > 0
    page = (run_dir / "report.html").read_text()
    assert "<h2>Scores</h2>" in page and section["top"][0]["filename"] in page
    assert str(trained.parent) not in page + json.dumps(report)  # the checkpoint's name only, not its folders
    assert "scored    40 images by scorer=margin" in out + err


def test_the_classification_scores_follow_their_formulas_on_hand_made_probabilities():
    p = torch.tensor([[0.7, 0.2, 0.1], [1 / 3, 1 / 3, 1 / 3], [1.0, 0.0, 0.0], [0.1, 0.5, 0.4]])
    least, predicted = scorers.classification_scores(p, "least_confidence")
    assert least.tolist() == pytest.approx([0.3, 2 / 3, 0.0, 0.5])
    assert predicted.tolist() == [0, 0, 0, 1]
    margin, _ = scorers.classification_scores(p, "margin")
    assert margin.tolist() == pytest.approx([0.5, 1.0, 0.0, 0.9])
    entropy, _ = scorers.classification_scores(p, "entropy")
    first = -(0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1)) / math.log(3)
    assert entropy.tolist() == pytest.approx([first, 1.0, 0.0, -(0.1 * math.log(0.1) + 0.5 * math.log(0.5)
                                                                 + 0.4 * math.log(0.4)) / math.log(3)], abs=1e-6)


def detections(*images):
    """torchvision-style outputs: one {"boxes", "labels", "scores"} dict per image of (label, score) pairs."""
    return [{"boxes": torch.zeros(len(image), 4),
             "labels": torch.tensor([label for label, _ in image], dtype=torch.int64),
             "scores": torch.tensor([score for _, score in image], dtype=torch.float32)} for image in images]


def test_the_detection_scores_follow_their_formulas_on_hand_made_torchvision_outputs():
    outputs = detections(
        [(1, 0.9), (1, 0.8), (1, 0.7), (2, 0.6)],  # three of class 1, one of class 2
        [(1, 0.9), (2, 0.9), (3, 0.9)],  # three classes once each
        [(1, 0.4), (2, 0.3)],  # nothing at or above the box_score_threshold of 0.5
        [])  # no box at all
    counts = scorers.object_counts(outputs, frequency_penalty=0.25, box_score_threshold=0.5)
    assert counts.tolist() == [1 + 0.25 * 2 + 1, 3.0, 0.0, 0.0]
    assert scorers.object_counts(outputs, 1.0, 0.5).tolist() == [4.0, 3.0, 0.0, 0.0]  # 1: a plain count
    scores = scorers.object_frequency(outputs, frequency_penalty=0.25, min_score=0.9, box_score_threshold=0.5)
    assert scores.tolist() == pytest.approx([0.9 + 0.1 * 2.5 / 3, 1.0, 0.9, 0.9])  # rescaled to [min_score, 1]
    assert scorers.rescale_to_min_score(np.array([2.0, 2.0]), 0.9).tolist() == [1.0, 1.0]
    assert scorers.objectness_least_confidence(outputs).tolist() == pytest.approx([0.1, 0.1, 0.6, 0.0])


def test_an_image_that_fails_to_load_while_scoring_is_skipped_and_listed_as_corrupt(trained, score):
    # with the check off, the scan keeps the shapes' two broken files; scoring finds them
    code, run_dir, log = score("scorer=entropy", f"scorer.checkpoint={trained}", "data.n_corrupt=2",
                               "enable_corruptness_check=false")
    assert code == 0
    files, _ = artifacts.read_input_files(run_dir)
    corrupt = [name for name, _ in artifacts.read_corrupt_files(run_dir)]
    assert len(corrupt) == 2 and set(corrupt) <= set(files)
    scored = read_scores(run_dir).files
    assert scored == [name for name in files if name not in corrupt]
    assert "failed to load while scoring, skipped" in log


def test_scorer_none_skips_the_score_stage(score):
    code, run_dir, log = score("scorer=none")
    assert code == 0
    assert summary_of(run_dir)["stages"]["score"] == {"status": "skipped"}
    assert not (run_dir / artifacts.SCORES).exists()
    assert "stage score: skipped, scorer=none" in log


def test_a_scorer_left_out_of_stages_is_said_not_silently_ignored(trained, score):
    code, run_dir, log = score("scorer=margin", f"scorer.checkpoint={trained}", "stages=[scan]")
    assert code == 0
    assert ("stage score: not in stages=[scan], so scorer=margin does not run here; the select stage reads the "
            "data/scores.csv an earlier run of this directory wrote, if any") in log
    assert "score" not in summary_of(run_dir)["stages"] and not (run_dir / artifacts.SCORES).exists()


def test_resume_reuses_the_finished_score_stage_and_a_changed_checkpoint_scores_again(trained, score, tmp_path):
    checkpoint = tmp_path / "model.pt"
    shutil.copy(trained, checkpoint)
    code, run_dir, _ = score("scorer=least_confidence", f"scorer.checkpoint={checkpoint}")
    assert code == 0
    first = read_scores(run_dir).scores

    code, _, log = score("scorer=least_confidence", f"scorer.checkpoint={checkpoint}", "resume=true")
    assert code == 0 and "stage score: finished in an earlier run, skipped" in log

    state = torch.load(checkpoint, weights_only=True)
    state["model"]["fc.bias"] = state["model"]["fc.bias"] + torch.tensor([3.0, 0.0, 0.0])  # retrained, say
    torch.save(state, checkpoint)
    code, _, log = score("scorer=least_confidence", f"scorer.checkpoint={checkpoint}", "resume=true")
    assert code == 0 and "stage score: ran before with other inputs (scorer.checkpoint (file) was" in log
    assert not np.allclose(read_scores(run_dir).scores, first)


@pytest.mark.parametrize("overrides, refusal", [
    (["scorer=entropy"], "scorer=entropy needs scorer.checkpoint"),
    (["scorer=margin", "scorer.checkpoint=/no/such/best.pt"], "scorer.checkpoint='/no/such/best.pt' is not allowed: it "
                                                             "must be an existing file"),
    (["scorer=object_frequency", "scorer.checkpoint=CHECKPOINT"], "scorer=object_frequency scores detection models and "
                                                                 "model.task is classification: use "
                                                                 "model=fasterrcnn_mobilenet_v3_large_fpn"),
    (["model=fasterrcnn_mobilenet_v3_large_fpn", "scorer=entropy", "scorer.checkpoint=CHECKPOINT"],
     "scorer=entropy scores classification models and model.task is detection: use model=resnet18"),
    (["scorer.checkpoint=CHECKPOINT"], "is not allowed: scorer=none scores nothing"),
    (["scorer=margin", "scorer.checkpoint=CHECKPOINT", "scorer.batch_size=0"], "scorer.batch_size=0 is not allowed"),
    (["scorer=object-frequency", "model=fasterrcnn_mobilenet_v3_large_fpn", "scorer.checkpoint=CHECKPOINT",
      "scorer.min_score=1.5"], "scorer.min_score=1.5 is not allowed: use a number in [0, 1]"),
])
def test_a_scorer_without_a_usable_checkpoint_or_for_another_task_is_refused_before_any_stage(overrides, refusal,
                                                                                              tmp_path):
    checkpoint = tmp_path / "best.pt"
    torch.save({"fc.bias": torch.zeros(3)}, checkpoint)
    cfg = compose(*[o.replace("CHECKPOINT", str(checkpoint)) for o in overrides])
    with pytest.raises(UserError, match=re.escape(refusal)):
        validate(cfg)


def test_a_checkpoint_of_another_class_count_or_model_is_refused_naming_both(trained, score, tmp_path):
    state = torch.load(trained, weights_only=True)
    state["classes"] = ["a", "b", "c", "d", "e"]
    state["model"]["fc.weight"] = torch.zeros(5, state["model"]["fc.weight"].shape[1])
    state["model"]["fc.bias"] = torch.zeros(5)
    torch.save(state, tmp_path / "five.pt")
    code, run_dir, log = score("scorer=entropy", f"scorer.checkpoint={tmp_path / 'five.pt'}")
    assert code == 2
    error = summary_of(run_dir)["error"]
    assert "was trained on 5 classes (a, b, c, d, ...), the data has 3 (" in error

    state = torch.load(trained, weights_only=True)
    state["model_name"] = "resnet34"
    torch.save(state, tmp_path / "other.pt")
    code, run_dir, _ = score("scorer=entropy", f"scorer.checkpoint={tmp_path / 'other.pt'}")
    assert code == 2
    assert "holds a resnet34 classification model, this run has model.name=resnet18" in summary_of(run_dir)["error"]


def test_a_plain_state_dict_of_the_right_shape_scores_like_the_checkpoint_it_came_from(trained, score, tmp_path):
    torch.save(torch.load(trained, weights_only=True)["model"], tmp_path / "weights.pt")
    code, run_dir, _ = score("scorer=least_confidence", f"scorer.checkpoint={tmp_path / 'weights.pt'}")
    assert code == 0 and len(read_scores(run_dir).files) == 40


def test_a_detector_checkpoint_scores_every_image_with_object_frequency(score, tmp_path):
    """A real detection scoring run, on an untrained detector saved as a thresher checkpoint."""
    import torchvision

    classes = ["__background__", "circle", "square", "triangle"]
    model = torchvision.models.get_model("fasterrcnn_mobilenet_v3_large_fpn", weights=None, weights_backbone=None,
                                         num_classes=len(classes), min_size=32, max_size=32)
    torch.save({"model": model.state_dict(), "task": "detection", "model_name": "fasterrcnn_mobilenet_v3_large_fpn",
                "classes": classes, "image_size": 32}, tmp_path / "detector.pt")
    code, run_dir, log = score("model=fasterrcnn_mobilenet_v3_large_fpn", "data.image_size=32",
                               "scorer=object-frequency", f"scorer.checkpoint={tmp_path / 'detector.pt'}",
                               "scorer.box_score_threshold=0.0")
    assert code == 0, log
    scores = read_scores(run_dir)
    assert len(scores.files) == 40 and (scores.predicted == -1).all()
    assert ((scores.scores >= 0.9) & (scores.scores <= 1.0)).all()
