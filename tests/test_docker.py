"""The Docker image and the compose file, exercised for real: build, run, stop, compose.

Needs a Docker engine. Under CI=true a missing engine fails these tests; elsewhere they skip.
The image is built once a session from this checkout (tag $THRESHER_IMAGE, thresher:latest by
default): from $THRESHER_BASE_IMAGE (or a local thresher-base:bookworm) when there is one, and
offline (PIP_NO_INDEX=1) when wheelhouse/ holds wheels; see .ci/run and scripts/.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import time
import uuid
from pathlib import Path
from typing import Dict, List, Optional

import pytest

pytestmark = pytest.mark.docker

from conftest import unavailable

ROOT = Path(__file__).resolve().parents[1]
IMAGE = os.environ.get("THRESHER_IMAGE", "thresher:latest")
LOCAL_BASE_IMAGE = "thresher-base:bookworm"
CLASSES = ("red", "green", "blue")
IMAGES_PER_CLASS = 12
RANDOM_20 = ["data=folder", "sampler=random", "sampler.stopping_condition.n_samples=20"]
QUICK_RUN = [*RANDOM_20, "trainer.epochs=1"]
RUN_TIMEOUT_S = 900
STOP_TIMEOUT_S = 30


def docker(*args: str, timeout: float = RUN_TIMEOUT_S, env: Optional[Dict[str, str]] = None,
           check: bool = False) -> subprocess.CompletedProcess:
    """Run the docker CLI, capturing stdout and stderr as bytes."""
    process = subprocess.run(["docker", *args], capture_output=True, timeout=timeout, env=env)
    if check and process.returncode != 0:
        pytest.fail(f"docker {' '.join(args[:2])} ... exited {process.returncode}:\n"
                    f"{tail(process.stdout + process.stderr)}", pytrace=False)
    return process


def tail(output: bytes, lines: int = 60) -> str:
    return "\n".join(output.decode(errors="replace").splitlines()[-lines:])


def image_exists(name: str) -> bool:
    return docker("image", "inspect", name, timeout=60).returncode == 0


def remove_container(name: str) -> None:
    subprocess.run(["docker", "rm", "--force", name], capture_output=True, timeout=120)


def container_name() -> str:
    return f"thresher-test-{uuid.uuid4().hex[:12]}"


def user_args() -> List[str]:
    """Run as the host user, so the test can read and delete what the container writes; as root,
    keep the image's own non-root user (the output folders are world-writable)."""
    return [] if os.getuid() == 0 else ["--user", f"{os.getuid()}:{os.getgid()}"]


def mounts(input_dir: Path, output_dir: Path) -> List[str]:
    return ["--volume", f"{input_dir}:/data/input:ro", "--volume", f"{output_dir}:/data/output"]


def run_directories(output_dir: Path) -> List[Path]:
    return sorted(summary.parent for summary in output_dir.rglob("summary.json"))


def the_run_directory(output_dir: Path) -> Path:
    found = run_directories(output_dir)
    assert len(found) == 1, f"expected one run directory under {output_dir}, found {found}"
    return found[0]


def read_summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def lines_of(path: Path) -> List[str]:
    return [line for line in path.read_text().splitlines() if line.strip()]


def files_containing(root: Path, needle: bytes) -> List[Path]:
    return [path for path in root.rglob("*") if path.is_file() and needle in path.read_bytes()]


# ---------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def docker_engine() -> None:
    if shutil.which("docker") is None:
        unavailable("no docker CLI on PATH")
    try:
        info = docker("info", "--format", "{{.ServerVersion}}", timeout=60)
    except subprocess.TimeoutExpired:
        unavailable("`docker info` did not answer within 60 s")
    if info.returncode != 0:
        unavailable(f"no Docker engine reachable: {tail(info.stderr, 3)}")


def image_extras() -> str:
    """$THRESHER_IMAGE_EXTRAS (comma-separated extras of pyproject.toml), always with ray."""
    extras = [name.strip() for name in os.environ.get("THRESHER_IMAGE_EXTRAS", "ray").split(",") if name.strip()]
    return ",".join(extras if "ray" in extras else [*extras, "ray"])


