"""Composition and refusals: every bad override exits 2 with one line, before torch is imported."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from omegaconf import OmegaConf

from app import cli
from app.config import validate
from app.sampling.samplers import get_sampler
from conftest import ROOT, compose, every_nth_fast, main_in_process, require_module, thresher


pytestmark = pytest.mark.usefixtures("registered")


def test_default_config_composes_every_group():
    cfg = compose()
    assert cfg.model.name == "resnet18"
    assert cfg.data.name == "shapes"
    assert cfg.sampler.method == "coreset"
    assert cfg.hardware.device == "auto"
    assert list(cfg.stages) == ["scan", "embed", "score", "select", "train"]
    assert cfg.scorer.method == "none"
    validate(cfg)


@pytest.mark.parametrize("group", cli.GROUPS)
def test_every_option_of_every_group_composes_and_validates(group, tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "annotations.json").write_text("{}")
    inputs = {"folder": [f"data.input_dir={tmp_path}"],
              "coco": [f"data.input_dir={tmp_path}", f"data.annotations={tmp_path}/annotations.json"],
              "oxford_pet": [f"data.root={tmp_path}"]}
    checkpoint = tmp_path / "best.pt"
    checkpoint.write_bytes(b"\x80\x02")  # the first bytes of a pickle, which is all the check reads
    for option in cli.group_options(group):
        extra = inputs.get(option, []) if group == "data" else []
        if group == "scorer" and option != "none":  # a scorer needs a checkpoint, a detection one a detector
            extra = [f"scorer.checkpoint={checkpoint}"] + (["model=fasterrcnn_mobilenet_v3_large_fpn"]
                                                           if "object" in option else [])
        if group == "sampler" and get_sampler(option).needs_scores:  # it selects by a scorer's scores
            extra = ["scorer=least_confidence", f"scorer.checkpoint={checkpoint}"]
        if group == "executor" and option == "ray":
            require_module("ray", "pip install -e '.[ray]'")  # executor=ray is refused without Ray
        if group == "experiment":  # presets are added to the defaults (+experiment=...), and bring their data
            cfg = compose(f"+{group}={option}")
            if "root" in cfg.data:  # a preset of data that lives under a root folder (oxford_pet)
                cfg = compose(f"+{group}={option}", f"data.root={tmp_path}")
        else:
            cfg = compose(f"{group}={option}", *extra)
        validate(cfg)


def test_config_yaml_lists_the_groups_the_issue_names():
    assert {"resnet18"} < set(cli.group_options("model"))
    assert {"shapes", "folder"} <= set(cli.group_options("data"))
    assert {"coreset", "random", "none"} <= set(cli.group_options("sampler"))
    assert {"auto", "cpu", "gpu"} <= set(cli.group_options("hardware"))
    top = set(OmegaConf.to_container(compose()))
    assert {"work_dir", "note", "run_directory", "seed", "token", "stages", "sanity_check"} <= top


def test_n_samples_keeps_counts_and_fractions_apart():
    assert compose("sampler.stopping_condition.n_samples=20").sampler.stopping_condition.n_samples == 20
    assert isinstance(compose("sampler.stopping_condition.n_samples=20").sampler.stopping_condition.n_samples, int)
    assert compose("sampler.stopping_condition.n_samples=0.25").sampler.stopping_condition.n_samples == 0.25


REFUSALS = [
    # (overrides, words the one line must contain)
    (["sampler.stopping_condition.n_sample=3"], ["sampler.stopping_condition.n_sample=3", "no such key",
                                                 "did you mean sampler.stopping_condition.n_samples?"]),
    (["sampler.stopping_condition.n_samples=-3"], ["n_samples=-3", "fraction in (0, 1]", "-1 for off"]),
    (["sampler.stopping_condition.n_samples=0"], ["n_samples=0", "integer >= 1"]),
    (["sampler.stopping_condition.n_samples=1.5"], ["n_samples=1.5", "fraction in (0, 1]"]),
    (["sampler.stopping_condition.n_samples=many"], ["n_samples='many'", "-1 for off"]),
    (["sampler.stopping_condition.min_distance=-2"], ["min_distance=-2.0", ">= 0, or -1 for off"]),
    (["sampler=random", "sampler.stopping_condition.min_distance=0.1"], ["min_distance=0.1", "coreset only"]),
    (["trainer.batch_size=0"], ["trainer.batch_size=0", "integer >= 1"]),
    (["sampler.batch_size=0"], ["sampler.batch_size=0", "integer >= 1"]),
    (["trainer.epochs=abc"], ["trainer.epochs='abc'", "expected an integer"]),
    (["trainer.epochs=0"], ["trainer.epochs=0", "integer >= 1"]),
    (["trainer.optimizer.params.lr=0"], ["trainer.optimizer.params.lr=0", "> 0"]),
    (["trainer.val_fraction=1.0"], ["trainer.val_fraction=1.0", "[0, 1)"]),
    (["model=fasterrcnn_mobilenet_v3_large_fpn", "data=folder", "stages=[train]"],
     ["data=folder has no detection labels", "data=coco"]),
    (["model.name=fasterrcnn_resnet50_fpn"], ["is a detection model: set model.task=detection"]),
    (["data.augment.crop_sampling=center"], ["data.augment.crop_sampling='center'", "uniform, keypoint"]),
    (["trainer.amp=fp32"], ["trainer.amp='fp32'", "bf16, fp16"]),
    (["trainer.scheduler.type=CosineAnnealing"], ["trainer.scheduler.type", "did you mean CosineAnnealingLR"]),
    (["logger=wandbb"], ["logger=wandbb", "did you mean wandb?"]),
    (["trainer.optimizer.type=adamw"], ["trainer.optimizer.type='adamw'", "did you mean AdamW?"]),
    (["trainer.batch_sise=4"], ["trainer.batch_sise=4", "did you mean trainer.batch_size?"]),
    (["+trainer.momentum=0.9"], ["trainer.momentum", "no such key"]),
    (["hardware.device=gpu0"], ["hardware.device='gpu0'", "auto, cpu, cuda, cuda:N or mps"]),
    (["hardware.num_workers=-5"], ["hardware.num_workers=-5"]),
    (["sampler=coreste"], ["sampler=coreste", "coreset, hybrid, none, random, typical, uncertainty",
                           "did you mean coreset?"]),
    (["sampelr=coreset"], ["sampelr=coreset", "did you mean sampler?"]),
    (["model=resnet19"], ["model=resnet19", "did you mean resnet18?"]),
    (["model.name=resnet19"], ["model.name='resnet19'", "did you mean resnet18"]),
    (["model.weights=/no/such/weights.pt"], ["model.weights='/no/such/weights.pt'", "state-dict file"]),
    (["data=folder", "data.input_dir=/no/such/folder"], ["data.input_dir='/no/such/folder'", "existing folder"]),
    (["data.n_images=2"], ["data.n_images=2", ">= 3"]),
    (["stages=[scan,trian]"], ["stages='trian'", "did you mean train?"]),
    (["stages=[]"], ["stages=[]", "at least one"]),
    (["trainer.epochs=[1"], ["could not parse the override"]),
    (["overwrite=true", "resume=true"], ["not both"]),
    (["trainer.key_metric=val_top5"], ["trainer.key_metric='val_top5'", "val_top1, train_loss",
                                       "did you mean val_top1?"]),
    (["checkpoint=/etc/passwd"], ["checkpoint='/etc/passwd'", "not a PyTorch file"]),
    (["trainer.optimizer.type=LBFGS"], ["trainer.optimizer.type='LBFGS'", "closure"]),
    (["trainer.scheduler.params=[1,2]"], ["trainer.scheduler.params=[1,2]", "expected a mapping"]),
    (["trainer.optimizer.params.betas=oops"], ["add it with +trainer.optimizer.params.betas=oops"]),
]


@pytest.mark.slow
@pytest.mark.parametrize("overrides,expected", REFUSALS, ids=[" ".join(o) for o, _ in REFUSALS])
def test_bad_override_exits_2_with_one_clear_line(overrides, expected, env, tmp_path):
    result = thresher(overrides, env, tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("thresher: error: ")
    for words in expected:
        assert words in lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "runs").exists(), "a refused run must not create its run directory"


@pytest.mark.parametrize("overrides,expected", every_nth_fast(REFUSALS, 3, ids=[" ".join(o) for o, _ in REFUSALS]))
def test_bad_override_in_process_exits_2_with_one_clear_line(overrides, expected, monkeypatch, capsys, tmp_path,
                                                             cache_dir):
    """The fast tier's run of the refusals above: `app.cli.main` in this process, as the CLI calls it."""
    code, out, err = main_in_process(overrides, monkeypatch, capsys, tmp_path, cache_dir)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("thresher: error: ")
    for words in expected:
        assert words in lines[0]
    assert "Traceback" not in err + out
    assert not (tmp_path / "runs").exists(), "a refused run must not create its run directory"


