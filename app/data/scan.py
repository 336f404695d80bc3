"""Scan stage: list the input images, decode each one fully, and set aside the corrupt ones.

Writes `data/input_files.csv` (filenames,labels: the images that decode), `data/dataset.json`
(input folder, class names) and `filenames/corrupt_filenames.txt` (`filename<TAB>reason`).
A corrupt file is reported and skipped, never the end of the run.
"""
from __future__ import annotations

import csv
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Tuple

from omegaconf import DictConfig
from PIL import Image, UnidentifiedImageError

from app import atomic
from app.config import UserError, shapes_cache_dir
from app.progress import Progress

log = logging.getLogger("thresher")

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
INPUT_FILES = "data/input_files.csv"
DATASET = "data/dataset.json"
CORRUPT_FILES = "filenames/corrupt_filenames.txt"


@dataclass
class ScanResult:
    n_files: int
    n_images: int
    n_corrupt: int
    n_classes: int
    input_dir: str
    artifacts: List[str] = field(default_factory=lambda: [INPUT_FILES, DATASET, CORRUPT_FILES])


def resolve_input_dir(data: DictConfig) -> Path:
    """The folder the images are in; for `shapes`, generated into the cache first."""
    if data.name == "shapes":
        from app.data.shapes import ensure_shapes

        return ensure_shapes(shapes_cache_dir(), data.n_images, data.shapes_image_size, data.n_corrupt)
    return Path(data.input_dir)


def list_images(root: Path) -> List[str]:
    """Image files under `root`, recursively, as sorted POSIX paths relative to it (hidden skipped)."""
    found = []
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                found.append((Path(folder) / name).relative_to(root).as_posix())
    return sorted(found)


def corruption_reason(path: Path) -> Optional[str]:
    """Why the file cannot be used as an image, or None when it decodes completely."""
    try:
        if path.stat().st_size == 0:
            return "empty file (0 bytes)"
        with Image.open(path) as image:
            image.load()
            if image.width == 0 or image.height == 0:
                return "image has no pixels"
    except Image.DecompressionBombError as error:
        return f"decompression bomb: {error}"
    except UnidentifiedImageError:
        return "not an image: the content matches no image format"
    except PermissionError:
        return "unreadable: permission denied"
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        return f"truncated or damaged: {error}"
    return None


def labels_for(files: List[str]) -> Tuple[List[str], List[int]]:
    """ImageFolder labels: the first-level folder is the class. A flat folder is all class 0 (as
    lightly labels it); files beside class folders get -1 (unlabelled)."""
    classes = sorted({f.split("/", 1)[0] for f in files if "/" in f})
    index = {name: i for i, name in enumerate(classes)}
    labels = [index[f.split("/", 1)[0]] if "/" in f else (-1 if classes else 0) for f in files]
    return classes, labels


def scan_stage(cfg: DictConfig, run_dir: Path, device=None) -> ScanResult:
    input_dir = resolve_input_dir(cfg.data)
    if not input_dir.is_dir():
        raise UserError(f"data.input_dir={str(input_dir)!r} is not a folder")
    files = list_images(input_dir)
    if not files:
        raise UserError(f"no images under {input_dir} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
    classes, labels = labels_for(files)

    corrupt: List[Tuple[str, str]] = []
    if cfg.enable_corruptness_check:
        reasons: List[Optional[str]] = []
        workers = min(8, 2 * (os.cpu_count() or 1))
        with ThreadPoolExecutor(workers) as pool, Progress(len(files), "scan") as bar:
            for reason in pool.map(lambda f: corruption_reason(input_dir / f), files, chunksize=16):
                reasons.append(reason)
                bar.update(1)
        corrupt = [(f, r) for f, r in zip(files, reasons) if r is not None]
        for name, reason in corrupt:
            log.warning("corrupt image skipped: %s (%s)", name, reason)
    bad = {name for name, _ in corrupt}
    good = [(f, label) for f, label in zip(files, labels) if f not in bad]

    atomic.write_csv(run_dir / INPUT_FILES, ["filenames", "labels"], good)
    atomic.write_json(run_dir / DATASET, {"input_dir": str(input_dir), "classes": classes})
    atomic.write_lines(run_dir / CORRUPT_FILES, (f"{name}\t{reason}" for name, reason in corrupt))
    log.info("scan: %d images in %s, %d usable, %d corrupt, %d classes", len(files), input_dir,
             len(good), len(corrupt), len(classes))
    return ScanResult(n_files=len(files), n_images=len(good), n_corrupt=len(corrupt),
                      n_classes=len(classes), input_dir=str(input_dir))


def read_input_files(path: Path) -> Tuple[List[str], List[int]]:
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    return [row["filenames"] for row in rows], [int(row["labels"]) for row in rows]


def add_corrupt(run_dir: Path, found: List[Tuple[str, str]]) -> None:
    """Append files that failed later (e.g. while embedding with the check off) to the list."""
    if not found:
        return
    path = run_dir / CORRUPT_FILES
    existing = atomic.read_lines(path) if path.is_file() else []
    atomic.write_lines(path, existing + [f"{name}\t{reason}" for name, reason in found])
