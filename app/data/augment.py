"""Training and validation transforms under DeepLabCut's augmentation names (`data.augment`).

One callable per dataset: ``transform(image, target) -> (tensor, target)``. Images are PIL RGB
(or uint8 CHW tensors); targets are dicts in the image's pixel coordinates (``boxes`` [N, 4]
XYXY, ``labels`` [N], optional ``keypoints`` [N, K, 3] as x, y, visibility 0/1/2) or None for
classification. Boxes and keypoints go through torchvision.transforms.v2's functionals together
with the pixels, so they follow every geometric step.

The order, as in DeepLabCut:

1. ``global_scale``: the first scaling of every image. The output size is fixed, so scaling the
   pixels before step 3 would only add a second resample; the scale is applied to the crop
   window instead (``crop_size`` is measured in pixels of the scaled image) and to
   `input_size_ok`. The pixels are resampled once.
2. (train) crop, with probability ``crop_ratio``: a ``crop_size`` [width, height] window (at most
   the image) centred on a point chosen by ``crop_sampling`` and moved by up to ``max_shift`` of
   the crop size; the window is then moved back inside the image. With ``max_shift`` <= 0.5 the
   sampled point always stays in the crop.
3. resize to (``resize.height``, ``resize.width``), ``data.image_size`` where null:
   ``keep_ratio`` scales to fit inside and pads the rest with black, centred; otherwise the image
   is stretched. The output is always exactly (height, width), so images batch with torch.stack.
4. (train) horizontal flip with probability ``hflip``.
5. (train) ``color_jitter`` (torchvision's ColorJitter, on float pixels).
6. (train) ``sharpening`` with probability ``sharpenratio``, strength uniform in [0, 1]
   (imgaug's Sharpen, as DeepLabCut uses it).
7. (train) ``edge`` enhancement on every image when on, strength uniform in [0, 1] (PIL's
   EDGE_ENHANCE blended with the image).
8. float32 in [0, 1]; ImageNet mean/std normalised when ``normalize``.

Validation (``train=False``) does steps 1, 3 and 8 only, and draws no random numbers.

Coordinates are continuous, as for boxes: pixel i covers [i, i + 1), a flip maps x to
width - x for boxes and keypoints alike (torchvision's KeyPoints flip uses width - 1 - x, which
disagrees with its own resize). Boxes are clipped to the image (to the crop before resizing,
so never into the padding); boxes narrower or shorter than 1 output pixel (train) or empty
(validation) are removed with their labels, keypoints and ``iscrowd``. A keypoint that leaves
the image (or the crop) gets visibility 0, and every keypoint with visibility 0 is returned
as (0, 0, 0), COCO's convention. Other target keys are copied unchanged.

Randomness comes only from torch's global generator (torch.rand, torch.randint and the v2
transforms), so seeding torch per sample repeats the same augmentations on a resumed run.

Speed (one thread): the geometry runs on uint8 tensors (torch's antialiased uint8 resize took
a third of the time of PIL's at 500x375 -> 320); sharpening and edge enhancement are a 3x3 box
sum made of shifted adds on float pixels, faster than PIL's ImageFilter.Kernel on uint8 (1.3x at
64 px, 3x or more at 320 px) and than a depthwise conv2d (2.5x to 4x). Without annotations and
jitter a sample costs about what v2.Compose([ToImage, Resize, ToDtype, Normalize]) costs; boxes
and keypoints add about 0.1 to 0.3 ms (small v2 dispatches); hue jitter is the expensive part
(torchvision's HSV round trip, several ms at 320 px).
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as tnf
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from app.data.schema import CROP_SAMPLING
from app.data.images import IMAGENET_MEAN, IMAGENET_STD

# Per-instance keys besides boxes and keypoints that are filtered along with the boxes.
INSTANCE_KEYS = ("labels", "iscrowd")
# Training drops boxes thinner than this many output pixels: nothing left to learn from.
MIN_BOX_SIZE = 1.0
# imgaug's Sharpen at full strength (lightness 1) and PIL's EDGE_ENHANCE, both written as
# x + gain * (x - mean of the 3x3 neighbourhood): [[-1]*3, [-1, 9, -1], [-1]*3] and that plus
# the identity, halved.
SHARPEN_GAIN = 9.0
EDGE_GAIN = 4.5


def input_size_ok(width: int, height: int, augment) -> bool:
    """DeepLabCut's min/max_input_size: whether the longer side after global_scale is in range."""
    longer = max(width, height) * float(augment.global_scale)
    return int(augment.min_input_size) <= longer <= int(augment.max_input_size)


