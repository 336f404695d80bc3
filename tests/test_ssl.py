"""enable_training=true (SimCLR) learns on small images and says how far its loss fell; its
backbone can start training (model.weights=ssl), and the ways that cannot work are refused."""
from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch

from app.config import validate
from app.errors import UserError
from app.sampling.ssl import describe_loss, learned_little, no_learning_loss, warmup_cosine
from conftest import SMALL, compose, main_in_process

pytestmark = pytest.mark.usefixtures("registered")


def refusal(*overrides) -> str:
    with pytest.raises(UserError) as refused:
        validate(compose(*overrides))
    message = str(refused.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------------------------------------
# The loss and its log
# ---------------------------------------------------------------------------------------------
def test_the_no_learning_level_is_the_loss_of_views_the_model_cannot_tell_apart():
    from lightly.loss import NTXentLoss

    same = torch.ones(16, 8)  # every view looks alike: the positive is one of 2B-1 equal candidates
    assert float(NTXentLoss(temperature=0.2)(same, same)) == pytest.approx(no_learning_loss(16), rel=1e-5)
    assert no_learning_loss(64) == pytest.approx(math.log(127))


def test_the_log_line_says_how_far_the_loss_fell_against_the_no_learning_level():
    assert describe_loss([4.9, 3.0, 2.1], 20, 64) == \
        "ssl: loss 4.90 -> 2.10 over 20 epochs (no-learning level 4.84)"


def test_a_final_loss_within_five_percent_of_the_no_learning_level_counts_as_learning_little():
    level = no_learning_loss(64)
    assert learned_little(4.76, 64)  # issue 17's run with the old defaults
    assert learned_little(level * 0.96, 64)
    assert not learned_little(level * 0.94, 64)


def test_the_learning_rate_warms_up_linearly_then_decays_to_zero():
    factors = [warmup_cosine(step, 4, 20) for step in range(20)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(later <= earlier for earlier, later in zip(factors[3:], factors[4:]))
    assert factors[-1] < 0.01
    assert warmup_cosine(0, 0, 10) == 1.0


# ---------------------------------------------------------------------------------------------
# It learns
# ---------------------------------------------------------------------------------------------
def shapes_files(cache_dir: Path, n_images: int):
    from app.data.shapes import ensure_shapes

    root = ensure_shapes(cache_dir, n_images, 32)
    return root, sorted(str(p.relative_to(root)) for p in root.glob("*/*.png"))


def test_simclr_trains_and_saves_the_backbone_and_logs_how_far_the_loss_fell(cache_dir, tmp_path, caplog):
    # Whether the loss falls far is measured by bench/bench_ssl.py: on a few dozen images in a few
    # steps it is not reliable enough to pin here.
    from app.lifecycle import seed_everything
    from app.models import build_backbone
    from app.sampling.ssl import train_backbone_simclr

    root, files = shapes_files(cache_dir, 24)
    cfg = compose("data.image_size=16", "ssl.batch_size=8", "ssl.epochs=2", "hardware.num_workers=0")
    seed_everything(0)
    backbone, dim = build_backbone("resnet18", None)
    before = backbone.state_dict()["conv1.weight"].clone()
    (tmp_path / "checkpoints").mkdir()
    with caplog.at_level(logging.INFO, logger="thresher"):
        details = train_backbone_simclr(backbone, dim, cfg, root, files, torch.device("cpu"), tmp_path)
    assert details["ssl_no_learning_loss"] == pytest.approx(no_learning_loss(8), abs=1e-4)
    first, last = details["ssl_loss"]
    assert f"ssl: loss {first:.2f} -> {last:.2f} over 2 epochs (no-learning level 2.71)" in caplog.text
    saved = torch.load(tmp_path / "checkpoints/ssl_backbone.pt", weights_only=True)
    assert torch.equal(saved["conv1.weight"], backbone.state_dict()["conv1.weight"])
    assert not torch.equal(saved["conv1.weight"], before)


def test_a_run_that_cannot_learn_warns_that_the_backbone_learned_little(cache_dir, tmp_path, caplog):
    from app.models import build_backbone
    from app.sampling.ssl import train_backbone_simclr

    root, files = shapes_files(cache_dir, 24)
    cfg = compose("data.image_size=16", "ssl.batch_size=8", "ssl.epochs=1", "ssl.lr=1e-9", "ssl.temperature=100",
                  "hardware.num_workers=0")
    backbone, dim = build_backbone("resnet18", None)
    (tmp_path / "checkpoints").mkdir()
    with caplog.at_level(logging.INFO, logger="thresher"):
        train_backbone_simclr(backbone, dim, cfg, root, files, torch.device("cpu"), tmp_path)
    assert "the backbone learned little" in caplog.text


# ---------------------------------------------------------------------------------------------
# Its keys
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("override,words", [
    ("ssl.optimizer=adam", "ssl.optimizer='adam' is not allowed: choose adamw or sgd (did you mean"),
    ("ssl.min_scale=0", "ssl.min_scale=0.0 is not allowed: use a share of the image's area in (0, 1]"),
    ("ssl.min_scale=1.5", "ssl.min_scale=1.5 is not allowed"),
    ("ssl.warmup_epochs=-1", "ssl.warmup_epochs=-1 is not allowed: use an integer >= 0"),
    ("ssl.weight_decay=-0.1", "ssl.weight_decay=-0.1 is not allowed: use a value >= 0"),
])
def test_ssl_values_that_cannot_work_are_refused_naming_the_key(override, words):
    assert refusal("enable_training=true", override).startswith(words)


# ---------------------------------------------------------------------------------------------
# model.weights=ssl
# ---------------------------------------------------------------------------------------------
def test_weights_ssl_without_enable_training_or_an_earlier_backbone_is_refused():
    message = refusal("model.weights=ssl")
    assert message.startswith("model.weights='ssl' is not allowed: it needs the run directory's "
                              "checkpoints/ssl_backbone.pt")
    assert "enable_training=true" in message


def test_weights_ssl_with_another_embedding_model_is_refused():
    message = refusal("model.weights=ssl", "enable_training=true", "sampler.embedding_model=resnet34")
    assert "sampler.embedding_model=resnet34, not model.name=resnet18" in message


def test_weights_ssl_is_allowed_with_enable_training_or_a_run_directory_that_has_the_backbone(tmp_path):
    validate(compose("model.weights=ssl", "enable_training=true"))
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "ssl_backbone.pt").write_bytes(b"")
    validate(compose("model.weights=ssl", f"work_dir={tmp_path}", "run_directory=run"))


def test_training_starts_from_the_ssl_backbone_with_weights_ssl(tmp_path, caplog):
    from app.models import build_backbone, build_classifier, with_weights_in_run

    backbone, _ = build_backbone("resnet18", None)
    with torch.no_grad():
        for parameter in backbone.parameters():
            parameter.normal_()
    (tmp_path / "checkpoints").mkdir()
    torch.save(backbone.state_dict(), tmp_path / "checkpoints/ssl_backbone.pt")
    cfg = compose("model.weights=ssl", "enable_training=true")
    with caplog.at_level(logging.INFO, logger="thresher"):
        resolved = with_weights_in_run(cfg, tmp_path)
    assert "train: starting from the SSL backbone checkpoints/ssl_backbone.pt" in caplog.text
    assert cfg.model.weights == "ssl"  # the run's own config is left as the user wrote it
    classifier = build_classifier("resnet18", 3, resolved.model.weights)
    trained = classifier.state_dict()
    for name, tensor in backbone.state_dict().items():
        assert torch.equal(trained[name], tensor), name
    assert trained["fc.weight"].shape == (3, 512)


def test_a_missing_ssl_backbone_at_train_time_is_one_line(tmp_path):
    from app.models import with_weights_in_run

    with pytest.raises(UserError, match=r"model.weights=ssl: .*ssl_backbone.pt does not exist"):
        with_weights_in_run(compose("model.weights=ssl", "enable_training=true"), tmp_path)


@pytest.mark.slow
def test_a_run_with_enable_training_and_weights_ssl_trains_from_its_ssl_backbone(monkeypatch, capsys, tmp_path,
                                                                                   cache_dir):
    code, out, err = main_in_process([*SMALL, "enable_training=true", "model.weights=ssl", "ssl.epochs=1",
                                      "ssl.batch_size=8"], monkeypatch, capsys, tmp_path, cache_dir)
    assert code == 0, err
    text = out + err
    assert "ssl: loss " in text and "train: starting from the SSL backbone checkpoints/ssl_backbone.pt" in text
    # Random weights that SSL trains, then a classifier from that backbone: nothing is from scratch.
    assert "RANDOMLY INITIALISED" not in text
    assert "model resnet18 starts from random weights: enable_training=true trains it self-supervised" in text
