"""The run directory's files: named only in app/artifacts.py, read and written there in the formats
users and tests read, and declared by the stages that read and write them, so that the runner
derives what each stage needs from the declarations."""
from __future__ import annotations

import ast
import fnmatch
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app import artifacts
from app.artifacts import (DATASET, EMBEDDING_MATRIX, EMBEDDING_ROWS, EMBEDDINGS, INPUT_FILES, STAGE_ARTIFACTS, Dataset, EmbeddingModel, producer_of,
                           top_level)

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "app"


# ---------------------------------------------------------------------------------------------
# One place for the names
# ---------------------------------------------------------------------------------------------
def artifact_names():
    return {value for name, value in vars(artifacts).items()
            if name.isupper() and isinstance(value, str) and ("/" in value or "." in value)}


def folder_prefixes():
    """`data/`, `filenames/`, ...: the folders of the run directory that the names lie in."""
    return sorted({top_level(name) + "/" for name in artifact_names() if "/" in name})


def file_names():
    """Top-level file names distinctive enough to find by equality. `.lock` is left out: the
    datapool's folder has a lock file of that name too."""
    return {name for name in artifact_names() if "/" not in name and name != artifacts.LOCK}


def string_starts(tree: ast.AST):
    """(line, text, whole) for each string literal in `tree`, and for each f-string its leading
    literal part (whole=False: the text goes on)."""
    inside_fstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            inside_fstrings.update(id(part) for part in node.values)
            first = node.values[0] if node.values else None
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                yield node.lineno, first.value, False
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in inside_fstrings:
            yield node.lineno, node.value, True


def test_the_run_directory_names_are_known_to_the_check():
    assert folder_prefixes() == ["checkpoints/", "data/", "filenames/", "plots/", "profile/"]
    assert {"summary.json", "metrics.json", "metrics.csv", "report.json", "report.html", ".hydra",
            ".thresher-run", "thresher.log"} <= file_names()


