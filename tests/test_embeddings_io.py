"""The lightly embeddings CSV: what the writer writes reads back exactly (here and in lightly), and
the strict reader refuses each malformed line with its physical line number, also where pyarrow's
fast path finds the fault in a late block and the csv module has to name the line."""
from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pytest

from app.errors import UserError
from app.sampling import embeddings_io
from app.sampling.embeddings_io import read_embeddings_csv, write_embeddings_csv

HEADER = "filenames,embedding_0,embedding_1,labels"
ODD_NAMES = ["plain.png", "with,comma.png", 'with"quote".png', "two\nlines.png", "carriage\rreturn.png",
             " leading space.png", "caf\u00e9.png", "not utf8 \udcff.png", "a/b/c.png"]


@pytest.fixture
def small_blocks(monkeypatch):
    """pyarrow blocks of 64 KiB, so a file of a few MB spans many batches."""
    monkeypatch.setattr(embeddings_io, "BLOCK_BYTES", 64 << 10)


def refusal(path: Path, line: int, reason: str) -> str:
    return f"embeddings={str(path)!r} is malformed at line {line}: {reason}"


def write_text(path: Path, text: str, newline: str = "\n") -> Path:
    path.write_bytes(text.replace("\n", newline).encode("utf-8", "surrogateescape"))
    return path


def test_round_trip_is_exact_for_every_float32_and_odd_name(tmp_path):
    rng = np.random.default_rng(0)
    special = np.array([0.1, -0.0, 1e-45, 1.1754944e-38, 3.4028235e38, -3.4028235e38, 123456790.0, 1 / 3],
                       dtype=np.float32)
    vectors = rng.standard_normal((len(ODD_NAMES), 8)).astype(np.float32) * np.float32(1e3)
    vectors[:, 0] = special[np.arange(len(ODD_NAMES)) % len(special)]
    labels = np.arange(len(ODD_NAMES), dtype=np.int64) - 3
    write_embeddings_csv(tmp_path / "e.csv", ODD_NAMES, vectors, labels)
    files, read_back, read_labels = read_embeddings_csv(tmp_path / "e.csv", strict=True)
    assert files == ODD_NAMES
    assert read_back.dtype == np.float32 and read_back.shape == vectors.shape
    assert np.array_equal(read_back.view(np.uint32), vectors.view(np.uint32))  # -0.0 too
    assert read_labels.dtype == np.int64 and np.array_equal(read_labels, labels)
    assert read_embeddings_csv(tmp_path / "e.csv")[0] == ODD_NAMES


def test_random_bit_patterns_round_trip_exactly(tmp_path):
    patterns = np.random.default_rng(4).integers(0, 2**32, 40_000, dtype=np.uint32).view(np.float32)
    vectors = patterns[np.isfinite(patterns)][:32_000].reshape(4_000, 8)  # subnormals and extremes too
    write_embeddings_csv(tmp_path / "e.csv", [f"{i}.png" for i in range(4_000)], vectors, np.zeros(4_000))
    assert np.array_equal(read_embeddings_csv(tmp_path / "e.csv", strict=True)[1].view(np.uint32),
                          vectors.view(np.uint32))


def test_the_text_is_lightlys_with_names_quoted_only_where_needed(tmp_path):
    names = ["a.png", "b,c.png", 'd"e.png', "f\ng.png"]
    write_embeddings_csv(tmp_path / "e.csv", names, np.array([[0.5, 1], [0.1, -2], [1e-8, 3e20], [7, 0]], np.float32),
                         [0, 1, 2, 3])
    assert (tmp_path / "e.csv").read_bytes().decode() == (
        f"{HEADER}\na.png,0.5,1,0\n\"b,c.png\",0.1,-2,1\n\"d\"\"e.png\",1e-8,3e+20,2\n\"f\ng.png\",7,0,3\n")
    expected = io.StringIO()
    csv.writer(expected, lineterminator="\n").writerows([name] for name in names)
    assert "".join(embeddings_io._csv_field(name).decode() + "\n" for name in names) == expected.getvalue()


def test_lightly_loads_what_thresher_writes(tmp_path):
    from lightly.utils.io import load_embeddings

    names = [name for name in ODD_NAMES if "\udcff" not in name]  # lightly reads UTF-8 only
    vectors = np.random.default_rng(1).standard_normal((len(names), 16)).astype(np.float32)
    write_embeddings_csv(tmp_path / "e.csv", names, vectors, list(range(len(names))))
    lightly_vectors, lightly_labels, lightly_files = load_embeddings(str(tmp_path / "e.csv"))
    assert lightly_files == names and lightly_labels == list(range(len(names)))
    assert np.array_equal(lightly_vectors.astype(np.float32), vectors)


