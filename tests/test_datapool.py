"""The datapool as a transactional store: runs that select into one pool at the same time take
turns, a rerun replaces its own part, a crash leaves the pool usable, history keeps every earlier
state, and a pool that cannot be trusted is refused with one line."""
from __future__ import annotations

import logging
import multiprocessing
import os
import re
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import torch

from app import cli
from app.config import register_configs, register_resolvers, validate
from app.errors import UserError
from app.sampling import datapool
from app.sampling.datapool import commit_run_selection, load_datapool, locked_datapool
from app.artifacts import SAMPLED
from app.sampling.embedding_matrix import write_embeddings
from app.sampling.embeddings_io import write_embeddings_csv
from app.sampling.select import select_stage
from conftest import thresher

CPU = torch.device("cpu")
FILES = [f"{label}/img_{i:02d}.png" for label in ("a", "b") for i in range(6)]


@pytest.fixture(autouse=True)
def _registered():
    register_configs()
    register_resolvers()


@pytest.fixture
def work_dir(tmp_path) -> Path:
    return tmp_path / "runs"


def vectors(n: int, seed: int = 0, dim: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)


def embedded_run(work_dir: Path, name: str, files=FILES) -> Path:
    """A run directory whose embed stage has finished: its embeddings for `files`."""
    run_dir = work_dir / name
    write_embeddings(run_dir, files, [i % 2 for i in range(len(files))], vectors(len(files)))
    return run_dir


def select_config(work_dir: Path, *overrides: str):
    return cli.compose([f"work_dir={work_dir}", "datapool.name=pool", "sampler=random",
                        "sampler.stopping_condition.n_samples=4", "report.n_example_images=0", "hardware=cpu",
                        *overrides])


def pool_folder(work_dir: Path) -> Path:
    return work_dir / "datapool/pool"


def sampled(run_dir: Path) -> list:
    return (run_dir / SAMPLED).read_text().split()


def members_of(pool, run_id: str) -> set:
    return {name for name, owner in zip(pool.files, pool.run_ids) if owner == run_id}


def commit(folder: Path, run_id: str, files, keep_history: bool = True) -> int:
    with locked_datapool(folder, run_id) as pool:
        return commit_run_selection(pool, run_id, list(files), vectors(len(files), seed=len(pool.files)),
                                    [0] * len(files), keep_history)


def assert_lightly_opens(folder: Path, expected_files) -> None:
    from lightly.utils.io import load_embeddings

    embeddings, labels, filenames = load_embeddings(str(folder / "embeddings.csv"))
    assert filenames == list(expected_files)
    assert embeddings.shape == (len(expected_files), 8) and len(labels) == len(expected_files)


# ---------------------------------------------------------------------------------------------
# Two runs at the same time
# ---------------------------------------------------------------------------------------------
class _ForwardMessages(logging.Handler):
    def __init__(self, queue):
        super().__init__()
        self.queue = queue

    def emit(self, record):
        self.queue.put(record.getMessage())


def _select_in_child(cfg, run_dir: Path, messages) -> None:
    logger = logging.getLogger("thresher")
    logger.setLevel(logging.INFO)
    logger.addHandler(_ForwardMessages(messages))
    select_stage(cfg, run_dir, CPU)


def test_two_runs_selecting_at_once_take_turns_and_the_second_leaves_out_the_firsts_picks(work_dir):
    cfg = select_config(work_dir)
    runs = [embedded_run(work_dir, "one"), embedded_run(work_dir, "two")]  # the same 12 candidates
    fork = multiprocessing.get_context("fork")
    messages = fork.Queue()
    # Hold the lock while both start, so that both are waiting for it when it is released.
    with locked_datapool(pool_folder(work_dir), "the test"):
        children = [fork.Process(target=_select_in_child, args=(cfg, run_dir, messages)) for run_dir in runs]
        for child in children:
            child.start()
        waiting = 0
        while waiting < 2:
            waiting += "waiting for the datapool lock held by run the test" in messages.get(timeout=120)
    for child in children:
        child.join(timeout=120)
        assert child.exitcode == 0

    pool = load_datapool(pool_folder(work_dir))
    assert len(pool.files) == len(set(pool.files)) == 8, "no file twice"
    one, two = (set(sampled(run_dir)) for run_dir in runs)
    assert len(one) == len(two) == 4 and not one & two, "the second run chose among what the first left"
    assert members_of(pool, "one") == one and members_of(pool, "two") == two
    assert_lightly_opens(pool_folder(work_dir), pool.files)


