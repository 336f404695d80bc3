"""Scan stage: list the input images and videos, decode each image and video frame fully, set
aside the corrupt ones and the exact duplicates.

The input is a folder or a bucket prefix (`data.input_dir=s3://bucket/prefix`, app/data/sources.py);
videos are expanded into frames named as lightly names them (app/data/video.py), and their
frames are streamed, one decoded frame at a time per video. `data/videos.json` describes them.
With `executor=ray`, the listing and the image checks run on the Ray cluster
(app/executors/ray_scan.py); the artifacts are the same.

Writes `data/input_files.csv` (filenames,labels: the images to use), `data/dataset.json` (input
folder, class names), `filenames/corrupt_filenames.txt` (`filename<TAB>reason`),
`filenames/duplicate_filenames.txt` (`filename<TAB>the earlier identical file`) and
`filenames/missing_filenames.txt` (entries of relevant_filenames_file that are not there) and
`data/holdout_files.csv` (filenames,labels: with data.holdout_fraction > 0, the images held out for
evaluation, chosen by a hash of each name and left out of input_files.csv, so that no later stage
selects from them) and
`filenames/unused_filenames.txt` (`name<TAB>reason`: left out for its name or kind, never opened:
a name that app/data/names.py refuses, anything but a regular file, an unreadable folder, a second
way into a folder). These last two write names escaped (names.escape_name). A corrupt file is
reported and skipped, never the end of the run.

Exact duplicates are files with identical bytes (SHA-256): cheap, decided without decoding, and
never wrong. The same picture re-encoded is a near duplicate; the coreset's min_distance catches it.
"""
from __future__ import annotations

import hashlib
import heapq
import io
import itertools
import logging
import os
import posixpath
import signal
import stat
from collections import deque
from concurrent.futures import Executor, Future
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Deque, Dict, Iterable, Iterator, List, NamedTuple, Optional, Tuple, Union

import numpy as np
from omegaconf import DictConfig
from PIL import Image, UnidentifiedImageError

from app import artifacts
from app.artifacts import (CORRUPT_FILES, DATASET, DUPLICATE_FILES, HOLDOUT_FILES, INPUT_FILES, MISSING_FILES,
                           UNUSED_FILES, VIDEOS, Dataset)
from app.data.locations import is_url, shapes_cache_dir
from app.data.names import escape_name, name_problem
from app.data.sources import (Source, bounded_map, datasource_state_path, load_seen, open_regular_file, save_seen,
                              source_for, special_file_problem)
from app.data.video import VIDEO_EXTENSIONS, is_video, scan_video
from app.errors import UserError
from app.executors import executor_for
from app.progress import Progress

log = logging.getLogger("thresher")

# A multi-frame image (an animated GIF, a multi-page TIFF) is used by its first frame.
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"}
# Images per chunk sent to a check process: large enough that the pipe is idle, small enough that
# the progress bar moves and an interrupted scan stops within a chunk.
CHUNK_FILES = 256
NO_DIGEST = bytes(32)  # in the digest column of a file that has none (has_digest tells it apart)


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
    # data.holdout_fraction: usable images held out for evaluation (not in n_images).
    n_held_out: int = 0
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
    return decode_problem(data)


def decode_problem(data: bytes) -> Optional[str]:
    """corruption_reason of a file's bytes."""
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
    reason, sha = inspect_bytes(read, decode, digest)
    return reason, None if sha is None else sha.hex()


def inspect_bytes(read: Callable[[], bytes], decode: bool, digest: bool) -> Tuple[Optional[str], Optional[bytes]]:
    """inspect_file with the digest as its 32 bytes."""
    try:
        data = read() if (decode or digest) else None
    except OSError as error:
        return unreadable_reason(error), None
    except Exception as error:  # a bucket's read errors, already retried by its filesystem
        return f"unreadable: {type(error).__name__}: {error}", None
    reason = decode_problem(data) if decode else None
    sha = hashlib.sha256(data).digest() if digest and data is not None and reason is None else None
    return reason, sha


class CheckedChunk(NamedTuple):
    """What the check found in a run of consecutive images, as columns: the positions (in the
    chunk) that failed and why, and every image's digest (zeros where it has none)."""
    failed: np.ndarray  # int64 positions
    reasons: List[str]
    digests: np.ndarray  # 'S32'
    has_digest: np.ndarray  # bool


