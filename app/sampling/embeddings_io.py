"""Embeddings in lightly's CSV format (`filenames,embedding_0,...,embedding_{D-1},labels`), read
and written in one place, as lightly's utils/io.py does.

Both directions stream: pyarrow parses and formats blocks of rows in C++, the matrix is filled (or
read) one block at a time, and no N×d Python objects exist. A million rows × 512 is a 5 GB text
file; reading it holds the float32 matrix, the names and one block.

A low-floor module without torch: the datapool, the report and the config check read a CSV
without loading the embed stage. pyarrow is imported when a CSV is read or written, not on import.
"""
from __future__ import annotations

import csv
import ctypes
import io
import mmap
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import chain, repeat
from pathlib import Path
from typing import List, Sequence, Tuple

import numpy as np

from app import atomic
from app.errors import UserError

# Bytes pyarrow parses per batch (at d = 512, ~750 rows), and rows the writer formats per chunk:
# large enough that per-batch overhead vanishes, small enough to be a rounding error beside the matrix.
BLOCK_BYTES = 4 << 20
WRITE_ROWS = 4096
# Bytes per read when counting lines before parsing.
SCAN_BYTES = 64 << 20

INT64 = np.iinfo(np.int64)


def embeddings_header(dim: int) -> List[str]:
    return ["filenames", *(f"embedding_{i}" for i in range(dim)), "labels"]


def is_embeddings_header(header: Sequence[str]) -> bool:
    """Whether `header` is the lightly header for some dimension >= 1."""
    header = list(header)
    return len(header) >= 3 and header == embeddings_header(len(header) - 2)


def write_embeddings_csv(path: Path, files: Sequence[str], vectors, labels: Sequence[int]) -> None:
    """The lightly format, written atomically in chunks of rows. `vectors` is an (N, d) array, a
    memmap, or anything with `.shape` whose slices `vectors[a:b]` are arrays: only a few chunks are
    ever in memory. Values are written as the shortest text that reads back as the same float32;
    names are quoted where csv needs it, and a surrogate-escaped name gets its bytes back.
    Formatting floats is most of the work, so chunks are formatted on a thread per core (pyarrow
    lets go of the GIL) and written in order."""
    n_rows, dim = (int(size) for size in vectors.shape)
    labels = np.asarray(labels, dtype=np.int64)
    if len(files) != n_rows or len(labels) != n_rows:
        raise ValueError(f"{len(files)} files, {n_rows} vectors and {len(labels)} labels: one of each per row")

    def format_chunk(start: int) -> bytes:
        stop = min(start + WRITE_ROWS, n_rows)
        rows = vectors[start:stop]
        text = _format_rows(files[start:stop], rows, labels[start:stop])
        if isinstance(rows, np.memmap) and rows.mode != "c":
            _forget_mapped_pages(rows)
        return text

    workers = os.cpu_count() or 1
    with atomic.atomic_path(path) as tmp, open(tmp, "wb") as handle, ThreadPoolExecutor(workers) as pool:
        handle.write(",".join(embeddings_header(dim)).encode("ascii") + b"\n")
        pending: deque = deque()
        for start in range(0, n_rows, WRITE_ROWS):
            pending.append(pool.submit(format_chunk, start))
            if len(pending) > workers:  # a bounded queue: memory stays at a few chunks
                handle.write(pending.popleft().result())
        while pending:
            handle.write(pending.popleft().result())


