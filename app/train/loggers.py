"""Where training metrics go: metrics.csv always, TensorBoard or Weights & Biases on request.

metrics.csv is rewritten whole from the history after each epoch, so a resumed run's file has no
duplicate rows. W&B reads WANDB_API_KEY (or WANDB_API_KEY_FILE) from the environment; the key is
registered for redaction and never passed on the command line or written to the run directory.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Optional

from app import atomic
from app.artifacts import METRICS_CSV, TENSORBOARD, WANDB
from app.secrets import read_secret, register_secret

log = logging.getLogger("thresher")


def write_metrics_csv(run_dir: Path, history: List[Dict[str, Any]]) -> None:
    columns: List[str] = []
    for row in history:
        columns += [key for key in row if key not in columns]
    atomic.write_csv(run_dir / METRICS_CSV, columns, ([row.get(c, "") for c in columns] for row in history))


class MetricLoggers:
    """Step losses every `log_every_n_steps` and epoch metrics, to the chosen logger."""

    def __init__(self, run_dir: Path, logger_cfg, config: Dict[str, Any], resume_step: int = 0):
        self.run_dir, self.cfg = run_dir, logger_cfg
        self.every = int(logger_cfg.log_every_n_steps)
        self._tensorboard = None
        self._wandb_run = None
        if logger_cfg.type == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events a killed run wrote past its last checkpoint.
            self._tensorboard = SummaryWriter(str(run_dir / TENSORBOARD), purge_step=resume_step or None)
        elif logger_cfg.type == "wandb":
            self._wandb_run = _start_wandb(run_dir, logger_cfg, config)

    def log_step(self, step: int, values: Dict[str, float]) -> None:
        if step % self.every:
            return
        if self._tensorboard is not None:
            for key, value in values.items():
                self._tensorboard.add_scalar(f"train/{key}", value, step)
        if self._wandb_run is not None:
            self._wandb_run.log({f"train/{k}": v for k, v in values.items()}, step=step)

    def log_epoch(self, step: int, record: Dict[str, Any]) -> None:
        numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k not in ("epoch", "step")}
        if self._tensorboard is not None:
            for key, value in numbers.items():
                self._tensorboard.add_scalar(f"epoch/{key}", value, step)
            self._tensorboard.flush()
        if self._wandb_run is not None:
            self._wandb_run.log({"epoch": record["epoch"], **{f"epoch/{k}": v for k, v in numbers.items()}},
                                step=step)

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb_run is not None:
            self._wandb_run.finish()


def _start_wandb(run_dir: Path, logger_cfg, config: Dict[str, Any]):
    from app.errors import UserError

    key = read_secret("WANDB_API_KEY")
    register_secret(key)
    mode = logger_cfg.mode
    if mode == "online" and not key:
        raise UserError("logger=wandb with logger.mode=online needs WANDB_API_KEY (or WANDB_API_KEY_FILE) in "
                        "the environment; or set logger.mode=offline to log without network")
    try:
        import wandb
    except ImportError:
        raise UserError("logger=wandb needs the wandb package: pip install wandb") from None
    if key:
        os.environ["WANDB_API_KEY"] = key  # read by wandb's own process, never logged by it
    os.environ.setdefault("WANDB_SILENT", "true")
    # A stable id from the run directory: a resumed run continues the same W&B run.
    run_id = "".join(c if c.isalnum() else "-" for c in run_dir.name)[-64:]
    return wandb.init(project=logger_cfg.project, entity=logger_cfg.entity,
                      name=logger_cfg.run_name or run_dir.name, id=run_id, resume="allow", mode=mode,
                      dir=str(run_dir), config=config, settings=wandb.Settings(
                          console="off", save_code=False, disable_git=True, x_disable_meta=True))


def wandb_dir(run_dir: Path) -> Optional[Path]:
    path = run_dir / WANDB
    return path if path.is_dir() else None
