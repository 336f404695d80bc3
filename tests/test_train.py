"""The training stage: checkpoints, exact resume after SIGTERM, optimizer/scheduler by torch name,
the loggers, the detection and keypoint tasks, DDP on two CPU processes, a small /dev/shm."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import SMALL, only_run_dir, sigterm_once_written, summary_of, thresher

# Training only: no embedding or selection, so these tests spend their time in the loop.
TRAIN_ONLY = [*SMALL, "sampler=none", "trainer.batch_size=8"]


def read_rows(path: Path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_training_writes_last_best_and_snapshot_checkpoints_and_metrics(env, tmp_path):
    result = thresher([*TRAIN_ONLY, "trainer.epochs=2", "trainer.save_epochs=1"], env, tmp_path)
    assert result.returncode == 0, result.stderr
    run_dir = only_run_dir(tmp_path / "runs")
    for name in ("last.pt", "best.pt", "epoch_001.pt", "epoch_002.pt"):
        assert (run_dir / "checkpoints" / name).is_file(), name
    last = torch.load(run_dir / "checkpoints/last.pt", weights_only=True)
    assert (last["epoch"], last["batch"]) == (2, 0)
    assert last["classes"] == ["circle", "square", "triangle"] and last["task"] == "classification"
    assert {"model", "optimizer", "scheduler", "scaler", "rng", "global_step"} <= set(last)

    rows = read_rows(run_dir / "metrics.csv")
    assert [row["epoch"] for row in rows] == ["1", "2"]
    assert {"train_loss", "val_top1", "lr", "images_per_s", "compute_efficiency"} <= set(rows[0])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["key_metric"] == "val_top1" and metrics["best"]["epoch"] in (1, 2)
    stage = summary_of(run_dir)["stages"]["train"]
    assert stage["key_metric"] == "val_top1" and 0 <= stage["key_metric_value"] <= 1
    assert 0 < stage["compute_efficiency"] <= 1 and stage["resumed_from"] is None


def final_weights(run_dir: Path):
    return torch.load(run_dir / "checkpoints/last.pt", weights_only=True)["model"]


@pytest.mark.slow
def test_sigterm_mid_training_then_resume_gives_the_weights_of_an_uninterrupted_run(env, tmp_path):
    args = [*TRAIN_ONLY, "trainer.batch_size=4", "trainer.epochs=6", "trainer.deterministic=true",
            "data.augment.color_jitter.brightness=0.3", "trainer.scheduler.type=StepLR",
            "+trainer.scheduler.params.step_size=3"]
    whole = thresher([*args, "run_directory=whole"], env, tmp_path)
    assert whole.returncode == 0, whole.stderr

    run_dir = tmp_path / "runs/stopped"
    interrupted = sigterm_once_written([*args, "run_directory=stopped"], env, tmp_path, run_dir / "checkpoints/last.pt")
    assert interrupted.returncode == 143, interrupted.stdout
    stopped = torch.load(run_dir / "checkpoints/last.pt", weights_only=True)
    assert stopped["epoch"] < 6, "the run ended before the signal: make it longer"
    assert summary_of(run_dir)["stages"]["train"]["status"] == "interrupted"

    resumed = thresher([*args, "run_directory=stopped"], env, tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "train: resuming from" in resumed.stdout
    expected, got = final_weights(tmp_path / "runs/whole"), final_weights(run_dir)
    assert expected.keys() == got.keys()
    different = [key for key in expected if not torch.equal(expected[key], got[key])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
    # the epoch's loss sums were saved with the position, so even the interrupted epoch's row matches
    learned = [(r["epoch"], r["train_loss"], r["val_top1"], r["lr"]) for r in read_rows(run_dir / "metrics.csv")]
    assert learned == [(r["epoch"], r["train_loss"], r["val_top1"], r["lr"])
                       for r in read_rows(tmp_path / "runs/whole/metrics.csv")]


@pytest.mark.slow
def test_resume_with_more_epochs_trains_on_from_the_finished_run(env, tmp_path):
    first = thresher([*TRAIN_ONLY, "run_directory=longer"], env, tmp_path)
    assert first.returncode == 0, first.stderr
    more = thresher([*TRAIN_ONLY, "run_directory=longer", "resume=true", "trainer.epochs=2"], env, tmp_path)
    assert more.returncode == 0, more.stderr
    assert "continuing to trainer.epochs=2" in more.stdout and "stage scan: finished in an earlier run" in more.stdout
    run_dir = tmp_path / "runs/longer"
    assert [row["epoch"] for row in read_rows(run_dir / "metrics.csv")] == ["1", "2"]
    stage = summary_of(run_dir)["stages"]["train"]
    assert stage["epochs"] == 2 and stage["resumed_from"] == "epoch 1, batch 0"
    again = thresher([*TRAIN_ONLY, "run_directory=longer", "resume=true", "trainer.epochs=2"], env, tmp_path)
    assert again.returncode == 0 and "stage train: finished in an earlier run, skipped" in again.stdout


@pytest.mark.slow
def test_a_damaged_checkpoint_is_refused_not_loaded(env, tmp_path):
    first = thresher([*TRAIN_ONLY, "run_directory=damaged"], env, tmp_path)
    assert first.returncode == 0, first.stderr
    run_dir = tmp_path / "runs/damaged"
    checkpoint = run_dir / "checkpoints/last.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:2000])
    summary = summary_of(run_dir)
    summary["status"] = "interrupted"
    summary["stages"]["train"]["status"] = "interrupted"
    (run_dir / "summary.json").write_text(json.dumps(summary))

    rerun = thresher([*TRAIN_ONLY, "run_directory=damaged"], env, tmp_path)
    assert rerun.returncode == 2
    assert "last.pt is damaged" in rerun.stderr and "Traceback" not in rerun.stderr


@pytest.mark.slow
def test_optimizer_arguments_are_checked_against_torch_before_any_stage(env, tmp_path):
    result = thresher([*TRAIN_ONLY, "+trainer.optimizer.params.momentun=0.9"], env, tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "AdamW takes no such argument" in lines[0], result.stderr
    assert not list((tmp_path / "runs").glob("*/data/input_files.csv")), "a stage ran before the check"

    missing = thresher([*TRAIN_ONLY, "trainer.scheduler.type=StepLR"], env, tmp_path)
    assert missing.returncode == 2 and "+trainer.scheduler.params.step_size=" in missing.stderr


@pytest.mark.slow
def test_sgd_with_momentum_step_schedule_and_warmup_follow_the_named_torch_classes(env, tmp_path):
    result = thresher([*TRAIN_ONLY, "trainer.epochs=4", "trainer.optimizer.type=SGD",
                       "trainer.optimizer.params={lr: 0.1}", "+trainer.optimizer.params.momentum=0.9",
                       "trainer.scheduler.type=StepLR", "+trainer.scheduler.params.step_size=1",
                       "+trainer.scheduler.params.gamma=0.5", "trainer.scheduler.warmup_epochs=1",
                       "trainer.scheduler.warmup_start_factor=0.25", "trainer.grad_clip_norm=1.0"],
                      env, tmp_path)
    assert result.returncode == 0, result.stderr
    rows = read_rows(only_run_dir(tmp_path / "runs") / "metrics.csv")
    # The lr each epoch trained with: warm-up at 0.25, then 0.1 halved once an epoch.
    assert [pytest.approx(float(r["lr"])) for r in rows] == [0.025, 0.1, 0.05, 0.025]


@pytest.mark.slow
def test_tensorboard_logger_writes_event_files_under_bf16_autocast_and_channels_last(env, tmp_path):
    result = thresher([*TRAIN_ONLY, "logger=tensorboard", "logger.log_every_n_steps=1", "trainer.amp=bf16",
                       "trainer.channels_last=true"], env, tmp_path)
    assert result.returncode == 0, result.stderr
    run_dir = only_run_dir(tmp_path / "runs")
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert (run_dir / "metrics.csv").is_file()


@pytest.mark.slow
def test_wandb_offline_logs_without_network_and_never_writes_the_key(env, tmp_path):
    key = "wandbkey-0123456789abcdef0123456789abcdef"
    env = {**env, "WANDB_API_KEY": key}
    result = thresher([*TRAIN_ONLY, "logger=wandb", "logger.mode=offline"], env, tmp_path)
    assert result.returncode == 0, result.stderr
    run_dir = only_run_dir(tmp_path / "runs")
    assert (run_dir / "wandb").is_dir() and list((run_dir / "wandb").rglob("*.wandb"))
    assert key not in result.stdout + result.stderr
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert key.encode() not in path.read_bytes(), path


@pytest.mark.slow
def test_wandb_online_without_a_key_fails_at_start_naming_the_variable(env, tmp_path):
    env = {k: v for k, v in env.items() if not k.startswith("WANDB")}
    result = thresher([*TRAIN_ONLY, "logger=wandb", "logger.mode=online"], env, tmp_path)
    assert result.returncode == 2 and "WANDB_API_KEY" in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("model, metric", [("fasterrcnn_mobilenet_v3_large_fpn", "val_map"),
                                           ("keypointrcnn_resnet50_fpn", "val_keypoints_map")])
def test_detection_and_keypoint_models_train_on_shapes_and_report_map(env, tmp_path, model, metric):
    result = thresher([*SMALL, "sampler=none", f"model={model}", "data.image_size=64", "trainer.batch_size=4",
                       "data.augment.crop_size=[40,40]", "data.augment.crop_sampling=keypoint"], env, tmp_path,
                      timeout=600)
    assert result.returncode == 0, result.stderr
    run_dir = only_run_dir(tmp_path / "runs")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["key_metric"] == metric
    assert 0.0 <= metrics["final"][metric] <= 1.0 and 0.0 <= metrics["final"]["val_map50"] <= 1.0
    assert metrics["classes"][0] == "__background__" and len(metrics["classes"]) == 4


@pytest.mark.slow
def test_two_process_ddp_on_the_cpu_with_gloo(env, tmp_path):
    result = thresher([*TRAIN_ONLY, "hardware=multi_gpu", "hardware.device=cpu", "hardware.nproc_per_node=2",
                       "hardware.num_workers=0", "trainer.epochs=2"], env, tmp_path, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_dir = only_run_dir(tmp_path / "runs")
    assert "starting 2 processes" in result.stdout
    stage = summary_of(run_dir)["stages"]["train"]
    assert stage["status"] == "finished" and stage["processes"] == 2
    assert (run_dir / "checkpoints/last.pt").is_file()
    assert len(read_rows(run_dir / "metrics.csv")) == 2


# ---- units ---------------------------------------------------------------------------------------
def test_a_resumed_epoch_continues_with_exactly_the_remaining_batches():
    from app.train.data import EpochBatches

    full = EpochBatches(list(range(21)), 4, seed=3)
    full.set_epoch(2)
    everything = list(full)
    resumed = EpochBatches(list(range(21)), 4, seed=3)
    resumed.set_epoch(2, start_batch=3)
    assert list(resumed) == everything[3:]
    other_epoch = EpochBatches(list(range(21)), 4, seed=3)
    other_epoch.set_epoch(3)
    assert [i for i, _ in other_epoch.__iter__().__next__()] != [i for i, _ in everything[0]]
    # a last batch of one sample is dropped: batch norm cannot train on it
    assert [len(b) for b in everything] == [4, 4, 4, 4, 4]


def test_ranks_split_an_epoch_between_them_without_overlap():
    from app.train.data import EpochBatches

    ranks = [EpochBatches(list(range(20)), 5, seed=0, rank=r, world_size=2) for r in range(2)]
    seen = [{i for batch in sampler for i, _ in batch} for sampler in ranks]
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(20))


def test_a_small_dev_shm_falls_back_to_loading_in_the_main_process(caplog):
    from app.train.data import loader_settings

    hardware = OmegaConf.create({"num_workers": 4, "prefetch_factor": 2, "pin_memory": None,
                                 "persistent_workers": True})
    roomy = loader_settings(hardware, torch.device("cpu"), 32, (224, 224), free_shm=8 * 2**30)
    assert roomy["num_workers"] == 4 and roomy["persistent_workers"] is True
    small = loader_settings(hardware, torch.device("cpu"), 32, (224, 224), free_shm=64 * 2**20)
    assert small["num_workers"] == 0 and "prefetch_factor" not in small
    assert "--shm-size" in caplog.text


def test_fp16_on_the_cpu_falls_back_to_float32_and_bf16_is_kept():
    from app.train.setup import autocast_dtype

    assert autocast_dtype("fp16", torch.device("cpu")) is None
    assert autocast_dtype("bf16", torch.device("cpu")) is torch.bfloat16
    assert autocast_dtype(None, torch.device("cpu")) is None


def test_the_torchrun_command_carries_the_rendezvous_of_a_multi_node_run(tmp_path):
    from app.train.distributed import result_path, torchrun_command

    hardware = OmegaConf.create({"nnodes": 2, "node_rank": 1, "rdzv_endpoint": "node0:29400", "rdzv_id": "job42"})
    command = torchrun_command(hardware, 4, tmp_path, tmp_path / "cfg.yaml")
    assert command[1:3] == ["-m", "torch.distributed.run"]
    assert {"--nproc-per-node=4", "--nnodes=2", "--rdzv-backend=c10d", "--rdzv-endpoint=node0:29400",
            "--rdzv-id=job42", "--node-rank=1"} <= set(command)
    single = torchrun_command(OmegaConf.create({"nnodes": 1}), 2, tmp_path, tmp_path / "cfg.yaml")
    assert "--standalone" in single and not any(arg.startswith("--rdzv") for arg in single)
    assert result_path(tmp_path, 0).name != result_path(tmp_path, 1).name


def test_other_nodes_of_a_multi_node_run_keep_their_own_lock_and_summary(tmp_path):
    from app.run import RunDirectory, node_suffix

    cfg = OmegaConf.create({"hardware": {"nnodes": 2, "node_rank": 1}})
    first, second = RunDirectory(tmp_path), RunDirectory(tmp_path, node_suffix(cfg))
    first.acquire(overwrite=False, resume=False)
    summary = second.acquire(overwrite=False, resume=False)  # would refuse as "in use" on one lock
    assert summary.path.name == "summary.node1.json"
    first.release()
    second.release()


def test_left_and_right_keypoints_swap_names_after_a_flip():
    from app.train.tasks.keypoints import keypoint_flip_index

    names = ["nose", "left_eye", "right_eye", "left_ear", "right_ear"]
    assert keypoint_flip_index(names) == [0, 2, 1, 4, 3]
    assert keypoint_flip_index(["corner_0", "corner_1"]) is None


def test_validation_by_a_list_of_file_names_or_by_a_seeded_fraction(tmp_path):
    from app.errors import UserError
    from app.train.data import split

    files = [f"c/{i}.png" for i in range(10)]
    listed = tmp_path / "val.txt"
    listed.write_text("c/3.png\nc/7.png\nnot/there.png\n")
    train, val = split(files, 0.2, str(listed), seed=0)
    assert val == [3, 7] and train == [i for i in range(10) if i not in (3, 7)]
    assert split(files, 0.3, None, seed=1) == split(files, 0.3, None, seed=1)
    assert len(split(files, 0.3, None, seed=1)[1]) == 3
    listed.write_text("none/of/these.png\n")
    with pytest.raises(UserError, match="names none of the 10 training images"):
        split(files, 0.2, str(listed), seed=0)


@pytest.mark.slow
def test_torch_compile_trains_and_saves_weights_that_load_into_the_plain_torchvision_model(env, tmp_path):
    import torchvision

    result = thresher([*TRAIN_ONLY, "trainer.compile=true"], env, tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    weights = torch.load(only_run_dir(tmp_path / "runs") / "checkpoints/best.pt", weights_only=True)["model"]
    assert not any(key.startswith("_orig_mod.") for key in weights)
    torchvision.models.resnet18(num_classes=3).load_state_dict(weights)
