"""A real Ray cluster in Docker (docker-compose.ray.yml: a head and two workers from the thresher
image): scan -> embed -> select with `executor=ray` from the compose file's driver gives the local
executor's artifacts, also when a worker is killed mid-embed.

Needs a Docker engine (under CI=true a missing one fails, elsewhere these tests skip) and an image
with Ray: test_docker.py's `image` fixture builds $THRESHER_IMAGE from this checkout with the extras
in $THRESHER_IMAGE_EXTRAS (default: ray), as .ci/run does, so the layer cache makes it cheap there.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest

from test_docker import (ROOT, docker, docker_compose, docker_engine, image, lines_of, mounts,  # noqa: F401 (fixtures)
                         read_summary, remove_container, tail, user_args)

pytestmark = [pytest.mark.docker, pytest.mark.slow]

COMPOSE_FILE = ROOT / "docker-compose.ray.yml"
WORKERS = ("ray-worker-1", "ray-worker-2")
# Big enough that the embed stage outlasts the first progress line by several seconds on 2 cores
# (the fault test kills a worker then), small enough that the file runs in a few minutes.
N_IMAGES = 600
SHAPES_IMAGE_SIZE = 64
# Small batches: the first progress line (batch 0, rows come back in order) leaves many to embed.
RUN = ["data=folder", "stages=[scan,embed,select]", "data.image_size=160", "sampler=coreset",
       "sampler.stopping_condition.n_samples=40", "sampler.batch_size=16", "ray.block_images=16"]
RUN_TIMEOUT_S = 900
EMBED_PROGRESS = re.compile(rb"embed: (\d+)/(\d+) img")


@pytest.fixture(scope="session")
def ray_image(image) -> str:
    """This checkout's image, which test_docker.py builds with Ray inside ($THRESHER_IMAGE_EXTRAS)."""
    return image