def check_chunk(root: str, names: List[str], decode: bool, digest: bool) -> CheckedChunk:
    """Read, decode and hash `names` under the folder `root`: what a check process runs on a chunk
    of names (it opens the files itself; only names and these columns cross the pipe)."""
    source = source_for(root)
    return checked_columns([inspect_bytes(lambda name=name: source.read_bytes(name), decode, digest)
                            for name in names])


def checked_columns(found: List[Tuple[Optional[str], Optional[bytes]]]) -> CheckedChunk:
    failed = [index for index, (reason, _) in enumerate(found) if reason is not None]
    digests = np.frombuffer(b"".join(sha or NO_DIGEST for _, sha in found), dtype="S32")
    has_digest = np.fromiter((sha is not None for _, sha in found), dtype=bool, count=len(found))
    return CheckedChunk(np.array(failed, dtype=np.int64), [found[index][0] for index in failed], digests, has_digest)


def check_workers(num_workers: Optional[int]) -> int:
    """Check processes for a folder's images (hardware.num_workers): None and -1 one per available
    core, 0 none (the check runs in this process)."""
    if num_workers is None or num_workers == -1:
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return int(num_workers)


def _leave_signals_to_the_scan() -> None:
    """A check process ignores SIGINT (a terminal's Ctrl-C reaches the whole process group) and
    dies on SIGTERM, whatever handlers it was forked with: the scan stops the pool."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def checked_chunks(source: Source, images: List[str], decode: bool, digest: bool,
                   processes: int) -> Iterator[Tuple[int, CheckedChunk]]:
    """(first image index, what the check found) for consecutive chunks of `images`, in order.

    A folder's images are checked by `processes` processes (decoding is CPU work the GIL would
    serialise), each opening the files itself; a bucket's on threads (they wait on the network);
    with no processes, in this process. The processes are started here, before the caller starts
    any thread of its own (a progress bar's)."""
    chunk = max(16, min(CHUNK_FILES, -(-len(images) // (8 * max(processes, 1)))))
    starts = range(0, len(images), chunk)
    if source.is_url:
        workers = min(16, 2 * (os.cpu_count() or 1))
        results = bounded_map(lambda name: inspect_bytes(lambda: source.read_bytes(name), decode, digest), images,
                              workers, window=64)
        return ((start, checked_columns(list(itertools.islice(results, chunk)))) for start in starts)
    if processes == 0:
        return ((start, check_chunk(source.location, images[start:start + chunk], decode, digest))
                for start in starts)
    return _pool_chunks(source.location, images, starts, chunk, decode, digest, processes)


def _process_context():
    """fork where it is safe, for it starts at once: on Linux, from a process with no other Python
    thread (none can hold a lock the child would need; native threads, OpenMP's, run nothing the
    child calls, and glibc's malloc is fork-safe). Else a fork server with this module loaded, or
    spawn: check_chunk needs nothing of this process but its arguments."""
    import multiprocessing
    import sys
    import threading

    if sys.platform.startswith("linux") and threading.active_count() == 1:
        return multiprocessing.get_context("fork")
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([__name__])
        return context
    return multiprocessing.get_context("spawn")


def _pool_chunks(root: str, images: List[str], starts: range, chunk: int, decode: bool, digest: bool,
                 processes: int) -> Iterator[Tuple[int, CheckedChunk]]:
    """check_chunk on `processes` processes, two chunks each in flight; the processes start before
    this returns. Left early (an error, an interrupt), the chunks not started are dropped and the
    processes end after their current one."""
    from concurrent.futures import ProcessPoolExecutor

    pool = ProcessPoolExecutor(processes, mp_context=_process_context(), initializer=_leave_signals_to_the_scan)
    submitted = ((start, pool.submit(check_chunk, root, images[start:start + chunk], decode, digest))
                 for start in starts)
    try:
        pending = deque(itertools.islice(submitted, 2 * processes))
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    return _pool_results(pool, pending, submitted, images, chunk)


def _pool_results(pool: Executor, pending: Deque[Tuple[int, Future]], submitted: Iterator[Tuple[int, Future]],
                  images: List[str], chunk: int) -> Iterator[Tuple[int, CheckedChunk]]:
    """The pool's results in order, one more chunk submitted for each that comes back: the names
    in flight, and the results waiting, stay a few chunks however many images there are."""
    from concurrent.futures.process import BrokenProcessPool

    finished = False
    try:
        while pending:
            first, future = pending.popleft()
            try:
                checked = future.result()
            except BrokenProcessPool:
                raise UserError(f"scan: a check process died (out of memory, or a decoder crashed) on one of the "
                                f"{len(images[first:first + chunk])} images from {escape_name(images[first])} on; "
                                f"hardware.num_workers=0 checks them in the scan's own process") from None
            pending.extend(itertools.islice(submitted, 1))
            yield first, checked
        finished = True
    finally:
        pool.shutdown(wait=finished, cancel_futures=True)


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
    classes = class_names(files)
    return classes, label_array(files, classes).tolist()


def class_names(files: Iterable[str]) -> List[str]:
    return sorted({f.split("/", 1)[0] for f in files if "/" in f})


def label_array(files: List[str], classes: List[str]) -> np.ndarray:
    """labels_for's labels as int64, for files whose classes are among `classes`."""
    index = {name: i for i, name in enumerate(classes)}
    unlabelled = -1 if classes else 0
    return np.fromiter((index[f.split("/", 1)[0]] if "/" in f else unlabelled for f in files), dtype=np.int64,
                       count=len(files))


def held_out_share(key: str) -> float:
    """Where `key` (a file name) falls in [0, 1), by a hash of the name alone: the same on every
    machine, run, seed, sampler and budget, so a held-out set stays put across the runs it compares."""
    digest = hashlib.blake2b(key.encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0 ** 64


def split_held_out(files: List[str], fraction: float, frames: Iterable[str] = ()) -> Tuple[List[str], List[str]]:
    """(candidates, held out): the files whose held_out_share is below `fraction` are held out. A
    video's frames go by the video's name, so a video is held out whole (its neighbouring frames
    would otherwise leak into the candidates). Refuses a split that leaves either side empty."""
    from app.data.video import parse_frame_name

    frames = set(frames)
    held = np.fromiter((held_out_share(parse_frame_name(f)[0] if f in frames else f) < fraction for f in files),
                       dtype=bool, count=len(files))
    n_held = int(held.sum())
    if n_held == 0:
        raise UserError(f"data.holdout_fraction={fraction:g} holds out none of the {len(files)} usable images "
                        f"(each is held out by a hash of its name): raise it, or use data.val_input_dir")
    if n_held == len(files):
        raise UserError(f"data.holdout_fraction={fraction:g} holds out all {len(files)} usable images, leaving "
                        f"none to select from: lower it, or use data.val_input_dir")
    return list(itertools.compress(files, ~held)), list(itertools.compress(files, held))


def duplicates_of(digests: np.ndarray, has_digest: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(duplicate, the first with its digest): positions, by duplicate. The first of equal digests
    is the earliest position, as a scan in this order would find them."""
    candidates = np.flatnonzero(has_digest)
    order = candidates[np.argsort(digests[candidates], kind="stable")]
    in_order = digests[order]
    starts = np.ones(len(order), dtype=bool)
    starts[1:] = in_order[1:] != in_order[:-1]
    firsts = order[np.maximum.accumulate(np.where(starts, np.arange(len(order)), 0))]
    duplicate = ~starts
    by_position = np.argsort(order[duplicate], kind="stable")
    return order[duplicate][by_position], firsts[duplicate][by_position]


def scan_stage(cfg: DictConfig, run_dir: Path, device=None) -> ScanResult:
    input_dir = resolve_input_dir(cfg.data)
    if is_url(input_dir) and cfg.get("storage_options") is not None:
        from omegaconf import OmegaConf

        from app.data.sources import configure_storage

        configure_storage(OmegaConf.to_container(cfg.storage_options, resolve=True))
    source = source_for(input_dir)
    executor = executor_for(cfg)
    storage_options = None  # the Ray workers' credentials for a bucket, handed to each task
    if executor.on_ray and source.is_url and cfg.get("storage_options") is not None:
        from omegaconf import OmegaConf

        storage_options = OmegaConf.to_container(cfg.storage_options, resolve=True)
    if not source.exists():
        raise UserError(f"data.input_dir={str(input_dir)!r} is not a folder" +
                        (" or a bucket prefix that this machine can read" if source.is_url else ""))
    missing: List[Tuple[str, str]] = []
    skipped: List[Tuple[str, str]] = []
    relevant = cfg.data.get("relevant_filenames_file")
    etags: Dict[str, Optional[str]] = {}  # a bucket's objects: the ETags that datasource.process_all=false keeps
    if relevant and source.is_url:
        listed, missing, skipped = read_relevant_objects(relevant, source)
        etags = dict(listed)
    elif relevant:
        names, missing, skipped = read_relevant_filenames(Path(relevant), Path(input_dir))
    else:
        names = []
        if executor.on_ray:
            from app.executors.ray_scan import list_files_on_ray

            listing = list_files_on_ray(executor, source.location, IMAGE_EXTENSIONS | VIDEO_EXTENSIONS,
                                        storage_options)
        else:
            listing = source.list_files(IMAGE_EXTENSIONS | VIDEO_EXTENSIONS)
        for found in listing:
            if found.problem is not None:
                skipped.append((found.name, found.problem))
            elif source.is_url:
                etags[found.name] = found.etag
            else:
                names.append(found.name)
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
        fresh = {name: etag for name, etag in etags.items() if seen.get(name) != etag}
        already_seen = len(etags) - len(fresh)
        if already_seen:
            log.info("scan: %d objects of %s were seen by an earlier run and are skipped "
                     "(datasource.process_all=true scans them again)", already_seen, source)
        if etags and not fresh:
            raise UserError(f"no new objects under {source}: all {len(etags)} were processed by an earlier run "
                            f"(state in {state_path}); set datasource.process_all=true to process them again")
        etags = fresh
    if source.is_url:
        names = list(etags)
    names.sort()
    videos = [name for name in names if is_video(name)]
    images = [name for name in names if not is_video(name)] if videos else names
    if not names:
        where = f"listed in {relevant}" if relevant else f"under {input_dir}"
        raise UserError(f"no usable images or videos {where} (looked for "
                        f"{', '.join(sorted(IMAGE_EXTENSIONS | VIDEO_EXTENSIONS))}"
                        f"{f'; {len(skipped)} not used, see the log' if skipped else ''})")

    corrupt: List[Tuple[str, str]] = []
    decode, digest = bool(cfg.enable_corruptness_check), bool(cfg.remove_exact_duplicates)
    failed = np.zeros(len(images), dtype=bool)
    digests = np.zeros(len(images) if digest else 0, dtype="S32")
    has_digest = np.zeros(len(digests), dtype=bool)
    frames: List[str] = []
    frame_duplicates: List[Tuple[str, str]] = []
    video_info: Dict[str, dict] = {}
    checks = None
    if (decode or digest) and executor.on_ray:
        from functools import partial

        from app.executors.ray_scan import chunks_on_ray

        checks = chunks_on_ray(executor, partial(check_chunk, source.location), images, storage_options,
                               decode=decode, digest=digest)
    elif decode or digest:
        processes = 0 if source.is_url else check_workers(cfg.hardware.get("num_workers"))
        checks = checked_chunks(source, images, decode, digest, processes)
    with Progress(len(images) + len(videos), "scan") as bar:
        if checks is not None:
            with closing(checks):  # an interrupt stops the check processes now, not when the traceback goes
                for start, checked in checks:
                    failed[start + checked.failed] = True
                    for position, reason in zip(checked.failed.tolist(), checked.reasons):
                        corrupt.append((images[start + position], reason))
                        log.warning("corrupt image skipped: %s (%s)", images[start + position], reason)
                    if digest:
                        stop = start + len(checked.digests)
                        digests[start:stop], has_digest[start:stop] = checked.digests, checked.has_digest
                    bar.update(len(checked.digests))
        else:
            bar.update(len(images))
        duplicate, first = duplicates_of(digests, has_digest)
        if videos:
            first_frame_with_digest: Dict[str, str] = {}
            unique = np.flatnonzero(has_digest)
            unique = np.setdiff1d(unique, duplicate, assume_unique=True)
            unique = unique[np.argsort(digests[unique])]
            unique_digests = digests[unique]

            def first_image_with(sha: str) -> Optional[str]:
                value = np.array(bytes.fromhex(sha), dtype="S32")
                at = int(np.searchsorted(unique_digests, value))
                return images[unique[at]] if at < len(unique) and unique_digests[at] == value else None

            def check(name: str, reason: Optional[str], sha: Optional[str]) -> None:
                if reason is not None:
                    corrupt.append((name, reason))
                    log.warning("corrupt image skipped: %s (%s)", name, reason)
                elif sha is not None:
                    earlier = first_image_with(sha) or first_frame_with_digest.get(sha)
                    if earlier is not None:
                        frame_duplicates.append((name, earlier))
                    else:
                        first_frame_with_digest[sha] = name

            threshold = float(cfg.get("corruptness_check", {}).get("corruption_threshold", 0.1))
            use_metadata = bool(datasource is not None and datasource.use_frame_count_metadata)
            workers = min(4, 2 * (os.cpu_count() or 1))

            def scan_one(video: str):
                opener = (lambda: source.open(video)) if source.is_url else (lambda: str(source.local_path(video)))
                return scan_video(opener, video, decode, digest, threshold, use_metadata)

            # a few videos at a time: each holds one decoded frame and its demuxer's buffers
            for found in bounded_map(scan_one, videos, workers=workers, window=workers):
                if found.problem:
                    corrupt.append((found.video, found.problem))
                    log.warning("video %s: %s", found.video, found.problem)
                for name, reason, sha in found.frames:
                    frames.append(name)
                    check(name, reason, sha)
                video_info[found.video] = found.summary()
                bar.update(1)

    n_duplicates = len(duplicate) + len(frame_duplicates)
    classes = class_names(itertools.chain(images, frames))
    keep = ~failed
    keep[duplicate] = False
    left_out_frames = {name for name, _ in corrupt} | {name for name, _ in frame_duplicates}
    good = list(heapq.merge(itertools.compress(images, keep), sorted(f for f in frames if f not in left_out_frames)))
    n_usable = len(good)
    holdout_fraction = float(cfg.data.get("holdout_fraction") or 0.0)
    held_out: List[str] = []
    if holdout_fraction > 0:
        good, held_out = split_held_out(good, holdout_fraction, frames)

    artifacts.write_input_files(run_dir, good, label_array(good, classes))
    if held_out:
        artifacts.write_holdout_files(run_dir, held_out, label_array(held_out, classes))
    else:  # an earlier scan's in this run directory would be read as this one's
        (run_dir / HOLDOUT_FILES).unlink(missing_ok=True)
    artifacts.write_dataset(run_dir, Dataset(source.location, classes))
    artifacts.write_corrupt_files(run_dir, corrupt)
    artifacts.write_duplicate_files(run_dir, itertools.chain(
        ((images[d], images[f]) for d, f in zip(duplicate.tolist(), first.tolist())), frame_duplicates))
    artifacts.write_missing_files(run_dir, missing)
    artifacts.write_unused_files(run_dir, skipped)
    result = ScanResult(n_files=len(images) + len(frames), n_images=len(good), n_corrupt=len(corrupt),
                        n_duplicates=n_duplicates, n_missing=len(missing), n_classes=len(classes),
                        input_dir=str(source.location), n_videos=len(videos), n_video_frames=len(frames),
                        n_unused=len(skipped), n_already_seen=already_seen, n_held_out=len(held_out))
    if held_out:
        result.artifacts.append(HOLDOUT_FILES)
    if videos:
        artifacts.write_videos(run_dir, video_info)
        result.artifacts.append(VIDEOS)
    if state_path is not None:
        save_seen(state_path, source.location, {**seen, **{name: etag for name, etag in etags.items() if etag}})
    log.info("scan: %d images and %d video frames (%d videos) in %s: %d usable, %d corrupt, %d exact "
             "duplicates, %d listed but missing, %d not used (%s); %d classes", len(images), len(frames),
             len(videos), source, n_usable, len(corrupt), n_duplicates, len(missing), len(skipped),
             UNUSED_FILES, len(classes))
    if held_out:
        log.info("scan: %d images held out for evaluation (data.holdout_fraction=%g; %s), %d left to select from",
                 len(held_out), holdout_fraction, HOLDOUT_FILES, len(good))
    return result
