"""The selection benchmark (`thresher -m +experiment=selection_benchmark`): the preset sweeps sampler x
budget x seed, and its callback (or `python -m app.benchmark SWEEP_DIR`) gathers the jobs' run
directories into benchmark.csv, benchmark.md and learning_curve.png. The gathering is tested on
sweep folders written here, job by job, as thresher leaves them; one slow test runs a real sweep."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Optional

import pytest
import yaml

from conftest import ROOT, main_in_process, only_run_dir

from app.benchmark.aggregate import BENCHMARK_CSV, BENCHMARK_MD, LEARNING_CURVE_PNG, aggregate


def write_job(sweep: Path, num: int, sampler: str, budget, seed: int, value: Optional[float], n_selected: int = 8,
              error: Optional[str] = None, holdout: float = 0.2, n_val: int = 40) -> Path:
    """A job's run directory as thresher leaves it: .hydra/config.yaml and summary.json."""
    run_dir = sweep / str(num)
    (run_dir / ".hydra").mkdir(parents=True)
    config = {"seed": seed, "sampler": {"method": sampler, "stopping_condition": {"n_samples": budget}},
              "data": {"name": "folder", "holdout_fraction": holdout}, "trainer": {"val_fraction": 0.2}}
    (run_dir / ".hydra/config.yaml").write_text(yaml.safe_dump(config))
    stages = {"scan": {"status": "finished"},
              "select": {"status": "finished", "n_candidates": 160, "n_selected": n_selected}}
    if error is None:
        stages["train"] = {"status": "finished", "key_metric": "val_top1", "key_metric_value": value, "n_val": n_val}
        summary = {"status": "finished", "stages": stages}
    else:
        stages["train"] = {"status": "failed"}
        summary = {"status": "failed", "error": error, "stages": stages}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir


def rows_of(sweep: Path) -> list:
    with open(sweep / BENCHMARK_CSV, newline="") as handle:
        return list(csv.DictReader(handle))