def test_the_writer_takes_a_memmap_or_anything_sliceable_and_writes_atomically(tmp_path):
    n, d = 10_000, 4
    matrix = np.lib.format.open_memmap(tmp_path / "m.npy", mode="w+", dtype=np.float32, shape=(n, d))
    matrix[:] = np.random.default_rng(2).standard_normal((n, d))

    class Sliceable:
        """Rows by slice only: converting the whole of it fails the test."""
        shape = matrix.shape

        def __getitem__(self, rows: slice) -> np.ndarray:
            assert rows.stop - rows.start <= embeddings_io.WRITE_ROWS
            return np.asarray(matrix[rows])

        def __array__(self, *args, **kwargs):
            raise AssertionError("the writer converted all the rows at once")

    names = [f"img_{i}.png" for i in range(n)]
    for vectors in (matrix, Sliceable()):
        write_embeddings_csv(tmp_path / "e.csv", names, vectors, np.zeros(n, np.int64))
        files, read_back, _ = read_embeddings_csv(tmp_path / "e.csv", strict=True)
        assert files == names and np.array_equal(read_back, matrix)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["e.csv", "m.npy"]  # no temporary left
    with pytest.raises(ValueError, match="one of each per row"):
        write_embeddings_csv(tmp_path / "e.csv", names[:-1], matrix, np.zeros(n, np.int64))


def test_crlf_bare_cr_and_quoted_commas_read_the_same(tmp_path):
    text = f'{HEADER}\na.png,0.5,1,0\n"b,c.png",0.25,2,1\n"d\ne.png",-1,3,2\n'
    for newline in ("\n", "\r\n", "\r"):
        files, vectors, labels = read_embeddings_csv(write_text(tmp_path / "e.csv", text, newline), strict=True)
        assert files == ["a.png", "b,c.png", f"d{newline}e.png"]
        assert vectors.tolist() == [[0.5, 1], [0.25, 2], [-1, 3]] and labels.tolist() == [0, 1, 2]
    plain = f"{HEADER}\r\na.png,0.5,1,0\r\nb.png,0.25,2,1"  # CRLF, no line end at the end
    assert read_embeddings_csv(write_text(tmp_path / "e.csv", plain), strict=True)[0] == ["a.png", "b.png"]


def test_names_that_are_not_utf8_read_surrogate_escaped(tmp_path):
    path = tmp_path / "e.csv"
    path.write_bytes(f"{HEADER}\n".encode() + b"caf\xe9.png,1,2,0\nok.png,3,4,1\n")
    files, vectors, _ = read_embeddings_csv(path, strict=True)
    assert files == ["caf\udce9.png", "ok.png"] and vectors.tolist() == [[1, 2], [3, 4]]
    write_embeddings_csv(tmp_path / "again.csv", files, vectors, [0, 1])
    assert (tmp_path / "again.csv").read_bytes() == path.read_bytes()


BAD_ROWS = [  # (rows after the header, line of the fault, reason)
    ("a.png,1,2,0\nb.png,1,2\n", 3, "3 fields, the header has 4"),
    ("a.png,1,2,0\nb.png,1,2,0,9\n", 3, "5 fields, the header has 4"),
    ("a.png,1,2,0\n\nb.png,1,2,0\n", 3, "0 fields, the header has 4"),
    ("a.png,1,2,0\n,1,2,0\n", 3, "the file name is empty"),
    ('a.png,1,2,0\nb.png,1,2,0\n"a.png",3,4,0\n', 4, "'a.png' appears twice"),
    ("a.png,1,2,0\nb.png,1,x,0\n", 3, "not a number: could not convert string to float: 'x'"),
    ("a.png,1,2,0\nb.png,,2,0\n", 3, "not a number: could not convert string to float: ''"),
    ("a.png,1,2,0\nb.png,nan,2,0\n", 3, "an embedding value is NaN or infinite"),
    ("a.png,1,2,0\nb.png,1,-inf,0\n", 3, "an embedding value is NaN or infinite"),
    ("a.png,1,2,0\nb.png,1,1e39,0\n", 3, "an embedding value is NaN or infinite"),
    ("a.png,1,2,0\nb.png,1,2,1.5\n", 3, "the label '1.5' is not an integer"),
    ("a.png,1,2,0\nb.png,1,2,\n", 3, "the label '' is not an integer"),
    ("a.png,1,2,0\nb.png,1,2,99999999999999999999\n", 3, "the label '99999999999999999999' does not fit in 64 bits"),
]


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
@pytest.mark.parametrize("rows,line,reason", BAD_ROWS)
def test_strict_refuses_a_malformed_row_with_its_line(tmp_path, rows, line, reason, newline):
    path = write_text(tmp_path / "e.csv", f"{HEADER}\n{rows}", newline)
    with pytest.raises(UserError) as refused:
        read_embeddings_csv(path, strict=True)
    assert str(refused.value) == refusal(path, line, reason)


@pytest.mark.parametrize("rows,line,reason", BAD_ROWS)
def test_a_quoted_name_over_two_lines_moves_the_line_by_one(tmp_path, rows, line, reason):
    path = write_text(tmp_path / "e.csv", f'{HEADER}\n"two\nlines.png",5,6,0\n{rows}')
    with pytest.raises(UserError) as refused:
        read_embeddings_csv(path, strict=True)
    assert str(refused.value) == refusal(path, line + 2, reason)


