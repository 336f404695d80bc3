"""`hydra/launcher=docker`: sweeps whose jobs run in containers of the thresher image.

The first half pins what each container gets (mounts, command, secrets, GPUs) without an engine;
the tests marked `docker` run real sweeps against the engine and the image $THRESHER_IMAGE
(thresher:latest by default; .ci/run builds it from this checkout). Without an engine or the image
they skip, except under CI=true, where they fail.
"""
from __future__ import annotations

import csv
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import List

import pytest

from app.errors import UserError

from conftest import unavailable

ROOT = Path(__file__).resolve().parents[1]
IMAGE = os.environ.get("THRESHER_IMAGE", "thresher:latest")
TINY = ["data.image_size=32", "hardware=cpu", "sampler.batch_size=16"]
SELECT_ONLY = "stages=[scan,embed,select]"
SWEEP_TIMEOUT_S = 600


def thresher(args: List[str], env: dict, cwd: Path, timeout: float = SWEEP_TIMEOUT_S) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "app", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture
def launcher_env(tmp_path) -> dict:
    values = {k: v for k, v in os.environ.items() if not k.startswith("THRESHER_")}
    values.update(THRESHER_WORK_DIR=str(tmp_path / "runs"), THRESHER_IMAGE=IMAGE, PYTHONUNBUFFERED="1")
    values.pop("HYDRA_FULL_ERROR", None)
    return values


