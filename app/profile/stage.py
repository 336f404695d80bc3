"""Profile stage: how fast the composed model, data and hardware train (or infer), and at which
batch size and number of loader workers.

Every setting of the sweep (profile.num_workers x profile.batch_sizes) gets a fresh DataLoader,
`warmup_steps` unmeasured steps (cuDNN autotuning, torch.compile, worker start-up, the caching
allocator), then `steps` measured ones. A step is what the train stage does (the same
app.train.setup.TrainingSetup: model, transforms, loader settings and `train_step`) or, for infer
and latency, a forward pass whose results reach the host. Each step's time is split into the wait
for the batch and the compute, with the device synchronised before the clock is read.

Writes `profile/measurements.json` after every setting (a rerun of an interrupted sweep keeps
those and measures the rest), `profile/traces/*.json` with profile.trace=true, and the profile
section of report.json / report.html with plots.
"""
from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Sampler

from app import artifacts, atomic
from app.artifacts import MEASUREMENTS, TRACES
from app.config import embedding_model_name
from app.errors import UserError
from app.profile.measure import MB, ResourceSampler, is_out_of_memory, percentiles, synchronize
from app.profile.recommend import FAILED, OK, OOM, recommend
from app.progress import Progress
from app.train.data import TrainingData
from app.train.setup import TrainingSetup
from app.train.tasks import spec_for

log = logging.getLogger("thresher")


@dataclass
class ProfileResult:
    mode: str
    settings: int
    settings_ok: int
    settings_oom: int
    settings_failed: int
    recommended: Optional[str]
    best_samples_per_s: Optional[float]
    artifacts: List[str] = field(default_factory=list)


def profile_stage(cfg: DictConfig, run_dir: Path, device: torch.device) -> ProfileResult:
    from app.report.profile import write_profile_report
    from app.train.loop import set_determinism

    profile, mode = cfg.profile, cfg.profile.mode
    set_determinism(cfg.trainer.deterministic, device)
    data = profiling_data(cfg, run_dir)
    setup = TrainingSetup.build(cfg, data, device, train=mode == "train")
    step, release = build_step(setup)
    dataset = setup.dataset(train=mode == "train")
    settings = sweep_settings(cfg, device)
    fingerprint = measurement_fingerprint(cfg, device)
    measured = earlier_measurements(run_dir, fingerprint)
    log.info("profile: %s mode, %s (%s) on %d images, device %s, %d setting(s): batch sizes %s x workers %s, "
             "%d warm-up + %d measured steps each", mode, cfg.model.name, cfg.model.task, len(data.files), device,
             len(settings), sorted({b for b, _ in settings}), sorted({w for _, w in settings}),
             profile.warmup_steps, profile.steps)

    for batch_size, num_workers in settings:
        if (batch_size, num_workers) in measured:
            log.info("profile: batch %d, %d workers: measured before the interruption, kept", batch_size, num_workers)
            continue
        trace_path = run_dir / TRACES / f"{mode}_batch{batch_size}_workers{num_workers}.json" if profile.trace else None
        row = measure_setting(step, release, setup, dataset, list(range(len(data.files))), batch_size,
                              num_workers, cfg, trace_path)
        measured[(batch_size, num_workers)] = row
        atomic.write_json(run_dir / MEASUREMENTS, {"fingerprint": fingerprint, "device": str(device),
                                                   "rows": list(measured.values())})
    rows = [measured[setting] for setting in settings]
    failed = [row for row in rows if row["status"] == FAILED]
    if len(failed) == len(rows):
        raise RuntimeError(f"profile: every setting failed; the first, batch {failed[0]['batch_size']}: "
                           f"{failed[0]['error']}")

    recommendation = recommend(rows, mode, profile.tolerance, batch_size_key(cfg))
    section = {"mode": mode, "device": describe_device(device), "model": cfg.model.name, "task": cfg.model.task,
               "data": cfg.data.name, "n_images": len(data.files), "image_size": cfg.data.image_size,
               "amp": cfg.trainer.amp, "channels_last": cfg.trainer.channels_last, "compile": cfg.trainer.compile,
               "prefetch_factor": cfg.hardware.prefetch_factor, "warmup_steps": profile.warmup_steps,
               "steps": profile.steps, "settings": rows, "recommended": recommendation,
               "traces": [str(p.relative_to(run_dir)) for p in sorted((run_dir / TRACES).glob("*.json"))]
               if profile.trace else []}
    artifacts = write_profile_report(run_dir, section)
    log_table(rows, mode)
    if recommendation is None:
        log.warning("profile: no setting ran (every one was out of memory): try smaller profile.batch_sizes")
    else:
        log.info("profile: recommended: %s (%s)", recommendation["overrides"], recommendation["reason"])
    ran = [row for row in rows if row["status"] == OK]
    return ProfileResult(
        mode=mode, settings=len(rows), settings_ok=len(ran),
        settings_oom=sum(row["status"] == OOM for row in rows), settings_failed=len(failed),
        recommended=recommendation["overrides"] if recommendation else None,
        best_samples_per_s=max((row["samples_per_s"] for row in ran), default=None),
        artifacts=[MEASUREMENTS, *section["traces"], *artifacts])