def test_every_run_directory_name_under_app_lives_in_the_artifacts_module():
    prefixes, names = tuple(folder_prefixes()), file_names()
    stray = []
    for path in sorted(APP.rglob("*.py")):
        if path == APP / "artifacts.py":
            continue
        for line, text, whole in string_starts(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if text.startswith(prefixes) or (whole and text in names):
                stray.append(f"{path.relative_to(ROOT)}:{line}: {text!r}")
    assert not stray, "run-directory names outside app/artifacts.py (import them from there):\n" + "\n".join(stray)


def test_the_check_finds_a_stray_name(tmp_path):
    source = 'X = "data/input_files.csv"\nY = f"checkpoints/epoch_{1}.pt"\nZ = "metrics.json"\nOK = f"see {X}"\n'
    found = [(text, whole) for _, text, whole in string_starts(ast.parse(source))]
    prefixes = tuple(folder_prefixes())
    flagged = [text for text, whole in found if text.startswith(prefixes) or (whole and text in file_names())]
    assert sorted(flagged) == ["checkpoints/epoch_", "data/input_files.csv", "metrics.json"]


# ---------------------------------------------------------------------------------------------
# The stages' declarations and what the runner derives from them
# ---------------------------------------------------------------------------------------------
def test_the_stages_are_declared_in_pipeline_order():
    from app.config import STAGES

    assert tuple(STAGE_ARTIFACTS) == STAGES


def test_each_stage_reads_only_what_itself_or_an_earlier_stage_writes():
    stages = list(STAGE_ARTIFACTS)
    for position, (stage, declared) in enumerate(STAGE_ARTIFACTS.items()):
        for name in declared.needs:
            assert stages.index(producer_of(name)) < position, f"{stage} needs {name}, written by no earlier stage"
        for name in declared.reads + declared.resume_state:
            assert stages.index(producer_of(name)) <= position, f"{stage} reads {name}, written by no stage before it"
        for name in declared.resume_state:
            assert name in declared.writes, f"{stage} resumes from {name}, which it does not write"


def test_the_runner_derives_the_stage_inputs_from_the_declarations():
    from app import run

    assert run.STAGE_INPUTS == {
        "embed": [(INPUT_FILES, "scan"), (DATASET, "scan")],
        "score": [(INPUT_FILES, "scan"), (DATASET, "scan")],
        "select": [(EMBEDDING_MATRIX, "embed"), (EMBEDDING_ROWS, "embed")],
        "profile": [(INPUT_FILES, "scan"), (DATASET, "scan")],
        "train": [(INPUT_FILES, "scan"), (DATASET, "scan")],
    }
    assert run.STAGE_RESUME_STATE == {
        "train": ("checkpoints/last.pt", "checkpoints/best.pt", "checkpoints/epoch_*.pt", "metrics.csv",
                  "metrics.json", "tensorboard")}


def test_overwrite_removes_every_top_level_name_a_stage_declares_and_no_other():
    from app import run

    declared = {top_level(name) for stage in STAGE_ARTIFACTS.values() for name in stage.writes}
    assert declared | {".hydra"} == set(run.RUN_OUTPUTS)
    assert set(run.RUN_OUTPUTS) == {".hydra", "data", "filenames", "checkpoints", "plots", "profile", "sampled",
                                    "tensorboard", "wandb", "metrics.json", "metrics.csv", "report.html",
                                    "report.json"}
    kept = {artifacts.SUMMARY, artifacts.MARKER, artifacts.LOCK, artifacts.HYDRA_LOG, artifacts.CONTAINER_LOG}
    assert not kept & set(run.RUN_OUTPUTS)


def test_a_stage_fingerprint_follows_the_stages_whose_files_it_reads():
    from app.fingerprints import STAGE_DEPENDENCIES

    for stage, declared in STAGE_ARTIFACTS.items():
        earlier = {producer_of(name) for name in declared.needs + declared.reads} - {stage}
        assert set(STAGE_DEPENDENCIES[stage].after) == earlier, stage


def declared_by(stage: str, written: str) -> bool:
    """`written` (a path relative to the run directory) is one of `stage`'s declared writes: the
    name, a match of a glob, or a file inside a declared folder."""
    return any(written == name or fnmatch.fnmatchcase(written, name) or written.startswith(name + "/")
               for name in STAGE_ARTIFACTS[stage].writes)


@pytest.fixture
def compose():
    from app.cli import compose_quietly
    from app.config import register_configs, register_resolvers

    register_configs()
    register_resolvers()
    return lambda *overrides: compose_quietly(["data=folder", "hardware=cpu", *overrides])


def test_the_scan_and_select_stages_write_only_what_they_declare(compose, tmp_path):
    import torch

    from app.data.scan import scan_stage
    from app.sampling.embedding_matrix import write_embeddings
    from app.sampling.select import select_stage

    images = tmp_path / "images"
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (images / label).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, size=(8, 8, 3), dtype=np.uint8)).save(images / label / f"{i}.png")
    (images / "a/broken.png").write_bytes(b"")
    cfg = compose(f"data.input_dir={images}", f"work_dir={tmp_path / 'runs'}", "sampler=random",
                  "sampler.stopping_condition.n_samples=3", "dump_dataset=true", "dump_sampled_embeddings=true",
                  "report.n_example_images=2")
    run_dir = tmp_path / "run"

    scanned = scan_stage(cfg, run_dir)
    assert all(declared_by("scan", name) for name in scanned.artifacts), scanned.artifacts
    written_by_scan = {p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file()}
    assert all(declared_by("scan", name) for name in written_by_scan), written_by_scan

    files, labels = artifacts.read_input_files(run_dir)
    write_embeddings(run_dir, files, labels, rng.normal(size=(len(files), 4)).astype(np.float32))
    selected = select_stage(cfg, run_dir, torch.device("cpu"))
    assert all(declared_by("select", name) for name in selected.artifacts), selected.artifacts
    written = {p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file()}
    by_select = written - written_by_scan - {EMBEDDINGS, EMBEDDING_MATRIX, EMBEDDING_ROWS}
    assert by_select and all(declared_by("select", name) for name in by_select), sorted(by_select)


# ---------------------------------------------------------------------------------------------
# Readers and writers: round trips, in the formats on disk
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("location", ["s3://bucket/prefix/images", "gs://bucket", "/data/input", "relative/folder"])
def test_the_dataset_keeps_its_location_as_written(tmp_path, location):
    artifacts.write_dataset(tmp_path, Dataset(location, ["cat", "dog"]))
    assert artifacts.read_dataset(tmp_path) == Dataset(location, ["cat", "dog"])
    assert (tmp_path / DATASET).read_text() == json.dumps({"input_dir": location, "classes": ["cat", "dog"]},
                                                          indent=2) + "\n"


def test_the_file_list_and_labels_round_trip(tmp_path):
    files = ["a/1.png", "b/co,mma.png", 'b/"quoted".png', "flat.png"]
    artifacts.write_input_files(tmp_path, files, [0, 1, 1, -1])
    assert artifacts.read_input_files(tmp_path) == (files, [0, 1, 1, -1])
    assert (tmp_path / INPUT_FILES).read_text().splitlines()[:2] == ["filenames,labels", "a/1.png,0"]