def build_transform(augment, image_size: int, train: bool, normalize: bool,
                    keypoint_flip_index: Optional[Sequence[int]] = None) -> Callable:
    """The transform for `data.augment` (see the module docstring for the order).

    keypoint_flip_index: where keypoint k comes from after a horizontal flip (left/right pairs
    swapped, like torchvision's COCO person reference); None keeps the order.
    """
    return AugmentTransform(augment, image_size, train, normalize, keypoint_flip_index)


class AugmentTransform:
    """transform(image, target=None) -> (float32 CHW tensor, target or None)."""

    def __init__(self, augment, image_size: int, train: bool, normalize: bool,
                 keypoint_flip_index: Optional[Sequence[int]] = None):
        self.train = bool(train)
        self.normalize = bool(normalize)
        self.height = int(augment.resize.height if augment.resize.height is not None else image_size)
        self.width = int(augment.resize.width if augment.resize.width is not None else image_size)
        self.keep_ratio = bool(augment.resize.keep_ratio)
        self.global_scale = float(augment.global_scale)
        crop = augment.crop_size if train else None
        self.crop_size = None if crop is None else (int(crop[0]), int(crop[1]))
        self.crop_ratio = float(augment.crop_ratio)
        self.max_shift = float(augment.max_shift)
        self.crop_sampling = str(augment.crop_sampling)
        if self.crop_sampling not in CROP_SAMPLING:
            raise ValueError(f"crop_sampling {self.crop_sampling!r}: expected one of {CROP_SAMPLING}")
        self.hflip = float(augment.hflip) if train else 0.0
        jitter = augment.color_jitter
        strengths = dict(brightness=float(jitter.brightness), contrast=float(jitter.contrast),
                         saturation=float(jitter.saturation), hue=float(jitter.hue))
        self.color_jitter = v2.ColorJitter(**strengths) if train and any(strengths.values()) else None
        self.sharpen_ratio = float(augment.sharpenratio) if train and augment.sharpening else 0.0
        self.edge = bool(train and augment.edge)
        self.flip_index = None if keypoint_flip_index is None else torch.as_tensor(keypoint_flip_index,
                                                                                   dtype=torch.long)

    def __repr__(self) -> str:
        return (f"AugmentTransform(train={self.train}, size=({self.height}, {self.width}), "
                f"keep_ratio={self.keep_ratio}, crop_size={self.crop_size}, hflip={self.hflip})")

    def __call__(self, image, target: Optional[Dict] = None) -> Tuple[torch.Tensor, Optional[Dict]]:
        pixels = _as_uint8_chw(image)
        height, width = pixels.shape[-2:]
        boxes, keypoints, visibility = _read_target(target, (height, width))

        if self.crop_size is not None and self.crop_ratio > 0 and torch.rand(()) < self.crop_ratio:
            left, top, crop_w, crop_h = self._crop_window(width, height, boxes, keypoints, visibility)
            pixels, boxes, keypoints = _follow(F.crop, pixels, boxes, keypoints, top, left, crop_h, crop_w)
        elif boxes is not None:  # clip boxes that stick out of the image, as a crop would
            boxes = F.clamp_bounding_boxes(boxes)
        if keypoints is not None:
            visibility = _visibility_inside(keypoints, visibility)

        pixels, boxes, keypoints = self._resize_and_pad(pixels, boxes, keypoints)

        if self.hflip > 0 and torch.rand(()) < self.hflip:
            pixels = F.horizontal_flip(pixels)
            if boxes is not None:
                boxes = F.horizontal_flip(boxes)
            if keypoints is not None:
                keypoints, visibility = self._flip_keypoints(keypoints, visibility)

        pixels = F.to_dtype(pixels, torch.float32, scale=True)
        if self.color_jitter is not None:
            pixels = self.color_jitter(pixels)
        if self.sharpen_ratio > 0 and torch.rand(()) < self.sharpen_ratio:
            pixels = _enhance_details(pixels, SHARPEN_GAIN * float(torch.rand(())))
        if self.edge:
            pixels = _enhance_details(pixels, EDGE_GAIN * float(torch.rand(())))
        if self.normalize:
            pixels = F.normalize(pixels, IMAGENET_MEAN, IMAGENET_STD)
        pixels = pixels.as_subclass(torch.Tensor)
        if target is None:
            return pixels, None
        return pixels, self._write_target(target, boxes, keypoints, visibility)

    def _crop_window(self, width: int, height: int, boxes: Optional[torch.Tensor], keypoints: Optional[torch.Tensor],
                     visibility: Optional[torch.Tensor]) -> Tuple[int, int, int, int]:
        """(left, top, width, height) in the original image's pixels; crop_size is in scaled ones."""
        crop_w = min(width, max(1, round(self.crop_size[0] / self.global_scale)))
        crop_h = min(height, max(1, round(self.crop_size[1] / self.global_scale)))
        method = self.crop_sampling
        if method == "hybrid":
            method = ("uniform", "keypoint", "density")[int(torch.randint(3, ()))]
        centre = None
        if method != "uniform":
            centre = _sampled_point(method, boxes, keypoints, visibility, width, height, crop_w, crop_h)
        if centre is None:  # uniform, or nothing annotated to centre on
            left = int(torch.randint(width - crop_w + 1, ()))
            top = int(torch.randint(height - crop_h + 1, ()))
            return left, top, crop_w, crop_h
        shift = (torch.rand(2) * 2 - 1) * self.max_shift * torch.tensor([crop_w, crop_h])
        centre_x, centre_y = (centre + shift).tolist()
        left = min(max(round(centre_x - crop_w / 2), 0), width - crop_w)
        top = min(max(round(centre_y - crop_h / 2), 0), height - crop_h)
        return left, top, crop_w, crop_h

    def _resize_and_pad(self, pixels, boxes, keypoints):
        """To exactly (height, width): fit inside and pad (keep_ratio), or stretch."""
        in_h, in_w = pixels.shape[-2:]
        if self.keep_ratio:
            scale = min(self.width / in_w, self.height / in_h)
            new_w = min(self.width, max(1, round(in_w * scale)))
            new_h = min(self.height, max(1, round(in_h * scale)))
        else:
            new_w, new_h = self.width, self.height
        if (new_h, new_w) != (in_h, in_w):
            pixels, boxes, keypoints = _follow(F.resize, pixels, boxes, keypoints, [new_h, new_w], antialias=True)
        pad_left, pad_top = (self.width - new_w) // 2, (self.height - new_h) // 2
        padding = [pad_left, pad_top, self.width - new_w - pad_left, self.height - new_h - pad_top]
        if any(padding):
            pixels, boxes, keypoints = _follow(F.pad, pixels, boxes, keypoints, padding, fill=0)
        return pixels, boxes, keypoints

    def _flip_keypoints(self, keypoints: tv_tensors.KeyPoints, visibility: torch.Tensor):
        """x -> width - x, like boxes; left/right keypoints swapped when a flip index is given."""
        flipped = keypoints.as_subclass(torch.Tensor).clone()
        flipped[..., 0] = keypoints.canvas_size[1] - flipped[..., 0]
        if self.flip_index is not None and flipped.shape[1]:
            flipped, visibility = flipped[:, self.flip_index], visibility[:, self.flip_index]
        return tv_tensors.wrap(flipped, like=keypoints), visibility

    def _write_target(self, target: Dict, boxes, keypoints, visibility) -> Dict:
        boxes = boxes.as_subclass(torch.Tensor)
        sizes = boxes[:, 2:] - boxes[:, :2]
        min_size = MIN_BOX_SIZE if self.train else 0.0
        keep = (sizes > 0).all(dim=1) & (sizes >= min_size).all(dim=1)
        out = dict(target)
        out["boxes"] = boxes[keep]
        for key in INSTANCE_KEYS:
            if key in target:
                out[key] = torch.as_tensor(target[key])[keep]
        if keypoints is not None:
            points = keypoints.as_subclass(torch.Tensor)
            visible = visibility > 0
            points = torch.where(visible.unsqueeze(-1), points, torch.zeros_like(points))
            points = torch.cat([points, visibility.unsqueeze(-1)], dim=-1)
            out["keypoints"] = points[keep]
        return out


