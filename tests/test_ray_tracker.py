"""Ray Data's actor tracker, orphaned by a driver node that has gone (the compose cluster's second
`docker compose run thresher` failed its embed stage with ActorUnschedulableError): a joining
driver replaces it, and leaves a healthy one alone."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("ray")
pytestmark = pytest.mark.slow

SCRIPT = textwrap.dedent("""
    import ray
    from ray._raylet import RAY_NODE_ID_KEY
    from ray.data._internal.execution.node_trackers.actor_location import (
        ActorLocationTracker, get_or_create_actor_location_tracker)

    from app.executors.ray_session import TRACKER_NAME, TRACKER_NAMESPACE, release_an_orphaned_actor_tracker

    ray.init(num_cpus=1, include_dashboard=False, logging_level="ERROR")
    print("none:", release_an_orphaned_actor_tracker(timeout_s=3))
    # What a gone driver node leaves: the named tracker, pinned to a node that is not there.
    ActorLocationTracker.options(name=TRACKER_NAME, namespace=TRACKER_NAMESPACE, lifetime="detached",
                                 label_selector={RAY_NODE_ID_KEY: "f" * 56}).remote()
    print("orphan:", release_an_orphaned_actor_tracker(timeout_s=3))
    tracker = get_or_create_actor_location_tracker()
    print("answers:", ray.get(tracker.get_actor_locations.remote(["x"]), timeout=30))
    print("healthy:", release_an_orphaned_actor_tracker(timeout_s=3))
    ray.shutdown()
""")


def test_an_orphaned_ray_data_tracker_is_replaced_and_a_healthy_one_kept():
    process = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert process.returncode == 0, process.stderr[-3000:]
    lines = [line for line in process.stdout.splitlines() if ":" in line]
    assert lines == ["none: False", "orphan: True", "answers: {'x': None}", "healthy: False"], process.stdout
