"""The samplers for scores and tiny budgets (uncertainty, hybrid, typical), sampler.balance, and
sampler=random without the embed stage: what each picks, that a seed gives the same picks, how
the datapool and frame sequences apply, and the refusals a user meets."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from app import artifacts, cli
from app.config import register_configs, register_resolvers, validate
from app.errors import UserError
from app.sampling.balance import class_quotas
from app.sampling.samplers import Candidates, needs_embeddings
from app.sampling.select import choose
from app.scoring.scores_io import write_scores
from conftest import main_in_process, only_run_dir, summary_of

CPU = torch.device("cpu")
SCORER = ["scorer=least_confidence", "scorer.checkpoint=best.pt"]  # composes; validation is not run on it


@pytest.fixture(autouse=True)
def _registered(tmp_path, monkeypatch):
    monkeypatch.setenv("THRESHER_WORK_DIR", str(tmp_path / "runs"))
    register_configs()
    register_resolvers()


def config(*overrides: str):
    return cli.compose(["report.n_example_images=0", "hardware=cpu", *overrides])


def refusal(*overrides: str) -> str:
    with pytest.raises(UserError) as caught:
        validate(cli.compose(list(overrides)))
    return str(caught.value)


def blobs(sizes, seed: int = 0, dim: int = 8, spread: float = 0.05):
    """Well-separated clusters of the given sizes (one per axis), and which blob each point is in."""
    rng = np.random.default_rng(seed)
    points, blob = [], []
    for index, size in enumerate(sizes):
        center = np.zeros(dim, dtype=np.float32)
        center[index] = 10.0
        points.append(center + spread * rng.normal(size=(size, dim)))
        blob += [index] * size
    return np.concatenate(points).astype(np.float32), np.array(blob)


def scored_run(tmp_path: Path, files, scores, predicted=None) -> Path:
    run_dir = tmp_path / "run"
    predicted = [-1] * len(files) if predicted is None else predicted
    write_scores(run_dir, zip(files, scores, predicted))
    return run_dir


FILES = [f"img_{i:02d}.png" for i in range(8)]


# ---------------------------------------------------------------------------------------------
# uncertainty
# ---------------------------------------------------------------------------------------------
def test_uncertainty_picks_the_highest_scores_first(tmp_path):
    scores = [0.1, 0.9, 0.5, 0.7, 0.2, 0.8, 0.3, 0.6]
    run_dir = scored_run(tmp_path, FILES, scores)
    chosen = choose(config("sampler=uncertainty", "sampler.stopping_condition.n_samples=3"), FILES, None, None,
                    CPU, run_dir=run_dir)
    assert chosen.picks == [1, 5, 3]
    assert (chosen.distances, chosen.stopped_by) == (None, "n_samples")


def test_uncertainty_breaks_ties_in_a_seeded_order_not_by_file_order(tmp_path):
    run_dir = scored_run(tmp_path, FILES, [0.5] * 8)

    def picks(seed: int):
        return choose(config("sampler=uncertainty", "sampler.stopping_condition.n_samples=4", f"seed={seed}"),
                      FILES, None, None, CPU, run_dir=run_dir).picks

    assert picks(0) == picks(0)
    assert len({tuple(picks(seed)) for seed in range(5)}) > 1


def test_a_sequence_is_scored_by_the_mean_of_its_frames(tmp_path):
    files = [f"{clip}/frame_{i}.png" for clip in ("a", "b") for i in range(4)]
    # a's runs score 0.7+0.0 and 0.4+0.4, b's 0.5+0.5 and 0.0+0.1: by mean, b's first run, then a's
    # second (by its highest frame, a's first would come first).
    run_dir = scored_run(tmp_path, files, [0.7, 0.0, 0.4, 0.4, 0.5, 0.5, 0.0, 0.1])
    chosen = choose(config("sampler=uncertainty", "sampler.selected_sequence_length=2",
                           "sampler.stopping_condition.n_samples=4"), files, None, None, CPU, run_dir=run_dir)
    assert chosen.picks == [4, 5, 2, 3]


def test_a_candidate_without_a_score_is_refused_naming_how_many_and_one(tmp_path):
    run_dir = scored_run(tmp_path, FILES[:6], [0.5] * 6)
    with pytest.raises(UserError, match=r"2 of 8 candidates have no score in data/scores.csv "
                                        r"\(e.g. 'img_06.png'\): the score stage did not score them"):
        choose(config("sampler=uncertainty"), FILES, None, None, CPU, run_dir=run_dir)


def test_missing_scores_are_refused_with_the_stage_that_makes_them(tmp_path):
    with pytest.raises(UserError, match="sampler=uncertainty needs data/scores.csv from the score stage"):
        choose(config("sampler=uncertainty"), FILES, None, None, CPU, run_dir=tmp_path)


# ---------------------------------------------------------------------------------------------
# hybrid
# ---------------------------------------------------------------------------------------------
def test_hybrid_is_coreset_among_the_most_uncertain(tmp_path):
    from app.sampling.coreset import select_coreset, normalize_rows

    points, _ = blobs([10, 10, 10, 10], dim=8, spread=0.5)
    files = [f"img_{i:02d}.png" for i in range(len(points))]
    scores = np.linspace(0.0, 1.0, len(points))  # the last 40% are the most uncertain
    run_dir = scored_run(tmp_path, files, scores)
    cfg = config("sampler=hybrid", "sampler.uncertain_fraction=0.4", "sampler.stopping_condition.n_samples=5")
    chosen = choose(cfg, files, points, None, CPU, run_dir=run_dir)
    top = np.arange(24, 40)
    assert set(chosen.picks) <= set(top.tolist()) and len(chosen.picks) == 5
    expected = select_coreset(normalize_rows(points)[top], 5, -1.0, cfg.seed, CPU)
    assert chosen.picks == top[expected.indices].tolist()
    assert chosen.distances == pytest.approx(expected.distances)

    everything = choose(config("sampler=hybrid", "sampler.uncertain_fraction=1.0",
                               "sampler.stopping_condition.n_samples=5"), files, points, None, CPU, run_dir=run_dir)
    plain = choose(config("sampler=coreset", "sampler.stopping_condition.n_samples=5"), files, points, None, CPU)
    assert everything.picks == plain.picks  # a fraction of 1.0 is plain coreset


def test_hybrid_keeps_at_least_the_budget_and_counts_the_datapool_as_centers():
    from app.sampling.samplers.hybrid import select_hybrid_units

    points, blob = blobs([5, 5, 5], spread=0.01)
    files = [f"{i}.png" for i in range(15)]
    scores = np.arange(15, dtype=np.float64)
    candidates = Candidates(files, [[i] for i in range(15)], points, scores=scores)
    chosen = select_hybrid_units(candidates, 2, None, 0, CPU, SimpleNamespace(uncertain_fraction=0.01))
    assert sorted(chosen.picks) == [13, 14]  # a fraction under the budget still keeps the budget

    pool = points[blob == 0][:1]  # blob 0 is covered by the datapool
    chosen = select_hybrid_units(candidates, 2, pool, 0, CPU, SimpleNamespace(uncertain_fraction=1.0))
    assert sorted(blob[chosen.picks]) == [1, 2]


# ---------------------------------------------------------------------------------------------
# typical (TypiClust) and its k-means
# ---------------------------------------------------------------------------------------------
def test_kmeans_is_seeded_and_finds_separated_clusters():
    from app.sampling.kmeans import kmeans

    points, blob = blobs([30, 20, 10])
    first, again = kmeans(points, 3, seed=1), kmeans(points, 3, seed=1)
    assert np.array_equal(first.assignments, again.assignments)
    # every blob is one cluster, whatever the clusters are numbered
    assert len({(b, c) for b, c in zip(blob, first.assignments)}) == 3


def test_typical_takes_the_most_typical_point_of_each_cluster_largest_first():
    from app.sampling.samplers.typical import select_typical

    points, blob = blobs([30, 20, 10], spread=0.05)
    # Put one point of each blob at its exact center: the densest spot, so the most typical.
    centers = [int(np.flatnonzero(blob == b)[3]) for b in range(3)]
    for b, index in enumerate(centers):
        points[index] = points[blob == b].mean(axis=0)
    picks = select_typical(points, 3, None, seed=0, neighbours=20)
    assert picks == centers  # blob 0 (30 points) first, then 20, then 10
    assert select_typical(points, 3, None, seed=0, neighbours=20) == picks


def test_typical_leaves_clusters_the_datapool_covers():
    from app.sampling.samplers.typical import select_typical

    points, blob = blobs([30, 20, 10])
    pool = points[blob == 0][:2] + 0.001  # two earlier picks in the largest blob
    picks = select_typical(points, 2, pool, seed=0, neighbours=5)
    assert sorted(blob[picks]) == [1, 2]


def test_typical_fills_the_budget_when_clusters_come_out_empty():
    from app.sampling.samplers.typical import select_typical

    points = np.repeat(np.eye(3, 8, dtype=np.float32), 4, axis=0)  # 3 distinct points, 4 copies each
    picks = select_typical(points, 7, None, seed=0, neighbours=3)
    assert len(picks) == 7 == len(set(picks))


def test_typical_selects_whole_sequences_from_the_stage(tmp_path):
    files = [f"{clip}/frame_{i}.png" for clip in ("a", "b", "c") for i in range(4)]
    points, _ = blobs([4, 4, 4])
    chosen = choose(config("sampler=typical", "sampler.selected_sequence_length=2",
                           "sampler.stopping_condition.n_samples=4"), files, points, None, CPU)
    assert len(chosen.picks) == 4
    pairs = [tuple(chosen.picks[i:i + 2]) for i in (0, 2)]
    assert all(b == a + 1 and a % 2 == 0 for a, b in pairs)  # runs of 2 consecutive frames


# ---------------------------------------------------------------------------------------------
# sampler.balance
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("available, total, quotas", [
    ([10, 10, 10], 10, [3, 3, 4]),     # what does not divide goes to the larger classes
    ([1, 10, 10], 9, [1, 4, 4]),       # a small class gives the rest of its share to the others
    ([100, 2], 10, [8, 2]),
    ([3, 4], 20, [3, 4]),              # a budget over the candidates takes them all
])
def test_the_budget_is_split_as_equally_as_the_classes_allow(available, total, quotas):
    assert class_quotas(available, total).tolist() == quotas


def test_balance_selects_within_each_class_and_interleaves_the_picks(tmp_path):
    files = [f"{c}/{i}.png" for c in ("cat", "dog") for i in range(4)] + ["x.png"]
    scores = [0.1, 0.9, 0.8, 0.2, 0.3, 0.4, 0.95, 0.1, 1.0]
    run_dir = scored_run(tmp_path, files, scores)
    cfg = config("sampler=uncertainty", "sampler.balance=known", "sampler.stopping_condition.n_samples=4")
    chosen = choose(cfg, files, None, None, CPU, run_dir=run_dir,
                    known_labels=np.array([0, 0, 0, 0, 1, 1, 1, 1, -1]))
    # cat's best two (1, 2) and dog's (6, 5), in turns; x.png has no class and is left out
    assert chosen.picks == [1, 6, 2, 5]
    assert chosen.picks_per_class == {0: 2, 1: 2}


def test_balance_on_predicted_labels_reads_them_from_the_scores(tmp_path):
    run_dir = scored_run(tmp_path, FILES, [0.0] * 8, predicted=[0, 0, 0, 0, 0, 0, 1, 1])
    cfg = config("sampler=random", "sampler.balance=predicted", "sampler.stopping_condition.n_samples=4")
    chosen = choose(cfg, FILES, None, None, CPU, run_dir=run_dir)
    assert chosen.picks_per_class == {0: 2, 1: 2}
    assert {6, 7} <= set(chosen.picks)


def test_balance_warns_with_a_count_of_units_without_a_class(tmp_path, caplog):
    cfg = config("sampler=random", "sampler.balance=known", "sampler.stopping_condition.n_samples=2")
    with caplog.at_level(logging.WARNING, logger="thresher"):
        chosen = choose(cfg, FILES, None, None, CPU, known_labels=np.array([0, 0, 1, 1, -1, -1, -1, 1]))
    assert "sampler.balance=known: 3 of 8 candidates have no class label" in caplog.text
    assert not {4, 5, 6} & set(chosen.picks)


def test_balance_is_refused_when_no_candidate_has_a_class():
    cfg = config("sampler=random", "sampler.balance=known", "sampler.stopping_condition.n_samples=2")
    with pytest.raises(UserError, match=r"sampler.balance=known: none of the 8 candidates has a class label "
                                        r"\(they are in no class folder\): use sampler.balance=null"):
        choose(cfg, FILES, None, None, CPU, known_labels=np.full(8, -1))


def test_balance_works_around_coreset_with_a_datapool(tmp_path):
    points, blob = blobs([6, 6, 6])
    files = [f"{i}.png" for i in range(18)]
    labels = np.array([0] * 9 + [1] * 9)
    cfg = config("sampler=coreset", "sampler.balance=known", "sampler.stopping_condition.n_samples=4")
    chosen = choose(cfg, files, points, None, CPU, known_labels=labels)
    assert chosen.picks_per_class == {0: 2, 1: 2}
    assert [labels[p] for p in chosen.picks] == [0, 1, 0, 1]
    assert chosen.distances is not None and len(chosen.distances) == 4


# ---------------------------------------------------------------------------------------------
# What needs embeddings and scores; refusals
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, needed", [
    (["sampler=random"], False),
    (["sampler=random", "datapool.name=pool"], True),
    (["sampler=random", "sampler.near_duplicate_distance=0.1"], True),
    (["sampler=uncertainty"], False),
    (["sampler=none", "datapool.name=pool"], False),
    (["sampler=coreset"], True),
    (["sampler=typical"], True),
    (["sampler=hybrid"], True),
])
def test_the_embed_stage_runs_only_when_something_needs_embeddings(overrides, needed):
    assert needs_embeddings(cli.compose(overrides)) is needed


@pytest.mark.parametrize("overrides, message", [
    (["sampler=uncertainty"], "sampler=uncertainty needs scores: set a scorer and its checkpoint, e.g. "
                              "scorer=least_confidence scorer.checkpoint=<a trained checkpoint, e.g. an earlier "
                              "run's checkpoints/best.pt>"),
    (["sampler=hybrid"], "sampler=hybrid needs scores: set a scorer and its checkpoint"),
    (["sampler=random", "sampler.balance=predicted"], "sampler.balance=predicted needs scores"),
    (["sampler.balance=knwon"], "sampler.balance='knwon' is not allowed: choose known (the class folders' labels), "
                                "predicted (the scorer's predicted labels) or null (off) (did you mean known?)"),
    (["sampler=none", "sampler.balance=known"], "it splits the budget over the classes"),
    (["sampler=hybrid", *SCORER, "sampler.uncertain_fraction=0"], "sampler.uncertain_fraction=0.0 is not allowed"),
    (["sampler=typical", "sampler.typical_neighbours=0"], "sampler.typical_neighbours=0 is not allowed"),
    (["sampler=random", "enable_training=true"], "sampler=random picks without embeddings and nothing else uses"),
    (["sampler=none", "sampler.near_duplicate_distance=0.1"], "it needs embeddings; sampler=none has none"),
])
def test_what_a_sampler_cannot_do_is_refused_in_one_line(overrides, message):
    text = refusal(*overrides)
    assert message in text and "\n" not in text


def test_random_with_a_datapool_may_train_its_embeddings():
    validate(cli.compose(["sampler=random", "datapool.name=pool", "enable_training=true"]))


# ---------------------------------------------------------------------------------------------
# From the command line, on tiny shapes
# ---------------------------------------------------------------------------------------------
TINY = ["data.n_images=24", "data.shapes_image_size=32", "data.image_size=16", "hardware=cpu",
        "report.n_example_images=0", "stages=[scan,embed,select]", "sampler.stopping_condition.n_samples=6"]


def test_random_skips_the_embed_stage_and_picks_what_it_picks_with_it(monkeypatch, capsys, tmp_path, cache_dir):
    code, out, err = main_in_process([*TINY, "sampler=random", "note=plain"], monkeypatch, capsys, tmp_path,
                                     cache_dir)
    assert code == 0, err
    plain = only_run_dir(tmp_path / "runs")
    summary = summary_of(plain)
    assert summary["stages"]["embed"] == {"status": "skipped"}
    assert "stage embed: skipped, sampler=random picks without embeddings and nothing else needs them" in out + err
    assert (plain / artifacts.REPORT_HTML).is_file() and not (plain / artifacts.EMBEDDING_MATRIX).exists()

    other = tmp_path / "other"
    other.mkdir()
    code, out, err = main_in_process([*TINY, "sampler=random", "datapool.name=pool", "note=pooled"], monkeypatch,
                                     capsys, other, cache_dir)
    assert code == 0, err
    pooled = next((other / "runs").glob("*_pooled"))
    assert summary_of(pooled)["stages"]["embed"]["status"] == "finished"
    assert "stage embed: runs although sampler=random picks without embeddings: datapool.name=pool" in out + err
    assert (pooled / artifacts.SAMPLED).read_text() == (plain / artifacts.SAMPLED).read_text()


def test_typical_with_balance_records_the_picks_per_class(monkeypatch, capsys, tmp_path, cache_dir):
    code, out, err = main_in_process([*TINY, "sampler=typical", "sampler.balance=known"], monkeypatch, capsys,
                                     tmp_path, cache_dir)
    assert code == 0, err
    run_dir = only_run_dir(tmp_path / "runs")
    select = summary_of(run_dir)["stages"]["select"]
    assert (select["method"], select["n_selected"], select["balance"]) == ("typical", 6, "known")
    classes = json.loads((run_dir / artifacts.DATASET).read_text())["classes"]
    assert sorted(select["picks_per_class"]) == sorted(classes)
    assert sum(select["picks_per_class"].values()) == 6 and max(select["picks_per_class"].values()) == 2
