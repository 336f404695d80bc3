"""The extension point for training tasks: a spec per task in app/train/tasks/, the only place
that branches on the task; config validation reads its tables from those specs; the train stage
and the profile build what they run through one TrainingSetup. Read from the source with `ast`
where the shape of the code is what is pinned."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest
import yaml

from app.train.tasks import TASKS, TaskSpec, spec_for

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "app"
TASKS_DIR = APP / "train" / "tasks"

# What every spec must implement itself (TaskSpec's are placeholders).
SPEC_METHODS = ("build_model", "collate_targets", "move_batch", "training_loss", "predictions", "make_evaluator")


@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_registered_task_provides_the_whole_spec(name):
    from app.data.schema import DATA_FORMATS

    spec = TASKS[name]
    assert isinstance(spec, TaskSpec) and spec.name == name and spec_for(name) is spec
    assert spec.model_names and spec.metrics and spec.key_metric == spec.metrics[0]
    assert spec.data_formats and set(spec.data_formats) <= set(DATA_FORMATS)
    assert set(spec.labels_from_folders) <= set(spec.data_formats)
    assert all(metric.startswith("val_") for metric in spec.metrics)
    num_classes, num_keypoints = spec.default_head
    assert num_classes > 0 and (num_keypoints > 0) == spec.keypoints
    assert not spec.keypoints or spec.boxes, "keypoints are read inside boxes"
    missing = [method for method in SPEC_METHODS if getattr(type(spec), method) is getattr(TaskSpec, method)]
    assert not missing, f"{type(spec).__name__} does not implement {missing}"


def test_an_unknown_task_is_refused_naming_the_known_ones():
    from app.errors import UserError

    with pytest.raises(UserError, match="model.task='segmentation' is not allowed: choose from classification, "
                                        "detection, keypoints"):
        spec_for("segmentation")


def test_a_model_name_belongs_to_one_task_and_every_model_yaml_to_its_own():
    owners = {}
    for spec in TASKS.values():
        for model in spec.model_names:
            assert model not in owners, f"{model} is listed by {owners[model]} and {spec.name}"
            owners[model] = spec.name
    for path in sorted((ROOT / "conf" / "model").glob("*.yaml")):
        model = yaml.safe_load(path.read_text())
        assert owners.get(model["name"]) == model["task"], path.name


def test_config_validation_tables_come_from_the_registry():
    from app import config

    assert config.TASK_MODELS == {name: spec.model_names for name, spec in TASKS.items()}
    assert config.TASK_METRICS == {name: spec.metrics for name, spec in TASKS.items()}
    assert config.TASK_DATA == {name: spec.data_formats for name, spec in TASKS.items()}
    assert config.CLASSIFIERS == TASKS["classification"].model_names


def test_a_new_task_is_a_spec_registered_and_config_checks_it_without_torch():
    """A spec registered before app.config loads is validated like the built-in ones: its models,
    its data, its metrics; and neither the registry nor the config check imports torch."""
    code = """
import sys
from app.train.tasks import TASKS
from app.train.tasks.base import TaskSpec

class CountingTask(TaskSpec):
    name = "counting"
    model_names = ("counter_net",)
    data_formats = ("shapes",)
    metrics = ("val_count_accuracy",)

TASKS["counting"] = CountingTask()
from app import cli
from app.config import register_configs, register_resolvers, validate
from app.errors import UserError
register_configs()
register_resolvers()
validate(cli.compose(["model.task=counting", "model.name=counter_net", "trainer.key_metric=val_count_accuracy"]))
for overrides, expected in (
        (["model.task=counting", "model.name=resnet18"], "choose a torchvision counting model: counter_net"),
        (["model.task=counting", "model.name=counter_net", "data=folder", "data.input_dir=."], "trains on data=shapes"),
        (["model.task=counting", "model.name=counter_net", "trainer.key_metric=val_top1"],
         "model.task=counting reports val_count_accuracy, train_loss")):
    try:
        validate(cli.compose(overrides))
    except UserError as error:
        assert expected in str(error), (expected, str(error))
    else:
        raise AssertionError(f"{overrides} were accepted")
