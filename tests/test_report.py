"""The selection report: numbers against brute force, bounded memory, valid plots, an HTML page that
renders offline in a real browser.

The browser test needs Debian's `chromium`. Under CI=true a missing browser fails it; elsewhere it
skips.
"""
from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app.report import write_report
from app.report import distances as report_distances
from app.report.distances import (FINE_BINS, max_points_for_memory, nearest_neighbours, on_common_bins,
                                  pairwise_histogram, pca_2d, sampled_nearest_neighbours)

from conftest import ROOT, SMALL, thresher

CLASSES = ("red", "green", "blue")
PER_CLASS = 12
DIM = 8
SELECTED_EVERY = 3  # files 0, 3, 6, ... are selected; file 1 is an exact copy of file 0


def brute_force_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return np.linalg.norm(a[:, None, :] - b[None, :, :], axis=2)


def unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def brute_force_stats(distances: np.ndarray) -> dict:
    p5, median, p95 = np.percentile(distances, [5, 50, 95])
    return {"min": distances.min(), "p5": p5, "median": median, "mean": distances.mean(), "p95": p95,
            "max": distances.max()}


def within_set_nearest(points: np.ndarray) -> np.ndarray:
    distances = brute_force_distances(points, points)
    np.fill_diagonal(distances, np.inf)
    return distances.min(axis=1)


def make_run_dir(root: Path) -> tuple[Path, list, np.ndarray, np.ndarray]:
    """A run directory written by hand in the formats scan, embed and select use: 36 images in three
    coloured classes, clustered embeddings, every third image selected, one corrupt, two duplicates."""
    from app.artifacts import write_selection
    from app.sampling.embedding_matrix import write_embeddings

    input_dir, run_dir = root / "images", root / "run"
    rng = np.random.default_rng(0)
    files, labels = [], []
    for label, name in enumerate(CLASSES):
        (input_dir / name).mkdir(parents=True)
        for i in range(PER_CLASS):
            colour = [40 + 15 * i if c == label else 30 for c in range(3)]
            Image.new("RGB", (24, 24), tuple(colour)).save(input_dir / name / f"{name}_{i:02d}.png")
            files.append(f"{name}/{name}_{i:02d}.png")
            labels.append(label)
    centres = rng.normal(size=(len(CLASSES), DIM)) * 3
    embeddings = np.concatenate([c + rng.normal(scale=0.5, size=(PER_CLASS, DIM)) for c in centres])
    embeddings[1] = embeddings[0]  # an exact duplicate: its nearest neighbour is at distance 0
    embeddings = embeddings.astype(np.float32)
    selected = np.zeros(len(files), dtype=bool)
    selected[::SELECTED_EVERY] = True

    write_embeddings(run_dir, files, labels, embeddings)
    (run_dir / "filenames").mkdir(parents=True)
    (run_dir / "filenames/sampled_filenames.txt").write_text(
        "".join(f"{f}\n" for f, s in zip(files, selected) if s))
    (run_dir / "filenames/removed_filenames.txt").write_text(
        "".join(f"{f}\n" for f, s in zip(files, selected) if not s))
    write_selection(run_dir, [f for f, s in zip(files, selected) if s],
                    [float("inf")] + [0.5] * (int(selected.sum()) - 1))
    (run_dir / "filenames/corrupt_filenames.txt").write_text("broken.png\tempty file (0 bytes)\n")
    (run_dir / "filenames/duplicate_filenames.txt").write_text(
        "red/copy_a.png\tred/red_00.png\nred/copy_b.png\tred/red_00.png\n")
    (run_dir / "data/dataset.json").write_text(json.dumps({"input_dir": str(input_dir), "classes": list(CLASSES)}))
    return run_dir, files, embeddings, selected


@pytest.fixture
def run_dir(tmp_path):
    return make_run_dir(tmp_path)


# ---- the numbers -----------------------------------------------------------------------------------