# ---------------------------------------------------------------------------------------------
# A rerun, a crash
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_rerunning_a_runs_select_replaces_its_members_and_leaves_the_others(work_dir):
    one, two = embedded_run(work_dir, "one"), embedded_run(work_dir, "two")
    select_stage(select_config(work_dir), one, CPU)
    select_stage(select_config(work_dir), two, CPU)
    before = load_datapool(pool_folder(work_dir))

    select_stage(select_config(work_dir, "seed=7"), one, CPU)  # another seed: another selection

    after = load_datapool(pool_folder(work_dir))
    assert len(after.files) == len(set(after.files)) == 8
    assert members_of(after, "one") == set(sampled(one)) != members_of(before, "one")
    assert not members_of(after, "one") & members_of(after, "two")
    kept = {name: when for name, owner, when in zip(before.files, before.run_ids, before.added_at) if owner == "two"}
    assert {name: when for name, owner, when in zip(after.files, after.run_ids, after.added_at)
            if owner == "two"} == kept, "the other run's members are untouched"


def test_a_run_whose_candidates_another_run_took_meanwhile_is_refused_with_one_line(work_dir):
    commit(pool_folder(work_dir), "other", FILES[:4])
    run_dir = embedded_run(work_dir, "late", FILES[:4])  # embedded before "other" updated the pool
    with pytest.raises(UserError, match="every candidate of this run is already in datapool 'pool'") as refused:
        select_stage(select_config(work_dir), run_dir, CPU)
    assert "\n" not in str(refused.value)


class Crash(Exception):
    pass


def test_a_crash_while_writing_an_update_leaves_the_previous_pool(work_dir, monkeypatch):
    folder = pool_folder(work_dir)
    commit(folder, "one", FILES[:4])
    before = {name: (folder / name).read_bytes() for name in ("embeddings.csv", "members.csv")}
    real_fsync = datapool.atomic.fsync

    def crash_once_the_members_draft_is_written(path):
        if Path(path).parent.name == datapool.DRAFT and Path(path).name.startswith(".members.csv."):
            raise Crash
        real_fsync(path)

    monkeypatch.setattr(datapool.atomic, "fsync", crash_once_the_members_draft_is_written)
    with pytest.raises(Crash):
        commit(folder, "two", FILES[4:8])
    monkeypatch.undo()

    assert {name: (folder / name).read_bytes() for name in before} == before
    assert load_datapool(folder).files == FILES[:4]
    assert not (folder / datapool.DRAFT).exists(), "taking the lock drops the unfinished draft"
    assert commit(folder, "two", FILES[4:8]) == 8, "and the next update goes through"


def test_a_crash_after_the_commit_is_finished_by_the_next_run_to_open_the_pool(work_dir, monkeypatch):
    folder = pool_folder(work_dir)
    commit(folder, "one", FILES[:4])
    real_replace = os.replace

    def crash_between_the_two_moves(source, target):
        if Path(source).parent.name == datapool.READY and Path(source).name == "members.csv":
            raise Crash
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", crash_between_the_two_moves)
    with pytest.raises(Crash):
        commit(folder, "two", FILES[4:8])
    monkeypatch.undo()

    pool = load_datapool(folder)
    assert pool.files == FILES[:8] and members_of(pool, "two") == set(FILES[4:8])
    assert not (folder / datapool.READY).exists()
    assert_lightly_opens(folder, FILES[:8])


