"""The Hydra callback of `+experiment=selection_benchmark`: gathers the sweep into benchmark.csv,
benchmark.md and learning_curve.png (app.benchmark.aggregate) in the sweep directory.

It gathers after every job that runs on this machine (so the table grows while the sweep runs,
and is complete even when a failed job makes Hydra end the sweep with an error, which skips
on_multirun_end), and once more when the sweep ends. With hydra/launcher=docker the jobs run in
containers and only this process's on_multirun_end sees them; a sweep that ends in an error is
gathered when this process exits. Gathering never fails a job or the sweep: a problem is logged.
"""
from __future__ import annotations

import atexit
import logging
from pathlib import Path
from typing import Any, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger("thresher")


def sweep_dir_of(config: DictConfig) -> Optional[Path]:
    try:
        return Path(str(config.hydra.sweep.dir)).absolute()
    except Exception:  # no hydra node, or an interpolation that cannot resolve here
        return None


class SelectionBenchmark(Callback):
    def __init__(self, plot: bool = True) -> None:
        self.plot = plot
        self._pending: Optional[Path] = None  # a sweep not yet gathered at its end

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._pending = sweep_dir_of(config)
        atexit.register(self._gather_if_pending)

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        from hydra.types import RunMode

        if config.hydra.get("mode") != RunMode.MULTIRUN:
            return  # a single run (a job inside a container of the docker launcher too): no sweep here
        sweep_dir = sweep_dir_of(config)
        if sweep_dir is not None:
            self.gather(sweep_dir, announce=False)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = sweep_dir_of(config) or self._pending
        self._pending = None
        if sweep_dir is not None:
            self.gather(sweep_dir, announce=True)

    def _gather_if_pending(self) -> None:
        if self._pending is not None:
            sweep_dir, self._pending = self._pending, None
            self.gather(sweep_dir, announce=True)

    def gather(self, sweep_dir: Path, announce: bool) -> None:
        from app.benchmark.aggregate import aggregate

        try:
            benchmark = aggregate(sweep_dir, plot=self.plot)
        except Exception as error:  # a benchmark table must never fail the sweep it describes
            log.warning("selection benchmark: could not gather %s: %s", sweep_dir, error)
            return
        if announce:
            print(benchmark.markdown, flush=True)
            print(f"selection benchmark: {', '.join(str(path) for path in benchmark.files)}", flush=True)
