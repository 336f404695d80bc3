"""The report's plots, as PNG files written atomically.

matplotlib is imported inside each function and drives a bare Agg canvas (no pyplot, no global
backend switch), so importing this module costs nothing and works on a machine without a display.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from app import atomic
from app.report.distances import DISTANCE_RANGE, HISTOGRAM_BINS, PairwiseHistogram

log = logging.getLogger("thresher")

COLOURS = {"input": "#7f7f7f", "selection": "#d62728", "random": "#1f77b4", "datapool": "#2ca02c",
           "selection_to_datapool": "#9467bd"}
LABELS = {"input": "all candidates", "selection": "selection", "random": "random subset (same size)",
          "datapool": "datapool", "selection_to_datapool": "selection to datapool"}
# A scatter draws at most this many removed and this many selected points (a seeded sample beyond).
MAX_SCATTER_POINTS = 20000
# The example-pairs figure draws at most this many rows; report.json and the HTML list them all.
MAX_PAIRS_DRAWN = 24
THUMBNAIL_PX = 160
DPI = 100


def _figure(width_in: float, height_in: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width_in, height_in), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save_png(figure, path: Path) -> None:
    """A file name in a script the font lacks (CJK, emoji) draws as boxes; matplotlib's warning per
    missing glyph would only put its source path into the run's log, so it is silenced."""
    with atomic.atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Glyph \d+ .* missing from (current )?font")
        figure.savefig(tmp, format="png", dpi=DPI)


def plot_pairwise_histogram(histogram: PairwiseHistogram, title: str, colour: str, path: Path) -> None:
    """Counts of pairwise distances on a log scale, with the same bins for before and after."""
    figure = _figure(7, 3.6)
    axes = figure.add_subplot()
    widths = np.diff(histogram.edges)
    axes.bar(histogram.edges[:-1], histogram.counts, width=widths, align="edge", color=colour,
             edgecolor="white", linewidth=0.4)
    if histogram.counts.any():
        axes.set_yscale("log")
    axes.set_xlim(histogram.edges[0], histogram.edges[-1])
    axes.set_xlabel("pairwise distance (L2-normalised embeddings)")
    axes.set_ylabel("pairs (log scale)")
    note = (f"{histogram.n_used:,} of {histogram.n_points:,} points, subsampled" if histogram.subsampled
            else f"all {histogram.n_points:,} points")
    axes.set_title(f"{title}: {histogram.n_pairs:,} pairs ({note})", fontsize=10)
    axes.grid(alpha=0.3)
    save_png(figure, path)


def plot_nearest_neighbour_histograms(distances: Dict[str, np.ndarray], path: Path) -> None:
    """One density histogram per set on shared bins, so sets of different sizes compare."""
    figure = _figure(7, 3.8)
    axes = figure.add_subplot()
    finite = {name: d[np.isfinite(d)] for name, d in distances.items()}
    present = [d for d in finite.values() if d.size]
    top = max([float(d.max()) for d in present] + [1e-3])
    bottom = min((float(d.min()) for d in present), default=0.0)
    low = 0.0 if bottom < 0.25 * top else bottom * 0.98  # start at 0 unless that leaves most of it empty
    edges = np.linspace(low, min(top * 1.02, DISTANCE_RANGE[1]), HISTOGRAM_BINS + 1)
    for name, values in finite.items():
        if values.size:
            axes.hist(np.clip(values, edges[0], edges[-1]), bins=edges, density=True, histtype="step",
                      linewidth=1.8, color=COLOURS.get(name), label=f"{LABELS.get(name, name)} (n={values.size})")
    axes.set_xlabel("distance to the nearest neighbour within the set (L2-normalised embeddings)")
    axes.set_ylabel("density")
    axes.set_title("Nearest-neighbour distances: larger means more diverse", fontsize=10)
    axes.grid(alpha=0.3)
    if any(v.size for v in finite.values()):
        axes.legend(fontsize=8)
    save_png(figure, path)


def plot_pca(projected: np.ndarray, selected: np.ndarray, rng: np.random.Generator, path: Path) -> None:
    """All candidates in grey, the selection on top in colour, on the first two principal axes."""
    figure = _figure(7, 6)
    axes = figure.add_subplot()
    size = 24.0 if len(projected) <= 2000 else 6.0
    # removed first, so the selection is drawn on top
    for label, mask, colour, scale in (("removed", ~selected, COLOURS["input"], 1.0),
                                       ("selected", selected, COLOURS["selection"], 1.3)):
        members = np.flatnonzero(mask)
        drawn = members if len(members) <= MAX_SCATTER_POINTS else np.sort(
            rng.choice(members, MAX_SCATTER_POINTS, replace=False))
        note = f", {len(drawn)} drawn" if len(drawn) < len(members) else ""
        axes.scatter(projected[drawn, 0], projected[drawn, 1], s=size * scale, c=colour,
                     alpha=0.9 if scale > 1 else 0.5, linewidths=0, label=f"{label} ({len(members)}{note})",
                     rasterized=True)
    axes.set_xlabel("principal component 1")
    axes.set_ylabel("principal component 2")
    axes.set_title("Embeddings projected on their first two principal components", fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="best")
    save_png(figure, path)


