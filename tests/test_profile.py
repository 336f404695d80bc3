"""The profile stage: sweeps over batch sizes and loader workers, what each setting reports, OOMs
recorded while the sweep goes on, the recommendation, traces, latency mode, resume after SIGTERM,
the Faster R-CNN / Oxford-IIIT Pet preset, and the report it writes."""
from __future__ import annotations

import json
import multiprocessing
import re
import time
from pathlib import Path

import pytest
import torch

from app.profile import measure
from app.profile.recommend import recommend

from conftest import SMALL, only_run_dir, sigterm_once_written, summary_of, thresher

PROFILE = [*SMALL, "stages=[profile]", "profile.warmup_steps=1", "profile.steps=3"]
PNG = b"\x89PNG\r\n\x1a\n"


def profile_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "report.json").read_text())["profile"]


@pytest.mark.slow
def test_a_sweep_measures_every_setting_and_recommends_an_override_line(env, tmp_path):
    result = thresher([*PROFILE, "profile.batch_sizes=[2,4]", "profile.num_workers=[0,1]"], env, tmp_path)
    assert result.returncode == 0, result.stderr
    run_dir = only_run_dir(tmp_path / "runs")
    summary = summary_of(run_dir)
    # stages=[profile] on a fresh run directory scans first: the profile needs the file list
    assert summary["stages_requested"] == ["profile"] and summary["stages_run"] == ["scan", "profile"]
    assert summary["stages"]["scan"]["status"] == summary["stages"]["profile"]["status"] == "finished"

    profile = profile_of(run_dir)
    assert profile["mode"] == "train" and profile["model"] == "resnet18" and profile["device"].startswith("cpu")
    rows = profile["settings"]
    # for each worker count, each batch size, in the order given
    assert [(r["batch_size"], r["num_workers"]) for r in rows] == [(2, 0), (4, 0), (2, 1), (4, 1)]
    for row in rows:
        assert row["status"] == "ok" and row["num_workers_used"] == row["num_workers"]
        assert row["samples"] == 3 * row["batch_size"] and row["steps"] == 3
        busy = row["data_wait_s"] + row["compute_s"]
        assert row["samples_per_s"] == pytest.approx(row["samples"] / busy, rel=1e-2)
        assert row["step_ms"]["mean"] == pytest.approx(1000 * busy / 3, rel=1e-2)
        assert 0 < row["step_ms"]["p50"] <= row["step_ms"]["p95"]
        assert row["compute_efficiency"] == pytest.approx(row["compute_s"] / busy, abs=1e-3)
        assert 0 < row["compute_efficiency"] <= 1
        assert row["cpu_ms_per_sample"] > 0
        assert row["host_rss_peak_mb"] > 100 and 0 < row["host_pss_mb"] <= row["host_rss_peak_mb"] * 1.05
        # no GPU here: its figures are absent, not zero
        assert row["gpu_memory_peak_mb"] is row["gpu_utilization_pct"] is None
        assert "latency_ms" not in row  # training steps have no per-image latency

    recommended = profile["recommended"]
    assert recommended["overrides"] == (f"trainer.batch_size={recommended['batch_size']} "
                                        f"hardware.num_workers={recommended['num_workers']}")
    best = max(r["samples_per_s"] for r in rows)
    chosen = next(r for r in rows if (r["batch_size"], r["num_workers"]) == (recommended["batch_size"],
                                                                             recommended["num_workers"]))
    assert chosen["samples_per_s"] >= 0.95 * best
    assert f"profile: recommended: {recommended['overrides']}" in result.stdout
    stage = summary["stages"]["profile"]
    assert stage["recommended"] == recommended["overrides"] and stage["settings_ok"] == 4

    # the batch-size guidance's two diagrams, as PNGs, embedded in the page with the table
    assert profile["plots"] == ["plots/profile_throughput.png", "plots/profile_cpu_time_per_sample.png"]
    for plot in profile["plots"]:
        assert (run_dir / plot).read_bytes().startswith(PNG)
    page = (run_dir / "report.html").read_text()
    assert "<h2>Profile</h2>" in page and page.count("<img ") == 2
    assert f"<code>{recommended['overrides']}</code>" in page
    assert json.loads((run_dir / "profile/measurements.json").read_text())["rows"] == rows


