"""Labels for the training stage, read once from the dataset's own annotation format.

`load_annotations` turns COCO JSON (data=coco, data=shapes) or the Oxford-IIIT Pet layout
(data=oxford_pet) into one shape the loop, the models and the metrics share: a target per image
file, keyed by the file name exactly as the scan lists it (a POSIX path relative to the input
folder). Boxes are XYXY pixels; for detection and keypoints class 0 is "__background__" and the
labels are 1..C, as torchvision's detection models expect. What is read follows the task's spec
(app.train.tasks): one class per image, or boxes, and keypoints in them. A broken annotation file
is a user error naming the file and the problem, never a traceback.
"""
from __future__ import annotations

import json
import logging
import re
import xml.etree.ElementTree as ElementTree
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from omegaconf import DictConfig

from app.errors import UserError
from app.train.tasks import spec_for

log = logging.getLogger("thresher")

BACKGROUND = "__background__"
PET_SPECIES = ("cat", "dog")
# "Abyssinian_100.jpg" -> breed "Abyssinian"; the dataset capitalises cat breeds only.
_PET_NAME = re.compile(r"^(?P<breed>.+)_(?P<number>\d+)$")


@dataclass
class Annotations:
    """Targets per image file.

    classification: classes are the C class names, each target is {"label": int64 scalar tensor}.
    detection: classes[0] is "__background__", targets are {"boxes": float32 [N,4] XYXY pixels,
    "labels": int64 [N] in 1..C}; an image with N = 0 is a negative (background only).
    keypoints: as detection plus "keypoints": float32 [N,K,3] (x, y, visibility 0/1/2).
    skipped: file -> why it has no target (e.g. no annotation file for it). A file in neither
    targets nor skipped is not mentioned by the annotations at all (see `split_annotated`).
    """
    task: str
    classes: List[str]
    targets: Dict[str, dict]
    num_keypoints: int = 0
    keypoint_names: List[str] = field(default_factory=list)
    skipped: Dict[str, str] = field(default_factory=dict)
    source: str = ""

    @property
    def num_classes(self) -> int:
        """The model's output count: with the background class for detection and keypoints."""
        return len(self.classes)


def load_annotations(data_cfg: DictConfig, input_dir: Path, task: str) -> Annotations:
    """Read the annotations of data_cfg for `task`; input_dir is the scan's (resolve_input_dir)."""
    spec = spec_for(task)
    input_dir = Path(input_dir)
    if data_cfg.name == "coco":
        annotations = load_coco(Path(data_cfg.annotations), task, key="data.annotations")
    elif data_cfg.name == "shapes":
        annotations = load_coco(input_dir / "annotations.json", task, key="the shapes dataset's annotations")
    elif data_cfg.name == "oxford_pet":
        annotations = load_oxford_pet(Path(data_cfg.root), input_dir, task, data_cfg.get("classes", "species"))
    else:
        raise UserError(f"data={data_cfg.name} has no boxes or keypoints: model.task={task} needs data=coco, "
                        f"data=oxford_pet or data=shapes (folder data trains classifiers only)")
    if spec.boxes and len(annotations.classes) < 2:
        raise UserError(f"{annotations.source} names no category: {task} needs at least one")
    log.info("annotations: %d images with targets, %d skipped, %d classes%s from %s",
             len(annotations.targets), len(annotations.skipped), len(annotations.classes),
             f", {annotations.num_keypoints} keypoints" if spec.keypoints else "", annotations.source)
    return annotations


def split_annotated(files: Sequence[str], annotations: Annotations) -> Tuple[List[str], Dict[str, str]]:
    """The files that have a target, and why each other one has none (for the loop's log)."""
    kept, left_out = [], {}
    for name in files:
        if name in annotations.targets:
            kept.append(name)
        else:
            left_out[name] = annotations.skipped.get(name, f"not in {annotations.source}")
    return kept, left_out


