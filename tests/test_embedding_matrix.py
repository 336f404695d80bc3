"""The embeddings the stages exchange (data/embeddings.npy + data/embedding_rows.csv): written as
computed, gaps left by failed images closed, nothing half-written left behind, the lightly CSV
beside them, and the in-place helpers that keep the select stage at one N×d array."""
from __future__ import annotations

import numpy as np
import pytest
from lightly.utils.io import load_embeddings

from app.artifacts import EMBEDDING_MATRIX, EMBEDDING_ROWS, EMBEDDINGS
from app.sampling.embedding_matrix import (EmbeddingsWriter, compact_rows, has_embeddings, normalize_in_place,
                                           read_embeddings, write_embeddings)

NAMES = ["a/1.png", "a/2,with comma.png", "b/ü.png", "b/4.png", "c/5.png"]


def matrix(n: int, d: int = 6, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


def test_a_written_matrix_reads_back_exactly_and_lightly_opens_its_csv(tmp_path):
    vectors = matrix(len(NAMES))
    write_embeddings(tmp_path, NAMES, [0, 0, 1, 1, -1], vectors)
    read = read_embeddings(tmp_path)
    assert read.files == NAMES and read.labels.tolist() == [0, 0, 1, 1, -1]
    assert read.vectors.dtype == np.float32 and np.array_equal(read.vectors, vectors)
    mapped = read_embeddings(tmp_path, mmap=True)
    assert isinstance(mapped.vectors, np.memmap) and np.array_equal(mapped.vectors, vectors)
    lightly_vectors, lightly_labels, lightly_files = load_embeddings(str(tmp_path / EMBEDDINGS))
    assert lightly_files == NAMES and lightly_labels == [0, 0, 1, 1, -1]
    assert np.array_equal(np.asarray(lightly_vectors, dtype=np.float32), vectors)


def test_the_writer_keeps_the_embedded_rows_in_input_order_and_leaves_no_temporary_file(tmp_path):
    vectors = matrix(len(NAMES))
    writer = EmbeddingsWriter(tmp_path, len(NAMES), vectors.shape[1])
    assert not has_embeddings(tmp_path), "nothing is in place before finish"
    writer.put(np.array([3, 4]), vectors[3:5])  # batches in any order, rows by index
    writer.put(np.array([0, 2]), vectors[[0, 2]])  # row 1 failed to load
    embedded = np.array([True, False, True, True, True])
    assert writer.finish(NAMES, [0, 1, 2, 3, 4], embedded) == 4
    read = read_embeddings(tmp_path)
    assert read.files == [NAMES[i] for i in (0, 2, 3, 4)] and read.labels.tolist() == [0, 2, 3, 4]
    assert np.array_equal(read.vectors, vectors[[0, 2, 3, 4]])
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == sorted(
        name.split("/")[1] for name in (EMBEDDING_MATRIX, EMBEDDING_ROWS, EMBEDDINGS))


def test_an_abandoned_writer_leaves_nothing(tmp_path):
    writer = EmbeddingsWriter(tmp_path, 3, 4)
    writer.put(np.array([0]), matrix(1, 4))
    writer.abandon()
    assert not any((tmp_path / "data").iterdir())


def test_a_matrix_that_does_not_match_its_rows_is_refused(tmp_path):
    write_embeddings(tmp_path, NAMES, [0] * 5, matrix(5))
    np.save(tmp_path / EMBEDDING_MATRIX, matrix(4))
    with pytest.raises(ValueError, match=r"expected float32 \(5, d\)"):
        read_embeddings(tmp_path)


def test_compact_rows_is_fancy_indexing_in_place():
    rng = np.random.default_rng(1)
    for n, keep_fraction in ((10, 0.5), (70_000, 0.9), (70_000, 0.01), (5, 1.0)):
        original = matrix(n, 3, seed=n)
        keep = np.flatnonzero(rng.random(n) < keep_fraction)
        work = original.copy()
        compacted = compact_rows(work, keep)
        assert np.shares_memory(compacted, work) and np.array_equal(compacted, original[keep])


def test_normalize_in_place_matches_the_row_norms_and_leaves_zero_rows():
    vectors = matrix(40_000, 5)
    vectors[7] = 0
    expected = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    assert normalize_in_place(vectors) is vectors
    assert np.allclose(vectors, expected, atol=1e-6) and not vectors[7].any()
