"""Training checkpoints: everything needed to continue exactly where a run stopped.

last.pt holds the model, optimizer, scheduler and AMP scaler states, the position (epoch and
batch), every RNG state and the metric history. best.pt and the epoch_NNN.pt snapshots hold the
weights and what they mean, without the optimizer's state (for resnet18 under AdamW that is two
thirds of the file), unless trainer.save_optimizer_state=true. Each is written atomically (a temp file renamed),
so a kill while saving leaves the previous one whole; one that is damaged anyway is refused with
a clear message instead of being loaded halfway.
"""
from __future__ import annotations

import os
import random
import threading
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from app import atomic
from app.artifacts import LAST
from app.errors import UserError

REQUIRED_KEYS = ("model", "optimizer", "epoch", "batch", "rng", "task", "model_name", "classes")


# best.pt is for using the model: the weights and what they mean, without the optimizer.
INFERENCE_KEYS = ("model", "epoch", "task", "model_name", "classes", "num_keypoints", "image_size", "best", "config")


def for_inference(state: Dict[str, Any]) -> Dict[str, Any]:
    return {key: state[key] for key in INFERENCE_KEYS if key in state}


def for_snapshot(state: Dict[str, Any], save_optimizer_state: bool) -> Dict[str, Any]:
    """What best.pt and epoch_NNN.pt keep of the training state: the weights for using the model
    (model.weights=PATH, scorer.checkpoint=PATH), or with `save_optimizer_state` all of it, so that
    training can continue from that epoch (copied to last.pt)."""
    return state if save_optimizer_state else for_inference(state)


def rng_state() -> Dict[str, Any]:
    numpy_state = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"keys": torch.from_numpy(numpy_state[1].astype(np.int64)), "pos": int(numpy_state[2]),
                       "has_gauss": int(numpy_state[3]), "cached_gaussian": float(numpy_state[4])}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(_as_tuple(state["python"]))
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state(("MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value):
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def save(path: Path, state: Dict[str, Any]) -> None:
    """Atomically. torch.save writes through our file object, so a full disk is an OSError naming
    the checkpoint, not a RuntimeError from torch's zip writer."""
    with atomic.atomic_path(path) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_TRUNC)
        try:
            torch.save(state, _WholeWrites(fd))
        except (OSError, RuntimeError) as error:
            # torch's writer may hide our OSError behind its own RuntimeError when it closes
            cause = error
            while cause is not None and not isinstance(cause, OSError):
                cause = cause.__context__
            if cause is None:
                raise
            raise OSError(cause.errno, cause.strerror or str(cause), str(path)) from error
        finally:
            os.close(fd)


class _WholeWrites:
    """A file whose write() writes every byte or raises: torch's zip writer takes a short write on
    a nearly full disk for corruption ("unexpected pos") instead of the OSError it is."""

    def __init__(self, fd: int):
        self.fd = fd

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        while view:
            view = view[os.write(self.fd, view):]
        return len(data) if isinstance(data, (bytes, bytearray)) else memoryview(data).nbytes

    def flush(self) -> None:
        pass


def _on_cpu(value):
    """A copy of every tensor on the CPU, so training can go on changing the originals."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _on_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_on_cpu(v) for v in value)
    return value


class BackgroundSaver:
    """Writes checkpoints on a thread while training goes on: the state is copied first (tens of
    milliseconds), the write (hundreds for a ResNet with its optimizer) overlaps the next epoch.
    One write at a time; `wait` before reading, before a stop, and at the end."""

    def __init__(self) -> None:
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None

    def save(self, files: List[Tuple[Path, Dict[str, Any]]], background: bool = True) -> None:
        """Write each (path, state), in order; the states are copied before this returns."""
        self.wait()
        snapshots = [(path, _on_cpu(state)) for path, state in files]

        def write() -> None:
            for path, snapshot in snapshots:
                save(path, snapshot)

        if not background:
            write()
            return

        def write_in_background() -> None:
            try:
                write()
            except BaseException as error:  # raised in the training thread at the next wait
                self._error = error

        self._thread = threading.Thread(target=write_in_background, name="save checkpoints", daemon=False)
        self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error


def load(path: Path) -> Dict[str, Any]:
    """A checkpoint whole, or UserError saying what is wrong with it and what to do."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise UserError(f"{path} is damaged and was not loaded ({type(error).__name__}: "
                        f"{str(error).splitlines()[0][:160]}): delete it to train from the start, or put "
                        f"back a good copy") from None
    missing = [key for key in REQUIRED_KEYS if not isinstance(state, dict) or key not in state]
    if missing and isinstance(state, dict) and set(state) <= set(INFERENCE_KEYS) and "model" in state:
        raise UserError(f"{path} holds the weights without the optimizer state (best.pt and epoch_NNN.pt do, "
                        f"unless trainer.save_optimizer_state=true), so training cannot continue from it: "
                        f"start from its weights with model.weights={path} in a new run_directory")
    if missing:
        raise UserError(f"{path} is not a thresher training checkpoint (missing {', '.join(missing)}): "
                        f"delete it to train from the start")
    return state


def check_compatible(state: Dict[str, Any], task: str, model_name: str, classes, path: Path) -> None:
    """Resuming into another model or label set would load nonsense: refuse it."""
    for key, wanted in (("task", task), ("model_name", model_name), ("classes", list(classes))):
        if state[key] != wanted:
            shown = state[key] if key != "classes" else f"{len(state[key])} classes"
            now = wanted if key != "classes" else f"{len(wanted)} classes"
            raise UserError(f"{path} was saved for {key} {shown!r}, this run has {now!r}: choose another "
                            f"run_directory, or overwrite=true to start this one again")


def latest(run_dir: Path) -> Optional[Path]:
    path = run_dir / LAST
    return path if path.is_file() else None
