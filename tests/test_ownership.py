"""thresher writes only into folders it created (or found empty) and removes only what it wrote:
a user's folder, work_dir, other runs and the datapool are never touched."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from app.artifacts import MARKER, read_run_id
from app.errors import UserError
from app.run import check_run_directory
from conftest import SMALL, main_in_process, run_in_process, thresher

SCAN_ONLY = [*SMALL, "stages=[scan]"]


def snapshot(folder: Path) -> dict:
    """Every path under `folder` with its bytes (files) or None (folders and links)."""
    found = {}
    for path in sorted(folder.rglob("*")):
        found[str(path.relative_to(folder))] = path.read_bytes() if path.is_file() and not path.is_symlink() else None
    return found


@pytest.fixture
def user_folder(tmp_path) -> Path:
    """A folder of the user's: sources and notes that no run of thresher made."""
    folder = tmp_path / "project"
    (folder / "src").mkdir(parents=True)
    (folder / "src" / "train.py").write_text("print('mine')\n")
    (folder / "notes.txt").write_text("keep me\n")
    return folder


@pytest.mark.slow
def test_a_folder_with_files_thresher_did_not_create_is_refused_and_left_untouched(env, tmp_path, user_folder):
    before = snapshot(user_folder)
    result = thresher([*SCAN_ONLY, f"run_directory={user_folder}"], env, tmp_path)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "thresher: error:" in result.stderr
    assert str(user_folder) in result.stderr and "did not create" in result.stderr
    assert snapshot(user_folder) == before  # not even Hydra's log file or a lock


@pytest.mark.slow
def test_overwrite_does_not_make_a_foreign_folder_deletable(env, tmp_path, user_folder):
    before = snapshot(user_folder)
    result = thresher([*SCAN_ONLY, f"run_directory={user_folder}", "overwrite=true"], env, tmp_path)
    assert result.returncode == 2
    assert snapshot(user_folder) == before


@pytest.mark.parametrize("overwrite", [[], ["overwrite=true"]], ids=["plain", "overwrite"])
def test_a_foreign_folder_is_refused_in_process_and_left_untouched(overwrite, monkeypatch, capsys, tmp_path,
                                                                   cache_dir, user_folder):
    """The two tests above (slow tier) through `app.cli.main` in this process."""
    before = snapshot(user_folder)
    code, _, err = main_in_process([*SCAN_ONLY, f"run_directory={user_folder}", *overwrite], monkeypatch, capsys,
                                   tmp_path, cache_dir)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("thresher: error:")
    assert str(user_folder) in err and "did not create" in err
    assert snapshot(user_folder) == before  # not even Hydra's log file or a lock


@pytest.mark.slow
def test_work_dir_itself_is_never_a_run_directory(env, tmp_path):
    work_dir = tmp_path / "runs"
    first = thresher([*SCAN_ONLY, "run_directory=first"], env, tmp_path)
    assert first.returncode == 0, first.stderr
    pool = work_dir / "datapool" / "mine"
    pool.mkdir(parents=True)
    (pool / "embeddings.csv").write_text("filenames,embedding_0,labels\n")
    before = snapshot(work_dir)
    for spelling in (".", "./", str(work_dir), f"{work_dir}/."):
        result = thresher([*SCAN_ONLY, f"run_directory={spelling}", "overwrite=true"], env, tmp_path)
        assert result.returncode == 2, spelling
        assert "work_dir itself" in result.stderr, result.stderr
    assert snapshot(work_dir) == before


@pytest.mark.slow
@pytest.mark.parametrize("run_directory", ["../elsewhere", "a/../../b", "a/../b"])
def test_a_run_directory_with_dot_dot_is_refused(env, tmp_path, run_directory):
    result = thresher([*SCAN_ONLY, f"run_directory={run_directory}"], env, tmp_path)
    assert result.returncode == 2
    assert "'..' is not allowed" in result.stderr
    assert not (tmp_path / "elsewhere").exists() and not (tmp_path / "b").exists()


def test_runs_inside_runs_and_inside_the_datapool_are_refused(tmp_path):
    work_dir = tmp_path / "runs"
    outer = work_dir / "outer"
    outer.mkdir(parents=True)
    (outer / MARKER).write_text(json.dumps({"created_by": "thresher", "run_id": "x"}))
    with pytest.raises(UserError, match="inside the run directory"):
        check_run_directory(outer / "inner", str(work_dir), "outer/inner")
    with pytest.raises(UserError, match="inside the datapool folder"):
        check_run_directory(work_dir / "datapool" / "p" / "run", str(work_dir), "datapool/p/run")
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        check_run_directory(tmp_path / "a_file", str(work_dir), str(tmp_path / "a_file"))


@pytest.mark.slow
def test_a_symlink_to_a_foreign_folder_is_refused(env, tmp_path, user_folder):
    link = tmp_path / "runs" / "link"
    link.parent.mkdir(parents=True)
    link.symlink_to(user_folder, target_is_directory=True)
    before = snapshot(user_folder)
    result = thresher([*SCAN_ONLY, "run_directory=link", "overwrite=true"], env, tmp_path)
    assert result.returncode == 2
    assert snapshot(user_folder) == before


def test_an_empty_folder_is_adopted_and_marked(monkeypatch, tmp_path, cache_dir):
    empty = tmp_path / "runs" / "empty"
    empty.mkdir(parents=True)
    code, run_dir = run_in_process([*SCAN_ONLY, "run_directory=empty"], monkeypatch, tmp_path, cache_dir)
    assert code == 0 and run_dir == empty
    marker = json.loads((empty / MARKER).read_text())
    assert marker["created_by"] == "thresher" and marker["run_id"] == read_run_id(empty)
    summary = json.loads((empty / "summary.json").read_text())
    assert summary["run_id"] == marker["run_id"]


def test_overwrite_removes_only_what_thresher_wrote(monkeypatch, tmp_path, cache_dir):
    code, run_dir = run_in_process([*SCAN_ONLY, "run_directory=job"], monkeypatch, tmp_path, cache_dir)
    assert code == 0
    run_id = read_run_id(run_dir)
    (run_dir / "my_notes.md").write_text("the user's own file, put into the run directory\n")
    (run_dir / "analysis").mkdir()
    (run_dir / "analysis" / "plot.py").write_text("pass\n")
    (run_dir / "data" / "stale.csv").write_text("thresher's folder: removed with it\n")

    code, _ = run_in_process([*SCAN_ONLY, "run_directory=job", "overwrite=true"], monkeypatch, tmp_path, cache_dir)
    assert code == 0
    assert (run_dir / "my_notes.md").read_text().startswith("the user's own file")
    assert (run_dir / "analysis" / "plot.py").is_file()
    assert not (run_dir / "data" / "stale.csv").exists()
    assert (run_dir / "data" / "input_files.csv").is_file()
    assert read_run_id(run_dir) == run_id  # the same run, started again: the datapool keys on it


def test_a_damaged_marker_is_refused(monkeypatch, tmp_path, cache_dir):
    run_dir = tmp_path / "runs" / "damaged"
    run_dir.mkdir(parents=True)
    (run_dir / MARKER).write_text("not json")
    code, _ = run_in_process([*SCAN_ONLY, "run_directory=damaged"], monkeypatch, tmp_path, cache_dir)
    assert code == 2
    assert sorted(os.listdir(run_dir)) == [".lock", MARKER]
