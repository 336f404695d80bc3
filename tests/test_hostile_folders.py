"""Any folder can be scanned: link loops, special files, names no list can hold as they are,
unreadable folders, multi-frame images and odd relevant_filenames_file entries. Every file is used
or listed with why, and every name that is used comes back unchanged from every artifact."""
from __future__ import annotations

import csv
import errno
import hashlib
import os
import socket
import threading
import warnings
from pathlib import Path
from typing import Callable, List, Tuple

import numpy as np
import pytest
import torch
from PIL import Image

from app import atomic
from app.artifacts import INPUT_FILES, read_input_files
from app.data import sources
from app.data.images import ImageFiles, image_transform, open_image
from app.data.names import escape_name, name_problem
from app.data.scan import inspect_file, scan_stage

# Names the rule uses: they must come back unchanged from every artifact.
ODD_BUT_USED = ['co,mma.png', 'quo"te.png', '"quoted".png', "apo'strophe.png", " leading space.png",
                "trailing space .png", "-dash.png", "#hash.png", "日本é.png", "e\u0301-combining.png",
                "emoji 🙂.png", "back\\slash.png", "a\\nb-literal.png", "semi;colon.png", "=formula.png"]


def image(path: Path, size=(16, 12)) -> Path:
    """A PNG whose colour comes from its name: no two are exact duplicates."""
    path.parent.mkdir(parents=True, exist_ok=True)
    colour = tuple(hashlib.sha256(os.fsencode(path)).digest()[:3])
    Image.new("RGB", size, colour).save(path, format="PNG")
    return path


def bytes_path(folder: Path, name: bytes) -> Path:
    """A path whose last part is raw bytes, as Python names it (surrogateescape)."""
    return folder / os.fsdecode(name)


def compose(*overrides: str):
    from app.cli import compose_quietly
    from app.config import register_configs, register_resolvers

    register_configs()
    register_resolvers()
    return compose_quietly(["data=folder", "hardware=cpu", *overrides])


def scan(folder: Path, run_dir: Path, *overrides: str):
    return scan_stage(compose(f"data.input_dir={folder}", *overrides), run_dir)


def input_rows(run_dir: Path) -> List[Tuple[str, int]]:
    names, labels = read_input_files(run_dir)
    return list(zip(names, labels))


def listed(run_dir: Path, artifact: str) -> List[List[str]]:
    """The `name<TAB>reason` rows of a list, checked to be one name and one reason a line."""
    text = (run_dir / artifact).read_bytes().decode("utf-8")
    rows = [line.split("\t") for line in text.split("\n") if line]
    assert all(len(row) == 2 for row in rows), rows
    return rows