@pytest.mark.parametrize("block", [1, 7, 2048])
def test_nearest_neighbours_equal_brute_force_whatever_the_block_size(block):
    rng = np.random.default_rng(1)
    points = rng.normal(size=(50, 6)).astype(np.float32)
    points[10] = points[3]
    distances, index = nearest_neighbours(points, points, exclude_self=True, block=block)
    expected = brute_force_distances(points, points)
    np.fill_diagonal(expected, np.inf)
    np.testing.assert_allclose(distances, expected.min(axis=1), atol=1e-6)
    assert (index != np.arange(50)).all(), "a point is never its own neighbour"
    assert index[3] == 10 and index[10] == 3 and distances[3] == 0.0, "an exact duplicate is at distance 0"

    queries = rng.normal(size=(9, 6)).astype(np.float32)
    distances, index = nearest_neighbours(queries, points, block=block)
    across = brute_force_distances(queries, points)
    np.testing.assert_allclose(distances, across.min(axis=1), atol=1e-6)
    assert (index == across.argmin(axis=1)).all()


def test_nearest_neighbours_of_a_single_point_or_an_empty_set_are_undefined():
    distances, index = nearest_neighbours(np.ones((1, 3)), np.ones((1, 3)), exclude_self=True)
    assert np.isinf(distances).all() and (index == -1).all()
    distances, index = nearest_neighbours(np.ones((2, 3)), np.zeros((0, 3)))
    assert np.isinf(distances).all() and (index == -1).all()


@pytest.mark.parametrize("block", [3, 2048])
def test_nearest_neighbours_of_row_subsets_equal_brute_force(block):
    rng = np.random.default_rng(6)
    points = rng.normal(size=(40, 5)).astype(np.float32)
    points[17] = points[4]
    subset = np.array([1, 4, 9, 17, 20, 33])
    distances, index = nearest_neighbours(points, points, query_rows=subset, point_rows=subset, exclude_self=True,
                                          block=block)
    expected = brute_force_distances(points[subset], points[subset])
    np.fill_diagonal(expected, np.inf)
    np.testing.assert_allclose(distances, expected.min(axis=1), atol=1e-6)
    assert (index == expected.argmin(axis=1)).all() and distances[1] == 0.0

    queries = np.array([0, 2, 39])
    distances, index = nearest_neighbours(points, points, query_rows=queries, point_rows=subset,
                                          self_index=np.array([-1, -1, -1]), block=block)
    across = brute_force_distances(points[queries], points[subset])
    np.testing.assert_allclose(distances, across.min(axis=1), atol=1e-6)
    assert (index == across.argmin(axis=1)).all()


def test_sampled_nearest_neighbours_search_each_sampled_query_against_the_whole_set(monkeypatch):
    monkeypatch.setattr(report_distances, "MAX_NEAREST_PAIRS", 200)
    monkeypatch.setattr(report_distances, "MIN_NEAREST_QUERIES", 7)
    points = unit(np.random.default_rng(7).normal(size=(60, 4))).astype(np.float32)
    search = sampled_nearest_neighbours(points, np.random.default_rng(0), within_set=True)
    assert search.subsampled and len(search.queries) == 7 and search.n_queries == 60
    assert (search.queries == np.sort(np.random.default_rng(0).choice(60, 7, replace=False))).all()
    expected = within_set_nearest(points.astype(np.float64))[search.queries]
    np.testing.assert_allclose(search.distances, expected, atol=1e-6)

    small = sampled_nearest_neighbours(points, np.random.default_rng(0), point_rows=np.arange(10), within_set=True)
    assert not small.subsampled and len(small.distances) == 10, "10 × 10 pairs fit: every query"


def test_pca_fitted_on_a_subsample_projects_every_point():
    points = np.random.default_rng(8).normal(size=(500, 6)).astype(np.float32) * [5, 3, 1, 1, 1, 1]
    projected = pca_2d(points, fit_rows=100)
    assert projected.shape == (500, 2)
    full = pca_2d(points)
    np.testing.assert_allclose(np.abs(np.corrcoef(projected[:, 0], full[:, 0])[0, 1]), 1.0, atol=1e-2)


