"""The profile stage's schema (stages=[profile]) and its checks. Importable without torch, like
app.config, which composes it into ThresherConfig and calls validate_profile."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from omegaconf import DictConfig

from app.config_checks import is_int, refuse

PROFILE_MODES = ("train", "infer", "latency")


@dataclass
class ProfileConfig:
    """stages=[profile]: warm-up steps, then measured steps, for every batch size x worker count."""
    # train: training steps as the train stage runs them; infer: forward passes (no gradients);
    # latency: infer one image at a time, as for live use, with per-image latency percentiles.
    mode: str = "train"
    warmup_steps: int = 5
    steps: int = 20
    # The sweep; null: trainer.batch_size (1 in latency mode) and hardware.num_workers (0 in
    # latency mode: each frame is loaded as it comes).
    batch_sizes: Optional[List[int]] = None
    num_workers: Optional[List[int]] = None
    # A torch.profiler Chrome trace of trace_steps further steps of every setting, in profile/traces/.
    trace: bool = False
    trace_steps: int = 5
    # The recommendation: the smallest batch size and fewest workers within this share of the best
    # throughput (larger batches and more workers cost memory and CPU for nothing more).
    tolerance: float = 0.05


def validate_profile(profile: DictConfig) -> None:
    if profile.mode not in PROFILE_MODES:
        raise refuse("profile.mode", profile.mode, f"choose from {', '.join(PROFILE_MODES)}", PROFILE_MODES)
    if profile.warmup_steps < 0:
        raise refuse("profile.warmup_steps", profile.warmup_steps, "use an integer >= 0")
    if profile.steps < 2:
        raise refuse("profile.steps", profile.steps, "use an integer >= 2 (percentiles need several steps)")
    if profile.trace_steps < 1:
        raise refuse("profile.trace_steps", profile.trace_steps, "use an integer >= 1")
    if not 0 <= profile.tolerance < 1:
        raise refuse("profile.tolerance", profile.tolerance, "use a share of the best throughput in [0, 1)")
    for key, minimum, allowed in (("batch_sizes", 1, "batch sizes >= 1"),
                                  ("num_workers", -1, "worker counts >= 0 (-1: one per CPU core)")):
        values = profile[key]
        if values is None:
            continue
        values = list(values)
        if not values or not all(is_int(v) and v >= minimum for v in values):
            raise refuse(f"profile.{key}", values, f"use a list of {allowed}, e.g. [1,2,4,8], or null")
        if len(set(values)) != len(values):
            raise refuse(f"profile.{key}", values, "name each value once")
    if profile.mode == "latency" and profile.batch_sizes is not None and list(profile.batch_sizes) != [1]:
        raise refuse("profile.batch_sizes", list(profile.batch_sizes),
                     "latency mode runs batch size 1, as live use does; use profile.mode=infer to sweep "
                     "batch sizes")
