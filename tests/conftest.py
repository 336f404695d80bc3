"""Shared fixtures: every test gets its own work dir; generated data goes to one session cache.

Two tiers: `python -m pytest` runs the fast one (unit tests and in-process stage calls on tiny
data, a few minutes); `python -m pytest --slow` runs every test, the slow ones too (marked `slow`
or `docker`: the CLI in a fresh process, Docker, Ray, a browser, anything of more than a few
seconds), which is what CI runs."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional

import pytest

_deselected_slow = pytest.StashKey[int]()


def pytest_addoption(parser) -> None:
    parser.addoption("--slow", action="store_true", default=False,
                     help="run the slow tier too (tests marked slow or docker: the CLI in a fresh process, "
                          "Docker, Ray, a browser); CI runs it")


def pytest_collection_modifyitems(config, items) -> None:
    """Without --slow, the slow tier is deselected, not skipped: the run stays short and quiet, and
    the summary says how many were left out and how to run them."""
    for item in items:
        if item.get_closest_marker("docker") and not item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.slow)  # a Docker test is always slow: `-m "not slow"` leaves it out too
    if config.getoption("--slow"):
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("slow")]
    config.stash[_deselected_slow] = len(slow)


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    count = config.stash.get(_deselected_slow, 0)
    if count:
        terminalreporter.write_line(f"{count} slow tests deselected: run `python -m pytest --slow` for all "
                                    "(what CI runs)")


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


def every_nth_fast(cases: list, n: int, ids: Optional[List[str]] = None) -> list:
    """An exhaustive parametrization (every optimizer, every refusal) for the fast tier: every n-th
    case runs there, so a contributor still sees each kind of check work between two edits; the
    others are marked slow, so `--slow` (CI) still runs every case with its assertions."""
    return [pytest.param(*(case if isinstance(case, tuple) else (case,)),
                         id=None if ids is None else ids[index],
                         marks=() if index % n == 0 else pytest.mark.slow)
            for index, case in enumerate(cases)]


def main_in_process(args: List[str], monkeypatch, capsys, tmp_path: Path, cache_dir: Path) -> tuple:
    """`thresher *args` in this process, Hydra's job included: what the CLI tests check through a
    fresh process, at a fraction of the cost (the fast tier). Returns (exit code, stdout, stderr).
    What the CLI changes for the whole process (sys.argv, the redacting stdout/stderr, the secret
    registry and variables, Hydra's log handlers) is put back afterwards."""
    import logging

    from app import cli, secrets

    monkeypatch.setattr(sys, "argv", ["thresher"])
    monkeypatch.setattr(sys, "stdout", sys.stdout)
    monkeypatch.setattr(sys, "stderr", sys.stderr)
    monkeypatch.setattr(secrets, "_secret_values", set())
    for variable in secrets.SECRET_VARIABLES.values():  # a `token=...` override lands in os.environ
        monkeypatch.setenv(variable, os.environ.get(variable, ""))
        if not os.environ[variable]:
            monkeypatch.delenv(variable)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.setenv("THRESHER_WORK_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("THRESHER_CACHE_DIR", str(cache_dir))
    monkeypatch.chdir(tmp_path)
    loggers = [logging.getLogger(), logging.getLogger("thresher")]
    saved = [(logger, list(logger.handlers), logger.level) for logger in loggers]
    code = 0
    try:
        cli.main(args)
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    finally:
        for logger, handlers, level in saved:
            for handler in list(logger.handlers):  # a copy: removing while iterating skips one
                if handler not in handlers:
                    logger.removeHandler(handler)
                    handler.close()
            for handler in handlers:
                if handler not in logger.handlers:
                    logger.addHandler(handler)
            logger.setLevel(level)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


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


def make_class_folder(root: Path, counts: dict, size: tuple = (20, 20), seed: int = 0, stem: str = "") -> Path:
    """A folder of class sub-folders (data=folder) with counts[class] seeded random PNGs of
    size (height, width) each, named <class>_NNN.png (or <stem>_NNN.png)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for name, count in counts.items():
        (root / name).mkdir(parents=True)
        for index in range(count):
            pixels = rng.integers(0, 255, size=(*size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{stem or name}_{index:03d}.png")
    return root
