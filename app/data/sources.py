"""Where the input lives: a folder, or a bucket prefix given as an fsspec URL (s3://, gs://, az://).

`Source` lists, stats, reads and opens files by their name relative to the root, the same way for
both, so the scan stage and `open_image` do not care which it is. Bucket listings are paged and
consumed lazily; nothing copies the bucket first. Credentials reach the filesystems through
`configure_storage` (the config's `storage_options`, whose secrets come from `${secret:NAME}`).
"""
from __future__ import annotations

import errno
import json
import os
import re
import stat
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import (Any, BinaryIO, Callable, Deque, Dict, Iterable, Iterator, List, NamedTuple, Optional, Set, Tuple,
                    TypeVar, Union)

from app.artifacts import LOCK
from app.data.locations import URL_PATTERN, as_location, is_url, staging_dir
from app.data.names import name_problem

T = TypeVar("T")
R = TypeVar("R")
# Protocol names that fsspec registers under another name.
CANONICAL_PROTOCOL = {"s3a": "s3", "gcs": "gs", "abfs": "az", "abfss": "az"}
# fsspec's own names for the options of each protocol's filesystem.
FSSPEC_CONFIG_NAMES = {"s3": ("s3", "s3a"), "gs": ("gs", "gcs"), "az": ("az", "abfs", "abfss")}


def configure_storage(storage_options: Optional[Dict[str, Any]]) -> None:
    """Make `storage_options` (per protocol; null values left out) the defaults of every fsspec
    filesystem this process and its forked DataLoader workers create."""
    import fsspec.config

    _sources.clear()  # their filesystems were made with the options before
    for protocol, options in (storage_options or {}).items():
        if not options:
            continue
        kept = {key: value for key, value in dict(options).items() if value is not None}
        for name in FSSPEC_CONFIG_NAMES.get(protocol, (protocol,)):
            fsspec.config.conf[name] = dict(kept)


def configure_storage_for(cfg) -> None:
    """The run's `storage_options`, when it reaches a bucket (data.input_dir or work_dir): set once
    by the run in its process (and by each torchrun worker), never by checking a config."""
    options = cfg.get("storage_options")
    if options is not None and (is_url(cfg.data.get("input_dir")) or is_url(cfg.get("work_dir"))):
        from omegaconf import OmegaConf

        configure_storage(OmegaConf.to_container(options, resolve=True))


def bounded_map(function: Callable[[T], R], items: Iterable[T], workers: int, window: int = 0) -> Iterator[R]:
    """`function` over `items` on `workers` threads, results in input order, with at most `window`
    calls in flight or waiting to be consumed: memory stays bounded however many items there are."""
    window = window or 4 * workers
    with ThreadPoolExecutor(workers) as pool:
        pending = deque()
        for item in items:
            pending.append(pool.submit(function, item))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


class Listed(NamedTuple):
    """A file found under a root: to be used when `problem` is None, else listed as skipped, with it."""
    name: str
    etag: Optional[str] = None
    problem: Optional[str] = None