@pytest.fixture(scope="module")
def input_dir(tmp_path_factory) -> Path:
    """Shapes in class folders (data=folder), one truncated image and one byte-identical copy."""
    from app.data.shapes import generate_shapes

    root = tmp_path_factory.mktemp("ray-input")
    generate_shapes(root, N_IMAGES, SHAPES_IMAGE_SIZE, n_corrupt=1)
    (root / "annotations.json").unlink()
    shutil.copyfile(root / "circle" / "circle_00000.png", root / "circle" / "circle_copy.png")
    for path in [root, *root.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return root


def writable_folder(tmp_path_factory, name: str) -> Path:
    folder = tmp_path_factory.mktemp(name)
    folder.chmod(0o777)
    return folder


@pytest.fixture(scope="module")
def local_run(ray_image, input_dir, tmp_path_factory) -> Path:
    """The reference: the same job with executor=local, in the same image."""
    output_dir = writable_folder(tmp_path_factory, "local-output")
    name = f"thresher-test-{uuid.uuid4().hex[:12]}"
    try:
        process = docker("run", "--rm", "--name", name, "--shm-size", "1g", *user_args(),
                         *mounts(input_dir, output_dir), ray_image, *RUN, "executor=local",
                         "run_directory=/data/output/local", timeout=RUN_TIMEOUT_S)
    finally:
        remove_container(name)
    assert process.returncode == 0, tail(process.stdout + process.stderr)
    run_dir = output_dir / "local"
    assert read_summary(run_dir)["status"] == "finished"
    # The input has what the scan must catch, so the comparisons cover those lists too.
    from app.data.shapes import CLASSES

    corrupt = f"{CLASSES[(N_IMAGES - 1) % len(CLASSES)]}/corrupt_{N_IMAGES - 1:05d}.png"
    assert [line.split("\t")[0] for line in lines_of(run_dir / "filenames" / "corrupt_filenames.txt")] == [corrupt]
    assert len(lines_of(run_dir / "filenames" / "duplicate_filenames.txt")) == 1
    return run_dir


@dataclass
class Cluster:
    compose: List[str]
    project: str
    env: Dict[str, str]
    output_dir: Path

    def run(self, *args: str, timeout: float = RUN_TIMEOUT_S) -> subprocess.CompletedProcess:
        return subprocess.run([*self.compose, "--project-directory", str(ROOT), "--file", str(COMPOSE_FILE),
                               "--project-name", self.project, *args],
                              capture_output=True, timeout=timeout, env=self.env)

    def container(self, service: str) -> str:
        found = self.run("ps", "--quiet", service, timeout=120).stdout.decode().split()
        assert len(found) == 1, f"{service}: containers {found}"
        return found[0]

    def alive_nodes(self) -> int:
        process = docker("exec", self.container("ray-head"), "python", "-c",
                         "import ray; ray.init(address='auto', logging_level='ERROR'); "
                         "print(sum(1 for node in ray.nodes() if node['Alive']))", timeout=120)
        return int(process.stdout.split()[-1]) if process.returncode == 0 and process.stdout.strip() else 0


@pytest.fixture(scope="module")
def cluster(ray_image, docker_compose, input_dir, tmp_path_factory):
    """docker-compose.ray.yml's head and two workers, up until the head counts all three nodes;
    taken down (volumes included) after the module's tests."""
    output_dir = writable_folder(tmp_path_factory, "cluster-output")
    env = {key: value for key, value in os.environ.items() if not key.startswith("THRESHER_")}
    env.update(THRESHER_IMAGE=ray_image, THRESHER_INPUT=str(input_dir), THRESHER_OUTPUT=str(output_dir),
               THRESHER_USER=f"{os.getuid()}:{os.getgid()}" if os.getuid() != 0 else "4242:4242")
    cluster = Cluster(docker_compose, f"thresher-ray-{uuid.uuid4().hex[:8]}", env, output_dir)
    try:
        up = cluster.run("up", "--detach", "ray-head", *WORKERS, timeout=600)
        assert up.returncode == 0, tail(up.stdout + up.stderr)
        deadline = time.monotonic() + 300
        while cluster.alive_nodes() < 1 + len(WORKERS):
            if time.monotonic() > deadline:
                logs = cluster.run("logs", "--tail", "30", timeout=120)
                pytest.fail(f"the Ray cluster did not reach 3 nodes within 300 s:\n{tail(logs.stdout)}",
                            pytrace=False)
            time.sleep(1)
        yield cluster
    finally:
        cluster.run("down", "--volumes", "--remove-orphans", "--timeout", "5", timeout=300)


def assert_same_artifacts(run_dir: Path, reference: Path) -> None:
    """The local executor's files: the same lists and rows byte for byte, the same vectors within
    float rounding, the same picks."""
    for name in ("data/input_files.csv", "data/embedding_rows.csv"):
        assert (run_dir / name).read_bytes() == (reference / name).read_bytes(), f"{name} differs"
    lists = sorted(path.name for path in (reference / "filenames").glob("*.txt"))
    assert sorted(path.name for path in (run_dir / "filenames").glob("*.txt")) == lists
    for name in lists:
        assert lines_of(run_dir / "filenames" / name) == lines_of(reference / "filenames" / name), f"{name} differs"
    assert len(lines_of(reference / "filenames" / "sampled_filenames.txt")) == 40
    embeddings, expected = np.load(run_dir / "data" / "embeddings.npy"), np.load(reference / "data" / "embeddings.npy")
    # N_IMAGES + the copy, less the copy (a duplicate) and the last image (corrupt)
    assert embeddings.shape == expected.shape == (N_IMAGES - 1, 512)
    np.testing.assert_allclose(embeddings, expected, rtol=0, atol=1e-5)


def test_the_compose_cluster_runs_scan_embed_select_with_the_local_artifacts(cluster, local_run):
    process = cluster.run("run", "--rm", "-T", "thresher", *RUN, "run_directory=/data/output/cluster")
    assert process.returncode == 0, tail(process.stdout + process.stderr)

    run_dir = cluster.output_dir / "cluster"
    summary = read_summary(run_dir)
    assert summary["status"] == "finished"
    # The compose cluster's four nodes (head, two workers, the driver's own) and their 3 CPUs.
    assert b"ray: auto: 4 node(s), 3 CPUs" in process.stdout + process.stderr
    assert_same_artifacts(run_dir, local_run)


def test_a_worker_killed_mid_embed_loses_and_duplicates_no_rows(cluster, local_run):
    name = f"{cluster.project}-driver-{uuid.uuid4().hex[:6]}"
    workers = [cluster.container(service) for service in WORKERS]
    try:
        started = cluster.run("run", "--detach", "--name", name, "thresher", *RUN,
                              "run_directory=/data/output/fault", timeout=300)
        assert started.returncode == 0, tail(started.stdout + started.stderr)
        wait_for_embedding_to_progress(name)
        victim = worker_with_an_embed_actor(workers)
        docker("kill", victim, timeout=60, check=True)
        stages = read_summary(cluster.output_dir / "fault")["stages"]
        assert stages["embed"]["status"] == "running", "the embed stage ended before the kill: embed more images"

        exit_code = docker("wait", name, timeout=RUN_TIMEOUT_S, check=True).stdout.strip()
        logs = docker("logs", name)
    finally:
        remove_container(name)
    assert exit_code == b"0", tail(logs.stdout + logs.stderr)
    assert read_summary(cluster.output_dir / "fault")["status"] == "finished"
    assert_same_artifacts(cluster.output_dir / "fault", local_run)


def wait_for_embedding_to_progress(name: str, timeout_s: float = 600) -> None:
    """Poll the driver's log until the embed stage reports its first embedded batch (the actors are
    up and working, and images remain); fail if the driver ends or embeds everything first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        logs = docker("logs", name, timeout=60)
        for done, total in EMBED_PROGRESS.findall(logs.stdout + logs.stderr):
            if 0 < int(done) < int(total):
                return
            if int(done) == int(total):
                pytest.fail("the embed stage finished before the kill: embed more images", pytrace=False)
        state = json.loads(docker("inspect", "--format", "{{json .State}}", name, timeout=60).stdout)
        if not state["Running"]:
            pytest.fail(f"the driver ended before the embed stage progressed:\n{tail(logs.stdout + logs.stderr)}",
                        pytrace=False)
        time.sleep(0.2)
    pytest.fail(f"the embed stage reported no progress within {timeout_s}s", pytrace=False)


def worker_with_an_embed_actor(containers: List[str]) -> str:
    """A worker container running an embedding actor (Ray titles its process ray::MapWorker...), so
    the kill takes a model and its batches with it; else the first worker (its decode tasks)."""
    for container in containers:
        titles = docker("exec", container, "sh", "-c", "cat /proc/[0-9]*/cmdline 2>/dev/null", timeout=60)
        if b"MapWorker" in titles.stdout:
            return container
    return containers[0]
