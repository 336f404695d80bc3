"""The selection report: what the select stage kept and removed, and how diverse each set is.

Reads the run directory's artifacts (embeddings, file lists, selection) and writes `report.json`,
`report.html` and `plots/*.png`, all atomically, all offline. Distances are Euclidean between
L2-normalised embeddings, whatever the sampler used, so reports of different runs compare.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from app import artifacts
from app.artifacts import (EMBEDDING_MATRIX, EMBEDDING_ROWS, NEAREST_PNG, PAIRS_PNG, PAIRWISE_INPUT_PNG,
                           PAIRWISE_SELECTION_PNG, PCA_PNG, REPORT_HTML, REPORT_JSON, TIMELINE_PNG)
from app.report.distances import (distance_stats, max_points_for_memory, on_common_bins, pairwise_histogram,
                                  pca_2d, sampled_nearest_neighbours)
from app.report.page import read_report, write_report_files
from app.sampling.embedding_matrix import has_embeddings, normalize_in_place, read_embeddings, read_rows

log = logging.getLogger("thresher")


@dataclass
class ReportResult:
    n_candidates: int
    n_selected: int
    n_removed: int
    n_corrupt: int
    n_duplicates: int
    pairwise_subsampled: bool
    artifacts: List[str] = field(default_factory=list)


def _input_dir(run_dir: Path) -> Optional[str]:
    """The scan's input folder or bucket URL; None before a scan."""
    if not (run_dir / artifacts.DATASET).is_file():
        return None
    return artifacts.read_dataset(run_dir).location or None


def video_selections(run_dir: Path, sampled: List[str], videos: Dict[str, dict]) -> Dict[str, dict]:
    """For each input video (data/videos.json): its usable frames and the selected ones, by number."""
    from app.data.video import parse_frame_name

    found = {video: {"n_frames": info["n_frames"], "fps": info.get("fps"), "frames": [], "selected_frames": []}
             for video, info in videos.items()}
    chosen = set(sampled)
    for name in artifacts.read_removed(run_dir) + sampled:
        frame = parse_frame_name(name)
        if frame is not None and frame[0] in found:
            found[frame[0]]["frames"].append(frame[1])
            if name in chosen:
                found[frame[0]]["selected_frames"].append(frame[1])
    for info in found.values():
        info["frames"].sort()
        info["selected_frames"].sort()
    return found


def _last_pick_distance(run_dir: Path) -> Optional[float]:
    """The coreset's last pick distance: every removed image lies within it of a selected one."""
    finite = [d for _, d in artifacts.read_selection(run_dir) or [] if d is not None and math.isfinite(d)]
    return round(finite[-1], 6) if finite else None


