"""Images as a torch Dataset for the embed and train stages. A file that fails to decode is
skipped and reported with the batch, never raised, so one bad file cannot end a run."""
from __future__ import annotations

import io
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def image_transform(image_size: int, train: bool = False) -> v2.Compose:
    """Square resize (as lightly-embed does) and ImageNet normalisation; a flip when training."""
    steps = [v2.ToImage(), v2.Resize((image_size, image_size), antialias=True)]
    if train:
        steps.append(v2.RandomHorizontalFlip())
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return v2.Compose(steps)


def square_pixels(image: Image.Image, image_size: int) -> torch.Tensor:
    """The image as uint8 CHW pixels, square-resized exactly as `image_transform` resizes (the same
    resize on the same uint8 pixels). Kept uint8 so that loader workers send a quarter of the bytes
    and the float conversion happens once per batch (`normalize_pixels`), not once per image."""
    return F.resize_image(F.pil_to_tensor(image), [image_size, image_size], antialias=True)


def normalize_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """A uint8 N×3×H×W batch scaled and ImageNet-normalised as `image_transform` does one image
    (the same float operations, so the same values), on whatever device the batch is on."""
    mean = torch.tensor(IMAGENET_MEAN, device=pixels.device).view(1, -1, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=pixels.device).view(1, -1, 1, 1)
    return pixels.to(torch.float32).mul_(1.0 / 255).sub_(mean).div_(std)


def open_image(root: Union[Path, str], name: str) -> Image.Image:
    """The RGB image `name` under `root`: the one place stages read an input image.

    `root` is a folder or a bucket URL; `name` is an image file, or a video frame named as lightly
    names them (`drive-042-mp4.png`: frame 42 of drive.mp4), decoded from the video (each thread
    keeps a few videos open, so reading frames in order decodes each frame once).
    """
    from app.data.sources import source_for
    from app.data.video import parse_frame_name, read_frame

    source = source_for(root)
    frame = parse_frame_name(name)
    if frame is not None and (source.is_url or not source.local_path(name).is_file()):
        video, number = frame
        opener = (lambda: source.open(video)) if source.is_url else (lambda: str(source.local_path(video)))
        return read_frame(f"{source.location}/{video}", opener, number).convert("RGB")
    handle = io.BytesIO(source.read_bytes(name)) if source.is_url else source.open(name)
    with handle, Image.open(handle) as image:
        return as_rgb(image)


def as_rgb(image: Image.Image) -> Image.Image:
    """The image (the first frame of an animated GIF or multi-page TIFF) in RGB. A palette image
    with a transparent colour goes through RGBA, as Pillow asks (it warns otherwise)."""
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")


class ImageFiles(Dataset):
    """(image tensor or None, label, index, error or None) for each file name under `root`."""

    def __init__(self, root: Union[Path, str], files: Sequence[str], labels: Sequence[int], transform):
        # A bucket URL stays a string: Path would make s3://bucket/prefix s3:/bucket/prefix.
        self.root, self.files, self.labels, self.transform = root, list(files), list(labels), transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        try:
            tensor = self.transform(open_image(self.root, self.files[index]))
            return tensor, self.labels[index], index, None
        except Exception as error:  # decoded fine at scan time, or the check was off
            return None, self.labels[index], index, f"{type(error).__name__}: {error}"


class PackedNames:
    """File names in one UTF-8 buffer with offsets: a loader worker reads a name without touching
    a Python object per file, so the forked worker's memory does not grow by a copy of every
    name's page (which touching a list of a million str objects does)."""

    def __init__(self, names: Sequence[str]):
        buffer = io.BytesIO()
        lengths = np.fromiter((buffer.write(name.encode("utf-8", "surrogateescape")) for name in names),
                              dtype=np.int64, count=len(names))
        self.offsets = np.concatenate([[0], np.cumsum(lengths)])
        self.buffer = buffer.getvalue()

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> str:
        return self.buffer[self.offsets[index]:self.offsets[index + 1]].decode("utf-8", "surrogateescape")


class ImagesToEmbed(Dataset):
    """(uint8 pixels or None, index, error or None) for each file name under `root`: the embed
    stage's input, resized in the loader and normalised a batch at a time (`normalize_pixels`)."""

    def __init__(self, root: Union[Path, str], files: Sequence[str], image_size: int):
        self.root, self.names, self.image_size = root, PackedNames(files), image_size

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int):
        try:
            return square_pixels(open_image(self.root, self.names[index]), self.image_size), index, None
        except Exception as error:  # decoded fine at scan time, or the check was off
            return None, index, f"{type(error).__name__}: {error}"


def collate_pixels(batch) -> Tuple[torch.Tensor, torch.Tensor, List[Tuple[int, str]]]:
    """(uint8 pixels, their indices, (index, error) of the images that failed) for a batch."""
    good = [item for item in batch if item[0] is not None]
    failures = [(item[1], item[2]) for item in batch if item[0] is None]
    pixels = torch.stack([item[0] for item in good]) if good else torch.empty(0, dtype=torch.uint8)
    return pixels, torch.tensor([item[1] for item in good], dtype=torch.long), failures


def collate_skipping_failures(batch) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                             List[Tuple[int, str]]]:
    good = [item for item in batch if item[0] is not None]
    failures = [(item[2], item[3]) for item in batch if item[0] is None]
    if not good:
        empty = torch.empty(0)
        return empty, empty.long(), empty.long(), failures
    images = torch.stack([item[0] for item in good])
    labels = torch.tensor([item[1] for item in good], dtype=torch.long)
    indices = torch.tensor([item[2] for item in good], dtype=torch.long)
    return images, labels, indices, failures


def make_loader(dataset: Dataset, batch_size: int, num_workers: int, shuffle: bool = False,
                generator: Optional[torch.Generator] = None, pin_memory: bool = False,
                collate=collate_skipping_failures):
    """A DataLoader; its workers run torch with one thread each (DataLoader sets that), so they
    do not fight the main process's compute threads for the cores."""
    from torch.utils.data import DataLoader

    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                      collate_fn=collate, generator=generator,
                      pin_memory=pin_memory, persistent_workers=False)
