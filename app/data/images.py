"""Images as a torch Dataset for the embed and train stages. A file that fails to decode is
skipped and reported with the batch, never raised, so one bad file cannot end a run."""
from __future__ import annotations

import io
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def image_transform(image_size: int, train: bool = False) -> v2.Compose:
    """Square resize (as lightly-embed does) and ImageNet normalisation; a flip when training."""
    steps = [v2.ToImage(), v2.Resize((image_size, image_size), antialias=True)]
    if train:
        steps.append(v2.RandomHorizontalFlip())
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return v2.Compose(steps)


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
                generator: Optional[torch.Generator] = None, pin_memory: bool = False):
    from torch.utils.data import DataLoader

    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                      collate_fn=collate_skipping_failures, generator=generator,
                      pin_memory=pin_memory, persistent_workers=False)