def write_report(run_dir: Path, n_example_images: int = 6, memory_requirement_in_GB: float = 2.0,
                 seed: int = 0, pool_embeddings: Optional[np.ndarray] = None,
                 show_video_sampling_timeline: bool = True, points: Optional[np.ndarray] = None,
                 files: Optional[List[str]] = None) -> ReportResult:
    """Write report.json, report.html and plots/ for the selection in `run_dir`.

    `pool_embeddings`: the datapool's embeddings (images selected in earlier runs), for its own
    nearest-neighbour statistics and the selection's distance to it. `memory_requirement_in_GB`
    bounds the pairwise-distance histograms, which use a seeded subsample beyond it.
    `show_video_sampling_timeline`: with video input, plot which frames of each video were selected.
    `points`: the run's embeddings, L2-normalised, rows in the order of data/embedding_rows.csv, from
    a caller that holds them already (the select stage), so the report makes no second N×d copy;
    None reads and normalises them here. `files`: with `points`, their rows' names (read from
    data/embedding_rows.csv when None).
    """
    run_dir = Path(run_dir)
    sampled, removed = artifacts.read_sampled(run_dir) or [], artifacts.read_removed(run_dir)
    corrupt, duplicates = artifacts.read_corrupt_files(run_dir), artifacts.read_duplicate_files(run_dir)
    streams = np.random.SeedSequence(seed).spawn(5)
    random_rng, input_rng, selection_rng, scatter_rng, nearest_rng = (np.random.default_rng(s) for s in streams)

    # "plots" is always there (empty without embeddings), so readers of report.json need no guard.
    report: Dict = {"counts": {}, "distance": "euclidean between L2-normalised embeddings", "seed": seed,
                    "plots": []}
    notes: List[str] = []
    captions: Dict[str, str] = {}
    subsampled = False
    n_candidates = len(sampled) + len(removed)

    embedding_model = artifacts.read_embedding_model(run_dir)
    if embedding_model is not None:
        report["embedding_model"] = asdict(embedding_model)
        if embedding_model.randomly_initialised:
            notes.append(f"The embedding backbone ({embedding_model.model}) was RANDOMLY "
                         f"INITIALISED: no model.weights, no checkpoint, no enable_training. The distances "
                         f"below describe random features; give weights for a meaningful selection.")
    if not has_embeddings(run_dir):
        notes.append(f"No {EMBEDDING_MATRIX} in this run: distances and plots need the embed stage.")
    else:
        if points is None:
            embeddings = read_embeddings(run_dir)
            files, points = embeddings.files, normalize_in_place(embeddings.vectors)
            del embeddings
        else:
            if files is None:  # the caller passed the matrix without its rows' names
                files, _ = read_rows(run_dir)
            if points.ndim != 2 or len(points) != len(files):
                raise ValueError(f"points has shape {points.shape}, but {EMBEDDING_ROWS} lists {len(files)} rows")
        n_candidates = len(files)
        wanted = set(sampled)
        selected = np.fromiter((name in wanted for name in files), dtype=bool, count=n_candidates)
        chosen, left_out = np.flatnonzero(selected), np.flatnonzero(~selected)
        if len(chosen) < len(wanted):
            embedded = {files[i] for i in chosen}
            unknown = [name for name in sampled if name not in embedded]
            log.warning("report: %d selected files have no embedding (e.g. %s); left out of the distances",
                        len(unknown), unknown[0])
        report["embedding_dim"] = int(points.shape[1])

        # Nearest neighbours, each within its own set: exact for every query, or for a seeded
        # subsample of queries (each against its whole set) when queries × set would be too many.
        subset = np.sort(random_rng.permutation(n_candidates)[:len(chosen)])
        searches = {"input": sampled_nearest_neighbours(points, nearest_rng, within_set=True,
                                                        progress="report: nearest neighbours"),
                    "selection": sampled_nearest_neighbours(points, nearest_rng, point_rows=chosen, within_set=True),
                    "random": sampled_nearest_neighbours(points, nearest_rng, point_rows=subset, within_set=True)}
        if pool_embeddings is not None:
            pool = np.array(pool_embeddings, dtype=np.float32)
            if pool.ndim != 2 or pool.shape[1] != points.shape[1]:
                raise ValueError(f"pool_embeddings has shape {pool.shape}, but the run's embeddings have "
                                 f"dimension {points.shape[1]}: expected shape (n, {points.shape[1]})")
            normalize_in_place(pool)
            searches["datapool"] = sampled_nearest_neighbours(pool, nearest_rng, within_set=True)
            searches["selection_to_datapool"] = sampled_nearest_neighbours(points, nearest_rng, query_rows=chosen,
                                                                           candidates=pool)
        to_selection = sampled_nearest_neighbours(points, nearest_rng, query_rows=left_out, point_rows=chosen)
        searches["removed_to_selection"] = to_selection
        nearest = {name: search.distances for name, search in searches.items() if name != "removed_to_selection"}
        stats = {}
        for name, search in searches.items():
            stats[name] = distance_stats(search.distances)
            if search.subsampled:
                stats[name]["sample"] = {"n_queries": len(search.queries), "of": search.n_queries}
                notes.append(f"Nearest-neighbour distances '{name}' are from a seeded random subsample of "
                             f"{len(search.queries):,} of {search.n_queries:,} images, each searched against the "
                             f"whole set (exact top-1), to bound the work.")
        stats["random"]["seed"] = seed
        report["nearest_neighbour_distances"] = stats
        report["last_pick_distance"] = _last_pick_distance(run_dir)

        to_kept, kept_index = to_selection.distances, to_selection.index
        removed_rows = left_out[to_selection.queries]
        order = np.argsort(to_kept, kind="stable")[:max(n_example_images, 0)]
        pairs = [{"retained": files[chosen[kept_index[i]]], "removed": files[removed_rows[i]],
                  "distance": round(float(to_kept[i]), 6)} for i in order if kept_index[i] >= 0]
        report["example_pairs"] = pairs

        # Pairwise distances: a seeded subsample whose full matrix would fit in the budget.
        merged = on_common_bins([pairwise_histogram(points, memory_requirement_in_GB, input_rng),
                                 pairwise_histogram(points[chosen], memory_requirement_in_GB, selection_rng)])
        histograms = dict(zip(("input", "selection"), merged))
        report["pairwise_distances"] = {name: h.to_json() for name, h in histograms.items()}
        report["pairwise_distances"]["memory_requirement_in_GB"] = memory_requirement_in_GB
        subsampled = any(h.subsampled for h in histograms.values())
        for name, h in histograms.items():
            if h.subsampled:
                notes.append(f"Pairwise distances of the {name} were computed on a random subsample of "
                             f"{h.n_used:,} of {h.n_points:,} images, the most whose pairwise matrix fits in "
                             f"memory_requirement_in_GB={memory_requirement_in_GB:g} "
                             f"({max_points_for_memory(memory_requirement_in_GB):,} images).")

        from app.report import plots

        plots.plot_pairwise_histogram(histograms["input"], "All candidates", plots.COLOURS["input"],
                                      run_dir / PAIRWISE_INPUT_PNG)
        plots.plot_pairwise_histogram(histograms["selection"], "Selection", plots.COLOURS["selection"],
                                      run_dir / PAIRWISE_SELECTION_PNG)
        plots.plot_nearest_neighbour_histograms(nearest, run_dir / NEAREST_PNG)
        plots.plot_pca(pca_2d(points), selected, scatter_rng, run_dir / PCA_PNG)
        sampled_sets = [name for name, search in searches.items() if search.subsampled and name in nearest]
        captions = {
            PAIRWISE_INPUT_PNG: "Pairwise distances between all candidates (before selection), log scale.",
            PAIRWISE_SELECTION_PNG: "Pairwise distances within the selection (after), log scale: a "
                                    "diverse selection has few small distances.",
            NEAREST_PNG: "Distance from each image to its nearest neighbour in the same set; the "
                         "random subset has the selection's size." + (
                             f" For {', '.join(sampled_sets)}: a seeded random subsample of the images (the "
                             f"n in the legend), each against its whole set." if sampled_sets else ""),
            PCA_PNG: "All candidates on their first two principal components, the selection in red.",
        }
        if n_example_images > 0:
            plots.plot_example_pairs(pairs, _input_dir(run_dir), run_dir / PAIRS_PNG)
            among = (f" (among a seeded random subsample of {len(to_selection.queries):,} of the "
                     f"{to_selection.n_queries:,} removed images)" if to_selection.subsampled else "")
            captions[PAIRS_PNG] = (f"The {min(len(pairs), plots.MAX_PAIRS_DRAWN)} removed images closest to a "
                                   f"selected image{among}, each beside that image, with their distance.")
        report["plots"] = list(captions)

    input_videos = artifacts.read_videos(run_dir)
    if input_videos is not None:
        videos = video_selections(run_dir, sampled, input_videos)
        report["videos"] = {video: {"n_frames": v["n_frames"], "fps": v["fps"], "n_usable": len(v["frames"]),
                                    "selected_frames": v["selected_frames"]} for video, v in videos.items()}
        if show_video_sampling_timeline and videos:
            from app.report import plots

            plots.plot_video_sampling_timeline(videos, run_dir / TIMELINE_PNG)
            captions[TIMELINE_PNG] = ("Which frames of each video were selected (red) among its usable "
                                      "frames (grey), along the video's time axis.")
            report["plots"].append(TIMELINE_PNG)

    report["counts"] = {"candidates": n_candidates, "selected": len(sampled), "removed": len(removed),
                        "corrupt": len(corrupt), "duplicates": len(duplicates)}
    from app.report.class_counts import class_counts

    per_class = class_counts(run_dir, sampled, removed)
    if per_class is not None:
        report["class_counts"] = per_class
        if per_class.get("held_out"):
            report["counts"]["held_out"] = per_class["held_out"]["n_images"]

    report.update(plot_captions=captions, notes=notes)
    earlier = read_report(run_dir)
    if earlier.get("profile"):  # the profile stage's section of an earlier run in this directory
        report["profile"] = earlier["profile"]
    if earlier.get("scores"):  # the score stage's section, written before the selection
        report["scores"] = earlier["scores"]
    write_report_files(run_dir, report)
    log.info("report: %s and %s with %d plots", REPORT_HTML, REPORT_JSON, len(report["plots"]))
    return ReportResult(n_candidates=n_candidates, n_selected=len(sampled), n_removed=len(removed),
                        n_corrupt=len(corrupt), n_duplicates=len(duplicates), pairwise_subsampled=subsampled,
                        artifacts=[REPORT_JSON, REPORT_HTML, *report["plots"]])
