"""data.augment: boxes and keypoints stay on what they annotate through crop, resize, pad and flip;
sizes are exact; validation is plain; the same torch seed repeats the same augmentation."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image, ImageDraw

from app.data.schema import AugmentConfig
from app.data.augment import build_transform, input_size_ok
from app.data.images import IMAGENET_MEAN, IMAGENET_STD

# Nothing random unless a test asks for it.
PLAIN = {"hflip": 0.0, "crop_size": None, "crop_ratio": 0.0, "max_shift": 0.0, "crop_sampling": "uniform"}


def augment(**overrides):
    """data.augment as the training stage receives it: PLAIN, then `overrides` (dotted keys nest)."""
    config = OmegaConf.structured(AugmentConfig)
    for key, value in {**PLAIN, **overrides}.items():
        OmegaConf.update(config, key.replace("__", "."), value, merge=False)
    return config


def rectangle(width, height, box):
    """Black image with the white rectangle [x0, x1) x [y0, y1) in continuous pixel coordinates."""
    image = Image.new("RGB", (width, height))
    x0, y0, x1, y1 = box
    ImageDraw.Draw(image).rectangle([x0, y0, x1 - 1, y1 - 1], fill="white")
    return image


def target_for(box, label=1):
    """One instance: its box and its four corners as keypoints (top-left, top-right, bottom-right,
    bottom-left), all visible."""
    x0, y0, x1, y1 = box
    corners = [[x0, y0, 2], [x1, y0, 2], [x1, y1, 2], [x0, y1, 2]]
    return {"boxes": torch.tensor([box], dtype=torch.float32), "labels": torch.tensor([label]),
            "keypoints": torch.tensor([corners], dtype=torch.float32)}


def white_bounds(pixels):
    """[x0, y0, x1, y1] around the pixels brighter than mid-grey; None when there are none."""
    bright = pixels.mean(dim=0) > 0.5
    if not bright.any():
        return None
    ys, xs = torch.nonzero(bright, as_tuple=True)
    return torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)


def run(transform, image, target=None, seed=0):
    torch.manual_seed(seed)
    return transform(image, target)


def assert_on_rectangle(pixels, target, tolerance=1.5):
    """The box bounds the white pixels and the corner keypoints sit on the box's corners."""
    bounds = white_bounds(pixels)
    if len(target["boxes"]) == 0:
        assert bounds is None or ((bounds[2:] - bounds[:2]) <= 2).any()
        return
    box = target["boxes"][0]
    assert bounds is not None
    assert torch.allclose(box, bounds, atol=tolerance), (box, bounds)
    x0, y0, x1, y1 = box.tolist()
    for x, y, visibility in target["keypoints"][0].tolist():
        if visibility > 0:
            assert min(abs(x - x0), abs(x - x1)) < 1e-3 and min(abs(y - y0), abs(y - y1)) < 1e-3, (x, y, box)


def test_box_and_corner_keypoints_follow_the_shape_through_resize_and_pad():
    box = (20, 10, 70, 40)
    transform = build_transform(augment(), image_size=64, train=False, normalize=False)
    pixels, target = transform(rectangle(120, 80, box), target_for(box))
    assert pixels.shape == (3, 64, 64)
    assert_on_rectangle(pixels, target)
    # The top-left corner stays the top-left corner.
    assert target["keypoints"][0, 0, :2].tolist() == target["boxes"][0, :2].tolist()


def test_a_flip_moves_boxes_and_keypoints_with_the_image():
    box = (10, 20, 40, 50)
    transform = build_transform(augment(hflip=1.0), image_size=64, train=True, normalize=False)
    pixels, target = run(transform, rectangle(64, 64, box), target_for(box))
    assert white_bounds(pixels).tolist() == [24, 20, 54, 50]
    assert target["boxes"].tolist() == [[24, 20, 54, 50]]
    # The former top-left corner is now the top-right one: x maps to width - x, like the box.
    assert target["keypoints"][0, 0].tolist() == [54, 20, 2]


@pytest.mark.parametrize("sampling", ["uniform", "keypoint", "density", "hybrid"])
@pytest.mark.parametrize("keep_ratio", [True, False])
def test_crops_flips_and_resizes_keep_annotations_on_the_shape(sampling, keep_ratio):
    box = (30, 25, 80, 60)
    config = augment(crop_size=[48, 40], crop_ratio=1.0, max_shift=0.4, crop_sampling=sampling, hflip=0.5,
                     resize__keep_ratio=keep_ratio, resize__height=48, resize__width=64)
    transform = build_transform(config, image_size=32, train=True, normalize=False)
    for seed in range(12):
        pixels, target = run(transform, rectangle(128, 96, box), target_for(box), seed)
        assert pixels.shape == (3, 48, 64)
        assert_on_rectangle(pixels, target)