@pytest.mark.parametrize("text,line,reason", [
    ("", 1, "the file is empty; expected the header filenames,embedding_0,...,labels"),
    ("filenames,emb_0,labels\na.png,1,0\n", 1,
     "the header must be filenames,embedding_0,...,embedding_{D-1},labels, not filenames,emb_0,labels"),
    ("filenames,embedding_0,embedding_2,labels\n", 1,
     "the header must be filenames,embedding_0,...,embedding_{D-1},labels, not filenames,embedding_0,embedding_2,..."),
    (f"{HEADER}\n", 2, "the file has a header but no rows"),
    (HEADER, 2, "the file has a header but no rows"),
])
def test_strict_refuses_a_file_without_the_header_or_rows(tmp_path, text, line, reason):
    path = write_text(tmp_path / "e.csv", text)
    with pytest.raises(UserError) as refused:
        read_embeddings_csv(path, strict=True)
    assert str(refused.value) == refusal(path, line, reason)


def test_an_empty_matrix_is_written_refused_in_strict_mode_and_read_otherwise(tmp_path):
    path = tmp_path / "e.csv"
    write_embeddings_csv(path, [], np.zeros((0, 3), np.float32), [])
    assert path.read_text() == "filenames,embedding_0,embedding_1,embedding_2,labels\n"
    with pytest.raises(UserError, match="at line 2: the file has a header but no rows"):
        read_embeddings_csv(path, strict=True)
    files, vectors, labels = read_embeddings_csv(path)
    assert files == [] and vectors.shape == (0, 3) and vectors.dtype == np.float32 and labels.shape == (0,)


def big_file(tmp_path: Path, n: int, first_name: str = "img_0.png") -> tuple:
    """n rows of d = 2, a few MB: many pyarrow blocks with the `small_blocks` fixture."""
    names = [first_name, *(f"img_{i}.png" for i in range(1, n))]
    vectors = np.random.default_rng(3).standard_normal((n, 2)).astype(np.float32)
    write_embeddings_csv(tmp_path / "e.csv", names, vectors, np.arange(n) % 7)
    return tmp_path / "e.csv", names, vectors


def spoil_row(path: Path, row: int, new_text: str) -> None:
    """Replace the text of data row `row` (0-based; rows are lines after the first name)."""
    lines = path.read_bytes().split(b"\n")
    extra = lines[1].count(b'"') and 1  # a first name over two lines
    lines[row + 1 + extra] = new_text.encode()
    path.write_bytes(b"\n".join(lines))


@pytest.mark.parametrize("first_name,extra_lines", [("img_0.png", 0), ('"two\nlines".png', 1)])
@pytest.mark.parametrize("spoiled,reason", [
    ("img_49999.png,nan,1,0", "an embedding value is NaN or infinite"),
    ("img_49999.png,1,oops,0", "not a number: could not convert string to float: 'oops'"),
    ("img_12.png,1,2,0", "'img_12.png' appears twice"),
    ("img_49999.png,1,2", "3 fields, the header has 4"),
])
def test_a_fault_in_a_late_block_is_refused_at_its_line(tmp_path, small_blocks, monkeypatch, first_name,
                                                        extra_lines, spoiled, reason):
    path, _, _ = big_file(tmp_path, 60_000, first_name)
    spoil_row(path, 49_999, spoiled)
    exact_pass_from = []
    read_rows = embeddings_io._Reader._read_rows

    def recorded(reader):
        exact_pass_from.append(len(reader.files))
        read_rows(reader)

    monkeypatch.setattr(embeddings_io._Reader, "_read_rows", recorded)
    with pytest.raises(UserError) as refused:
        read_embeddings_csv(path, strict=True)
    assert str(refused.value) == refusal(path, 50_001 + extra_lines, reason)
    assert 40_000 < exact_pass_from[0] <= 49_999  # pyarrow took the blocks before the fault's


def test_what_python_reads_but_pyarrow_does_not_is_read_on_row_by_row(tmp_path, small_blocks):
    path, names, vectors = big_file(tmp_path, 55_000)
    spoil_row(path, 50_000, "img_50000.png,1_5,+2,+4")  # float() and int() take these; pyarrow does not
    vectors[50_000] = [15, 2]
    for strict in (True, False):
        files, read_back, labels = read_embeddings_csv(path, strict=strict)
        assert files == names and np.array_equal(read_back, vectors)
        assert labels[50_000] == 4 and labels[50_001] == 50_001 % 7


def test_lenient_reading_keeps_nan_and_repeats_as_before(tmp_path):
    path = write_text(tmp_path / "e.csv", f"{HEADER}\na.png,nan,1,0\na.png,inf,2,1\n")
    files, vectors, labels = read_embeddings_csv(path)
    assert files == ["a.png", "a.png"] and np.isnan(vectors[0, 0]) and np.isinf(vectors[1, 0])
    assert labels.tolist() == [0, 1]
