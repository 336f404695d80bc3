"""A rerun in the same run directory reuses a finished stage only when what it read is unchanged:
settings, input files and the stages before it. Otherwise it and every later stage run again,
and the log says which key changed."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app.config import register_configs, register_resolvers
from app.fingerprints import describe_change, stage_fingerprint
from conftest import SMALL, run_in_process

TINY = ["hardware=cpu", "data.image_size=32", "trainer.epochs=1"]


def image_folder(root: Path, names) -> Path:
    rng = np.random.default_rng(len(names))
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(path)
    return root


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def lines(path: Path):
    return path.read_text().splitlines()


@pytest.fixture
def run(monkeypatch, tmp_path, cache_dir, caplog):
    caplog.set_level(logging.INFO, logger="thresher")

    def run_with(*overrides):
        caplog.clear()
        code, run_dir = run_in_process([*TINY, "run_directory=job", *overrides], monkeypatch, tmp_path, cache_dir)
        return code, run_dir, caplog.text
    return run_with


@pytest.mark.slow
def test_a_changed_input_folder_runs_scan_and_every_later_stage_again(run, tmp_path):
    first = image_folder(tmp_path / "first", [f"a/{i}.png" for i in range(4)])
    second = image_folder(tmp_path / "second", [f"b/{i}.png" for i in range(5)])
    common = ["data=folder", "sampler=random", "sampler.stopping_condition.n_samples=3",
              "stages=[scan,embed,select]"]
    code, run_dir, _ = run(*common, f"data.input_dir={first}")
    assert code == 0
    assert all(name.startswith("a/") for name in lines(run_dir / "filenames/sampled_filenames.txt"))

    code, run_dir, log = run(*common, f"data.input_dir={second}", "resume=true")
    assert code == 0
    assert "stage scan: ran before with other inputs (data.input_dir was" in log
    assert "running it and the later stages again" in log
    assert "earlier run, skipped" not in log
    sampled = lines(run_dir / "filenames/sampled_filenames.txt")
    assert len(sampled) == 3 and all(name.startswith("b/") for name in sampled)
    assert json.loads((run_dir / "data/dataset.json").read_text())["classes"] == ["b"]


def test_an_unchanged_rerun_reuses_every_finished_stage(run, tmp_path):
    folder = image_folder(tmp_path / "images", [f"a/{i}.png" for i in range(4)])
    # coreset: sampler=random would skip the embed stage
    args = ["data=folder", f"data.input_dir={folder}", "sampler=coreset", "stages=[scan,embed,select]"]
    assert run(*args)[0] == 0
    code, run_dir, log = run(*args, "resume=true", "hardware.num_workers=0")  # speed, not results
    assert code == 0
    for stage in ("scan", "embed", "select"):
        assert f"stage {stage}: finished in an earlier run, skipped" in log


def test_a_relevant_filenames_file_edited_in_place_runs_the_scan_again(run, tmp_path):
    folder = image_folder(tmp_path / "images", [f"a/{i}.png" for i in range(4)])
    listing = tmp_path / "relevant.txt"
    listing.write_text("a/0.png\na/1.png\n")
    args = ["data=folder", f"data.input_dir={folder}", f"data.relevant_filenames_file={listing}", "stages=[scan]"]
    assert run(*args)[0] == 0
    listing.write_text("a/2.png\na/3.png\n")  # same path, same size: only the content says it changed
    code, run_dir, log = run(*args, "resume=true")
    assert code == 0
    assert "stage scan: ran before with other inputs (data.relevant_filenames_file was" in log
    assert "a/2.png" in (run_dir / "data/input_files.csv").read_text()


def test_a_changed_embeddings_file_runs_embed_and_select_again(run, tmp_path):
    names = [f"a/{i}.png" for i in range(4)]
    folder = image_folder(tmp_path / "images", names)
    given = tmp_path / "mine.csv"

    def write_embeddings(offset: float) -> None:
        rows = [f"{name},{offset + i},{-i},0" for i, name in enumerate(names)]
        given.write_text("filenames,embedding_0,embedding_1,labels\n" + "\n".join(rows) + "\n")

    write_embeddings(0.0)
    args = ["data=folder", f"data.input_dir={folder}", f"embeddings={given}", "stages=[scan,embed,select]",
            "sampler.stopping_condition.n_samples=2"]
    assert run(*args)[0] == 0
    write_embeddings(100.0)
    code, run_dir, log = run(*args, "resume=true")
    assert code == 0
    assert "stage scan: finished in an earlier run, skipped" in log
    assert "stage embed: ran before with other inputs (embeddings was" in log
    assert "100" in (run_dir / "data/embeddings.csv").read_text()


@pytest.mark.slow
def test_an_interrupted_training_resumes_only_under_the_same_settings(run, tmp_path):
    args = [*SMALL, "sampler=random", "trainer.epochs=2"]

    def pretend_interrupted(run_dir: Path) -> None:
        record = summary(run_dir)
        record["status"] = "interrupted"
        record["error"] = "stopped by SIGTERM"
        record["stages"]["train"]["status"] = "interrupted"
        (run_dir / "summary.json").write_text(json.dumps(record))

    code, run_dir, _ = run(*args)
    assert code == 0
    pretend_interrupted(run_dir)
    code, run_dir, log = run(*args)
    assert code == 0
    assert summary(run_dir)["stages"]["train"]["resumed_from"] is not None  # same settings: last.pt is used

    pretend_interrupted(run_dir)
    code, run_dir, log = run(*[a for a in args if not a.startswith("data.image_size")], "data.image_size=40")
    assert code == 0
    assert "stage train: ran before with other inputs (data.image_size was 32, now 40" in log
    record = summary(run_dir)
    assert record["stages"]["train"]["resumed_from"] is None
    assert [row["epoch"] for row in json.loads((run_dir / "metrics.json").read_text())["epochs"]] == [1, 2]
    assert record["status"] == "finished" and "error" not in record


def test_a_stage_left_out_of_stages_must_match_the_settings_of_this_run(run, tmp_path):
    folder = image_folder(tmp_path / "images", [f"a/{i}.png" for i in range(4)])
    base = ["data=folder", f"data.input_dir={folder}"]
    assert run(*base, "stages=[scan,embed]")[0] == 0
    code, run_dir, _ = run(*base, "stages=[select]", "sampler.embedding_model=mobilenet_v3_small", "resume=true")
    assert code == 2
    assert not (run_dir / "filenames/sampled_filenames.txt").exists()
    assert "sampler.embedding_model" in summary(run_dir)["error"]


def test_every_stage_records_its_fingerprint_and_what_it_depended_on(run, tmp_path):
    folder = image_folder(tmp_path / "images", [f"a/{i}.png" for i in range(3)])
    code, run_dir, _ = run("data=folder", f"data.input_dir={folder}", "sampler=coreset", "stages=[scan,embed,select]")
    assert code == 0
    stages = summary(run_dir)["stages"]
    assert stages["scan"]["depends_on"]["data.input_dir"] == {"path": str(folder)}
    assert stages["embed"]["depends_on"]["scan stage"] == stages["scan"]["fingerprint"]
    assert stages["select"]["depends_on"]["embed stage"] == stages["embed"]["fingerprint"]


def test_fingerprints_ignore_speed_settings_and_see_result_settings():
    from app import cli

    register_configs()
    register_resolvers()
    base = cli.compose(["trainer.epochs=3"])
    faster = cli.compose(["trainer.epochs=9", "hardware.num_workers=4", "sampler.batch_size=8", "logger=tensorboard"])
    other_lr = cli.compose(["trainer.optimizer.params.lr=0.5"])
    for stage in ("scan", "embed", "select", "train"):
        assert stage_fingerprint(stage, base, {}).digest == stage_fingerprint(stage, faster, {}).digest, stage
    before, after = stage_fingerprint("train", base, {}), stage_fingerprint("train", other_lr, {})
    assert before.digest != after.digest
    assert "trainer was" in describe_change(before.values, after.values)
    assert stage_fingerprint("train", base, {"select": "a"}).digest != stage_fingerprint("train", base, {"select": "b"}).digest
