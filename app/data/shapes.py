"""`data=shapes`: a deterministic synthetic dataset that needs no download.

Coloured circles, squares and triangles on noisy backgrounds, one shape an image, in an
ImageFolder layout (`<class>/<name>.png`) with COCO-style `annotations.json` holding each shape's
class, box and corner keypoints. Generated once per parameter set into the cache folder.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("circle", "square", "triangle")
KEYPOINTS = 4  # circles: top, right, bottom, left; squares: 4 corners; triangles: 3 + 1 unused
VERSION = 1


def shapes_dir(cache_dir: Path, n_images: int, image_size: int, n_corrupt: int) -> Path:
    return Path(cache_dir) / f"shapes-v{VERSION}-n{n_images}-s{image_size}-c{n_corrupt}"


def ensure_shapes(cache_dir: Path, n_images: int, image_size: int, n_corrupt: int = 0) -> Path:
    """The dataset folder, generated first if it is not in the cache yet. One process generates a
    given dataset at a time (a lock beside it); the one holding the lock also removes the staging
    folders of earlier processes that were killed while generating it."""
    import fcntl

    target = shapes_dir(cache_dir, n_images, image_size, n_corrupt)
    if (target / "annotations.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_name(f".{target.name}.lock"), "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        if (target / "annotations.json").is_file():  # another process made it while we waited
            return target
        for stale in target.parent.glob(f".{target.name}.*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        shutil.rmtree(target, ignore_errors=True)  # a folder without annotations.json is a half copy
        staging = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        generate_shapes(staging, n_images, image_size, n_corrupt)
        os.replace(staging, target)
    return target


def _shape_geometry(rng: np.random.Generator, kind: str, size: int):
    """Polygon (or circle box) and keypoints for one shape that lies fully inside the image."""
    extent = rng.uniform(0.25, 0.5) * size
    half = extent / 2
    cx, cy = rng.uniform(half + 1, size - half - 1, size=2)
    if kind == "circle":
        box = (cx - half, cy - half, cx + half, cy + half)
        keypoints = [(cx, cy - half), (cx + half, cy), (cx, cy + half), (cx - half, cy)]
        return None, box, [(x, y, 2) for x, y in keypoints]
    angle = rng.uniform(0, 2 * math.pi)
    corners = 4 if kind == "square" else 3
    radius = half  # circumradius, so the shape stays inside the square of side `extent`
    points = [(cx + radius * math.cos(angle + 2 * math.pi * i / corners),
               cy + radius * math.sin(angle + 2 * math.pi * i / corners)) for i in range(corners)]
    xs, ys = zip(*points)
    box = (min(xs), min(ys), max(xs), max(ys))
    keypoints = [(x, y, 2) for x, y in points] + [(0.0, 0.0, 0)] * (KEYPOINTS - corners)
    return points, box, keypoints


def _draw_image(rng: np.random.Generator, kind: str, size: int) -> Tuple[Image.Image, tuple, list]:
    background = rng.integers(0, 256, size=3)
    noise = rng.normal(0, 18, size=(size, size, 3))
    pixels = np.clip(background + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    colour = tuple(int(c) for c in (background + rng.integers(90, 166, size=3)) % 256)
    polygon, box, keypoints = _shape_geometry(rng, kind, size)
    draw = ImageDraw.Draw(image)
    if polygon is None:
        draw.ellipse(box, fill=colour)
    else:
        draw.polygon(polygon, fill=colour)
    return image, box, keypoints


def generate_shapes(root: Path, n_images: int, image_size: int, n_corrupt: int = 0) -> None:
    """Write `n_images` images (the last `n_corrupt` of them deliberately truncated files)."""
    rng = np.random.default_rng(20240601 + n_images * 7 + image_size)
    for name in CLASSES:
        (root / name).mkdir(parents=True, exist_ok=True)
    coco: Dict[str, List] = {
        "images": [], "annotations": [],
        "categories": [{"id": i + 1, "name": name, "supercategory": "shape",
                        "keypoints": [f"corner_{k}" for k in range(KEYPOINTS)], "skeleton": []}
                       for i, name in enumerate(CLASSES)],
    }
    n_good = n_images - n_corrupt
    for index in range(n_images):
        label = index % len(CLASSES)
        kind = CLASSES[label]
        image, box, keypoints = _draw_image(rng, kind, image_size)
        if index >= n_good:
            path = root / kind / f"corrupt_{index:05d}.png"
            _write_truncated(image, path)
            continue
        file_name = f"{kind}/{kind}_{index:05d}.png"
        image.save(root / file_name)
        x0, y0, x1, y1 = box
        coco["images"].append({"id": index, "file_name": file_name, "width": image_size,
                               "height": image_size})
        coco["annotations"].append({
            "id": index, "image_id": index, "category_id": label + 1, "iscrowd": 0,
            "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
            "area": round((x1 - x0) * (y1 - y0), 2),
            "keypoints": [round(v, 2) if i % 3 != 2 else v
                          for kp in keypoints for i, v in enumerate(kp)],
            "num_keypoints": sum(1 for kp in keypoints if kp[2] > 0),
        })
    (root / "annotations.json").write_text(json.dumps(coco))


def _write_truncated(image: Image.Image, path: Path) -> None:
    """The image encoded in its file's format, cut off halfway: the header reads, the pixels do
    not (a typical corrupt upload)."""
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else path.suffix[1:].upper())
    data = buffer.getvalue()
    path.write_bytes(data[: len(data) // 2])


# Shapes as Oxford-IIIT Pet breeds: the dataset's convention is cat breeds capitalised, dogs not.
PET_BREEDS = {"circle": ("Abyssinian", 1, 1), "square": ("beagle", 2, 2), "triangle": ("Bombay", 1, 3)}


def write_pet_layout(root: Path, n_images: int, image_size: int, n_corrupt: int = 0) -> Path:
    """The shapes in the Oxford-IIIT Pet layout, so the detection profile's preset runs without
    the real dataset: images/<Breed>_<n>.jpg, annotations/xmls/<name>.xml (the shape's box as the
    head box, Pascal VOC), annotations/trainval.txt and annotations/trimaps/<name>.png masks. The
    last `n_corrupt` images are truncated files."""
    root = Path(root)
    rng = np.random.default_rng(20241123 + n_images * 7 + image_size)
    for folder in ("images", "annotations/xmls", "annotations/trimaps"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    lines = ["#Image CLASS-ID SPECIES BREED-ID"]
    for index in range(n_images):
        kind = CLASSES[index % len(CLASSES)]
        breed, species, breed_id = PET_BREEDS[kind]
        stem = f"{breed}_{index + 1}"
        image, box, _ = _draw_image(rng, kind, image_size)
        if index >= n_images - n_corrupt:
            _write_truncated(image, root / "images" / f"{stem}.jpg")
            continue
        image.save(root / "images" / f"{stem}.jpg", quality=90)
        mask = Image.new("L", image.size, 2)
        ImageDraw.Draw(mask).rectangle(box, fill=1)
        mask.save(root / "annotations" / "trimaps" / f"{stem}.png")
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        (root / "annotations" / "xmls" / f"{stem}.xml").write_text(
            f"<annotation><folder>OXIIIT</folder><filename>{stem}.jpg</filename><size><width>{image_size}</width>"
            f"<height>{image_size}</height><depth>3</depth></size><object><name>{'cat' if species == 1 else 'dog'}"
            f"</name><pose>Frontal</pose><truncated>0</truncated><occluded>0</occluded><bndbox><xmin>{x0}</xmin>"
            f"<ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox><difficult>0</difficult></object>"
            f"</annotation>\n")
        lines.append(f"{stem} {breed_id} {species} {breed_id}")
    (root / "annotations" / "trainval.txt").write_text("\n".join(lines) + "\n")
    return root


def main(argv: List[str] = None) -> None:
    """`python -m app.data.shapes pets DIR [N_IMAGES] [IMAGE_SIZE]`: write the shapes in the
    Oxford-IIIT Pet layout, to try `+experiment=profile_fasterrcnn_pets` without the real data."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2 or args[0] != "pets":
        sys.exit("usage: python -m app.data.shapes pets DIR [N_IMAGES=200] [IMAGE_SIZE=320]")
    n_images = int(args[2]) if len(args) > 2 else 200
    image_size = int(args[3]) if len(args) > 3 else 320
    root = write_pet_layout(Path(args[1]), n_images, image_size)
    print(f"{n_images} shapes in the Oxford-IIIT Pet layout in {root}")


if __name__ == "__main__":
    main()
