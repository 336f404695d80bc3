"""Scan stage: list the input images and videos, decode each image and video frame fully, set
aside the corrupt ones and the exact duplicates.

The input is a folder or a bucket prefix (`data.input_dir=s3://bucket/prefix`, app/data/sources.py);
videos are expanded into frames named as lightly names them (app/data/video.py), and their
frames are streamed, one decoded frame at a time per video. `data/videos.json` describes them.

Writes `data/input_files.csv` (filenames,labels: the images to use), `data/dataset.json` (input
folder, class names), `filenames/corrupt_filenames.txt` (`filename<TAB>reason`),
`filenames/duplicate_filenames.txt` (`filename<TAB>the earlier identical file`) and
`filenames/missing_filenames.txt` (entries of relevant_filenames_file that are not there) and
`filenames/unused_filenames.txt` (`name<TAB>reason`: left out for its name or kind, never opened:
a name that app/data/names.py refuses, anything but a regular file, an unreadable folder, a second
way into a folder). These last two write names escaped (names.escape_name). A corrupt file is
reported and skipped, never the end of the run.

Exact duplicates are files with identical bytes (SHA-256): cheap, decided without decoding, and
never wrong. The same picture re-encoded is a near duplicate; the coreset's min_distance catches it.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import posixpath
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, Union

from omegaconf import DictConfig
from PIL import Image, UnidentifiedImageError

from app import artifacts
from app.artifacts import (CORRUPT_FILES, DATASET, DUPLICATE_FILES, INPUT_FILES, MISSING_FILES,
                           UNUSED_FILES, VIDEOS, Dataset)
from app.data.locations import is_url, shapes_cache_dir
from app.data.names import escape_name, name_problem
from app.data.sources import (Source, bounded_map, datasource_state_path, load_seen, open_regular_file, save_seen,
                              source_for, special_file_problem)
from app.data.video import VIDEO_EXTENSIONS, is_video, scan_video
from app.errors import UserError
from app.progress import Progress

log = logging.getLogger("thresher")

# A multi-frame image (an animated GIF, a multi-page TIFF) is used by its first frame.
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"}


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
    n_unused: int = 0
    # datasource.process_all=false on a bucket: objects skipped because an earlier run saw them.
    n_already_seen: Optional[int] = None
    artifacts: List[str] = field(default_factory=lambda: [INPUT_FILES, DATASET, CORRUPT_FILES,
                                                          DUPLICATE_FILES, MISSING_FILES, UNUSED_FILES])


def resolve_input_dir(data: DictConfig) -> Union[Path, str]:
    """The folder the images are in (file names are relative to it), or a bucket URL as a string;
    for `shapes`, generated into the cache first."""
    if data.name == "shapes":
        from app.data.shapes import ensure_shapes

        return ensure_shapes(shapes_cache_dir(), data.n_images, data.shapes_image_size, data.n_corrupt)
    from app.data.inputs import images_location

    return images_location(data)


def list_images(root: Path) -> List[str]:
    """The usable image files under `root`, recursively, as sorted POSIX paths relative to it
    (hidden ones and those the scan would skip left out)."""
    return sorted(found.name for found in source_for(root).list_files(IMAGE_EXTENSIONS) if found.problem is None)


def unreadable_reason(error: OSError) -> str:
    if isinstance(error, PermissionError):
        return "unreadable: permission denied"
    return f"unreadable: {error.strerror or error}"


def corruption_reason(path: Path, data: Optional[bytes] = None) -> Optional[str]:
    """Why the file cannot be used as an image, or None when it decodes completely."""
    try:
        if data is None:
            with open_regular_file(str(path)) as handle:
                data = handle.read()
    except OSError as error:
        return unreadable_reason(error)
    try:
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
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        return f"truncated or damaged: {error}"
    return None


def inspect_file(read: Callable[[], bytes], decode: bool, digest: bool) -> Tuple[Optional[str], Optional[str]]:
    """(corruption reason or None, SHA-256 of the bytes or None), reading the file once."""
    try:
        data = read() if (decode or digest) else None
    except OSError as error:
        return unreadable_reason(error), None
    except Exception as error:  # a bucket's read errors, already retried by its filesystem
        return f"unreadable: {type(error).__name__}: {error}", None
    reason = corruption_reason(Path("."), data) if decode else None
    sha = hashlib.sha256(data).hexdigest() if digest and data is not None and reason is None else None
    return reason, sha


def relevant_entries(text: str) -> List[str]:
    """A relevant_filenames_file's entries: one a line, blank lines and `#` comments left out (so
    a file named `#x.png` is listed as `./#x.png`)."""
    entries = (line.strip(" \t\r") for line in text.split("\n"))
    return [entry for entry in entries if entry and not entry.startswith("#")]


def check_entries(entries: List[str]) -> Tuple[Dict[str, str], List[Tuple[str, str]], List[Tuple[str, str]]]:
    """({normalised name: its first entry}, missing (entry, why), skipped (name, why)). A name is
    normalised before it is checked and before a label is taken from it: `b/../a/x.png`, `./a/x.png`
    and `a//x.png` all name `a/x.png`, class a, once."""
    names: Dict[str, str] = {}
    missing: List[Tuple[str, str]] = []
    skipped: Dict[str, str] = {}
    for entry in dict.fromkeys(entries):
        name = posixpath.normpath(entry)
        if name.startswith("/") or name == ".." or name.startswith("../"):
            missing.append((entry, "outside the input folder"))
        elif posixpath.splitext(name)[1].lower() not in IMAGE_EXTENSIONS | VIDEO_EXTENSIONS:
            missing.append((entry, "not an image or video file name"))
        elif (problem := name_problem(name)) is not None:
            skipped[name] = problem
        else:
            names.setdefault(name, entry)
    return names, missing, list(skipped.items())


def read_relevant_filenames(list_file: Path, input_dir: Path) -> Tuple[List[str], List[Tuple[str, str]],
                                                                     List[Tuple[str, str]]]:
    """The listed images that can be used (sorted, deduplicated), the entries that are not there,
    and the files that are there but not used, with why. Only the listed paths are looked at: no
    walk over a large input folder."""
    text = list_file.read_text(encoding="utf-8-sig", errors="surrogateescape")
    names, missing, skipped = check_entries(relevant_entries(text))
    present = []
    for name, entry in names.items():
        path = os.path.join(input_dir, name)
        try:
            regular = stat.S_ISREG(os.stat(path).st_mode)
        except OSError:
            regular = False
        if regular:
            present.append(name)
        elif os.path.lexists(path):
            skipped.append((name, special_file_problem(path)))
        else:
            missing.append((entry, "no such file"))
    return sorted(present), missing, skipped


def read_relevant_objects(list_file: str, source: Source) -> Tuple[List[Tuple[str, Optional[str]]],
                                                                   List[Tuple[str, str]], List[Tuple[str, str]]]:
    """For a bucket: the listed objects that exist, with their ETags, the entries that do not, and
    the names not used, with why. One metadata request per entry, in parallel; the bucket is never
    listed."""
    import fsspec

    with fsspec.open(list_file, "rt", encoding="utf-8-sig", errors="surrogateescape") as handle:
        names, missing, skipped = check_entries(relevant_entries(handle.read()))
    present = []
    for (name, entry), etag in zip(names.items(), bounded_map(source.etag, list(names), workers=16)):
        if etag is None:
            missing.append((entry, "no such object"))
        else:
            present.append((name, etag))
    return sorted(present), missing, skipped


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
    skipped: List[Tuple[str, str]] = []
    relevant = cfg.data.get("relevant_filenames_file")
    if relevant and source.is_url:
        listed, missing, skipped = read_relevant_objects(relevant, source)
    elif relevant:
        names, missing, skipped = read_relevant_filenames(Path(relevant), Path(input_dir))
        listed = [(name, None) for name in names]
    else:
        listed = []
        for found in source.list_files(IMAGE_EXTENSIONS | VIDEO_EXTENSIONS):
            if found.problem is None:
                listed.append((found.name, found.etag))
            else:
                skipped.append((found.name, found.problem))
    for entry, why in missing:
        log.warning("relevant_filenames_file entry skipped: %s (%s)", escape_name(entry), why)
    skipped.sort()
    for name, why in skipped:
        log.warning("not used: %s (%s)", escape_name(name), why)

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
        raise UserError(f"no usable images or videos {where} (looked for "
                        f"{', '.join(sorted(IMAGE_EXTENSIONS | VIDEO_EXTENSIONS))}"
                        f"{f'; {len(skipped)} not used, see the log' if skipped else ''})")

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
            def reader(name: str):
                return inspect_file(lambda: source.read_bytes(name), decode, digest)

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

    artifacts.write_input_files(run_dir, [f for f, _ in good], [label for _, label in good])
    artifacts.write_dataset(run_dir, Dataset(source.location, classes))
    artifacts.write_corrupt_files(run_dir, corrupt)
    artifacts.write_duplicate_files(run_dir, duplicates)
    artifacts.write_missing_files(run_dir, missing)
    artifacts.write_unused_files(run_dir, skipped)
    result = ScanResult(n_files=len(files), n_images=len(good), n_corrupt=len(corrupt),
                        n_duplicates=len(duplicates), n_missing=len(missing), n_classes=len(classes),
                        input_dir=str(source.location), n_videos=len(videos), n_video_frames=len(frames),
                        n_unused=len(skipped), n_already_seen=already_seen)
    if videos:
        artifacts.write_videos(run_dir, video_info)
        result.artifacts.append(VIDEOS)
    if state_path is not None:
        save_seen(state_path, source.location, {**seen, **{name: etag for name, etag in listed if etag}})
    log.info("scan: %d images and %d video frames (%d videos) in %s: %d usable, %d corrupt, %d exact "
             "duplicates, %d listed but missing, %d not used (%s); %d classes", len(images), len(frames),
             len(videos), source, len(good), len(corrupt), len(duplicates), len(missing), len(skipped),
             UNUSED_FILES, len(classes))
    return result