# ---------------------------------------------------------------------------------------------
# History
# ---------------------------------------------------------------------------------------------
def test_history_keeps_every_previous_state_under_its_own_name(work_dir, monkeypatch):
    class SameSecond(datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime(2025, 1, 2, 3, 4, 5, tzinfo=tz)

    monkeypatch.setattr(datapool, "datetime", SameSecond)
    folder = pool_folder(work_dir)
    commit(folder, "one", FILES[:4])
    state_after_one = (folder / "members.csv").read_text()
    commit(folder, "two", FILES[4:8])
    state_after_two = (folder / "members.csv").read_text()
    commit(folder, "two", FILES[6:10])  # the same run again, within the same second

    kept = sorted((folder / "history").iterdir())
    assert [p.name for p in kept] == ["2025-01-02_03-04-05_two", "2025-01-02_03-04-05_two_2"]
    assert [(p / "members.csv").read_text() for p in kept] == [state_after_one, state_after_two]
    assert all((p / "embeddings.csv").is_file() for p in kept)
    assert load_datapool(folder).files == FILES[:4] + FILES[6:10]


def test_keep_history_false_keeps_none(work_dir):
    folder = pool_folder(work_dir)
    commit(folder, "one", FILES[:4], keep_history=False)
    commit(folder, "two", FILES[4:8], keep_history=False)
    assert not (folder / "history").exists()


# ---------------------------------------------------------------------------------------------
# Pools that cannot be trusted, pools from an older thresher
# ---------------------------------------------------------------------------------------------
def test_an_older_pool_holding_a_file_twice_is_refused_with_one_line(work_dir):
    folder = pool_folder(work_dir)
    write_embeddings_csv(folder / "embeddings.csv", FILES[:3] + FILES[:2], vectors(5), [0] * 5)
    for opening in (lambda: load_datapool(folder), lambda: select_stage(select_config(work_dir),
                                                                         embedded_run(work_dir, "one"), CPU)):
        with pytest.raises(UserError) as refused:
            opening()
        message = str(refused.value)
        assert f"datapool {folder} cannot be used" in message and "'a/img_00.png' appears twice" in message
        assert "keep one row per file" in message and "another datapool.name" in message and "\n" not in message


def test_a_pool_whose_two_files_disagree_is_refused_naming_the_history(work_dir):
    folder = pool_folder(work_dir)
    commit(folder, "one", FILES[:4])
    commit(folder, "two", FILES[4:8])
    write_embeddings_csv(folder / "embeddings.csv", FILES[:4], vectors(4), [0] * 4)  # by hand, say
    with pytest.raises(UserError, match=re.escape(f"members.csv and embeddings.csv list different files (edited "
                                                  f"by hand?): restore embeddings.csv and members.csv from "
                                                  f"the newest folder in {folder / 'history'}")):
        load_datapool(folder)


def test_an_older_pool_without_members_csv_is_kept_and_credited_to_no_run(work_dir):
    folder = pool_folder(work_dir)
    write_embeddings_csv(folder / "embeddings.csv", FILES[:3], vectors(3), [0] * 3)
    commit(folder, "one", FILES[3:6])
    commit(folder, "one", FILES[6:8])  # a rerun replaces run one's members, not the older ones
    pool = load_datapool(folder)
    assert pool.files == FILES[:3] + FILES[6:8]
    assert pool.run_ids == ["", "", "", "one", "one"]
    assert_lightly_opens(folder, pool.files)


# ---------------------------------------------------------------------------------------------
# A bucket work_dir
# ---------------------------------------------------------------------------------------------
def test_a_datapool_with_a_bucket_work_dir_is_refused_at_config_time():
    cfg = cli.compose(["work_dir=s3://bucket/runs", "datapool.name=pool"])
    with pytest.raises(UserError) as refused:
        validate(cfg)
    message = str(refused.value)
    assert message.startswith("datapool.name='pool' is not allowed") and "\n" not in message
    assert "work_dir='s3://bucket/runs' is a bucket" in message and "use a local work_dir" in message


@pytest.mark.slow
def test_a_datapool_with_a_bucket_work_dir_exits_2_before_any_stage(env, tmp_path):
    result = thresher(["work_dir=s3://bucket/runs", "datapool.name=pool"], env, tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "datapool.name='pool' is not allowed" in result.stderr
    assert list(tmp_path.iterdir()) == [], "nothing is made, not even an s3: folder"


@pytest.mark.slow
def test_a_whole_run_started_again_replaces_its_part_of_the_pool(monkeypatch, tmp_path, cache_dir):
    """Keyed by the run directory's run id: overwrite=true (embed and select again, another seed)
    leaves the pool with this run's new picks only; another run then adds its own."""
    from PIL import Image

    from app.artifacts import read_run_id
    from conftest import run_in_process

    folder = tmp_path / "images"
    rng = np.random.default_rng(0)
    for name in FILES:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(folder / name)
    common = ["data=folder", f"data.input_dir={folder}", "data.image_size=32", "hardware=cpu", "datapool.name=p",
              "sampler=random", "sampler.stopping_condition.n_samples=3", "stages=[scan,embed,select]"]
    assert run_in_process([*common, "run_directory=one"], monkeypatch, tmp_path, cache_dir)[0] == 0
    code, one = run_in_process([*common, "run_directory=one", "overwrite=true", "seed=7"], monkeypatch, tmp_path,
                               cache_dir)
    assert code == 0
    pool = load_datapool(tmp_path / "runs/datapool/p")
    assert sorted(pool.files) == sorted(sampled(one)) and set(pool.run_ids) == {read_run_id(one)}
    code, two = run_in_process([*common, "run_directory=two"], monkeypatch, tmp_path, cache_dir)
    assert code == 0
    pool = load_datapool(tmp_path / "runs/datapool/p")
    assert len(pool.files) == len(set(pool.files)) == 6
    assert members_of(pool, read_run_id(two)) == set(sampled(two))