# ---------------------------------------------------------------------------------------------
# COCO JSON
# ---------------------------------------------------------------------------------------------
def _bad(source: Path, problem: str) -> UserError:
    return UserError(f"{source}: {problem}".replace("\n", " "))


def _read_coco_json(path: Path, key: str) -> dict:
    if not path.is_file():
        raise UserError(f"{key}={str(path)!r} does not exist: it must be a COCO JSON file")
    try:
        coco = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise _bad(path, f"not valid JSON ({error.msg} at line {error.lineno}, column {error.colno})") from None
    except (OSError, UnicodeDecodeError) as error:
        raise _bad(path, f"unreadable ({error})") from None
    if not isinstance(coco, dict):
        raise _bad(path, f"a COCO file is a JSON object with images, annotations and categories, "
                         f"not a {type(coco).__name__}")
    for section in ("images", "annotations", "categories"):
        if not isinstance(coco.get(section, []), list):
            raise _bad(path, f"'{section}' must be a list")
    if "images" not in coco or "categories" not in coco:
        raise _bad(path, "a COCO file needs 'images' and 'categories' lists (and 'annotations')")
    return coco


def _numbers(path: Path, what: str, values, length: int) -> np.ndarray:
    """values as float64 [length], or a one-line error naming the file (numpy: COCO files are large)."""
    numbers = None
    if isinstance(values, list) and len(values) == length:
        try:
            numbers = np.asarray(values, dtype=np.float64)
        except (TypeError, ValueError):
            numbers = None
    if numbers is None or numbers.shape != (length,) or not np.isfinite(numbers).all():
        raise _bad(path, f"{what} must be a list of {length} finite numbers, got {json.dumps(values)[:80]}")
    return numbers