@pytest.fixture(scope="session")
def image(docker_engine) -> str:
    """This checkout's image, built (or found up to date in the layer cache) once a session, with the
    extras in $THRESHER_IMAGE_EXTRAS (default ray: tests/test_ray_cluster.py runs a cluster of it),
    as .ci/run builds it, so the layer cache serves both."""
    command = ["build", "--tag", IMAGE, "--build-arg", f"EXTRAS={image_extras()}"]
    base_image = os.environ.get("THRESHER_BASE_IMAGE") or (
        LOCAL_BASE_IMAGE if image_exists(LOCAL_BASE_IMAGE) else None)
    if base_image:
        command += ["--build-arg", f"BASE_IMAGE={base_image}"]
    offline = any((ROOT / "wheelhouse").glob("*.whl"))
    if offline:
        command += ["--build-arg", "PIP_NO_INDEX=1"]
    built = docker(*command, str(ROOT), timeout=3600)
    if built.returncode != 0:
        hint = (f"\n(offline builds need the extras' wheels: EXTRAS={image_extras()} scripts/make-wheelhouse.sh)"
                if offline else "\n(no wheelhouse/: the build installs from the package index; where containers "
                                "cannot reach it, run scripts/make-wheelhouse.sh first, as .ci/run does)")
        pytest.fail(f"docker build exited {built.returncode}:\n{tail(built.stdout + built.stderr)}{hint}",
                    pytrace=False)
    return IMAGE


@pytest.fixture(scope="session")
def input_dir(tmp_path_factory) -> Path:
    """A few dozen small PNGs in one sub-folder per class, the layout data=folder reads."""
    from PIL import Image, ImageDraw
    import numpy as np

    root = tmp_path_factory.mktemp("input")
    rng = np.random.default_rng(0)
    for class_index, class_name in enumerate(CLASSES):
        (root / class_name).mkdir()
        for index in range(IMAGES_PER_CLASS):
            pixels = rng.integers(0, 80, size=(32, 32, 3), dtype=np.uint8)
            picture = Image.fromarray(pixels)
            colour = [40, 40, 40]
            colour[class_index] = 255
            x, y = rng.integers(2, 14, size=2)
            ImageDraw.Draw(picture).ellipse([x, y, x + 16, y + 16], fill=tuple(colour))
            picture.save(root / class_name / f"{class_name}_{index:02d}.png")
    root.chmod(0o755)
    return root


@pytest.fixture
def output_dir(tmp_path) -> Path:
    """An empty folder the container's user, whoever that is, can write."""
    output = tmp_path / "output"
    output.mkdir()
    output.chmod(0o777)
    return output


@pytest.fixture(scope="session")
def docker_compose(docker_engine) -> List[str]:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if docker("compose", "version", timeout=60).returncode == 0:
        return ["docker", "compose"]
    unavailable("neither docker-compose nor `docker compose` is installed")


# ---------------------------------------------------------------------------------------------
# docker run
# ---------------------------------------------------------------------------------------------
def test_run_writes_a_finished_run_to_the_output_mount_and_never_the_token(image, input_dir, output_dir):
    token = f"tok-{secrets.token_hex(16)}"
    name = container_name()
    try:
        process = docker("run", "--rm", "--name", name, *user_args(), *mounts(input_dir, output_dir),
                         "--env", f"THRESHER_TOKEN={token}", image, *QUICK_RUN)
    finally:
        remove_container(name)
    assert process.returncode == 0, tail(process.stdout + process.stderr)

    run_dir = the_run_directory(output_dir)
    assert read_summary(run_dir)["status"] == "finished"
    assert len(lines_of(run_dir / "filenames" / "sampled_filenames.txt")) == 20
    for artifact in ("data/input_files.csv", "checkpoints/last.pt", "metrics.json", ".hydra/config.yaml"):
        assert (run_dir / artifact).is_file(), f"{artifact} missing from {run_dir}"

    assert token.encode() not in process.stdout
    assert token.encode() not in process.stderr
    assert files_containing(output_dir, token.encode()) == []


