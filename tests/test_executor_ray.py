"""executor=ray on a Ray started for the run (no Docker): scan, embed and select give the same
artifacts as executor=local on a messy folder, and the cluster's keys are checked before any work.
The compose cluster's test is tests/test_ray_cluster.py."""
from __future__ import annotations

import os
import shutil
import zlib
from pathlib import Path

import numpy as np
import pytest

from conftest import compose, only_run_dir, require_module, summary_of, thresher



def make_messy_folder(root: Path) -> Path:
    """Three classes of small images with what users' folders hold: a truncated file, an empty
    one, an exact copy, a name that is not UTF-8, a name with a comma and a quote, a nested folder."""
    from PIL import Image

    rng = np.random.default_rng(3)
    for label, colour in enumerate(("red", "green", "blue")):
        folder = root / colour
        (folder / "deeper").mkdir(parents=True)
        for i in range(24):
            pixels = rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8)
            pixels[..., label] = 255
            Image.fromarray(pixels).save(folder / ("deeper" if i % 5 == 0 else ".") / f"img_{i:02d}.png")
    shutil.copy(root / "red" / "img_01.png", root / "blue" / "copy_of_red_01.png")
    (root / "green" / "truncated.png").write_bytes((root / "green" / "img_02.png").read_bytes()[:60])
    (root / "green" / "empty.jpg").write_bytes(b"")
    Image.fromarray(rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)).save(root / "blue" / 'a,b"c.png')
    with open(os.path.join(os.fsencode(root / "red"), b"caf\xe9.png"), "wb") as handle:
        handle.write((root / "red" / "img_03.png").read_bytes()[:-1] + bytes([zlib.crc32(b"x") & 0xFF]))
    Image.fromarray(rng.integers(0, 256, (22, 22, 3), dtype=np.uint8)).save(
        os.path.join(os.fsencode(root / "red"), b"\xff\xfename.png"))
    return root


SAME_FILES = ["data/input_files.csv", "data/dataset.json", "data/embedding_rows.csv", "data/selection.csv",
              "filenames/corrupt_filenames.txt", "filenames/duplicate_filenames.txt",
              "filenames/unused_filenames.txt", "filenames/sampled_filenames.txt",
              "filenames/removed_filenames.txt"]


@pytest.fixture(scope="module")
def local_and_ray_runs(tmp_path_factory):
    """The same selection run twice on one messy folder: executor=local, then executor=ray."""
    require_module("ray", "pip install -e '.[ray]'")
    base = tmp_path_factory.mktemp("executors")
    folder = make_messy_folder(base / "images")
    env = {k: v for k, v in os.environ.items() if not k.startswith("THRESHER_")}
    env.update(THRESHER_CACHE_DIR=str(base / "cache"), PYTHONUNBUFFERED="1")
    common = ["data=folder", f"data.input_dir={folder}", "data.image_size=32", "stages=[scan,embed,select]",
              "sampler.stopping_condition.n_samples=0.25", "sampler.batch_size=16", "hardware=cpu"]
    runs = {}
    for executor in ("local", "ray"):
        work = base / executor
        extra = ["executor=ray", "ray.num_cpus=2"] if executor == "ray" else []
        result = thresher([*common, *extra, f"work_dir={work}"], env, base, timeout=600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        runs[executor] = (only_run_dir(work), result.stdout + result.stderr)
    return runs


@pytest.mark.slow
def test_ray_gives_the_local_runs_artifacts_on_a_messy_folder(local_and_ray_runs):
    local, ray_run = local_and_ray_runs["local"][0], local_and_ray_runs["ray"][0]
    for name in SAME_FILES:
        assert (ray_run / name).read_bytes() == (local / name).read_bytes(), name
    corrupt = (local / "filenames/corrupt_filenames.txt").read_text(errors="surrogateescape")
    assert "truncated.png" in corrupt and "empty.jpg" in corrupt
    assert "copy_of_red_01.png" in (local / "filenames/duplicate_filenames.txt").read_text()
    assert len((local / "data/input_files.csv").read_text().splitlines()) - 1 == 3 * 24 + 2 - 1
    unused = (local / "filenames/unused_filenames.txt").read_text()
    assert "red/caf\\xe9.png\tname is not valid UTF-8" in unused and unused.count("not valid UTF-8") == 2
    ours, theirs = np.load(ray_run / "data/embeddings.npy"), np.load(local / "data/embeddings.npy")
    assert ours.shape == theirs.shape == (73, 512)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)
    assert summary_of(ray_run)["stages"]["select"]["stopped_by"] == "n_samples"


