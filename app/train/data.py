"""What the training loop iterates over: the files to train and validate on, a dataset that
augments each sample under its own seed, a sampler that can start mid-epoch, and loader settings
that survive a small /dev/shm.

Reproducibility rests on two choices. Every sample's augmentation runs under a seed made of
(seed, epoch, index), so it is the same whichever worker loads it and whether or not the run was
resumed. The shuffling is a permutation drawn from (seed, epoch), so a resumed epoch can skip the
batches already trained and continue with exactly the ones an uninterrupted run would see.
"""
from __future__ import annotations

import logging
import os
import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from app import artifacts, atomic
from app.data.images import open_image
from app.errors import UserError
from app.train.tasks import TaskSpec, spec_for

log = logging.getLogger("thresher")

# Docker's default /dev/shm; worker processes hand batches over through it.
SMALL_SHM_BYTES = 64 * 1024 * 1024


@dataclass
class TrainingData:
    """The labelled files of a run, their split, and what the model needs to know of the labels."""
    input_dir: str  # a folder or a bucket URL: artifacts.Dataset.location
    classes: List[str]
    files: List[str]
    # What the task spec's training_target makes: classification an int label per file,
    # detection and keypoints a target dict per file.
    targets: List[Any]
    train_index: List[int]
    val_index: List[int]
    num_keypoints: int = 0
    annotations: Any = None
    left_out: Dict[str, str] = field(default_factory=dict)
    # What validates when it is not a split of the selection (data.holdout_fraction,
    # data.val_input_dir), in words for the log; None: a split of the selection, or nothing.
    validation_source: Optional[str] = None
    # data.val_input_dir: the files at val_index are under this folder, not input_dir.
    val_input_dir: Optional[str] = None


@dataclass
class ValidationImages:
    """A validation set kept apart from the selection: where its images are, their names and
    folder labels (-1: outside any class folder), and what it is, in words."""
    location: str
    files: List[str]
    labels: List[int]
    source: str


def selected_files(run_dir: Path) -> Tuple[str, List[str], List[int], List[str]]:
    """(where the images are, the scan's usable files (the selection, when the select stage wrote
    one), their labels, the class names)."""
    files, labels = artifacts.read_input_files(run_dir)
    dataset = artifacts.read_dataset(run_dir)
    sampled = artifacts.read_sampled(run_dir)
    if sampled is not None:
        selected = set(sampled)
        pairs = [(f, label) for f, label in zip(files, labels) if f in selected]
        files, labels = [f for f, _ in pairs], [label for _, label in pairs]
    return dataset.location, files, labels, list(dataset.classes)


