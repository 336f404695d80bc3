"""Every file thresher writes in a run directory, by name; typed readers and writers for the small
ones that more than one part of thresher reads; and what each stage reads and writes there.

Stages talk only through these files, so their names live here and nowhere else (a test looks for
stray ones under app/). A low-floor module: it imports nothing of the app but app.atomic and
app.data.names, and no torch, so the runner reads the stages' declarations (STAGE_ARTIFACTS)
without importing the stages, and a stage reads what another wrote without importing it.
"""
from __future__ import annotations

import csv
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from app import atomic
from app.data.names import escape_name, one_line

# ---------------------------------------------------------------------------------------------
# The runner's files
# ---------------------------------------------------------------------------------------------
# Written when thresher creates (or adopts an empty) run directory: the proof that it is thresher's.
MARKER = ".thresher-run"
# Held while a run uses the directory (`.lock.node<N>` on node N > 0 of a multi-node run).
LOCK = ".lock"
SUMMARY = "summary.json"
# On node N > 0 of a multi-node run, that node's summary.
NODE_SUMMARY = re.compile(r"summary\.node\d+\.json")
# The run's configs, redacted (Hydra's .hydra/ files, written by thresher).
HYDRA_CONFIGS = ".hydra"
# Hydra opens <run dir>/thresher.log before thresher's code runs.
HYDRA_LOG = "thresher.log"
# The docker launcher's copy of the container's output.
CONTAINER_LOG = "container.log"

# ---------------------------------------------------------------------------------------------
# Stage artifacts
# ---------------------------------------------------------------------------------------------
# scan
INPUT_FILES = "data/input_files.csv"  # filenames,labels: the images to use
HOLDOUT_FILES = "data/holdout_files.csv"  # filenames,labels: data.holdout_fraction's, never selected from
DATASET = "data/dataset.json"  # where they are and the class names (Dataset)
VIDEOS = "data/videos.json"  # per input video: frame count, fps, ... (only with video input)
CORRUPT_FILES = "filenames/corrupt_filenames.txt"  # name<TAB>reason; the embed stage appends to it
DUPLICATE_FILES = "filenames/duplicate_filenames.txt"  # name<TAB>the earlier identical file
MISSING_FILES = "filenames/missing_filenames.txt"  # relevant_filenames_file entries not there (escaped)
UNUSED_FILES = "filenames/unused_filenames.txt"  # name<TAB>why, never opened (escaped)
# embed
EMBEDDING_MATRIX = "data/embeddings.npy"  # float32 N×d, what the stages read (app.sampling.embedding_matrix)
EMBEDDING_ROWS = "data/embedding_rows.csv"  # filenames,labels of the matrix's rows, row for row
EMBEDDINGS = "data/embeddings.csv"  # the same in lightly's format (app.sampling.embeddings_io)
EMBEDDING_MODEL = "data/embedding_model.json"  # which backbone made them (EmbeddingModel)
SSL_CHECKPOINT = "checkpoints/ssl_backbone.pt"  # enable_training=true: the trained backbone
# score
SCORES = "data/scores.csv"  # filenames,score,predicted_label: the score stage's (app.scoring.scores_io)
# select
SAMPLED = "filenames/sampled_filenames.txt"  # the selection, in input order
REMOVED = "filenames/removed_filenames.txt"  # the rest of the candidates, in input order
SELECTION = "data/selection.csv"  # filenames,pick,distance: the selection in pick order
SELECTED_EMBEDDINGS = "data/selected_embeddings.csv"  # dump_sampled_embeddings=true
NEAR_DUPLICATES = "filenames/near_duplicate_filenames.txt"  # name<TAB>kept one<TAB>distance
SAMPLED_IMAGES = "sampled"  # dump_dataset=true: the selected images, resized and re-encoded
# the report: the select and the profile stage each write their section of it
REPORT_JSON = "report.json"
REPORT_HTML = "report.html"
PAIRWISE_INPUT_PNG = "plots/pairwise_distances_input.png"
PAIRWISE_SELECTION_PNG = "plots/pairwise_distances_selection.png"
NEAREST_PNG = "plots/nearest_neighbour_distances.png"
PCA_PNG = "plots/pca_scatter.png"
PAIRS_PNG = "plots/example_pairs.png"
TIMELINE_PNG = "plots/video_sampling_timeline.png"
SELECTION_PLOTS = (PAIRWISE_INPUT_PNG, PAIRWISE_SELECTION_PNG, NEAREST_PNG, PCA_PNG, PAIRS_PNG, TIMELINE_PNG)
THROUGHPUT_PNG = "plots/profile_throughput.png"
CPU_TIME_PNG = "plots/profile_cpu_time_per_sample.png"
LATENCY_PNG = "plots/profile_latency.png"
BATCH_LATENCY_PNG = "plots/profile_latency_vs_batch_size.png"
PROFILE_PLOTS = (THROUGHPUT_PNG, CPU_TIME_PNG, LATENCY_PNG, BATCH_LATENCY_PNG)
TRAINING_CURVE_PNG = "plots/training_curve.png"  # the train stage's section of the report
SCORES_HISTOGRAM_PNG = "plots/scores_histogram.png"  # the score stage's section of the report
# profile
MEASUREMENTS = "profile/measurements.json"  # rewritten after every setting of the sweep
TRACES = "profile/traces"  # profile.trace=true: a Chrome trace per setting
# train
LAST = "checkpoints/last.pt"
BEST = "checkpoints/best.pt"
EPOCH_CHECKPOINTS = "checkpoints/epoch_*.pt"  # trainer.save_epochs: epoch_checkpoint(epoch)
METRICS_JSON = "metrics.json"
METRICS_CSV = "metrics.csv"
TENSORBOARD = "tensorboard"  # logger=tensorboard
WANDB = "wandb"  # logger=wandb
# Distributed training: each node's config for its workers and their result, removed after use.
WORKER_CONFIG = ".train_config{node}.yaml"
WORKER_RESULT = ".train_result{node}.json"


