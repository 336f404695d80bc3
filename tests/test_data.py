"""The shapes dataset and the scan's corruptness check."""
from __future__ import annotations

import hashlib
import json
import os
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

from app.data.scan import corruption_reason, labels_for, list_images
from app.data.shapes import CLASSES, ensure_shapes, generate_shapes


def digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            h.update(path.relative_to(root).as_posix().encode() + path.read_bytes())
    return h.hexdigest()


def test_shapes_are_deterministic(tmp_path):
    generate_shapes(tmp_path / "a", 12, 48)
    generate_shapes(tmp_path / "b", 12, 48)
    assert digest(tmp_path / "a") == digest(tmp_path / "b")


def test_shapes_layout_labels_boxes_and_keypoints(tmp_path):
    root = ensure_shapes(tmp_path, 30, 64)
    files = list_images(root)
    assert len(files) == 30
    classes, labels = labels_for(files)
    assert classes == list(CLASSES) and sorted(set(labels)) == [0, 1, 2]
    coco = json.loads((root / "annotations.json").read_text())
    assert len(coco["images"]) == len(coco["annotations"]) == 30
    for annotation in coco["annotations"]:
        x, y, w, h = annotation["bbox"]
        assert 0 <= x and 0 <= y and x + w <= 64 and y + h <= 64 and w > 5 and h > 5
        keypoints = annotation["keypoints"]
        assert len(keypoints) == 12
        visible = [(keypoints[i], keypoints[i + 1]) for i in range(0, 12, 3) if keypoints[i + 2] == 2]
        assert len(visible) == annotation["num_keypoints"] >= 3
        for kx, ky in visible:  # corner keypoints lie on the box edges or inside it
            assert x - 0.02 <= kx <= x + w + 0.02 and y - 0.02 <= ky <= y + h + 0.02
    assert ensure_shapes(tmp_path, 30, 64) == root, "generated once, then reused from the cache"


def test_corrupt_shapes_are_truncated_files(tmp_path):
    root = ensure_shapes(tmp_path, 12, 48, n_corrupt=2)
    corrupt = [f for f in list_images(root) if "corrupt_" in f]
    assert len(corrupt) == 2
    assert all(corruption_reason(root / f).startswith("truncated") for f in corrupt)


def _png_claiming_size(path: Path, width: int, height: int) -> None:
    """A PNG header that claims a huge image (a decompression bomb) over a tiny body."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 10))
                     + chunk(b"IEND", b""))


def test_every_kind_of_corrupt_file_gets_a_reason(tmp_path):
    good = tmp_path / "good.png"
    Image.effect_noise((64, 64), 40).convert("RGB").save(good)
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.png").write_text("this is not an image")
    (tmp_path / "truncated.png").write_bytes(good.read_bytes()[: len(good.read_bytes()) * 6 // 10])
    _png_claiming_size(tmp_path / "bomb.png", 100_000, 100_000)
    assert corruption_reason(good) is None
    assert corruption_reason(tmp_path / "empty.jpg") == "empty file (0 bytes)"
    assert corruption_reason(tmp_path / "text.png").startswith("not an image")
    assert corruption_reason(tmp_path / "truncated.png").startswith("truncated or damaged")
    assert corruption_reason(tmp_path / "bomb.png").startswith("decompression bomb")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file_gets_a_reason(tmp_path):
    path = tmp_path / "locked.png"
    Image.new("RGB", (8, 8)).save(path)
    path.chmod(0)
    assert corruption_reason(path) == "unreadable: permission denied"


def test_listing_is_recursive_sorted_and_skips_hidden_and_non_images(tmp_path):
    for name in ["b/2.png", "a/1.JPG", "a/deep/3.webp", ".hidden/4.png", "a/.5.png", "a/notes.txt"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    assert list_images(tmp_path) == ["a/1.JPG", "a/deep/3.webp", "b/2.png"]
    assert labels_for(["x.png", "y.png"]) == ([], [0, 0])
    assert labels_for(["c/x.png", "y.png"]) == (["c"], [0, -1])
