"""Turn `hardware.device` into a torch.device, failing clearly when the hardware is not there."""
from __future__ import annotations

from app.errors import UserError


def resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"hardware.device={name!r} but no CUDA device is visible "
                            f"(torch.cuda.is_available() is False): use hardware=cpu or hardware=auto, "
                            f"or give the container a GPU (docker run --gpus all)")
        index = int(name.split(":", 1)[1]) if ":" in name else 0
        count = torch.cuda.device_count()
        if index >= count:
            raise UserError(f"hardware.device={name!r} but only {count} CUDA device(s) are visible: "
                            f"use cuda:0..cuda:{count - 1}")
        return torch.device("cuda", index)
    if name == "mps":
        if not torch.backends.mps.is_available():
            raise UserError("hardware.device='mps' but MPS is not available: use hardware=cpu")
        return torch.device("mps")
    return torch.device("cpu")


def loader_workers(num_workers, device) -> int:
    """DataLoader workers: N is N, -1 is one per available core. None (auto) is one per core, at
    most 8, on an accelerator; on the CPU it is one worker when there are two cores or more, and 0
    on a single core. On the CPU the model's forward takes the cores (torch's intra-op threads) and
    decoding a batch costs a small part of it, so one worker (one torch thread) keeps the next batch
    ready while the main process computes: without it the compute waits for every decode, with more
    the workers take cores from the compute."""
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if num_workers is None:
        if device.type == "cpu":
            return 1 if cores >= 2 else 0
        return min(8, cores)
    if num_workers == -1:
        return cores
    return num_workers