def test_the_lists_of_files_set_aside_round_trip(tmp_path):
    assert artifacts.read_corrupt_files(tmp_path) == [] and artifacts.read_duplicate_files(tmp_path) == []
    artifacts.write_corrupt_files(tmp_path, [("a/broken.png", "empty file (0 bytes)")])
    artifacts.add_corrupt_files(tmp_path, [("b/late.png", "OSError: truncated\nat byte 7")])
    artifacts.add_corrupt_files(tmp_path, [])
    assert artifacts.read_corrupt_files(tmp_path) == [("a/broken.png", "empty file (0 bytes)"),
                                                      ("b/late.png", "OSError: truncated at byte 7")]
    assert (tmp_path / artifacts.CORRUPT_FILES).read_text() == ("a/broken.png\tempty file (0 bytes)\n"
                                                                "b/late.png\tOSError: truncated at byte 7\n")
    artifacts.write_duplicate_files(tmp_path, [("a/copy.png", "a/1.png")])
    assert artifacts.read_duplicate_files(tmp_path) == [("a/copy.png", "a/1.png")]
    artifacts.write_missing_files(tmp_path, [("gone\n.png", "no such file")])
    artifacts.write_unused_files(tmp_path, [("tab\there.png", "name holds a tab (\\t)")])
    assert (tmp_path / artifacts.MISSING_FILES).read_text() == "gone\\n.png\tno such file\n"
    assert (tmp_path / artifacts.UNUSED_FILES).read_text() == "tab\\there.png\tname holds a tab (\\t)\n"


def test_the_selection_round_trips(tmp_path):
    assert artifacts.read_sampled(tmp_path) is None and artifacts.read_selection(tmp_path) is None
    artifacts.write_sampled(tmp_path, ["a/1.png", "b/2.png"])
    artifacts.write_removed(tmp_path, iter(["a/3.png"]))
    artifacts.write_selection(tmp_path, ["b/2.png", "a/1.png"], [float("inf"), 0.25])
    assert artifacts.read_sampled(tmp_path) == ["a/1.png", "b/2.png"]
    assert artifacts.read_removed(tmp_path) == ["a/3.png"]
    assert artifacts.read_selection(tmp_path) == [("b/2.png", float("inf")), ("a/1.png", 0.25)]
    assert (tmp_path / artifacts.SELECTION).read_text() == "filenames,pick,distance\nb/2.png,0,inf\na/1.png,1,0.25\n"
    artifacts.write_selection(tmp_path, ["a/1.png"], None)
    assert artifacts.read_selection(tmp_path) == [("a/1.png", None)]
    artifacts.write_sampled(tmp_path, [])
    assert artifacts.read_sampled(tmp_path) == []
    artifacts.write_near_duplicates(tmp_path, [("a/3.png", "a/1.png", 0.0123456789)])
    assert (tmp_path / artifacts.NEAR_DUPLICATES).read_text() == "a/3.png\ta/1.png\t0.0123457\n"


def test_the_embedding_model_and_the_videos_round_trip(tmp_path):
    assert artifacts.read_embedding_model(tmp_path) is None and artifacts.read_videos(tmp_path) is None
    model = EmbeddingModel(model="resnet18", weights=None, self_supervised_epochs=0, randomly_initialised=True)
    artifacts.write_embedding_model(tmp_path, model)
    assert artifacts.read_embedding_model(tmp_path) == model
    assert json.loads((tmp_path / artifacts.EMBEDDING_MODEL).read_text()) == {
        "model": "resnet18", "weights": None, "self_supervised_epochs": 0, "randomly_initialised": True}
    videos = {"clip.mp4": {"n_frames": 3, "fps": 25.0}}
    artifacts.write_videos(tmp_path, videos)
    assert artifacts.read_videos(tmp_path) == videos


def test_names_made_from_templates():
    assert artifacts.epoch_checkpoint(7) == "checkpoints/epoch_007.pt"
    assert fnmatch.fnmatchcase(artifacts.epoch_checkpoint(7), artifacts.EPOCH_CHECKPOINTS)
    assert artifacts.summary_file() == "summary.json" and artifacts.summary_file(".node2") == "summary.node2.json"
    assert artifacts.NODE_SUMMARY.fullmatch(artifacts.summary_file(".node2"))


def test_count_listed_counts_the_entries_of_a_list_without_reading_it_into_strings(tmp_path):
    from app.artifacts import CORRUPT_FILES, DUPLICATE_FILES, count_listed, read_corrupt_files, write_corrupt_files

    assert count_listed(tmp_path, CORRUPT_FILES) == 0  # not there yet
    found = [(f"a/{i}\u00e9.png", "truncated\nfile") for i in range(5)]
    write_corrupt_files(tmp_path, found)
    assert count_listed(tmp_path, CORRUPT_FILES) == len(read_corrupt_files(tmp_path)) == 5
    (tmp_path / DUPLICATE_FILES).write_bytes(b"x.png\ty.png\nz.png\ty.png")  # no final newline
    assert count_listed(tmp_path, DUPLICATE_FILES) == 2
    write_corrupt_files(tmp_path, [])
    assert count_listed(tmp_path, CORRUPT_FILES) == 0