def test_keep_ratio_pads_centred_and_preserves_the_aspect_ratio():
    white = Image.new("RGB", (128, 64), "white")
    transform = build_transform(augment(), image_size=64, train=False, normalize=False)
    pixels, _ = transform(white, None)
    assert white_bounds(pixels).tolist() == [0, 16, 64, 48]  # 2:1 kept, black bands above and below
    assert pixels[:, :16].max() == 0 and pixels[:, 48:].max() == 0


def test_without_keep_ratio_the_image_is_stretched_to_fill():
    white = Image.new("RGB", (128, 64), "white")
    transform = build_transform(augment(resize__keep_ratio=False), image_size=64, train=False, normalize=False)
    pixels, _ = transform(white, None)
    assert pixels.min() == 1.0


@pytest.mark.parametrize("size", [(17, 90), (200, 33), (64, 64), (8, 8)])
def test_output_size_is_exactly_resize_height_by_width(size):
    config = augment(resize__height=40, resize__width=56, crop_size=[24, 24], crop_ratio=0.5, hflip=0.5)
    for train in (True, False):
        transform = build_transform(config, image_size=99, train=train, normalize=True)
        for seed in range(4):
            pixels, _ = run(transform, Image.new("RGB", size, "red"), None, seed)
            assert pixels.shape == (3, 40, 56) and pixels.dtype == torch.float32


def test_resize_defaults_to_data_image_size():
    pixels, _ = build_transform(augment(), image_size=48, train=False, normalize=False)(Image.new("RGB", (80, 60)))
    assert pixels.shape == (3, 48, 48)


def test_keypoint_sampling_crops_around_a_visible_keypoint():
    target = {"boxes": torch.tensor([[100.0, 5.0, 110.0, 15.0], [2.0, 2.0, 6.0, 6.0]]), "labels": torch.tensor([1, 2]),
              "keypoints": torch.tensor([[[105.0, 10.0, 2]], [[4.0, 4.0, 0]]])}  # the second is not labelled
    config = augment(crop_size=[32, 32], crop_ratio=1.0, max_shift=0.5, crop_sampling="keypoint",
                     resize__keep_ratio=False)
    transform = build_transform(config, image_size=32, train=True, normalize=False)
    for seed in range(20):
        _, out = run(transform, Image.new("RGB", (128, 128)), target, seed)
        assert out["labels"].tolist() == [1]
        assert out["keypoints"][0, 0, 2] == 2


def test_keypoint_sampling_falls_back_to_box_centres_then_anywhere():
    config = augment(crop_size=[16, 16], crop_ratio=1.0, crop_sampling="keypoint", resize__keep_ratio=False)
    transform = build_transform(config, image_size=16, train=True, normalize=False)
    boxes_only = {"boxes": torch.tensor([[96.0, 96.0, 104.0, 104.0]]), "labels": torch.tensor([3])}
    for seed in range(10):
        _, out = run(transform, Image.new("RGB", (128, 128)), boxes_only, seed)
        assert out["boxes"].tolist() == [[4.0, 4.0, 12.0, 12.0]]
        pixels, none = run(transform, Image.new("RGB", (128, 128)), None, seed)  # classification
        assert none is None and pixels.shape == (3, 16, 16)


def test_density_sampling_prefers_the_crowd():
    # Nine animals close together (labels 0-8), nine alone along the border (labels 9-17): a random
    # keypoint lands in the crowd half of the time, density sampling nine times out of ten.
    crowd = [[[60.0 + i, 60.0 + i, 2]] for i in range(9)]
    loners = [[[x, y, 2]] for x, y in [(5, 5), (5, 64), (5, 123), (64, 5), (123, 5), (123, 64), (123, 123),
                                       (64, 123), (30, 123)]]
    keypoints = torch.tensor(crowd + loners, dtype=torch.float32)
    boxes = torch.cat([keypoints[:, 0, :2] - 1, keypoints[:, 0, :2] + 1], dim=1)
    target = {"boxes": boxes, "labels": torch.arange(18), "keypoints": keypoints}
    config = augment(crop_size=[24, 24], crop_ratio=1.0, crop_sampling="density", resize__keep_ratio=False)
    transform = build_transform(config, image_size=24, train=True, normalize=False)
    crowd_crops = 0
    for seed in range(20):
        _, out = run(transform, Image.new("RGB", (128, 128)), target, seed)
        crowd_crops += any(label < 9 for label in out["labels"].tolist())
    assert crowd_crops >= 15


