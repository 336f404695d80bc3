"""`sanity_check=true`: check the install, the input and output folders and the device, then exit."""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Dict

from omegaconf import DictConfig

from app.config import UserError

log = logging.getLogger("thresher")


def sanity_check(cfg: DictConfig, run_dir: Path, device) -> Dict[str, str]:
    import PIL
    import torch
    import torchvision

    from app.data.scan import list_images, resolve_input_dir

    checks = {"torch": torch.__version__, "torchvision": torchvision.__version__, "pillow": PIL.__version__}

    input_dir = resolve_input_dir(cfg.data)
    if not os.access(input_dir, os.R_OK | os.X_OK):
        raise UserError(f"sanity check: input folder {input_dir} is not readable")
    n_images = len(list_images(input_dir))
    if n_images == 0:
        raise UserError(f"sanity check: no images under {input_dir}")
    checks["input"] = f"{input_dir}: {n_images} images"

    try:
        with tempfile.NamedTemporaryFile(dir=run_dir.parent, prefix=".thresher-write-test-"):
            pass
    except OSError as error:
        raise UserError(f"sanity check: output folder {run_dir.parent} is not writable ({error})") from None
    checks["output"] = f"{run_dir.parent}: writable"

    probe = torch.ones(8, 8, device=device)
    if float((probe @ probe).sum()) != 512.0:
        raise UserError(f"sanity check: a matrix product on {device} gave a wrong result")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    checks["device"] = f"{device} ({name})"
    for key, value in checks.items():
        log.info("sanity check: %-11s ok  %s", key, value)
    log.info("sanity check passed")
    return checks