def load_coco(path: Path, task: str, key: str = "data.annotations") -> Annotations:
    """COCO detection/keypoint JSON: xywh boxes become XYXY, iscrowd annotations are ignored,
    category ids become 1..C in sorted id order, images without annotations are negatives.
    For keypoints only annotations that carry keypoints count."""
    spec = spec_for(task)
    coco = _read_coco_json(path, key)
    categories = {}
    for category in coco["categories"]:
        if not isinstance(category, dict) or "id" not in category:
            raise _bad(path, f"every category needs an 'id', got {json.dumps(category)[:80]}")
        categories[category["id"]] = category
    sorted_ids = sorted(categories)
    names = [str(categories[i].get("name", i)) for i in sorted_ids]
    keypoint_names: List[str] = []
    if spec.keypoints:
        lists = {len(c.get("keypoints") or []) for c in categories.values() if c.get("keypoints")}
        if not lists:
            raise _bad(path, "no category lists 'keypoints': model.task=keypoints needs keypoint names")
        if len(lists) > 1:
            raise _bad(path, f"categories list different numbers of keypoints ({sorted(lists)}); "
                             f"one keypoint model needs one count")
        keypoint_names = [str(n) for n in next(c["keypoints"] for c in categories.values() if c.get("keypoints"))]
    num_keypoints = len(keypoint_names)

    files: Dict[object, str] = {}
    for image in coco["images"]:
        if not isinstance(image, dict) or "id" not in image or not isinstance(image.get("file_name"), str):
            raise _bad(path, f"every image needs an 'id' and a 'file_name', got {json.dumps(image)[:80]}")
        files[image["id"]] = Path(image["file_name"]).as_posix().removeprefix("./")

    boxes: Dict[str, List[List[float]]] = defaultdict(list)
    labels: Dict[str, List[int]] = defaultdict(list)
    keypoints: Dict[str, List[np.ndarray]] = defaultdict(list)
    n_degenerate = n_crowd = n_without_keypoints = 0
    label_of = {cid: i for i, cid in enumerate(sorted_ids)}
    for annotation in coco.get("annotations", []):
        if not isinstance(annotation, dict):
            raise _bad(path, f"every annotation must be an object, got {json.dumps(annotation)[:80]}")
        where = f"annotation id={annotation.get('id')!r}"
        if annotation.get("image_id") not in files:
            raise _bad(path, f"{where} refers to image_id={annotation.get('image_id')!r}, which 'images' does not list")
        if annotation.get("category_id") not in categories:
            raise _bad(path, f"{where} has category_id={annotation.get('category_id')!r}; the categories "
                             f"are {sorted_ids[:20]}")
        if annotation.get("iscrowd", 0):
            n_crowd += 1
            continue
        file_name = files[annotation["image_id"]]
        if not spec.boxes:  # one class per image
            labels[file_name].append(label_of[annotation["category_id"]])
            continue
        x, y, w, h = _numbers(path, f"{where}: 'bbox'", annotation.get("bbox"), 4).tolist()
        points = None
        if spec.keypoints:
            raw = annotation.get("keypoints")
            if not raw:
                n_without_keypoints += 1
                continue
            points = _numbers(path, f"{where}: 'keypoints'", raw, 3 * num_keypoints)
            if not (points[2::3] > 0).any():
                n_without_keypoints += 1
                continue
        if w <= 0 or h <= 0:
            n_degenerate += 1
            continue
        boxes[file_name].append([x, y, x + w, y + h])
        labels[file_name].append(label_of[annotation["category_id"]] + 1)
        if points is not None:
            keypoints[file_name].append(points)
    if n_degenerate:
        log.warning("annotations: %d boxes of zero width or height dropped from %s", n_degenerate, path)
    if n_crowd:
        log.info("annotations: %d iscrowd annotations ignored in %s", n_crowd, path)
    if n_without_keypoints:
        log.info("annotations: %d annotations without visible keypoints left out of keypoint training (%s)",
                 n_without_keypoints, path)

    targets: Dict[str, dict] = {}
    skipped: Dict[str, str] = {}
    for file_name in sorted(set(files.values())):
        if not spec.boxes:
            found = sorted(set(labels.get(file_name, [])))
            if len(found) == 1:
                targets[file_name] = {"label": torch.tensor(found[0], dtype=torch.int64)}
            elif not found:
                skipped[file_name] = f"no annotation in {path}, so no class"
            else:
                skipped[file_name] = f"annotations of {len(found)} categories, so no single class"
            continue
        targets[file_name] = _target(boxes.get(file_name, []), labels.get(file_name, []),
                                     keypoints.get(file_name) if spec.keypoints else None, num_keypoints)
    classes = [BACKGROUND, *names] if spec.boxes else names
    return Annotations(task=task, classes=classes, targets=targets, num_keypoints=num_keypoints,
                       keypoint_names=keypoint_names, skipped=skipped, source=str(path))


def _target(boxes: List[List[float]], labels: List[int], keypoints: Optional[List[np.ndarray]],
            num_keypoints: int) -> dict:
    target = {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
              "labels": torch.tensor(labels, dtype=torch.int64)}
    if keypoints is not None or num_keypoints:
        stacked = np.stack(keypoints) if keypoints else np.zeros((0, 3 * num_keypoints))
        target["keypoints"] = torch.from_numpy(stacked.astype(np.float32)).reshape(-1, num_keypoints, 3)
    return target


# ---------------------------------------------------------------------------------------------
# Oxford-IIIT Pet
# ---------------------------------------------------------------------------------------------
def pet_breed(file_name: str) -> Optional[str]:
    """The breed in an Oxford-IIIT Pet image name ("great_pyrenees_12.jpg" -> "great_pyrenees")."""
    match = _PET_NAME.match(Path(file_name).stem)
    return match.group("breed") if match else None


def _read_trainval(path: Path) -> Dict[str, str]:
    """Image stem -> species from annotations/trainval.txt ("Image CLASS-ID SPECIES BREED-ID")."""
    species: Dict[str, str] = {}
    if not path.is_file():
        return species
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.split()
        if len(fields) != 4 or not all(f.isdigit() for f in fields[1:]) or fields[2] not in ("1", "2"):
            raise UserError(f"{path}:{number}: expected 'Image CLASS-ID SPECIES BREED-ID' with SPECIES "
                            f"1 (cat) or 2 (dog), got {line.strip()[:80]!r}")
        species[fields[0]] = PET_SPECIES[int(fields[2]) - 1]
    return species


