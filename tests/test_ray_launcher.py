"""`thresher -m hydra/launcher=ray ...`: Hydra's Ray launcher runs each job of a sweep as a Ray task
that calls thresher's task function on a worker. The job's run directory, its summary.json and
the key metric it returns must be those of a local multirun, and no secret may reach what the
launcher pickles for the workers or what they log. The sweeps start a local Ray of 2 CPUs, or
join one started by `ray start --head` (hydra/launcher=ray_cluster). Without hydra-ray-launcher
(pip install -e '.[ray-launcher]') they skip, except under CI=true.
"""
from __future__ import annotations

import json
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator, List

import pytest
import yaml

from conftest import ROOT, SMALL, only_run_dir, require_module, summary_of

# main() with the Ray launcher's launch recorded: the pickled arguments of every Ray task it
# submits (what a worker receives) and, per job, what the task returned to the sweeper.
RECORDING_THRESHER = """
import json, os, sys
import ray.cloudpickle
from hydra.core.utils import JobStatus
from hydra_plugins.hydra_ray_launcher import _core
from app.cli import main

launch, launch_job_on_ray = _core.launch, _core.launch_job_on_ray

def recording_launch_job_on_ray(*args, **kwargs):
    with open(os.environ["RECORDED_PICKLES"], "ab") as handle:
        handle.write(ray.cloudpickle.dumps((args, kwargs)))
    return launch_job_on_ray(*args, **kwargs)

def recording_launch(*args, **kwargs):
    returns = launch(*args, **kwargs)
    with open(os.environ["RECORDED_RETURNS"], "a") as handle:
        for job in returns:
            completed = job.status == JobStatus.COMPLETED
            handle.write(json.dumps({"overrides": list(job.overrides), "status": job.status.name,
                                     "value": job._return_value if completed else None,
                                     "error": None if completed else str(job._return_value)}) + "\\n")
    return returns

_core.launch_job_on_ray, _core.launch = recording_launch_job_on_ray, recording_launch
main(sys.argv[1:])
"""


@pytest.fixture
def ray_launcher():
    require_module("hydra_plugins.hydra_ray_launcher", "pip install -e '.[ray-launcher]'")


@pytest.fixture
def ray_temp_dir():
    """Ray's session folder (logs, sockets) for the sweep's local Ray: short, since a socket path
    has at most 107 bytes, and searched for secrets afterwards."""
    path = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def ray_cluster(ray_launcher, ray_temp_dir, env, tmp_path) -> Iterator[dict]:
    """A one-node Ray cluster of 2 CPUs started by `ray start --head` in a folder of its own, with
    this checkout on its workers' path and the test's data cache in their environment (what a
    cluster's nodes need: the same thresher, the data at the same path). Yields the environment
    a driver joins it with. Stopped by process id: `ray stop` would stop every Ray of this user."""
    import psutil

    address = f"127.0.0.1:{free_port()}"
    node_env = {**env, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token"}
    node_env.pop("THRESHER_WORK_DIR")
    (tmp_path / "node").mkdir()
    started = subprocess.run(
        [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--num-cpus=2",
         f"--port={address.split(':')[1]}", f"--temp-dir={ray_temp_dir}", "--include-dashboard=false",
         f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
         f"--metrics-export-port={free_port()}", "--disable-usage-stats"],
        env=node_env, cwd=tmp_path / "node", capture_output=True, text=True, timeout=300)
    try:
        assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
        yield {**{k: v for k, v in env.items() if k != "THRESHER_WORK_DIR"}, "RAY_ADDRESS": address,
               "RAY_AUTH_MODE": "token"}
    finally:
        processes = set()
        for node in psutil.process_iter(["cmdline"]):
            if str(ray_temp_dir) in " ".join(node.info["cmdline"] or []):
                try:
                    processes.update([node, *node.children(recursive=True)])
                except psutil.NoSuchProcess:
                    pass
        for process in processes:
            try:
                process.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(processes, timeout=30)
        for process in alive:
            process.kill()


def ray_sweep(args: List[str], env: dict, cwd: Path, ray_temp_dir: Path) -> tuple:
    """`thresher -m hydra/launcher=ray *args` on a local Ray of 2 CPUs; (the process, the recorded
    job returns, the recorded pickled task arguments)."""
    returns, pickles = cwd / "returns.jsonl", cwd / "tasks.pkl"
    command = [sys.executable, "-c", RECORDING_THRESHER, "-m", "hydra/launcher=ray",
               "+hydra.launcher.ray.init.num_cpus=2", f"+hydra.launcher.ray.init._temp_dir={ray_temp_dir}",
               "+hydra.launcher.ray.init.include_dashboard=false", *args]
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=900,
                            env={**env, "RECORDED_RETURNS": str(returns), "RECORDED_PICKLES": str(pickles),
                                 "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"})
    told = [json.loads(line) for line in returns.read_text().splitlines()] if returns.is_file() else []
    return result, told, pickles.read_bytes() if pickles.is_file() else b""