def hydra_config(tmp_path: Path, overrides: List[str], num: int = 0):
    """A job's full config (hydra section included), as the launcher receives it from the sweeper."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import open_dict

    from app.cli import CONF_DIR
    from app.config import register_configs, register_resolvers

    register_configs()
    register_resolvers()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="thresher"):
            cfg = compose(config_name="config", overrides=[f"work_dir={tmp_path / 'runs'}", *overrides],
                          return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()
    with open_dict(cfg):
        cfg.hydra.job.num = num
    return cfg


# ---------------------------------------------------------------------------------------------
# Without an engine: what each container gets
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_hydra_finds_the_docker_launcher_from_any_folder(tmp_path, launcher_env):
    process = thresher(["hydra/launcher=docker", "hydra.launcher.gpus_per_job=1", "--cfg", "hydra"],
                       launcher_env, tmp_path, timeout=120)
    assert process.returncode == 0, process.stderr
    import yaml

    launcher = yaml.safe_load(process.stdout)["hydra"]["launcher"]
    assert launcher["_target_"].endswith("DockerLauncher")
    assert launcher["gpus_per_job"] == 1
    assert launcher["environment"] == ["THRESHER_TOKEN"]


@pytest.mark.slow
@pytest.mark.parametrize("launcher, plugin", [("joblib", "hydra_plugins.hydra_joblib_launcher"),
                                              ("submitit_slurm", "hydra_plugins.hydra_submitit_launcher")])
def test_hydras_own_launchers_compose_when_their_extra_is_installed(tmp_path, launcher_env, launcher, plugin):
    import importlib.util

    if importlib.util.find_spec(plugin) is None:
        pytest.skip(f"{plugin} is not installed (pip install 'thresher[{launcher.split('_')[0]}]')")
    process = thresher([f"hydra/launcher={launcher}", "--cfg", "hydra"], launcher_env, tmp_path, timeout=120)
    assert process.returncode == 0, process.stderr
    assert plugin in process.stdout


def test_a_job_writes_its_run_directory_where_a_local_multirun_would(tmp_path):
    from app.launcher.docker import container_kwargs, plan_job, LauncherOptions

    images = tmp_path / "images"
    images.mkdir()
    cfg = hydra_config(tmp_path, ["data=folder", f"data.input_dir={images}", "sampler=random",
                                  f"embeddings={images}/mine.csv"], num=3)
    job = plan_job(cfg, ["data=folder", f"data.input_dir={images}", "sampler=random",
                         f"embeddings={images}/mine.csv"], 3)

    sweep_dir = Path(str(cfg.hydra.sweep.dir))
    assert sweep_dir.parent == tmp_path / "runs" / "multirun"
    assert job.host_run_dir == sweep_dir / "3"
    relative = job.host_run_dir.relative_to(tmp_path / "runs")
    assert job.command[-1] == f"hydra.run.dir=/data/output/{relative}"
    assert "work_dir=/data/output" in job.command
    assert "data.input_dir=/data/input" in job.command
    assert "embeddings=/data/input/mine.csv" in job.command  # host paths under a mount are translated
    assert not any(str(tmp_path) in arg for arg in job.command)

    kwargs = container_kwargs(job, LauncherOptions(image="thresher:test"), [], {}, [])
    mounts = {mount["Target"]: mount for mount in kwargs["mounts"]}
    assert mounts["/data/output"]["Source"] == str(tmp_path / "runs")
    assert mounts["/data/output"]["ReadOnly"] is False
    assert mounts["/data/input"]["Source"] == str(images)
    assert mounts["/data/input"]["ReadOnly"] is True
    # the job's log lines name these host folders instead of the mounts
    assert kwargs["environment"]["THRESHER_HOST_OUTPUT"] == str(tmp_path / "runs")
    assert kwargs["environment"]["THRESHER_HOST_INPUT"] == str(images)
    assert kwargs["user"] == f"{os.getuid()}:{os.getgid()}"
    assert kwargs["labels"]["thresher.launcher"] == "docker"
    assert kwargs["labels"]["thresher.job_num"] == "3"
    assert "device_requests" not in kwargs  # a host without the NVIDIA runtime refuses any


def test_a_bucket_input_is_left_to_the_job_and_a_bucket_work_dir_is_refused(tmp_path):
    from app.launcher.docker import plan_job

    overrides = ["data=folder", "data.input_dir=s3://bucket/images"]
    job = plan_job(hydra_config(tmp_path, overrides), overrides, 0)
    assert job.host_input_dir is None
    assert "data.input_dir=s3://bucket/images" in job.command
    assert "data.input_dir=/data/input" not in job.command

    with pytest.raises(UserError, match="work_dir=s3://bucket/runs is a bucket"):
        plan_job(hydra_config(tmp_path, ["work_dir=s3://bucket/runs"]), [], 0)


def test_gpus_go_round_robin_as_device_requests(tmp_path):
    from app.launcher.docker import GpuPool, LauncherOptions, container_kwargs, plan_job

    pool = GpuPool(["0", "1", "2", "3"], gpus_per_job=2)
    first, second = pool.acquire(), pool.acquire()
    assert [first[1], second[1]] == [["0", "1"], ["2", "3"]]
    pool.release(first[0])
    assert pool.acquire()[1] == ["0", "1"]  # the free group, not the busy one
    pool.release(second[0])
    assert pool.acquire()[1] == ["2", "3"]

    with pytest.raises(UserError, match="gpus_per_job=2 is more than the 1 GPUs"):
        GpuPool(["0"], gpus_per_job=2)

    job = plan_job(hydra_config(tmp_path, []), [], 0)
    kwargs = container_kwargs(job, LauncherOptions(gpus_per_job=2), ["2", "3"], {}, [])
    [request] = kwargs["device_requests"]
    assert request["DeviceIDs"] == ["2", "3"]
    assert request["Capabilities"] == [["gpu"]]


def test_secrets_reach_the_container_by_name_only(tmp_path, monkeypatch):
    from app.launcher.docker import LauncherOptions, container_kwargs, plan_job, secret_environment

    token = f"tok-{secrets.token_hex(8)}"
    key_file = tmp_path / "key"
    key_file.write_text("file-secret")
    environment, mounts = secret_environment(["THRESHER_TOKEN", "OTHER_KEY", "ABSENT"],
                                             {"THRESHER_TOKEN": token, "OTHER_KEY_FILE": str(key_file)})
    assert environment == {"THRESHER_TOKEN": token, "OTHER_KEY_FILE": "/run/secrets/other_key"}
    assert [(m["Source"], m["Target"], m["ReadOnly"]) for m in mounts] == \
        [(str(key_file), "/run/secrets/other_key", True)]

    job = plan_job(hydra_config(tmp_path, []), ["sampler=random"], 0)
    kwargs = container_kwargs(job, LauncherOptions(), [], environment, mounts)
    assert kwargs["environment"]["THRESHER_TOKEN"] == token
    assert not any(token in arg for arg in kwargs["command"])

    with pytest.raises(UserError) as refused:
        LauncherOptions.from_config({"environment": [f"THRESHER_TOKEN={token}"]})
    assert token not in str(refused.value)
    assert "names only" in str(refused.value)


def test_each_jobs_outcome_goes_into_hydras_job_return(tmp_path):
    """A finished job returns its key metric (as a local job does, for sweepers such as Optuna);
    a failed one raises, naming its exit code and log."""
    from hydra.core.utils import JobStatus

    from app.launcher.docker import JobFailed, JobOutcome, job_return, plan_job

    finished = plan_job(hydra_config(tmp_path, ["seed=1"], num=0), ["seed=1"], 0)
    failed = plan_job(hydra_config(tmp_path, ["seed=2"], num=1), ["seed=2"], 1)
    finished.host_run_dir.mkdir(parents=True, exist_ok=True)
    (finished.host_run_dir / "summary.json").write_text(
        '{"stages": {"train": {"status": "finished", "key_metric_value": 0.875}}}')

    ok = job_return(finished, JobOutcome(finished, "finished", exit_code=0))
    assert (ok.status, ok.return_value, ok.overrides) == (JobStatus.COMPLETED, 0.875, ["seed=1"])
    assert ok.working_dir == str(finished.host_run_dir)
    assert "hydra" not in ok.cfg and ok.cfg.seed == 1

    bad = job_return(failed, JobOutcome(failed, "failed", exit_code=2))
    assert bad.status == JobStatus.FAILED
    with pytest.raises(JobFailed, match=f"job 1 exited 2; its log: {failed.log_path}"):
        bad.return_value


def test_sweep_summary_reads_each_jobs_numbers_defensively(tmp_path):
    from app.launcher.docker import Job, JobOutcome, write_sweep_summary

    sweep_dir = tmp_path / "sweep"
    jobs = []
    for num in range(3):
        run_dir = sweep_dir / str(num)
        run_dir.mkdir(parents=True)
        jobs.append(Job(num=num, overrides=[f"seed={num}"], sweep_dir=sweep_dir, host_run_dir=run_dir,
                        host_work_dir=tmp_path, host_input_dir=None, container_run_dir="", command=[]))
    (sweep_dir / "0" / "summary.json").write_text(json.dumps({
        "status": "finished", "duration_s": 4.5,
        "stages": {"select": {"status": "finished", "n_selected": 10, "stopped_by": "n_samples",
                              "flag": True, "artifacts": ["a"]},
                   "train": {"status": "finished", "val_accuracy": 0.5}}}))
    (sweep_dir / "0" / "metrics.json").write_text(json.dumps(
        {"final": {"val_top1": 0.75, "epoch": 2}, "epochs": [{"loss": 1.0}], "n_train": 8}))
    (sweep_dir / "1" / "summary.json").write_text("{not json")
    (sweep_dir / "1" / "metrics.json").write_text("[1, 2]")

    path = write_sweep_summary(sweep_dir, "thresher:test", [
        JobOutcome(jobs[0], "finished", exit_code=0), JobOutcome(jobs[1], "failed", exit_code=2),
        JobOutcome(jobs[2], "not started")])
    rows = json.loads(path.read_text())["jobs"]
    assert rows[0]["metrics"] == {"select.n_selected": 10, "train.val_accuracy": 0.5, "duration_s": 4.5,
                                  "metrics.final.val_top1": 0.75, "metrics.final.epoch": 2,
                                  "metrics.n_train": 8}
    assert rows[1]["metrics"] == {} and rows[1]["exit_code"] == 2
    assert [row["status"] for row in rows] == ["finished", "failed", "not started"]
    assert rows[1]["log"] == str(sweep_dir / "1" / "container.log")

    # A later batch of the same sweep adds its rows to the earlier ones.
    write_sweep_summary(sweep_dir, "thresher:test", [JobOutcome(jobs[2], "finished", exit_code=0)])
    summary = json.loads(path.read_text())
    assert [row["status"] for row in summary["jobs"]] == ["finished", "failed", "finished"]
    assert summary["n_failed"] == 1


def parsed_overrides(command: List[str]) -> dict:
    """The container's command as Hydra will read it: key -> value."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return {o.key_or_group: o.value() for o in OverridesParser.create().parse_overrides(list(command))}