def test_scores_from_an_earlier_runs_checkpoint_drive_the_selection_in_a_container(image, input_dir, output_dir):
    """Issue 17's pieces in the image: a lightly.* key, typical with known-label balance and a held-out
    fifth that trains a best.pt; then that checkpoint scores a second run, whose hybrid sampler and
    predicted-label balance read the scores."""
    def run(*overrides: str) -> subprocess.CompletedProcess:
        name = container_name()
        try:
            return docker("run", "--rm", "--name", name, *user_args(), *mounts(input_dir, output_dir), image,
                          "data=folder", "hardware=cpu", "data.image_size=32", "trainer.epochs=1",
                          "data.holdout_fraction=0.2", *overrides)
        finally:
            remove_container(name)

    first = run("lightly.loader.batch_size=8", "sampler=typical", "sampler.balance=known",
                "sampler.stopping_condition.n_samples=9", "note=first")
    assert first.returncode == 0, tail(first.stdout + first.stderr)
    assert b"lightly.loader.batch_size=8 -> sampler.batch_size=8" in first.stdout + first.stderr
    [first_dir] = [path for path in run_directories(output_dir) if path.name.endswith("_first")]
    select = read_summary(first_dir)["stages"]["select"]
    assert select["picks_per_class"] == {name: 3 for name in CLASSES}
    checkpoint = f"/data/output/{first_dir.relative_to(output_dir)}/checkpoints/best.pt"

    second = run("scorer=margin", f"scorer.checkpoint={checkpoint}", "sampler=hybrid",
                 "sampler.balance=predicted", "sampler.stopping_condition.n_samples=6",
                 "stages=[scan,embed,score,select]", "note=second")
    assert second.returncode == 0, tail(second.stdout + second.stderr)
    [second_dir] = [path for path in run_directories(output_dir) if path.name.endswith("_second")]
    summary = read_summary(second_dir)
    held_out = set(lines_of(second_dir / "data/holdout_files.csv")[1:])
    scored = lines_of(second_dir / "data/scores.csv")
    assert scored[0] == "filenames,score,predicted_label" and len(scored) - 1 == summary["stages"]["score"]["n_scored"]
    assert not held_out & {line.split(",")[0] for line in scored[1:]}  # held-out images are never scored
    picked = lines_of(second_dir / "filenames/sampled_filenames.txt")
    assert len(picked) == 6 and summary["stages"]["select"]["balance"] == "predicted"
    assert "scored" in (second.stdout + second.stderr).decode() and (second_dir / "plots/scores_histogram.png").is_file()


def test_docker_default_small_shm_with_loader_workers_warns_and_trains_without_a_bus_error(
        image, input_dir, output_dir):
    name = container_name()
    try:
        # No --shm-size: Docker's 64 MB /dev/shm cannot hold 2 workers' batches of 224 px images.
        process = docker("run", "--rm", "--name", name, *user_args(), *mounts(input_dir, output_dir), image,
                         "data=folder", "sampler=none", "trainer.epochs=1", "data.image_size=224",
                         "trainer.batch_size=16", "hardware=cpu", "hardware.num_workers=2")
    finally:
        remove_container(name)
    output = (process.stdout + process.stderr).decode(errors="replace")
    assert process.returncode == 0, tail(process.stdout + process.stderr)
    assert "/dev/shm has" in output and "--shm-size" in output
    assert "Bus error" not in output
    assert read_summary(the_run_directory(output_dir))["stages"]["train"]["status"] == "finished"


def test_docker_stop_interrupts_a_run_cleanly_with_exit_143(image, input_dir, output_dir):
    name = container_name()
    try:
        docker("run", "--detach", "--name", name, *user_args(), *mounts(input_dir, output_dir),
               image, *RANDOM_20, "trainer.epochs=500", timeout=120, check=True)
        wait_for_stage_to_run(name, output_dir, "train")

        # SIGTERM, then SIGKILL after STOP_TIMEOUT_S: exit 137 would mean SIGTERM was ignored.
        docker("stop", "--time", str(STOP_TIMEOUT_S), name, timeout=STOP_TIMEOUT_S + 60, check=True)
        state = json.loads(docker("inspect", "--format", "{{json .State}}", name, check=True).stdout)
        logs = docker("logs", name)
    finally:
        remove_container(name)

    assert state["ExitCode"] == 143, f"exit code {state['ExitCode']}:\n{tail(logs.stdout + logs.stderr)}"
    assert not state["OOMKilled"]
    summary = read_summary(the_run_directory(output_dir))
    assert summary["status"] == "interrupted"
    assert summary["stages"]["train"]["status"] == "interrupted"