@pytest.mark.slow
def test_the_override_line_reproduces_the_setting_in_a_training_run(env, tmp_path):
    profiled = thresher([*PROFILE, "profile.batch_sizes=[4]", "run_directory=p"], env, tmp_path)
    assert profiled.returncode == 0, profiled.stderr
    line = profile_of(tmp_path / "runs/p")["recommended"]["overrides"]
    assert line == "trainer.batch_size=4 hardware.num_workers=0"
    trained = thresher([*SMALL, "sampler=none", "stages=[scan,train]", *line.split(), "run_directory=t"],
                       env, tmp_path)
    assert trained.returncode == 0, trained.stderr
    assert "batch 4" in trained.stdout


@pytest.mark.slow
def test_out_of_memory_at_one_batch_size_is_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch, cache_dir):
    """CI has no GPU: a CUDA OutOfMemoryError is raised for batches of 4 or more, as a GPU would;
    one other failure is recorded too, and neither ends the sweep."""
    from app.profile import stage as profile_stage_module

    real_build_step = profile_stage_module.build_step

    def build_step_that_runs_out_of_memory(setup):
        step, release = real_build_step(setup)

        def step_with_limited_memory(images, targets):
            if len(images) == 16:
                raise ValueError("a broken batch")
            if len(images) >= 4:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            step(images, targets)

        return step_with_limited_memory, release

    monkeypatch.setattr(profile_stage_module, "build_step", build_step_that_runs_out_of_memory)
    run_dir, cfg = scanned_run(tmp_path, monkeypatch, cache_dir, "profile.batch_sizes=[2,3,4,8,16]")
    result = profile_stage_module.profile_stage(cfg, run_dir, torch.device("cpu"))

    rows = profile_of(run_dir)["settings"]
    assert [r["status"] for r in rows] == ["ok", "ok", "oom", "oom", "failed"]
    assert rows[2]["error"] == "CUDA out of memory. Tried to allocate 2.00 GiB"
    assert rows[4]["error"] == "ValueError: a broken batch"
    assert result.settings_ok == 2 and result.settings_oom == 2 and result.settings_failed == 1
    recommended = profile_of(run_dir)["recommended"]
    assert recommended["batch_size"] in (2, 3) and "out of memory at batch size 4, 8" in recommended["reason"]
    page = (run_dir / "report.html").read_text()
    assert page.count("out of memory") >= 2 and "failed: ValueError: a broken batch" in page


def test_a_real_cpu_allocation_failure_counts_as_out_of_memory():
    with pytest.raises(RuntimeError) as caught:
        torch.empty(2 ** 62, dtype=torch.uint8)
    assert measure.is_out_of_memory(caught.value)
    assert measure.is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory."))
    assert not measure.is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))


def scanned_run(tmp_path, monkeypatch, cache_dir, *overrides):
    """A composed config and a run directory the scan stage has filled, for in-process stage tests."""
    from app.cli import compose
    from app.config import register_configs, register_resolvers
    from app.data.scan import scan_stage

    monkeypatch.setenv("THRESHER_CACHE_DIR", str(cache_dir))
    register_configs()
    register_resolvers()
    cfg = compose([*PROFILE, *overrides])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    scan_stage(cfg, run_dir)
    return run_dir, cfg