@pytest.mark.slow
def test_ray_leaves_no_shared_scratch_file_and_says_where_it_ran(local_and_ray_runs):
    ray_run, output = local_and_ray_runs["ray"]
    assert not [p.name for p in (ray_run / "data").iterdir() if p.name.startswith(".")]
    assert "ray: a Ray started for this run: 1 node(s), 2 CPUs" in output
    assert "embed on ray: 2 actor(s) of resnet18, 0 GPU(s) and 1 CPU(s) each; images decoded by the actors" in output
    assert "Progress bars disabled" not in output and "execution finished" not in output


@pytest.mark.parametrize("overrides, message", [
    (["executor=ray", "ray.address=head"], "ray.address='head' is not allowed: use null"),
    (["executor=ray", "ray.address=ray://head:10001"], "ray.address='ray://head:10001' is not allowed: Ray Data, "
     "which executor=ray runs on, does not work through Ray Client (ray://): run thresher on a node of the cluster"),
    (["executor=ray", "ray.address=auto", "ray.num_cpus=2"], "ray.num_cpus=2 is not allowed: it sizes a Ray"),
    (["executor=ray", "ray.num_cpus_per_task=0"], "ray.num_cpus_per_task=0.0 is not allowed: use a number > 0"),
    (["executor=ray", "ray.embed_actors=0"], "ray.embed_actors=0 is not allowed"),
    (["executor.name=rey"], "executor.name='rey' is not allowed: choose from local, ray (did you mean ray?)"),
])
def test_the_cluster_keys_are_checked_before_any_work(overrides, message):
    require_module("ray", "pip install -e '.[ray]'")  # executor=ray is refused without Ray
    from app.config import validate
    from app.errors import UserError

    with pytest.raises(UserError, match=".*") as refused:
        validate(compose(*overrides))
    assert message in str(refused.value)


@pytest.mark.slow
def test_an_executor_group_typo_names_the_options(tmp_path, env):
    result = thresher(["executor=rai"], env, tmp_path, timeout=120)
    assert result.returncode == 2
    assert "executor=rai is not an option: choose from local, ray (did you mean ray?)" in result.stderr


@pytest.mark.slow
def test_an_address_nothing_listens_on_fails_at_once_with_one_line(tmp_path, env):
    require_module("ray", "pip install -e '.[ray]'")
    result = thresher(["executor=ray", "ray.address=127.0.0.1:9", "stages=[scan]", "data.n_images=12"], env,
                      tmp_path, timeout=240)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "ray.address='127.0.0.1:9': cannot reach the Ray cluster" in result.stderr
    assert "Traceback" not in result.stderr


