"""What a newcomer's first run shows: a closing summary that says what was seen, selected and
learned and where to look next; a report with the training curve beside the selection; log lines
that say each thing once, with the host's paths; and the default run, which learns."""
from __future__ import annotations

import json
import logging
import re
import shlex
from pathlib import Path

import pytest

from conftest import SMALL, run_in_process, summary_of, thresher

TINY = [*SMALL, "data.n_images=30", "trainer.epochs=2"]


def closing_summary(output: str) -> dict:
    """The closing summary's `  name  value` lines after 'thresher: finished in'."""
    block = output.split("thresher: finished in", 1)[1].splitlines()[1:]
    return {m[1]: m[2] for line in block if (m := re.match(r"^  (\w+)\s+(.*)$", line))}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, cache_dir):
    """One tiny default run in this process, shared by the tests that read what it printed and wrote:
    (run directory, stdout, thresher's log)."""
    import contextlib
    import io

    tmp_path = tmp_path_factory.mktemp("first_run")
    out, records = io.StringIO(), []
    handler = logging.Handler(level=logging.INFO)
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("thresher")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        with pytest.MonkeyPatch.context() as monkeypatch, contextlib.redirect_stdout(out):
            code, run_dir = run_in_process(TINY, monkeypatch, tmp_path, cache_dir)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert code == 0, out.getvalue()
    return run_dir, out.getvalue(), "\n".join(records)


def test_a_finished_run_ends_with_what_was_seen_selected_and_learned(first_run):
    run_dir, stdout, _ = first_run
    lines = closing_summary(stdout)
    train = summary_of(run_dir)["stages"]["train"]
    assert lines["images"].startswith("30 seen: 0 corrupt, 0 exact duplicates")
    assert lines["selected"] == "15 of 30 by sampler=coreset (stopped by stopping_condition.n_samples=0.5)"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert lines["model"].startswith(f"resnet18: val_top1 {train['key_metric_value']:.4g} after 2 epochs")
    assert f"epoch {metrics['best']['epoch']}" in lines["model"] or "the best epoch" in lines["model"]
    assert lines["run"] == str(run_dir)
    assert lines["report"] == str(run_dir / "report.html")
    assert "data=folder data.input_dir=" in lines["next"], "after the example data: your own images"


def test_the_summary_counts_corrupt_and_duplicate_files_the_stages_set_aside(monkeypatch, tmp_path, cache_dir,
                                                                             capsys):
    from PIL import Image

    folder = tmp_path / "images"
    for label in ("a", "b"):
        (folder / label).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (24, 24), (60 * i, 100 if label == "a" else 200, 30)).save(folder / label / f"{i}.png")
    (folder / "a/copy.png").write_bytes((folder / "a/0.png").read_bytes())
    (folder / "b/broken.png").write_bytes(b"\x89PNG not really")
    code, run_dir = run_in_process(["data=folder", f"data.input_dir={folder}", "sampler=random",
                                    "stages=[scan,embed,select]", "hardware=cpu", "data.image_size=32"],
                                   monkeypatch, tmp_path, cache_dir)
    assert code == 0
    lines = closing_summary(capsys.readouterr().out)
    assert lines["images"].startswith("10 seen: 1 corrupt, 1 exact duplicates")
    assert lines["selected"].startswith("4 of 8 by sampler=random")
    assert "model" not in lines, "nothing was trained"
    assert lines["next"].startswith("train on this selection: thresher ")


def test_the_report_tells_the_whole_run_selection_then_training(first_run):
    run_dir, _, _ = first_run
    report = json.loads((run_dir / "report.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    training = report["training"]
    assert report["counts"]["selected"] == 15, "the selection's section is kept beside the training's"
    assert [e["epoch"] for e in training["epochs"]] == [1, 2]
    assert [e["val_top1"] for e in training["epochs"]] == [e["val_top1"] for e in metrics["epochs"]]
    assert training["best"] == metrics["best"]
    curve = run_dir / training["plots"][0]
    assert curve.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = (run_dir / "report.html").read_text()
    assert "At a glance" in html and "Selected <b>15</b> of 30 images" in html
    assert f"val_top1 {metrics['final']['val_top1']:.4f}" in html
    assert 'data-file="plots/training_curve.png"' in html
    assert html.index("<h2>Selection</h2>") < html.index("<h2>Training</h2>")


def test_the_random_initialisation_warning_is_said_once_a_run(first_run, caplog):
    from app.models import forget_warnings, warn_randomly_initialised

    _, _, log = first_run
    assert log.count("RANDOMLY INITIALISED") == 1, "the embed and train stages build the same model"
    caplog.set_level(logging.WARNING, logger="thresher")
    forget_warnings()  # what a new run in this process (a sweep's next job) does first
    warn_randomly_initialised("resnet18", "training starts from scratch")
    warn_randomly_initialised("resnet18", "training starts from scratch")
    assert caplog.text.count("RANDOMLY INITIALISED") == 1


# ---- progress lines ------------------------------------------------------------------------------
def progress_lines(caplog, desc: str):
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"{desc}:")]