def test_pairwise_histogram_counts_every_pair_once_in_blocks():
    points = unit(np.random.default_rng(2).normal(size=(60, 5))).astype(np.float32)
    histogram = pairwise_histogram(points, 2.0, np.random.default_rng(0), block=16)
    distances = brute_force_distances(points, points)[np.triu_indices(60, k=1)]
    expected, _ = np.histogram(distances, bins=histogram.edges)
    assert histogram.n_pairs == 60 * 59 // 2 == histogram.counts.sum()
    assert not histogram.subsampled
    # float32 blocks may put a distance within ~1e-6 of a bin edge into the neighbouring bin
    assert np.abs(histogram.counts - expected).sum() <= 4
    assert histogram.mean == pytest.approx(distances.mean(), abs=1e-5)

    coarse_all, coarse_half = on_common_bins([histogram, pairwise_histogram(points[:30], 2.0,
                                                                            np.random.default_rng(0))])
    assert len(coarse_all.counts) <= 50 and (coarse_all.edges == coarse_half.edges).all()
    assert coarse_all.counts.sum() == histogram.n_pairs
    assert coarse_all.edges[0] <= distances.min() and coarse_all.edges[-1] >= distances.max()
    assert len(histogram.edges) == FINE_BINS + 1


def test_pairwise_histogram_subsamples_to_what_fits_in_memory():
    assert max_points_for_memory(2.0) == int(np.sqrt(2e9 / 4))
    points = unit(np.random.default_rng(3).normal(size=(500, 4))).astype(np.float32)
    budget = 100 * 100 * 4 / 1e9  # the pairwise matrix of 100 points in float32
    histogram = pairwise_histogram(points, budget, np.random.default_rng(0))
    assert histogram.subsampled and histogram.n_points == 500 and histogram.n_used == 100
    assert histogram.counts.sum() == histogram.n_pairs == 100 * 99 // 2
    again = pairwise_histogram(points, budget, np.random.default_rng(0))
    assert (again.counts == histogram.counts).all(), "the same seed draws the same subsample"


def test_report_json_matches_brute_force(run_dir):
    run_dir, files, embeddings, selected = run_dir
    result = write_report(run_dir, n_example_images=4, seed=5)
    report = json.loads((run_dir / "report.json").read_text())

    assert report["counts"] == {"candidates": 36, "selected": 12, "removed": 24, "corrupt": 1, "duplicates": 2}
    assert (result.n_candidates, result.n_selected, result.n_removed, result.n_corrupt,
            result.n_duplicates) == (36, 12, 24, 1, 2)
    points = unit(embeddings.astype(np.float64))
    stats = report["nearest_neighbour_distances"]
    for name, subset in (("input", points), ("selection", points[selected])):
        expected = brute_force_stats(within_set_nearest(subset))
        assert stats[name]["n_points"] == len(subset)
        for key, value in expected.items():
            assert stats[name][key] == pytest.approx(value, abs=1e-5), (name, key)
    assert stats["input"]["min"] == 0.0, "the exact duplicate"
    assert stats["random"]["n_points"] == 12 and stats["random"]["seed"] == 5

    to_kept = brute_force_distances(points[~selected], points[selected])
    removed_files = [f for f, s in zip(files, selected) if not s]
    kept_files = [f for f, s in zip(files, selected) if s]
    closest = np.argsort(to_kept.min(axis=1), kind="stable")[:4]
    expected_pairs = [{"retained": kept_files[to_kept[i].argmin()], "removed": removed_files[i],
                       "distance": pytest.approx(to_kept[i].min(), abs=1e-5)} for i in closest]
    assert report["example_pairs"] == expected_pairs
    assert report["example_pairs"][0] == {"retained": "red/red_00.png", "removed": "red/red_01.png",
                                          "distance": 0.0}
    assert stats["removed_to_selection"]["max"] == pytest.approx(to_kept.min(axis=1).max(), abs=1e-5)
    assert report["last_pick_distance"] == 0.5

    pairwise = report["pairwise_distances"]
    assert pairwise["input"]["n_pairs"] == 36 * 35 // 2 == sum(pairwise["input"]["counts"])
    assert pairwise["selection"]["n_pairs"] == 12 * 11 // 2 == sum(pairwise["selection"]["counts"])
    assert not pairwise["input"]["subsampled"] and not result.pairwise_subsampled
    assert report["plots"] == [a for a in result.artifacts if a.startswith("plots/")]
    assert len(report["plots"]) == 5


