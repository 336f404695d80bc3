"""Every config mistake is refused before the first stage, naming the key the user set: values torch
refuses (found by rehearsing the loop's optimizer and scheduler on a stand-in parameter), key
metrics a task does not report, weights and embeddings files that cannot be what they claim."""
from __future__ import annotations

import json
import zipfile

import pytest
import torch

from app.config import TASK_METRICS, validate
from app.train.schema import OPTIMIZERS, SCHEDULERS
from app.errors import UserError
from app.train.loop import check_train_config
from conftest import SMALL, compose, every_nth_fast, thresher


pytestmark = pytest.mark.usefixtures("registered")


def refusal(check, *overrides) -> str:
    with pytest.raises(UserError) as refused:
        check(compose(*overrides))
    message = str(refused.value)
    assert "\n" not in message
    return message


def validated_then_checked(cfg) -> None:
    validate(cfg)
    check_train_config(cfg)


SGD = ["trainer.optimizer.type=SGD", "~trainer.optimizer.params.weight_decay"]

TORCH_REFUSALS = [
    # (overrides, how the one line starts)
    (["+trainer.optimizer.params.betas=oops"],
     "trainer.optimizer.params.betas='oops' is not allowed: AdamW fails when built (TypeError: "),
    (["+trainer.optimizer.params.betas=[0.9]"],  # a list one short
     "trainer.optimizer.params.betas=[0.9] is not allowed: AdamW fails when built (IndexError: "),
    (["+trainer.optimizer.params.betas=[1.5,0.9]"],
     "trainer.optimizer.params.betas=[1.5, 0.9] is not allowed: AdamW fails when built (ValueError: Invalid beta"),
    (["trainer.optimizer.params.weight_decay=-1"],
     "trainer.optimizer.params.weight_decay=-1 is not allowed: AdamW fails when built (ValueError: "),
    ([*SGD, "+trainer.optimizer.params.momentum=abc"],
     "trainer.optimizer.params.momentum='abc' is not allowed: SGD fails when built (TypeError: "),
    ([*SGD, "+trainer.optimizer.params.nesterov=true"],
     "trainer.optimizer.params.nesterov=True is not allowed: SGD fails when built (ValueError: Nesterov"),
    (["trainer.optimizer.type=RMSprop", "+trainer.optimizer.params.alpha=-1"],
     "trainer.optimizer.params.alpha=-1 is not allowed: RMSprop fails when built (ValueError: "),
    (["trainer.optimizer.type=Rprop", "~trainer.optimizer.params.weight_decay", "+trainer.optimizer.params.etas=[0.5]"],
     "trainer.optimizer.params.etas=[0.5] is not allowed: Rprop fails when built (IndexError: "),
    (["hardware=cpu", "+trainer.optimizer.params.capturable=true"],  # CUDA-graph state, on a CPU run
     "trainer.optimizer.params.capturable=True is not allowed: AdamW fails at its first step (AssertionError: "),
    # schedulers that build, then fail at a step
    (["trainer.scheduler.type=StepLR", "+trainer.scheduler.params.step_size=0"],
     "trainer.scheduler.params.step_size=0 is not allowed: StepLR fails when stepped after epoch 1 of "
     "trainer.epochs=3 (ZeroDivisionError: "),
    (["trainer.scheduler.type=StepLR", "+trainer.scheduler.params.step_size=abc"],
     "trainer.scheduler.params.step_size='abc' is not allowed: StepLR fails when stepped after epoch 1"),
    (["trainer.scheduler.type=StepLR", "+trainer.scheduler.params.step_size=1", "+trainer.scheduler.params.gamma=x"],
     "trainer.scheduler.params.gamma='x' is not allowed: StepLR fails when stepped after epoch 1"),
    (["trainer.scheduler.type=CosineAnnealingLR", "+trainer.scheduler.params.T_max=0",
      "trainer.scheduler.warmup_epochs=1"],  # fails where the warm-up hands over
     "trainer.scheduler.params.T_max=0 is not allowed: CosineAnnealingLR fails when stepped after epoch 1"),
    (["trainer.scheduler.type=OneCycleLR", "+trainer.scheduler.params.max_lr=0.1",
      "+trainer.scheduler.params.total_steps=2"],  # stepped once an epoch: 3 steps
     "trainer.scheduler.params.total_steps=2 is not allowed: OneCycleLR fails when stepped after epoch 3 of "
     "trainer.epochs=3 (ValueError: Tried to step 3 times"),
    (["trainer.scheduler.type=ExponentialLR", "+trainer.scheduler.params.gamma=-1"],
     "trainer.scheduler.params.gamma=-1 is not allowed: ExponentialLR fails when stepped after epoch 1 of "
     "trainer.epochs=3 (ValueError: the learning rate becomes -0.001"),
    (["trainer.scheduler.type=MultiStepLR", "+trainer.scheduler.params.milestones=5"],
     "trainer.scheduler.params.milestones=5 is not allowed: MultiStepLR fails when built (TypeError: "),
    (["trainer.scheduler.type=CosineAnnealingWarmRestarts", "+trainer.scheduler.params.T_0=0"],
     "trainer.scheduler.params.T_0=0 is not allowed: CosineAnnealingWarmRestarts fails when built (ValueError: "),
    (["trainer.scheduler.type=ReduceLROnPlateau", "+trainer.scheduler.params.mode=maxx"],
     "trainer.scheduler.params.mode='maxx' is not allowed: ReduceLROnPlateau fails when built (ValueError: "),
    # no one param to blame: the section is named, with every value
    (["trainer.scheduler.type=OneCycleLR", "+trainer.scheduler.params.max_lr=0.1"],
     "trainer.scheduler.type='OneCycleLR' with trainer.scheduler.params={'max_lr': 0.1} is not allowed: it fails "
     "when built (ValueError: You must define either total_steps"),
    (["trainer.optimizer.type=Adagrad", "trainer.scheduler.type=CyclicLR", "+trainer.scheduler.params.base_lr=0.0001",
      "+trainer.scheduler.params.max_lr=0.001"],
     "trainer.scheduler.type='CyclicLR' with trainer.scheduler.params={'base_lr': 0.0001, 'max_lr': 0.001} is "
     "not allowed: it fails when built (ValueError: optimizer must support momentum"),
]