def mounts_of(job) -> dict:
    from app.launcher.docker import LauncherOptions, container_kwargs

    kwargs = container_kwargs(job, LauncherOptions(image="thresher:test"), [], {}, [])
    return {mount["Target"]: (mount["Source"], mount["ReadOnly"]) for mount in kwargs["mounts"]}


@pytest.mark.parametrize("path", ["/data/inputs/data.root/plain", "/data/input/a b/c", "/data/input/it's",
                                  "/data/input/back\\slash", "/data/input/ends\\", "/data/input/q\\'x",
                                  "/data/input/${not.a.key}", "/data/input/a,b=[c]"])
def test_a_container_path_reaches_the_job_as_it_is(path):
    from omegaconf import OmegaConf

    from app.launcher.docker import _hydra_value

    value = parsed_overrides([f"data.root={_hydra_value(path)}"])["data.root"]
    assert OmegaConf.create({"root": value}).root == path  # read back, interpolation resolved


def test_each_job_of_a_sweep_over_oxford_pet_roots_gets_its_own_root_read_only(tmp_path):
    from app.launcher.docker import InputMount, plan_job

    roots = [tmp_path / "pets" / "small", tmp_path / "pets" / "large set"]
    jobs = []
    for num, root in enumerate(roots):
        (root / "images").mkdir(parents=True)
        overrides = ["data=oxford_pet", f"data.root='{root}'"]
        jobs.append(plan_job(hydra_config(tmp_path, overrides, num=num), overrides, num))
    for job, root in zip(jobs, roots):
        assert job.host_input_dir is None  # data=oxford_pet has no data.input_dir
        assert job.input_mounts == [InputMount(root, "/data/inputs/data.root")]
        assert mounts_of(job)["/data/inputs/data.root"] == (str(root), True)
        assert parsed_overrides(job.command)["data.root"] == "/data/inputs/data.root"
        assert not any(str(tmp_path / "pets") in arg for arg in job.command)