assert "torch" not in sys.modules and "torchvision" not in sys.modules
print("checked without torch")
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "checked without torch" in result.stdout


# ---------------------------------------------------------------------------------------------
# No branch on the task outside its spec
# ---------------------------------------------------------------------------------------------
def _names_task(node: ast.AST) -> bool:
    """`task`, `cfg.model.task`, `self.task_name`..."""
    name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else ""
    return "task" in name.lower()


def _is_string_literal(node: ast.AST) -> bool:
    if isinstance(node, ast.Constant):
        return isinstance(node.value, str)
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return bool(node.elts) and all(_is_string_literal(element) for element in node.elts)
    return False


def task_branches(source: str, filename: str) -> List[str]:
    """Comparisons of a task against names spelled out (`task == "keypoints"`, `task in ("a", "b")`)
    and uses of `is_detector`: what a spec should decide instead."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(_names_task(side) for side in sides) and any(_is_string_literal(side) for side in sides):
                found.append(f"{filename}:{node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, (ast.Name, ast.Attribute)) and (getattr(node, "id", None) == "is_detector"
                                                             or getattr(node, "attr", None) == "is_detector"):
            found.append(f"{filename}:{node.lineno}: is_detector")
        elif isinstance(node, ast.FunctionDef) and node.name == "is_detector":
            found.append(f"{filename}:{node.lineno}: def is_detector")
    return found


def test_the_branch_finder_sees_each_kind_of_task_branch():
    source = ("if cfg.model.task == 'classification': pass\n"
              "x = 1 if task in ('detection', 'keypoints') else 0\n"
              "if 'keypoints' != task: pass\n"
              "if is_detector(model): pass\n"
              "if model.task not in TASK_MODELS: pass\n"  # a validity check, not a branch
              "if iou_type == 'keypoints': pass\n")  # not a task
    assert sorted(int(line.split(":")[1]) for line in task_branches(source, "x.py")) == [1, 2, 3, 4]


def test_no_module_outside_the_task_specs_branches_on_the_task():
    found = []
    for path in sorted(APP.rglob("*.py")):
        if TASKS_DIR in path.parents:
            continue
        found += task_branches(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))
    assert not found, "branches on the task belong in its spec (app/train/tasks/):\n" + "\n".join(found)


# ---------------------------------------------------------------------------------------------
# One setup for the train stage and the profile
# ---------------------------------------------------------------------------------------------
# What only app/train/setup.py builds; the loop and the profile take it from a TrainingSetup.
BUILT_BY_THE_SETUP = ("build_model", "build_optimizer", "build_scheduler", "GradScaler", "compile",
                      "DistributedDataParallel", "autocast", "build_transform", "make_collate", "loader_settings")


def _called_names(source: str) -> List[str]:
    """The functions a module calls (`build_model(...)`, `torch.compile(...)`), except the
    methods of a setup (`setup.loader_settings(...)`)."""
    names = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            function = node.func
            if isinstance(function, ast.Name):
                names.append(function.id)
            elif isinstance(function, ast.Attribute) and not (isinstance(function.value, ast.Name)
                                                              and function.value.id == "setup"):
                names.append(function.attr)
    return names


@pytest.mark.parametrize("module", ["app/train/loop.py", "app/profile/stage.py"])
def test_the_train_stage_and_the_profile_build_through_one_training_setup(module):
    source = (ROOT / module).read_text(encoding="utf-8")
    called = _called_names(source)
    assert "build" in called and "TrainingSetup" in source
    built_here = sorted(set(BUILT_BY_THE_SETUP) & set(called))
    assert not built_here, f"{module} builds {built_here} itself: take them from its TrainingSetup (or setup methods)"