def _follow(op, pixels, boxes, keypoints, *args, **kwargs):
    """One v2 functional applied to the pixels and to the boxes and keypoints there are."""
    pixels = op(pixels, *args, **kwargs)
    if boxes is not None:
        boxes = op(boxes, *args, **kwargs)
    if keypoints is not None:
        keypoints = op(keypoints, *args, **kwargs)
    return pixels, boxes, keypoints


def _as_uint8_chw(image) -> torch.Tensor:
    if isinstance(image, Image.Image):
        if image.mode != "RGB":
            image = image.convert("RGB")
        return F.pil_to_tensor(image)
    if isinstance(image, torch.Tensor) and image.dtype == torch.uint8 and image.ndim == 3:
        return image.as_subclass(torch.Tensor)
    raise TypeError(f"expected a PIL image or a uint8 CHW tensor, got {type(image).__name__}")


def _read_target(target: Optional[Dict], canvas: Tuple[int, int]):
    """BoundingBoxes, KeyPoints [N, K, 2] and their visibility [N, K]; None for what is missing."""
    if target is None:
        return None, None, None
    boxes = torch.as_tensor(target["boxes"], dtype=torch.float32).reshape(-1, 4)
    boxes = tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=canvas)
    if target.get("keypoints") is None:
        return boxes, None, None
    points = torch.as_tensor(target["keypoints"], dtype=torch.float32)
    if points.ndim != 3:  # COCO's flat [x, y, v, x, y, v, ...] per instance, or no instances
        points = points.reshape(len(boxes), -1, 3) if len(boxes) else points.reshape(0, 0, 3)
    return boxes, tv_tensors.KeyPoints(points[..., :2], canvas_size=canvas), points[..., 2]