def training_data(cfg, run_dir: Path) -> TrainingData:
    """Files, targets and split for `cfg.model.task`; refuses what cannot be trained on. With a
    validation set kept apart (data.holdout_fraction, data.val_input_dir) the whole selection
    trains and that set validates; otherwise trainer.val_fraction or val_filenames_file split
    the selection."""
    input_dir, files, labels, folder_classes = selected_files(run_dir)
    validation = validation_images(cfg, run_dir, input_dir, folder_classes)
    task = cfg.model.task
    spec = spec_for(task)
    annotations = None
    num_keypoints = 0
    val_files: List[str] = []
    val_targets: List[Any] = []
    val_left_out: Dict[str, str] = {}
    if cfg.data.name in spec.labels_from_folders:
        classes = folder_classes
        if len(classes) < 2:
            raise UserError(f"{task} needs at least 2 classes, one sub-folder each, in {input_dir}; "
                            f"found {len(classes)}: sort the images into class folders, or set model.task")
        files, targets, left_out = _in_class_folders(files, labels)
        if validation is not None:
            val_files, val_targets, val_left_out = _in_class_folders(validation.files, validation.labels)
    else:
        # Labels from the annotation files: boxes and keypoints, or (classification) each
        # image's one category.
        from app.train.annotations import load_annotations, split_annotated

        annotations = load_annotations(cfg.data, input_dir, task)
        classes = list(annotations.classes)
        num_keypoints = int(annotations.num_keypoints)
        files, left_out = split_annotated(files, annotations)
        targets = [spec.training_target(annotations.targets[f]) for f in files]
        if validation is not None:
            val_files, val_left_out = split_annotated(validation.files, annotations)
            val_targets = [spec.training_target(annotations.targets[f]) for f in val_files]
    if left_out:
        log.warning("train: %d selected image(s) have no %s label and are left out (e.g. %s: %s)",
                    len(left_out), task, *next(iter(left_out.items())))
    if len(files) < 2:
        raise UserError(f"training needs at least 2 labelled images; the selection has {len(files)}: "
                        f"raise sampler.stopping_condition.n_samples or check the labels")
    if validation is None:
        train_index, val_index = split(files, cfg.trainer.val_fraction, cfg.trainer.val_filenames_file, cfg.seed)
        return TrainingData(input_dir, classes, files, targets, train_index, val_index, num_keypoints,
                            annotations, left_out)
    if val_left_out:
        log.warning("train: %d validation image(s) of %s have no %s label and are left out (e.g. %s: %s)",
                    len(val_left_out), validation.source, task, *next(iter(val_left_out.items())))
    if not val_files:
        raise UserError(f"the validation set, {validation.source}, has no image with a {task} label: "
                        f"check its class folders or annotations")
    n_train = len(files)
    return TrainingData(input_dir, classes, files + val_files, targets + val_targets, list(range(n_train)),
                        list(range(n_train, n_train + len(val_files))), num_keypoints, annotations, left_out,
                        validation_source=validation.source,
                        val_input_dir=validation.location if validation.location != input_dir else None)


def _in_class_folders(files: Sequence[str], labels: Sequence[int]) -> Tuple[List[str], List[int], Dict[str, str]]:
    """(files with a class folder, their labels, the others with why they are left out)."""
    kept = [(f, label) for f, label in zip(files, labels) if label >= 0]
    left_out = {f: "outside any class folder" for f, label in zip(files, labels) if label < 0}
    return [f for f, _ in kept], [label for _, label in kept], left_out


def validation_images(cfg, run_dir: Path, input_dir: str, classes: List[str]) -> Optional[ValidationImages]:
    """The validation set kept apart from the selection: the scan's held-out images
    (data.holdout_fraction) or every image of data.val_input_dir; None without either."""
    val_input_dir = cfg.data.get("val_input_dir")
    if val_input_dir:
        return validation_folder(str(val_input_dir), classes, bool(cfg.get("enable_corruptness_check", True)))
    fraction = cfg.data.get("holdout_fraction") or 0.0
    if fraction <= 0:
        return None
    held_out = artifacts.read_holdout_files(run_dir)
    if held_out is None:
        raise UserError(f"data.holdout_fraction={fraction:g}, but {artifacts.HOLDOUT_FILES} is not in {run_dir}: "
                        f"run the scan stage with it (add scan to stages)")
    files, labels = held_out
    return ValidationImages(input_dir, files, labels,
                            f"the held-out images (data.holdout_fraction={fraction:g}, {artifacts.HOLDOUT_FILES})")


def validation_folder(location: str, classes: List[str], decode: bool) -> ValidationImages:
    """Every image under data.val_input_dir with its class-folder label, the corrupt ones
    reported and skipped (decoded here, as the scan decodes the input). A class folder that the
    training data does not have is refused: the model could never predict it."""
    from app.data.locations import is_url
    from app.data.scan import CHUNK_FILES, check_chunk, class_names, label_array, list_images
    from app.data.sources import source_for
    from app.progress import Progress

    location = location if is_url(location) else str(Path(location))
    if not source_for(location).exists():
        raise UserError(f"data.val_input_dir={location!r} is not a folder")
    files = list_images(location)
    foreign = [name for name in class_names(files) if name not in classes]
    if foreign:
        raise UserError(f"data.val_input_dir={location!r} has the class folder {foreign[0]!r}, which "
                        f"data.input_dir does not have (its classes: {', '.join(classes) or 'none'}): remove it, "
                        f"or add that class to the training images")
    if decode and files:
        corrupt = set()
        with Progress(len(files), "check validation images") as bar:
            for start in range(0, len(files), CHUNK_FILES):
                names = files[start:start + CHUNK_FILES]
                checked = check_chunk(location, names, decode=True, digest=False)
                for position, reason in zip(checked.failed.tolist(), checked.reasons):
                    corrupt.add(names[position])
                    log.warning("train: corrupt validation image skipped: %s (%s)", names[position], reason)
                bar.update(len(names))
        files = [f for f in files if f not in corrupt]
    if not files:
        raise UserError(f"data.val_input_dir={location!r} has no usable images")
    return ValidationImages(location, files, label_array(files, classes).tolist(),
                            f"data.val_input_dir={location}")


