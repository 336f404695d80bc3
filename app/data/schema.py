"""The data options' schemas (config group `data`) and their checks: the input each format reads,
the model input size and the training augmentations. Importable without torch, like app.config,
which composes these into ThresherConfig and calls validate_data."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from omegaconf import MISSING, DictConfig

from app.config_checks import is_int, refuse
from app.data.locations import URL_PATTERN, URL_PROTOCOLS
from app.errors import UserError

CROP_SAMPLING = ("uniform", "keypoint", "density", "hybrid")
DATA_FORMATS = ("shapes", "folder", "coco", "oxford_pet")


@dataclass
class ResizeConfig:
    # null: data.image_size. keep_ratio scales to fit inside, then pads the rest (DeepLabCut's resize).
    height: Optional[int] = None
    width: Optional[int] = None
    keep_ratio: bool = True


@dataclass
class ColorJitterConfig:
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0


@dataclass
class AugmentConfig:
    """Training augmentations (torchvision.transforms.v2: boxes and keypoints follow the image);
    the names are DeepLabCut's. Validation images are only scaled, resized and padded."""
    resize: ResizeConfig = field(default_factory=ResizeConfig)
    # The first scaling, applied to every image (training and validation).
    global_scale: float = 1.0
    # Images whose longer side, after global_scale, is outside [min, max] are left out of training.
    min_input_size: int = 16
    max_input_size: int = 4096
    # [width, height] of a random crop taken from a crop_ratio share of the images; null: no crop.
    crop_size: Optional[List[int]] = None
    crop_ratio: float = 0.4
    # The crop centre moves by up to this share of the crop size around the sampled point.
    max_shift: float = 0.4
    # uniform: anywhere; keypoint: around a random visible keypoint; density: where annotations
    # are densest; hybrid: one of the three at random.
    crop_sampling: str = "hybrid"
    sharpening: bool = False
    sharpenratio: float = 0.3
    edge: bool = False
    # Probability of a horizontal flip.
    hflip: float = 0.5
    color_jitter: ColorJitterConfig = field(default_factory=ColorJitterConfig)


@dataclass
class DataConfig:
    """What every data option shares: the model input size and the augmentations."""
    name: str = MISSING
    image_size: int = 64
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # This share of the usable images, chosen by a hash of each file name (the same images whatever
    # the seed, sampler or budget), is held out by the scan: never embedded, scored or selected, and
    # the train stage's validation set (data/holdout_files.csv). 0: none held out.
    holdout_fraction: float = 0.0


@dataclass
class ShapesDataConfig(DataConfig):
    name: str = "shapes"
    n_images: int = 960
    shapes_image_size: int = 64
    n_corrupt: int = 0


@dataclass
class FolderDataConfig(DataConfig):
    name: str = "folder"
    input_dir: str = "/data/input"
    # A file naming the images to use, one path per line relative to input_dir; no folder walk.
    relevant_filenames_file: Optional[str] = None
    # A separate labelled folder (class sub-folders, the same classes as input_dir) that the train
    # stage validates on, all of it; never scanned for selection. null: none.
    val_input_dir: Optional[str] = None


@dataclass
class CocoDataConfig(FolderDataConfig):
    """Images under input_dir, boxes and keypoints in a COCO JSON file (file_name relative to it)."""
    name: str = "coco"
    annotations: str = "/data/input/annotations.json"


@dataclass
class OxfordPetDataConfig(DataConfig):
    """The Oxford-IIIT Pet layout: images/, annotations/xmls/ (head boxes), annotations/trainval.txt."""
    name: str = "oxford_pet"
    root: str = "/data/input"
    # species: cat and dog; breed: the 37 breeds.
    classes: str = "species"


def validate_data(data: DictConfig, needs_input: bool) -> None:
    if data.image_size < 16:
        raise refuse("data.image_size", data.image_size, "use an integer >= 16")
    _validate_validation_data(data)
    _validate_augment(data.augment)
    if data.name == "shapes":
        if data.n_images < 3:
            raise refuse("data.n_images", data.n_images, "use an integer >= 3 (one per class)")
        if data.shapes_image_size < 32:
            raise refuse("data.shapes_image_size", data.shapes_image_size, "use an integer >= 32")
        if not 0 <= data.n_corrupt < data.n_images:
            raise refuse("data.n_corrupt", data.n_corrupt,
                         f"use an integer in [0, data.n_images={data.n_images})")
    elif data.name in ("folder", "coco", "oxford_pet"):
        from app.data.inputs import data_inputs  # the paths each format reads, as the scan and the launcher see them

        for path in data_inputs(data):
            if path.url_allowed and path.is_url:
                check_protocol_installed(path.key, path.value)
            elif needs_input and not path.is_there():
                raise refuse(path.key, path.shown(), path.must_be)
        if data.name == "oxford_pet" and data.classes not in ("species", "breed"):
            raise refuse("data.classes", data.classes, "use species or breed", ("species", "breed"))
    else:
        raise refuse("data.name", data.name, f"choose from {', '.join(DATA_FORMATS)}", DATA_FORMATS)