# ---------------------------------------------------------------------------------------------
# What is fed and what runs
# ---------------------------------------------------------------------------------------------
def profiling_data(cfg: DictConfig, run_dir: Path) -> TrainingData:
    """The scanned (and selected) images with their labels. Training needs labels; inference runs
    on unlabelled images too, with torchvision's default head size."""
    from app.train.data import selected_files, training_data

    task = spec_for(cfg.model.task)
    folder_classes = artifacts.read_dataset(run_dir).classes
    labelled = cfg.data.name in task.data_formats and not (cfg.data.name == "folder" and len(folder_classes) < 2)
    if cfg.profile.mode == "train" or labelled:
        return training_data(cfg, run_dir)
    input_dir, files, _, _ = selected_files(run_dir)
    if not files:
        raise UserError(f"no usable images to profile in {input_dir}: see filenames/corrupt_filenames.txt")
    num_classes, num_keypoints = task.default_head
    log.info("profile: data=%s has no %s labels; inferring with torchvision's default head (%d classes)",
             cfg.data.name, task.name, num_classes)
    return TrainingData(input_dir, [f"class_{i}" for i in range(num_classes)], files, [0] * len(files),
                        train_index=list(range(len(files))), val_index=[], num_keypoints=num_keypoints)


def build_step(setup: TrainingSetup) -> Tuple[Callable, Callable]:
    """(step(images, targets), release()): the train stage's training step, or (a setup built
    without training) one forward pass with its results moved to the host; release() frees what a
    failed step held."""
    from app.train.loop import to_device

    if setup.optimizer is not None:
        return setup.train_step, lambda: setup.optimizer.zero_grad(set_to_none=True)

    cpu = torch.device("cpu")

    @torch.inference_mode()
    def infer(images, _targets) -> None:
        outputs = setup.predict(images, model=setup.trained)
        to_device(outputs, cpu)  # a prediction is done when its result is on the host

    return infer, lambda: None


class CyclingBatches(Sampler):
    """`n_batches` batches of (index, sample seed), drawn from seeded permutations of `indices`
    one after another, so a dataset smaller than the steps (or than a batch) still fills them."""

    def __init__(self, indices: Sequence[int], batch_size: int, n_batches: int, seed: int):
        self.indices, self.batch_size, self.n_batches, self.seed = list(indices), batch_size, n_batches, seed

    def __len__(self) -> int:
        return self.n_batches

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        from app.train.data import sample_seed, shuffled

        pool: List[Tuple[int, int]] = []
        epoch = 0
        for _ in range(self.n_batches):
            while len(pool) < self.batch_size:
                pool += [(index, sample_seed(self.seed, epoch, index))
                         for index in shuffled(self.indices, self.seed, epoch)]
                epoch += 1
            batch, pool = pool[:self.batch_size], pool[self.batch_size:]
            yield batch


# ---------------------------------------------------------------------------------------------
# The sweep
# ---------------------------------------------------------------------------------------------
def sweep_settings(cfg: DictConfig, device: torch.device) -> List[Tuple[int, int]]:
    """(batch size, workers) pairs in the order they run: for each worker count, each batch size,
    as listed. -1 workers (one per core) is resolved; settings that resolve alike run once."""
    from app.device import loader_workers

    profile = cfg.profile
    latency = profile.mode == "latency"
    batch_sizes = list(profile.batch_sizes) if profile.batch_sizes is not None else \
        [1 if latency else cfg.trainer.batch_size]
    workers = list(profile.num_workers) if profile.num_workers is not None else \
        [0 if latency else cfg.hardware.num_workers]
    resolved = list(dict.fromkeys(loader_workers(w, device) for w in workers))
    return [(batch_size, w) for w in resolved for batch_size in batch_sizes]