def test_coco_annotations_outside_the_image_folder_are_mounted_and_inside_it_only_translated(tmp_path):
    from app.launcher.docker import InputMount, plan_job

    images = tmp_path / "images"
    images.mkdir()
    (images / "annotations.json").write_text("{}")
    labels = tmp_path / "my labels" / "train set.json"  # spaces in a folder and a file name
    labels.parent.mkdir()
    labels.write_text("{}")

    inside = ["data=coco", f"data.input_dir={images}"]  # data.annotations: ${data.input_dir}/annotations.json
    job = plan_job(hydra_config(tmp_path, inside), inside, 0)
    assert job.input_mounts == []
    assert parsed_overrides(job.command)["data.annotations"] == "/data/input/annotations.json"

    outside = [*inside, f"data.annotations='{labels}'"]
    job = plan_job(hydra_config(tmp_path, outside), outside, 0)
    target = "/data/inputs/data.annotations/train set.json"
    assert job.input_mounts == [InputMount(labels, target)]  # the file alone, not its folder
    assert mounts_of(job)[target] == (str(labels), True)
    assert f"data.annotations='{target}'" in job.command
    assert parsed_overrides(job.command)["data.annotations"] == target
    assert not any(str(tmp_path) in arg for arg in job.command)

    # A bucket input is the job's to read; a local annotations file still goes in.
    bucket = ["data=coco", "data.input_dir=s3://bucket/images", f"data.annotations='{labels}'"]
    job = plan_job(hydra_config(tmp_path, bucket), bucket, 0)
    assert job.input_mounts == [InputMount(labels, target)]
    assert parsed_overrides(job.command)["data.input_dir"] == "s3://bucket/images"


