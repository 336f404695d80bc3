"""One torchrun worker of a distributed training run: `python -m app.train.worker RUN_DIR CONFIG`.

app.train.distributed starts torchrun with this module; each worker joins the process group, runs
the same `fit` with its rank, and its node's first worker reports the result (rank 0 evaluates,
saves and logs). Kept apart from the launcher so that the training loop, which launches, and the
worker, which runs the loop, do not import each other.
"""
from __future__ import annotations

import logging
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import List

from omegaconf import OmegaConf

from app import atomic
from app.artifacts import HYDRA_LOG
from app.data.sources import configure_storage_for
from app.errors import UserError, print_error
from app.lifecycle import Interrupted, install_signal_handlers, seed_everything
from app.train.distributed import result_path


def configure_worker_logging(run_dir: Path, rank: int) -> None:
    from app.secrets import install_redaction, register_environment_secrets

    register_environment_secrets()
    formatter = logging.Formatter(f"[%(asctime)s][rank {rank}][%(levelname)s] - %(message)s")
    logger = logging.getLogger("thresher")
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    handlers = [logging.StreamHandler(sys.stdout)]
    if rank == 0:
        handlers.append(logging.FileHandler(run_dir / HYDRA_LOG))
    for handler in handlers:
        handler.setFormatter(formatter)
        logger.addHandler(handler)
    install_redaction()


def worker_main(argv: List[str]) -> int:
    """One torchrun worker: join the process group, train, report (rank 0)."""
    import torch
    import torch.distributed as dist

    from app.config import register_resolvers
    from app.train.loop import fit

    run_dir, config_path = Path(argv[0]), Path(argv[1])
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    configure_worker_logging(run_dir, rank)
    register_resolvers()
    cfg = OmegaConf.load(config_path)
    configure_storage_for(cfg)
    if cfg.hardware.device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    backend = cfg.hardware.ddp_backend or ("nccl" if device.type == "cuda" else "gloo")
    install_signal_handlers()
    dist.init_process_group(backend=backend)
    try:
        seed_everything(cfg.seed)
        result = fit(cfg, run_dir, device, rank=rank, world_size=world_size)
        if local_rank == 0:
            atomic.write_json(result_path(run_dir, int(os.environ.get("GROUP_RANK", 0))), asdict(result))
        return 0
    except Interrupted as stop:
        return 128 + stop.signum
    except UserError as error:
        print_error(str(error))
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
