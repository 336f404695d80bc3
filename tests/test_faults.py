"""Faults end cleanly: a full disk is one line and a `failed` summary, a signal ends the process in
time, and what a killed run left half-written is cleaned up by the next start."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from app.data.shapes import ensure_shapes, shapes_dir
from app.lifecycle import EXIT_DEADLINE_S
from app.run import degrade_log_files_quietly
from conftest import ROOT, SMALL, in_ci, run_in_process, thresher


@pytest.fixture
def small_disk(tmp_path):
    """A 24 MB filesystem of its own: room for a selection, not for a ResNet checkpoint."""
    mount_point = tmp_path / "small_disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        message = f"cannot mount a small tmpfs here ({mounted.stderr.strip()}): needs root"
        pytest.fail(message) if in_ci() else pytest.skip(message)
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


@pytest.mark.slow
def test_a_full_disk_ends_the_run_with_one_line_naming_the_file(env, tmp_path, small_disk):
    env = {**env, "THRESHER_WORK_DIR": str(small_disk)}
    result = thresher([*SMALL, "sampler=random", "run_directory=full"], env, tmp_path)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("thresher: error:")]
    assert len(errors) == 1, result.stderr
    assert "No space left on device (ENOSPC)" in errors[0] and str(small_disk / "full") in errors[0]
    assert "Traceback" not in result.stderr and "Logging error" not in result.stderr + result.stdout
    assert "inline_container" not in result.stderr
    summary = json.loads((small_disk / "full" / "summary.json").read_text())
    assert summary["status"] == "failed" and "ENOSPC" in summary["error"]
    assert not [p for p in (small_disk / "full").rglob("*.tmp")]  # no half-written file stays


def test_temporaries_of_a_killed_run_are_removed_at_the_next_start(monkeypatch, tmp_path, cache_dir):
    args = [*SMALL, "stages=[scan]", "run_directory=job"]
    code, run_dir = run_in_process(args, monkeypatch, tmp_path, cache_dir)
    assert code == 0
    (run_dir / "checkpoints").mkdir()
    killed_writes = [run_dir / "checkpoints" / ".last.pt.k1ll3d_x.tmp", run_dir / ".summary.json.abcd1234.tmp"]
    for path in killed_writes:
        path.write_bytes(b"half a file")
    other_node = run_dir / ".summary.node1.json.abcd1234.tmp"  # node 1 may be writing it right now
    other_node.write_bytes(b"in flight")
    code, _ = run_in_process([*args, "resume=true"], monkeypatch, tmp_path, cache_dir)
    assert code == 0
    assert not any(path.exists() for path in killed_writes)
    assert other_node.exists()


def test_a_killed_shapes_generation_leaves_nothing_behind_after_the_next(tmp_path):
    target = shapes_dir(tmp_path, 6, 32, 0)
    stale = tmp_path / f".{target.name}.99999.tmp"
    (stale / "circle").mkdir(parents=True)
    (stale / "circle" / "0.png").write_bytes(b"half")
    assert ensure_shapes(tmp_path, 6, 32) == target
    assert not stale.exists()
    assert (target / "annotations.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == []


@pytest.mark.slow
def test_one_sigterm_ends_the_process_even_when_a_thread_is_stuck(tmp_path):
    """A thread blocked for ever (a FIFO nobody writes, a hung mount) would keep the interpreter
    from exiting after the main thread stopped; the exit deadline ends it."""
    fifo = tmp_path / "never_written.png"
    os.mkfifo(fifo)
    script = textwrap.dedent(f"""
        import threading, time
        from app.lifecycle import Interrupted, install_signal_handlers
        install_signal_handlers()
        threading.Thread(target=lambda: open({str(fifo)!r}, "rb").read()).start()
        print("ready", flush=True)
        try:
            while True:
                time.sleep(0.05)
        except Interrupted as stop:
            raise SystemExit(128 + stop.signum)
    """)
    process = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        assert process.stdout.readline().strip() == "ready"
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=EXIT_DEADLINE_S + 20)
    finally:
        process.kill()
    assert process.returncode == 128 + signal.SIGTERM, output
    assert "exiting now" in output


def test_a_log_file_that_cannot_be_written_is_given_up_with_one_line(capsys):
    handler = logging.FileHandler("/dev/full")  # every write fails with ENOSPC
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        degrade_log_files_quietly()
        for i in range(20):
            logging.getLogger("thresher").warning("record %d", i)
    finally:
        root.removeHandler(handler)
    err = capsys.readouterr().err
    assert err.count("thresher: warning: stopped writing the log file: No space left on device (ENOSPC)") == 1
    assert "Logging error" not in err and "Traceback" not in err
    assert handler not in root.handlers