def test_paths_inside_one_another_or_named_twice_are_mounted_once(tmp_path):
    from app.data.inputs import FILE, FOLDER
    from app.launcher.docker import InputMount, plan_input_mounts

    outer = tmp_path / "outer"
    inner = outer / "inner"
    inner.mkdir(parents=True)
    listed = inner / "list.txt"
    other = tmp_path / "other.csv"
    for path in (listed, other):
        path.write_text("")
    work = tmp_path / "runs"
    plan = plan_input_mounts([("data.root", inner, FOLDER), ("a.file", listed, FILE), ("b.folder", outer, FOLDER),
                              ("c.file", other, FILE), ("d.file", other, FILE),
                              ("e.file", work / "old" / "best.pt", FILE)], mounted=[(work, "/data/output")])
    assert plan.mounts == [InputMount(outer, "/data/inputs/b.folder"), InputMount(other, "/data/inputs/c.file/other.csv")]
    assert plan.values == {"data.root": "/data/inputs/b.folder/inner",
                           "a.file": "/data/inputs/b.folder/inner/list.txt",
                           "b.folder": "/data/inputs/b.folder",
                           "c.file": "/data/inputs/c.file/other.csv", "d.file": "/data/inputs/c.file/other.csv",
                           "e.file": "/data/output/old/best.pt"}  # under a mount: translated, even before it exists


def test_relative_and_home_paths_are_the_launch_folders_and_a_missing_one_is_left_to_the_job(tmp_path, monkeypatch):
    from app.launcher.docker import InputMount, plan_job

    (tmp_path / "pets" / "images").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    relative = ["data=oxford_pet", "data.root=pets"]
    job = plan_job(hydra_config(tmp_path, relative), relative, 0)
    assert job.input_mounts == [InputMount(tmp_path / "pets", "/data/inputs/data.root")]

    monkeypatch.setenv("HOME", str(tmp_path))
    home = ["data=oxford_pet", "data.root='~/pets'"]  # Hydra's grammar takes a ~ only quoted
    assert plan_job(hydra_config(tmp_path, home), home, 0).input_mounts == job.input_mounts

    missing = ["data=oxford_pet", f"data.root={tmp_path}/no such folder"]
    job = plan_job(hydra_config(tmp_path, missing), missing, 0)
    assert job.input_mounts == []  # its config check says "data.root=... it must hold the Oxford-IIIT Pet layout"
    assert parsed_overrides(job.command)["data.root"] == f"{tmp_path}/no such folder"


def test_bring_your_own_files_go_in_read_only_and_a_weights_name_stays_a_name(tmp_path):
    from app.launcher.docker import InputMount, plan_job

    images = tmp_path / "images"
    images.mkdir()
    mine = tmp_path / "mine"
    mine.mkdir()
    embeddings, weights, val_list = mine / "embeddings.csv", mine / "resnet.pt", tmp_path / "val.txt"
    checkpoint = tmp_path / "runs" / "earlier" / "best.pt"
    for path in (embeddings, weights, val_list):
        path.write_text("")
    overrides = ["data=folder", f"data.input_dir={images}", f"embeddings={embeddings}", f"checkpoint={checkpoint}",
                 f"model.weights={weights}", f"trainer.val_filenames_file={val_list}"]
    job = plan_job(hydra_config(tmp_path, overrides), overrides, 0)
    assert job.input_mounts == [InputMount(val_list, "/data/inputs/trainer.val_filenames_file/val.txt"),
                                InputMount(embeddings, "/data/inputs/embeddings/embeddings.csv"),
                                InputMount(weights, "/data/inputs/model.weights/resnet.pt")]
    command = parsed_overrides(job.command)
    assert command["embeddings"] == "/data/inputs/embeddings/embeddings.csv"
    assert command["model.weights"] == "/data/inputs/model.weights/resnet.pt"
    assert command["trainer.val_filenames_file"] == "/data/inputs/trainer.val_filenames_file/val.txt"
    assert command["checkpoint"] == "/data/output/earlier/best.pt"  # under work_dir: no mount of its own
    assert all(read_only for target, (_, read_only) in mounts_of(job).items() if target.startswith("/data/inputs/"))

    named = ["data=folder", f"data.input_dir={images}", "model.weights=ResNet18_Weights.IMAGENET1K_V1"]
    job = plan_job(hydra_config(tmp_path, named), named, 0)
    assert job.input_mounts == []
    assert "model.weights=ResNet18_Weights.IMAGENET1K_V1" in job.command


