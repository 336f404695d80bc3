"""Atomic file writes: write a temporary sibling, fsync it, then rename over the target, so a reader
(or a resumed run) never sees a half-written artifact, not even after a power cut."""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Iterable


# mkstemp makes files 0600; an artifact gets the mode any other new file would (0644 with the usual
# umask), so a host user can read what a container running under another uid wrote.
_UMASK = os.umask(0)
os.umask(_UMASK)


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it replaces `path`, on error it goes.
    Both the data and the rename reach the disk before this returns (fsync of the file, then of
    the folder), so after a crash `path` holds the old content or the new, never an empty file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        default_mode(Path(tmp))
        fsync(Path(tmp))
        os.replace(tmp, path)
        fsync(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def default_mode(path: Path) -> None:
    """The mode a plain open() would have given (mkstemp makes files 0600)."""
    os.chmod(path, 0o666 & ~_UMASK)


def fsync(path: Path) -> None:
    """Flush a file's data, or a folder's entries (a rename), to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_lines(path: Path, lines: Iterable[str]) -> None:
    """One line each, streamed to the file: a million names never become one string."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as handle:
        handle.writelines(f"{line}\n" for line in lines)


def write_csv(path: Path, header: Iterable[str], rows: Iterable[Iterable[Any]]) -> None:
    """A CSV (csv module quoting, \\n line ends), streamed row by row to the file."""
    import csv

    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(list(header))
        writer.writerows(rows)


def read_lines(path: Path) -> list[str]:
    """The lines write_lines wrote, blank ones left out. Split at newlines only, as written
    (str.splitlines would also split at \\x1c, \\x85, U+2028 ...); a CRLF file reads the same."""
    lines = (line.removesuffix("\r") for line in Path(path).read_text(encoding="utf-8").split("\n"))
    return [line for line in lines if line.strip()]


def read_json_object(path: Path) -> dict:
    """A JSON object from `path`, or {} when it is missing, unreadable, malformed or not an object:
    for reading other runs' files, which may be partial."""
    import json

    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