def _thumbnail(input_dir, name: str) -> Optional[np.ndarray]:
    """A small RGB copy of an input image, a video frame or a bucket object (app.data.images)."""
    from app.data.images import open_image

    try:
        image = open_image(input_dir, name)
        image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
        return np.asarray(image)
    except Exception as error:  # a thumbnail is never worth failing the report for
        log.warning("report: no thumbnail for %s (%s)", name, error)
        return None


def _show(axes, image: Optional[np.ndarray], title: str) -> None:
    if image is None:
        axes.text(0.5, 0.5, "image not readable", ha="center", va="center", fontsize=9, color="#a00")
    else:
        axes.imshow(image)
    axes.set_title(title, fontsize=8)
    axes.set_xticks([])
    axes.set_yticks([])


def _short(name: str, limit: int = 34) -> str:
    return name if len(name) <= limit else "…" + name[-(limit - 1):]


def plot_example_pairs(pairs: Sequence[dict], input_dir: Optional[Path], path: Path) -> None:
    """Each removed image beside the selected image nearest to it, closest pairs first."""
    pairs = list(pairs)[:MAX_PAIRS_DRAWN]
    rows = max(len(pairs), 1)
    figure = _figure(6, 2.4 * rows)
    if not pairs:
        axes = figure.add_subplot()
        axes.axis("off")
        axes.text(0.5, 0.5, "no removed images", ha="center", va="center")
        save_png(figure, path)
        return
    grid = figure.subplots(rows, 2, squeeze=False)
    from app.data.sources import source_for

    readable = input_dir is not None and source_for(input_dir).exists()
    if not readable:
        log.warning("report: the input folder %s is not there: example pairs without thumbnails", input_dir)
    thumbnails: Dict[str, Optional[np.ndarray]] = {}
    for row, pair in enumerate(pairs):
        for column, role in enumerate(("retained", "removed")):
            name = pair[role]
            if name not in thumbnails:
                thumbnails[name] = _thumbnail(input_dir, name) if readable else None
            _show(grid[row][column], thumbnails[name], f"{role}: {_short(name)}")
        grid[row][1].text(-0.06, 0.5, f"d = {pair['distance']:.4f}", transform=grid[row][1].transAxes,
                          ha="right", va="center", fontsize=9,
                          bbox={"boxstyle": "round", "fc": "white", "ec": "#888"})
    figure.suptitle("Removed images next to their nearest selected image", fontsize=10)
    save_png(figure, path)


# The timeline draws at most this many videos (those with the most frames); report.json lists all.
MAX_TIMELINE_VIDEOS = 40


def plot_video_sampling_timeline(videos: Dict[str, dict], path: Path) -> None:
    """One row per video: every usable frame as a grey tick, the selected ones in red, on a time
    axis in seconds (frame numbers when the rate is unknown)."""
    shown = sorted(videos, key=lambda v: (-videos[v]["n_frames"], v))[:MAX_TIMELINE_VIDEOS]
    shown.sort()
    figure = _figure(8, 1.0 + 0.45 * max(len(shown), 1))
    axes = figure.add_subplot()
    in_seconds = all(videos[v].get("fps") for v in shown)
    for row, video in enumerate(shown):
        info = videos[video]
        scale = 1.0 / info["fps"] if in_seconds else 1.0
        frames = np.asarray(info["frames"], dtype=float) * scale
        selected = np.asarray(info["selected_frames"], dtype=float) * scale
        axes.plot([0, max(info["n_frames"] - 1, 0) * scale], [row, row], color="#ddd", linewidth=6,
                  solid_capstyle="butt", zorder=1)
        axes.scatter(frames, np.full(len(frames), row), marker="|", s=60, c=COLOURS["input"], linewidths=0.8,
                     zorder=2, rasterized=True)
        axes.scatter(selected, np.full(len(selected), row), marker="|", s=160, c=COLOURS["selection"],
                     linewidths=1.8, zorder=3, label="selected" if row == 0 else None)
    axes.set_yticks(range(len(shown)), [f"{_short(v, 28)} ({len(videos[v]['selected_frames'])}/"
                                        f"{len(videos[v]['frames'])})" for v in shown], fontsize=8)
    axes.set_ylim(-0.7, len(shown) - 0.3)
    axes.invert_yaxis()
    axes.set_xlabel("time in the video (s)" if in_seconds else "frame number")
    more = f", {len(videos) - len(shown)} more in report.json" if len(videos) > len(shown) else ""
    axes.set_title(f"Selected frames of each video (red; grey: usable frames){more}", fontsize=10)
    axes.grid(axis="x", alpha=0.3)
    save_png(figure, path)