def epoch_checkpoint(epoch: int) -> str:
    """The snapshot of epoch `epoch` (trainer.save_epochs): one of EPOCH_CHECKPOINTS."""
    return EPOCH_CHECKPOINTS.replace("*", f"{epoch:03d}")


def summary_file(node_suffix: str = "") -> str:
    """summary.json, or on node N > 0 of a multi-node run (node_suffix `.nodeN`) that node's own."""
    return SUMMARY.replace(".json", f"{node_suffix}.json")


# ---------------------------------------------------------------------------------------------
# What each stage reads and writes
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StageArtifacts:
    """A stage's files in the run directory. `needs`: what it cannot run without, each written by an
    earlier stage; the runner checks them before any stage runs (there, and made with this run's
    settings). `reads`: what it reads when there (another stage's optional output, or what it
    resumes from). `writes`: what it may write, names, folders or globs. `resume_state`: what it
    would resume from, removed when it has to run again from the start."""

    needs: Tuple[str, ...] = ()
    reads: Tuple[str, ...] = ()
    writes: Tuple[str, ...] = ()
    resume_state: Tuple[str, ...] = ()


# In pipeline order (app.config.STAGES). The embed stage is skipped for a sampler that needs no
# embeddings; what it writes is then needed by no one (the select stage reads INPUT_FILES instead).
STAGE_ARTIFACTS: Dict[str, StageArtifacts] = {
    "scan": StageArtifacts(
        writes=(INPUT_FILES, DATASET, CORRUPT_FILES, DUPLICATE_FILES, MISSING_FILES, UNUSED_FILES, VIDEOS,
                HOLDOUT_FILES)),
    "embed": StageArtifacts(
        needs=(INPUT_FILES, DATASET),
        reads=(CORRUPT_FILES,),
        writes=(EMBEDDING_MATRIX, EMBEDDING_ROWS, EMBEDDINGS, EMBEDDING_MODEL, SSL_CHECKPOINT, CORRUPT_FILES)),
    "score": StageArtifacts(
        needs=(INPUT_FILES, DATASET),
        # CORRUPT_FILES: images set aside are not scored; an image that fails to load is added.
        # REPORT_JSON: the sections other stages wrote, which the scores section joins.
        reads=(CORRUPT_FILES, REPORT_JSON),
        writes=(SCORES, CORRUPT_FILES, REPORT_JSON, REPORT_HTML, SCORES_HISTOGRAM_PNG)),
    "select": StageArtifacts(
        needs=(EMBEDDING_MATRIX, EMBEDDING_ROWS),
        # INPUT_FILES: for a sampler without embeddings; DATASET: dump_dataset and the report's
        # thumbnails; REPORT_JSON: a profile section of an earlier run is kept, and the scores'
        # section; SCORES: for a sampler that selects by scores.
        reads=(INPUT_FILES, DATASET, VIDEOS, CORRUPT_FILES, DUPLICATE_FILES, EMBEDDING_MODEL, SCORES,
               HOLDOUT_FILES, REPORT_JSON),
        writes=(SAMPLED, REMOVED, SELECTION, SELECTED_EMBEDDINGS, NEAR_DUPLICATES, SAMPLED_IMAGES,
                REPORT_JSON, REPORT_HTML, *SELECTION_PLOTS)),
    "profile": StageArtifacts(
        needs=(INPUT_FILES, DATASET),
        reads=(SAMPLED, MEASUREMENTS, REPORT_JSON),
        writes=(MEASUREMENTS, TRACES, REPORT_JSON, REPORT_HTML, *PROFILE_PLOTS)),
    "train": StageArtifacts(
        needs=(INPUT_FILES, DATASET),
        # REPORT_JSON: the selection's or the profile's section, which the training section joins.
        # HOLDOUT_FILES: data.holdout_fraction's images, the validation set.
        reads=(SAMPLED, HOLDOUT_FILES, LAST, REPORT_JSON),
        writes=(LAST, BEST, EPOCH_CHECKPOINTS, METRICS_JSON, METRICS_CSV, TENSORBOARD, WANDB, REPORT_JSON,
                REPORT_HTML, TRAINING_CURVE_PNG),
        resume_state=(LAST, BEST, EPOCH_CHECKPOINTS, METRICS_CSV, METRICS_JSON, TENSORBOARD)),
}


