"""The scan's check on a process pool finds exactly what the check in the scan's own process finds:
the same corrupt files with the same reasons, the same duplicate pairs, the same artifacts."""
from __future__ import annotations

import io
import multiprocessing
import os
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app.data.scan import checked_chunks, duplicates_of, list_images, scan_stage
from app.data.sources import source_for

ARTIFACTS = ["data/input_files.csv", "data/dataset.json", "filenames/corrupt_filenames.txt",
             "filenames/duplicate_filenames.txt", "filenames/missing_filenames.txt",
             "filenames/unused_filenames.txt"]
IMAGES = 200  # a few chunks per process (app.data.scan.checked_chunks sizes them)


def png_bytes(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, size=(8, 8, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def hostile_folder(tmp_path_factory) -> Path:
    """Enough images for several chunks, and every kind of failure spread across them."""
    root = tmp_path_factory.mktemp("images")
    for index in range(IMAGES):
        path = root / f"class_{index % 3}" / f"{index:04d}.png"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(png_bytes(index))
    copy = png_bytes(7)
    for name in ["class_2/copy-a.png", "class_0/copy-b.png", "class_1/copy-c.png"]:  # three copies of 0007
        (root / name).write_bytes(copy)
    (root / "class_1/empty.png").write_bytes(b"")
    (root / "class_2/truncated.png").write_bytes(png_bytes(9999)[:60])
    (root / "class_0/text.jpg").write_bytes(b"not an image at all")
    damaged = bytearray(png_bytes(5))
    damaged[-40:-20] = bytes(20)
    (root / "class_2/0100-damaged.png").write_bytes(bytes(damaged))
    (root / "loose.png").write_bytes(png_bytes(123456))
    locked = root / "class_1/locked.png"
    locked.write_bytes(png_bytes(424242))
    locked.chmod(0)
    return root


def scan(folder: Path, run_dir: Path, workers: int):
    from app.cli import compose_quietly
    from app.config import register_configs, register_resolvers

    register_configs()
    register_resolvers()
    cfg = compose_quietly(["data=folder", "hardware=cpu", f"hardware.num_workers={workers}",
                           f"data.input_dir={folder}"])
    return scan_stage(cfg, run_dir)


def artifacts_of(run_dir: Path) -> dict:
    return {name: (run_dir / name).read_bytes() for name in ARTIFACTS}


@pytest.fixture(scope="module")
def in_process(hostile_folder, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("in-process")
    return scan(hostile_folder, run_dir, 0), artifacts_of(run_dir)


@pytest.mark.parametrize("workers", [1, 2])
def test_the_pool_finds_what_the_scan_process_finds(hostile_folder, in_process, tmp_path, workers):
    result, expected = in_process
    assert scan(hostile_folder, tmp_path, workers) == result
    assert artifacts_of(tmp_path) == expected


def test_what_the_check_finds(hostile_folder, in_process):
    result, artifacts = in_process
    corrupt = dict(line.split("\t") for line in artifacts["filenames/corrupt_filenames.txt"].decode().splitlines())
    assert corrupt.pop("class_1/empty.png") == "empty file (0 bytes)"
    assert corrupt.pop("class_0/text.jpg") == "not an image: the content matches no image format"
    assert corrupt.pop("class_2/truncated.png").startswith("truncated or damaged: ")
    assert corrupt.pop("class_2/0100-damaged.png").startswith("truncated or damaged: ")
    corrupt.pop("class_1/locked.png", None)  # test_an_unreadable_file_is_corrupt
    assert corrupt == {}
    assert artifacts["filenames/duplicate_filenames.txt"].decode().splitlines() == [
        "class_1/0007.png\tclass_0/copy-b.png", "class_1/copy-c.png\tclass_0/copy-b.png",
        "class_2/copy-a.png\tclass_0/copy-b.png"]
    assert result.n_files == IMAGES + 9
    assert result.n_images == result.n_files - result.n_corrupt - 3


def test_an_unreadable_file_is_corrupt(hostile_folder, in_process):
    if os.access(hostile_folder / "class_1/locked.png", os.R_OK):
        pytest.skip("root reads files whatever their mode")
    assert b"class_1/locked.png\tunreadable: permission denied\n" in in_process[1]["filenames/corrupt_filenames.txt"]


def test_a_scan_started_beside_another_thread_still_checks_on_processes(hostile_folder, in_process, tmp_path,
                                                                        monkeypatch):
    """With another thread running, the processes are not forked from the scan's process."""
    methods, get_context = [], multiprocessing.get_context
    monkeypatch.setattr(multiprocessing, "get_context", lambda method=None: methods.append(method) or get_context(method))
    stop = threading.Event()
    other = threading.Thread(target=stop.wait, daemon=True)
    other.start()
    try:
        scan(hostile_folder, tmp_path, 2)
    finally:
        stop.set()
    assert artifacts_of(tmp_path) == in_process[1]
    assert methods == ["forkserver"]


def test_the_first_of_equal_digests_is_the_earliest():
    digests = np.array([b"b", b"a", b"b", b"c", b"a", b"b", b"z"], dtype="S32")
    has_digest = np.array([True, True, True, True, True, True, False])
    duplicate, first = duplicates_of(digests, has_digest)
    assert duplicate.tolist() == [2, 4, 5] and first.tolist() == [0, 1, 0]
    empty = np.zeros(0, dtype="S32")
    assert [a.tolist() for a in duplicates_of(empty, np.zeros(0, dtype=bool))] == [[], []]


def test_leaving_the_check_early_ends_its_processes(hostile_folder):
    """An interrupt raised while the scan waits on the pool leaves the check like this."""
    checks = checked_chunks(source_for(hostile_folder), list_images(hostile_folder), True, True, 2)
    assert len(multiprocessing.active_children()) == 2
    next(checks)
    checks.close()
    for process in multiprocessing.active_children():
        process.join(timeout=30)
    assert multiprocessing.active_children() == []