def test_a_progress_line_is_not_repeated_when_the_loop_ends(caplog):
    from app.progress import Progress

    caplog.set_level(logging.INFO, logger="thresher")
    with Progress(3, "work", live=False, every_s=0.0) as bar:  # a line at every update
        for _ in range(3):
            bar.update(1)
    lines = progress_lines(caplog, "work")
    assert len(lines) == 3 and len(set(lines)) == 3 and lines[-1].startswith("work: 3/3 img (100%)")


def test_a_resumed_loop_reports_the_rate_of_this_process_only(caplog, monkeypatch):
    from app import progress

    clock = iter([100.0, 100.0, 104.0, 104.0, 104.0])
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    caplog.set_level(logging.INFO, logger="thresher")
    bar = progress.Progress(120, "train 3/3", live=False, every_s=1e9, initial=100)
    bar.update(20)  # 4 s for the 20 images left after the resume
    bar.close()
    (line,) = progress_lines(caplog, "train 3/3")
    assert "120/120 img (100%), 5.0 img/s" in line


# ---- host paths ----------------------------------------------------------------------------------
def test_log_lines_name_the_hosts_folders_in_a_container(monkeypatch):
    from app.hostpaths import HostPathFilter, on_host

    monkeypatch.setenv("THRESHER_HOST_OUTPUT", "/home/ana/runs/")
    monkeypatch.setenv("THRESHER_HOST_INPUT", "/mnt/photos")
    assert on_host("run directory: /data/output/2026-12-02_10-00-00") == \
        "run directory: /home/ana/runs/2026-12-02_10-00-00"
    assert on_host("scan: /data/input holds 3 images; /data/outputs and /data/input2 stay") == \
        "scan: /mnt/photos holds 3 images; /data/outputs and /data/input2 stay"
    record = logging.LogRecord("thresher", logging.INFO, __file__, 1, "report: %s", ("/data/output/r/report.html",),
                               None)
    assert HostPathFilter().filter(record) and record.getMessage() == "report: /home/ana/runs/r/report.html"
    monkeypatch.delenv("THRESHER_HOST_OUTPUT")
    monkeypatch.delenv("THRESHER_HOST_INPUT")
    assert on_host("/data/output/x") == "/data/output/x", "outside a container nothing changes"


# ---- the CLI -------------------------------------------------------------------------------------
@pytest.mark.slow
def test_the_next_command_a_run_suggests_runs_as_printed_and_trains_on(env, tmp_path):
    from PIL import Image

    folder = tmp_path / "my images"
    for label in ("cats", "dogs"):
        (folder / label).mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (24, 24), (40 * i, 90 if label == "cats" else 180, 20)).save(folder / label / f"{i}.png")
    first = thresher(["data=folder", f"data.input_dir={folder}", "sampler=random", "data.image_size=32",
                      "trainer.epochs=1", "hardware=cpu"], env, tmp_path)
    assert first.returncode == 0, first.stderr
    suggestion = closing_summary(first.stdout)["next"]
    assert suggestion.startswith("train longer on this selection: thresher ")
    args = shlex.split(suggestion.split(": ", 1)[1])[1:]
    assert "trainer.epochs=2" in args and "resume=true" in args
    again = thresher(args, env, tmp_path)
    assert again.returncode == 0, again.stderr
    assert "stage select: finished in an earlier run, skipped" in again.stdout
    run_dir = Path(closing_summary(again.stdout)["run"])
    assert summary_of(run_dir)["stages"]["train"]["epochs"] == 2
    assert "after 2 epochs" in closing_summary(again.stdout)["model"]


@pytest.mark.slow
def test_the_default_run_learns(env, tmp_path):
    """`thresher` with no arguments: the README's first command must end with a model that learned."""
    result = thresher([], env, tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr
    run_dir = Path(closing_summary(result.stdout)["run"])
    train = summary_of(run_dir)["stages"]["train"]
    assert train["key_metric"] == "val_top1" and train["key_metric_value"] >= 0.9, train
