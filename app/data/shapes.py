"""`data=shapes`: a deterministic synthetic dataset that needs no download.

Coloured circles, squares and triangles on noisy backgrounds, one shape an image, in an
ImageFolder layout (`<class>/<name>.png`) with COCO-style `annotations.json` holding each shape's
class, box and corner keypoints. Generated once per parameter set into the cache folder.

`python -m app.data.shapes --layout folder|pets --out DIR` writes them as a dataset on disk
instead: class sub-folders for data=folder, or the Oxford-IIIT Pet layout (`--help`).
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
VERSION = 2  # the cache folder's name: a change to the images makes a new one


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
    extent = rng.uniform(0.4, 0.7) * size
    half = extent / 2
    cx, cy = rng.uniform(half + 1, size - half - 1, size=2)
    if kind == "circle":
        box = (cx - half, cy - half, cx + half, cy + half)
        keypoints = [(cx, cy - half), (cx + half, cy), (cx, cy + half), (cx - half, cy)]
        return None, box, [(x, y, 2) for x, y in keypoints]
    # Upright: squares axis-aligned, triangles apex up. Rotated ones took twice the epochs to learn.
    angle = math.pi / 4 if kind == "square" else -math.pi / 2
    corners = 4 if kind == "square" else 3
    radius = half  # circumradius, so the shape stays inside the square of side `extent`
    points = [(cx + radius * math.cos(angle + 2 * math.pi * i / corners),
               cy + radius * math.sin(angle + 2 * math.pi * i / corners)) for i in range(corners)]
    xs, ys = zip(*points)
    box = (min(xs), min(ys), max(xs), max(ys))
    keypoints = [(x, y, 2) for x, y in points] + [(0.0, 0.0, 0)] * (KEYPOINTS - corners)
    return points, box, keypoints


def _draw_image(rng: np.random.Generator, kind: str, size: int) -> Tuple[Image.Image, tuple, list]:
    """A bright shape on a dark, noisy background, both of random colour. Always brighter: with
    either way round, a network trained from scratch on a few hundred images learnt the colours,
    not the shapes (val_top1 0.6-0.7 against 0.97, issue 16)."""
    background = rng.integers(0, 96, size=3)
    noise = rng.normal(0, 10, size=(size, size, 3))
    pixels = np.clip(background + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    colour = tuple(int(c) for c in rng.integers(160, 256, size=3))
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


def write_folder_layout(root: Path, n_images: int, image_size: int, n_corrupt: int = 0) -> Path:
    """The shapes as a folder of class sub-folders, as data=folder reads one (ImageFolder: the
    first-level sub-folders are the classes): <class>/<class>_<n>.jpg. The last `n_corrupt`
    images are truncated files."""
    root = Path(root)
    rng = np.random.default_rng(20250301 + n_images * 7 + image_size)
    for kind in CLASSES:
        (root / kind).mkdir(parents=True, exist_ok=True)
    for index in range(n_images):
        kind = CLASSES[index % len(CLASSES)]
        image, _, _ = _draw_image(rng, kind, image_size)
        path = root / kind / f"{kind}_{index:05d}.jpg"
        if index >= n_images - n_corrupt:
            _write_truncated(image, path)
        else:
            image.save(path, quality=90)
    return root


# What each layout of `python -m app.data.shapes` writes, and what it is for.
LAYOUTS = {
    "pets": (write_pet_layout, "the Oxford-IIIT Pet layout (images/, annotations/xmls/, annotations/"
                               "trainval.txt): for data=oxford_pet and +experiment=profile_fasterrcnn_pets"),
    "folder": (write_folder_layout, "a folder of class sub-folders, DIR/<class>/<name>.jpg (circle, square, "
                                    "triangle): for data=folder, to try thresher on a folder of images"),
}
# The generator's list of what it wrote into --out: the files it may replace when run again there.
MANIFEST = ".thresher-shapes.json"


def write_layout(layout: str, out: Path, n_images: int, image_size: int) -> Path:
    """Generate `layout` into `out` atomically (a staging folder beside it, then a rename), so a
    reader never sees half a dataset. `out` must be new, empty, or an earlier output of this
    generator holding nothing else: a user's folder is never written into. Raises UserError."""
    import tempfile

    from app.errors import UserError

    out = Path(os.path.abspath(out))
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise UserError(f"--out {out} is {'a link' if out.is_symlink() else 'a file'}: name a new or empty folder")
    foreign = _files_not_written_here(out) if out.is_dir() else []
    if foreign:
        raise UserError(f"--out {out} holds files this generator did not write ({foreign[0]}"
                        f"{f' and {len(foreign) - 1} more' if len(foreign) > 1 else ''}): "
                        f"name a new or empty folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes it private; the dataset is for sharing
        write, _ = LAYOUTS[layout]
        write(staging, n_images, image_size)
        files = sorted(path.relative_to(staging).as_posix() for path in staging.rglob("*") if path.is_file())
        (staging / MANIFEST).write_text(json.dumps({"layout": layout, "n_images": n_images,
                                                    "image_size": image_size, "files": files}) + "\n")
        if out.is_dir() and any(out.iterdir()):  # an earlier output of this generator: swap it out
            old = out.with_name(f".{out.name}.{os.getpid()}.old")
            os.replace(out, old)
            os.replace(staging, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, out)  # a rename onto an empty folder replaces it
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _files_not_written_here(folder: Path) -> List[str]:
    """The files in `folder` that its manifest does not list (all of them without a manifest)."""
    try:
        written = set(json.loads((folder / MANIFEST).read_text())["files"]) | {MANIFEST}
    except (OSError, ValueError, KeyError, TypeError):
        written = set()
    return sorted(name for name in (path.relative_to(folder).as_posix() for path in folder.rglob("*")
                                    if path.is_file() or path.is_symlink())
                  if name not in written)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def main(argv: List[str] = None) -> None:
    """`python -m app.data.shapes --layout folder --out DIR`: the shapes written as a dataset on
    disk, to try data=folder or the Pets preset without real data. The older form
    `python -m app.data.shapes pets DIR [N_IMAGES] [IMAGE_SIZE]` still works."""
    import argparse
    import sys
    import textwrap

    from app.errors import UserError, print_error

    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in LAYOUTS:  # the older positional form: LAYOUT DIR [N_IMAGES] [IMAGE_SIZE]
        flags = ["--layout", "--out", "--n-images", "--image-size"]
        args = [part for flag, value in zip(flags, args) for part in (flag, value)] + args[len(flags):]
    parser = argparse.ArgumentParser(
        prog="python -m app.data.shapes",
        description="Write synthetic shapes (coloured circles, squares and triangles on noisy\n"
                    "backgrounds) as a dataset on disk, to try thresher without real data. DIR must be\n"
                    "new or empty (or an earlier output of this command, which is replaced); it is\n"
                    "written atomically.",
        epilog="layouts:\n" + "\n".join(f"  {name:<7} " + "\n          ".join(textwrap.wrap(help, 70))
                                         for name, (_, help) in LAYOUTS.items())
               + "\n\nexamples:\n"
                 "  python -m app.data.shapes --layout folder --out /tmp/shapes\n"
                 "  thresher data=folder data.input_dir=/tmp/shapes trainer.epochs=1 hardware=cpu\n"
                 "  python -m app.data.shapes --layout pets --out /tmp/pets     (also: ... pets /tmp/pets)\n"
                 "  thresher +experiment=profile_fasterrcnn_pets data.root=/tmp/pets",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layout", choices=list(LAYOUTS), default="pets",
                        help="folder: class sub-folders, for data=folder; pets: the Oxford-IIIT Pet layout, "
                             "for data=oxford_pet (default: pets)")
    parser.add_argument("--out", required=True, metavar="DIR", help="the folder to write")
    parser.add_argument("--n-images", type=int, default=200, metavar="N",
                        help="how many images, the classes in turn (default: 200)")
    parser.add_argument("--image-size", type=int, default=320, metavar="S",
                        help="the side of each square image in pixels (default: 320)")
    parsed = parser.parse_args(args)
    try:
        if parsed.n_images < len(CLASSES):
            raise UserError(f"--n-images={parsed.n_images} is not allowed: use an integer >= {len(CLASSES)} "
                            f"(one per class)")
        if parsed.image_size < 32:
            raise UserError(f"--image-size={parsed.image_size} is not allowed: use an integer >= 32")
        root = write_layout(parsed.layout, Path(parsed.out), parsed.n_images, parsed.image_size)
    except UserError as error:
        print_error(str(error))
        sys.exit(2)
    use = {"pets": f"thresher +experiment=profile_fasterrcnn_pets data.root={root}",
           "folder": f"thresher data=folder data.input_dir={root}"}[parsed.layout]
    print(f"{parsed.n_images} shapes in the {parsed.layout} layout in {root}; try: {use}")


if __name__ == "__main__":
    main()
