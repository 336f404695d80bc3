"""Bucket input (data.input_dir=s3://bucket/prefix) against a real S3 API on loopback: moto in
server mode, started here, reached through s3fs exactly as a bucket in the cloud would be."""
from __future__ import annotations

import io
import json
import os
import secrets as token_source
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

from app.artifacts import read_input_files  # noqa: E402
from app.data import sources  # noqa: E402
from app.data.images import open_image  # noqa: E402
from app.data.scan import scan_stage  # noqa: E402
from conftest import thresher  # noqa: E402
from test_video import compose, input_files, lines, make_video  # noqa: E402

ACCESS_KEY = "thresher-test-key"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def s3_server():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    yield f"http://127.0.0.1:{server._port}"
    server.stop()


@pytest.fixture
def s3_secret() -> str:
    return f"s3-secret-{token_source.token_hex(12)}"


@pytest.fixture
def s3(s3_server, s3_secret, monkeypatch, tmp_path):
    """An s3fs filesystem on the loopback server, a fresh bucket, and the environment a user sets."""
    import s3fs

    from app import secrets

    monkeypatch.setattr(secrets, "_secret_values", set())
    monkeypatch.setattr(sources, "_sources", {})
    for name, value in (("AWS_ENDPOINT_URL", s3_server), ("AWS_ACCESS_KEY_ID", ACCESS_KEY),
                        ("AWS_SECRET_ACCESS_KEY", s3_secret), ("AWS_DEFAULT_REGION", "us-east-1"),
                        ("THRESHER_WORK_DIR", str(tmp_path / "runs"))):
        monkeypatch.setenv(name, value)
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem(key=ACCESS_KEY, secret=s3_secret, endpoint_url=s3_server)
    bucket = f"bucket-{token_source.token_hex(4)}"
    fs.mkdir(bucket)
    yield fs, bucket
    s3fs.S3FileSystem.clear_instance_cache()