@pytest.mark.slow
def test_random_subset_is_seeded(run_dir):
    run_dir = run_dir[0]
    write_report(run_dir, seed=1)
    first = json.loads((run_dir / "report.json").read_text())
    write_report(run_dir, seed=1)
    assert json.loads((run_dir / "report.json").read_text()) == first, "same seed, same report"
    write_report(run_dir, seed=2)
    other = json.loads((run_dir / "report.json").read_text())
    assert other["nearest_neighbour_distances"]["random"] != first["nearest_neighbour_distances"]["random"]
    assert other["nearest_neighbour_distances"]["input"] == first["nearest_neighbour_distances"]["input"]


def test_datapool_statistics_and_distance_to_the_selection(run_dir):
    run_dir, _, embeddings, selected = run_dir
    pool = np.random.default_rng(4).normal(size=(15, DIM)).astype(np.float32) * 7
    write_report(run_dir, pool_embeddings=pool)
    stats = json.loads((run_dir / "report.json").read_text())["nearest_neighbour_distances"]
    pool_unit = unit(pool.astype(np.float64))
    assert stats["datapool"]["n_points"] == 15
    assert stats["datapool"]["median"] == pytest.approx(np.median(within_set_nearest(pool_unit)), abs=1e-5)
    to_pool = brute_force_distances(unit(embeddings.astype(np.float64))[selected], pool_unit).min(axis=1)
    assert stats["selection_to_datapool"]["mean"] == pytest.approx(to_pool.mean(), abs=1e-5)

    with pytest.raises(ValueError, match=r"pool_embeddings has shape \(15, 3\).*dimension 8"):
        write_report(run_dir, pool_embeddings=pool[:, :3])


def test_tiny_memory_budget_subsamples_and_says_so(run_dir):
    run_dir = run_dir[0]
    budget = 20 * 20 * 4 / 1e9
    result = write_report(run_dir, memory_requirement_in_GB=budget)
    pairwise = json.loads((run_dir / "report.json").read_text())["pairwise_distances"]
    assert result.pairwise_subsampled
    assert pairwise["input"]["subsampled"] and pairwise["input"]["n_used"] == 20
    assert pairwise["input"]["n_pairs"] == 190 == sum(pairwise["input"]["counts"])
    assert not pairwise["selection"]["subsampled"], "12 selected images fit"
    html = (run_dir / "report.html").read_text()
    assert "random subsample of 20 of 36 images" in html