def producer_of(name: str) -> str:
    """The first stage, in pipeline order, that writes `name`."""
    for stage, declared in STAGE_ARTIFACTS.items():
        if name in declared.writes:
            return stage
    raise KeyError(f"no stage declares that it writes {name}")


def top_level(name: str) -> str:
    """The entry of the run directory that holds `name` ("data" for data/input_files.csv)."""
    return name.split("/", 1)[0]


# Top-level names thresher writes in a run directory; overwrite=true removes these and nothing else
# (the summary, the marker, the locks and the log files are the runner's to keep or replace).
RUN_OUTPUTS: Tuple[str, ...] = tuple(dict.fromkeys(
    top_level(name) for name in (HYDRA_CONFIGS, *(name for declared in STAGE_ARTIFACTS.values()
                                                  for name in declared.writes))))


# ---------------------------------------------------------------------------------------------
# Readers and writers
# ---------------------------------------------------------------------------------------------
def read_run_id(run_dir: Path) -> Optional[str]:
    """The id in a run directory's marker, or None when the folder is not a thresher run."""
    try:
        return json.loads((Path(run_dir) / MARKER).read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None



@dataclass(frozen=True)
class Dataset:
    """What the scan read: where the images are (file names are relative to it) and the class
    names (the first-level folders). On disk: {"input_dir": location, "classes": [...]}."""

    # A folder, or a bucket URL kept as written (s3://bucket/prefix): never a Path, which would
    # make it s3:/bucket/prefix.
    location: str
    classes: List[str] = field(default_factory=list)


def write_dataset(run_dir: Path, dataset: Dataset) -> None:
    atomic.write_json(Path(run_dir) / DATASET, {"input_dir": str(dataset.location), "classes": list(dataset.classes)})


def read_dataset(run_dir: Path) -> Dataset:
    record = json.loads((Path(run_dir) / DATASET).read_text(encoding="utf-8"))
    return Dataset(str(record["input_dir"]), list(record["classes"]))


def write_input_files(run_dir: Path, files: Sequence[str], labels: Sequence[int]) -> None:
    """The usable images and their labels (-1: outside any class folder)."""
    atomic.write_csv(Path(run_dir) / INPUT_FILES, ["filenames", "labels"], zip(files, labels))


def read_input_files(run_dir: Path) -> Tuple[List[str], List[int]]:
    """(file names, labels) as the scan wrote them."""
    return _read_labelled_files(Path(run_dir) / INPUT_FILES)


def _read_labelled_files(path: Path) -> Tuple[List[str], List[int]]:
    files: List[str] = []
    labels: List[int] = []
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        header = next(reader)
        name_at, label_at = header.index("filenames"), header.index("labels")
        for row in reader:
            files.append(row[name_at])
            labels.append(int(row[label_at]))
    return files, labels


def write_holdout_files(run_dir: Path, files: Sequence[str], labels: Sequence[int]) -> None:
    """The images held out for evaluation (data.holdout_fraction) and their labels, as input_files."""
    atomic.write_csv(Path(run_dir) / HOLDOUT_FILES, ["filenames", "labels"], zip(files, labels))


def read_holdout_files(run_dir: Path) -> Optional[Tuple[List[str], List[int]]]:
    """(file names, labels) held out for evaluation; None when the scan held out none."""
    path = Path(run_dir) / HOLDOUT_FILES
    return _read_labelled_files(path) if path.is_file() else None


def _lines(path: Path) -> List[str]:
    return atomic.read_lines(path) if path.is_file() else []


def _pairs(path: Path) -> List[Tuple[str, str]]:
    """The `name<TAB>second` lines of a list ([] when it is not there)."""
    return [(name, second) for name, _, second in (line.partition("\t") for line in _lines(path))]


def write_corrupt_files(run_dir: Path, found: Iterable[Tuple[str, str]]) -> None:
    """(name, why it cannot be used) for each corrupt image or video."""
    atomic.write_lines(Path(run_dir) / CORRUPT_FILES, (f"{name}\t{one_line(reason)}" for name, reason in found))


def add_corrupt_files(run_dir: Path, found: Sequence[Tuple[str, str]]) -> None:
    """Files that failed later (e.g. while embedding with the check off), after those listed."""
    if not found:
        return
    path = Path(run_dir) / CORRUPT_FILES
    atomic.write_lines(path, _lines(path) + [f"{name}\t{one_line(reason)}" for name, reason in found])


def read_corrupt_files(run_dir: Path) -> List[Tuple[str, str]]:
    """(name, reason) pairs; [] when the scan has not run."""
    return _pairs(Path(run_dir) / CORRUPT_FILES)


def write_duplicate_files(run_dir: Path, found: Iterable[Tuple[str, str]]) -> None:
    """(name, the earlier file with the same bytes) for each exact duplicate."""
    atomic.write_lines(Path(run_dir) / DUPLICATE_FILES, (f"{name}\t{first}" for name, first in found))


def read_duplicate_files(run_dir: Path) -> List[Tuple[str, str]]:
    return _pairs(Path(run_dir) / DUPLICATE_FILES)


def count_listed(run_dir: Path, name: str) -> int:
    """How many entries a one-per-line list (CORRUPT_FILES, DUPLICATE_FILES, ...) holds, counted in
    1 MiB reads: no string per file; 0 when it is not there."""
    path = Path(run_dir) / name
    if not path.is_file():
        return 0
    count, last = 0, b"\n"
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            count += chunk.count(b"\n")
            last = chunk[-1:]
    return count + (last != b"\n")


def write_missing_files(run_dir: Path, missing: Iterable[Tuple[str, str]]) -> None:
    """(relevant_filenames_file entry, why it is not used), the entry escaped onto one line."""
    atomic.write_lines(Path(run_dir) / MISSING_FILES,
                       (f"{escape_name(entry)}\t{one_line(why)}" for entry, why in missing))


def write_unused_files(run_dir: Path, skipped: Iterable[Tuple[str, str]]) -> None:
    """(name, why it was left out unopened), the name escaped onto one line."""
    atomic.write_lines(Path(run_dir) / UNUSED_FILES,
                       (f"{escape_name(name)}\t{one_line(why)}" for name, why in skipped))


def write_videos(run_dir: Path, videos: Dict[str, Dict[str, Any]]) -> None:
    atomic.write_json(Path(run_dir) / VIDEOS, videos)


def read_videos(run_dir: Path) -> Optional[Dict[str, Dict[str, Any]]]:
    """Per input video what the scan found; None when the input had no videos."""
    path = Path(run_dir) / VIDEOS
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


@dataclass(frozen=True)
class EmbeddingModel:
    """Which backbone made the embeddings; the report warns when it was randomly initialised."""

    model: str
    weights: Optional[str]
    self_supervised_epochs: int
    randomly_initialised: bool


def write_embedding_model(run_dir: Path, model: EmbeddingModel) -> None:
    atomic.write_json(Path(run_dir) / EMBEDDING_MODEL, asdict(model))


def read_embedding_model(run_dir: Path) -> Optional[EmbeddingModel]:
    """None when no backbone embedded (the embed stage did not run, or used embeddings=)."""
    path = Path(run_dir) / EMBEDDING_MODEL
    return EmbeddingModel(**json.loads(path.read_text(encoding="utf-8"))) if path.is_file() else None


def write_sampled(run_dir: Path, names: Iterable[str]) -> None:
    atomic.write_lines(Path(run_dir) / SAMPLED, names)


def read_sampled(run_dir: Path) -> Optional[List[str]]:
    """The selected file names; None when the select stage has not run."""
    path = Path(run_dir) / SAMPLED
    return atomic.read_lines(path) if path.is_file() else None


def write_removed(run_dir: Path, names: Iterable[str]) -> None:
    atomic.write_lines(Path(run_dir) / REMOVED, names)


def read_removed(run_dir: Path) -> List[str]:
    return _lines(Path(run_dir) / REMOVED)


def write_near_duplicates(run_dir: Path, found: Iterable[Tuple[str, str, float]]) -> None:
    """(name left out, the kept image it is near, their distance)."""
    atomic.write_lines(Path(run_dir) / NEAR_DUPLICATES, (f"{name}\t{kept}\t{d:.6g}" for name, kept, d in found))


def write_selection(run_dir: Path, picked_files: Sequence[str], distances: Optional[Sequence[float]]) -> None:
    """The selection in pick order, with each pick's distance to the earlier picks (empty for a
    sampler that measures none)."""
    rows = ([name, order, "" if distances is None else f"{distances[order]:.6g}"]
            for order, name in enumerate(picked_files))
    atomic.write_csv(Path(run_dir) / SELECTION, ["filenames", "pick", "distance"], rows)


def read_selection(run_dir: Path) -> Optional[List[Tuple[str, Optional[float]]]]:
    """(file name, distance or None) in pick order; None when the select stage has not run."""
    path = Path(run_dir) / SELECTION
    if not path.is_file():
        return None
    with open(path, newline="", encoding="utf-8") as handle:
        return [(row["filenames"], float(row["distance"]) if row.get("distance") else None)
                for row in csv.DictReader(handle)]

