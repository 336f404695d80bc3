"""The paths a run reads, by config key: named once here for the config check, the scan and the
docker launcher, which mounts each of them into a job's container.

Torch-free and cheap: composing and checking a config imports it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional, Tuple, Union

from app.data.locations import is_url
from app.train.tasks.base import WEIGHTS_NAME_PATTERN

FOLDER = "folder"
FILE = "file"


@dataclass(frozen=True)
class InputPath:
    """One path the run reads: its config key, its value as configured, and what it must be."""
    key: str  # e.g. "data.root"
    value: str  # as configured: relative (to the working directory), absolute, or a bucket URL
    kind: str  # FOLDER or FILE
    must_be: str  # the end of the config check's message when the path is not there
    # Sub-folders a FOLDER must hold (oxford_pet: images/).
    holds: Tuple[str, ...] = ()
    # A bucket URL is read here as it is (fsspec); otherwise a URL is just a path that is not there.
    url_allowed: bool = False

    @property
    def is_url(self) -> bool:
        return is_url(self.value)

    def shown(self) -> str:
        """The value as the config check names it (a folder normalised, as pathlib writes it)."""
        return str(Path(self.value)) if self.kind == FOLDER else self.value

    def is_there(self) -> bool:
        """Whether the local path exists as what it must be."""
        path = Path(self.value)
        if self.kind == FILE:
            return path.is_file()
        return all((path / part).is_dir() for part in self.holds) if self.holds else path.is_dir()


def data_inputs(data: Any) -> List[InputPath]:
    """The paths a data config (conf/data/*.yaml) reads, in the order the config check names them;
    optional ones only when set. data=shapes reads none: it is generated into the cache."""
    name = data.get("name")
    found: List[InputPath] = []
    if name in ("folder", "coco"):
        found.append(InputPath("data.input_dir", str(data.input_dir), FOLDER, url_allowed=True,
                               must_be="it must be an existing folder of images (in Docker, mount it at "
                               "/data/input)"))
        if data.get("relevant_filenames_file"):
            found.append(InputPath("data.relevant_filenames_file", str(data.relevant_filenames_file), FILE,
                                   url_allowed=True, must_be="it must be an existing text file, one image path "
                                   "per line relative to data.input_dir"))
        if data.get("val_input_dir"):
            found.append(InputPath("data.val_input_dir", str(data.val_input_dir), FOLDER, url_allowed=True,
                                   must_be="it must be an existing folder of labelled images, one sub-folder "
                                   "per class as in data.input_dir"))
        if name == "coco":
            found.append(InputPath("data.annotations", str(data.annotations), FILE,
                                   must_be="it must be an existing COCO JSON file"))
    elif name == "oxford_pet":
        found.append(InputPath("data.root", str(data.root), FOLDER, holds=("images",),
                               must_be="it must hold the Oxford-IIIT Pet layout: images/, annotations/xmls/ "
                               "and annotations/trainval.txt"))
    return found


def images_location(data: Any) -> Optional[Union[Path, str]]:
    """Where a data config's images are (file names are relative to it): a folder, or a bucket URL
    as a string; None for data=shapes, which is generated into the cache first."""
    name = data.get("name")
    if name == "oxford_pet":  # only images/ holds inputs; annotations/trimaps/*.png are masks
        return Path(data.root) / "images"
    if name in ("folder", "coco"):
        if is_url(data.input_dir):
            return str(data.input_dir).rstrip("/")
        return Path(data.input_dir)
    return None


def weights_is_a_file(weights: Optional[str]) -> bool:
    """Whether model.weights names a file (rather than a torchvision weights name read from $TORCH_HOME)."""
    return bool(weights) and (Path(weights).exists() or not WEIGHTS_NAME_PATTERN.match(str(weights)))


def run_inputs(cfg: Any) -> List[InputPath]:
    """Every path a run reads: its data config's, then the top-level files (bring-your-own
    embeddings and checkpoint, model.weights given as a file, the validation file list), each
    only when set. Their own checks live with their validators (app.data.schema)."""
    found = data_inputs(cfg.data) if cfg.get("data") is not None else []
    model, trainer = cfg.get("model") or {}, cfg.get("trainer") or {}
    for key, value in (("embeddings", cfg.get("embeddings")), ("checkpoint", cfg.get("checkpoint")),
                       ("model.weights", model.get("weights")),
                       ("trainer.val_filenames_file", trainer.get("val_filenames_file"))):
        if value and (key != "model.weights" or weights_is_a_file(value)):
            found.append(InputPath(key, str(value), FILE, must_be="it must be an existing file"))
    return found
