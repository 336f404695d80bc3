"""Detection and keypoint tasks of the training stage: annotations, models, metrics."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from app.data.scan import list_images, resolve_input_dir
from app.data.shapes import ensure_shapes
from app.errors import UserError
from app.train.annotations import load_annotations, split_annotated
from app.train.metrics import DEFAULT_KEYPOINT_SIGMA
from app.train.tasks import spec_for


def build_model(task: str, *args, **kwargs):
    """The task spec builds its model."""
    return spec_for(task).build_model(*args, **kwargs)


def make_evaluator(task: str, annotations):
    """The task spec makes its evaluator."""
    return spec_for(task).make_evaluator(annotations)


def coco_cfg(path: Path):
    return OmegaConf.create({"name": "coco", "input_dir": str(path.parent), "annotations": str(path)})


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return ensure_shapes(tmp_path_factory.mktemp("shapes"), 30, 64)


# ---------------------------------------------------------------------------------------------
# Annotations
# ---------------------------------------------------------------------------------------------
def test_shapes_coco_annotations_become_xyxy_targets_keyed_by_scanned_file(shapes):
    coco = json.loads((shapes / "annotations.json").read_text())
    cfg = OmegaConf.create({"name": "shapes"})
    detection = load_annotations(cfg, shapes, "detection")
    assert detection.classes == ["__background__", "circle", "square", "triangle"]
    assert sorted(detection.targets) == list_images(shapes)
    first = coco["annotations"][0]
    x, y, w, h = first["bbox"]
    target = detection.targets[coco["images"][0]["file_name"]]
    assert torch.allclose(target["boxes"], torch.tensor([[x, y, x + w, y + h]]))
    assert target["labels"].tolist() == [first["category_id"]] and target["labels"].dtype == torch.int64
    assert "keypoints" not in target

    keypoints = load_annotations(cfg, shapes, "keypoints")
    assert keypoints.num_keypoints == 4 and keypoints.keypoint_names == [f"corner_{k}" for k in range(4)]
    triangle = next(t for name, t in keypoints.targets.items() if name.startswith("triangle/"))
    assert triangle["keypoints"].shape == (1, 4, 3) and triangle["keypoints"].dtype == torch.float32
    assert triangle["keypoints"][0, :, 2].tolist() == [2, 2, 2, 0]

    classification = load_annotations(cfg, shapes, "classification")
    assert classification.classes == ["circle", "square", "triangle"]
    assert all(int(t["label"]) == ["circle", "square", "triangle"].index(name.split("/")[0])
               for name, t in classification.targets.items())


def test_coco_rules_crowd_negatives_degenerate_and_category_ids(tmp_path, caplog):
    keypoints = [10, 10, 2, 20, 20, 1]
    coco = {
        "images": [{"id": 1, "file_name": "./a.png"}, {"id": 2, "file_name": "sub/b.png"},
                   {"id": 3, "file_name": "c.png"}],
        "categories": [{"id": 7, "name": "zebra", "keypoints": ["head", "tail"]},
                       {"id": 3, "name": "ant", "keypoints": ["head", "tail"]}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 7, "bbox": [1, 2, 10, 20], "keypoints": keypoints},
            {"id": 2, "image_id": 1, "category_id": 3, "bbox": [5, 5, 4, 4]},  # no keypoints
            {"id": 3, "image_id": 2, "category_id": 3, "bbox": [0, 0, 30, 30], "iscrowd": 1},
            {"id": 4, "image_id": 3, "category_id": 3, "bbox": [4, 4, 0, 9], "keypoints": keypoints},
        ],
    }
    path = tmp_path / "annotations.json"
    path.write_text(json.dumps(coco))
    with caplog.at_level(logging.WARNING, logger="thresher"):
        detection = load_annotations(coco_cfg(path), tmp_path, "detection")
    assert "1 boxes of zero width or height dropped" in caplog.text
    assert detection.classes == ["__background__", "ant", "zebra"]  # sorted by category id: 3, 7
    assert detection.targets["a.png"]["boxes"].tolist() == [[1, 2, 11, 22], [5, 5, 9, 9]]
    assert detection.targets["a.png"]["labels"].tolist() == [2, 1]
    for negative in ("sub/b.png", "c.png"):  # only a crowd box; only a degenerate box
        assert detection.targets[negative]["boxes"].shape == (0, 4)
        assert detection.targets[negative]["labels"].shape == (0,)

    points = load_annotations(coco_cfg(path), tmp_path, "keypoints")
    assert points.num_keypoints == 2 and points.keypoint_names == ["head", "tail"]
    assert points.targets["a.png"]["labels"].tolist() == [2]  # the box without keypoints is left out
    assert points.targets["a.png"]["keypoints"].tolist() == [[[10, 10, 2], [20, 20, 1]]]
    assert points.targets["c.png"]["keypoints"].shape == (0, 2, 3)

    kept, left_out = split_annotated(["a.png", "d.png"], detection)
    assert kept == ["a.png"] and "not in" in left_out["d.png"]


def write_pet_layout(root: Path) -> None:
    """A tiny Oxford-IIIT Pet: 4 images, head boxes for 3, trainval.txt, a trimap that is no input."""
    (root / "images").mkdir(parents=True)
    (root / "annotations" / "xmls").mkdir(parents=True)
    (root / "annotations" / "trimaps").mkdir(parents=True)
    for name in ("Abyssinian_1", "Abyssinian_2", "beagle_7", "Bombay_3"):
        Image.new("RGB", (40, 30), (120, 60, 30)).save(root / "images" / f"{name}.jpg")
    Image.new("L", (40, 30)).save(root / "annotations" / "trimaps" / "Abyssinian_1.png")
    for name, box, kind in (("Abyssinian_1", (3, 4, 20, 25), "cat"), ("beagle_7", (10, 2, 30, 12), "dog"),
                            ("Bombay_3", (1, 1, 9, 9), "cat")):
        (root / "annotations" / "xmls" / f"{name}.xml").write_text(
            f"<annotation><filename>{name}.jpg</filename><size><width>40</width><height>30</height>"
            f"<depth>3</depth></size><object><name>{kind}</name><pose>Frontal</pose><bndbox>"
            f"<xmin>{box[0]}</xmin><ymin>{box[1]}</ymin><xmax>{box[2]}</xmax><ymax>{box[3]}</ymax>"
            f"</bndbox><difficult>0</difficult></object></annotation>")
    (root / "annotations" / "trainval.txt").write_text(
        "#Image CLASS-ID SPECIES BREED-ID\nAbyssinian_1 1 1 1\nbeagle_7 5 2 3\nBombay_3 8 1 4\n")


def test_oxford_pet_layout_gives_head_boxes_by_species_or_breed(tmp_path):
    write_pet_layout(tmp_path)
    cfg = OmegaConf.create({"name": "oxford_pet", "root": str(tmp_path), "classes": "species"})
    input_dir = resolve_input_dir(cfg)
    assert input_dir == tmp_path / "images"
    assert list_images(input_dir) == ["Abyssinian_1.jpg", "Abyssinian_2.jpg", "Bombay_3.jpg", "beagle_7.jpg"]

    species = load_annotations(cfg, input_dir, "detection")
    assert species.classes == ["__background__", "cat", "dog"]
    assert species.targets["Abyssinian_1.jpg"]["boxes"].tolist() == [[3, 4, 20, 25]]
    assert species.targets["beagle_7.jpg"]["labels"].tolist() == [2]
    assert species.targets["Bombay_3.jpg"]["labels"].tolist() == [1]
    assert "Abyssinian_2.jpg" not in species.targets
    assert "Abyssinian_2.xml does not exist" in species.skipped["Abyssinian_2.jpg"]

    cfg.classes = "breed"
    breed = load_annotations(cfg, input_dir, "detection")
    assert breed.classes == ["__background__", "Abyssinian", "beagle", "Bombay"]  # case-insensitive order
    assert breed.targets["Bombay_3.jpg"]["labels"].tolist() == [3]
    # Classification needs no head box: every image has its class from its name.
    labels = {name: int(t["label"]) for name, t in load_annotations(cfg, input_dir, "classification").targets.items()}
    assert labels == {"Abyssinian_1.jpg": 0, "Abyssinian_2.jpg": 0, "Bombay_3.jpg": 2, "beagle_7.jpg": 1}

    with pytest.raises(UserError, match="no keypoints"):
        load_annotations(cfg, input_dir, "keypoints")


@pytest.mark.parametrize("case", ["not_json", "bbox_short", "unknown_category", "unknown_image", "keypoints_count",
                                  "bad_xml", "xml_without_numbers", "bad_trainval"])
def test_malformed_annotation_files_are_refused_with_one_line_naming_the_file(tmp_path, case):
    coco = {"images": [{"id": 1, "file_name": "a.png"}],
            "categories": [{"id": 1, "name": "thing", "keypoints": ["a", "b"]}],
            "annotations": [{"id": 9, "image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5],
                             "keypoints": [1, 1, 2, 2, 2, 2]}]}
    task = "detection"
    if case in ("bad_xml", "xml_without_numbers", "bad_trainval"):
        write_pet_layout(tmp_path)
        xml = tmp_path / "annotations" / "xmls" / "beagle_7.xml"
        if case == "bad_xml":
            xml.write_text("<annotation><object><bndbox></object>")
            culprit = xml
        elif case == "xml_without_numbers":
            xml.write_text("<annotation><object><bndbox><xmin>a</xmin></bndbox></object></annotation>")
            culprit = xml
        else:
            culprit = tmp_path / "annotations" / "trainval.txt"
            culprit.write_text("Abyssinian_1 1 cat\n")
        cfg = OmegaConf.create({"name": "oxford_pet", "root": str(tmp_path), "classes": "species"})
    else:
        culprit = tmp_path / "annotations.json"
        annotation = coco["annotations"][0]
        if case == "bbox_short":
            annotation["bbox"] = [0, 0, 5]
        elif case == "unknown_category":
            annotation["category_id"] = 4
        elif case == "unknown_image":
            annotation["image_id"] = 2
        elif case == "keypoints_count":
            annotation["keypoints"] = [1, 1, 2]
            task = "keypoints"
        culprit.write_text("{'images': [" if case == "not_json" else json.dumps(coco))
        cfg = coco_cfg(culprit)
    with pytest.raises(UserError) as raised:
        load_annotations(cfg, resolve_input_dir(cfg), task)
    message = str(raised.value)
    assert str(culprit) in message and "\n" not in message


def test_folder_data_has_no_boxes_for_a_detector(tmp_path):
    cfg = OmegaConf.create({"name": "folder", "input_dir": str(tmp_path)})
    with pytest.raises(UserError, match="data=folder has no boxes or keypoints"):
        load_annotations(cfg, tmp_path, "detection")


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------
def tiny_batch(task: str, num_keypoints: int = 4):
    """Two 64x64 images: one with a box (and keypoints), one negative."""
    torch.manual_seed(0)
    images = torch.rand(2, 3, 64, 64)
    if task == "classification":
        return images, torch.tensor([0, 2])
    points = torch.tensor([[[12.0, 10, 2], [40, 12, 2], [40, 44, 2], [12, 44, 0]]])[:, :num_keypoints]
    targets = [{"boxes": torch.tensor([[10.0, 8, 42, 46]]), "labels": torch.tensor([2])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    if task == "keypoints":
        targets[0]["keypoints"] = points
        targets[1]["keypoints"] = torch.zeros(0, num_keypoints, 3)
    return images, targets


@pytest.mark.parametrize("task, name", [("classification", "resnet18"),
                                        pytest.param("detection", "fasterrcnn_mobilenet_v3_large_fpn",
                                                     marks=pytest.mark.slow),  # seconds each on two cores
                                        pytest.param("keypoints", "keypointrcnn_resnet50_fpn",
                                                     marks=pytest.mark.slow)])
def test_each_task_model_builds_takes_a_training_step_and_predicts(task, name, caplog):
    from app.models import forget_warnings

    forget_warnings()  # an earlier test in this process may have built the same model
    with caplog.at_level(logging.WARNING, logger="thresher"):
        model = build_model(task, name, num_classes=4 if task != "classification" else 3, num_keypoints=4,
                            weights=None, image_size=64)
    assert "RANDOMLY INITIALISED" in caplog.text
    if task != "classification":  # fewer proposals and detections than torchvision's: a fast CPU test
        model.rpn._pre_nms_top_n = model.rpn._post_nms_top_n = dict(training=32, testing=32)
        model.roi_heads.fg_bg_sampler.batch_size_per_image = 16
        model.roi_heads.detections_per_img = 4
    spec = spec_for(task)
    images, targets = spec.move_batch(*tiny_batch(task), torch.device("cpu"))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    model.train()
    loss, parts = spec.training_loss(model, images, targets)
    loss.backward()
    optimizer.step()
    assert math.isfinite(loss.item()) and parts and all(math.isfinite(v) for v in parts.values())
    if task == "keypoints":
        assert "loss_keypoint" in parts

    outputs = spec.predict(model, images)
    assert model.training  # predict restores the mode it found
    assert len(outputs) == 2
    if task == "classification":
        assert outputs[0]["scores"].shape == (3,)
    else:
        assert set(outputs[0]) >= {"boxes", "labels", "scores"}
        if task == "keypoints":
            assert outputs[0]["keypoints"].shape[1:] == (4, 3)
    if task != "classification":  # square inputs of image_size are not rescaled to 800
        assert model.transform.min_size == (64,) and model.transform.max_size == 64
    evaluator = make_evaluator(task, Classes(4, 4 if task == "keypoints" else 0))
    evaluator.update(outputs, targets)
    assert all(0.0 <= value <= 1.0 for value in evaluator.compute().values())


def test_weights_by_path_load_every_fitting_tensor_and_keep_a_new_predictor(tmp_path, caplog):
    torch.manual_seed(1)
    source = build_model("detection", "fasterrcnn_mobilenet_v3_large_fpn", 6, 0, None, 64)
    path = tmp_path / "coco.pt"
    torch.save(source.state_dict(), path)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="thresher"):
        model = build_model("detection", "fasterrcnn_mobilenet_v3_large_fpn", 3, 0, str(path), 64)
    assert "loaded" in caplog.text and "RANDOMLY" not in caplog.text
    own, theirs = model.state_dict(), source.state_dict()
    assert torch.equal(own["rpn.head.conv.0.0.weight"], theirs["rpn.head.conv.0.0.weight"])
    assert own["roi_heads.box_predictor.cls_score.weight"].shape[0] == 3  # new: the class count differs
    # As torchvision fine-tunes: frozen BatchNorm statistics and frozen early backbone blocks.
    from torchvision.ops.misc import FrozenBatchNorm2d

    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.backbone.body.modules())
    assert any(isinstance(m, FrozenBatchNorm2d) for m in model.backbone.body.modules())
    assert not model.backbone.body["0"][0].weight.requires_grad
    assert model.roi_heads.box_predictor.cls_score.weight.requires_grad
    ours, theirs = dict(model.backbone.body.named_modules()), dict(source.backbone.body.named_modules())
    assert torch.equal(ours["1.block.0.1"].running_var, theirs["1.block.0.1"].running_var)

    torch.save({"unrelated.weight": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="no tensor that fits"):
        build_model("detection", "fasterrcnn_mobilenet_v3_large_fpn", 3, 0, str(tmp_path / "other.pt"), 64)


def test_a_classifier_state_dict_loads_into_the_detector_backbone(tmp_path):
    import torchvision

    classifier = torchvision.models.mobilenet_v3_large(weights=None)
    torch.save(classifier.state_dict(), tmp_path / "imagenet.pt")
    model = build_model("detection", "fasterrcnn_mobilenet_v3_large_fpn", 3, 0, str(tmp_path / "imagenet.pt"), 64)
    assert torch.equal(model.backbone.body["0"][0].weight, classifier.features[0][0].weight)


def test_a_missing_torchvision_weights_file_is_refused_naming_where_it_belongs(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(UserError) as raised:
        build_model("detection", "fasterrcnn_mobilenet_v3_large_fpn", 3, 0,
                    "FasterRCNN_MobileNet_V3_Large_FPN_Weights.COCO_V1", 64)
    message = str(raised.value)
    assert str(tmp_path / "hub" / "checkpoints") in message and "https://download.pytorch.org/" in message
    assert "never downloads" in message and "\n" not in message


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------
class Classes:
    """What make_evaluator reads from Annotations."""

    def __init__(self, n_classes: int, num_keypoints: int = 0):
        self.classes = ["__background__"] + [f"c{i}" for i in range(1, n_classes)]
        self.num_keypoints = num_keypoints


def random_truth(rng: np.random.Generator, n_images: int, n_classes: int, num_keypoints: int = 0):
    targets = []
    for _ in range(n_images):
        n = int(rng.integers(0, 4))
        xy = rng.uniform(0, 60, size=(n, 2))
        wh = rng.uniform(8, 40, size=(n, 2))
        target = {"boxes": torch.tensor(np.hstack([xy, xy + wh]), dtype=torch.float32).reshape(-1, 4),
                  "labels": torch.tensor(rng.integers(1, n_classes, size=n), dtype=torch.int64)}
        if num_keypoints:
            points = xy[:, None, :] + rng.uniform(0, 1, size=(n, num_keypoints, 2)) * wh[:, None, :]
            visible = np.full((n, num_keypoints, 1), 2.0)
            target["keypoints"] = torch.tensor(np.concatenate([points, visible], 2), dtype=torch.float32)
        targets.append(target)
    return targets


def as_predictions(targets, shift: float = 0.0, label_offset: int = 0, n_classes: int = 3):
    outputs = []
    for target in targets:
        n = len(target["labels"])
        output = {"boxes": target["boxes"] + shift, "scores": torch.linspace(0.9, 0.5, n),
                  "labels": (target["labels"] - 1 + label_offset) % (n_classes - 1) + 1}
        if "keypoints" in target:
            output["keypoints"] = target["keypoints"] + torch.tensor([shift, shift, 0.0])
        outputs.append(output)
    return outputs


@pytest.mark.parametrize("task, num_keypoints", [("detection", 0), ("keypoints", 5)])
def test_coco_metrics_are_one_for_perfect_predictions_and_lower_for_shifted_or_wrong_ones(task, num_keypoints):
    rng = np.random.default_rng(0)
    targets = random_truth(rng, 12, 3, num_keypoints)

    def evaluate(outputs):
        evaluator = make_evaluator(task, Classes(3, num_keypoints))
        evaluator.update(outputs[:6], targets[:6])  # in two batches
        evaluator.update(outputs[6:], targets[6:])
        return evaluator.compute()

    perfect = evaluate(as_predictions(targets))
    names = ["val_map", "val_map50"] + (["val_keypoints_map", "val_keypoints_map50"] if num_keypoints else [])
    assert sorted(perfect) == sorted(names)
    assert all(value == pytest.approx(1.0) for value in perfect.values())
    shifted = evaluate(as_predictions(targets, shift=4.0))
    assert 0 < shifted["val_map"] < 1 and shifted["val_map50"] > shifted["val_map"]
    if num_keypoints:
        assert 0 < shifted["val_keypoints_map"] < 1
    wrong_class = evaluate(as_predictions(targets, label_offset=1))
    assert all(value == 0.0 for value in wrong_class.values())


def test_custom_keypoints_use_the_documented_sigma(monkeypatch):
    from pycocotools.cocoeval import COCOeval

    seen = {}
    original = COCOeval.evaluate

    def spy(self):
        seen[self.params.iouType] = np.array(getattr(self.params, "kpt_oks_sigmas", []))
        return original(self)

    monkeypatch.setattr(COCOeval, "evaluate", spy)
    targets = random_truth(np.random.default_rng(3), 4, 2, 3)
    evaluator = make_evaluator("keypoints", Classes(2, 3))
    evaluator.update(as_predictions(targets, shift=2.0, n_classes=2), targets)
    evaluator.compute()
    assert DEFAULT_KEYPOINT_SIGMA == 0.1 and np.allclose(seen["keypoints"], [DEFAULT_KEYPOINT_SIGMA] * 3)


def test_empty_validation_or_no_predictions_give_zero_not_nan():
    targets = random_truth(np.random.default_rng(1), 3, 3, 2)
    for task in ("detection", "keypoints"):
        assert set(make_evaluator(task, Classes(3, 2)).compute().values()) == {0.0}
        nothing = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
                    "scores": torch.zeros(0), "keypoints": torch.zeros(0, 2, 3)} for _ in targets]
        evaluator = make_evaluator(task, Classes(3, 2))
        evaluator.update(nothing, targets)
        assert set(evaluator.compute().values()) == {0.0}
    # Predictions but no ground-truth object at all (only negatives): 0.0 too, not COCOeval's -1.
    negatives = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    evaluator = make_evaluator("detection", Classes(3))
    evaluator.update([{"boxes": torch.tensor([[1.0, 1, 9, 9]]), "labels": torch.tensor([1]),
                       "scores": torch.tensor([0.9])}], negatives)
    assert evaluator.compute() == {"val_map": 0.0, "val_map50": 0.0}
    assert make_evaluator("classification", None).compute() == {"val_top1": 0.0}


def test_box_map_agrees_with_torchmetrics_on_a_random_case():
    from torchmetrics.detection import MeanAveragePrecision

    rng = np.random.default_rng(7)
    targets = random_truth(rng, 20, 4)
    outputs = []
    for target in targets:  # the truth jittered, some boxes missed, some false ones added
        n_extra = int(rng.integers(0, 3))
        keep = torch.tensor(rng.uniform(size=len(target["labels"])) > 0.2, dtype=torch.bool)
        boxes = target["boxes"][keep] + torch.tensor(rng.normal(0, 3, size=(int(keep.sum()), 4)), dtype=torch.float32)
        xy = torch.tensor(rng.uniform(0, 60, size=(n_extra, 2)), dtype=torch.float32)
        boxes = torch.cat([boxes, torch.cat([xy, xy + 15], 1)])
        labels = torch.cat([target["labels"][keep], torch.tensor(rng.integers(1, 4, size=n_extra))])
        scores = torch.tensor(rng.uniform(0.05, 1, size=len(labels)), dtype=torch.float32)
        outputs.append({"boxes": boxes, "labels": labels, "scores": scores})
    evaluator = make_evaluator("detection", Classes(4))
    evaluator.update(outputs, targets)
    ours = evaluator.compute()
    reference = MeanAveragePrecision(box_format="xyxy", iou_type="bbox")
    reference.update(outputs, targets)
    theirs = reference.compute()
    assert 0.05 < ours["val_map"] < 0.95
    assert ours["val_map"] == pytest.approx(float(theirs["map"]), abs=1e-6)
    assert ours["val_map50"] == pytest.approx(float(theirs["map_50"]), abs=1e-6)


def test_top1_counts_images_whose_best_class_is_the_label():
    evaluator = make_evaluator("classification", None)
    evaluator.update([{"labels": torch.tensor(1)}, {"labels": torch.tensor(0)}], torch.tensor([1, 2]))
    evaluator.update([{"labels": torch.tensor(2)}], torch.tensor([2]))
    assert evaluator.compute() == {"val_top1": pytest.approx(2 / 3)}
