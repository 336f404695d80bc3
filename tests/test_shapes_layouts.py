"""`python -m app.data.shapes`: the shapes written as a dataset a newcomer can point thresher at:
a folder of class sub-folders for data=folder, or the Oxford-IIIT Pet layout; written atomically,
and never into a folder that holds anything else."""
from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from app.data.scan import labels_for
from app.data.shapes import CLASSES, MANIFEST, main, write_folder_layout
from conftest import run_in_process, summary_of


def shapes_cli(args, capsys) -> tuple:
    """`python -m app.data.shapes *args` in this process: (exit code, stdout, stderr)."""
    code = 0
    try:
        main([str(arg) for arg in args])
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def image_files(root: Path) -> list:
    return sorted(path.relative_to(root).as_posix() for path in root.rglob("*")
                  if path.is_file() and not path.name.startswith("."))


def test_the_folder_layout_is_one_sub_folder_per_class_of_square_jpegs(tmp_path):
    root = write_folder_layout(tmp_path / "shapes", n_images=7, image_size=40)

    files = image_files(root)
    assert files == ["circle/circle_00000.jpg", "circle/circle_00003.jpg", "circle/circle_00006.jpg",
                     "square/square_00001.jpg", "square/square_00004.jpg",
                     "triangle/triangle_00002.jpg", "triangle/triangle_00005.jpg"]
    classes, labels = labels_for(files)  # as data=folder labels them: the first-level folder
    assert classes == list(CLASSES)
    assert labels == [0, 0, 0, 1, 1, 2, 2]
    for name in files:
        with Image.open(root / name) as image:
            image.load()
            assert (image.format, image.size, image.mode) == ("JPEG", (40, 40), "RGB")


def test_the_folder_layout_is_the_same_every_time(tmp_path):
    first = write_folder_layout(tmp_path / "a", n_images=3, image_size=32)
    second = write_folder_layout(tmp_path / "b", n_images=3, image_size=32)
    assert [(first / name).read_bytes() for name in image_files(first)] == \
           [(second / name).read_bytes() for name in image_files(second)]


def test_thresher_runs_data_folder_on_the_folder_layout(tmp_path, capsys, monkeypatch, cache_dir):
    out = tmp_path / "my-shapes"
    code, printed, _ = shapes_cli(["--layout", "folder", "--out", out, "--n-images", 12, "--image-size", 32], capsys)
    assert code == 0
    assert f"thresher data=folder data.input_dir={out}" in printed

    code, run_dir = run_in_process(["data=folder", f"data.input_dir={out}", "trainer.epochs=1", "hardware=cpu",
                                    "data.image_size=32", "sampler.stopping_condition.n_samples=6"],
                                   monkeypatch, tmp_path, cache_dir)
    assert code == 0
    summary = summary_of(run_dir)
    assert summary["status"] == "finished"
    assert summary["stages"]["train"]["status"] == "finished"
    assert (run_dir / "checkpoints" / "last.pt").is_file()


def test_help_says_what_each_layout_is_for(capsys):
    code, printed, _ = shapes_cli(["--help"], capsys)
    assert code == 0
    assert "--layout {pets,folder}" in printed
    layouts = printed.split("layouts:", 1)[1].split("examples:", 1)[0]
    assert "folder  a folder of class sub-folders" in layouts and "for data=folder" in layouts
    assert "pets    the Oxford-IIIT Pet layout" in layouts and "data=oxford_pet" in layouts


def test_the_older_positional_form_still_writes_the_pets_layout(tmp_path, capsys):
    code, printed, _ = shapes_cli(["pets", tmp_path / "pets", 4, 48], capsys)
    assert code == 0
    assert "4 shapes in the pets layout" in printed
    assert len(list((tmp_path / "pets" / "images").glob("*.jpg"))) == 4
    assert (tmp_path / "pets" / "annotations" / "trainval.txt").is_file()


def test_pets_is_the_default_layout(tmp_path, capsys):
    code, _, _ = shapes_cli(["--out", tmp_path / "pets", "--n-images", 3, "--image-size", 32], capsys)
    assert code == 0
    assert len(list((tmp_path / "pets" / "images").glob("*.jpg"))) == 3


def test_a_folder_holding_other_files_is_refused_and_left_as_it_was(tmp_path, capsys):
    out = tmp_path / "photos"
    (out / "holiday").mkdir(parents=True)
    (out / "holiday" / "beach.jpg").write_bytes(b"the user's")

    code, printed, err = shapes_cli(["--layout", "folder", "--out", out, "--n-images", 3, "--image-size", 32], capsys)

    assert code == 2
    assert err.splitlines() == [f"thresher: error: --out {out} holds files this generator did not write "
                                f"(holiday/beach.jpg): name a new or empty folder"]
    assert printed == ""
    assert image_files(out) == ["holiday/beach.jpg"] and not (out / MANIFEST).exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["photos"]  # no staging folder left


def test_a_file_added_to_an_earlier_output_makes_it_refused(tmp_path, capsys):
    out = tmp_path / "shapes"
    assert shapes_cli(["--layout", "folder", "--out", out, "--n-images", 3, "--image-size", 32], capsys)[0] == 0
    (out / "circle" / "mine.jpg").write_bytes(b"the user's")

    code, _, err = shapes_cli(["--layout", "folder", "--out", out, "--n-images", 6, "--image-size", 32], capsys)

    assert code == 2 and len(err.splitlines()) == 1 and "(circle/mine.jpg)" in err
    assert (out / "circle" / "mine.jpg").read_bytes() == b"the user's"


def test_an_earlier_output_is_replaced_whole(tmp_path, capsys):
    out = tmp_path / "shapes"
    assert shapes_cli(["--layout", "folder", "--out", out, "--n-images", 6, "--image-size", 32], capsys)[0] == 0

    code, _, _ = shapes_cli(["--layout", "pets", "--out", out, "--n-images", 3, "--image-size", 32], capsys)

    assert code == 0
    assert not (out / "circle").exists()  # nothing of the folder layout is left to mix in
    assert len(list((out / "images").glob("*.jpg"))) == 3
    assert sorted(path.name for path in tmp_path.iterdir()) == ["shapes"]


def test_an_empty_folder_is_written_into(tmp_path, capsys):
    out = tmp_path / "empty"
    out.mkdir()
    code, _, _ = shapes_cli(["--layout", "folder", "--out", out, "--n-images", 3, "--image-size", 32], capsys)
    assert code == 0
    assert len(image_files(out)) == 3


@pytest.mark.parametrize("args, message", [
    (["--n-images", 2], "--n-images=2 is not allowed: use an integer >= 3 (one per class)"),
    (["--image-size", 16], "--image-size=16 is not allowed: use an integer >= 32"),
])
def test_sizes_too_small_are_refused_with_one_line(args, message, tmp_path, capsys):
    code, _, err = shapes_cli(["--layout", "folder", "--out", tmp_path / "shapes", *args], capsys)
    assert code == 2
    assert err.splitlines() == [f"thresher: error: {message}"]
    assert not (tmp_path / "shapes").exists()


def test_an_out_that_is_a_file_is_refused(tmp_path, capsys):
    out = tmp_path / "notes.txt"
    out.write_text("mine")
    code, _, err = shapes_cli(["--layout", "folder", "--out", out], capsys)
    assert code == 2
    assert err.splitlines() == [f"thresher: error: --out {out} is a file: name a new or empty folder"]
    assert out.read_text() == "mine"
