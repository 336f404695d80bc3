"""Video files as input: frames named as lightly names them, checked per frame, streamed, selected
in sequences of one video, and shown on the report's timeline."""
from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from app.data import video as video_module
from app.data.images import open_image
from app.data.scan import scan_stage
from app.data.video import (close_videos, frame_corruption_score, frame_name, parse_frame_name, read_frame,
                            scan_video)
from app.sampling.sequences import frame_sequences
from conftest import only_run_dir, thresher

SIZE = (48, 64)  # height, width


def moving_shapes(index: int, grey_bottom: bool = False) -> np.ndarray:
    """A frame of a red square and a green bar moving across a dark background."""
    h, w = SIZE
    image = np.full((h, w, 3), 40, np.uint8)
    x = (index * 3) % (w - 12)
    image[8:20, x:x + 12] = (220, 60, 60)
    image[28:38, w - 12 - x:w - 2 - x] = (60, 200, 80)
    if grey_bottom:
        image[h // 2:] = 128  # what a decoder paints where a frame's data ran out
    return image


def make_video(path: Path, n_frames: int = 20, codec: str = "libx264", fps: int = 10, grey_frames=(),
               options=None, start: int = 0) -> Path:
    """A short video of moving shapes, written with PyAV."""
    path.parent.mkdir(parents=True, exist_ok=True)
    container_options = {"movflags": "faststart"} if path.suffix in (".mp4", ".mov") else {}
    with av.open(str(path), "w", options=container_options) as out:
        stream = out.add_stream(codec, rate=fps, options=options or {})
        stream.height, stream.width = SIZE
        stream.pix_fmt = "yuv444p" if codec == "ffv1" else "yuv420p"
        for index in range(n_frames):
            pixels = moving_shapes(start + index, index in grey_frames)
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def cut_short(path: Path, keep: float) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
    return path


def decode_all(path: Path):
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def compose(*overrides: str):
    from app.cli import compose_quietly
    from app.config import register_configs, register_resolvers

    register_configs()
    register_resolvers()
    return compose_quietly(["data=folder", "hardware=cpu", *overrides])


def lines(path: Path):
    return [line for line in path.read_text().splitlines() if line]


def input_files(run_dir: Path):
    return [line.split(",")[0] for line in lines(run_dir / "data/input_files.csv")[1:]]


@pytest.fixture(autouse=True)
def _close_open_videos():
    yield
    close_videos()


def test_frames_are_named_as_lightly_names_them():
    assert frame_name("cam1/drive.mp4", 42, 300) == "cam1/drive-042-mp4.png"
    assert frame_name("clip.webm", 7, 9) == "clip-7-webm.png"
    assert parse_frame_name("cam1/drive-042-mp4.png") == ("cam1/drive.mp4", 42)
    assert parse_frame_name("my-video.v2-0003-MKV.png") == ("my-video.v2.MKV", 3)
    assert parse_frame_name("cam1/photo-042.png") is None


def test_scan_expands_every_video_format_into_its_frames(tmp_path):
    root = tmp_path / "input"
    for start, (codec, name) in enumerate((("libx264", "a/clip.mp4"), ("mpeg4", "a/clip.avi"),
                                           ("libx264", "b/clip.mov"), ("ffv1", "b/clip.mkv"),
                                           ("libvpx-vp9", "b/clip.webm"))):
        make_video(root / name, n_frames=12, codec=codec, start=start)  # frames alike across videos are duplicates
    Image.fromarray(moving_shapes(3)).save(root / "a" / "still.png")
    run_dir = tmp_path / "run"
    result = scan_stage(compose(f"data.input_dir={root}"), run_dir)
    names = input_files(run_dir)
    assert result.n_videos == 5 and result.n_video_frames == 60 and result.n_corrupt == 0
    assert "a/clip-00-mp4.png" in names and "b/clip-11-webm.png" in names and "a/still.png" in names
    assert len(names) == 61
    videos = json.loads((run_dir / "data/videos.json").read_text())
    assert videos["a/clip.mp4"]["n_frames"] == 12 and videos["a/clip.mp4"]["fps"] == 10
    labels = dict(line.split(",") for line in lines(run_dir / "data/input_files.csv")[1:])
    assert labels["a/clip-03-avi.png"] == "0" and labels["b/clip-03-mkv.png"] == "1", "the folder is the class"


def test_open_image_decodes_the_named_frame_in_any_order(tmp_path):
    path = make_video(tmp_path / "clip.mp4", n_frames=40, options={"g": "8"})
    frames = decode_all(path)
    order = list(range(40)) + [31, 2, 17, 39, 0, 8, 7, 25]
    for number in order:
        assert np.array_equal(np.asarray(open_image(tmp_path, f"clip-{number:02d}-mp4.png")), frames[number])


def test_frames_read_in_order_are_decoded_once_without_seeking(tmp_path, monkeypatch):
    path = make_video(tmp_path / "clip.mp4", n_frames=30)
    seeks = []
    original = video_module.VideoReader._rewind
    monkeypatch.setattr(video_module.VideoReader, "_rewind", lambda self, n: (seeks.append(n), original(self, n)))
    for number in range(30):
        read_frame(str(path), lambda: str(path), number)
    assert seeks == [0], "one open, then decoding on"


def test_a_video_cut_short_keeps_its_good_frames_and_reports_the_rest(tmp_path):
    root = tmp_path / "input"
    make_video(root / "whole.mp4", n_frames=40)
    uncut = make_video(tmp_path / "uncut.mp4", n_frames=40, start=1)
    (root / "cut.mp4").write_bytes(uncut.read_bytes())
    cut_short(root / "cut.mp4", keep=0.7)
    run_dir = tmp_path / "run"
    result = scan_stage(compose(f"data.input_dir={root}"), run_dir)
    corrupt = dict(line.split("\t") for line in lines(run_dir / "filenames/corrupt_filenames.txt"))
    names = input_files(run_dir)
    good_cut = [n for n in names if n.startswith("cut-")]
    assert 0 < len(good_cut) < 40 and len([n for n in names if n.startswith("whole-")]) == 40
    assert len(good_cut) + len(corrupt) == 40, "every frame the container promised is kept or reported"
    assert all(n.startswith("cut-") for n in corrupt)
    assert any("stops decoding after frame" in why for why in corrupt.values())
    assert result.n_corrupt == len(corrupt)
    kept = int(good_cut[-1][4:6])
    assert np.array_equal(np.asarray(open_image(root, good_cut[-1])), decode_all(uncut)[kept])


def test_frames_scoring_above_the_corruption_threshold_are_reported(tmp_path):
    root = tmp_path / "input"
    make_video(root / "grey.mkv", n_frames=10, codec="ffv1", grey_frames={3, 4})
    strict = scan_stage(compose(f"data.input_dir={root}"), tmp_path / "strict")
    reported = lines(tmp_path / "strict/filenames/corrupt_filenames.txt")
    assert [line.split("\t")[0] for line in reported] == ["grey-03-mkv.png", "grey-04-mkv.png"]
    assert "score 0.50 > corruptness_check.corruption_threshold=0.1" in reported[0]
    assert strict.n_images == 8
    lenient = scan_stage(compose(f"data.input_dir={root}", "corruptness_check.corruption_threshold=0.6"),
                         tmp_path / "lenient")
    assert lenient.n_corrupt == 0 and lenient.n_images == 10


def test_corruption_score_spares_black_borders_and_static_grey_backgrounds():
    frame = moving_shapes(0)
    assert frame_corruption_score(frame) == 0.0
    assert frame_corruption_score(moving_shapes(0, grey_bottom=True)) == 0.5
    assert frame_corruption_score(frame, flagged=True) == 1.0
    letterboxed = frame.copy()
    letterboxed[-12:] = 0
    assert frame_corruption_score(letterboxed) == 0.0
    grey_floor = moving_shapes(1)
    grey_floor[-6:] = 128
    previous = moving_shapes(0)
    previous[-6:] = 128
    assert frame_corruption_score(grey_floor, previous=previous) == 0.0, "the same grey as the clean frame before"


def test_frame_count_metadata_is_trusted_without_decoding(tmp_path, monkeypatch):
    path = cut_short(make_video(tmp_path / "cut.mp4", n_frames=40), keep=0.7)
    monkeypatch.setattr(av.VideoFrame, "to_ndarray", lambda *a, **k: pytest.fail("a frame was decoded"))
    found = scan_video(lambda: str(path), "cut.mp4", decode=False, digest=False, corruption_threshold=0.1,
                       use_frame_count_metadata=True)
    assert found.n_frames == 40 and found.frames[-1][0] == "cut-39-mp4.png", "the container's count, as told"


def test_an_unreadable_video_is_reported_and_the_scan_goes_on(tmp_path):
    root = tmp_path / "input"
    make_video(root / "good.webm", n_frames=5, codec="libvpx-vp9")
    (root / "broken.mp4").write_bytes(b"not a video at all" * 10)
    result = scan_stage(compose(f"data.input_dir={root}"), tmp_path / "run")
    corrupt = lines(tmp_path / "run/filenames/corrupt_filenames.txt")
    assert len(corrupt) == 1 and corrupt[0].startswith("broken.mp4\tnot a readable video")
    assert result.n_images == 5


def test_sequences_are_consecutive_frames_of_one_video():
    files = [frame_name("b.mp4", i, 10) for i in range(6)] + [frame_name("a.mp4", i, 10) for i in (0, 1, 2, 5, 6)]
    sequences = [[files[i] for i in run] for run in frame_sequences(files, 2)]
    assert sequences == [["a-00-mp4.png", "a-01-mp4.png"], ["a-02-mp4.png"], ["a-05-mp4.png", "a-06-mp4.png"],
                         ["b-00-mp4.png", "b-01-mp4.png"], ["b-02-mp4.png", "b-03-mp4.png"],
                         ["b-04-mp4.png", "b-05-mp4.png"]]


@pytest.mark.slow
def test_selection_from_videos_on_the_command_line(env, tmp_path):
    root = tmp_path / "input"
    make_video(root / "cam1" / "drive.mp4", n_frames=24)
    make_video(root / "cam2" / "walk.webm", n_frames=18, codec="libvpx-vp9")
    result = thresher(["data=folder", f"data.input_dir={root}", "stages=[scan,embed,select]", "hardware=cpu",
                       "data.image_size=32", "sampler=random", "sampler.stopping_condition.n_samples=9",
                       "sampler.selected_sequence_length=3"], env, tmp_path)
    assert result.returncode == 0, result.stderr
    run_dir = only_run_dir(tmp_path / "runs")
    sampled = lines(run_dir / "filenames/sampled_filenames.txt")
    assert len(sampled) == 9
    runs = {}
    for name in sampled:
        video, number = parse_frame_name(name)
        runs.setdefault((video, number // 3), []).append(number)
    assert all(len(numbers) == 3 for numbers in runs.values()), runs
    report = json.loads((run_dir / "report.json").read_text())
    assert sorted(report["videos"]) == ["cam1/drive.mp4", "cam2/walk.webm"]
    assert sum(len(v["selected_frames"]) for v in report["videos"].values()) == 9
    assert "plots/video_sampling_timeline.png" in report["plots"]
    assert (run_dir / "plots/video_sampling_timeline.png").stat().st_size > 1000
    assert "video_sampling_timeline.png" in (run_dir / "report.html").read_text()

    from app.report import write_report

    (run_dir / "plots/video_sampling_timeline.png").unlink()
    again = write_report(run_dir, show_video_sampling_timeline=False)
    assert "plots/video_sampling_timeline.png" not in again.artifacts
    assert not (run_dir / "plots/video_sampling_timeline.png").exists()


def test_loader_workers_read_frames_after_the_parent_opened_the_video(tmp_path):
    from app.data.images import ImageFiles, image_transform, make_loader

    path = make_video(tmp_path / "clip.mp4", n_frames=24)
    names = [f"clip-{i:02d}-mp4.png" for i in range(24)]
    open_image(tmp_path, names[5])  # the parent holds the video open when the workers fork
    loader = make_loader(ImageFiles(tmp_path, names, [0] * 24, image_transform(32)), batch_size=4, num_workers=2)
    batches = list(loader)
    assert all(not failures for *_, failures in batches)
    indices = sorted(int(i) for _, _, batch_indices, _ in batches for i in batch_indices)
    assert indices == list(range(24))
    single = ImageFiles(tmp_path, names, [0] * 24, image_transform(32))
    first_batch = batches[0][0]
    assert all(np.allclose(first_batch[k].numpy(), single[k][0].numpy()) for k in range(4)), \
        "each worker decodes the frame it was asked for"
    assert path.is_file()