def _format_rows(files: Sequence[str], vectors, labels: np.ndarray) -> bytes:
    """Rows of the CSV: pyarrow formats the numbers (shortest float32 text), Python puts the names first."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    columns = np.ascontiguousarray(np.asarray(vectors, dtype=np.float32).T)
    batch = pa.record_batch([*map(pa.array, columns), pa.array(labels)], names=embeddings_header(len(columns))[1:])
    numbers = io.BytesIO()
    pacsv.write_csv(batch, numbers, pacsv.WriteOptions(include_header=False, quoting_style="none",
                                                       batch_size=max(len(labels), 1)))
    lines = numbers.getvalue().split(b"\n")  # numbers never hold a line end; a name may
    return b"".join(chain.from_iterable(zip(map(_csv_field, files), repeat(b","), lines, repeat(b"\n"))))


def _forget_mapped_pages(rows: np.memmap) -> None:
    """Unmap the pages of rows already written: read through a file mapping they count in the
    process's RSS until unmapped, so writing a 2 GB `.npy` would add 2 GB to the stage's peak.
    The data stays in the file and the page cache (a shared mapping: nothing is lost; a page
    shared with the next rows is read back in when touched)."""
    advice = getattr(mmap, "MADV_DONTNEED", None)
    if advice is None or not rows.nbytes:
        return
    madvise = ctypes.CDLL(None).madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    first_page = rows.ctypes.data // mmap.PAGESIZE * mmap.PAGESIZE
    madvise(first_page, rows.ctypes.data + rows.nbytes - first_page, advice)


def _csv_field(name: str) -> bytes:
    """`name` as a CSV field, encoded as the file system gave it: quoted as csv.writer quotes, and
    also for a lone carriage return (which csv.writer with \\n line ends leaves bare, and every CSV
    reader then takes for a line end)."""
    if any(special in name for special in ',"\r\n'):
        name = '"' + name.replace('"', '""') + '"'
    return name.encode("utf-8", "surrogateescape")


def read_embeddings_csv(path: Path, strict: bool = False) -> Tuple[List[str], np.ndarray, np.ndarray]:
    """Read the lightly format: (file names, float32 (N, d) vectors, int64 labels). `strict` (a file
    the user brought) checks every line and refuses a malformed one with its line number and what
    is wrong. pyarrow parses the file block by block into a matrix sized from a count of its lines;
    where a block fails a check, the csv module reads on from that block's first row, row by row,
    to name the exact line (or to read what pyarrow's parser refuses and Python's accepts)."""
    return _Reader(Path(path), strict).read()


@dataclass
class _Layout:
    """What one pass over the bytes tells: an upper bound on the rows, and whether a row is one line."""

    size: int
    lines: int
    has_quotes: bool
    bare_cr: bool

    @property
    def row_bound(self) -> int:
        """Each row but the last ends with a line end; a quoted line end only makes this larger."""
        return max(self.lines - 1, 0)

    @property
    def rows_are_lines(self) -> bool:
        return not self.has_quotes and not self.bare_cr


def _scan(path: Path) -> _Layout:
    lf = cr = crlf = 0
    has_quotes = False
    last = b""
    with open(path, "rb") as handle:
        while chunk := handle.read(SCAN_BYTES):
            lf += chunk.count(b"\n")
            chunk_cr = chunk.count(b"\r")
            if chunk_cr or last == b"\r":
                cr += chunk_cr
                crlf += chunk.count(b"\r\n") + (last == b"\r" and chunk[:1] == b"\n")
            has_quotes = has_quotes or b'"' in chunk
            last = chunk[-1:]
        size = handle.tell()
    lines = lf + cr - crlf + (last not in (b"", b"\n", b"\r"))
    return _Layout(size, lines, has_quotes, cr != crlf)


class _Reader:
    """One read: the matrix and labels preallocated for the most rows the file can hold, filled by
    the fast path and, from the first block it cannot take, by the exact pass."""

    def __init__(self, path: Path, strict: bool):
        self.path, self.strict = path, strict
        self.files: List[str] = []

    def refuse(self, line: int, reason: str) -> UserError:
        return UserError(f"embeddings={str(self.path)!r} is malformed at line {line}: {reason}")

    def read(self) -> Tuple[List[str], np.ndarray, np.ndarray]:
        # A name that is not UTF-8 reads (surrogate-escaped) as no file the scan uses, instead of failing.
        with open(self.path, newline="", encoding="utf-8", errors="surrogateescape") as handle:
            header = next(csv.reader(handle), None)
        if header is None:
            raise self.refuse(1, "the file is empty; expected the header filenames,embedding_0,...,labels")
        self.dim = len(header) - 2
        if (self.strict or self.dim < 1) and not is_embeddings_header(header):
            raise self.refuse(1, f"the header must be filenames,embedding_0,...,embedding_{{D-1}},labels, "
                                 f"not {','.join(header[:3])}{',...' if len(header) > 3 else ''}")
        self.layout = _scan(self.path)
        self.vectors = np.empty((self.layout.row_bound, self.dim), dtype=np.float32)
        self.labels = np.empty(self.layout.row_bound, dtype=np.int64)
        if self.layout.row_bound:
            self._read_blocks()
        n_rows = len(self.files)
        if self.strict and not n_rows:
            raise self.refuse(2, "the file has a header but no rows")
        if n_rows < self.layout.row_bound:  # realloc in place: the untouched tail was never in memory
            self.vectors.resize((n_rows, self.dim), refcheck=False)
            self.labels.resize(n_rows, refcheck=False)
        return self.files, self.vectors, self.labels

    def _read_blocks(self) -> None:
        """The fast path: pyarrow batches; the first batch that fails a check goes to `_read_rows`."""
        import pyarrow as pa
        import pyarrow.csv as pacsv

        names = embeddings_header(self.dim)
        bytes_per_line = -(-self.layout.size // self.layout.lines)
        read_options = pacsv.ReadOptions(column_names=names, skip_rows=1,
                                         block_size=min(max(BLOCK_BYTES, 64 * bytes_per_line), 1 << 30))
        parse_options = pacsv.ParseOptions(newlines_in_values=self.layout.has_quotes, ignore_empty_lines=False)
        types = {"filenames": pa.binary(), **{name: pa.float32() for name in names[1:-1]}, "labels": pa.int64()}
        convert_options = pacsv.ConvertOptions(column_types=types, null_values=[], strings_can_be_null=False,
                                               quoted_strings_can_be_null=False)
        seen: set = set()
        try:
            reader = pacsv.open_csv(self.path, read_options, parse_options, convert_options)
            for batch in reader:
                if not batch.num_rows:
                    continue
                start, stop = len(self.files), len(self.files) + batch.num_rows
                batch_files = _decode_names(batch.column(0))
                block = self.vectors[start:stop]
                block[...] = batch.select(range(1, self.dim + 1)).to_tensor(row_major=True).to_numpy()
                self.labels[start:stop] = batch.column(self.dim + 1).to_numpy()
                if self.strict and not self._block_passes(batch_files, block, seen):
                    break
                self.files.extend(batch_files)
            else:
                return
        except pa.ArrowInvalid:  # a parse or conversion error somewhere in the next batch
            pass
        del seen
        self._read_rows()

    def _block_passes(self, batch_files: List[str], block: np.ndarray, seen: set) -> bool:
        """The strict checks pyarrow's parser does not make: names set and unique, values finite."""
        before = len(seen)
        seen.update(batch_files)
        # max and min carry a NaN through, and show an infinity, without an N×d temporary
        return (len(seen) == before + len(batch_files) and "" not in batch_files
                and bool(np.isfinite(block.max()) and np.isfinite(block.min())))

    def _read_rows(self) -> None:
        """The exact pass: the csv module, from the first row not yet read to the end of the file,
        checking each row as the reader always has and naming the physical line a row starts on."""
        first = len(self.files)
        with open(self.path, "rb") as raw:
            if self.layout.rows_are_lines:  # jump to line first + 2 (the header is line 1)
                raw.seek(_offset_after_lines(raw, first + 1))
                lines_before = first + 1
            else:
                lines_before = 0
            reader = csv.reader(io.TextIOWrapper(raw, encoding="utf-8", errors="surrogateescape", newline=""))
            if not lines_before:
                next(reader)  # the header
                for _ in range(first):
                    next(reader)
            seen = set(self.files) if self.strict else set()
            line = lines_before + reader.line_num + 1
            for row in reader:
                self._take_row(row, line, seen)
                line = lines_before + reader.line_num + 1

    def _take_row(self, row: List[str], line: int, seen: set) -> None:
        dim = self.dim
        if len(row) != dim + 2:
            raise self.refuse(line, f"{len(row)} fields, the header has {dim + 2}")
        name = row[0]
        if self.strict:
            if not name:
                raise self.refuse(line, "the file name is empty")
            if name in seen:
                raise self.refuse(line, f"{name!r} appears twice")
            seen.add(name)
        try:
            values = [float(v) for v in row[1:1 + dim]]
        except ValueError as error:
            raise self.refuse(line, f"not a number: {error}") from None
        with np.errstate(over="ignore"):  # 1e39 is a float, and an infinite float32
            vector = np.array(values, dtype=np.float32)
        if self.strict and not np.isfinite(vector).all():
            raise self.refuse(line, "an embedding value is NaN or infinite")
        try:
            label = int(row[-1])
        except ValueError:
            raise self.refuse(line, f"the label {row[-1]!r} is not an integer") from None
        if not INT64.min <= label <= INT64.max:
            raise self.refuse(line, f"the label {row[-1]!r} does not fit in 64 bits")
        index = len(self.files)
        self.vectors[index] = vector
        self.labels[index] = label
        self.files.append(name)


def _decode_names(column) -> List[str]:
    """Names as str; bytes that are not UTF-8 surrogate-escaped, as open(errors="surrogateescape") reads them."""
    import pyarrow as pa

    try:
        return column.cast(pa.string()).to_pylist()
    except pa.ArrowInvalid:
        return [name.decode("utf-8", "surrogateescape") for name in column.to_pylist()]


def _offset_after_lines(raw, n_lines: int) -> int:
    """The byte offset just past the `n_lines`-th b"\\n" of a file whose lines all end with one."""
    raw.seek(0)
    offset = 0
    while chunk := raw.read(SCAN_BYTES):
        count = chunk.count(b"\n")
        if count < n_lines:
            n_lines -= count
            offset += len(chunk)
            continue
        position = -1
        for _ in range(n_lines):
            position = chunk.index(b"\n", position + 1)
        return offset + position + 1
    return offset
