"""Where the selection pipeline's heavy work runs: in this process and its worker processes
(`executor=local`, the default), or on a Ray cluster (`executor=ray`: app/executors/ray_*.py).

The stages ask `executor_for(cfg, run_dir)` and write the same artifacts either way; only the
loops over images (scan's checks, embed's model) and the coreset's distance work move. Importing
this package imports neither torch nor ray.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

EXECUTORS = ("local", "ray")


@dataclass(frozen=True)
class Executor:
    """`name`: local or ray; `ray`: cfg.ray (the cluster address and resources); `scratch_dir`: a
    folder of the run directory that every Ray worker sees too (the coreset's shard file goes there)."""
    name: str = "local"
    ray: Any = None
    scratch_dir: Optional[Path] = None

    @property
    def on_ray(self) -> bool:
        return self.name == "ray"


LOCAL = Executor()


def executor_for(cfg: Any, run_dir: Optional[Path] = None) -> Executor:
    """The run's executor (cfg.executor.name), with its cluster settings."""
    executor = cfg.get("executor") if hasattr(cfg, "get") else None
    name = str(executor.name) if executor is not None else "local"
    if name != "ray":
        return LOCAL
    return Executor("ray", cfg.ray, None if run_dir is None else Path(run_dir) / "data")