def finishes(function: Callable[[], object], fifos: List[Path], timeout_s: float = 60) -> object:
    """function(), on a thread; fails (and frees the thread) when it is still blocked on a FIFO
    after `timeout_s`. Proves that nothing waits on a FIFO without asserting on how long it takes."""
    outcome = {}

    def run():
        try:
            outcome["value"] = function()
        except BaseException as error:  # handed to the test below
            outcome["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        for fifo in fifos:  # a writer end releases a reader blocked in open()
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join()
        pytest.fail(f"blocked on a FIFO for {timeout_s}s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def test_a_link_to_an_ancestor_or_a_second_link_to_a_folder_adds_no_file(tmp_path):
    root = tmp_path / "images"
    image(root / "a/1.png")
    image(root / "b/2.png")
    image(root / "b/deep/3.png")
    os.symlink("..", root / "a/up")  # a loop: the input folder again, 40 levels deep before
    os.symlink("../..", root / "b/deep/top")
    os.symlink(root / "b", root / "c")  # two more ways into b
    os.symlink("b", root / "d")
    result = scan(root, tmp_path / "run")
    assert input_rows(tmp_path / "run") == [("a/1.png", 0), ("b/2.png", 1), ("b/deep/3.png", 1)]
    assert listed(tmp_path / "run", "filenames/unused_filenames.txt") == [
        ["a/up", "folder scanned already, as the input folder"],
        ["b/deep/top", "folder scanned already, as the input folder"],
        ["c", "folder scanned already, as b"],
        ["d", "folder scanned already, as b"]]
    assert (result.n_images, result.n_unused, result.n_classes) == (3, 4, 2)


def test_a_linked_folder_outside_the_input_and_a_linked_file_are_used(tmp_path):
    outside = tmp_path / "elsewhere"
    image(outside / "9.png")
    root = tmp_path / "images"
    image(root / "a/1.png")
    os.symlink(".", outside / "self")
    os.symlink(root / "a", outside / "to-a")  # from outside back in: a is not entered twice
    os.symlink(outside, root / "e")
    os.symlink("1.png", root / "a/alias.png")
    scan(root, tmp_path / "run")
    assert input_rows(tmp_path / "run") == [("a/1.png", 0), ("e/9.png", 1)]
    assert listed(tmp_path / "run", "filenames/duplicate_filenames.txt") == [["a/alias.png", "a/1.png"]]
    assert listed(tmp_path / "run", "filenames/unused_filenames.txt") == [
        ["e/self", "folder scanned already, as e"], ["e/to-a", "folder scanned already, as a"]]


def test_special_files_are_listed_as_skipped_and_never_opened(tmp_path, monkeypatch):
    root = tmp_path / "images"
    image(root / "a/1.png")
    image(root / "a/2.png")
    os.mkfifo(root / "a/x.png")
    os.mkfifo(root / "clip.mp4")
    os.symlink("x.png", root / "a/link-to-fifo.png")
    os.symlink("nowhere.png", root / "a/dangling.png")
    os.symlink("/dev/null", root / "a/null.png")
    os.symlink("self.png", root / "a/self.png")
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(root / "a/sock.png"))
        opened, real_open = [], os.open

        def spying_open(path, *args, **kwargs):
            opened.append(os.fspath(path))
            return real_open(path, *args, **kwargs)

        monkeypatch.setattr(os, "open", spying_open)
        result = finishes(lambda: scan(root, tmp_path / "run"), [root / "a/x.png", root / "clip.mp4"])
    assert input_rows(tmp_path / "run") == [("a/1.png", 0), ("a/2.png", 0)]
    assert listed(tmp_path / "run", "filenames/unused_filenames.txt") == [
        ["a/dangling.png", "a link to nothing (dangling symlink)"],
        ["a/link-to-fifo.png", "not a regular file: a FIFO (named pipe)"],
        ["a/null.png", "not a regular file: a character device"],
        ["a/self.png", "a symlink loop"],
        ["a/sock.png", "not a regular file: a socket"],
        ["a/x.png", "not a regular file: a FIFO (named pipe)"],
        ["clip.mp4", "not a regular file: a FIFO (named pipe)"]]
    assert listed(tmp_path / "run", "filenames/corrupt_filenames.txt") == []
    assert result.n_unused == 7 and result.n_corrupt == 0
    assert sorted(p for p in opened if p.startswith(str(root))) == [f"{root}/a/1.png", f"{root}/a/2.png"]


def test_a_fifo_put_in_place_of_a_listed_image_is_refused_not_waited_on(tmp_path):
    """Between listing and reading, an image can become a FIFO: the read refuses it at once."""
    fifo = tmp_path / "x.png"
    os.mkfifo(fifo)
    source = sources.source_for(tmp_path)
    reason, _ = finishes(lambda: inspect_file(lambda: source.read_bytes("x.png"), True, True), [fifo])
    assert reason == "unreadable: not a regular file: a FIFO (named pipe)"
    with pytest.raises(OSError, match="not a regular file: a FIFO"):
        finishes(lambda: open_image(tmp_path, "x.png"), [fifo])


def test_names_the_rule_refuses_are_listed_escaped_and_odd_names_are_used_unchanged(tmp_path):
    root = tmp_path / "images"
    for name in ODD_BUT_USED:
        image(root / "a" / name)
    image(root / "b/ok.png")
    (root / "b" / 'tr,un"cated.png').write_bytes(b"\x89PNG\r\n")  # corrupt, on one line of its list
    refused = {"a/new\nline.png", "a/tab\t.png", "a/cr\r.png", "a/esc\x1b.png", "a/nel\x85.png", "a/ls\u2028.png",
               "a/back\\slash\n.png"}
    for name in refused:
        image(root / name)
    # a crafted name that once added a row to corrupt_filenames.txt
    (root / "a/x.png\tforged reason\nforged.png").write_bytes(b"not an image")
    image(bytes_path(root / "a", b"latin1-caf\xe9.png"))
    image(bytes_path(root, b"bad\xffdir") / "1.png")
    image(root / "new\ndir/2.png")

    result = scan(root, tmp_path / "run")
    rows = input_rows(tmp_path / "run")
    assert rows == sorted([(f"a/{name}", 0) for name in ODD_BUT_USED] + [("b/ok.png", 1)])
    assert listed(tmp_path / "run", "filenames/unused_filenames.txt") == [
        ["a/back\\\\slash\\n.png", "name holds a newline (\\n)"],
        ["a/cr\\r.png", "name holds a carriage return (\\r)"],
        ["a/esc\\x1b.png", "name holds a control character (\\x1b)"],
        ["a/latin1-caf\\xe9.png", "name is not valid UTF-8"],
        ["a/ls\\u2028.png", "name holds a line separator (\\u2028)"],
        ["a/nel\\u0085.png", "name holds a control character (\\u0085)"],
        ["a/new\\nline.png", "name holds a newline (\\n)"],
        ["a/tab\\t.png", "name holds a tab (\\t)"],
        ["a/x.png\\tforged reason\\nforged.png", "name holds a tab (\\t)"],
        ["bad\\xffdir", "folder name is not valid UTF-8: not entered"],
        ["new\\ndir", "folder name holds a newline (\\n): not entered"]]
    assert listed(tmp_path / "run", "filenames/corrupt_filenames.txt") == [
        ['b/tr,un"cated.png', "not an image: the content matches no image format"]]
    assert (result.n_images, result.n_unused, result.n_corrupt) == (len(ODD_BUT_USED) + 1, 11, 1)


def test_a_bucket_key_that_is_not_a_plain_relative_path_is_refused():
    """A bucket key may hold `..` or an empty part; as a path it would leave the input (or the
    dump_dataset folder), or name another file."""
    for key in ["a/../x.png", "../x.png", "a/./x.png", "a//x.png", "/x.png", "a/x.png/"]:
        assert name_problem(key) == "name is not a plain relative path (an empty, '.' or '..' part)", key
    assert name_problem("a/..x.png") is None and name_problem("a/x..png") is None


def test_escaped_names_are_one_line_and_tell_every_name_apart():
    names = ["a\nb.png", "a\\nb.png", "a\\\nb.png", "caf\udce9.png", "café.png", "caf\\xe9.png", "x\udc85.png",
             "x\u0085.png", "x\\u0085.png", "plain.png"]
    escaped = [escape_name(name) for name in names]
    assert escaped[-1] == "plain.png"
    assert len(set(escaped)) == len(names)
    assert not any("\n" in e or "\t" in e or "\r" in e for e in escaped)
    assert [e.encode("utf-8").decode("utf-8") for e in escaped] == escaped, "no undecodable byte is left"


def test_an_unreadable_folder_is_listed_with_its_reason(tmp_path, monkeypatch):
    """The tests run as root, for whom chmod locks nothing: os.scandir refuses here as the kernel
    would refuse another user."""
    root = tmp_path / "images"
    image(root / "a/1.png")
    image(root / "b/locked/2.png")
    image(root / "c/3.png")
    real_scandir = os.scandir

    def scandir(path="."):
        if os.fspath(path) in (str(root / "b/locked"), str(root / "c")):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    result = scan(root, tmp_path / "run")
    assert input_rows(tmp_path / "run") == [("a/1.png", 0)]
    assert listed(tmp_path / "run", "filenames/unused_filenames.txt") == [
        ["b/locked", "folder not readable: Permission denied"], ["c", "folder not readable: Permission denied"]]
    assert result.n_unused == 2


def animated_gif(path: Path) -> List[Tuple[int, int, int]]:
    """Three frames, palette colours, one transparent: the colours of the frames."""
    colours = [(250, 10, 10), (10, 250, 10), (10, 10, 250)]
    frames = [Image.new("RGB", (20, 10), colour).quantize(4) for colour in colours]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0, transparency=3,
                   disposal=2)
    return colours