def test_the_table_gives_mean_and_spread_over_seeds_and_the_gain_over_random_in_points(tmp_path):
    sweep = tmp_path / "sweep"
    values = {("random", 0.05): [0.70, 0.74, 0.72], ("coreset", 0.05): [0.80, 0.76, 0.78],
              ("random", 0.2): [0.90, 0.92, 0.94], ("coreset", 0.2): [0.88, 0.90, 0.92]}
    num = 0
    for (sampler, budget), per_seed in values.items():
        for seed, value in zip((1, 2, 3), per_seed):
            write_job(sweep, num, sampler, budget, seed, value, n_selected=8 if budget == 0.05 else 32)
            num += 1

    benchmark = aggregate(sweep)

    assert [path.name for path in benchmark.files] == [BENCHMARK_CSV, BENCHMARK_MD, LEARNING_CURVE_PNG]
    assert (sweep / LEARNING_CURVE_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = rows_of(sweep)
    assert len(rows) == 12
    assert rows[3] == {**rows[3], "job": "3", "sampler": "coreset", "budget": "0.05", "seed": "1",
                       "n_selected": "8", "key_metric": "val_top1", "value": "0.80000", "status": "finished",
                       "run_directory": str(sweep / "3"), "error": ""}
    table = (sweep / BENCHMARK_MD).read_text()
    assert "| sampler | 5% (8 img) | 20% (32 img) |" in table
    # mean ± sample standard deviation over the three seeds; the gain is 100 x the difference of means
    assert "| random | 0.720 ± 0.020 | 0.920 ± 0.020 |" in table
    assert "| coreset | 0.780 ± 0.020 (+6.0) | 0.900 ± 0.020 (-2.0) |" in table
    # std 0.02 everywhere, 3 seeds: 2 x 2 points x sqrt(2/3) = 3.3 points of noise
    assert "| *noise (2 SE)* | ±3.3 | ±3.3 |" in table
    # per seed, same seed against same seed
    assert "| coreset | +10.0, +2.0, +6.0 | -2.0, -2.0, -2.0 |" in table
    assert "data.holdout_fraction=0.2" in table and "(40 images)" in table


def test_a_failed_job_is_listed_with_its_error_and_the_others_are_still_gathered(tmp_path):
    sweep = tmp_path / "sweep"
    write_job(sweep, 0, "random", 0.01, 1, None, n_selected=1,
              error="training needs at least 2 labelled images; the selection has 1")
    write_job(sweep, 1, "random", 0.2, 1, 0.9)
    write_job(sweep, 2, "coreset", 0.2, 1, 0.95)
    (sweep / "3").mkdir()  # a job that stopped before its run started: only Hydra's log
    (sweep / "3/thresher.log").write_text("[thresher][ERROR] - something\nthresher: error: data.input_dir missing\n")
    (sweep / "not_a_job").mkdir()  # anything else in the sweep folder is not a job

    benchmark = aggregate(sweep)

    assert [job.job for job in benchmark.jobs] == ["0", "1", "2", "3"]
    assert [job.job for job in benchmark.failed] == ["0", "3"]
    rows = rows_of(sweep)
    assert rows[0]["status"] == "failed" and "at least 2 labelled images" in rows[0]["error"]
    assert rows[3]["status"] == "missing" and "data.input_dir missing" in rows[3]["error"]
    table = (sweep / BENCHMARK_MD).read_text()
    assert "| sampler | 1% (1 img) | 20% (8 img) |" in table  # the failed budget keeps its column
    assert "| random | — | 0.900 |" in table
    assert "| coreset | — | 0.950 (+5.0) |" in table
    assert "- job 0 (sampler=random, n_samples=0.01, seed=1, 1 selected): failed: training needs" in table
    assert "- job 3: missing: thresher: error: data.input_dir missing" in table


def test_jobs_validated_on_their_own_selection_are_flagged_as_not_comparable(tmp_path):
    sweep = tmp_path / "sweep"
    write_job(sweep, 0, "random", 0.5, 1, 0.8, holdout=0.0, n_val=10)
    write_job(sweep, 1, "coreset", 0.5, 1, 0.9, holdout=0.0, n_val=12)

    table = aggregate(sweep, plot=False).markdown

    assert "trainer.val_fraction=0.2 split of each job's own selection" in table
    assert "not the same set for every job" in table
    assert not (sweep / LEARNING_CURVE_PNG).exists()


def test_python_m_app_benchmark_regathers_a_sweep_and_refuses_a_folder_without_one(tmp_path, capsys):
    from app.benchmark.__main__ import main

    sweep = tmp_path / "sweep"
    write_job(sweep, 0, "random", 10, 1, 0.5, n_selected=10)
    write_job(sweep, 1, "typical", 10, 1, 0.6, n_selected=10)
    assert main([str(sweep), "--no-plot"]) == 0
    out = capsys.readouterr().out
    assert "| sampler | 10 (10 img) |" in out  # a count budget is shown as a count
    assert "| typical | 0.600 (+10.0) |" in out
    assert (sweep / BENCHMARK_CSV).is_file() and not (sweep / LEARNING_CURVE_PNG).exists()

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(empty)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("thresher: error: ") and "holds no job of a sweep" in err[0]


def test_the_callback_gathers_only_in_a_sweep_not_in_a_single_run(tmp_path):
    """Under hydra/launcher=docker each container runs its job as a single run, with the preset's
    callback in its config: that run must not gather (its sweep folder is the host's)."""
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from app.benchmark.callback import SelectionBenchmark

    sweep = tmp_path / "sweep"
    write_job(sweep, 0, "random", 0.2, 1, 0.9)
    callback = SelectionBenchmark(plot=False)
    config = OmegaConf.create({"hydra": {"mode": RunMode.RUN, "sweep": {"dir": str(sweep)}}})
    callback.on_job_end(config, job_return=None)
    assert not (sweep / BENCHMARK_CSV).exists()
    config.hydra.mode = RunMode.MULTIRUN
    callback.on_job_end(config, job_return=None)
    assert rows_of(sweep)[0]["value"] == "0.90000"


def test_the_preset_sweeps_samplers_budgets_and_seeds_that_exist_with_a_cosine_schedule(registered):
    from app.cli import compose_quietly

    cfg = compose_quietly(["+experiment=selection_benchmark", "trainer.epochs=12"], with_hydra=True)
    params = cfg.hydra.sweeper.params
    samplers = params["sampler"].split(",")
    assert "random" in samplers and len(samplers) >= 2
    assert all((ROOT / "conf/sampler" / f"{name}.yaml").is_file() for name in samplers)
    budgets = [float(b) for b in params["sampler.stopping_condition.n_samples"].split(",")]
    assert budgets == sorted(budgets) and all(0 < b <= 1 for b in budgets)
    assert len(params["seed"].split(",")) >= 3
    assert cfg.hydra.callbacks.selection_benchmark._target_ == "app.benchmark.callback.SelectionBenchmark"
    assert cfg.trainer.scheduler.type == "CosineAnnealingLR" and cfg.trainer.scheduler.params.T_max == 12
    assert cfg.data.holdout_fraction == 0.2


TOKEN = "tok-benchmark-5f1e9a2c7d"


@pytest.mark.slow
def test_a_tiny_benchmark_sweep_on_shapes_writes_the_table_and_the_learning_curve(monkeypatch, capsys, tmp_path,
                                                                                  cache_dir):
    code, out, err = main_in_process(
        ["-m", "+experiment=selection_benchmark", "data.n_images=120", "data.shapes_image_size=32",
         "data.image_size=24", "trainer.epochs=1", "hardware=cpu", "sampler=random,coreset",
         "sampler.stopping_condition.n_samples=0.1,0.3", "seed=1", f"token={TOKEN}"], monkeypatch, capsys, tmp_path,
        cache_dir)
    assert code == 0, err
    sweep = only_run_dir(tmp_path / "runs/multirun")
    # The gathered table, the plot and every job's files hold no secret (the token went in on argv).
    assert TOKEN not in out + err
    assert not [path for path in sweep.rglob("*") if path.is_file() and TOKEN.encode() in path.read_bytes()]
    rows = rows_of(sweep)
    assert [(row["sampler"], row["budget"], row["status"]) for row in rows] == [
        ("random", "0.1", "finished"), ("random", "0.3", "finished"),
        ("coreset", "0.1", "finished"), ("coreset", "0.3", "finished")]
    assert all(0 <= float(row["value"]) <= 1 and row["key_metric"] == "val_top1" for row in rows)
    assert int(rows[0]["n_selected"]) < int(rows[1]["n_selected"])
    assert (sweep / LEARNING_CURVE_PNG).is_file()
    assert "| coreset |" in (sweep / BENCHMARK_MD).read_text()
    assert "# Selection benchmark: val_top1 by sampler and budget" in out