def test_large_sets_take_nearest_neighbours_on_a_seeded_subsample_and_say_so(run_dir, monkeypatch):
    run_dir, files, embeddings, selected = run_dir
    monkeypatch.setattr(report_distances, "MAX_NEAREST_PAIRS", 100)
    monkeypatch.setattr(report_distances, "MIN_NEAREST_QUERIES", 5)
    write_report(run_dir, n_example_images=3, seed=3)
    report = json.loads((run_dir / "report.json").read_text())
    stats = report["nearest_neighbour_distances"]
    points = unit(embeddings.astype(np.float64))
    nearest_rng = np.random.default_rng(np.random.SeedSequence(3).spawn(5)[4])
    sampled_input = np.sort(nearest_rng.choice(36, 5, replace=False))
    assert stats["input"]["sample"] == {"n_queries": 5, "of": 36} and stats["input"]["n_points"] == 5
    expected = brute_force_stats(within_set_nearest(points)[sampled_input])
    for key, value in expected.items():
        assert stats["input"][key] == pytest.approx(value, abs=1e-5), key
    assert stats["selection"]["sample"] == {"n_queries": 8, "of": 12}, "max(5, 100 // 12) queries"
    assert stats["removed_to_selection"]["sample"] == {"n_queries": 8, "of": 24}
    to_kept = brute_force_distances(points[~selected], points[selected]).min(axis=1)
    assert len(report["example_pairs"]) == 3
    assert all(np.abs(to_kept - pair["distance"]).min() < 1e-5 for pair in report["example_pairs"])
    assert any("subsample of 5 of 36 images" in note for note in report["notes"])
    assert "a seeded random subsample" in report["plot_captions"]["plots/nearest_neighbour_distances.png"]
    pairs_caption = report["plot_captions"]["plots/example_pairs.png"]
    assert "among a seeded random subsample of 8 of the 24 removed" in pairs_caption


@pytest.mark.slow
def test_points_passed_by_the_caller_give_the_same_report(run_dir):
    run_dir, _, embeddings, _ = run_dir
    write_report(run_dir, seed=4)
    first = json.loads((run_dir / "report.json").read_text())
    write_report(run_dir, seed=4, points=unit(embeddings.astype(np.float64)).astype(np.float32))
    second = json.loads((run_dir / "report.json").read_text())
    for name, stats in first["nearest_neighbour_distances"].items():
        assert second["nearest_neighbour_distances"][name] == pytest.approx(stats, abs=2e-6), name
    with pytest.raises(ValueError, match="points has shape"):
        write_report(run_dir, points=embeddings[:5])


# ---- the artifacts ---------------------------------------------------------------------------------