@pytest.mark.slow
@pytest.mark.parametrize("override", ["sampler.stopping_condition.n_sample=3", "trainer.epochs=abc",
                                      "trainer.epochs=0"])
def test_hydra_full_error_shows_the_traceback_and_still_exits_2(override, env, tmp_path):
    result = thresher([override], {**env, "HYDRA_FULL_ERROR": "1"}, tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("thresher: error: ")


def test_checking_a_config_imports_no_torch(tmp_path):
    code = (
        "import sys\n"
        "from app import cli\n"
        "for args in (['trainer.batch_size=0'], ['sampler=random'], ['trainer.key_metric=val_top5'],\n"
        "             ['checkpoint=/etc/passwd'], ['--cfg', 'hydra', '--resolve']):\n"
        "    try:\n"
        "        cli.main(args if '--cfg' in args else args + ['--cfg', 'job'])\n"
        "    except SystemExit:\n"
        "        pass\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print('no torch')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "no torch" in result.stdout


@pytest.mark.slow
def test_cfg_job_prints_the_composed_config(env, tmp_path):
    result = thresher(["--cfg", "job", "sampler=random"], env, tmp_path)
    assert result.returncode == 0, result.stderr
    printed = OmegaConf.create(result.stdout)
    assert printed.sampler.method == "random"
    assert printed.model.name == "resnet18"


@pytest.mark.slow
def test_cfg_hydra_resolve_prints_the_run_directory_made_of_work_dir_and_note(env, tmp_path):
    result = thresher(["--cfg", "hydra", "--resolve", f"work_dir={tmp_path}/w", "note=first try"], env, tmp_path)
    assert result.returncode == 0, result.stderr
    printed = OmegaConf.create(result.stdout)
    assert printed.hydra.run.dir.startswith(f"{tmp_path}/w/") and printed.hydra.run.dir.endswith("_first_try")
    assert printed.hydra.sweep.dir.startswith(f"{tmp_path}/w/multirun/")
    assert "help" not in printed.hydra and "${" not in result.stdout
    assert not (tmp_path / "w").exists()


def test_run_directory_is_utc_stamp_and_note(env, tmp_path):
    from app.config import run_directory_path, run_stamp

    assert run_directory_path("w", "coreset 20%", None) == f"w/{run_stamp()}_coreset_20"
    assert run_directory_path("w", "", None) == f"w/{run_stamp()}"
    assert run_directory_path("w", "x", "fixed") == "w/fixed"
    assert run_directory_path("w", "x", "/abs/run") == "/abs/run"
    assert time.strftime("%Y-%m-%d", time.gmtime()) in run_stamp()


@pytest.mark.slow
def test_conf_is_found_from_an_installed_wheel(tmp_path):
    """conf/ must ship inside the wheel as app/conf, where find_conf_dir looks when installed."""
    import zipfile

    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                             "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    wheel = next(tmp_path.glob("thresher-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "app/conf/config.yaml" in names
    for group in cli.GROUPS:
        for option in cli.group_options(group):
            assert f"app/conf/{group}/{option}.yaml" in names
    assert "app/conf/hydra/launcher/ray_cluster.yaml" in names
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    located = subprocess.run([sys.executable, "-c", "from app.cli import CONF_DIR; print(CONF_DIR)"],
                             cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(site)},
                             capture_output=True, text=True)
    assert located.returncode == 0, located.stderr
    assert located.stdout.strip() == str(site / "app" / "conf")


@pytest.mark.slow
def test_work_dir_under_a_file_is_refused(env, tmp_path):
    (tmp_path / "a_file").write_text("x")
    result = thresher([f"work_dir={tmp_path}/a_file/runs"], env, tmp_path)
    assert result.returncode == 2
    assert "work_dir=" in result.stderr and "must be a folder" in result.stderr


def test_unwritable_work_dir_is_refused_with_the_docker_hint(tmp_path, monkeypatch):
    from app.errors import UserError

    monkeypatch.setattr(os, "access", lambda path, mode: False)
    cfg = compose(f"work_dir={tmp_path}/runs")
    with pytest.raises(UserError) as refused:
        validate(cfg)
    message = str(refused.value)
    assert "not writable by uid" in message and "\n" not in message
    assert 'docker run --user "$(id -u):$(id -g)"' in message  # what a `docker run` user adds
    assert 'THRESHER_USER="$(id -u):$(id -g)"' in message  # what a docker-compose user sets


def test_checking_a_bucket_config_leaves_the_storage_settings_alone(monkeypatch):
    """validate only checks: the run, not the check, hands storage_options to fsspec."""
    import fsspec.config

    monkeypatch.setattr(fsspec.config, "conf", {})
    validate(compose("work_dir=memory://bucket/runs", "storage_options.s3.endpoint_url=http://127.0.0.1:9"))
    assert fsspec.config.conf == {}


def test_the_run_gives_storage_options_to_fsspec_only_when_it_reaches_a_bucket(monkeypatch):
    import fsspec.config

    from app.data.sources import configure_storage_for

    monkeypatch.setattr(fsspec.config, "conf", {})
    configure_storage_for(compose("storage_options.s3.endpoint_url=http://127.0.0.1:9"))
    assert fsspec.config.conf == {}
    configure_storage_for(compose("work_dir=memory://bucket/runs",
                                  "storage_options.s3.endpoint_url=http://127.0.0.1:9"))
    assert fsspec.config.conf["s3"] == {"endpoint_url": "http://127.0.0.1:9"}


COUNT_CHECKS = """
import sys
from app import cli, config, run

checks = []

def counting_validate(cfg, _validate=config.validate):
    checks.append(cfg.seed)
    _validate(cfg)

cli.validate = run.validate = counting_validate
cli.main(sys.argv[1:])
print("validated", sorted(checks))
"""


@pytest.mark.slow
@pytest.mark.parametrize("args, validated", [
    ([], "[0]"),  # preflight checks it, the run does not check it again
    # a sweep: the preflight composes each combination, then each job's run checks its own config
    (["--multirun", "seed=1,2"], "[1, 1, 2, 2]"),
])
def test_a_config_is_validated_once_per_run(args, validated, env, tmp_path):
    result = subprocess.run([sys.executable, "-c", COUNT_CHECKS, *args, "data.n_images=12", "data.shapes_image_size=32",
                             "hardware=cpu", "stages=[scan]"],
                            env={**env, "PYTHONPATH": str(ROOT)}, cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"validated {validated}" in result.stdout


def test_a_tilde_in_an_override_says_to_write_home():
    """The shell expands ~ only at the start of a word, so `data.input_dir=~/images` reaches Hydra,
    whose grammar refuses it: the message says what to write instead."""
    from app.errors import UserError

    with pytest.raises(UserError) as refused:
        compose("data=folder", "data.input_dir=~/images")
    assert str(refused.value) == ("could not parse the override data.input_dir=~/images: Hydra does not expand "
                                  "'~'; write data.input_dir=$HOME/images")


OPTUNA_SWEEPER = "hydra_plugins.hydra_optuna_sweeper"


# ---- a sweep's overrides are checked before Hydra starts a job ---------------------------------

@pytest.mark.parametrize("args, line", [
    (["foo=1"], "thresher: error: foo=1: no such key or group"),
    (["sampler=random,corset"], "thresher: error: sampler=corset is not an option: choose from "),
    (["sampler=random,coreset", "sampler.stopping_condition.n_samples=0.1,abc"],
     "thresher: error: sampler.stopping_condition.n_samples='abc' is not allowed: "),
    (["trainer.epochs=interval(1,3)"],
     "thresher: error: trainer.epochs=interval(1,3): an interval is for the Optuna sweeper: add hydra/sweeper=optuna"),
    (["hydra/sweeper=optuna", "trainer.optimizer.lr=interval(0.0001,0.1)"],
     "thresher: error: trainer.optimizer.lr=0.0001: no such key"),
])
def test_a_sweep_with_a_bad_override_exits_2_with_one_line_before_any_job(args, line, monkeypatch, capsys,
                                                                          tmp_path, cache_dir):
    if "hydra/sweeper=optuna" in args:
        require_module(OPTUNA_SWEEPER, "pip install -e '.[optuna]'")
    code, out, err = main_in_process(["-m", *args], monkeypatch, capsys, tmp_path, cache_dir)
    assert code == 2 and err.strip().splitlines()[0].startswith(line) and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "runs").exists(), "a refused sweep must not create its folder"


def test_the_sweep_preflight_composes_every_combination_or_every_value_once():
    from app.cli import MAX_COMBINATIONS_CHECKED, sweep_samples

    assert sweep_samples(["seed=1", "+x@y=a,b", "sampler=random,coreset"]) == [
        ["seed=1", "+x@y=a", "sampler=random"], ["seed=1", "+x@y=a", "sampler=coreset"],
        ["seed=1", "+x@y=b", "sampler=random"], ["seed=1", "+x@y=b", "sampler=coreset"]]
    assert sweep_samples(["seed=1"]) == [["seed=1"]]
    many = sweep_samples([f"seed=range(0,{MAX_COMBINATIONS_CHECKED})", "sampler=random,coreset,typical"])
    assert len(many) == MAX_COMBINATIONS_CHECKED  # past the cap: one per value, each value once
    assert {sample[0] for sample in many} == {f"seed={i}" for i in range(MAX_COMBINATIONS_CHECKED)}
    assert {sample[1] for sample in many} == {"sampler=random", "sampler=coreset", "sampler=typical"}
    assert sweep_samples(["sampler=glob(co*)"]) == [["sampler=coreset"]]
    require_module(OPTUNA_SWEEPER, "pip install -e '.[optuna]'")
    assert sweep_samples(["hydra/sweeper=optuna", "seed=interval(1,5)"]) == [["hydra/sweeper=optuna", "seed=1"]]