def test_the_first_frame_of_an_animated_gif_and_a_multi_page_tiff_is_used(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    colours = animated_gif(root / "anim.gif")
    pages = [Image.new("RGB", (12, 8), colour) for colour in ((5, 6, 7), (200, 200, 200))]
    pages[0].save(root / "pages.tif", save_all=True, append_images=pages[1:])
    with Image.open(root / "anim.gif") as gif, Image.open(root / "pages.tif") as tif:
        assert (gif.n_frames, tif.n_frames) == (3, 2), "really multi-frame"
    image(root / "still.png")
    result = scan(root, tmp_path / "run")
    assert input_rows(tmp_path / "run") == [("anim.gif", 0), ("pages.tif", 0), ("still.png", 0)]
    assert result.n_corrupt == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no Pillow warning about palette transparency
        first = open_image(root, "anim.gif")
    assert first.mode == "RGB" and first.getpixel((3, 3)) == colours[0]
    assert open_image(root, "pages.tif").getpixel((3, 3)) == (5, 6, 7)
    dataset = ImageFiles(root, ["anim.gif", "pages.tif"], [0, 0], image_transform(16))
    assert all(item[0].shape == (3, 16, 16) and item[3] is None for item in dataset)


def test_relevant_entries_are_normalised_before_they_are_checked_and_labelled(tmp_path):
    root = tmp_path / "images"
    for name in ["a/x.png", "a/z.png", "b/y.png", "#top.png", "b/#hash.png"]:
        image(root / name)
    listing = tmp_path / "relevant.txt"
    listing.write_text("\ufeffb/../a/x.png\r\na//z.png\n./b/y.png\na/x.png\n./a/./x.png\n# a comment\n"
                       "#top.png\n./#top.png\nb/#hash.png\n  \n", encoding="utf-8")
    result = scan(root, tmp_path / "run", f"data.relevant_filenames_file={listing}")
    assert input_rows(tmp_path / "run") == [("#top.png", -1), ("a/x.png", 0), ("a/z.png", 0), ("b/#hash.png", 1),
                                            ("b/y.png", 1)]
    assert (result.n_missing, result.n_unused) == (0, 0)


def test_relevant_entries_that_cannot_be_used_are_listed_with_why(tmp_path):
    root = tmp_path / "images"
    image(root / "a/x.png")
    os.mkfifo(root / "a/fifo.png")
    (root / "a/folder.png").mkdir()
    listing = tmp_path / "relevant.txt"
    listing.write_bytes(b"a/x.png\nb/../../escape.png\n/etc/passwd.png\n//a/x.png\na/x.png/..\na/gone.png\n"
                        b"a/fifo.png\na/folder.png\na/in\ttab.png\nb/../a/in\ttab.png\na/caf\xe9.png\na/back\\slash.png\n")
    result = finishes(lambda: scan(root, tmp_path / "run", f"data.relevant_filenames_file={listing}"),
                      [root / "a/fifo.png"])
    assert input_rows(tmp_path / "run") == [("a/x.png", 0)]
    assert listed(tmp_path / "run", "filenames/missing_filenames.txt") == [
        ["b/../../escape.png", "outside the input folder"], ["/etc/passwd.png", "outside the input folder"],
        ["//a/x.png", "outside the input folder"], ["a/x.png/..", "not an image or video file name"],
        ["a/gone.png", "no such file"], ["a/back\\\\slash.png", "no such file"]]
    assert listed(tmp_path / "run", "filenames/unused_filenames.txt") == [
        ["a/caf\\xe9.png", "name is not valid UTF-8"], ["a/fifo.png", "not a regular file: a FIFO (named pipe)"],
        ["a/folder.png", "not a regular file: a folder"], ["a/in\\ttab.png", "name holds a tab (\\t)"]]
    assert (result.n_missing, result.n_unused) == (6, 4)


def test_every_list_and_csv_gives_back_every_name_the_rule_uses(tmp_path):
    from lightly.utils.io import load_embeddings

    from app.sampling.embeddings_io import read_embeddings_csv, write_embeddings_csv
    from app.train.data import split

    names = [f"c/{name}" for name in ODD_BUT_USED]
    atomic.write_lines(tmp_path / "names.txt", names)
    assert atomic.read_lines(tmp_path / "names.txt") == names
    (tmp_path / "crlf.txt").write_bytes("\r\n".join(names).encode("utf-8") + b"\r\n")
    assert atomic.read_lines(tmp_path / "crlf.txt") == names
    atomic.write_csv(tmp_path / INPUT_FILES, ["filenames", "labels"], [(name, 0) for name in names])
    assert read_input_files(tmp_path) == (names, [0] * len(names))
    vectors = np.arange(len(names) * 3, dtype=np.float32).reshape(len(names), 3)
    write_embeddings_csv(tmp_path / "embeddings.csv", names, vectors, list(range(len(names))))
    files, read_back, labels = read_embeddings_csv(tmp_path / "embeddings.csv", strict=True)
    assert files == names and np.array_equal(read_back, vectors) and labels.tolist() == list(range(len(names)))
    lightly_vectors, lightly_labels, lightly_files = load_embeddings(str(tmp_path / "embeddings.csv"))
    assert lightly_files == names and np.array_equal(lightly_vectors, vectors)
    (tmp_path / "val.txt").write_text(f"./{names[0]}\n{names[1]}\n", encoding="utf-8")
    assert split(names, 0.0, str(tmp_path / "val.txt"), 0)[1] == [0, 1]


@pytest.mark.slow
def test_embed_and_select_give_back_odd_names_in_every_artifact(tmp_path):
    """The whole chain in one process: scan, embed, select, and what training reads."""
    from lightly.utils.io import load_embeddings

    from app.sampling.embed import embed_stage
    from app.sampling.select import select_stage
    from app.train.data import selected_files

    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    for index, name in enumerate(ODD_BUT_USED):
        folder = root / ("a" if index % 2 else "b,c")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, size=(12, 16, 3), dtype=np.uint8)).save(folder / name, format="PNG")
    cfg = compose(f"data.input_dir={root}", "data.image_size=32", f"work_dir={tmp_path / 'runs'}",
                  "sampler.stopping_condition.n_samples=0.5")
    run_dir = tmp_path / "run"
    scan_stage(cfg, run_dir)
    names, _ = read_input_files(run_dir)
    assert sorted(names) == sorted(f"{'a' if i % 2 else 'b,c'}/{n}" for i, n in enumerate(ODD_BUT_USED))
    embed_stage(cfg, run_dir, torch.device("cpu"))
    select_stage(cfg, run_dir, torch.device("cpu"))
    _, _, embedded = load_embeddings(str(run_dir / "data/embeddings.csv"))
    assert embedded == names
    sampled = atomic.read_lines(run_dir / "filenames/sampled_filenames.txt")
    removed = atomic.read_lines(run_dir / "filenames/removed_filenames.txt")
    assert len(sampled) == len(names) // 2 and sorted(sampled + removed) == sorted(names)
    with open(run_dir / "data/selection.csv", newline="", encoding="utf-8") as handle:
        assert sorted(row["filenames"] for row in csv.DictReader(handle)) == sorted(sampled)
    _, _, selected = load_embeddings(str(run_dir / "data/selected_embeddings.csv"))
    assert selected == sampled
    assert selected_files(run_dir)[1] == sampled