def wait_for_stage_to_run(name: str, output_dir: Path, stage: str, timeout_s: float = 600) -> None:
    """Poll the run's summary.json until `stage` is running; fail if the container ends first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for run_dir in run_directories(output_dir):
            try:
                stages = read_summary(run_dir).get("stages", {})
            except (OSError, json.JSONDecodeError):
                continue
            if stages.get(stage, {}).get("status") == "running":
                return
        running = docker("inspect", "--format", "{{.State.Running}}", name, timeout=60)
        if running.stdout.strip() != b"true":
            logs = docker("logs", name)
            pytest.fail(f"the container ended before stage {stage} ran:\n"
                        f"{tail(logs.stdout + logs.stderr)}", pytrace=False)
        time.sleep(0.2)
    pytest.fail(f"stage {stage} did not start within {timeout_s}s", pytrace=False)


def test_outputs_written_under_another_uid_are_readable_on_the_host(image, input_dir, output_dir):
    """The container's UID is rarely the host user's: results must not be private to it."""
    name = container_name()
    try:
        process = docker("run", "--rm", "--name", name, "--user", "4242:4242",
                         *mounts(input_dir, output_dir), image, *RANDOM_20,
                         "stages=[scan,embed,select]")
    finally:
        remove_container(name)
    assert process.returncode == 0, tail(process.stdout + process.stderr)
    # The selection report's plots load matplotlib: its font cache comes built with the image and
    # is used as it is under this UID (no rebuild, no "not a writable directory" warning).
    assert re.findall(rb".*(?:fontManager|font cache|Matplotlib created a temporary|not a writable directory).*",
                      process.stdout + process.stderr) == []

    run_dir = the_run_directory(output_dir)
    private = sorted(str(path.relative_to(run_dir)) for path in run_dir.rglob("*")
                     if path.is_file() and not path.stat().st_mode & 0o004)
    assert private == [], f"not readable by other users: {private}"


def test_a_misspelled_override_exits_2_with_one_line_on_stderr(image):
    name = container_name()
    try:
        process = docker("run", "--rm", "--name", name, image, "sampler.stopping_condition.n_sample=3",
                         timeout=300)
    finally:
        remove_container(name)
    stderr_lines = process.stderr.decode().strip().splitlines()
    assert process.returncode == 2, tail(process.stdout + process.stderr)
    assert len(stderr_lines) == 1, process.stderr.decode()
    assert "n_sample" in stderr_lines[0]
    assert "Traceback" not in process.stdout.decode() + process.stderr.decode()


def test_image_runs_as_a_non_root_user_with_the_data_folders_configured(image):
    config = json.loads(docker("image", "inspect", "--format", "{{json .Config}}", image, check=True).stdout)
    assert config["User"] not in ("", "0", "root", "0:0")
    assert config["Entrypoint"] == ["thresher"]
    environment = dict(item.split("=", 1) for item in config["Env"])
    assert environment["THRESHER_INPUT_DIR"] == "/data/input"
    assert environment["THRESHER_WORK_DIR"] == "/data/output"
    assert environment["PYTHONUNBUFFERED"] == "1"
    for label in ("title", "description", "licenses", "version"):
        assert config["Labels"].get(f"org.opencontainers.image.{label}")


# ---------------------------------------------------------------------------------------------
# docker-compose
# ---------------------------------------------------------------------------------------------
def compose_environment(input_dir: Path, output_dir: Path, **extra: str) -> Dict[str, str]:
    environment = {key: value for key, value in os.environ.items() if not key.startswith("THRESHER_")}
    environment.update(THRESHER_IMAGE=IMAGE, THRESHER_INPUT=str(input_dir),
                       THRESHER_OUTPUT=str(output_dir), **extra)
    return environment


def compose(docker_compose: List[str], project: str, *args: str, env: Dict[str, str],
            timeout: float = RUN_TIMEOUT_S) -> subprocess.CompletedProcess:
    return subprocess.run([*docker_compose, "--project-directory", str(ROOT), "--file",
                           str(ROOT / "docker-compose.yml"), "--project-name", project, *args],
                          capture_output=True, timeout=timeout, env=env)


def test_compose_file_is_accepted_and_reserves_gpus_only_in_the_gpu_profile(docker_compose, tmp_path):
    import yaml

    env = compose_environment(tmp_path, tmp_path)
    config = compose(docker_compose, "thresher-config", "--profile", "gpu", "config", env=env, timeout=120)
    assert config.returncode == 0, tail(config.stdout + config.stderr)
    services = yaml.safe_load(config.stdout)["services"]

    reserving_gpus = {name for name, service in services.items()
                      if service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices")}
    assert reserving_gpus == {"select-train-gpu", "profile-gpu"}
    assert services["select-train-gpu"]["profiles"] == services["profile-gpu"]["profiles"] == ["gpu"]
    for name in ("select", "select-train", "profile"):
        assert "profiles" not in services[name], f"{name} must run on a plain, CPU-only host"
        assert services[name]["init"] is True
        assert any(mounts_input_read_only(volume) for volume in services[name]["volumes"]), \
            services[name]["volumes"]


def mounts_input_read_only(volume) -> bool:
    """A volume of `docker-compose config` (v1: "src:dst:ro"; v2: a mapping)."""
    if isinstance(volume, str):
        return volume.endswith(":/data/input:ro")
    return volume.get("target") == "/data/input" and volume.get("read_only") is True


def test_compose_select_service_selects_without_training_under_any_uid(
        docker_compose, image, input_dir, output_dir):
    token = f"tok-{secrets.token_hex(16)}"
    project = f"thresher-test-{uuid.uuid4().hex[:8]}"
    env = compose_environment(input_dir, output_dir, THRESHER_TOKEN=token, THRESHER_USER="4242:4242")
    try:
        process = compose(docker_compose, project, "run", "--rm", "-T", "select",
                          "sampler.stopping_condition.n_samples=20", env=env)
    finally:
        compose(docker_compose, project, "down", "--remove-orphans", env=env, timeout=120)
    assert process.returncode == 0, tail(process.stdout + process.stderr)

    run_dir = the_run_directory(output_dir)
    summary = read_summary(run_dir)
    assert summary["status"] == "finished"
    assert summary["stages_requested"] == ["scan", "embed", "select"]
    assert len(lines_of(run_dir / "filenames" / "sampled_filenames.txt")) == 20
    assert not (run_dir / "checkpoints").exists()
    assert token.encode() not in process.stdout + process.stderr
    assert files_containing(output_dir, token.encode()) == []


def test_compose_profile_service_profiles_the_pets_preset_in_a_container(docker_compose, image, tmp_path, output_dir):
    """The detection profiler's job, on shapes written in the Oxford-IIIT Pet layout."""
    from app.data.shapes import write_pet_layout

    pets = write_pet_layout(tmp_path / "oxford-iiit-pet", n_images=10, image_size=64)
    for path in [pets, *pets.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    token = f"tok-{secrets.token_hex(16)}"
    project = f"thresher-test-{uuid.uuid4().hex[:8]}"
    env = compose_environment(pets, output_dir, THRESHER_TOKEN=token, THRESHER_USER="4242:4242")
    try:
        process = compose(docker_compose, project, "run", "--rm", "-T", "profile", "hardware=cpu",
                          "data.image_size=64", "profile.batch_sizes=[1,2]", "profile.num_workers=[0,1]",
                          "profile.warmup_steps=1", "profile.steps=2", env=env)
    finally:
        compose(docker_compose, project, "down", "--remove-orphans", env=env, timeout=120)
    assert process.returncode == 0, tail(process.stdout + process.stderr)

    run_dir = the_run_directory(output_dir)
    assert run_dir.name.endswith("_profile_fasterrcnn_pets")
    summary = read_summary(run_dir)
    assert summary["status"] == "finished" and summary["stages_requested"] == ["profile"]
    profile = json.loads((run_dir / "report.json").read_text())["profile"]
    assert profile["model"] == "fasterrcnn_resnet50_fpn" and profile["n_images"] == 10
    assert [(row["batch_size"], row["num_workers"], row["status"]) for row in profile["settings"]] == [
        (1, 0, "ok"), (2, 0, "ok"), (1, 1, "ok"), (2, 1, "ok")]
    # Docker's default /dev/shm is raised to 2 GB by the compose file, so the workers really ran
    assert [row["num_workers_used"] for row in profile["settings"]] == [0, 0, 1, 1]
    assert b"profile: recommended: trainer.batch_size=" in process.stdout + process.stderr
    for plot in profile["plots"]:
        assert (run_dir / plot).is_file()
    assert token.encode() not in process.stdout + process.stderr
    assert files_containing(output_dir, token.encode()) == []
