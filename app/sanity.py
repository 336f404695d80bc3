"""`sanity_check=true`: check the install, the input and output folders and the device, then exit."""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Dict

from omegaconf import DictConfig

from app.errors import UserError

log = logging.getLogger("thresher")

LISTED_AT_MOST = 1000


def sanity_check(cfg: DictConfig, run_dir: Path, device) -> Dict[str, str]:
    import PIL
    import torch
    import torchvision

    from app.data.scan import IMAGE_EXTENSIONS, resolve_input_dir
    from app.data.sources import source_for
    from app.data.video import VIDEO_EXTENSIONS

    checks = {"torch": torch.__version__, "torchvision": torchvision.__version__, "pillow": PIL.__version__}

    # A folder or a bucket alike; a bucket is only listed as far as the first page or so.
    source = source_for(resolve_input_dir(cfg.data))
    if not source.exists() or (not source.is_url and not os.access(str(source), os.R_OK | os.X_OK)):
        raise UserError(f"sanity check: input {source} is not there or not readable")
    n_files = 0
    usable = (found for found in source.list_files(IMAGE_EXTENSIONS | VIDEO_EXTENSIONS) if found.problem is None)
    for n_files, _ in enumerate(usable, start=1):
        if source.is_url and n_files >= LISTED_AT_MOST:
            break
    if n_files == 0:
        raise UserError(f"sanity check: no images or videos under {source}")
    counted = f"at least {n_files}" if source.is_url and n_files >= LISTED_AT_MOST else str(n_files)
    checks["input"] = f"{source}: {counted} images and videos"

    try:
        with tempfile.NamedTemporaryFile(dir=run_dir.parent, prefix=".thresher-write-test-"):
            pass
    except OSError as error:
        raise UserError(f"sanity check: output folder {run_dir.parent} is not writable ({error})") from None
    checks["output"] = f"{run_dir.parent}: writable"

    if cfg.executor.name == "ray":
        checks["ray"] = ray_check(cfg, run_dir.parent)

    probe = torch.ones(8, 8, device=device)
    if float((probe @ probe).sum()) != 512.0:
        raise UserError(f"sanity check: a matrix product on {device} gave a wrong result")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    checks["device"] = f"{device} ({name})"
    for key, value in checks.items():
        log.info("sanity check: %-11s ok  %s", key, value)
    log.info("sanity check passed")
    return checks


def ray_check(cfg: DictConfig, work_dir: Path) -> str:
    """executor=ray: the cluster answers, and its workers see the work_dir where this machine does."""
    from dataclasses import replace

    from app.executors import executor_for
    from app.executors.ray_session import connect, shared_file

    resources = connect(cfg.ray)
    executor = replace(executor_for(cfg), scratch_dir=work_dir)
    with shared_file(executor, "thresher-ray-check", lambda path: path.write_bytes(b"thresher")):
        pass
    return (f"{resources.nodes} node(s), {resources.cpus:g} CPUs, {resources.gpus:g} GPUs; "
            f"the workers see {work_dir}")