@pytest.mark.slow
def test_a_two_job_sweep_runs_on_ray_workers_and_returns_each_jobs_key_metric(env, tmp_path, ray_launcher,
                                                                               ray_temp_dir):
    token = f"tok-{secrets.token_hex(16)}"
    result, told, pickled = ray_sweep([*SMALL, "sampler=random,coreset", "note=ray", f"token={token}"],
                                      env, tmp_path, ray_temp_dir)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    # The layout of a local multirun: <work_dir>/multirun/<stamp>_<note>/{multirun.yaml,0,1}.
    sweep_dir = only_run_dir(tmp_path / "runs/multirun")
    assert sweep_dir.name.endswith("_ray")
    assert sorted(p.name for p in sweep_dir.iterdir()) == ["0", "1", "multirun.yaml"]
    multirun = yaml.safe_load((sweep_dir / "multirun.yaml").read_text())
    assert multirun["hydra"]["launcher"]["_target_"].endswith("RayLauncher")
    assert "sampler=random,coreset" in multirun["hydra"]["overrides"]["task"]

    assert [job["status"] for job in told] == ["COMPLETED", "COMPLETED"], told
    for num, sampler in enumerate(("random", "coreset")):
        run_dir = sweep_dir / str(num)
        summary = summary_of(run_dir)
        assert summary["status"] == "finished" and summary["run_directory"] == str(run_dir)
        assert summary["stages"]["select"]["method"] == sampler
        train = summary["stages"]["train"]
        assert train["status"] == "finished" and train["key_metric"] == "val_top1", train
        # What the job returned to the sweeper is its key metric, and the job is the one it ran.
        assert f"sampler={sampler}" in told[num]["overrides"]
        assert told[num]["value"] == train["key_metric_value"]
        assert f"sampler={sampler}" in yaml.safe_load((run_dir / ".hydra/overrides.yaml").read_text())
        # The worker got the token from the environment (thresher saves its placeholder).
        assert "token: '***'" in (run_dir / ".hydra/config.yaml").read_text()

    # No secret in what the workers were sent, what they logged, or anything the sweep wrote.
    assert pickled and token.encode() not in pickled
    assert token not in result.stdout + result.stderr
    leaked = [path for folder in (tmp_path, ray_temp_dir) for path in folder.rglob("*")
              if path.is_file() and not path.is_symlink() and token.encode() in path.read_bytes()]
    assert leaked == []


@pytest.mark.slow
def test_a_user_error_in_one_job_fails_that_job_with_one_line_and_the_other_finishes(env, tmp_path, ray_launcher,
                                                                                     ray_temp_dir):
    # Job 1 trains, and its run refuses the betas only torch rejects (the sweep's preflight composes and
    # validates, so a plain config error would stop the sweep before job 0); job 0 only scans.
    result, told, _ = ray_sweep(["stages=[scan],[scan,select,train]", "+trainer.optimizer.params.betas=oops",
                                 "data.n_images=12", "data.shapes_image_size=32", "hardware=cpu", "sampler=random",
                                 "sampler.stopping_condition.n_samples=10"],
                                env, tmp_path, ray_temp_dir)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    sweep_dir = only_run_dir(tmp_path / "runs/multirun")

    assert [job["status"] for job in told] == ["COMPLETED", "FAILED"], told
    assert summary_of(sweep_dir / "0")["status"] == "finished"
    assert told[1]["error"] == f"job 1 failed (exit code 2); its run directory: {sweep_dir / '1'}"
    # The worker's one line reaches the terminal, without a traceback.
    refusals = [line for line in output.splitlines() if "thresher: error:" in line]
    assert len(refusals) == 1 and "trainer.optimizer.params.betas='oops' is not allowed" in refusals[0], refusals
    assert "Traceback" not in output


@pytest.mark.slow
def test_a_sweep_joins_a_running_cluster_and_writes_where_the_command_was_started(ray_cluster, tmp_path):
    # work_dir is relative (runs/, the default): the jobs run in the cluster's own folder, yet
    # write under the folder the sweep was started in.
    result = subprocess.run([sys.executable, "-m", "app", "-m", "hydra/launcher=ray_cluster", "stages=[scan]",
                             "data.n_images=12", "data.shapes_image_size=32", "hardware=cpu",
                             "sampler=random,coreset"], env={**ray_cluster, "PYTHONPATH": str(ROOT)},
                            cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Connected to Ray cluster" in result.stderr + result.stdout
    sweep_dir = only_run_dir(tmp_path / "runs/multirun")
    assert sorted(p.name for p in sweep_dir.iterdir()) == ["0", "1", "multirun.yaml"]
    for num in (0, 1):
        summary = summary_of(sweep_dir / str(num))
        assert summary["status"] == "finished" and summary["stages"]["scan"]["n_images"] == 12
    assert not (tmp_path / "node" / "runs").exists()
