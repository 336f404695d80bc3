"""The run's connection to Ray: one `ray.init` per process, quiet, and the cluster's resources.

`ray.address=null` starts a Ray on this machine for the run (stopped when the run ends); `auto`
(or the head's host:6379) joins the cluster this node belongs to. The driver must be a node of the
cluster (`ray start --address=...`): Ray Data does not run through Ray Client. Workers import
thresher themselves: they must have the same thresher installed (the image, or the same venv) and
see the input and the run directory at the same paths.
"""
from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from app.errors import UserError

log = logging.getLogger("thresher")

_connected_to: Optional[str] = None


@dataclass(frozen=True)
class ClusterResources:
    cpus: float
    gpus: float
    nodes: int


def connect(ray_cfg: Any) -> ClusterResources:
    """ray.init once for this process with cfg.ray's settings; the cluster's total resources."""
    global _connected_to
    import ray

    address = None if ray_cfg is None else ray_cfg.get("address")
    new = not ray.is_initialized()
    if new:
        _quiet_ray()
        options = dict(address=address, logging_level=logging.WARNING, log_to_driver=True,
                       configure_logging=True, ignore_reinit_error=True)
        if address is None:
            options.update(num_cpus=ray_cfg.get("num_cpus") if ray_cfg is not None else None,
                           include_dashboard=False)
        if address not in (None, "auto"):
            _check_reachable(str(address))
        try:
            with thresher_keeps_its_signal_handlers():
                ray.init(**options)
        except ConnectionError as error:
            raise UserError(f"ray.address={address!r}: cannot reach the Ray cluster ({_first_line(error)}); "
                            f"start it first (`ray start --head`, or docker-compose -f docker-compose.ray.yml up)"
                            ) from None
        _connected_to = address or "a Ray started for this run"
        _quiet_ray()  # again: ray.init sets up its own loggers
        _configure_ray_data()
        if address is not None:
            release_an_orphaned_actor_tracker()
    resources = ray.cluster_resources()
    nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
    found = ClusterResources(float(resources.get("CPU", 0)), float(resources.get("GPU", 0)), nodes)
    if new:
        log.info("ray: %s: %d node(s), %g CPUs, %g GPUs", _connected_to, found.nodes, found.cpus, found.gpus)
    return found


@contextmanager
def shared_file(executor: Any, name: str, write: Callable[[Path], None]) -> Iterator[Path]:
    """A file in the run directory that the Ray workers read (the coreset's points, the embedding
    model's weights): written atomically, checked to be visible to the workers at the same path,
    removed afterwards. The workers must see the run directory: a shared volume in a cluster."""
    import ray

    folder = executor.scratch_dir
    if folder is None:
        raise ValueError("shared_file needs the run directory (executor_for(cfg, run_dir))")
    path = Path(folder) / f".{name}"
    temp = path.with_name(f".tmp-{os.getpid()}-{name}")  # the same suffix: np.save adds .npy to others
    try:
        write(temp)
        os.replace(temp, path)
        connect(executor.ray)
        size = path.stat().st_size
        seen = ray.get(ray.remote(num_cpus=0)(_size_of).remote(str(path)))
        if seen != size:
            raise UserError(f"executor=ray: the Ray workers do not see the run directory at {path.parent} "
                            f"({'no such file' if seen is None else f'{seen} bytes, not {size}'} there): mount "
                            f"the work_dir at the same path on every node (docker-compose.ray.yml shows how)")
        yield path
    finally:
        for leftover in (temp, path):
            try:
                leftover.unlink()
            except FileNotFoundError:
                pass


def _size_of(path: str) -> Optional[int]:
    try:
        return os.stat(path).st_size
    except OSError:
        return None


@contextmanager
def thresher_keeps_its_signal_handlers() -> Iterator[None]:
    """A Ray started here registers its own SIGTERM handler (it kills Ray's processes and exits 1),
    which would replace the run's: `docker stop` must still stop the run at a step boundary, record
    it as interrupted and exit 143 (the run's `finally` then stops Ray)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    kept = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for number, handler in kept.items():
            if handler is not None:
                signal.signal(number, handler)


def _check_reachable(address: str, timeout_s: float = 10.0) -> None:
    """Refuse an address nothing listens on at once: ray.init would retry it for minutes."""
    import socket

    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise UserError(f"ray.address={address!r}: cannot reach the Ray cluster ({reason}); start it first "
                        f"(`ray start --head`, or docker-compose -f docker-compose.ray.yml up), or use "
                        f"ray.address=null for a Ray on this machine") from None


def disconnect() -> None:
    """Leave the cluster if `connect` joined it (a Ray started for the run stops with it); nothing
    when the run never used Ray, or runs inside a Ray worker (hydra/launcher=ray), whose
    connection is the worker's own."""
    global _connected_to
    import sys

    ray = sys.modules.get("ray")
    if _connected_to is not None and ray is not None and ray.is_initialized():
        ray.shutdown()
    _connected_to = None


def _quiet_ray() -> None:
    """Ray's banners, usage-stats prompt and per-operator progress bars stay out of thresher's log;
    its warnings and errors still come through."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray's C++ core installs a crash handler for SIGTERM that aborts the driver (exit 134) instead of
    # letting thresher stop at a step boundary and record the run as interrupted (exit 143).
    os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")  # no per-dataset INFO lines on the console
    for name in ("ray", "ray.util.client"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _configure_ray_data() -> None:
    from ray.data import DataContext
    from ray.util.debug import log_once

    log_once("ray_data_progress_manager_disabled")  # its note that bars are off: thresher shows its own

    context = DataContext.get_current()
    # The artifacts are in file-name order: results come back in the order the names went in.
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False
    for flag in ("enable_operator_progress_bars", "print_on_execution_start"):
        if hasattr(context, flag):
            setattr(context, flag, False)


# Ray Data's ActorLocationTracker: one detached, named actor per cluster, pinned to the node of the
# first driver that ran an actor pool (ray/data/_internal/execution/node_trackers/actor_location.py).
TRACKER_NAME = TRACKER_NAMESPACE = "ActorLocationTracker"


def release_an_orphaned_actor_tracker(timeout_s: float = 15.0) -> bool:
    """Kill Ray Data's actor tracker when it does not answer, so that this driver's embed stage makes
    a new one on its own node. When the driver that created it was a node of its own (a `docker
    compose run thresher` container) and has gone, the tracker's restarts are pinned to a node that no
    longer exists, and every later driver's actor pool fails with ActorUnschedulableError. A tracker
    that answers (another run's, still alive) is left alone. True when one was killed."""
    import ray

    try:
        tracker = ray.get_actor(TRACKER_NAME, namespace=TRACKER_NAMESPACE)
    except ValueError:
        return False  # none yet: Ray Data creates it on this driver's node
    try:
        ray.get(tracker.get_actor_locations.remote([]), timeout=timeout_s)
        return False
    except (ray.exceptions.RayError, TimeoutError) as error:
        log.info("ray: Ray Data's actor tracker does not answer (%s; its driver's node has gone): "
                 "replacing it", type(error).__name__)
        ray.kill(tracker, no_restart=True)
    # Its name is free once the kill is through; until then ray.get_actor still finds it.
    for _ in range(int(timeout_s * 10)):
        try:
            ray.get_actor(TRACKER_NAME, namespace=TRACKER_NAMESPACE)
        except ValueError:
            break
        time.sleep(0.1)
    return True


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
