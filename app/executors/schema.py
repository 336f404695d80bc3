"""The executor's schema (`executor=local|ray`) and the Ray cluster's keys (`ray.*`), with their
checks. No ray import: a config is checked before anything heavy loads."""
from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from typing import Optional

from omegaconf import DictConfig

from app.config_checks import refuse
from app.errors import UserError
from app.executors import EXECUTORS

# ray.init's address forms for a driver on a cluster node: auto (the cluster this machine joined
# with `ray start`) or the head's GCS host:port. Not Ray Client (ray://): Ray Data does not run
# through it (ray-project/ray#48682).
RAY_ADDRESS = re.compile(r"^(auto|[A-Za-z0-9_.\-\[\]:]+:\d+)$")
ON_A_NODE = ("run thresher on a node of the cluster (`ray start --address=HEAD:6379`, then ray.address=auto), as "
             "docker-compose.ray.yml's thresher service does")


@dataclass
class ExecutorConfig:
    # local: this process and its worker processes; ray: a Ray cluster (the ray.* keys).
    name: str = "local"


@dataclass
class RayConfig:
    """The Ray cluster that `executor=ray` runs scan, embed and the coreset on."""
    # null: start a Ray on this machine for the run (stopped at its end); auto: the cluster this
    # machine joined (`ray start --address=HEAD:6379`); HEAD:6379: that cluster's head. Not ray://
    # (Ray Client): Ray Data does not run through it.
    address: Optional[str] = None
    # CPUs of a Ray started for the run (address=null); null: every core.
    num_cpus: Optional[int] = None
    # CPUs per scan-check and image-decode task.
    num_cpus_per_task: float = 1.0
    # CPUs per embedding actor (its torch threads) and per coreset actor.
    num_cpus_per_actor: float = 1.0
    # GPUs per embedding actor; null: 1 when the cluster has GPUs, else 0.
    num_gpus_per_actor: Optional[float] = None
    # Embedding actors (one model each); null: one per GPU share, or on CPUs as many as leave
    # num_cpus_per_task free for decoding.
    embed_actors: Optional[int] = None
    # Actors that hold a shard of the embeddings for the coreset; null: 2.
    coreset_actors: Optional[int] = None
    # Images per Ray Data block in the embed stage (Ray's cost is per block; the model still takes
    # sampler.batch_size at a time); at least sampler.batch_size.
    block_images: int = 256


def ray_installed() -> bool:
    return importlib.util.find_spec("ray") is not None


def validate_executor(executor: DictConfig, ray: DictConfig) -> None:
    if executor.name not in EXECUTORS:
        raise refuse("executor.name", executor.name, f"choose from {', '.join(EXECUTORS)}", EXECUTORS)
    if executor.name != "ray":
        return
    if not ray_installed():
        raise UserError("executor=ray needs Ray on this machine and on the cluster: pip install 'thresher[ray]' "
                        "(the image: docker build --build-arg EXTRAS=ray)")
    if ray.address is not None and str(ray.address).startswith("ray://"):
        raise refuse("ray.address", ray.address, f"Ray Data, which executor=ray runs on, does not work through "
                     f"Ray Client (ray://): {ON_A_NODE}")
    if ray.address is not None and not RAY_ADDRESS.match(str(ray.address)):
        raise refuse("ray.address", ray.address, "use null (a Ray started for the run), auto (the cluster this "
                     "node joined), or the head's host:6379")
    if ray.num_cpus is not None and ray.num_cpus < 1:
        raise refuse("ray.num_cpus", ray.num_cpus, "use an integer >= 1, or null for every core")
    if ray.num_cpus is not None and ray.address is not None:
        raise refuse("ray.num_cpus", ray.num_cpus, "it sizes a Ray started for the run (ray.address=null); "
                     "a cluster's CPUs are set by `ray start --num-cpus`")
    for key in ("num_cpus_per_task", "num_cpus_per_actor"):
        if not ray[key] > 0:
            raise refuse(f"ray.{key}", ray[key], "use a number > 0")
    if ray.num_gpus_per_actor is not None and ray.num_gpus_per_actor < 0:
        raise refuse("ray.num_gpus_per_actor", ray.num_gpus_per_actor, "use a number >= 0, or null (1 with GPUs)")
    if ray.block_images < 1:
        raise refuse("ray.block_images", ray.block_images, "use an integer >= 1")
    for key in ("embed_actors", "coreset_actors"):
        if ray[key] is not None and ray[key] < 1:
            raise refuse(f"ray.{key}", ray[key], "use an integer >= 1, or null")