@pytest.mark.slow
def test_latency_mode_reports_per_image_percentiles_at_batch_size_one(env, tmp_path):
    result = thresher([*PROFILE, "profile.mode=latency", "profile.steps=12", "profile.num_workers=[0,1]"],
                      env, tmp_path)
    assert result.returncode == 0, result.stderr
    profile = profile_of(only_run_dir(tmp_path / "runs"))
    assert [(r["batch_size"], r["num_workers"]) for r in profile["settings"]] == [(1, 0), (1, 1)]
    for row in profile["settings"]:
        latency, end_to_end = row["latency_ms"], row["end_to_end_ms"]
        assert 0 < latency["p50"] <= latency["p90"] <= latency["p95"] <= latency["p99"] <= latency["max"]
        assert latency["p50"] <= end_to_end["p50"] and row["samples"] == 12
    assert re.fullmatch(r"hardware\.num_workers=[01]", profile["recommended"]["overrides"])
    assert profile["plots"] == ["plots/profile_latency.png", "plots/profile_cpu_time_per_sample.png"]
    assert "latency p50/p95 ms" in result.stdout

    refused = thresher([*PROFILE, "profile.mode=latency", "profile.batch_sizes=[1,8]"], env, tmp_path)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert "latency mode runs batch size 1" in refused.stderr and "profile.mode=infer" in refused.stderr


@pytest.mark.slow
def test_infer_mode_runs_on_images_without_labels(env, tmp_path, cache_dir):
    from app.data.shapes import ensure_shapes

    circles = ensure_shapes(cache_dir, 45, 48) / "circle"  # one folder, no class sub-folders
    args = ["data=folder", f"data.input_dir={circles}", "data.image_size=32", "hardware=cpu", "stages=[profile]",
            "profile.warmup_steps=1", "profile.steps=3", "profile.batch_sizes=[1,4]"]
    inferred = thresher([*args, "profile.mode=infer"], env, tmp_path)
    assert inferred.returncode == 0, inferred.stderr
    assert "no classification labels; inferring with torchvision's default head (1000 classes)" in inferred.stdout
    profile = profile_of(only_run_dir(tmp_path / "runs"))
    assert [r["status"] for r in profile["settings"]] == ["ok", "ok"]
    assert all(r["samples"] == 3 * r["batch_size"] for r in profile["settings"])
    # resnet18 both embeds and is profiled: the batch size is the embed stage's
    assert profile["recommended"]["overrides"].startswith("sampler.batch_size=")
    assert profile["plots"] == ["plots/profile_throughput.png", "plots/profile_latency_vs_batch_size.png",
                                "plots/profile_cpu_time_per_sample.png"]
    assert all(0 < r["latency_ms"]["p50"] <= r["latency_ms"]["p95"] for r in profile["settings"])

    trained = thresher([*args, "profile.mode=train", "run_directory=train"], env, tmp_path)
    assert trained.returncode == 2 and "classification needs at least 2 classes" in trained.stderr


@pytest.mark.slow
def test_trace_writes_a_chrome_trace_of_further_steps(env, tmp_path):
    result = thresher([*PROFILE, "profile.batch_sizes=[2]", "profile.trace=true", "profile.trace_steps=2"],
                      env, tmp_path)
    assert result.returncode == 0, result.stderr
    run_dir = only_run_dir(tmp_path / "runs")
    trace = json.loads((run_dir / "profile/traces/train_batch2_workers0.json").read_text())
    names = {event.get("name", "") for event in trace["traceEvents"]}
    assert "thresher: step" in names and "thresher: wait for batch" in names
    assert any(name.startswith("aten::convolution") for name in names)
    assert len([e for e in trace["traceEvents"] if e.get("name") == "thresher: step"]) == 2
    assert profile_of(run_dir)["traces"] == ["profile/traces/train_batch2_workers0.json"]
    assert profile_of(run_dir)["settings"][0]["samples"] == 6, "traced steps are not measured"