def _visibility_inside(keypoints: tv_tensors.KeyPoints, visibility: torch.Tensor) -> torch.Tensor:
    """The visibility, 0 for keypoints outside the canvas (the crop, or the whole image)."""
    height, width = keypoints.canvas_size
    x, y = keypoints[..., 0].as_subclass(torch.Tensor), keypoints[..., 1].as_subclass(torch.Tensor)
    inside = (x >= 0) & (x <= width) & (y >= 0) & (y <= height)
    return torch.where(inside, visibility, torch.zeros_like(visibility))


def _sampled_point(method: str, boxes: Optional[torch.Tensor], keypoints: Optional[torch.Tensor],
                   visibility: Optional[torch.Tensor], width: int, height: int, crop_w: int,
                   crop_h: int) -> Optional[torch.Tensor]:
    """A crop centre from the annotations: visible keypoints, else box centres; None if neither."""
    points = torch.zeros(0, 2)
    if keypoints is not None:
        flat = keypoints.as_subclass(torch.Tensor).reshape(-1, 2)
        points = flat[visibility.reshape(-1) > 0]
    if not len(points) and boxes is not None:
        plain = boxes.as_subclass(torch.Tensor)
        points = (plain[:, :2] + plain[:, 2:]) / 2
    inside = (points[:, 0] >= 0) & (points[:, 0] <= width) & (points[:, 1] >= 0) & (points[:, 1] <= height)
    points = points[inside]
    if not len(points):
        return None
    if method == "keypoint":
        return points[int(torch.randint(len(points), ()))]
    # density: a point, weighted by how many annotations (itself included) one crop around it holds
    gaps = (points[:, None, :] - points[None, :, :]).abs()
    neighbours = ((gaps[..., 0] <= crop_w / 2) & (gaps[..., 1] <= crop_h / 2)).sum(dim=1)
    return points[int(torch.multinomial(neighbours.to(torch.float32), 1))]


def _enhance_details(pixels: torch.Tensor, gain: float) -> torch.Tensor:
    """x + gain * (x - 3x3 mean), clipped to [0, 1]: sharpening and edge enhancement alike."""
    if gain <= 0:
        return pixels
    padded = tnf.pad(pixels.unsqueeze(0), (1, 1, 1, 1), mode="replicate").squeeze(0)
    rows = padded[:, :, :-2] + padded[:, :, 1:-1] + padded[:, :, 2:]
    box_sum = rows[:, :-2] + rows[:, 1:-1] + rows[:, 2:]
    return (pixels * (1 + gain)).sub_(box_sum, alpha=gain / 9).clamp_(0, 1)
