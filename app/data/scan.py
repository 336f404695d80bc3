"""Scan stage: list the input images, decode each one fully, set aside the corrupt ones and the
exact duplicates.

Writes `data/input_files.csv` (filenames,labels: the images to use), `data/dataset.json` (input
folder, class names), `filenames/corrupt_filenames.txt` (`filename<TAB>reason`),
`filenames/duplicate_filenames.txt` (`filename<TAB>the earlier identical file`) and
`filenames/missing_filenames.txt` (entries of relevant_filenames_file that are not there).
A corrupt file is reported and skipped, never the end of the run.

Exact duplicates are files with identical bytes (SHA-256): cheap, decided without decoding, and
never wrong. The same picture re-encoded is a near duplicate; the coreset's min_distance catches it.
"""
from __future__ import annotations

import csv
import hashlib
import io
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
DUPLICATE_FILES = "filenames/duplicate_filenames.txt"
MISSING_FILES = "filenames/missing_filenames.txt"


@dataclass
class ScanResult:
    n_files: int
    n_images: int
    n_corrupt: int
    n_duplicates: int
    n_missing: int
    n_classes: int
    input_dir: str
    artifacts: List[str] = field(default_factory=lambda: [INPUT_FILES, DATASET, CORRUPT_FILES,
                                                          DUPLICATE_FILES, MISSING_FILES])


def resolve_input_dir(data: DictConfig) -> Path:
    """The folder the images are in (file names are relative to it); for `shapes`, generated into
    the cache first."""
    if data.name == "shapes":
        from app.data.shapes import ensure_shapes

        return ensure_shapes(shapes_cache_dir(), data.n_images, data.shapes_image_size, data.n_corrupt)
    if data.name == "oxford_pet":  # only images/ holds inputs; annotations/trimaps/*.png are masks
        return Path(data.root) / "images"
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


def corruption_reason(path: Path, data: Optional[bytes] = None) -> Optional[str]:
    """Why the file cannot be used as an image, or None when it decodes completely."""
    try:
        if data is None:
            data = path.read_bytes()
        if not data:
            return "empty file (0 bytes)"
        with Image.open(io.BytesIO(data)) as image:
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


def inspect_file(path: Path, decode: bool, digest: bool) -> Tuple[Optional[str], Optional[str]]:
    """(corruption reason or None, SHA-256 of the bytes or None), reading the file once."""
    try:
        data = path.read_bytes() if (decode or digest) else None
    except PermissionError:
        return "unreadable: permission denied", None
    except OSError as error:
        return f"unreadable: {error.strerror or error}", None
    reason = corruption_reason(path, data) if decode else None
    sha = hashlib.sha256(data).hexdigest() if digest and data is not None and reason is None else None
    return reason, sha


def read_relevant_filenames(list_file: Path, input_dir: Path) -> Tuple[List[str], List[Tuple[str, str]]]:
    """The listed images that exist (sorted, deduplicated) and the entries that do not, with why.
    Only the listed paths are looked at: no walk over a large input folder."""
    present, missing = set(), []
    root = input_dir.resolve()
    for raw in list_file.read_text(encoding="utf-8").splitlines():
        entry = raw.strip()
        if not entry or entry.startswith("#"):
            continue
        name = Path(entry).as_posix().removeprefix("./")
        path = (input_dir / name)
        if Path(name).is_absolute() or not path.resolve().is_relative_to(root):
            missing.append((entry, "outside the input folder"))
        elif Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
            missing.append((entry, "not an image file name"))
        elif not path.is_file():
            missing.append((entry, "no such file"))
        else:
            present.add(name)
    return sorted(present), missing


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
    missing: List[Tuple[str, str]] = []
    relevant = cfg.data.get("relevant_filenames_file")
    if relevant:
        files, missing = read_relevant_filenames(Path(relevant), input_dir)
        for entry, why in missing:
            log.warning("relevant_filenames_file entry skipped: %s (%s)", entry, why)
    else:
        files = list_images(input_dir)
    if not files:
        where = f"listed in {relevant}" if relevant else f"under {input_dir}"
        raise UserError(f"no images {where} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
    classes, labels = labels_for(files)

    corrupt: List[Tuple[str, str]] = []
    duplicates: List[Tuple[str, str]] = []
    decode, digest = bool(cfg.enable_corruptness_check), bool(cfg.remove_exact_duplicates)
    if decode or digest:
        first_with_digest = {}
        workers = min(8, 2 * (os.cpu_count() or 1))
        with ThreadPoolExecutor(workers) as pool, Progress(len(files), "scan") as bar:
            inspected = pool.map(lambda f: inspect_file(input_dir / f, decode, digest), files, chunksize=16)
            for name, (reason, sha) in zip(files, inspected):
                if reason is not None:
                    corrupt.append((name, reason))
                    log.warning("corrupt image skipped: %s (%s)", name, reason)
                elif sha is not None:
                    if sha in first_with_digest:
                        duplicates.append((name, first_with_digest[sha]))
                    else:
                        first_with_digest[sha] = name
                bar.update(1)
    left_out = {name for name, _ in corrupt} | {name for name, _ in duplicates}
    good = [(f, label) for f, label in zip(files, labels) if f not in left_out]

    atomic.write_csv(run_dir / INPUT_FILES, ["filenames", "labels"], good)
    atomic.write_json(run_dir / DATASET, {"input_dir": str(input_dir), "classes": classes})
    atomic.write_lines(run_dir / CORRUPT_FILES, (f"{name}\t{reason}" for name, reason in corrupt))
    atomic.write_lines(run_dir / DUPLICATE_FILES, (f"{name}\t{first}" for name, first in duplicates))
    atomic.write_lines(run_dir / MISSING_FILES, (f"{entry}\t{why}" for entry, why in missing))
    log.info("scan: %d images in %s: %d usable, %d corrupt, %d exact duplicates, %d listed but missing; "
             "%d classes", len(files), input_dir, len(good), len(corrupt), len(duplicates), len(missing),
             len(classes))
    return ScanResult(n_files=len(files), n_images=len(good), n_corrupt=len(corrupt),
                      n_duplicates=len(duplicates), n_missing=len(missing), n_classes=len(classes),
                      input_dir=str(input_dir))


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