def png_bytes(seed: int, size=(24, 32)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, size=(*size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def upload_images(fs, prefix: str, names, seed0: int = 0) -> None:
    fs.pipe({f"{prefix}/{name}": png_bytes(seed0 + i) for i, name in enumerate(names)})


def test_scan_reads_a_bucket_prefix_without_copying_it(s3, tmp_path):
    fs, bucket = s3
    upload_images(fs, f"{bucket}/data", ["a/1.png", "a/2.png", "b/3.png", "b/4.png"])
    fs.pipe(f"{bucket}/data/b/broken.png", png_bytes(9)[:60])
    fs.pipe(f"{bucket}/data/b/copy.png", fs.cat(f"{bucket}/data/a/1.png"))
    fs.pipe(f"{bucket}/data/.hidden/5.png", png_bytes(5))
    fs.pipe(f"{bucket}/other/6.png", png_bytes(6))  # beside the prefix, not under it
    fs.put(str(make_video(tmp_path / "clip.mp4", n_frames=10)), f"{bucket}/data/a/clip.mp4")
    run_dir = tmp_path / "run"
    result = scan_stage(compose(f"data.input_dir=s3://{bucket}/data"), run_dir)
    names = input_files(run_dir)
    assert names[:2] == ["a/1.png", "a/2.png"] and "a/clip-09-mp4.png" in names
    assert result.n_video_frames == 10 and len(names) == 4 + 10, "broken and copy left out"
    assert lines(run_dir / "filenames/corrupt_filenames.txt")[0].startswith("b/broken.png\ttruncated")
    assert lines(run_dir / "filenames/duplicate_filenames.txt") == ["b/copy.png\ta/1.png"]
    assert result.input_dir == f"s3://{bucket}/data"
    assert not list(tmp_path.rglob("*.png")), "nothing was copied to the local disk"
    assert open_image(Path(result.input_dir), "a/2.png").size == (32, 24), "a Path that spoilt the URL still works"
    frame = open_image(f"s3://{bucket}/data", "a/clip-04-mp4.png")
    assert frame.size == (64, 48)


@pytest.mark.slow
def test_listing_pages_through_more_than_a_thousand_objects(s3):
    fs, bucket = s3
    fs.pipe({f"{bucket}/many/notes/{i:04d}.txt": b"x" for i in range(1001)})
    upload_images(fs, f"{bucket}/many", ["z/last.png"])
    source = sources.Source(f"s3://{bucket}/many")
    listing = source.list_files({".png"})
    assert next(listing)[0] == "z/last.png", "found on the second page of list_objects_v2"
    assert list(listing) == []


def test_relevant_filenames_file_reads_only_the_listed_objects(s3, tmp_path, monkeypatch):
    fs, bucket = s3
    upload_images(fs, f"{bucket}/data", ["a/1.png", "a/2.png", "b/3.png"])
    listed = tmp_path / "relevant.txt"
    listed.write_text("a/2.png\nb/3.png\nb/absent.png\nnotes.txt\n")
    monkeypatch.setattr(sources.Source, "_list_objects", lambda self: pytest.fail("the bucket was listed"))
    run_dir = tmp_path / "run"
    result = scan_stage(compose(f"data.input_dir=s3://{bucket}/data", f"data.relevant_filenames_file={listed}"),
                        run_dir)
    assert input_files(run_dir) == ["a/2.png", "b/3.png"]
    missing = dict(line.split("\t") for line in lines(run_dir / "filenames/missing_filenames.txt"))
    assert missing == {"b/absent.png": "no such object", "notes.txt": "not an image or video file name"}
    assert result.n_missing == 2


def test_a_later_run_processes_only_new_and_changed_objects(s3, tmp_path):
    fs, bucket = s3
    upload_images(fs, f"{bucket}/data", ["1.png", "2.png", "3.png"])
    url = f"s3://{bucket}/data"
    work = f"work_dir={tmp_path / 'runs'}"
    first = scan_stage(compose(f"data.input_dir={url}", work), tmp_path / "one")
    assert first.n_images == 3 and first.n_already_seen == 0
    upload_images(fs, f"{bucket}/data", ["4.png"], seed0=40)
    fs.pipe(f"{bucket}/data/2.png", png_bytes(99))  # a new ETag: processed again
    second = scan_stage(compose(f"data.input_dir={url}", work), tmp_path / "two")
    assert input_files(tmp_path / "two") == ["2.png", "4.png"] and second.n_already_seen == 2
    from app.errors import UserError

    with pytest.raises(UserError, match="no new objects .* datasource.process_all=true"):
        scan_stage(compose(f"data.input_dir={url}", work), tmp_path / "three")
    everything = scan_stage(compose(f"data.input_dir={url}", work, "datasource.process_all=true"), tmp_path / "four")
    assert everything.n_images == 4 and everything.n_already_seen is None


def test_images_are_read_in_parallel_with_a_bounded_window():
    import threading
    import time

    in_flight, peak, lock = [0], [0], threading.Lock()

    def read(item):
        with lock:
            in_flight[0] += 1
            peak[0] = max(peak[0], in_flight[0])
        time.sleep(0.001)
        with lock:
            in_flight[0] -= 1
        return item * 2

    consumed = []
    for value in sources.bounded_map(read, range(200), workers=4, window=8):
        consumed.append(value)
    assert consumed == [2 * i for i in range(200)], "results in input order"
    assert 1 < peak[0] <= 4


@pytest.mark.slow
def test_a_run_from_bucket_to_bucket_on_the_command_line_keeps_the_credentials_secret(s3, s3_secret, env,
                                                                                     tmp_path):
    fs, bucket = s3
    upload_images(fs, f"{bucket}/data", [f"{c}/{i}.png" for c in "ab" for i in range(5)])
    fs.put(str(make_video(tmp_path / "clip.webm", n_frames=6, codec="libvpx-vp9")), f"{bucket}/data/a/clip.webm")
    secret_file = tmp_path / "aws_secret"
    secret_file.write_text(s3_secret + "\n")
    env = {k: v for k, v in env.items() if not k.startswith("AWS_")}
    env.update(AWS_ENDPOINT_URL=os.environ["AWS_ENDPOINT_URL"], AWS_ACCESS_KEY_ID=ACCESS_KEY,
               AWS_SECRET_ACCESS_KEY_FILE=str(secret_file), AWS_DEFAULT_REGION="us-east-1",
               THRESHER_STAGING_DIR=str(tmp_path / "staging"))
    result = thresher(["data=folder", f"data.input_dir=s3://{bucket}/data", f"work_dir=s3://{bucket}/runs",
                       "run_directory=first", "stages=[scan,embed,select]", "hardware=cpu", "data.image_size=32",
                       "sampler=coreset", "sampler.stopping_condition.n_samples=5"], env, tmp_path)
    assert result.returncode == 0, result.stderr
    staged = tmp_path / "staging" / "s3" / bucket / "runs" / "first"
    remote = f"{bucket}/runs/first"
    assert json.loads(fs.cat(f"{remote}/summary.json"))["status"] == "finished"
    assert fs.cat(f"{remote}/filenames/sampled_filenames.txt") == (staged / "filenames/sampled_filenames.txt").read_bytes()
    assert len(lines(staged / "filenames/sampled_filenames.txt")) == 5
    assert len(lines(staged / "data/embeddings.csv")) == 1 + 10 + 6, "images and video frames read from the bucket"
    assert fs.exists(f"{bucket}/runs/datasource/s3_{bucket}_data.json"), "what this run saw, for the next"
    assert fs.exists(f"{remote}/report.html") and fs.exists(f"{remote}/thresher.log")

    written = b"".join(fs.cat(key) for key in fs.find(remote)) + b"".join(
        p.read_bytes() for p in staged.rglob("*") if p.is_file())
    assert s3_secret.encode() not in written
    assert s3_secret not in result.stdout + result.stderr
    assert "${secret:AWS_SECRET_ACCESS_KEY,null}" in (staged / ".hydra/config.yaml").read_text()

    shutil.rmtree(tmp_path / "staging")  # a fresh container: the run is fetched from the bucket first
    again = thresher(["data=folder", f"data.input_dir=s3://{bucket}/data", f"work_dir=s3://{bucket}/runs",
                      "run_directory=first", "stages=[scan,embed,select]", "hardware=cpu", "resume=true"],
                     env, tmp_path)
    assert again.returncode == 0, again.stderr
    assert "finished in an earlier run, skipped" in again.stdout + again.stderr


@pytest.mark.slow
def test_sanity_check_reaches_a_bucket_input_and_counts_what_is_there(s3, env, tmp_path):
    fs, bucket = s3
    upload_images(fs, f"{bucket}/data", ["a/1.png", "b/2.png", "b/3.png"])
    env = {**env, **{k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                                "AWS_DEFAULT_REGION")}}
    result = thresher(["sanity_check=true", "data=folder", f"data.input_dir=s3://{bucket}/data", "hardware=cpu"],
                      env, tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"s3://{bucket}/data: 3 images and videos" in result.stdout
    empty = thresher(["sanity_check=true", "data=folder", f"data.input_dir=s3://{bucket}/nothing", "hardware=cpu"],
                     env, tmp_path)
    assert empty.returncode == 2, empty.stderr
    assert "not there" in empty.stderr or "no images" in empty.stderr


def test_object_keys_the_name_rule_refuses_are_listed_as_skipped(s3, tmp_path):
    fs, bucket = s3
    used = ["a/1.png", 'a/co,mma "quoted".png', "a/日本.png"]
    # (the S3 server under test refuses a key with a newline, and normalises `a/../x`: a real one keeps them)
    upload_images(fs, f"{bucket}/data", [*used, "a/tab\t.png", "a/esc\x1b.png"])
    run_dir = tmp_path / "run"
    result = scan_stage(compose(f"data.input_dir=s3://{bucket}/data"), run_dir)
    assert read_input_files(run_dir)[0] == used
    assert lines(run_dir / "filenames/unused_filenames.txt") == [
        "a/esc\\x1b.png\tname holds a control character (\\x1b)", "a/tab\\t.png\tname holds a tab (\\t)"]
    assert result.n_unused == 2


@pytest.mark.slow
def test_ray_workers_read_a_bucket_with_the_runs_credentials_and_log_none_of_them(s3, s3_secret, env, tmp_path):
    """executor=ray: the listing and the reads happen in Ray tasks, which get the run's
    storage_options; the artifacts equal a local run's and the secret reaches no log, Ray's included."""
    import tempfile

    from conftest import require_module

    require_module("ray", "pip install -e '.[ray]'")
    fs, bucket = s3
    upload_images(fs, f"{bucket}/data", [f"{c}/{i}.png" for c in "ab" for i in range(6)])
    fs.pipe(f"{bucket}/data/b/broken.png", png_bytes(99)[:40])
    env = {**env, **{k: v for k, v in os.environ.items() if k.startswith("AWS_")}}
    ray_dir = tempfile.mkdtemp(prefix="/tmp/ray-t")  # Ray's socket paths must stay short
    try:
        runs = {}
        for executor in ("local", "ray"):
            work = tmp_path / executor
            extra = ["executor=ray", "ray.num_cpus=2"] if executor == "ray" else []
            result = thresher(["data=folder", f"data.input_dir=s3://{bucket}/data", f"work_dir={work}",
                               "stages=[scan,embed,select]", "hardware=cpu", "data.image_size=32",
                               "sampler.stopping_condition.n_samples=4", "datasource.process_all=true", *extra],
                              {**env, "RAY_TMPDIR": ray_dir}, tmp_path, timeout=600)
            assert result.returncode == 0, result.stderr[-3000:]
            assert s3_secret not in result.stdout + result.stderr
            runs[executor] = next(p for p in work.iterdir() if p.name != "datasource")
        for name in ("data/input_files.csv", "filenames/corrupt_filenames.txt", "filenames/sampled_filenames.txt"):
            assert (runs["ray"] / name).read_bytes() == (runs["local"] / name).read_bytes(), name
        assert "b/broken.png" in (runs["ray"] / "filenames/corrupt_filenames.txt").read_text()
        assert len(lines(runs["ray"] / "data/input_files.csv")) == 1 + 12
        logged = b"".join(p.read_bytes() for p in Path(ray_dir).rglob("*") if p.is_file() and not p.is_symlink()
                          and p.suffix in (".log", ".out", ".err", ".txt", ".json"))
        assert logged, "Ray wrote its session logs where RAY_TMPDIR says"
        assert s3_secret.encode() not in logged
    finally:
        shutil.rmtree(ray_dir, ignore_errors=True)