def test_plots_are_valid_pngs_and_nothing_temporary_is_left(run_dir):
    run_dir = run_dir[0]
    result = write_report(run_dir)
    assert result.artifacts[:2] == ["report.json", "report.html"]
    plots = sorted(p.relative_to(run_dir).as_posix() for p in (run_dir / "plots").iterdir())
    assert plots == sorted(result.artifacts[2:])
    for plot in plots:
        assert (run_dir / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(run_dir / plot) as image:
            image.verify()
        with Image.open(run_dir / plot) as image:
            assert image.width >= 300 and image.height >= 200
            assert np.asarray(image.convert("L")).std() > 5, f"{plot} is blank"
    assert not [p for p in run_dir.rglob("*.tmp")]


def test_html_embeds_every_plot_and_fetches_nothing(run_dir):
    run_dir = run_dir[0]
    result = write_report(run_dir)
    html = (run_dir / "report.html").read_text()
    for plot in result.artifacts[2:]:
        match = re.search(rf'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)" data-file="{re.escape(plot)}"', html)
        assert match, f"{plot} is not embedded"
        assert base64.b64decode(match.group(1)) == (run_dir / plot).read_bytes()
    assert not re.search(r"https?://", html), "no resource may come from the network"
    sources = re.findall(r'\b(?:src|href)="([^"]*)"', html)
    assert all(s.startswith("data:") or s.startswith("plots/") for s in sources), sources
    assert "<link" not in html and "@import" not in html and "url(" not in html
    for text in ("<title>", "Counts", "Nearest-neighbour distances", "Pairwise distances", "<figcaption>",
                 "red/red_01.png"):
        assert text in html


def test_without_embeddings_the_report_has_counts_only(run_dir):
    run_dir = run_dir[0]
    (run_dir / "data/embeddings.npy").unlink()
    result = write_report(run_dir)
    report = json.loads((run_dir / "report.json").read_text())
    assert report["counts"]["candidates"] == 36 and result.artifacts == ["report.json", "report.html"]
    assert "data/embeddings.npy" in (run_dir / "report.html").read_text()


def test_missing_images_leave_a_placeholder_not_an_error(run_dir):
    run_dir = run_dir[0]
    shutil.rmtree(run_dir.parent / "images")
    result = write_report(run_dir)
    assert "plots/example_pairs.png" in result.artifacts


def test_importing_the_report_loads_neither_torch_nor_matplotlib():
    code = "import sys, app.report; print(sorted({'torch', 'matplotlib'} & set(sys.modules)))"
    output = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert output.stdout.strip() == "[]"


@pytest.mark.slow
def test_report_of_a_real_pipeline_run(env, tmp_path):
    process = thresher([*SMALL, "stages=[scan,embed,select]", "run_directory=x"], env, tmp_path)
    assert process.returncode == 0, process.stderr[-2000:]
    run_dir = tmp_path / "runs" / "x"
    result = write_report(run_dir, n_example_images=3)
    report = json.loads((run_dir / "report.json").read_text())
    sampled = (run_dir / "filenames/sampled_filenames.txt").read_text().split()
    assert report["counts"]["selected"] == len(sampled) == result.n_selected
    assert report["counts"]["candidates"] == result.n_selected + result.n_removed
    assert len(report["example_pairs"]) == 3
    nn = report["nearest_neighbour_distances"]
    # the coreset spreads its picks: its nearest neighbours are farther apart than a random subset's
    assert nn["selection"]["min"] >= nn["random"]["min"]


# ---- in a real browser -----------------------------------------------------------------------------

def find_chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None and Path("/usr/bin/chromium").exists():
        found = "/usr/bin/chromium"
    if found is None:
        reason = "chromium is not installed (apt-get install chromium)"
        if os.environ.get("CI", "").strip().lower() in ("1", "true", "yes"):
            pytest.fail(f"{reason}; CI=true: the browser test must run, not skip", pytrace=False)
        pytest.skip(reason)
    return found


def chromium(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    """Headless, offline-minded: no GPU, no QUIC, no background fetches, a throwaway profile."""
    return subprocess.run([binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                           "--no-first-run", "--disable-background-networking", "--disable-component-update",
                           "--disable-sync", f"--user-data-dir={profile}", "--virtual-time-budget=5000",
                           *args], capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_report_renders_every_plot_in_headless_chromium(run_dir, tmp_path):
    binary = find_chromium()
    run_dir = run_dir[0]
    result = write_report(run_dir)
    n_plots = len(result.artifacts) - 2
    page = (run_dir / "report.html").resolve().as_uri()

    dom = chromium(binary, tmp_path / "profile", "--dump-dom", page)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert len(re.findall(r"<img ", dom.stdout)) == n_plots
    body = re.search(r"<body[^>]*>", dom.stdout).group(0)
    assert f'data-images-total="{n_plots}"' in body and f'data-images-shown="{n_plots}"' in body, body

    # The check can fail: a page with one undecodable image reports one fewer shown.
    broken = run_dir / "broken.html"
    broken.write_text(re.sub(r"base64,[A-Za-z0-9+/]{40}", "base64,AAAA", (run_dir / "report.html").read_text(),
                             count=1))
    dom = chromium(binary, tmp_path / "profile", "--dump-dom", broken.resolve().as_uri())
    assert f'data-images-shown="{n_plots - 1}"' in dom.stdout

    screenshot = tmp_path / "report.png"
    shot = chromium(binary, tmp_path / "profile", f"--screenshot={screenshot}", "--window-size=1200,3000", page)
    assert shot.returncode == 0 and screenshot.is_file(), shot.stderr[-2000:]
    pixels = np.asarray(Image.open(screenshot).convert("RGB"), dtype=np.float64)
    assert pixels.shape[:2] == (3000, 1200)
    assert pixels.std() > 20, "the page rendered blank"
    coloured = (pixels.max(axis=2) - pixels.min(axis=2) > 60).mean()
    assert coloured > 0.01, "no plot colour on the page"