def split(files: Sequence[str], val_fraction: float, val_filenames_file: Optional[str], seed: int):
    """(train indices, validation indices): the listed files validate, or a seeded fraction does."""
    if val_filenames_file:
        # `./a/x.png` and `a//x.png` name a/x.png, as in relevant_filenames_file
        listed = {posixpath.normpath(line) for line in atomic.read_lines(Path(val_filenames_file))}
        val = [i for i, f in enumerate(files) if f in listed]
        if not val:
            raise UserError(f"trainer.val_filenames_file={val_filenames_file!r} names none of the "
                            f"{len(files)} training images (names as in data/input_files.csv)")
        train = [i for i, f in enumerate(files) if f not in listed]
        if not train:
            raise UserError(f"trainer.val_filenames_file={val_filenames_file!r} names every training image: "
                            f"leave some to train on")
        return train, val
    order = np.random.default_rng(seed).permutation(len(files))
    n_val = min(int(round(val_fraction * len(files))), len(files) - 1)
    return sorted(order[n_val:].tolist()), sorted(order[:n_val].tolist())


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A distinct, reproducible seed for one sample in one epoch."""
    return ((seed * 1_000_003 + epoch) * 10_000_019 + index) % (2 ** 63)


class TrainingImages(Dataset):
    """Item (index, seed) -> (image, target, index, error). A file that fails to load is reported
    with the batch and skipped, never raised. Images outside data.augment's min/max_input_size are
    skipped the same way, with that reason."""

    def __init__(self, input_dir: Union[Path, str], files: Sequence[str], targets: Sequence[Any], transform: Callable,
                 size_ok: Optional[Callable[[int, int], bool]] = None,
                 second_root: Optional[Tuple[int, str]] = None):
        # A bucket URL stays a string: Path would make s3://bucket/prefix s3:/bucket/prefix.
        self.input_dir, self.files, self.targets = input_dir, list(files), list(targets)
        self.transform, self.size_ok = transform, size_ok
        # (first index, folder): the files from that index on are under that folder
        # (data.val_input_dir's, after the selection's).
        self.second_root = second_root

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, item):
        index, seed = item if isinstance(item, tuple) else (item, None)
        try:
            in_second = self.second_root is not None and index >= self.second_root[0]
            image = open_image(self.second_root[1] if in_second else self.input_dir, self.files[index])
            if self.size_ok is not None and not self.size_ok(*image.size):
                return None, None, index, f"size {image.size[0]}x{image.size[1]} outside data.augment's " \
                                          f"min_input_size/max_input_size"
            target = self.targets[index]
            if seed is None:
                tensor, target = self.transform(image, _as_target(target))
            else:
                with torch.random.fork_rng(devices=[]):
                    # Only the CPU generator: torch.manual_seed would also queue a CUDA seeding,
                    # and that records a stack trace each call (half a millisecond a sample).
                    torch.default_generator.manual_seed(seed)
                    tensor, target = self.transform(image, _as_target(target))
            return tensor, target, index, None
        except Exception as error:  # decoded fine at scan time, or the check was off
            return None, None, index, f"{type(error).__name__}: {error}"


def _as_target(target: Any) -> Optional[dict]:
    """Classification labels are ints and pass through the transform as None."""
    return {k: v.clone() for k, v in target.items()} if isinstance(target, dict) else None


def make_collate(task: TaskSpec, labels: Sequence[Any]):
    """(images [B,3,H,W], the task's targets, indices, failures) from TrainingImages items; the
    images that failed to load are left out of the batch and reported."""

    def collate(batch):
        good = [item for item in batch if item[0] is not None]
        failures = [(item[2], item[3]) for item in batch if item[0] is None]
        indices = [item[2] for item in good]
        if not good:
            return None, None, indices, failures
        images = torch.stack([item[0] for item in good])
        return images, task.collate_targets(good, labels), indices, failures

    return collate


def shuffled(indices: Sequence[int], seed: int, epoch: int) -> List[int]:
    """`indices` in the order of epoch `epoch`: a permutation drawn from (seed, epoch) alone."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return [indices[i] for i in torch.randperm(len(indices), generator=generator).tolist()]


class EpochBatches(Sampler):
    """Batches of (index, sample seed) for one epoch of this rank, from batch `start_batch` on.

    The order is a permutation drawn from (seed, epoch), padded so every rank gets as many batches
    (as DistributedSampler does). When training (`shuffle`), a last batch of one sample is
    dropped, since batch norm cannot train on it.
    """

    def __init__(self, indices: Sequence[int], batch_size: int, seed: int, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1):
        self.indices, self.batch_size, self.seed, self.shuffle = list(indices), batch_size, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def _rank_order(self) -> List[int]:
        order = shuffled(self.indices, self.seed, self.epoch) if self.shuffle else self.indices
        if self.world_size > 1:
            total = -(-len(order) // self.world_size) * self.world_size
            order = (order * (total // max(len(order), 1) + 1))[:total]
            order = order[self.rank::self.world_size]
        return order

    def batches(self) -> List[List[int]]:
        order = self._rank_order()
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        if self.shuffle and len(batches) > 1 and len(batches[-1]) == 1:
            batches.pop()
        return batches

    def __len__(self) -> int:
        return max(len(self.batches()) - self.start_batch, 0)

    def n_samples(self) -> int:
        """Samples in the whole epoch of this rank, the resumed part included."""
        return sum(len(batch) for batch in self.batches())

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        for batch in self.batches()[self.start_batch:]:
            yield [(index, sample_seed(self.seed, self.epoch, index)) for index in batch]


def model_input_shape(data_cfg) -> Tuple[int, int]:
    """(height, width) of the images the model gets: data.augment.resize, else data.image_size."""
    return (data_cfg.augment.resize.height or data_cfg.image_size, data_cfg.augment.resize.width or data_cfg.image_size)


def shm_bytes(path: str = "/dev/shm") -> Optional[int]:
    try:
        stats = os.statvfs(path)
    except OSError:
        return None
    return stats.f_bavail * stats.f_frsize


def loader_settings(hardware, device: torch.device, batch_size: int, image_shape: Tuple[int, int],
                    free_shm: Optional[int] = None) -> Dict[str, Any]:
    """DataLoader keyword arguments from the hardware group. Worker processes pass batches through
    /dev/shm; when the batches in flight would not fit (Docker's default is 64 MB), fall back to
    loading in the main process with a warning instead of dying with a bus error."""
    from app.device import loader_workers

    workers = loader_workers(hardware.num_workers, device)
    prefetch = hardware.prefetch_factor or 2
    pin = device.type == "cuda" if hardware.pin_memory is None else bool(hardware.pin_memory)
    if workers > 0:
        free = shm_bytes() if free_shm is None else free_shm
        batch_bytes = batch_size * 3 * image_shape[0] * image_shape[1] * 4
        needed = batch_bytes * workers * prefetch * 2
        if free is not None and needed > free:
            log.warning("/dev/shm has %d MB free, but %d workers x %d prefetched batches need about %d MB: "
                        "loading in the main process instead (give the container more: docker run "
                        "--shm-size=2g, or compose shm_size)", free // 2**20, workers, prefetch, needed // 2**20)
            workers = 0
    settings: Dict[str, Any] = {"num_workers": workers, "pin_memory": pin}
    if workers > 0:
        settings.update(prefetch_factor=prefetch, persistent_workers=bool(hardware.persistent_workers))
    return settings