def _read_voc_boxes(path: Path) -> List[List[float]]:
    """The <object><bndbox> boxes of a Pascal VOC xml file, XYXY pixels."""
    try:
        root = ElementTree.parse(path).getroot()
    except ElementTree.ParseError as error:
        raise _bad(path, f"not valid XML ({error})") from None
    except OSError as error:
        raise _bad(path, f"unreadable ({error})") from None
    boxes = []
    for index, item in enumerate(root.iter("object")):
        box = item.find("bndbox")
        values = [box.findtext(tag) if box is not None else None for tag in ("xmin", "ymin", "xmax", "ymax")]
        try:
            boxes.append([float(v) for v in values])
        except (TypeError, ValueError):
            raise _bad(path, f"object {index} needs <bndbox> with numeric xmin, ymin, xmax, ymax, got "
                             f"{values}") from None
    return boxes


def load_oxford_pet(root: Path, images_dir: Path, task: str, class_mode: str = "species") -> Annotations:
    """The Oxford-IIIT Pet layout: images/<Breed>_<n>.jpg, annotations/xmls/<name>.xml (one head box
    each, Pascal VOC) and annotations/trainval.txt. Classes are cat/dog (species: from trainval.txt,
    else the dataset's convention that cat breeds are capitalised) or the breeds (breed: the name
    prefixes, sorted case-insensitively as the dataset's CLASS-IDs are). Only the trainval images
    have head boxes: for detection the others are skipped with the reason."""
    from app.data.scan import list_images

    spec = spec_for(task)
    if spec.keypoints:
        raise UserError("data=oxford_pet has head boxes but no keypoints: use model.task=detection or "
                        "classification, or data=coco with keypoints")
    if class_mode not in ("species", "breed"):
        raise UserError(f"data.classes={class_mode!r} is not allowed: use species or breed")
    species_of = _read_trainval(root / "annotations" / "trainval.txt")
    xml_dir = root / "annotations" / "xmls"
    files = list_images(images_dir)
    breeds = {f: pet_breed(f) for f in files}
    if class_mode == "species":
        classes = list(PET_SPECIES)
    else:
        classes = sorted({b for b in breeds.values() if b}, key=lambda b: (b.lower(), b))
    index = {name: i for i, name in enumerate(classes)}

    targets: Dict[str, dict] = {}
    skipped: Dict[str, str] = {}
    n_degenerate = 0
    for file_name in files:
        stem, breed = Path(file_name).stem, breeds[file_name]
        if breed is None:
            skipped[file_name] = "name is not <breed>_<number>, so no class"
            continue
        name = species_of.get(stem) or ("cat" if breed[:1].isupper() else "dog")
        label = index[name if class_mode == "species" else breed]
        if not spec.boxes:
            targets[file_name] = {"label": torch.tensor(label, dtype=torch.int64)}
            continue
        xml = xml_dir / f"{stem}.xml"
        if not xml.is_file():
            skipped[file_name] = f"no head box: {xml} does not exist"
            continue
        boxes = []
        for box in _read_voc_boxes(xml):
            if box[2] > box[0] and box[3] > box[1]:
                boxes.append(box)
            else:
                n_degenerate += 1
        targets[file_name] = _target(boxes, [label + 1] * len(boxes), None, 0)
    if n_degenerate:
        log.warning("annotations: %d boxes of zero width or height dropped from %s", n_degenerate, xml_dir)
    if spec.boxes and files and not targets:
        raise UserError(f"data.root={str(root)!r}: none of the {len(files)} images has a head box in {xml_dir} "
                        f"(the Oxford-IIIT Pet layout keeps them as annotations/xmls/<image name>.xml)")
    return Annotations(task=task, classes=[BACKGROUND, *classes] if spec.boxes else classes,
                       targets=targets, skipped=skipped, source=str(xml_dir if spec.boxes else root))
