"""Training on several processes: DDP through torchrun, which thresher starts itself.

The run's own process does everything else (scan, embed, select, the summary) and then, when
`hardware.nproc_per_node` or `hardware.nnodes` asks for more than one process, starts
`python -m torch.distributed.run ... -m app.train.worker RUN_DIR CONFIG` and waits. Each worker
runs the same `fit` with its rank; rank 0 evaluates, saves and logs. SIGTERM/SIGINT to thresher
is passed on to torchrun, which passes it to the workers; they stop at the same step.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, OmegaConf

from app import atomic
from app.artifacts import HYDRA_LOG, WORKER_CONFIG, WORKER_RESULT
from app.errors import UserError
from app.lifecycle import Interrupted
from app.secrets import redact

log = logging.getLogger("thresher")


def result_path(run_dir: Path, node_rank: int) -> Path:
    """Each node's first worker reports to its own node's thresher."""
    return run_dir / WORKER_RESULT.format(node=f".node{node_rank}" if node_rank else "")


def processes_per_node(hardware: DictConfig, device) -> int:
    import torch

    if hardware.nproc_per_node != -1:
        return int(hardware.nproc_per_node)
    return max(torch.cuda.device_count(), 1) if device.type == "cuda" else 1


def torchrun_command(hardware: DictConfig, nproc: int, run_dir: Path, config_path: Path) -> List[str]:
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               f"--nnodes={hardware.nnodes}"]
    if hardware.nnodes > 1:
        command += ["--rdzv-backend=c10d", f"--rdzv-endpoint={hardware.rdzv_endpoint}",
                    f"--rdzv-id={hardware.rdzv_id}", f"--node-rank={hardware.node_rank}"]
    else:
        command += ["--standalone"]
    return command + ["-m", "app.train.worker", str(run_dir), str(config_path)]


def launch_if_distributed(cfg: DictConfig, run_dir: Path, device) -> Optional[Dict[str, Any]]:
    """Run training under torchrun and return its result's fields; None when one process will do."""
    import torch

    nproc = processes_per_node(cfg.hardware, device)
    if nproc <= 1 and cfg.hardware.nnodes == 1:
        return None
    if device.type == "cuda" and nproc > torch.cuda.device_count():
        raise UserError(f"hardware.nproc_per_node={nproc} but {torch.cuda.device_count()} GPU(s) are visible: "
                        f"use at most that many, or -1 for one per GPU")
    config_path = run_dir / WORKER_CONFIG.format(node=f".node{cfg.hardware.node_rank}" if cfg.hardware.node_rank else "")
    # Unresolved: ${secret:NAME} stays a reference that each worker resolves from the environment
    # it inherits, so no secret value is written to disk.
    atomic.write_text(config_path, redact(OmegaConf.to_yaml(cfg, resolve=False)))
    own_result = result_path(run_dir, cfg.hardware.node_rank)
    own_result.unlink(missing_ok=True)
    command = torchrun_command(cfg.hardware, nproc, run_dir, config_path)
    log.info("train: starting %d processes on this node (of %d node(s)) with torchrun", nproc, cfg.hardware.nnodes)
    process = subprocess.Popen(command, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        code = process.wait()
    except Interrupted:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
        raise
    if code in (128 + signal.SIGTERM, 128 + signal.SIGINT, -signal.SIGTERM, -signal.SIGINT):
        raise Interrupted(signal.SIGTERM if abs(code) in (signal.SIGTERM, 128 + signal.SIGTERM) else signal.SIGINT)
    if code != 0 or not own_result.is_file():
        raise RuntimeError(f"distributed training failed (torchrun exit code {code}); the workers' errors are above "
                           f"and in {run_dir / HYDRA_LOG}")
    result = json.loads(own_result.read_text())
    own_result.unlink()
    config_path.unlink(missing_ok=True)
    return result
