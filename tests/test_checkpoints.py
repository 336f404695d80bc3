"""Checkpoint contents: last.pt can resume, best.pt and epoch_NNN.pt are the weights without the
optimizer's state (a third of the size) unless trainer.save_optimizer_state=true, and every reader
of them still loads them."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from app.errors import UserError
from app.train import checkpoints
from conftest import run_in_process

TINY = ["hardware=cpu", "data.n_images=40", "data.shapes_image_size=32", "data.image_size=16", "trainer.epochs=1",
        "trainer.batch_size=8", "trainer.save_epochs=1", "sampler=none", "stages=[scan,train]"]
TRAINING_ONLY = {"optimizer", "scheduler", "scaler", "rng"}


def train(tmp_path: Path, cache_dir: Path, *overrides: str) -> Path:
    with pytest.MonkeyPatch.context() as monkeypatch:
        code, run_dir = run_in_process([*TINY, "run_directory=run", *overrides], monkeypatch, tmp_path, cache_dir)
    assert code == 0
    return run_dir / "checkpoints"


@pytest.fixture(scope="module")
def default_run(tmp_path_factory, cache_dir) -> Path:
    return train(tmp_path_factory.mktemp("default"), cache_dir)


def test_best_and_epoch_checkpoints_hold_the_weights_without_the_optimizer_state(default_run):
    last = torch.load(default_run / "last.pt", weights_only=True)
    assert TRAINING_ONLY <= set(last), "last.pt must keep what a resume needs"
    for name in ("best.pt", "epoch_001.pt"):
        state = torch.load(default_run / name, weights_only=True)
        assert not TRAINING_ONLY & set(state), name
        assert state["model"].keys() == last["model"].keys()
        assert (state["task"], state["model_name"], state["classes"]) == (last["task"], last["model_name"],
                                                                          last["classes"])
    # resnet18 under AdamW: the optimizer's two moments are twice the weights
    assert (default_run / "best.pt").stat().st_size < (default_run / "last.pt").stat().st_size / 2


def test_weights_only_checkpoints_load_as_model_weights_and_resnet18_weights(default_run):
    from app.models import build_classifier, load_weights

    for name in ("best.pt", "epoch_001.pt"):
        path = str(default_run / name)
        assert load_weights(path).keys() == torch.load(path, weights_only=True)["model"].keys()
        build_classifier("resnet18", 3, path)  # loads strictly into the same classifier


def test_resuming_from_a_weights_only_checkpoint_is_refused_with_what_to_do_instead(default_run):
    with pytest.raises(UserError, match="without the optimizer state.*trainer.save_optimizer_state=true.*"
                                        "model.weights="):
        checkpoints.load(default_run / "epoch_001.pt")


def test_save_optimizer_state_keeps_best_and_epoch_checkpoints_resumable(tmp_path, cache_dir):
    folder = train(tmp_path, cache_dir, "trainer.save_optimizer_state=true")
    for name in ("best.pt", "epoch_001.pt"):
        state = checkpoints.load(folder / name)  # what a resume reads: refused if anything is missing
        assert TRAINING_ONLY <= set(state), name


def test_for_snapshot_leaves_the_training_state_itself_alone():
    state = {"model": {"w": torch.zeros(2)}, "optimizer": {"state": {}}, "scheduler": None, "scaler": {},
             "rng": {}, "epoch": 3, "batch": 0, "task": "classification", "model_name": "resnet18", "classes": ["a"]}
    slim = checkpoints.for_snapshot(state, save_optimizer_state=False)
    assert set(slim) == {"model", "epoch", "task", "model_name", "classes"}
    assert "optimizer" in state, "last.pt is written from the same state"
    assert checkpoints.for_snapshot(state, save_optimizer_state=True) is state