# ---------------------------------------------------------------------------------------------
# Real sweeps on the engine
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def docker_client():
    try:
        import docker
    except ImportError:
        unavailable("the docker package is not installed (pip install 'thresher[docker]')")
    try:
        client = docker.from_env()
        client.ping()
    except docker.errors.DockerException as error:
        unavailable(f"no Docker engine reachable: {error}")
    try:
        client.images.get(IMAGE)
    except docker.errors.ImageNotFound:
        unavailable(f"image {IMAGE} is not built (docker build -t {IMAGE} .; .ci/run builds it)")
    return client


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """24 small PNGs in one sub-folder per class, the layout data=folder reads."""
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    for class_index, name in enumerate(("red", "green", "blue")):
        (root / name).mkdir()
        for index in range(8):
            colour = [30 + 20 * index] * 3
            colour[class_index] = 255
            Image.new("RGB", (32, 32), tuple(colour)).save(root / name / f"{name}_{index}.png")
    return root


def containers_labelled(client, label: str) -> list:
    return client.containers.list(all=True, filters={"label": label})


def remove_labelled(client, label: str) -> None:
    for container in containers_labelled(client, label):
        container.remove(force=True)


def the_sweep_dir(work_dir: Path) -> Path:
    found = list((work_dir / "multirun").iterdir())
    assert len(found) == 1, found
    return found[0]


@pytest.mark.docker
def test_a_two_job_sweep_runs_in_containers_and_gathers_a_summary(
        docker_client, image_folder, launcher_env, tmp_path):
    token = f"tok-{secrets.token_hex(16)}"
    label = f"thresher_test={uuid.uuid4().hex}"
    launcher_env["THRESHER_TOKEN"] = token
    try:
        process = thresher(["-m", "hydra/launcher=docker", "sampler=random,coreset",
                            "sampler.stopping_condition.n_samples=10", "data=folder",
                            f"data.input_dir={image_folder}", SELECT_ONLY, *TINY,
                            "hydra.launcher.max_parallel=2", f"+hydra.launcher.labels.{label}"],
                           launcher_env, tmp_path)
        assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
        assert containers_labelled(docker_client, label) == []  # removed once they ended
    finally:
        remove_labelled(docker_client, label)

    sweep_dir = the_sweep_dir(tmp_path / "runs")
    summary = json.loads((sweep_dir / "sweep_summary.json").read_text())
    assert [(row["job"], row["exit_code"], row["status"]) for row in summary["jobs"]] == \
        [(0, 0, "finished"), (1, 0, "finished")]
    for num, sampler in enumerate(("random", "coreset")):
        row = summary["jobs"][num]
        run_dir = sweep_dir / str(num)
        assert row["run_directory"] == str(run_dir)
        assert f"sampler={sampler}" in row["overrides"]
        assert row["metrics"]["select.n_selected"] == 10
        assert json.loads((run_dir / "summary.json").read_text())["status"] == "finished"
        assert len((run_dir / "filenames" / "sampled_filenames.txt").read_text().split()) == 10
        assert (run_dir / "container.log").stat().st_size > 0
        # The container got the token (thresher saves its placeholder), and the files are the user's.
        assert "token: '***'" in (run_dir / ".hydra" / "config.yaml").read_text()
        assert all(path.stat().st_uid == os.getuid() for path in run_dir.rglob("*"))
        assert f"[job {num}] " in process.stdout

    assert token not in process.stdout + process.stderr
    leaked = [path for path in tmp_path.rglob("*") if path.is_file() and token.encode() in path.read_bytes()]
    assert leaked == []


