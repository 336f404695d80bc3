"""Hydra's sweepers optimise what a run returns: the train stage's key metric (hydra_entry returns
it), so `thresher -m hydra/sweeper=optuna ...` tunes on it. The sweeps run the real command line
in a fresh process, with Optuna's Study.tell recorded, so a test sees what the sweeper received."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest
import yaml

from conftest import ROOT, SMALL, only_run_dir, require_module, summary_of

LR = "trainer.optimizer.params.lr"

# `thresher`'s main() with optuna's Study.tell recorded: one JSON line per trial the sweeper tells.
RECORDING_THRESHER = """
import json, os, sys
import optuna
from app.cli import main

tell = optuna.study.Study.tell

def recording_tell(self, *args, **kwargs):
    trial = kwargs.get("trial", args[0] if args else None)
    with open(os.environ["RECORDED_TELLS"], "a") as handle:
        handle.write(json.dumps({"params": trial.params, "values": kwargs.get("values"),
                                 "state": getattr(kwargs.get("state"), "name", None)}) + "\\n")
    return tell(self, *args, **kwargs)

optuna.study.Study.tell = recording_tell
main(sys.argv[1:])
"""


@pytest.fixture
def optuna_sweeper():
    require_module("hydra_plugins.hydra_optuna_sweeper", "pip install -e '.[optuna]'")


def sweep(args: List[str], env: dict, cwd: Path) -> tuple:
    """Run `thresher -m hydra/sweeper=optuna *args`; (the process, the told trials)."""
    tells = cwd / "tells.jsonl"
    result = subprocess.run([sys.executable, "-c", RECORDING_THRESHER, "-m", "hydra/sweeper=optuna", *args],
                            env={**env, "RECORDED_TELLS": str(tells), "PYTHONPATH": str(ROOT)}, cwd=cwd,
                            capture_output=True, text=True, timeout=600)
    told = [json.loads(line) for line in tells.read_text().splitlines()] if tells.is_file() else []
    return result, told


def job_lr(job: Path) -> float:
    config = yaml.safe_load((job / ".hydra/config.yaml").read_text())
    return float(config["trainer"]["optimizer"]["params"]["lr"])


@pytest.mark.slow
def test_an_optuna_sweep_maximises_the_key_metric_each_job_returns(env, tmp_path, optuna_sweeper):
    result, told = sweep([*SMALL, "sampler=none", "note=tune", "hydra.sweeper.n_trials=3",
                          "hydra.sweeper.direction=maximize", f"{LR}=tag(log, interval(0.0001, 0.01))"],
                         env, tmp_path)
    assert result.returncode == 0, result.stderr
    sweep_dir = only_run_dir(tmp_path / "runs/multirun")
    jobs = sorted(p for p in sweep_dir.iterdir() if p.is_dir())
    assert [job.name for job in jobs] == ["0", "1", "2"]
    metrics = {}
    for job in jobs:
        train = summary_of(job)["stages"]["train"]
        assert train["status"] == "finished" and train["key_metric"] == "val_top1", train
        metrics[job_lr(job)] = train["key_metric_value"]
    assert len(metrics) == 3, "each trial tries its own learning rate"

    # What the sweeper was told for each trial is that job's key metric.
    assert len(told) == 3, told
    for trial in told:
        assert trial["state"] == "COMPLETE", trial
        assert trial["values"] == [metrics[trial["params"][LR]]], (trial, metrics)

    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    best = max(metrics.values())
    assert results["best_value"] == best
    assert metrics[results["best_params"][LR]] == best


@pytest.mark.slow
def test_a_sweep_job_without_a_key_metric_is_a_failed_trial_and_the_sweep_goes_on(env, tmp_path, optuna_sweeper):
    """A run that trains nothing returns None: Optuna records the trial as failed and runs the
    next one; with no trial completed there is no best value, and the sweep exits non-zero."""
    result, told = sweep([*SMALL, "stages=[scan]", "note=scan", "hydra.sweeper.n_trials=2",
                          "hydra.sweeper.n_jobs=1", f"{LR}=interval(0.0001, 0.01)"], env, tmp_path)
    sweep_dir = only_run_dir(tmp_path / "runs/multirun")
    assert [summary_of(sweep_dir / job)["status"] for job in ("0", "1")] == ["finished", "finished"]
    assert [trial["state"] for trial in told] == ["FAIL", "FAIL"], told
    assert result.returncode != 0
    assert not (sweep_dir / "optimization_results.yaml").exists()


@pytest.mark.slow
def test_a_failed_sweep_job_is_a_failed_trial_and_stops_the_sweep_by_max_failure_rate(env, tmp_path,
                                                                                      optuna_sweeper):
    """A failed job raises: Optuna marks the trial failed, and with the default
    hydra.sweeper.max_failure_rate=0 no further batch runs."""
    # A value only torch refuses: the sweep's preflight composes and validates, each job's run
    # rehearses the optimizer (a config error the preflight sees would stop the sweep before job 0).
    result, told = sweep([*SMALL, "+trainer.optimizer.params.betas=oops", "note=bad", "hydra.sweeper.n_trials=3",
                          "hydra.sweeper.n_jobs=1", f"{LR}=interval(0.0001, 0.01)"], env, tmp_path)
    assert result.returncode == 1
    assert "thresher: error: trainer.optimizer.params.betas='oops' is not allowed" in result.stderr
    assert "job 0 failed (exit code 2)" in result.stderr
    sweep_dir = only_run_dir(tmp_path / "runs/multirun")
    assert [trial["state"] for trial in told] == ["FAIL"], told
    assert (sweep_dir / "0").is_dir() and not (sweep_dir / "1").exists()


def test_the_key_metric_a_job_returns_comes_from_its_summary(tmp_path):
    from app.run import key_metric_of

    def write(data: dict) -> Path:
        run_dir = tmp_path / str(len(list(tmp_path.iterdir())))
        run_dir.mkdir()
        (run_dir / "summary.json").write_text(json.dumps(data))
        return run_dir

    finished = {"status": "finished", "key_metric": "train_loss", "key_metric_value": 0.25}
    assert key_metric_of(write({"stages": {"train": finished}})) == 0.25
    assert key_metric_of(write({"stages": {"scan": {"status": "finished"}}})) is None
    assert key_metric_of(write({"stages": {"train": {**finished, "status": "interrupted"}}})) is None
    assert key_metric_of(write({"stages": {"train": {**finished, "key_metric_value": None}}})) is None
    assert key_metric_of(tmp_path / "missing") is None