def measure_setting(step: Callable, release: Callable, setup: TrainingSetup, dataset, indices: List[int],
                    batch_size: int, num_workers: int, cfg: DictConfig, trace_path: Optional[Path]) -> Dict:
    """One setting's row: its measurements, or status oom/failed with the error's first line."""
    device = setup.device
    row: Dict[str, Any] = {"batch_size": batch_size, "num_workers": num_workers}
    try:
        row.update(run_setting(step, setup, dataset, indices, batch_size, num_workers, cfg, trace_path))
        row["status"] = OK
    except Exception as error:  # an Interrupted (BaseException) stops the sweep instead
        message = (str(error).strip().splitlines() or [type(error).__name__])[0]
        if is_out_of_memory(error):
            row.update(status=OOM, error=message)
            log.warning("profile: batch %d, %d workers: out of memory; the sweep goes on", batch_size, num_workers)
        else:
            row.update(status=FAILED, error=f"{type(error).__name__}: {message}")
            log.warning("profile: batch %d, %d workers failed: %s; the sweep goes on", batch_size, num_workers,
                        row["error"], exc_info=log.isEnabledFor(logging.DEBUG))
    # Outside the except block, so the traceback's frames (and the tensors they hold) are gone.
    release()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def run_setting(step: Callable, setup: TrainingSetup, dataset, indices: List[int], batch_size: int,
                num_workers: int, cfg: DictConfig, trace_path: Optional[Path]) -> Dict:
    profile, mode, device = cfg.profile, cfg.profile.mode, setup.device
    n_trace = profile.trace_steps if trace_path is not None else 0
    settings = setup.loader_settings(batch_size, num_workers)
    batches = CyclingBatches(indices, batch_size, profile.warmup_steps + profile.steps + n_trace, cfg.seed)
    loader = DataLoader(dataset, batch_sampler=batches, collate_fn=setup.collate, **settings)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    waits: List[float] = []
    computes: List[float] = []
    samples = skipped = 0
    iterator = iter(loader)  # workers start here, inside the warm-up
    desc = f"profile {mode} batch {batch_size} workers {num_workers}"
    try:
        with Progress(len(batches), desc, unit="step") as bar:
            def one_step(labelled: bool = False) -> Tuple[float, float, int, int]:
                label = torch.profiler.record_function if labelled else lambda _name: contextlib.nullcontext()
                began = time.perf_counter()
                with label("thresher: wait for batch"):
                    images, targets, _, failures = next(iterator)
                got = time.perf_counter()
                with label("thresher: step"):
                    if images is not None:
                        step(images, targets)
                    synchronize(device)
                done = time.perf_counter()
                n = 0 if images is None else len(images)
                bar.update(1, samples_per_s=n / (done - began))
                return got - began, done - got, n, len(failures)

            for _ in range(profile.warmup_steps):
                one_step()
            synchronize(device)
            sampler = ResourceSampler(device).start()
            try:
                for _ in range(profile.steps):
                    wait, compute, n, failed = one_step()
                    waits.append(wait)
                    computes.append(compute)
                    samples += n
                    skipped += failed
            finally:
                sampler.stop()
            if trace_path is not None:
                write_trace(trace_path, device, lambda: one_step(labelled=True), n_trace)
    finally:
        iterator = None  # the last reference: the loader's workers shut down now, not at a collection

    if samples == 0:
        raise RuntimeError(f"no image of the {profile.steps} measured batches loaded ({skipped} skipped): "
                           f"see filenames/corrupt_filenames.txt")
    busy = sum(waits) + sum(computes)
    steps_s = [w + c for w, c in zip(waits, computes)]
    row: Dict[str, Any] = {
        "num_workers_used": settings["num_workers"], "steps": profile.steps, "samples": samples,
        "samples_per_s": round(samples / busy, 3),
        "step_ms": {**percentiles(steps_s), "mean": round(1000 * busy / len(steps_s), 3)},
        "data_wait_s": round(sum(waits), 4), "compute_s": round(sum(computes), 4),
        "compute_efficiency": round(sum(computes) / busy, 4),
        "cpu_ms_per_sample": round(1000 * sampler.cpu_s / samples, 3),
        "host_rss_peak_mb": round(sampler.rss_peak / MB, 1), "host_pss_mb": round(sampler.pss / MB, 1),
        **sampler.gpu_memory(), "gpu_utilization_pct": sampler.gpu_utilization_pct(),
        "images_skipped": skipped,
    }
    if mode != "train":
        # Per batch (per image at batch size 1): from the batch in hand to its results on the host,
        # and end to end with the wait for the batch.
        row["latency_ms"] = {**percentiles(computes, (50, 90, 95, 99)), "max": round(1000 * max(computes), 3)}
        row["end_to_end_ms"] = {**percentiles(steps_s, (50, 90, 95, 99)), "max": round(1000 * max(steps_s), 3)}
    return row