@pytest.mark.docker
def test_the_selection_benchmark_runs_its_jobs_in_containers_and_gathers_its_table_here(
        docker_client, image_folder, launcher_env, tmp_path):
    label = f"thresher_test={uuid.uuid4().hex}"
    try:
        process = thresher(["-m", "hydra/launcher=docker", "+experiment=selection_benchmark", "data=folder",
                            f"data.input_dir={image_folder}", *TINY, "trainer.epochs=1", "sampler=random,typical",
                            "sampler.stopping_condition.n_samples=0.5", "seed=1", "hydra.launcher.max_parallel=2",
                            f"+hydra.launcher.labels.{label}"], launcher_env, tmp_path)
        assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
    finally:
        remove_labelled(docker_client, label)

    sweep_dir = the_sweep_dir(tmp_path / "runs")
    with open(sweep_dir / "benchmark.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(row["sampler"], row["budget"], row["status"]) for row in rows] == [
        ("random", "0.5", "finished"), ("typical", "0.5", "finished")], rows
    assert all(0 <= float(row["value"]) <= 1 and row["key_metric"] == "val_top1" for row in rows)
    held_out = [json.loads((sweep_dir / str(job) / "report.json").read_text())["counts"]["held_out"]
                for job in (0, 1)]
    assert held_out[0] == held_out[1] > 0  # the same held-out images for every job
    assert (sweep_dir / "learning_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| typical |" in (sweep_dir / "benchmark.md").read_text()
    assert "# Selection benchmark: val_top1 by sampler and budget" in process.stdout


@pytest.mark.docker
def test_a_failing_job_is_listed_with_its_log_and_its_exit_code(docker_client, launcher_env, tmp_path):
    label = f"thresher_test={uuid.uuid4().hex}"
    try:
        # A value only torch refuses: the job's run rejects it before any stage (the host's preflight
        # composes and validates the sweep, so a plain config error would start no container).
        process = thresher(["-m", "hydra/launcher=docker", "sampler=random",
                            "+trainer.optimizer.params.betas=oops", *TINY,
                            f"+hydra.launcher.labels.{label}"], launcher_env, tmp_path)
        assert containers_labelled(docker_client, label) == []
    finally:
        remove_labelled(docker_client, label)

    assert process.returncode != 0
    sweep_dir = the_sweep_dir(tmp_path / "runs")
    log_path = sweep_dir / "0" / "container.log"
    assert "1 of 1 jobs failed" in process.stderr
    assert f"exit 2; log: {log_path}" in process.stderr
    assert "trainer.optimizer.params.betas='oops' is not allowed" in log_path.read_text()
    [row] = json.loads((sweep_dir / "sweep_summary.json").read_text())["jobs"]
    assert (row["status"], row["exit_code"]) == ("failed", 2)


@pytest.mark.docker
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_and_removes_every_container_of_the_sweep(docker_client, launcher_env, tmp_path, signum):
    label = f"thresher_test={uuid.uuid4().hex}"
    sweep = subprocess.Popen(
        [sys.executable, "-m", "app", "-m", "hydra/launcher=docker", "sampler=random,coreset",
         "sampler.stopping_condition.n_samples=10", "data.n_images=30", "data.shapes_image_size=48",
         "trainer.epochs=1000", *TINY, "hydra.launcher.max_parallel=2", f"+hydra.launcher.labels.{label}"],
        env=launcher_env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + SWEEP_TIMEOUT_S
        while len(docker_client.containers.list(filters={"label": label, "status": "running"})) < 2:
            assert sweep.poll() is None, sweep.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "the sweep's containers did not start"
            time.sleep(0.2)
        sweep.send_signal(signum)
        output, _ = sweep.communicate(timeout=180)
    finally:
        if sweep.poll() is None:
            sweep.kill()
            sweep.communicate()
        left_behind = containers_labelled(docker_client, label)
        remove_labelled(docker_client, label)

    assert left_behind == []
    assert sweep.returncode == 128 + signum, output[-3000:]
    assert f"sweep stopped by {signal.Signals(signum).name}: removed 2 container(s)" in output
    summary = json.loads((the_sweep_dir(tmp_path / "runs") / "sweep_summary.json").read_text())
    assert [row["status"] for row in summary["jobs"]] == ["interrupted", "interrupted"]


@pytest.mark.docker
def test_a_gpu_job_on_an_engine_without_the_nvidia_runtime_fails_alone_and_says_why(
        docker_client, launcher_env, tmp_path):
    if any("nvidia" in name for name in docker_client.info().get("Runtimes", {})):
        pytest.skip("this engine has the NVIDIA runtime")
    label = f"thresher_test={uuid.uuid4().hex}"
    try:
        process = thresher(["-m", "hydra/launcher=docker", "hydra.launcher.gpus_per_job=1",
                            "hydra.launcher.gpu_ids=[0]", *TINY, f"+hydra.launcher.labels.{label}"],
                           launcher_env, tmp_path)
        assert containers_labelled(docker_client, label) == []
    finally:
        remove_labelled(docker_client, label)
    assert process.returncode != 0
    assert "hydra.launcher.gpus_per_job=0 runs on CPU" in process.stderr
    [row] = json.loads((the_sweep_dir(tmp_path / "runs") / "sweep_summary.json").read_text())["jobs"]
    assert row["status"] == "failed" and row["gpus"] == ["0"]


@pytest.mark.docker
def test_a_sweep_over_oxford_pet_roots_mounts_each_jobs_own_root(docker_client, launcher_env, tmp_path):
    """data=oxford_pet reads data.root (no data.input_dir): each job of a sweep over two roots gets
    its own root mounted, and scans its own images."""
    from app.data.shapes import write_pet_layout

    small = write_pet_layout(tmp_path / "pets" / "small", 6, 32)
    large = write_pet_layout(tmp_path / "pets" / "large set", 9, 32)  # a space in the path
    label = f"thresher_test={uuid.uuid4().hex}"
    try:
        process = thresher(["-m", "hydra/launcher=docker", "data=oxford_pet", f"data.root='{small}','{large}'",
                            "stages=[scan]", *TINY, f"+hydra.launcher.labels.{label}"], launcher_env, tmp_path)
        assert containers_labelled(docker_client, label) == []
    finally:
        remove_labelled(docker_client, label)
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]

    summary = json.loads((the_sweep_dir(tmp_path / "runs") / "sweep_summary.json").read_text())
    assert [(row["status"], row["metrics"]["scan.n_images"]) for row in summary["jobs"]] == \
        [("finished", 6), ("finished", 9)]


@pytest.mark.docker
def test_coco_annotations_and_a_file_list_outside_the_image_folder_are_mounted(docker_client, launcher_env,
                                                                               tmp_path):
    """data.annotations and data.relevant_filenames_file in folders of their own: the container
    reads both (the scan reads the list, training the annotations)."""
    from app.data.shapes import generate_shapes

    images = tmp_path / "images"
    generate_shapes(images, 12, 32)
    labels = tmp_path / "coco labels"
    labels.mkdir()
    (images / "annotations.json").rename(labels / "train.json")
    lists = tmp_path / "lists"
    lists.mkdir()
    listed = sorted(str(p.relative_to(images)) for p in images.rglob("*.png"))[:9]
    (lists / "relevant.txt").write_text("\n".join(listed) + "\n")
    label = f"thresher_test={uuid.uuid4().hex}"
    try:
        process = thresher(["-m", "hydra/launcher=docker", "data=coco", f"data.input_dir={images}",
                            f"data.annotations='{labels / 'train.json'}'",
                            f"data.relevant_filenames_file={lists / 'relevant.txt'}",
                            "stages=[scan,train]", "trainer.epochs=1", "trainer.batch_size=4", *TINY,
                            f"+hydra.launcher.labels.{label}"], launcher_env, tmp_path)
        assert containers_labelled(docker_client, label) == []
    finally:
        remove_labelled(docker_client, label)
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]

    [row] = json.loads((the_sweep_dir(tmp_path / "runs") / "sweep_summary.json").read_text())["jobs"]
    assert row["status"] == "finished"
    assert row["metrics"]["scan.n_images"] == 9  # the list's nine, not the folder's twelve
    assert row["metrics"]["train.n_train"] + row["metrics"]["train.n_val"] == 9
    assert "from /data/inputs/data.annotations/train.json" in Path(row["log"]).read_text()
