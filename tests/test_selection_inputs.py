"""The Lightly Worker's inputs and outputs around selection: duplicates, a relevant-files list,
your own embeddings and checkpoint, selected embeddings, dumped images, sequences, the datapool."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import make_class_folder, only_run_dir, summary_of, thresher

# Every test here runs the CLI in a fresh process: the slow tier (`python -m pytest --slow`).
pytestmark = pytest.mark.slow

FOLDER = ["data=folder", "data.image_size=32", "hardware=cpu", "trainer.epochs=1"]


def make_folder(root: Path, per_class: int = 8, classes=("a", "b")) -> Path:
    return make_class_folder(root, dict.fromkeys(classes, per_class), size=(24, 40), stem="frame")


def lines(path: Path):
    return [line for line in path.read_text().splitlines() if line]


def test_exact_duplicates_are_listed_with_the_file_they_copy(env, tmp_path):
    images = make_folder(tmp_path / "images")
    shutil.copyfile(images / "a/frame_001.png", images / "b/zz_copy.png")
    result = thresher([*FOLDER, f"data.input_dir={images}", "stages=[scan]"], env, tmp_path)
    assert result.returncode == 0, result.stderr
    run_dir = only_run_dir(tmp_path / "runs")
    assert lines(run_dir / "filenames/duplicate_filenames.txt") == ["b/zz_copy.png\ta/frame_001.png"]
    assert "b/zz_copy.png" not in (run_dir / "data/input_files.csv").read_text()
    assert summary_of(run_dir)["counts"]["n_duplicates"] == 1

    kept = thresher([*FOLDER, f"data.input_dir={images}", "stages=[scan]", "remove_exact_duplicates=false",
                     "run_directory=kept"], env, tmp_path)
    assert kept.returncode == 0, kept.stderr
    assert "b/zz_copy.png" in (tmp_path / "runs/kept/data/input_files.csv").read_text()


def test_relevant_filenames_file_limits_the_input_and_reports_missing_entries(env, tmp_path):
    images = make_folder(tmp_path / "images")
    listing = tmp_path / "relevant.txt"
    listing.write_text("a/frame_000.png\n./b/frame_002.png\n\n# a comment\na/gone.png\n../escape.png\n"
                       "a/frame_000.png\n")
    result = thresher([*FOLDER, f"data.input_dir={images}", f"data.relevant_filenames_file={listing}",
                       "stages=[scan]"], env, tmp_path)
    assert result.returncode == 0, result.stderr
    run_dir = only_run_dir(tmp_path / "runs")
    assert lines(run_dir / "data/input_files.csv")[1:] == ["a/frame_000.png,0", "b/frame_002.png,1"]
    missing = dict(line.split("\t") for line in lines(run_dir / "filenames/missing_filenames.txt"))
    assert missing == {"a/gone.png": "no such file", "../escape.png": "outside the input folder"}


def embed_once(env, tmp_path, images: Path, name: str):
    result = thresher([*FOLDER, f"data.input_dir={images}", "stages=[scan,embed]", f"run_directory={name}"],
                      env, tmp_path)
    assert result.returncode == 0, result.stderr
    return tmp_path / "runs" / name / "data/embeddings.csv"


def test_given_embeddings_skip_the_model_and_are_selected_from(env, tmp_path):
    images = make_folder(tmp_path / "images")
    embeddings = embed_once(env, tmp_path, images, "first")
    result = thresher([*FOLDER, f"data.input_dir={images}", f"embeddings={embeddings}",
                       "stages=[scan,embed,select]", "sampler.stopping_condition.n_samples=5",
                       "run_directory=second"], env, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "RANDOMLY INITIALISED" not in result.stdout, "no model is built for given embeddings"
    run_dir = tmp_path / "runs/second"
    assert (run_dir / "data/embeddings.csv").read_text() == embeddings.read_text()
    assert len(lines(run_dir / "filenames/sampled_filenames.txt")) == 5
    assert len(lines(run_dir / "data/selected_embeddings.csv")) == 1 + 5


def with_field(text: str, row: int, field: int, value: str) -> str:
    """The CSV text with one field of line `row` (1-based, the header is line 1) replaced."""
    rows = text.splitlines()
    cells = rows[row - 1].split(",")
    cells[field] = value
    rows[row - 1] = ",".join(cells)
    return "\n".join(rows) + "\n"


@pytest.mark.parametrize("damage,words", [
    (lambda text: text.replace("embedding_0", "emb_0", 1), "line 1: the header"),
    (lambda text: text.replace("\n", "\nextra,1,2\n", 1), "line 2: 3 fields"),
    (lambda text: with_field(text, row=2, field=1, value="nan"), "line 2: an embedding value is NaN"),
    (lambda text: with_field(text, row=3, field=2, value="0.1.2"), "line 3: not a number"),
    (lambda text: "\n".join(text.splitlines()[:2] + [text.splitlines()[2].rsplit(",", 1)[0] + ",x"]),
     "line 3: the label 'x'"),
    (lambda text: text.splitlines()[0] + "\n", "no rows"),
])
def test_malformed_embeddings_are_refused_with_the_line_and_reason(damage, words, env, tmp_path):
    images = make_folder(tmp_path / "images", per_class=3)
    good = embed_once(env, tmp_path, images, "source")
    bad = tmp_path / "bad.csv"
    bad.write_text(damage(good.read_text()))
    result = thresher([*FOLDER, f"data.input_dir={images}", f"embeddings={bad}", "stages=[scan,embed]"],
                      env, tmp_path)
    assert result.returncode == 2, result.stdout[-2000:]
    assert "is malformed at" in result.stderr and words in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_checkpoint_loads_backbone_weights_for_embedding(env, tmp_path):
    import torch
    import torchvision

    weights = tmp_path / "backbone.pt"
    torch.save(torchvision.models.resnet18(num_classes=7).state_dict(), weights)
    images = make_folder(tmp_path / "images", per_class=3)
    result = thresher([*FOLDER, f"data.input_dir={images}", f"checkpoint={weights}", "stages=[scan,embed]"],
                      env, tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"loaded 120 tensors from {weights}" in result.stdout  # all but the 7-class head


def test_dump_dataset_writes_resized_selected_images(env, tmp_path):
    images = make_folder(tmp_path / "images", per_class=4)
    result = thresher([*FOLDER, f"data.input_dir={images}", "stages=[scan,embed,select]", "dump_dataset=true",
                       "output_image_size=12", "output_image_format=jpg",
                       "sampler.stopping_condition.n_samples=3"], env, tmp_path)
    assert result.returncode == 0, result.stderr
    run_dir = only_run_dir(tmp_path / "runs")
    dumped = sorted(p.relative_to(run_dir / "sampled").as_posix() for p in (run_dir / "sampled").rglob("*.jpg"))
    assert dumped == sorted(n.replace(".png", ".jpg") for n in lines(run_dir / "filenames/sampled_filenames.txt"))
    with Image.open(next((run_dir / "sampled").rglob("*.jpg"))) as picture:
        assert min(picture.size) == 12 and picture.size == (20, 12)  # 40x24 scaled to shorter edge 12


def test_sequences_are_selected_whole(env, tmp_path):
    images = make_folder(tmp_path / "images", per_class=9)
    result = thresher([*FOLDER, f"data.input_dir={images}", "stages=[scan,embed,select]",
                       "sampler.selected_sequence_length=3", "sampler.stopping_condition.n_samples=6"],
                      env, tmp_path)
    assert result.returncode == 0, result.stderr
    sampled = lines(only_run_dir(tmp_path / "runs") / "filenames/sampled_filenames.txt")
    assert len(sampled) == 6
    starts = {int(name[-7:-4]) // 3 for name in sampled}
    by_run = {}
    for name in sampled:
        by_run.setdefault((name.split("/")[0], int(name[-7:-4]) // 3), []).append(name)
    assert all(len(run) == 3 for run in by_run.values()), by_run
    assert starts


def test_datapool_selects_only_new_images_far_from_the_pool(env, tmp_path):
    images = make_folder(tmp_path / "images", per_class=6)
    common = [*FOLDER, f"data.input_dir={images}", "stages=[scan,embed,select]", "datapool.name=pool",
              "sampler.stopping_condition.n_samples=4"]
    first = thresher([*common, "run_directory=one"], env, tmp_path)
    assert first.returncode == 0, first.stderr
    second = thresher([*common, "run_directory=two"], env, tmp_path)
    assert second.returncode == 0, second.stderr
    picked_once = set(lines(tmp_path / "runs/one/filenames/sampled_filenames.txt"))
    picked_twice = set(lines(tmp_path / "runs/two/filenames/sampled_filenames.txt"))
    assert len(picked_once) == len(picked_twice) == 4 and not picked_once & picked_twice
    assert len(lines(tmp_path / "runs/two/data/embeddings.csv")) == 1 + 12 - 4, "pool members are not embedded again"
    pool = tmp_path / "runs/datapool/pool"
    assert len(lines(pool / "embeddings.csv")) == 1 + 8
    assert len(list((pool / "history").glob("*/embeddings.csv"))) == 1


def test_enable_training_trains_the_backbone_with_simclr_before_embedding(env, tmp_path):
    import torch

    images = make_folder(tmp_path / "images", per_class=6)
    result = thresher([*FOLDER, f"data.input_dir={images}", "stages=[scan,embed]", "enable_training=true",
                       "ssl.epochs=2", "ssl.batch_size=4"], env, tmp_path)
    assert result.returncode == 0, result.stderr
    run_dir = only_run_dir(tmp_path / "runs")
    embed = summary_of(run_dir)["stages"]["embed"]
    assert embed["ssl_epochs"] == 2 and len(embed["ssl_loss"]) == 2
    assert all(loss > 0 for loss in embed["ssl_loss"])
    trained = torch.load(run_dir / "checkpoints/ssl_backbone.pt", weights_only=True)
    assert "layer1.0.conv1.weight" in trained and "fc.weight" not in trained
    assert "ssl 2/2" in result.stdout


def test_enable_training_with_given_embeddings_is_refused(env, tmp_path):
    (tmp_path / "e.csv").write_text("filenames,embedding_0,labels\nx.png,0.1,0\n")
    result = thresher([f"embeddings={tmp_path / 'e.csv'}", "enable_training=true"], env, tmp_path)
    assert result.returncode == 2
    assert "enable_training=True is not allowed" in result.stderr and "embeddings" in result.stderr


def test_near_duplicates_are_dropped_before_selection_and_listed(env, tmp_path):
    images = make_folder(tmp_path / "images", per_class=5)
    for index in range(3):  # the same picture, brightened by a level or three: not identical bytes
        with Image.open(images / "a/frame_000.png") as picture:
            Image.fromarray(np.minimum(np.asarray(picture).astype(int) + 1 + index, 255).astype(np.uint8)).save(
                images / f"b/near_{index}.png")
    result = thresher([*FOLDER, f"data.input_dir={images}", "stages=[scan,embed,select]",
                       "sampler.near_duplicate_distance=0.1", "sampler.stopping_condition.n_samples=-1"],
                      env, tmp_path)
    assert result.returncode == 0, result.stderr
    run_dir = only_run_dir(tmp_path / "runs")
    listed = [line.split("\t") for line in lines(run_dir / "filenames/near_duplicate_filenames.txt")]
    assert sorted(row[0] for row in listed) == ["b/near_0.png", "b/near_1.png", "b/near_2.png"]
    assert {row[1] for row in listed} == {"a/frame_000.png"}
    sampled = set(lines(run_dir / "filenames/sampled_filenames.txt"))
    removed = set(lines(run_dir / "filenames/removed_filenames.txt"))
    assert len(sampled) == 10 and removed == {"b/near_0.png", "b/near_1.png", "b/near_2.png"}