def _by_workers(rows: Sequence[dict]) -> Dict[int, List[dict]]:
    lines: Dict[int, List[dict]] = {}
    for row in rows:
        lines.setdefault(row["num_workers"], []).append(row)
    return {workers: sorted(line, key=lambda row: row["batch_size"]) for workers, line in sorted(lines.items())}


def _value(row: dict, key: str):
    """row["a.b"] as row["a"]["b"]: nested figures such as latency_ms.p95."""
    for part in key.split("."):
        row = row[part]
    return row


def plot_against_batch_size(rows: Sequence[dict], value: str, ylabel: str, title: str, path: Path,
                            recommended: Optional[dict] = None) -> None:
    """`value` (a dotted key) of each setting that ran against its batch size (log 2 axis), a line
    per worker count; settings out of memory are marked on the axis, the recommended one ringed."""
    figure = _figure(7, 4)
    axes = figure.add_subplot()
    colours = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]
    for i, (workers, line) in enumerate(_by_workers(rows).items()):
        colour = colours[i % len(colours)]
        ran = [row for row in line if row["status"] == "ok"]
        axes.plot([row["batch_size"] for row in ran], [_value(row, value) for row in ran], marker="o", color=colour,
                  label=f"{workers} loader worker{'s' if workers != 1 else ''}")
        oom = [row["batch_size"] for row in line if row["status"] == "oom"]
        if oom:
            axes.plot(oom, [0] * len(oom), linestyle="none", marker="x", markersize=9, color=colour,
                      clip_on=False, label=f"out of memory ({workers} workers)")
        if recommended:
            for row in ran:
                if (row["batch_size"], row["num_workers"]) == (recommended["batch_size"], recommended["num_workers"]):
                    axes.plot([row["batch_size"]], [_value(row, value)], marker="o", markersize=16, fillstyle="none",
                              color="black", linestyle="none", label="recommended")
    sizes = sorted({row["batch_size"] for row in rows})
    axes.set_xscale("log", base=2)
    axes.set_xticks(sizes, [str(size) for size in sizes])
    axes.set_ylim(bottom=0)
    axes.set_xlabel("batch size")
    axes.set_ylabel(ylabel)
    axes.set_title(title, fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    save_png(figure, path)


def plot_latency(rows: Sequence[dict], title: str, path: Path) -> None:
    """Latency percentiles (per image, batch size 1) for each worker count, as grouped bars."""
    figure = _figure(7, 4)
    axes = figure.add_subplot()
    ran = [row for row in rows if row["status"] == "ok"]
    points = ("p50", "p90", "p95", "p99")
    width = 0.8 / len(points)
    for j, point in enumerate(points):
        axes.bar([i + j * width for i in range(len(ran))], [row["latency_ms"][point] for row in ran], width=width,
                 label=point)
    axes.set_xticks([i + 0.4 - width / 2 for i in range(len(ran))],
                    [f"{row['num_workers']} workers" for row in ran])
    axes.set_ylabel("latency per image (ms)")
    axes.set_title(title, fontsize=10)
    axes.grid(alpha=0.3, axis="y")
    axes.legend(fontsize=8)
    save_png(figure, path)


def plot_training_curve(epochs: Sequence[dict], key_metric: str, best_epoch: Optional[int], path: Path) -> None:
    """Training loss (left axis) and the key metric (right axis) per epoch, the best epoch marked."""
    figure = _figure(7, 3.6)
    loss_axes = figure.add_subplot()
    x = [record["epoch"] for record in epochs]
    loss_axes.plot(x, [record["train_loss"] for record in epochs], "o-", color=COLOURS["input"], label="train_loss")
    loss_axes.set_xlabel("epoch")
    loss_axes.set_ylabel("train_loss")
    loss_axes.grid(alpha=0.3)
    lines = loss_axes.get_lines()
    values = [record.get(key_metric) for record in epochs]
    if key_metric != "train_loss" and any(v is not None for v in values):
        metric_axes = loss_axes.twinx()
        metric_axes.plot(x, [np.nan if v is None else v for v in values], "o-", color=COLOURS["selection"],
                         label=key_metric)
        metric_axes.set_ylabel(key_metric)
        if all(v is None or 0 <= v <= 1 for v in values):  # a share (top-1, mAP): its whole range
            metric_axes.set_ylim(0, 1.02)
        if best_epoch is not None and best_epoch in x:
            metric_axes.plot([best_epoch], [values[x.index(best_epoch)]], "o", markersize=12, fillstyle="none",
                             color=COLOURS["selection"], label=f"best (epoch {best_epoch})")
        lines = lines + metric_axes.get_lines()
    loss_axes.legend(lines, [line.get_label() for line in lines], loc="center right", fontsize=8)
    loss_axes.xaxis.get_major_locator().set_params(integer=True)
    loss_axes.set_title(f"Training: {key_metric} and train_loss per epoch", fontsize=10)
    save_png(figure, path)
