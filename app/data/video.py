"""Video files as frames: listed, checked and read one frame at a time with PyAV.

A frame is named as the Lightly Worker names it, `<video path without extension>-<frame number,
zero-padded to the width of the frame count>-<extension>.png` (`cam1/drive.mp4` ->
`cam1/drive-042-mp4.png`), so every selected frame maps back to its video and its frame. Frames
are numbered in decoding order from 0. Nothing holds more than one decoded frame per open video.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Tuple

import numpy as np

log = logging.getLogger("thresher")

VIDEO_EXTENSIONS = {".mp4", ".avi", ".mov", ".mkv", ".webm"}
FRAME_NAME = re.compile(r"^(?P<video>.+)-(?P<frame>\d+)-(?P<format>mp4|avi|mov|mkv|webm)\.png$", re.IGNORECASE)
# How far from mid-grey (per channel) a decoder's grey fill may come out after colour conversion.
FILL_TOLERANCE = 3
# Open videos kept per thread (and so per DataLoader worker) for reading frames in order.
OPEN_VIDEOS_PER_THREAD = 4
# Reading forward by up to this many frames is cheaper than seeking.
MAX_DECODE_AHEAD = 48


def is_video(name: str) -> bool:
    return "." in name and "." + name.rsplit(".", 1)[1].lower() in VIDEO_EXTENSIONS


def frame_name(video: str, frame_number: int, n_frames: int) -> str:
    """`cam1/drive.mp4`, 42, 300 -> `cam1/drive-042-mp4.png` (lightly's VideoDataset naming)."""
    stem, extension = video.rsplit(".", 1)
    return f"{stem}-{frame_number:0{len(str(max(n_frames, 1)))}d}-{extension}.png"


def parse_frame_name(name: str) -> Optional[Tuple[str, int]]:
    """(video file name, frame number) for a frame name, None for anything else."""
    match = FRAME_NAME.match(name)
    if match is None:
        return None
    return f"{match['video']}.{match['format']}", int(match["frame"])


def is_decoder_fill(colour: np.ndarray) -> bool:
    """Mid-grey, or the green that an all-zero YUV frame turns into: what decoders paint where a
    frame's data is missing."""
    r, g, b = (int(c) for c in colour[:3])
    grey = max(abs(r - 128), abs(g - 128), abs(b - 128)) <= FILL_TOLERANCE
    green = r <= 16 and b <= 16 and 120 <= g <= 150
    return grey or green


def frame_corruption_score(rgb: np.ndarray, flagged: bool = False, previous: Optional[np.ndarray] = None) -> float:
    """0 (clean) to 1 (unusable). A frame the decoder flags as corrupt scores 1. Otherwise: the
    share of its rows, counted from the bottom, painted in one decoder fill colour (a frame whose
    data ran out), unless the previous frame had the very same rows (a static grey background)."""
    if flagged or rgb.ndim != 3 or rgb.shape[0] == 0:
        return 1.0
    fill = rgb[-1, 0]
    if not is_decoder_fill(fill):
        return 0.0
    rows_of_fill = (rgb == fill).all(axis=(1, 2))
    not_fill = np.flatnonzero(~rows_of_fill)
    n_fill_rows = rgb.shape[0] - (int(not_fill[-1]) + 1 if len(not_fill) else 0)
    if n_fill_rows and previous is not None and previous.shape == rgb.shape \
            and np.array_equal(previous[-n_fill_rows:], rgb[-n_fill_rows:]):
        return 0.0
    return n_fill_rows / rgb.shape[0]


@dataclass
class VideoScan:
    """What scanning one video found: its frames (name, corruption reason or None, SHA-256 of the
    decoded pixels or None), and a problem with the video as a whole (it cannot be opened)."""
    video: str
    n_frames: int = 0
    fps: Optional[float] = None
    frames: List[Tuple[str, Optional[str], Optional[str]]] = field(default_factory=list)
    problem: Optional[str] = None

    def summary(self) -> dict:
        n_bad = sum(reason is not None for _, reason, _ in self.frames)
        return {"n_frames": self.n_frames, "fps": self.fps, "n_corrupt_frames": n_bad,
                "first_frame": self.frames[0][0] if self.frames else None}


def _metadata_frame_count(stream) -> int:
    """The container's frame count, or an estimate from duration and rate; 0 when unknown."""
    if stream.frames:
        return int(stream.frames)
    rate = stream.average_rate or stream.guessed_rate
    if stream.duration and stream.time_base and rate:
        return int(round(float(stream.duration * stream.time_base * rate)))
    return 0


def scan_video(open_source: Callable[[], Any], video: str, decode: bool, digest: bool,
               corruption_threshold: float, use_frame_count_metadata: bool) -> VideoScan:
    """List the frames of `video`, decoding them one at a time when they must be checked or
    hashed. A video that stops decoding halfway keeps its good frames; the frames the container
    promised beyond that point are reported with the reason."""
    import av

    result = VideoScan(video)
    try:
        source = open_source()
        container = av.open(source, "r")
    except Exception as error:  # PyAV's and the filesystem's errors alike: the file is unusable
        result.problem = f"not a readable video: {_one_line(error)}"
        return result
    try:
        if not container.streams.video:
            result.problem = "not a readable video: no video stream"
            return result
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        rate = stream.average_rate or stream.guessed_rate
        result.fps = round(float(rate), 3) if rate else None
        expected = _metadata_frame_count(stream)
        if use_frame_count_metadata and expected and not (decode or digest):
            result.n_frames = expected
            result.frames = [(frame_name(video, i, expected), None, None) for i in range(expected)]
            return result
        records: List[Tuple[Optional[str], Optional[str]]] = []
        stopped: Optional[str] = None
        previous = None
        for frame, error in _decode_past_errors(container, stream):
            if error is not None:
                stopped = stopped or error
                continue
            reason = sha = None
            if decode or digest:
                rgb = frame.to_ndarray(format="rgb24")
                if decode:
                    score = frame_corruption_score(rgb, bool(getattr(frame, "is_corrupt", False)), previous)
                    if score > corruption_threshold:
                        reason = (f"corrupt video frame: score {score:.2f} > corruptness_check."
                                  f"corruption_threshold={corruption_threshold:g}")
                    else:
                        previous = rgb  # a static grey background is compared with a clean frame
                if digest and reason is None:
                    sha = hashlib.sha256(rgb.tobytes()).hexdigest()
            records.append((reason, sha))
        n_decoded = len(records)
        promised = expected if expected > n_decoded else 0
        if stopped is None and promised and not use_frame_count_metadata and expected - n_decoded <= 1:
            promised = 0  # containers round their count; one frame short is not a cut
        n_frames = max(n_decoded, promised)
        if n_frames == 0:
            result.problem = f"no frame decodes{': ' + stopped if stopped else ''}"
            return result
        why = f"stops decoding after frame {n_decoded - 1}" if n_decoded else "no frame decodes"
        detail = f": {stopped}" if stopped else f" (the container says {expected} frames)"
        for index in range(n_decoded, promised):
            records.append((f"video {why}{detail}", None))
        if stopped and not promised:
            result.problem = f"video {why}{detail}; the {n_decoded} frames before are kept"
        result.n_frames = n_frames
        result.frames = [(frame_name(video, i, n_frames), reason, sha) for i, (reason, sha) in enumerate(records)]
        return result
    finally:
        container.close()
        close = getattr(source, "close", None)
        if close is not None:
            close()


def _decode_past_errors(container, stream):
    """(frame, None) for every frame that decodes and (None, reason) for each packet that does
    not: one damaged packet costs its frames, not the rest of the video."""
    try:
        for packet in container.demux(stream):
            try:
                frames = packet.decode()
            except Exception as error:  # av.FFmpegError
                yield None, _one_line(error)
                continue
            for frame in frames:
                yield frame, None
    except Exception as error:  # the demuxer gave up: a cut file, or a read error from a bucket
        yield None, _one_line(error)


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


# ---------------------------------------------------------------------------------------------
# Reading one frame
# ---------------------------------------------------------------------------------------------
class VideoReader:
    """One open video that hands out frames by number: in order it just decodes on, which is what
    scanning and embedding ask for; backwards or far ahead it seeks to the keyframe before.
    Seeking places frames by timestamp, which assumes a constant frame rate; when the landing
    frame is already past the one asked for, it decodes from the start instead."""

    def __init__(self, open_source: Callable[[], Any]):
        import av

        self._source = open_source()
        self.container = av.open(self._source, "r")
        self.stream = self.container.streams.video[0]
        self.stream.thread_type = "AUTO"
        rate = self.stream.average_rate or self.stream.guessed_rate
        self._frame_seconds = float(1 / rate) if rate else None
        self._start = self.stream.start_time or 0
        self._frames = None
        self._next = 0

    def _rewind(self, target: int) -> None:
        if target > 0 and self._frame_seconds and self.stream.time_base:
            seconds = target * self._frame_seconds
            timestamp = self._start + int(seconds / float(self.stream.time_base))
            self.container.seek(timestamp, backward=True, any_frame=False, stream=self.stream)
            self._frames = self.container.decode(self.stream)
            self._next = None  # found from the first frame's timestamp
        else:
            self.container.seek(self._start if self._start else 0, backward=True, stream=self.stream)
            self._frames = self.container.decode(self.stream)
            self._next = 0

    def _index_of(self, frame) -> int:
        if frame.pts is None or not self._frame_seconds:
            return 0
        return int(round(float((frame.pts - self._start) * self.stream.time_base) / self._frame_seconds))

    def frame(self, number: int):
        """The frame `number` as an RGB PIL image; IndexError past the last frame."""
        if self._frames is None or self._next is None or number < self._next or number - self._next > MAX_DECODE_AHEAD:
            self._rewind(number)
        for attempt in range(2):
            for frame in self._frames:
                if self._next is None:
                    self._next = self._index_of(frame)
                    if self._next > number:  # landed past it: variable rate, or a coarse index
                        break
                current, self._next = self._next, self._next + 1
                if current == number:
                    return frame.to_image()
            else:
                self._frames = None
                raise IndexError(f"the video has no frame {number}")
            self.container.seek(0, backward=True, stream=self.stream)
            self._frames, self._next = self.container.decode(self.stream), 0
        raise IndexError(f"frame {number} could not be reached")

    def close(self) -> None:
        self.container.close()
        close = getattr(self._source, "close", None)
        if close is not None:
            close()


_open_videos = threading.local()


_inherited: list = []


def _forget_inherited_videos() -> None:
    """A forked DataLoader worker must not read through its parent's open videos (the file offsets
    are shared between the processes), nor close them: their decoder threads did not come along,
    and closing would wait for them. They are set aside, untouched."""
    readers = getattr(_open_videos, "readers", None)
    if readers:
        _inherited.append(readers)
    _open_videos.readers = OrderedDict()


os.register_at_fork(after_in_child=_forget_inherited_videos)


def read_frame(key: str, open_source: Callable[[], Any], number: int):
    """Frame `number` of the video identified by `key`, from this thread's cache of open videos
    (a few per thread, least recently used closed first)."""
    cache: "OrderedDict[str, VideoReader]" = getattr(_open_videos, "readers", None)
    if cache is None:
        cache = _open_videos.readers = OrderedDict()
    reader = cache.pop(key, None)
    if reader is None:
        reader = VideoReader(open_source)
    cache[key] = reader
    while len(cache) > OPEN_VIDEOS_PER_THREAD:
        cache.popitem(last=False)[1].close()
    try:
        return reader.frame(number)
    except Exception:
        cache.pop(key, None)
        reader.close()
        raise


def close_videos() -> None:
    """Close this thread's open videos (tests, and the end of a stage)."""
    cache = getattr(_open_videos, "readers", None)
    while cache:
        cache.popitem()[1].close()