def write_trace(path: Path, device: torch.device, one_step: Callable, n_steps: int) -> None:
    """A torch.profiler Chrome trace (chrome://tracing, Perfetto) of `n_steps` further steps."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        for _ in range(n_steps):
            one_step()
        synchronize(device)
    with atomic.atomic_path(path) as tmp:
        profiler.export_chrome_trace(str(tmp))
    log.info("profile: trace of %d steps in %s", n_steps, path)


# ---------------------------------------------------------------------------------------------
# Resuming, naming, logging
# ---------------------------------------------------------------------------------------------
def measurement_fingerprint(cfg: DictConfig, device: torch.device) -> str:
    """What the measurements depend on, besides the setting itself: a rerun with anything else
    changed measures again instead of mixing in old figures."""
    profile = cfg.profile
    relevant = {"model": cfg.model, "data": cfg.data, "hardware": cfg.hardware, "trainer": cfg.trainer,
                "seed": cfg.seed, "profile": {key: profile[key] for key in ("mode", "warmup_steps", "steps", "trace",
                                                                           "trace_steps")}}
    text = json.dumps(OmegaConf.to_container(OmegaConf.create(relevant), resolve=True), sort_keys=True, default=str)
    return hashlib.sha256(f"{text}|{device}".encode()).hexdigest()[:16]


def earlier_measurements(run_dir: Path, fingerprint: str) -> Dict[Tuple[int, int], Dict]:
    """The rows an interrupted run of the same profile finished (failed ones are measured again)."""
    path = run_dir / MEASUREMENTS
    if not path.is_file():
        return {}
    saved = json.loads(path.read_text())
    if saved.get("fingerprint") != fingerprint:
        log.info("profile: %s is from another configuration; measuring again", MEASUREMENTS)
        return {}
    return {(row["batch_size"], row["num_workers"]): row for row in saved["rows"] if row["status"] != FAILED}


def batch_size_key(cfg: DictConfig) -> Optional[str]:
    """The key the measured batch size belongs to: training's, or (infer) the embed stage's when
    the profiled model is the one that embeds the images; None when thresher has no such key."""
    if cfg.profile.mode == "train":
        return "trainer.batch_size"
    # The embed stage's model is a classifier: equal names mean the profiled one embeds.
    if cfg.profile.mode == "infer" and embedding_model_name(cfg) == cfg.model.name:
        return "sampler.batch_size"
    return None


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        return f"{device} ({properties.name}, {properties.total_memory / 2**30:.0f} GiB)"
    from app.device import loader_workers

    return f"{device} ({loader_workers(-1, device)} cores, {torch.get_num_threads()} torch threads)"


def log_table(rows: List[Dict], mode: str) -> None:
    """The sweep as a table in the log: throughput and costs; in latency mode the percentiles."""
    timing = "latency p50/p95 ms" if mode == "latency" else "step p50/p95 ms"
    log.info("profile: %5s %7s %11s %18s %8s %13s %9s %9s %6s", "batch", "workers", "samples/s", timing,
             "compute", "CPU ms/sample", "RSS MB", "GPU MB", "GPU %")
    for row in rows:
        if row["status"] != OK:
            log.info("profile: %5d %7d %s", row["batch_size"], row["num_workers"],
                     "out of memory" if row["status"] == OOM else f"failed: {row['error']}")
            continue
        times = row["latency_ms"] if mode == "latency" else row["step_ms"]
        gpu_mb, util = row["gpu_memory_peak_mb"], row["gpu_utilization_pct"]
        log.info("profile: %5d %7d %11.2f %18s %8.2f %13.2f %9.0f %9s %6s", row["batch_size"], row["num_workers"],
                 row["samples_per_s"], f"{times['p50']:.1f}/{times['p95']:.1f}", row["compute_efficiency"],
                 row["cpu_ms_per_sample"], row["host_rss_peak_mb"], "-" if gpu_mb is None else f"{gpu_mb:.0f}",
                 "-" if util is None else f"{util:.0f}")