_FILE_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
               (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a folder"))


def file_kind(mode: int) -> str:
    return next((kind for test, kind in _FILE_KINDS if test(mode)), "not a regular file")


def special_file_problem(path: str) -> str:
    """Why `path`, which is not a regular file (nor a link to one), is not used."""
    try:
        return f"not a regular file: {file_kind(os.stat(path).st_mode)}"
    except FileNotFoundError:
        return "a link to nothing (dangling symlink)" if os.path.islink(path) else "no such file"
    except OSError as error:
        return "a symlink loop" if error.errno == errno.ELOOP else f"not readable: {error.strerror}"


def open_regular_file(path: str) -> BinaryIO:
    """`path` opened for reading if it is a regular file. Opened without blocking and checked once
    open, so that a FIFO or device put in a file's place after the listing is refused, never
    waited on (a blocked open would hang a reader thread for good)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise OSError(errno.EINVAL, f"not a regular file: {file_kind(mode)}", path)
        os.set_blocking(fd, True)  # a regular file's reads block anyway; a FUSE filesystem may heed the flag
        return open(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular_file(path: str) -> bytes:
    """The bytes of `path` if it is a regular file (refused as open_regular_file refuses it), read
    with raw reads sized by its stat: the scan reads a million small files."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, f"not a regular file: {file_kind(info.st_mode)}", path)
        os.set_blocking(fd, True)
        parts = []
        while part := os.read(fd, max(info.st_size + 1, 1 << 16) if not parts else 1 << 20):
            parts.append(part)
        return b"".join(parts)
    finally:
        os.close(fd)


def _is_folder(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def _is_regular_file(entry: os.DirEntry) -> bool:
    """A regular file or a link to one (DirEntry knows the type without a stat, except for links)."""
    try:
        return entry.is_file()
    except OSError:
        return False


class Source:
    """A folder or a bucket prefix whose files are named relative to it."""

    def __init__(self, root: Union[str, Path]):
        self.location = as_location(root).rstrip("/") or "/"
        self.is_url = is_url(self.location)
        if self.is_url:
            import fsspec

            self.fs, self._root = fsspec.core.url_to_fs(self.location)
            self._root = self._root.rstrip("/")
            self.protocol = CANONICAL_PROTOCOL.get(URL_PATTERN.match(self.location)["protocol"],
                                                   URL_PATTERN.match(self.location)["protocol"])
        else:
            self.fs, self._root, self.protocol = None, self.location, "file"

    def __str__(self) -> str:
        return self.location

    def _path(self, name: str) -> str:
        return f"{self._root}/{name}"

    def exists(self) -> bool:
        if not self.is_url:
            return Path(self._root).is_dir()
        try:
            return self.fs.isdir(self._root) or self.fs.exists(self._root)
        except FileNotFoundError:
            return False

    # -- listing -------------------------------------------------------------------------------
    def list_files(self, extensions: Iterable[str]) -> Iterator[Listed]:
        """Every file under the root whose extension is in `extensions`, hidden names skipped, in
        no particular order; lazily, a page of a bucket at a time. An entry with a `problem` is
        not to be used or opened (app/data/names.py; in a folder, also anything that is not a
        regular file, and unreadable folders)."""
        wanted = {e.lower() for e in extensions}
        if not self.is_url:
            yield from self._walk_folder(wanted)
            return
        prefix = self._root + "/"
        for info in self._list_objects():
            path = info["name"]
            if info.get("type", "file") != "file" or not path.startswith(prefix):
                continue
            name = path[len(prefix):]
            parts = name.split("/")
            if not any(p.startswith(".") for p in parts) and os.path.splitext(parts[-1])[1].lower() in wanted:
                yield Listed(name, etag_of(info), name_problem(name))

    def _walk_folder(self, wanted: Set[str]) -> Iterator[Listed]:
        """Each folder is entered once, by (device, inode): a link to an ancestor or a second way
        to a folder adds nothing and is listed as skipped. Linked folders are entered after the
        real ones, so that a file is named by its real path where it has one."""
        top = os.stat(self._root)
        entered = {(top.st_dev, top.st_ino): ""}
        folders: List[str] = [""]
        linked: Deque[str] = deque()
        while folders or linked:
            if folders:
                folder = folders.pop()
            else:
                folder = linked.popleft()
                problem = self._enter(folder, entered)
                if problem is not None:
                    yield Listed(folder, problem=problem)
                    continue
            try:
                with os.scandir(self._path(folder) if folder else self._root) as scan:
                    entries = list(scan)
            except OSError as error:
                yield Listed(folder or ".", problem=f"folder not readable: {error.strerror}")
                continue
            subfolders, links = [], []
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                name = f"{folder}/{entry.name}" if folder else entry.name
                if _is_folder(entry):
                    problem = name_problem(entry.name)
                    if problem is not None:
                        yield Listed(name, problem=f"folder {problem}: not entered")
                    else:
                        (links if entry.is_symlink() else subfolders).append(name)
                    continue
                if os.path.splitext(entry.name)[1].lower() not in wanted:
                    continue
                problem = name_problem(entry.name)
                if problem is None and not _is_regular_file(entry):
                    problem = special_file_problem(entry.path)
                yield Listed(name, problem=problem)
            for name in sorted(subfolders, reverse=True):  # popped in sorted order
                problem = self._enter(name, entered)
                if problem is None:
                    folders.append(name)
                else:
                    yield Listed(name, problem=problem)
            linked.extend(sorted(links))

    def _enter(self, folder: str, entered: Dict[Tuple[int, int], str]) -> Optional[str]:
        """Note `folder` as entered; or why not: it was entered already, by another way to it."""
        try:
            info = os.stat(self._path(folder))
        except OSError as error:
            return f"folder not readable: {error.strerror}"
        key = (info.st_dev, info.st_ino)
        if key in entered:
            return f"folder scanned already, as {entered[key] or 'the input folder'}"
        entered[key] = folder
        return None

    def _list_objects(self) -> Iterator[dict]:
        if self.protocol == "s3" and hasattr(self.fs, "_iterdir"):
            yield from self._list_s3_pages()
            return
        for _folder, _dirs, files in self.fs.walk(self._root, detail=True):
            yield from files.values()

    def _list_s3_pages(self) -> Iterator[dict]:
        """list_objects_v2 page by page (no delimiter: one flat listing, no per-folder calls)."""
        from fsspec.asyn import sync

        bucket, _, key_prefix = self._root.partition("/")
        pages = self.fs._iterdir(bucket, delimiter="", prefix=key_prefix + "/" if key_prefix else "")

        async def next_page(size: int = 1000) -> List[dict]:
            page = []
            async for info in pages:
                page.append(info)
                if len(page) >= size:
                    break
            return page

        while True:
            page = sync(self.fs.loop, next_page)
            if not page:
                return
            yield from page

    # -- single files --------------------------------------------------------------------------
    def etag(self, name: str) -> Optional[str]:
        """The object's ETag (a folder's file: its size and modification time); None if absent."""
        try:
            if not self.is_url:
                stat = os.stat(self._path(name))
                return f"{stat.st_size}-{stat.st_mtime_ns}"
            info = self.fs.info(self._path(name))
        except (FileNotFoundError, NotADirectoryError):
            return None
        if info.get("type", "file") != "file":
            return None
        return etag_of(info)

    def read_bytes(self, name: str) -> bytes:
        if not self.is_url:
            return read_regular_file(self._path(name))
        return self.fs.cat_file(self._path(name))

    def open(self, name: str):
        """A binary, seekable file object (a bucket object is read in blocks, not all at once)."""
        if not self.is_url:
            return open_regular_file(self._path(name))
        return self.fs.open(self._path(name), "rb")

    def local_path(self, name: str) -> Path:
        return Path(self._path(name))


def etag_of(info: dict) -> str:
    for key in ("ETag", "etag", "md5Hash", "generation"):
        if info.get(key):
            return str(info[key]).strip('"')
    return f"{info.get('size')}-{info.get('LastModified') or info.get('mtime') or info.get('last_modified')}"


_sources: Dict[str, Source] = {}


def source_for(root: Union[str, Path]) -> Source:
    """One Source per root and process (fsspec caches the filesystems behind them as well)."""
    location = as_location(root)
    source = _sources.get(location)
    if source is None:
        source = _sources[location] = Source(location)
    return source


# ---------------------------------------------------------------------------------------------
# datasource.process_all=false: what earlier runs saw
# ---------------------------------------------------------------------------------------------
def datasource_state_path(work_dir: str, location: str) -> str:
    """`<work_dir>/datasource/<the input URL as a file name>.json`; in the bucket when work_dir is
    one, so that the next run finds it wherever it runs."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", location).strip("_")
    if is_url(work_dir):
        return f"{str(work_dir).rstrip('/')}/datasource/{safe}.json"
    return str(Path(work_dir) / "datasource" / f"{safe}.json")


def load_seen(path: str) -> Dict[str, str]:
    if is_url(path):
        import fsspec

        try:
            with fsspec.open(path, "rt", encoding="utf-8") as handle:
                return dict(json.load(handle).get("objects", {}))
        except FileNotFoundError:
            return {}
    if not Path(path).is_file():
        return {}
    return dict(json.loads(Path(path).read_text(encoding="utf-8")).get("objects", {}))


def save_seen(path: str, location: str, objects: Dict[str, str]) -> None:
    from app import atomic

    state = {"input": location, "objects": dict(sorted(objects.items()))}
    if is_url(path):
        import fsspec

        with fsspec.open(path, "wt", encoding="utf-8") as handle:  # an object appears whole or not at all
            json.dump(state, handle, indent=1)
        return
    atomic.write_json(Path(path), state)


# ---------------------------------------------------------------------------------------------
# work_dir=s3://...: runs are staged in a local folder (locations.staging_dir) and copied up after
# every stage
# ---------------------------------------------------------------------------------------------
# run directory -> {file: (size, mtime_ns)} as last copied up by this process
_uploaded: Dict[Path, Dict[Path, Tuple[int, int]]] = {}


def _remote_run_directory(run_dir: Path, work_dir_url: str):
    import fsspec

    fs, root = fsspec.core.url_to_fs(work_dir_url.rstrip("/"))
    try:
        relative = Path(run_dir).resolve().relative_to(staging_dir(work_dir_url).resolve()).as_posix()
    except ValueError:
        relative = Path(run_dir).name
    return fs, f"{root.rstrip('/')}/{relative}"


def download_run_directory(run_dir: Path, work_dir_url: str) -> int:
    """Copy a run directory's files from under `work_dir_url` into the staging folder (files
    already there are kept); returns how many were copied."""
    fs, target = _remote_run_directory(run_dir, work_dir_url)
    try:
        remote = fs.find(target)
    except FileNotFoundError:
        return 0
    copied = 0
    for key in remote:
        local = Path(run_dir) / key[len(target) + 1:]
        if not local.exists():
            local.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(key, str(local))
            copied += 1
    return copied


def upload_run_directory(run_dir: Path, work_dir_url: str) -> int:
    """Copy the run directory's new and changed files (not its lock) to the same place under
    `work_dir_url`; returns how many were copied."""
    run_dir = Path(run_dir)
    fs, target = _remote_run_directory(run_dir, work_dir_url)
    sent = _uploaded.setdefault(run_dir, {})
    copied = 0
    for path in sorted(p for p in run_dir.rglob("*") if p.is_file() and p.name != LOCK):
        stat = path.stat()
        if sent.get(path) == (stat.st_size, stat.st_mtime_ns):
            continue
        fs.put_file(str(path), f"{target}/{path.relative_to(run_dir).as_posix()}")
        sent[path] = (stat.st_size, stat.st_mtime_ns)
        copied += 1
    return copied