@pytest.mark.slow
def test_sigterm_mid_sweep_then_rerun_keeps_the_measured_settings(env, tmp_path):
    args = [*PROFILE, "profile.steps=15", "profile.batch_sizes=[2,4,8]", "run_directory=swept"]
    measurements = tmp_path / "runs/swept/profile/measurements.json"
    stopped = sigterm_once_written(args, env, tmp_path, measurements, poll_s=0.02)
    assert stopped.returncode == 143, stopped.stdout
    first = json.loads(measurements.read_text())["rows"]
    assert 1 <= len(first) < 3, "the sweep ended before the signal: make it longer"
    assert summary_of(tmp_path / "runs/swept")["stages"]["profile"]["status"] == "interrupted"

    rerun = thresher(args, env, tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    assert "measured before the interruption, kept" in rerun.stdout
    rows = profile_of(tmp_path / "runs/swept")["settings"]
    assert [r["batch_size"] for r in rows] == [2, 4, 8]
    assert rows[:len(first)] == first

    again = thresher([*args, "resume=true"], env, tmp_path)
    assert again.returncode == 0 and "stage profile: finished in an earlier run, skipped" in again.stdout


@pytest.mark.slow
def test_the_preset_profiles_faster_rcnn_training_on_the_oxford_pet_layout(env, tmp_path):
    from app.data.shapes import write_pet_layout

    pets = write_pet_layout(tmp_path / "oxford-iiit-pet", n_images=13, image_size=96, n_corrupt=1)
    result = thresher(["+experiment=profile_fasterrcnn_pets", f"data.root={pets}", "hardware=cpu",
                       "data.image_size=96", "profile.batch_sizes=[1,2]", "profile.num_workers=[0]",
                       "profile.warmup_steps=1", "profile.steps=2"], env, tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr
    run_dir = only_run_dir(tmp_path / "runs")
    assert run_dir.name.endswith("_profile_fasterrcnn_pets")
    scan = summary_of(run_dir)["stages"]["scan"]
    assert scan["n_files"] == 13 and scan["n_corrupt"] == 1  # the trimaps are masks, not inputs
    profile = profile_of(run_dir)
    assert (profile["model"], profile["task"], profile["data"]) == ("fasterrcnn_resnet50_fpn", "detection",
                                                                    "oxford_pet")
    assert profile["n_images"] == 12 and profile["image_size"] == 96
    assert [r["status"] for r in profile["settings"]] == ["ok", "ok"]
    assert profile["recommended"]["overrides"].startswith("trainer.batch_size=")
    saved = (run_dir / ".hydra/config.yaml").read_text()
    assert "type: SGD" in saved and "momentum: 0.9" in saved and "prefetch_factor: 2" in saved


@pytest.mark.slow
def test_selection_and_profile_share_one_report(env, tmp_path):
    result = thresher([*SMALL, "sampler=random", "sampler.stopping_condition.n_samples=20",
                       "stages=[scan,embed,select,profile]", "profile.batch_sizes=[2]", "profile.warmup_steps=1",
                       "profile.steps=2"], env, tmp_path)
    assert result.returncode == 0, result.stderr
    run_dir = only_run_dir(tmp_path / "runs")
    report = json.loads((run_dir / "report.json").read_text())
    assert report["counts"]["selected"] == 20 and report["profile"]["n_images"] == 20  # the selection, profiled
    page = (run_dir / "report.html").read_text()
    assert "<h2>Selection</h2>" in page and "<h2>Profile</h2>" in page
    assert page.count("<img ") == len(report["plots"]) + len(report["profile"]["plots"])


@pytest.mark.slow
@pytest.mark.parametrize("override, message", [
    ("profile.mode=fast", "profile.mode='fast' is not allowed: choose from train, infer, latency"),
    ("profile.batch_sizes=[0,2]", "profile.batch_sizes=[0, 2] is not allowed: use a list of batch sizes >= 1"),
    ("profile.batch_sizes=[2,2]", "name each value once"),
    ("profile.num_workers=[-2]", "profile.num_workers=[-2] is not allowed"),
    ("profile.steps=1", "percentiles need several steps"),
    ("profile.batch_sise=[2]", "no such key (did you mean profile.batch_sizes?)"),
])
def test_a_bad_profile_setting_exits_2_with_one_line(env, tmp_path, override, message):
    result = thresher(["stages=[profile]", override], env, tmp_path)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr
    assert not (tmp_path / "runs").exists(), "refused before any file was written"


# ---------------------------------------------------------------------------------------------
# The recommendation and the measurements, in isolation
# ---------------------------------------------------------------------------------------------
def row(batch_size, workers, samples_per_s, status="ok", p95=None):
    return {"batch_size": batch_size, "num_workers": workers, "status": status, "samples_per_s": samples_per_s,
            "latency_ms": {"p50": (p95 or 1) / 2, "p95": p95}}


def test_recommendation_prefers_the_smallest_batch_and_fewest_workers_near_the_best():
    rows = [row(8, 4, 96.0), row(16, 4, 100.0), row(32, 4, 101.0), row(16, 8, 99.0), row(64, 4, None, "oom")]
    chosen = recommend(rows, "train", 0.05, "trainer.batch_size")
    assert (chosen["batch_size"], chosen["num_workers"]) == (8, 4)
    assert chosen["overrides"] == "trainer.batch_size=8 hardware.num_workers=4"
    assert "within 5% of the fastest (batch 32" in chosen["reason"] and "out of memory at batch size 64" in chosen["reason"]
    assert recommend(rows, "train", 0.0, "trainer.batch_size")["batch_size"] == 32
    assert recommend([row(2, 0, None, "oom")], "train", 0.05, "trainer.batch_size") is None
    latency = [row(1, 0, 50.0, p95=9.0), row(1, 2, 60.0, p95=7.0)]
    assert recommend(latency, "latency", 0.05, None)["overrides"] == "hardware.num_workers=2"
    assert recommend([row(8, 2, 10.0)], "infer", 0.05, None)["overrides"] == "hardware.num_workers=2"


def _burn_cpu(seconds: float, done) -> None:
    started = time.process_time()
    while time.process_time() - started < seconds:
        pass
    done.set()
    time.sleep(60)


def test_cpu_time_counts_the_loader_workers_too():
    """Worker processes do the decoding: their CPU time belongs to the setting's cost."""
    context = multiprocessing.get_context("fork")
    done = context.Event()
    sampler = measure.ResourceSampler(torch.device("cpu"), interval_s=0.01).start()
    worker = context.Process(target=_burn_cpu, args=(0.3, done), daemon=True)
    worker.start()
    try:
        assert done.wait(30)
        sampler.stop()
    finally:
        worker.kill()
    assert sampler.cpu_s >= 0.28  # the worker's 0.3 s, to the clock tick
    assert sampler.rss_peak > 2 * 50 * 2 ** 20 and sampler.pss > 0


def test_gpu_figures_come_from_cuda_and_nvml_when_there_is_a_gpu(monkeypatch):
    """The CUDA branch, on a machine without one: synchronised clocks, peaks and NVML samples."""
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3 * 2 ** 30)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: 4 * 2 ** 30)
    readings = iter([40, 60, 80] + [80] * 100)
    monkeypatch.setattr(torch.cuda, "utilization", lambda device=None: next(readings))
    cuda = torch.device("cuda", 0)
    measure.synchronize(cuda)
    assert calls == [cuda]
    sampler = measure.ResourceSampler(cuda, interval_s=60)
    sampler.start()
    sampler.stop()
    assert sampler.gpu_samples == [40, 60] and sampler.gpu_utilization_pct() == 50.0
    assert sampler.gpu_memory() == {"gpu_memory_peak_mb": 3072.0, "gpu_memory_reserved_peak_mb": 4096.0}

    def no_nvml(device=None):
        raise ModuleNotFoundError("nvidia-ml-py does not seem to be installed")

    monkeypatch.setattr(torch.cuda, "utilization", no_nvml)
    without = measure.ResourceSampler(cuda, interval_s=60).start()
    without.stop()
    assert without.gpu_utilization_pct() is None and without.gpu_unavailable