@pytest.mark.parametrize("overrides,start",
                         every_nth_fast(TORCH_REFUSALS, 4, ids=[" ".join(o) for o, _ in TORCH_REFUSALS]))
def test_a_value_torch_refuses_is_refused_by_the_train_check_naming_the_key(overrides, start):
    overrides = ["trainer.epochs=3", *overrides]  # the messages name the epoch a scheduler fails at
    cfg = compose(*overrides)
    validate(cfg)  # the torch-free checks let it through; the rehearsal does not
    message = refusal(check_train_config, *overrides)
    assert message.startswith(start), message


# A working set of arguments for every scheduler thresher offers, stepped for trainer.epochs=3.
SCHEDULER_PARAMS = {
    "StepLR": ["step_size=1"], "MultiStepLR": ["milestones=[1,2]"], "ExponentialLR": ["gamma=0.9"],
    "CosineAnnealingLR": ["T_max=3"], "CosineAnnealingWarmRestarts": ["T_0=1"], "LinearLR": [], "ConstantLR": [],
    "PolynomialLR": [], "OneCycleLR": ["max_lr=0.01", "total_steps=3"],
    "CyclicLR": ["base_lr=0.0001", "max_lr=0.001"], "ReduceLROnPlateau": [],
}


def test_every_offered_scheduler_has_a_working_case_below():
    assert set(SCHEDULER_PARAMS) == set(SCHEDULERS)


# A warm-up cannot precede ReduceLROnPlateau: that is refused by name (below).
@pytest.mark.parametrize("scheduler,warmup", every_nth_fast([(s, w) for s in SCHEDULERS for w in (0, 1)
                                                             if not (s == "ReduceLROnPlateau" and w)], 5))
def test_every_offered_scheduler_with_working_arguments_passes_the_check(scheduler, warmup):
    validated_then_checked(compose("trainer.epochs=3", f"trainer.scheduler.type={scheduler}",
                                   f"trainer.scheduler.warmup_epochs={warmup}",
                                   *(f"+trainer.scheduler.params.{p}" for p in SCHEDULER_PARAMS[scheduler])))


@pytest.mark.parametrize("optimizer", every_nth_fast(list(OPTIMIZERS), 4))
def test_every_offered_optimizer_passes_the_check(optimizer):
    validated_then_checked(compose(f"trainer.optimizer.type={optimizer}", "~trainer.optimizer.params.weight_decay"))


def test_sgd_with_nesterov_and_a_warmed_up_step_schedule_passes_the_check():
    validated_then_checked(compose(*SGD, "+trainer.optimizer.params.momentum=0.9",
                                   "+trainer.optimizer.params.nesterov=true", "trainer.scheduler.type=StepLR",
                                   "+trainer.scheduler.params.step_size=1", "trainer.scheduler.warmup_epochs=1"))


def test_the_check_steps_the_scheduler_once_for_each_epoch_the_loop_runs():
    cyclic = ["trainer.scheduler.type=OneCycleLR", "+trainer.scheduler.params.max_lr=0.1",
              "+trainer.scheduler.params.total_steps=5"]
    validated_then_checked(compose(*cyclic, "trainer.epochs=5"))
    assert "after epoch 6 of trainer.epochs=6" in refusal(check_train_config, *cyclic, "trainer.epochs=6")