def test_composing_an_executor_ray_config_imports_neither_ray_nor_torch():
    require_module("ray", "pip install -e '.[ray]'")
    import subprocess
    import sys

    code = ("import sys; sys.path.insert(0, 'tests'); from conftest import compose; from app.config import validate; "
            "validate(compose('executor=ray', 'ray.address=head:6379')); "
            "print(sorted(m for m in ('ray', 'torch') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stderr[-2000:]


@pytest.mark.parametrize("cluster, keys, plan", [
    ((2, 0, 1), {}, dict(actors=2, gpus=0.0, cpus=1.0, decode_tasks=False)),
    ((64, 8, 2), {}, dict(actors=8, gpus=1.0, cpus=1.0, decode_tasks=True)),
    ((4, 8, 1), {}, dict(actors=3, gpus=1.0, cpus=1.0, decode_tasks=True)),
    ((64, 2, 1), {"num_gpus_per_actor": 0.5}, dict(actors=4, gpus=0.5, cpus=1.0, decode_tasks=True)),
    ((64, 8, 2), {"embed_actors": 2, "num_cpus_per_actor": 4}, dict(actors=2, gpus=1.0, cpus=4.0, decode_tasks=True)),
    ((8, 1, 1), {"num_gpus_per_actor": 0}, dict(actors=8, gpus=0.0, cpus=1.0, decode_tasks=False)),
])
def test_the_embed_actors_fit_the_cluster_and_gpus_get_decode_tasks(cluster, keys, plan):
    from omegaconf import OmegaConf

    from app.executors import Executor
    from app.executors.ray_embed import embed_plan
    from app.executors.ray_session import ClusterResources
    from app.executors.schema import RayConfig

    ray_cfg = OmegaConf.merge(OmegaConf.structured(RayConfig), keys)
    assert embed_plan(Executor("ray", ray_cfg), ClusterResources(*cluster)) == plan


@pytest.mark.parametrize("cluster, keys, message", [
    ((2, 0, 1), {"embed_actors": 3}, "ray.embed_actors=3 with ray.num_cpus_per_actor=1 need 3 CPUs, and the cluster has 2"),
    ((8, 1, 1), {"embed_actors": 2}, "ray.embed_actors=2 with ray.num_gpus_per_actor=1 need 2 GPUs, and the cluster has 1"),
    ((1, 1, 1), {}, "and a decode task of ray.num_cpus_per_task=1 need 2 CPUs, and the cluster has 1"),
])
def test_embed_actors_the_cluster_cannot_hold_are_refused_with_the_figures(cluster, keys, message):
    from omegaconf import OmegaConf

    from app.errors import UserError
    from app.executors import Executor
    from app.executors.ray_embed import embed_plan
    from app.executors.ray_session import ClusterResources
    from app.executors.schema import RayConfig

    with pytest.raises(UserError) as refused:
        embed_plan(Executor("ray", OmegaConf.merge(OmegaConf.structured(RayConfig), keys)), ClusterResources(*cluster))
    assert message in str(refused.value)


@pytest.mark.slow
def test_the_sanity_check_reaches_the_cluster_and_its_workers_see_the_work_dir(tmp_path, env):
    require_module("ray", "pip install -e '.[ray]'")
    result = thresher(["sanity_check=true", "executor=ray", "ray.num_cpus=1", "data.n_images=12"], env, tmp_path,
                      timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert f"sanity check: ray         ok  1 node(s), 1 CPUs, 0 GPUs; the workers see {tmp_path / 'runs'}" in output
    assert not [p for p in (tmp_path / "runs").iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_sigterm_mid_embed_on_ray_stops_the_run_cleanly_and_it_resumes(tmp_path, env):
    """A Ray started for the run registers its own SIGTERM handler (kill Ray, exit 1); the run keeps
    thresher's: `docker stop` records the run as interrupted, exits 143, leaves no shared file, and a
    rerun finishes it."""
    from conftest import sigterm_once_written

    require_module("ray", "pip install -e '.[ray]'")
    run_dir = tmp_path / "runs" / "stopped"
    args = ["stages=[scan,embed,select]", "data.n_images=300", "data.image_size=64", "sampler.batch_size=8",
            "executor=ray", "ray.num_cpus=2", f"run_directory={run_dir}"]
    stopped = sigterm_once_written(args, env, tmp_path, run_dir / "data" / ".embedding_weights.pt", timeout=300)
    assert stopped.returncode == 143, stopped.stdout[-3000:]
    assert "stopped by SIGTERM; resume with run_directory=" in stopped.stdout
    summary = summary_of(run_dir)
    assert summary["status"] == "interrupted" and summary["stages"]["embed"]["status"] == "interrupted"
    assert not [p.name for p in (run_dir / "data").iterdir() if p.name.startswith(".")]

    resumed = thresher(args, env, tmp_path, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert summary_of(run_dir)["status"] == "finished"
    assert np.load(run_dir / "data" / "embeddings.npy").shape == (300, 512)
