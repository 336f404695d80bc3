"""`hydra/launcher=docker`: the options, registered in Hydra's ConfigStore.

Kept free of heavy imports: Hydra imports every module under hydra_plugins on each start.
"""
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore


@dataclass
class DockerLauncherConf:
    _target_: str = "hydra_plugins.thresher_docker_launcher.docker_launcher.DockerLauncher"
    # The thresher image every job runs in; it must be on the engine already (nothing is pulled).
    image: str = "${oc.env:THRESHER_IMAGE,thresher:latest}"
    # Jobs running at once. null: one per group of gpus_per_job GPUs, or 1 for CPU jobs.
    max_parallel: Optional[int] = None
    # GPUs each job gets through a device request, round-robin over gpu_ids; 0: CPU, no request.
    gpus_per_job: int = 0
    # Host GPU indices (or UUIDs) to hand out; null: every GPU nvidia-smi lists.
    gpu_ids: Optional[List[str]] = None
    # UID:GID inside the container; null: the invoking user's, so the outputs are theirs.
    user: Optional[str] = None
    # Variables passed by NAME from the launcher's environment (a NAME_FILE is mounted read-only
    # instead); values never appear in a command line, a log or a saved config.
    environment: List[str] = field(default_factory=lambda: ["THRESHER_TOKEN"])
    # More bind mounts, "host_path:container_path[:ro]".
    volumes: List[str] = field(default_factory=list)
    labels: Dict[str, str] = field(default_factory=dict)
    shm_size: str = "2g"
    network_mode: Optional[str] = None
    # Seconds a container gets to save its state after SIGTERM before it is killed.
    stop_timeout_s: int = 10
    # Any other keyword argument of docker's containers.create (e.g. {mem_limit: 8g, cpuset_cpus: "0-3"}).
    create_kwargs: Dict[str, Any] = field(default_factory=dict)


ConfigStore.instance().store(group="hydra/launcher", name="docker", node=DockerLauncherConf,
                             provider="thresher")
