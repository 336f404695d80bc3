"""The whole run on the CPU: artifacts, summary, resume, refusals of busy or finished run dirs."""
from __future__ import annotations

import csv
import fcntl
import json
from pathlib import Path

import pytest
import torch

from conftest import (SMALL, main_in_process, only_run_dir, run_in_process, sigterm_once_written, summary_of,
                      thresher)


def read_csv(path: Path):
    with open(path, newline="") as handle:
        return list(csv.reader(handle))


@pytest.mark.slow
def test_full_cpu_run_writes_every_artifact(env, tmp_path):
    result = thresher([*SMALL, "note=smoke", "sampler.stopping_condition.n_samples=20"], env, tmp_path)
    assert result.returncode == 0, result.stderr
    run_dir = only_run_dir(tmp_path / "runs")
    assert run_dir.name.endswith("_smoke")

    summary = summary_of(run_dir)
    assert summary["status"] == "finished"
    assert [s for s in summary["stages"]] == ["scan", "embed", "score", "select", "train"]
    assert summary["stages"].pop("score") == {"status": "skipped"}  # scorer=none
    for stage in summary["stages"].values():
        assert stage["status"] == "finished" and stage["duration_s"] >= 0
    assert summary["counts"]["n_images"] == 45
    assert summary["counts"]["n_selected"] == 20
    assert 0 < summary["stages"]["embed"]["compute_efficiency"] <= 1

    rows = read_csv(run_dir / "data/embeddings.csv")
    header, body = rows[0], rows[1:]
    assert header[0] == "filenames" and header[-1] == "labels"
    assert header[1:-1] == [f"embedding_{i}" for i in range(512)]
    assert len(body) == 45
    assert {row[-1] for row in body} == {"0", "1", "2"}

    sampled = (run_dir / "filenames/sampled_filenames.txt").read_text().split()
    removed = (run_dir / "filenames/removed_filenames.txt").read_text().split()
    assert len(sampled) == 20 and len(removed) == 25 and not set(sampled) & set(removed)

    checkpoint = torch.load(run_dir / "checkpoints/last.pt", weights_only=False)
    assert checkpoint["epoch"] == 1 and checkpoint["classes"] == ["circle", "square", "triangle"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["n_train"] + metrics["n_val"] == 20
    assert len(metrics["epochs"]) == 1 and metrics["final"]["images_per_s"] > 0

    report = json.loads((run_dir / "report.json").read_text())
    assert report["counts"]["selected"] == 20 and (run_dir / "report.html").is_file()
    assert (run_dir / "data/selected_embeddings.csv").read_text().count("\n") == 21
    for name in ("config.yaml", "overrides.yaml", "hydra.yaml"):
        assert (run_dir / ".hydra" / name).is_file()
    assert (run_dir / "thresher.log").read_text().count("stage train: finished") == 1


@pytest.mark.slow
def test_progress_is_plain_lines_when_not_a_terminal(env, tmp_path):
    result = thresher([*SMALL, "stages=[scan,embed]"], env, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "embed: 45/45 img (100%)" in result.stdout
    assert "img/s" in result.stdout
    assert "\r" not in result.stdout + result.stderr


@pytest.mark.slow
def test_corrupt_images_are_listed_with_a_reason_and_skipped(env, tmp_path):
    result = thresher([*SMALL, "data.n_corrupt=3", "sampler=none"], env, tmp_path)
    assert result.returncode == 0, result.stderr
    run_dir = only_run_dir(tmp_path / "runs")
    corrupt = (run_dir / "filenames/corrupt_filenames.txt").read_text().splitlines()
    assert len(corrupt) == 3
    for line in corrupt:
        name, reason = line.split("\t")
        assert "corrupt_" in name and "truncated" in reason
    assert summary_of(run_dir)["counts"]["n_images"] == 42
    assert summary_of(run_dir)["stages"]["embed"]["status"] == "skipped"
    assert len((run_dir / "filenames/sampled_filenames.txt").read_text().split()) == 42


@pytest.mark.slow
def test_select_only_then_train_in_the_same_run_directory(env, tmp_path):
    first = thresher([*SMALL, "sampler=random", "stages=[scan,embed,select]", "run_directory=job"],
                     env, tmp_path)
    assert first.returncode == 0, first.stderr
    run_dir = tmp_path / "runs" / "job"
    assert not (run_dir / "checkpoints").exists()

    finished = (run_dir / "summary.json").read_bytes()
    refused = thresher([*SMALL, "sampler=random", "stages=[train]", "run_directory=job"], env, tmp_path)
    assert refused.returncode == 2
    assert "holds a finished run" in refused.stderr and "resume=true" in refused.stderr
    assert (run_dir / "summary.json").read_bytes() == finished, "a refusal leaves the finished run as it was"

    second = thresher([*SMALL, "sampler=random", "stages=[train]", "run_directory=job", "resume=true"],
                      env, tmp_path)
    assert second.returncode == 0, second.stderr
    assert (run_dir / "checkpoints/last.pt").is_file()
    assert summary_of(run_dir)["stages"]["train"]["n_train"] + summary_of(run_dir)["stages"]["train"]["n_val"] == 22


@pytest.mark.slow
def test_a_stage_without_its_input_is_refused_before_work(env, tmp_path):
    result = thresher([*SMALL, "stages=[train]"], env, tmp_path)
    assert result.returncode == 2
    assert "needs data/input_files.csv from the scan stage" in result.stderr


@pytest.mark.slow
def test_resume_skips_finished_stages_and_overwrite_starts_again(env, tmp_path):
    args = [*SMALL, "run_directory=again", "stages=[scan,embed,select]"]
    assert thresher(args, env, tmp_path).returncode == 0
    resumed = thresher([*args, "resume=true"], env, tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "stage embed: finished in an earlier run, skipped" in resumed.stdout
    overwritten = thresher([*args, "overwrite=true"], env, tmp_path)
    assert overwritten.returncode == 0, overwritten.stderr
    assert "skipped" not in overwritten.stdout
    assert summary_of(tmp_path / "runs/again")["status"] == "finished"


@pytest.mark.slow
def test_a_second_run_in_a_busy_run_directory_refuses(env, tmp_path):
    run_dir = tmp_path / "runs" / "busy"
    run_dir.mkdir(parents=True)
    (run_dir / ".thresher-run").write_text('{"created_by": "thresher", "run_id": "busy-run"}\n')
    with open(run_dir / ".lock", "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = thresher([*SMALL, "run_directory=busy"], env, tmp_path)
    assert result.returncode == 2
    assert "is in use by a running thresher" in result.stderr
    assert not (run_dir / "summary.json").exists()


@pytest.mark.slow
def test_same_seed_same_selection_for_both_samplers(env, tmp_path):
    for method in ("random", "coreset"):
        picks = []
        for run in ("a", "b"):
            result = thresher([*SMALL, f"sampler={method}", "stages=[scan,embed,select]",
                               f"run_directory={method}_{run}"], env, tmp_path)
            assert result.returncode == 0, result.stderr
            picks.append((tmp_path / "runs" / f"{method}_{run}" / "filenames/sampled_filenames.txt").read_text())
        assert picks[0] == picks[1]
        assert len(picks[0].split()) == 22  # default n_samples=0.5 of 45, rounded down


@pytest.mark.slow
def test_sanity_check_reports_and_exits(env, tmp_path):
    result = thresher([*SMALL, "sanity_check=true", "run_directory=sanity"], env, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "sanity check passed" in result.stdout
    summary = summary_of(tmp_path / "runs/sanity")
    assert summary["status"] == "finished"
    assert set(summary["sanity_check"]) >= {"torch", "input", "output", "device"}
    assert not (tmp_path / "runs/sanity/data").exists()


@pytest.mark.slow
def test_gpu_hardware_without_cuda_fails_clearly(env, tmp_path):
    if torch.cuda.is_available():
        return
    result = thresher([*SMALL, "hardware=gpu"], env, tmp_path)
    assert result.returncode == 2
    assert "no CUDA device is visible" in result.stderr and "hardware=cpu" in result.stderr


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_exits_143_and_the_rerun_resumes(env, tmp_path):
    args = [*SMALL, "trainer.epochs=200", "run_directory=stopped", "sampler=none"]
    checkpoint = tmp_path / "runs/stopped/checkpoints/last.pt"
    stopped = sigterm_once_written(args, env, tmp_path, checkpoint, poll_s=0.2)
    assert stopped.returncode == 143, stopped.stdout
    run_dir = tmp_path / "runs/stopped"
    summary = summary_of(run_dir)
    assert summary["status"] == "interrupted"
    assert summary["stages"]["train"]["status"] == "interrupted"
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["epoch"] >= 1 and saved["epoch"] < 200

    rerun = thresher([*SMALL, "run_directory=stopped", "sampler=none"], env, tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    assert "stage scan: finished in an earlier run, skipped" in rerun.stdout
    assert summary_of(run_dir)["status"] == "finished"


@pytest.mark.slow
def test_hydra_multirun_gives_each_job_its_own_run_directory(env, tmp_path):
    result = thresher(["-m", "sampler=random,none", "stages=[scan,embed,select]", "note=sweep", *SMALL],
                      env, tmp_path)
    assert result.returncode == 0, result.stderr
    sweep = only_run_dir(tmp_path / "runs/multirun")
    assert sweep.name.endswith("_sweep")
    methods = [summary_of(sweep / job)["stages"]["select"]["method"] for job in ("0", "1")]
    assert methods == ["random", "none"]


@pytest.mark.slow
def test_random_backbone_is_said_loudly_in_log_and_report(env, tmp_path):
    result = thresher([*SMALL, "stages=[scan,embed,select]"], env, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "RANDOMLY INITIALISED" in result.stdout
    run_dir = only_run_dir(tmp_path / "runs")
    assert json.loads((run_dir / "report.json").read_text())["embedding_model"]["randomly_initialised"] is True
    assert "RANDOMLY INITIALISED" in (run_dir / "report.html").read_text()


@pytest.mark.slow
def test_a_torchvision_weights_name_is_never_downloaded(env, tmp_path):
    result = thresher([*SMALL, "model.weights=ResNet18_Weights.IMAGENET1K_V1", "stages=[scan,embed]"],
                      {**env, "TORCH_HOME": str(tmp_path / "torch")}, tmp_path)
    assert result.returncode == 2
    expected = tmp_path / "torch/hub/checkpoints/resnet18-f37072fd.pth"
    assert f"{expected} does not exist and thresher never downloads" in result.stderr
    assert "TORCH_HOME" in result.stderr


# ---- the fast tier's in-process checks of the CLI runs above -------------------------------------

# Smaller than SMALL: 12 images, one training step an epoch, no loader processes to start.
TINY = ["data.n_images=12", "data.shapes_image_size=32", "data.image_size=32", "trainer.epochs=1",
        "trainer.batch_size=16", "hardware=cpu", "hardware.num_workers=0"]


def test_a_whole_run_in_process_writes_every_artifact_and_never_the_token(monkeypatch, capsys, tmp_path,
                                                                           cache_dir):
    """test_full_cpu_run_writes_every_artifact and test_no_secret_anywhere_in_a_full_run (slow tier), on
    tiny data through `app.cli.main` in this process: Hydra's job, every stage, the token on argv."""
    token = "tok-in-process-5e1f0a9c"
    code, out, err = main_in_process([*TINY, "note=smoke", "sampler.stopping_condition.n_samples=6", f"token={token}"],
                                     monkeypatch, capsys, tmp_path, cache_dir)
    assert code == 0, err[-2000:]
    run_dir = only_run_dir(tmp_path / "runs")
    assert run_dir.name.endswith("_smoke")

    summary = summary_of(run_dir)
    assert summary["status"] == "finished"
    assert list(summary["stages"]) == ["scan", "embed", "score", "select", "train"]
    assert summary["stages"].pop("score") == {"status": "skipped"}  # scorer=none
    assert all(stage["status"] == "finished" for stage in summary["stages"].values())
    assert summary["counts"]["n_images"] == 12 and summary["counts"]["n_selected"] == 6

    rows = read_csv(run_dir / "data/embeddings.csv")
    assert rows[0][0] == "filenames" and rows[0][-1] == "labels" and len(rows) == 13
    sampled = (run_dir / "filenames/sampled_filenames.txt").read_text().split()
    removed = (run_dir / "filenames/removed_filenames.txt").read_text().split()
    assert len(sampled) == 6 and len(removed) == 6 and not set(sampled) & set(removed)
    checkpoint = torch.load(run_dir / "checkpoints/last.pt", weights_only=False)
    assert checkpoint["epoch"] == 1 and checkpoint["classes"] == ["circle", "square", "triangle"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["n_train"] + metrics["n_val"] == 6 and len(metrics["epochs"]) == 1
    assert json.loads((run_dir / "report.json").read_text())["counts"]["selected"] == 6
    assert (run_dir / "report.html").is_file()
    for name in ("config.yaml", "overrides.yaml", "hydra.yaml"):
        assert (run_dir / ".hydra" / name).is_file()
    assert (run_dir / "thresher.log").read_text().count("stage train: finished") == 1

    written = b"".join(path.read_bytes() for path in sorted(run_dir.rglob("*")) if path.is_file())
    assert token.encode() not in written
    assert token not in out + err
    assert "token: '***'" in (run_dir / ".hydra/config.yaml").read_text()


def test_a_stop_mid_training_in_process_saves_last_pt_and_the_rerun_resumes(monkeypatch, tmp_path, cache_dir,
                                                                             caplog):
    """test_sigterm_saves_a_checkpoint_exits_143_and_the_rerun_resumes (slow tier) in this process: a
    real SIGTERM, sent as the second epoch starts, stops training at the next step boundary."""
    import logging
    import os
    import signal

    from app import lifecycle
    from app.train import loop

    caplog.set_level(logging.INFO, logger="thresher")
    # The forced exit 10 s after a signal would end pytest itself; the stop at a step boundary is under test.
    monkeypatch.setattr(lifecycle, "arm_exit_deadline", lambda signum, seconds=0.0: None)
    train_one_epoch = loop.train_one_epoch

    def sigterm_as_the_second_epoch_starts(setup, loader, position, *args, **kwargs):
        if position.epoch == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return train_one_epoch(setup, loader, position, *args, **kwargs)

    monkeypatch.setattr(loop, "train_one_epoch", sigterm_as_the_second_epoch_starts)
    args = [*TINY, "trainer.epochs=3", "run_directory=stopped", "sampler=none"]
    code, run_dir = run_in_process(args, monkeypatch, tmp_path, cache_dir)
    assert code == 143
    summary = summary_of(run_dir)
    assert summary["status"] == "interrupted" and summary["stages"]["train"]["status"] == "interrupted"
    assert torch.load(run_dir / "checkpoints/last.pt", weights_only=True)["epoch"] == 1  # 1 <= epoch < 3

    monkeypatch.setattr(loop, "train_one_epoch", train_one_epoch)
    caplog.clear()
    code, run_dir = run_in_process(args, monkeypatch, tmp_path, cache_dir)
    assert code == 0
    assert "stage scan: finished in an earlier run, skipped" in caplog.text
    summary = summary_of(run_dir)
    assert summary["status"] == "finished" and summary["stages"]["train"]["resumed_from"].startswith("epoch 1,")
    assert [row["epoch"] for row in json.loads((run_dir / "metrics.json").read_text())["epochs"]] == [1, 2, 3]