def test_a_warmup_before_reduce_on_plateau_is_refused_naming_warmup_epochs():
    message = refusal(check_train_config, "trainer.scheduler.type=ReduceLROnPlateau",
                      "trainer.scheduler.warmup_epochs=2")
    assert message.startswith("trainer.scheduler.warmup_epochs cannot precede ReduceLROnPlateau")


@pytest.mark.parametrize("overrides,words", [
    (["trainer.optimizer.type=LBFGS"], "needs a closure at every step"),
    (["trainer.optimizer.type=SparseAdam"], "needs sparse gradients"),
    (["trainer.optimizer.type=Muon"], "takes only 2-D parameters"),
    (["trainer.scheduler.type=LambdaLR"], "needs a Python function"),
    (["trainer.scheduler.type=MultiplicativeLR"], "needs a Python function"),
])
def test_torch_classes_the_loop_cannot_use_are_refused_without_torch(overrides, words):
    message = refusal(validate, *overrides)
    key, value = overrides[0].split("=")
    assert message.startswith(f"{key}={value!r} is not allowed: ") and words in message


@pytest.mark.parametrize("overrides,start", [
    (["trainer.scheduler.params=[1,2]"],
     "trainer.scheduler.params=[1,2] is not allowed: expected a mapping such as {name: value}, not a list"),
    (["trainer.optimizer.params.betas=oops"],
     "trainer.optimizer.params.betas=oops: no such key yet: add it with +trainer.optimizer.params.betas=oops"),
    (["data.augment.crop_size={a: 1}"], "data.augment.crop_size={a: 1} is not allowed: expected a list"),
])
def test_hydra_errors_for_params_mappings_name_the_key_and_the_fix(overrides, start):
    with pytest.raises(UserError) as refused:
        compose(*overrides)
    assert str(refused.value).startswith(start), refused.value


# ---------------------------------------------------------------------------------------------
# trainer.key_metric: one the task reports, compared the right way round
# ---------------------------------------------------------------------------------------------
DETECTOR = "model=fasterrcnn_mobilenet_v3_large_fpn"
KEYPOINTS = "model=keypointrcnn_resnet50_fpn"


@pytest.mark.parametrize("overrides,words", [
    (["trainer.key_metric=val_top5"],
     ["trainer.key_metric='val_top5' is not allowed: model.task=classification reports val_top1, train_loss",
      "did you mean val_top1?"]),
    ([DETECTOR, "trainer.key_metric=val_top1"],
     ["trainer.key_metric='val_top1' is not allowed: model.task=detection reports val_map, val_map50, train_loss"]),
    ([DETECTOR, "trainer.key_metric=val_keypoints_map"], ["model.task=detection reports val_map, val_map50"]),
    ([KEYPOINTS, "trainer.key_metric=val_keypoint_map"],
     ["model.task=keypoints reports val_keypoints_map, val_keypoints_map50, val_map, val_map50, train_loss",
      "did you mean val_keypoints_map"]),
    (["trainer.key_metric=train_loss"],
     ["trainer.key_metric_mode='max' is not allowed: trainer.key_metric=train_loss is better when lower: use min"]),
    (["trainer.key_metric=val_top1", "trainer.key_metric_mode=min"],
     ["trainer.key_metric_mode='min' is not allowed: trainer.key_metric=val_top1 is better when higher: use max"]),
    (["trainer.key_metric=val_top1", "trainer.val_fraction=0"],
     ["trainer.key_metric='val_top1' is not allowed: trainer.val_fraction=0", "use train_loss"]),
])
def test_a_key_metric_the_task_does_not_report_is_refused(overrides, words):
    message = refusal(validate, *overrides)
    for word in words:
        assert word in message


@pytest.mark.parametrize("overrides", [
    ["trainer.key_metric=val_top1"], [DETECTOR, "trainer.key_metric=val_map50"],
    [KEYPOINTS, "trainer.key_metric=val_keypoints_map50"], [KEYPOINTS, "trainer.key_metric=val_map"],
    ["trainer.key_metric=train_loss", "trainer.key_metric_mode=min", "trainer.val_fraction=0"],
])
def test_a_key_metric_the_task_reports_is_accepted(overrides):
    validate(compose(*overrides))


def test_the_metric_names_checked_without_torch_are_the_ones_the_evaluators_report():
    from app.train.metrics import ClassificationEvaluator, CocoEvaluator
    from app.train.tasks import spec_for

    reported = {"classification": ClassificationEvaluator().compute(),
                "detection": CocoEvaluator(["__background__", "a"]).compute(),
                "keypoints": CocoEvaluator(["__background__", "a"], num_keypoints=3).compute()}
    for task, metrics in reported.items():
        assert set(metrics) == set(TASK_METRICS[task])
        assert spec_for(task).key_metric in metrics


