"""What one measured window costs: CPU time of the process and its loader workers, host memory,
GPU memory and utilisation, and step-time statistics.

CPU time and memory are read with psutil over the whole process tree, since DataLoader workers
are child processes whose work `time.process_time()` would not see. GPU utilisation is NVML's
(what nvidia-smi shows), sampled by a background thread while the steps run.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
import psutil
import torch

log = logging.getLogger("thresher")

MB = 2 ** 20


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work: CUDA kernels run asynchronously, so a clock read
    without this times the launch, not the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator's failure to allocate."""
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("out of memory" in text.lower()
                                                or "DefaultCPUAllocator: can't allocate memory" in text
                                                or "DefaultCPUAllocator: not enough memory" in text)


def percentiles(values_s: Sequence[float], points: Sequence[int] = (50, 95)) -> Dict[str, float]:
    """Milliseconds at the given percentiles of a list of seconds."""
    values = np.asarray(values_s, dtype=np.float64) * 1000
    return {f"p{p}": round(float(np.percentile(values, p)), 3) for p in points}


def _process_tree() -> List[psutil.Process]:
    main = psutil.Process(os.getpid())
    try:
        return [main, *main.children(recursive=True)]
    except psutil.Error:
        return [main]


def process_tree_cpu_s() -> Dict[int, float]:
    """User + system CPU seconds of this process (to the nanosecond) and of each live child, the
    loader workers (to the clock tick), by pid."""
    times = {os.getpid(): time.process_time()}
    for process in _process_tree()[1:]:
        try:
            cpu = process.cpu_times()
            times[process.pid] = cpu.user + cpu.system
        except psutil.Error:  # a worker that exited between listing and reading
            continue
    return times


def cpu_seconds_between(before: Dict[int, float], after: Dict[int, float]) -> float:
    """CPU seconds spent between two readings; a process that started in between counts from 0."""
    return sum(seconds - before.get(pid, 0.0) for pid, seconds in after.items())


def process_tree_rss() -> int:
    total = 0
    for process in _process_tree():
        try:
            total += process.memory_info().rss
        except psutil.Error:
            continue
    return total


def process_tree_pss() -> int:
    """Proportional set size of the process tree: pages shared by the forked workers are split
    between them instead of counted in each (as RSS does). Costs milliseconds a process."""
    total = 0
    for process in _process_tree():
        try:
            total += process.memory_full_info().pss
        except (psutil.Error, AttributeError):
            continue
    return total


def gpu_utilization(device: torch.device) -> Optional[int]:
    """NVML's utilisation of `device` in percent; None without NVML (no nvidia-ml-py or driver)."""
    try:
        return int(torch.cuda.utilization(device))
    except Exception:
        return None


class ResourceSampler:
    """Samples host memory (process tree RSS) and GPU utilisation every `interval_s` in a
    background thread, and reads the tree's CPU time at start and stop and its PSS at stop."""

    def __init__(self, device: torch.device, interval_s: float = 0.1):
        self.device, self.interval_s = device, interval_s
        self.rss_peak = 0
        self.gpu_samples: List[int] = []
        self.gpu_unavailable = False
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._cpu_before: Dict[int, float] = {}
        self.cpu_s = 0.0
        self.pss = 0

    def _sample(self) -> None:
        self.rss_peak = max(self.rss_peak, process_tree_rss())
        if self.device.type == "cuda" and not self.gpu_unavailable:
            value = gpu_utilization(self.device)
            if value is None:
                self.gpu_unavailable = True
            else:
                self.gpu_samples.append(value)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def start(self) -> "ResourceSampler":
        self._cpu_before = process_tree_cpu_s()
        self._sample()
        self._thread = threading.Thread(target=self._run, name="thresher-profile-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.cpu_s = cpu_seconds_between(self._cpu_before, process_tree_cpu_s())
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
        self.pss = process_tree_pss()

    def gpu_memory(self) -> Dict[str, Optional[float]]:
        """Peaks since the last torch.cuda.reset_peak_memory_stats, in MB; None off CUDA."""
        if self.device.type != "cuda":
            return {"gpu_memory_peak_mb": None, "gpu_memory_reserved_peak_mb": None}
        return {"gpu_memory_peak_mb": round(torch.cuda.max_memory_allocated(self.device) / MB, 1),
                "gpu_memory_reserved_peak_mb": round(torch.cuda.max_memory_reserved(self.device) / MB, 1)}

    def gpu_utilization_pct(self) -> Optional[float]:
        if self.device.type != "cuda" or not self.gpu_samples:
            return None
        return round(float(np.mean(self.gpu_samples)), 1)
