"""`dump_dataset=true`: copy the selected images out, resized and re-encoded as asked."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import List, Optional, Tuple, Union

from PIL import Image

from app import atomic
from app.data.images import open_image
from app.progress import Progress

log = logging.getLogger("thresher")


def resized(image: Image.Image, size: Optional[Tuple[int, ...]]) -> Image.Image:
    if size is None:
        return image
    if len(size) == 2:
        height, width = size
        return image.resize((width, height), Image.Resampling.BICUBIC)
    shorter = size[0]
    scale = shorter / min(image.size)
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                        Image.Resampling.BICUBIC)


def dump_images(input_dir: Union[Path, str], files: List[str], target: Path, size: Optional[Tuple[int, ...]],
                image_format: str) -> List[Tuple[str, str]]:
    """Write each file to target/<same relative path>.<format>; returns (file, reason) failures."""
    image_format = image_format.lower()
    pil_format = {"jpg": "JPEG", "jpeg": "JPEG", "tif": "TIFF"}.get(image_format, image_format.upper())
    failures = []
    with Progress(len(files), "dump") as bar:
        for name in files:
            destination = (target / name).with_suffix(f".{image_format}")
            try:
                # open_image reads folders, video frames and bucket objects alike
                picture = resized(open_image(input_dir, name), size)
                with atomic.atomic_path(destination) as tmp:
                    picture.save(tmp, format=pil_format)
            except Exception as error:  # a file that went bad since the scan: report, go on
                failures.append((name, f"{type(error).__name__}: {error}"))
                log.warning("dump_dataset: %s skipped (%s)", name, error)
            bar.update(1)
    return failures