# ---------------------------------------------------------------------------------------------
# checkpoint=, model.weights=, embeddings=: refused by what the file is, naming the key set
# ---------------------------------------------------------------------------------------------
def not_torch_files(tmp_path):
    (tmp_path / "folder.pt").mkdir()
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "text.pt").write_text("root:x:0:0:root:/root:/bin/bash\n")
    with zipfile.ZipFile(tmp_path / "images.zip", "w") as archive:
        archive.writestr("a.png", b"not really")
    return {"folder.pt": "existing", "empty.pt": "the file is empty",
            "text.pt": "it is not a PyTorch file", "images.zip": "it is not a PyTorch file"}


@pytest.mark.parametrize("key", ["checkpoint", "model.weights"])
def test_a_weights_file_torch_cannot_load_is_refused_naming_the_key_set(key, tmp_path):
    for name, words in not_torch_files(tmp_path).items():
        path = tmp_path / name
        message = refusal(validate, f"{key}={path}")
        assert message.startswith(f"{key}={str(path)!r} is not allowed: "), message
        assert words in message


@pytest.mark.parametrize("legacy", [False, True])
def test_a_state_dict_saved_by_torch_is_accepted_as_checkpoint(legacy, tmp_path):
    path = tmp_path / "backbone.pt"
    torch.save({"fc.weight": torch.zeros(2, 2)}, path, _use_new_zipfile_serialization=not legacy)
    validate(compose(f"checkpoint={path}", f"model.weights={path}"))


def test_loading_a_checkpoint_that_is_not_a_state_dict_names_checkpoint(tmp_path):
    from app.models import load_weights

    path = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), path)
    with pytest.raises(UserError, match=r"^checkpoint='.*tensor.pt' holds a Tensor, not a state dict"):
        load_weights(str(path), "checkpoint")


def test_an_embeddings_file_that_is_not_a_lightly_csv_is_refused_before_the_scan(tmp_path):
    (tmp_path / "binary.csv").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "passwd.csv").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "folder.csv").mkdir()
    for name, words in {"binary.csv": "is not allowed: it is not a readable CSV file",
                        "passwd.csv": "is malformed at line 1: the header must be filenames,embedding_0",
                        "empty.csv": "is malformed at line 1", "folder.csv": "it must be an existing file"}.items():
        message = refusal(validate, f"embeddings={tmp_path / name}")
        assert message.startswith(f"embeddings={str(tmp_path / name)!r} ") and words in message, message
    (tmp_path / "good.csv").write_text("filenames,embedding_0,embedding_1,labels\na.png,0.1,0.2,0\n")
    validate(compose(f"embeddings={tmp_path / 'good.csv'}"))


# ---------------------------------------------------------------------------------------------
# The command line: exit 2, one line, before any stage
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("overrides,key", [
    (["+trainer.optimizer.params.betas=oops"], "trainer.optimizer.params.betas='oops'"),
    (["stages=[profile]", "trainer.scheduler.type=StepLR", "+trainer.scheduler.params.step_size=0"],
     "trainer.scheduler.params.step_size=0"),
])
def test_a_value_torch_refuses_exits_2_with_one_line_before_any_stage(overrides, key, env, tmp_path):
    result = thresher([*SMALL, *overrides], env, tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"thresher: error: {key} is not allowed: "), result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "runs").exists(), "a refused run must not create its run directory"


@pytest.mark.slow
def test_a_sweep_job_with_a_value_torch_refuses_fails_before_any_stage(env, tmp_path):
    """Each job of a sweep is checked in execute(), where Hydra has already made its folder."""
    result = thresher(["-m", *SMALL, "+trainer.optimizer.params.betas=oops,[0.9]"], env, tmp_path)
    assert "trainer.optimizer.params.betas='oops' is not allowed" in result.stderr, result.stderr
    assert "trainer.optimizer.params.betas=[0.9] is not allowed" in result.stderr
    for job in (tmp_path / "runs" / "multirun").glob("*/*"):
        assert not (job / "data").exists(), "a stage ran before the check"
        if (job / "summary.json").is_file():
            summary = json.loads((job / "summary.json").read_text())
            assert summary["status"] == "failed" and not summary.get("stages"), summary


@pytest.mark.slow
def test_a_checkpoint_that_is_not_a_state_dict_is_reported_as_checkpoint(env, tmp_path):
    path = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), path)
    result = thresher([*SMALL, f"checkpoint={path}", "stages=[scan,embed]"], env, tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [f"thresher: error: checkpoint={str(path)!r} holds a Tensor, "
                                                  f"not a state dict"]
