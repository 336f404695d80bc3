"""Scan stage: list the input images and videos, decode each image and video frame fully, set
aside the corrupt ones and the exact duplicates.

The input is a folder or a bucket prefix (`data.input_dir=s3://bucket/prefix`, app/data/sources.py);
videos are expanded into frames named as lightly names them (app/data/video.py), and their
frames are streamed, one decoded frame at a time per video. `data/videos.json` describes them.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, Union

from omegaconf import DictConfig
from PIL import Image, UnidentifiedImageError

from app import atomic
from app.config import UserError, is_url, shapes_cache_dir
from app.data.sources import Source, bounded_map, datasource_state_path, load_seen, save_seen, source_for
from app.data.video import VIDEO_EXTENSIONS, is_video, scan_video
from app.progress import Progress

log = logging.getLogger("thresher")

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
INPUT_FILES = "data/input_files.csv"
DATASET = "data/dataset.json"
CORRUPT_FILES = "filenames/corrupt_filenames.txt"
DUPLICATE_FILES = "filenames/duplicate_filenames.txt"
MISSING_FILES = "filenames/missing_filenames.txt"
VIDEOS = "data/videos.json"


@dataclass
class ScanResult:
    n_files: int
    n_images: int
    n_corrupt: int
    n_duplicates: int
    n_missing: int
    n_classes: int
    input_dir: str
    n_videos: int = 0
    n_video_frames: int = 0
    # datasource.process_all=false on a bucket: objects skipped because an earlier run saw them.
    n_already_seen: Optional[int] = None
    artifacts: List[str] = field(default_factory=lambda: [INPUT_FILES, DATASET, CORRUPT_FILES,
                                                          DUPLICATE_FILES, MISSING_FILES])


def resolve_input_dir(data: DictConfig) -> Union[Path, str]:
    """The folder the images are in (file names are relative to it), or a bucket URL as a string;
    for `shapes`, generated into the cache first."""
    if data.name == "shapes":
        from app.data.shapes import ensure_shapes

        return ensure_shapes(shapes_cache_dir(), data.n_images, data.shapes_image_size, data.n_corrupt)
    if data.name == "oxford_pet":  # only images/ holds inputs; annotations/trimaps/*.png are masks
        return Path(data.root) / "images"
    if is_url(data.input_dir):
        return str(data.input_dir).rstrip("/")
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


def inspect_file(path: Union[Path, Callable[[], bytes]], decode: bool,
                 digest: bool) -> Tuple[Optional[str], Optional[str]]:
    """(corruption reason or None, SHA-256 of the bytes or None), reading the file (a path, or a
    function that reads a bucket object) once."""
    read = path if callable(path) else path.read_bytes
    try:
        data = read() if (decode or digest) else None
    except PermissionError:
        return "unreadable: permission denied", None
    except OSError as error:
        return f"unreadable: {error.strerror or error}", None
    except Exception as error:  # a bucket's read errors, already retried by its filesystem
        return f"unreadable: {type(error).__name__}: {error}", None
    reason = corruption_reason(Path("."), data) if decode else None
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
        elif Path(name).suffix.lower() not in IMAGE_EXTENSIONS | VIDEO_EXTENSIONS:
            missing.append((entry, "not an image or video file name"))
        elif not path.is_file():
            missing.append((entry, "no such file"))
        else:
            present.add(name)
    return sorted(present), missing


def read_relevant_objects(list_file: str, source: Source) -> Tuple[List[Tuple[str, Optional[str]]],
                                                                   List[Tuple[str, str]]]:
    """For a bucket: the listed objects that exist, with their ETags, and the entries that do not.
    One metadata request per entry, in parallel; the bucket is never listed."""
    import fsspec

    with fsspec.open(list_file, "rt", encoding="utf-8") as handle:
        entries = [line.strip() for line in handle.read().splitlines()]
    names, missing = [], []
    for entry in dict.fromkeys(e for e in entries if e and not e.startswith("#")):
        name = entry.removeprefix("./")
        if name.startswith("/") or ".." in name.split("/"):
            missing.append((entry, "outside the input folder"))
        elif os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS | VIDEO_EXTENSIONS:
            missing.append((entry, "not an image or video file name"))
        else:
            names.append(name)
    present = []
    for name, etag in zip(names, bounded_map(source.etag, names, workers=16)):
        if etag is None:
            missing.append((name, "no such object"))
        else:
            present.append((name, etag))
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
    if is_url(input_dir) and cfg.get("storage_options") is not None:
        from omegaconf import OmegaConf

        from app.data.sources import configure_storage

        configure_storage(OmegaConf.to_container(cfg.storage_options, resolve=True))
    source = source_for(input_dir)
    if not source.exists():
        raise UserError(f"data.input_dir={str(input_dir)!r} is not a folder" +
                        (" or a bucket prefix that this machine can read" if source.is_url else ""))
    missing: List[Tuple[str, str]] = []
    relevant = cfg.data.get("relevant_filenames_file")
    if relevant and source.is_url:
        listed, missing = read_relevant_objects(relevant, source)
    elif relevant:
        names, missing = read_relevant_filenames(Path(relevant), Path(input_dir))
        listed = [(name, None) for name in names]
    else:
        listed = list(source.list_files(IMAGE_EXTENSIONS | VIDEO_EXTENSIONS))
    for entry, why in missing:
        log.warning("relevant_filenames_file entry skipped: %s (%s)", entry, why)

    already_seen, seen, state_path = None, {}, None
    datasource = cfg.get("datasource")
    if source.is_url and datasource is not None and not datasource.process_all:
        state_path = datasource_state_path(cfg.work_dir, source.location)
        seen = load_seen(state_path)
        fresh = [(name, etag) for name, etag in listed if seen.get(name) != etag]
        already_seen = len(listed) - len(fresh)
        if already_seen:
            log.info("scan: %d objects of %s were seen by an earlier run and are skipped "
                     "(datasource.process_all=true scans them again)", already_seen, source)
        if listed and not fresh:
            raise UserError(f"no new objects under {source}: all {len(listed)} were processed by an earlier run "
                            f"(state in {state_path}); set datasource.process_all=true to process them again")
        listed = fresh
    names = sorted(name for name, _ in listed)
    images = [name for name in names if not is_video(name)]
    videos = [name for name in names if is_video(name)]
    if not names:
        where = f"listed in {relevant}" if relevant else f"under {input_dir}"
        raise UserError(f"no images or videos {where} (looked for "
                        f"{', '.join(sorted(IMAGE_EXTENSIONS | VIDEO_EXTENSIONS))})")

    corrupt: List[Tuple[str, str]] = []
    duplicates: List[Tuple[str, str]] = []
    decode, digest = bool(cfg.enable_corruptness_check), bool(cfg.remove_exact_duplicates)
    first_with_digest: Dict[str, str] = {}
    workers = min(16 if source.is_url else 8, 2 * (os.cpu_count() or 1))

    def check(name: str, reason: Optional[str], sha: Optional[str]) -> None:
        if reason is not None:
            corrupt.append((name, reason))
            log.warning("corrupt image skipped: %s (%s)", name, reason)
        elif sha is not None:
            if sha in first_with_digest:
                duplicates.append((name, first_with_digest[sha]))
            else:
                first_with_digest[sha] = name

    frames: List[str] = []
    video_info: Dict[str, dict] = {}
    with Progress(len(images) + len(videos), "scan") as bar:
        if decode or digest:
            reader = (lambda name: inspect_file(lambda: source.read_bytes(name), decode, digest)) if source.is_url \
                else (lambda name: inspect_file(source.local_path(name), decode, digest))
            for name, (reason, sha) in zip(images, bounded_map(reader, images, workers, window=64)):
                check(name, reason, sha)
                bar.update(1)
        else:
            bar.update(len(images))
        threshold = float(cfg.get("corruptness_check", {}).get("corruption_threshold", 0.1))
        use_metadata = bool(datasource is not None and datasource.use_frame_count_metadata)

        def scan_one(video: str):
            opener = (lambda: source.open(video)) if source.is_url else (lambda: str(source.local_path(video)))
            return scan_video(opener, video, decode, digest, threshold, use_metadata)

        # a few videos at a time: each holds one decoded frame and its demuxer's buffers
        for found in bounded_map(scan_one, videos, workers=min(4, workers), window=min(4, workers)):
            if found.problem:
                corrupt.append((found.video, found.problem))
                log.warning("video %s: %s", found.video, found.problem)
            for name, reason, sha in found.frames:
                frames.append(name)
                check(name, reason, sha)
            video_info[found.video] = found.summary()
            bar.update(1)

    files = sorted(images + frames)
    classes, labels = labels_for(files)
    left_out = {name for name, _ in corrupt} | {name for name, _ in duplicates}
    good = [(f, label) for f, label in zip(files, labels) if f not in left_out]

    atomic.write_csv(run_dir / INPUT_FILES, ["filenames", "labels"], good)
    atomic.write_json(run_dir / DATASET, {"input_dir": str(source.location), "classes": classes})
    atomic.write_lines(run_dir / CORRUPT_FILES, (f"{name}\t{reason}" for name, reason in corrupt))
    atomic.write_lines(run_dir / DUPLICATE_FILES, (f"{name}\t{first}" for name, first in duplicates))
    atomic.write_lines(run_dir / MISSING_FILES, (f"{entry}\t{why}" for entry, why in missing))
    result = ScanResult(n_files=len(files), n_images=len(good), n_corrupt=len(corrupt),
                        n_duplicates=len(duplicates), n_missing=len(missing), n_classes=len(classes),
                        input_dir=str(source.location), n_videos=len(videos), n_video_frames=len(frames),
                        n_already_seen=already_seen)
    if videos:
        atomic.write_json(run_dir / VIDEOS, video_info)
        result.artifacts.append(VIDEOS)
    if state_path is not None:
        save_seen(state_path, source.location, {**seen, **{name: etag for name, etag in listed if etag}})
    log.info("scan: %d images and %d video frames (%d videos) in %s: %d usable, %d corrupt, %d exact "
             "duplicates, %d listed but missing; %d classes", len(images), len(frames), len(videos), source,
             len(good), len(corrupt), len(duplicates), len(missing), len(classes))
    return result


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
