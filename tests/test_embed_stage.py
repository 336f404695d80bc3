"""The embed stage on its own: the matrix, its rows and the lightly CSV it writes agree; a broken
image is skipped in a loader worker; an interrupted stage leaves nothing half-written."""
from __future__ import annotations

import copy
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import compose

N_IMAGES = 14


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """Small PNGs of a few sizes in two class folders, one of them truncated (it still opens)."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for index in range(N_IMAGES):
        folder = root / ("a" if index % 2 else "b")
        folder.mkdir(exist_ok=True)
        shape = (12 + index, 20 - index % 5, 3)
        Image.fromarray(rng.integers(0, 255, size=shape, dtype=np.uint8)).save(folder / f"{index:02d}.png")
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, size=(40, 40, 3), dtype=np.uint8)).save(buffer, format="PNG")
    (root / "a" / "05.png").write_bytes(buffer.getvalue()[:len(buffer.getvalue()) // 2])
    return root


@pytest.fixture(scope="module")
def backbone():
    from app.models import build_backbone

    torch.manual_seed(0)
    model, _ = build_backbone("resnet18", None)
    return model.eval()


def embed(image_folder: Path, run_dir: Path, backbone, monkeypatch, workers: int):
    """The scan, then the embed stage with `backbone`; returns the stage's result."""
    from app.data.scan import scan_stage
    from app.sampling import embed as embed_module

    cfg = compose("data=folder", f"data.input_dir={image_folder}", "data.image_size=16",
                  "sampler.batch_size=4", f"hardware.num_workers={workers}",
                  "enable_corruptness_check=false", "remove_exact_duplicates=false")
    scan_stage(cfg, run_dir)
    model = copy.deepcopy(backbone)
    monkeypatch.setattr(embed_module, "build_backbone", lambda *_, **__: (model, 512))
    return embed_module.embed_stage(cfg, run_dir, torch.device("cpu"))


def reference_vectors(image_folder: Path, names, backbone) -> np.ndarray:
    """What the stage computed before it normalised in batches: the per-image transform."""
    from app.data.images import image_transform, open_image

    transform = image_transform(16)
    with torch.inference_mode():
        return backbone(torch.stack([transform(open_image(image_folder, name)) for name in names])).numpy()


@pytest.mark.slow
def test_matrix_rows_and_lightly_csv_agree_and_skip_the_broken_image(image_folder, backbone, monkeypatch,
                                                                     tmp_path):
    from lightly.utils.io import load_embeddings

    from app.artifacts import read_input_files
    from app.sampling.embedding_matrix import read_embeddings

    run_dir = tmp_path / "run"
    result = embed(image_folder, run_dir, backbone, monkeypatch, workers=1)
    names, labels = read_input_files(run_dir)
    assert "a/05.png" in names[1:-1]  # in the middle of a batch, not at an edge of the list
    usable = [i for i, name in enumerate(names) if name != "a/05.png"]

    stored = read_embeddings(run_dir)
    assert result.n_embedded == len(stored) == N_IMAGES - 1
    assert stored.files == [names[i] for i in usable]
    assert stored.labels.tolist() == [labels[i] for i in usable]
    assert stored.vectors.dtype == np.float32 and stored.vectors.shape == (N_IMAGES - 1, 512)
    np.testing.assert_allclose(stored.vectors, reference_vectors(image_folder, stored.files, backbone),
                               rtol=1e-4, atol=1e-5)

    lightly_vectors, lightly_labels, lightly_files = load_embeddings(str(run_dir / "data/embeddings.csv"))
    assert lightly_files == stored.files and lightly_labels == stored.labels.tolist()
    np.testing.assert_allclose(lightly_vectors, stored.vectors, rtol=1e-6, atol=1e-7)

    corrupt = (run_dir / "filenames/corrupt_filenames.txt").read_text().splitlines()
    assert [line.split("\t")[0] for line in corrupt] == ["a/05.png"]
    assert "truncated" in corrupt[0].split("\t")[1]


@pytest.mark.slow
def test_no_workers_and_one_worker_give_the_same_embeddings(image_folder, backbone, monkeypatch, tmp_path):
    from app.sampling.embedding_matrix import read_embeddings

    embed(image_folder, tmp_path / "none", backbone, monkeypatch, workers=0)
    embed(image_folder, tmp_path / "one", backbone, monkeypatch, workers=1)
    without, with_one = read_embeddings(tmp_path / "none"), read_embeddings(tmp_path / "one")
    assert without.files == with_one.files
    np.testing.assert_allclose(without.vectors, with_one.vectors, rtol=0, atol=1e-6)


def test_an_interrupted_stage_leaves_no_matrix_and_no_temporary_file(image_folder, backbone, monkeypatch,
                                                                    tmp_path):
    class FailsOnTheSecondBatch(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.batches = 0

        def forward(self, images):
            self.batches += 1
            if self.batches == 2:
                raise KeyboardInterrupt
            return torch.zeros(len(images), 512)

    run_dir = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        embed(image_folder, run_dir, FailsOnTheSecondBatch(), monkeypatch, workers=1)
    left = sorted(path.name for path in (run_dir / "data").iterdir())
    assert not [name for name in left if "embeddings" in name or name.endswith(".tmp")], left


@pytest.mark.parametrize("order", ["scan order", "shuffled"])
def test_given_embeddings_are_kept_in_the_scan_order_without_unknown_rows(order, tmp_path):
    from app.sampling.embed import use_given_embeddings
    from app.sampling.embedding_matrix import read_embeddings
    from app.sampling.embeddings_io import write_embeddings_csv

    files = [f"img{i}.png" for i in range(6)]
    given = [*files[:4], "elsewhere.png", files[5]]  # img4 has no row; elsewhere.png is not usable here
    vectors = np.arange(len(given) * 3, dtype=np.float32).reshape(len(given), 3)
    if order == "shuffled":
        permutation = np.random.default_rng(0).permutation(len(given))
        given, vectors = [given[i] for i in permutation], vectors[permutation]
    write_embeddings_csv(tmp_path / "given.csv", given, vectors, [9] * len(given))

    result = use_given_embeddings(tmp_path / "given.csv", files, [0, 1, 2, 0, 1, 2], tmp_path / "run")
    stored = read_embeddings(tmp_path / "run")
    kept = [0, 1, 2, 3, 5]
    assert result.n_embedded == 5 and stored.files == [files[i] for i in kept]
    assert stored.labels.tolist() == [0, 1, 2, 0, 2]
    row_of = {name: i for i, name in enumerate(given)}
    np.testing.assert_array_equal(stored.vectors, vectors[[row_of[files[i]] for i in kept]])