def test_boxes_cropped_away_leave_with_their_labels_keypoints_and_iscrowd():
    target = {"boxes": torch.tensor([[4.0, 4.0, 20.0, 20.0], [90.0, 90.0, 120.0, 120.0]]),
              "labels": torch.tensor([7, 8]), "iscrowd": torch.tensor([0, 1]), "image_id": 42,
              "keypoints": torch.tensor([[[12.0, 12.0, 2], [30.0, 30.0, 1]], [[100.0, 100.0, 0], [0, 0, 0]]])}
    config = augment(crop_size=[32, 32], crop_ratio=1.0, crop_sampling="keypoint", resize__keep_ratio=False)
    transform = build_transform(config, image_size=32, train=True, normalize=False)
    _, out = run(transform, Image.new("RGB", (128, 128)), target)
    assert out["labels"].tolist() == [7] and out["iscrowd"].tolist() == [0] and out["image_id"] == 42
    assert out["boxes"].shape == (1, 4) and out["keypoints"].shape == (1, 2, 3)
    assert out["labels"].dtype == torch.int64 and out["boxes"].dtype == torch.float32


def test_keypoints_that_leave_the_image_become_invisible_at_zero():
    # The crop (32 px around the first keypoint, at most 16 px away) can never reach x = 120.
    target = {"boxes": torch.tensor([[0.0, 0.0, 128.0, 128.0]]), "labels": torch.tensor([1]),
              "keypoints": torch.tensor([[[10.0, 10.0, 2], [120.0, 120.0, 2], [50.0, 50.0, 0]]])}
    config = augment(crop_size=[32, 32], crop_ratio=1.0, crop_sampling="uniform", resize__keep_ratio=False)
    transform = build_transform(config, image_size=32, train=True, normalize=False)
    for seed in range(10):
        _, out = run(transform, Image.new("RGB", (128, 128)), target, seed)
        for x, y, visibility in out["keypoints"][0].tolist():
            if visibility == 0:
                assert (x, y) == (0.0, 0.0)
            else:
                assert 0 <= x <= 32 and 0 <= y <= 32
    # Without a crop an annotation outside the image is invisible too, and boxes are clipped.
    outside = {"boxes": torch.tensor([[-10.0, 5.0, 40.0, 90.0]]), "labels": torch.tensor([1]),
               "keypoints": torch.tensor([[[-3.0, 5.0, 2], [70.0, 20.0, 1]]])}
    _, out = build_transform(augment(), 64, train=False, normalize=False)(Image.new("RGB", (64, 64)), outside)
    assert out["boxes"].tolist() == [[0.0, 5.0, 40.0, 64.0]]
    assert out["keypoints"].tolist() == [[[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]]


def test_validation_is_plain_and_deterministic():
    box = (10, 20, 40, 50)
    config = augment(hflip=1.0, crop_size=[16, 16], crop_ratio=1.0, sharpening=True, sharpenratio=1.0, edge=True,
                     color_jitter__brightness=0.8, color_jitter__hue=0.3)
    transform = build_transform(config, image_size=64, train=False, normalize=False)
    image = rectangle(64, 64, box)
    state = torch.get_rng_state()
    first, first_target = run(transform, image, target_for(box), seed=1)
    assert torch.equal(torch.get_rng_state(), torch.manual_seed(1).get_state())  # drew nothing
    second, _ = run(transform, image, target_for(box), seed=2)
    torch.set_rng_state(state)
    assert torch.equal(first, second)
    assert first_target["boxes"].tolist() == [list(map(float, box))]  # not flipped, not cropped
    assert set(first.unique().tolist()) == {0.0, 1.0}  # no jitter, no sharpening


def test_the_same_torch_seed_repeats_the_same_augmentation():
    box = (30, 25, 80, 60)
    config = augment(crop_size=[48, 40], crop_ratio=0.5, max_shift=0.4, crop_sampling="hybrid", hflip=0.5,
                     sharpening=True, sharpenratio=0.5, edge=True, color_jitter__brightness=0.4,
                     color_jitter__contrast=0.4, color_jitter__saturation=0.4, color_jitter__hue=0.1)
    transform = build_transform(config, image_size=48, train=True, normalize=True)
    image = rectangle(128, 96, box).convert("RGB")
    outputs = []
    for seed in (5, 5, 6, 7):
        pixels, target = run(transform, image, target_for(box), seed)
        outputs.append((pixels, target))
    (a, ta), (b, tb) = outputs[:2]
    assert torch.equal(a, b) and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert any(not torch.equal(a, other) for other, _ in outputs[2:])


def test_hflip_zero_never_flips_and_one_always_flips():
    box = (4, 4, 20, 20)
    image = rectangle(64, 64, box)
    never = build_transform(augment(hflip=0.0), 64, train=True, normalize=False)
    always = build_transform(augment(hflip=1.0), 64, train=True, normalize=False)
    for seed in range(10):
        assert white_bounds(run(never, image, None, seed)[0]).tolist() == [4, 4, 20, 20]
        assert white_bounds(run(always, image, None, seed)[0]).tolist() == [44, 4, 60, 20]


def test_keypoint_flip_index_swaps_left_and_right():
    target = {"boxes": torch.tensor([[10.0, 10.0, 30.0, 30.0]]), "labels": torch.tensor([1]),
              "keypoints": torch.tensor([[[10.0, 20.0, 2], [30.0, 20.0, 1]]])}  # left eye, right eye
    transform = build_transform(augment(hflip=1.0), 64, train=True, normalize=False, keypoint_flip_index=[1, 0])
    _, out = run(transform, Image.new("RGB", (64, 64)), target)
    assert out["keypoints"].tolist() == [[[34.0, 20.0, 1.0], [54.0, 20.0, 2.0]]]


def test_normalize_gives_imagenet_statistics_and_otherwise_zero_to_one():
    white = Image.new("RGB", (32, 32), "white")
    plain, _ = build_transform(augment(), 32, train=False, normalize=False)(white)
    assert plain.min() == 1.0 and plain.max() == 1.0
    normalised, _ = build_transform(augment(), 32, train=False, normalize=True)(white)
    expected = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(normalised[:, 0, 0], expected)


def test_sharpening_and_edge_enhance_edges_but_leave_flat_areas():
    config = augment(sharpening=True, sharpenratio=1.0, edge=True)
    transform = build_transform(config, 64, train=True, normalize=False)
    flat = Image.new("RGB", (64, 64), (128, 128, 128))
    pixels, _ = run(transform, flat)
    assert torch.allclose(pixels, torch.full_like(pixels, 128 / 255))
    grey_square = Image.new("RGB", (64, 64), (100, 100, 100))
    ImageDraw.Draw(grey_square).rectangle([16, 16, 47, 47], fill=(150, 150, 150))
    plain, _ = build_transform(augment(), 64, train=False, normalize=False)(grey_square)
    sharpened, _ = run(transform, grey_square, seed=3)
    assert 0 <= sharpened.min() and sharpened.max() <= 1
    assert (sharpened - plain).abs().max() > 0.05  # edges stand out more
    assert torch.allclose(sharpened[:, 30, 30], plain[:, 30, 30])  # the middle of the square is flat


def test_crop_size_is_in_pixels_of_the_globally_scaled_image():
    # global_scale 0.5: a 32 px crop of the scaled image is 64 px of the original, shown at 64 px.
    box = (40, 40, 60, 60)
    config = augment(global_scale=0.5, crop_size=[32, 32], crop_ratio=1.0, crop_sampling="keypoint",
                     resize__keep_ratio=False)
    transform = build_transform(config, 64, train=True, normalize=False)
    for seed in range(5):
        pixels, out = run(transform, rectangle(200, 200, box), target_for(box), seed)
        x0, y0, x1, y1 = out["boxes"][0].tolist()
        assert (x1 - x0, y1 - y0) == (20.0, 20.0)
        assert_on_rectangle(pixels, out)


def test_takes_a_uint8_tensor_like_a_pil_image_and_any_object_with_the_attributes():
    box = (10, 20, 40, 50)
    image = rectangle(96, 64, box)
    tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()
    from_config = build_transform(augment(), 48, train=False, normalize=False)
    from_dataclass = build_transform(AugmentConfig(), 48, train=False, normalize=False)
    a, ta = from_config(image, target_for(box))
    b, tb = from_config(tensor, target_for(box))
    c, tc = from_dataclass(image.convert("L"), target_for(box))
    assert torch.equal(a, b) and torch.equal(ta["boxes"], tb["boxes"]) and torch.equal(ta["boxes"], tc["boxes"])
    assert c.shape == a.shape


def test_input_size_ok_bounds_the_longer_side_after_global_scale():
    config = augment(global_scale=0.5, min_input_size=32, max_input_size=100)
    assert input_size_ok(64, 10, config)  # 32 after scaling: the bound is inclusive
    assert not input_size_ok(62, 62, config)
    assert input_size_ok(200, 40, config)
    assert not input_size_ok(40, 202, config)


def test_the_transform_pickles_for_loader_workers():
    config = augment(crop_size=[16, 16], crop_ratio=1.0, hflip=0.5, color_jitter__brightness=0.3, sharpening=True)
    transform = build_transform(config, 32, train=True, normalize=True)
    copy = pickle.loads(pickle.dumps(transform))
    image = rectangle(64, 48, (8, 8, 30, 30))
    assert torch.equal(run(transform, image, None, 3)[0], run(copy, image, None, 3)[0])