def _validate_validation_data(data: DictConfig) -> None:
    """The held-out share and the separate validation folder: one of them, in range, where the
    data option can label it."""
    fraction = data.get("holdout_fraction") or 0.0
    if not 0 <= fraction < 1:
        raise refuse("data.holdout_fraction", fraction, "use a fraction in [0, 1) (0: nothing held out)")
    val_input_dir = data.get("val_input_dir")
    if not val_input_dir:
        return
    if data.name != "folder":
        raise refuse("data.val_input_dir", val_input_dir, f"data={data.name} takes its labels from its "
                     f"annotations, not from class folders: use data.holdout_fraction instead")
    if fraction > 0:
        raise refuse("data.val_input_dir", val_input_dir, f"data.holdout_fraction={fraction:g} already holds "
                     f"out a validation set: use one of the two (data.holdout_fraction=0 for the folder)")


def has_validation_data(data: DictConfig) -> bool:
    """Whether the train stage validates on images kept apart from the selection: a held-out share
    of the input (data.holdout_fraction) or a separate folder (data.val_input_dir)."""
    return bool((data.get("holdout_fraction") or 0) > 0 or data.get("val_input_dir"))


def validate_validation_split(cfg: DictConfig) -> None:
    """trainer.val_filenames_file splits the selection; with a held-out set or folder the whole
    selection trains, so the two cannot be combined."""
    if has_validation_data(cfg.data) and cfg.trainer.get("val_filenames_file"):
        which = ("data.val_input_dir" if cfg.data.get("val_input_dir")
                 else f"data.holdout_fraction={cfg.data.holdout_fraction:g}")
        raise refuse("trainer.val_filenames_file", cfg.trainer.val_filenames_file,
                     f"{which} gives the validation set and the whole selection trains: drop one of them")


def _validate_augment(augment: DictConfig) -> None:
    key = "data.augment"
    for side in ("height", "width"):
        value = augment.resize[side]
        if value is not None and value < 16:
            raise refuse(f"{key}.resize.{side}", value, "use an integer >= 16, or null for data.image_size")
    if not augment.global_scale > 0:
        raise refuse(f"{key}.global_scale", augment.global_scale, "use a scale > 0")
    if not 1 <= augment.min_input_size <= augment.max_input_size:
        raise refuse(f"{key}.min_input_size", augment.min_input_size,
                     f"use an integer in [1, data.augment.max_input_size={augment.max_input_size}]")
    if augment.crop_size is not None:
        crop = list(augment.crop_size)
        if len(crop) != 2 or not all(is_int(v) and v >= 8 for v in crop):
            raise refuse(f"{key}.crop_size", crop, "use [width, height] (integers >= 8), or null for no crop")
    for name in ("crop_ratio", "sharpenratio", "hflip"):
        if not 0 <= augment[name] <= 1:
            raise refuse(f"{key}.{name}", augment[name], "use a probability in [0, 1]")
    if not 0 <= augment.max_shift <= 1:
        raise refuse(f"{key}.max_shift", augment.max_shift, "use a share of the crop size in [0, 1]")
    if augment.crop_sampling not in CROP_SAMPLING:
        raise refuse(f"{key}.crop_sampling", augment.crop_sampling, f"choose from {', '.join(CROP_SAMPLING)}",
                     CROP_SAMPLING)
    for name in ("brightness", "contrast", "saturation"):
        if augment.color_jitter[name] < 0:
            raise refuse(f"{key}.color_jitter.{name}", augment.color_jitter[name], "use a value >= 0")
    if not 0 <= augment.color_jitter.hue <= 0.5:
        raise refuse(f"{key}.color_jitter.hue", augment.color_jitter.hue, "use a value in [0, 0.5]")


def check_protocol_installed(key: str, url: str) -> None:
    """A bucket URL needs its fsspec filesystem: say which extra installs it, before any work."""
    import importlib.util

    protocol = URL_PATTERN.match(url)["protocol"]
    if protocol not in URL_PROTOCOLS:
        raise refuse(key, url, "use a folder or an s3://, gs:// or az:// URL", [f"{p}://" for p in URL_PROTOCOLS])
    module, extra = URL_PROTOCOLS[protocol]
    if module and importlib.util.find_spec(module) is None:
        raise UserError(f"{key}={url!r} needs {module}, which is not installed: pip install 'thresher[{extra}]' "
                        f"(in Docker, build with --build-arg EXTRAS={extra})")
