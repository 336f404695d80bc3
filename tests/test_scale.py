"""bench/bench_scale.py at N = 1e4, as CI can afford it: the default pipeline without training, each
stage its own process, on images with exact copies and truncated files. Correctness only; the
figures at 1e5 and 1e6 are in BENCHMARKS.md."""
from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
from lightly.utils.io import load_embeddings

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))

N = 10_000


@pytest.mark.slow
def test_the_scale_benchmark_runs_the_pipeline_at_ten_thousand_images(tmp_path):
    import bench_scale

    result = bench_scale.main(["--sizes", str(N), "--data-root", str(tmp_path / "data"), "--work",
                               str(tmp_path / "work"), "--json", str(tmp_path / "scale.json")])
    row = result["rows"][0]
    scan, embed, select = (row["details"][stage] for stage in bench_scale.STAGES)
    # the generator's hostile share: every 100th image a copy of an earlier one, every 1000th cut off
    assert scan["n_duplicates"] == N // 100 and scan["n_corrupt"] == N // 1000
    usable = N - N // 100 - N // 1000
    assert scan["n_images"] == embed["n_embedded"] == select["n_candidates"] == usable
    assert select["n_selected"] == row["n_selected"] == math.floor(0.01 * usable)
    for stage in bench_scale.STAGES:
        figures = row["stages"][stage]
        assert figures["wall_s"] > 0 and figures["peak_rss_MB"] > 0 and figures["stage_s"] > 0
    assert json.loads((tmp_path / "scale.json").read_text())["rows"][0]["n"] == N

    run_dir = tmp_path / "work" / f"run-n{N}"
    from app.sampling.embedding_matrix import read_embeddings

    stored = read_embeddings(run_dir)
    vectors, labels, files = load_embeddings(str(run_dir / "data/embeddings.csv"))
    assert files == stored.files and labels == stored.labels.tolist()
    assert np.array_equal(np.asarray(vectors, dtype=np.float32), stored.vectors)
    sampled = (run_dir / "filenames/sampled_filenames.txt").read_text().splitlines()
    assert set(sampled) <= set(stored.files) and len(set(sampled)) == len(sampled)
