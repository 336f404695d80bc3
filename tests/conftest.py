"""Shared fixtures: every test gets its own work dir; generated data goes to one session cache."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Small and fast: the pipeline's behaviour, not its accuracy, is under test.
SMALL = ["data.n_images=45", "data.shapes_image_size=48", "data.image_size=32", "trainer.epochs=1",
         "hardware=cpu"]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def env(tmp_path, cache_dir) -> dict:
    values = {k: v for k, v in os.environ.items() if not k.startswith("THRESHER_")}
    values.update(THRESHER_CACHE_DIR=str(cache_dir), THRESHER_WORK_DIR=str(tmp_path / "runs"),
                  PYTHONUNBUFFERED="1")
    values.pop("HYDRA_FULL_ERROR", None)
    return values


def thresher(args: List[str], env: dict, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the real command line, as a user would, in a fresh process."""
    return subprocess.run([sys.executable, "-m", "app", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def sigterm_once_written(args: List[str], env: dict, cwd: Path, path: Path, poll_s: float = 0.05,
                         timeout: float = 120) -> subprocess.CompletedProcess:
    """Start thresher, send SIGTERM as soon as `path` exists (a checkpoint, a measurement), and
    return what it printed and its exit code."""
    process = subprocess.Popen([sys.executable, "-m", "app", *args], env=env, cwd=cwd, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not path.is_file():
        time.sleep(poll_s)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=60)
    return subprocess.CompletedProcess(process.args, process.returncode, output, "")


@pytest.fixture
def registered() -> None:
    """thresher's schemas and resolvers, as the CLI registers them before composing."""
    from app.config import register_configs, register_resolvers

    register_configs()
    register_resolvers()


def compose(*overrides: str):
    """The config `thresher *overrides` would run with, composed in this process."""
    from app import cli
    from app.config import register_configs, register_resolvers

    register_configs()
    register_resolvers()
    return cli.compose(list(overrides))


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def require_module(module: str, install: str) -> None:
    """Skip when an optional extra's module is missing (`install` says how to add it), except under
    CI, where every extra is installed and a test that cannot run is a failure."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        message = f"{module} is not installed: {install}"
        if in_ci():
            pytest.fail(f"{message} (CI=true: these tests must run, not skip)", pytrace=False)
        pytest.skip(message, allow_module_level=True)


def unavailable(reason: str) -> None:
    """Skip, except under CI, where a Docker test that cannot run is a failure."""
    if in_ci():
        pytest.fail(f"{reason} (CI=true: the Docker tests must run, not skip)", pytrace=False)
    pytest.skip(reason)


def summary_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def only_run_dir(work_dir: Path) -> Path:
    runs = [p for p in work_dir.iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


def run_in_process(overrides: List[str], monkeypatch, tmp_path: Path, cache_dir: Path) -> tuple:
    """Compose and execute a run in this process (no interpreter start, no Hydra job): for tests
    of the runner's decisions. Returns (exit code, run directory)."""
    from app import cli
    from app.config import register_configs, register_resolvers, run_directory_path
    from app.run import execute

    monkeypatch.setenv("THRESHER_WORK_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("THRESHER_CACHE_DIR", str(cache_dir))
    register_configs()
    register_resolvers()
    cfg = cli.compose(list(overrides))
    run_dir = Path(run_directory_path(cfg.work_dir, cfg.note, cfg.run_directory))
    return execute(cfg, run_dir), run_dir
