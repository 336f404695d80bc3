"""The Lightly Worker's `lightly.*` and `scorer_config.*` keys on thresher's command line: mapped to
thresher's keys (one log line each), ignored with a warning, or refused with what to use instead;
unknown ones refused with a did-you-mean; sweeps of them still sweep."""
from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from app.errors import UserError
from app.lightly_keys import LIGHTLY_CLI_KEYS, LIGHTLY_RULES, WORKER_RULES, rewrite_worker_keys, schema_has
from conftest import compose, main_in_process

TINY_SCAN = ["hardware=cpu", "data.n_images=12", "data.shapes_image_size=32", "data.image_size=16",
             "stages=[scan]"]


def lightly_cli_config_keys():
    """The leaf keys of the installed lightly CLI's config.yaml, its hydra.* keys aside."""
    spec = importlib.util.find_spec("lightly")
    path = Path(next(iter(spec.submodule_search_locations))) / "cli" / "config" / "config.yaml"
    keys = []

    def walk(node, prefix):
        for key, value in node.items():
            if isinstance(value, dict) and value:
                walk(value, f"{prefix}{key}.")
            else:
                keys.append(f"{prefix}{key}")

    walk({k: v for k, v in yaml.safe_load(path.read_text()).items() if k != "hydra"}, "lightly.")
    return keys


def test_every_key_of_the_installed_lightly_cli_has_a_rule():
    assert sorted(LIGHTLY_CLI_KEYS) == sorted(lightly_cli_config_keys())


def test_every_mapped_key_is_a_key_of_thresher_config(registered):
    cfg = compose("scorer=object-frequency")
    for key, rule in WORKER_RULES.items():
        if rule.targets and not rule.refused:
            for target in rule.targets:
                assert OmegaConf.select(cfg, target, default="<missing>") != "<missing>", (key, target)


@pytest.mark.parametrize("given, expected, logged", [
    (["lightly.loader.batch_size=512"], ["sampler.batch_size=512", "ssl.batch_size=512"],
     "lightly.loader.batch_size=512 -> sampler.batch_size=512, ssl.batch_size=512"),
    (["lightly.loader.num_workers=8"], ["hardware.num_workers=8"],
     "lightly.loader.num_workers=8 -> hardware.num_workers=8"),
    (["+lightly.trainer.max_epochs=30"], ["ssl.epochs=30"], "lightly.trainer.max_epochs=30 -> ssl.epochs=30"),
    (["++lightly.model.name=resnet-50"], ["sampler.embedding_model=resnet50"],
     "lightly.model.name=resnet-50 -> sampler.embedding_model=resnet50"),
    (["lightly.collate.input_size=32"], ["data.image_size=32"], "-> data.image_size=32"),
    (["lightly.trainer.gpus=0"], ["hardware.device=cpu"], "lightly.trainer.gpus=0 -> hardware.device=cpu"),
    (["lightly.seed=7", "lightly.checkpoint=/w.pt"], ["seed=7", "checkpoint=/w.pt"], "lightly.seed=7 -> seed=7"),
    (["scorer_config.frequency_penalty=0.5"], ["scorer.frequency_penalty=0.5"],
     "scorer_config.frequency_penalty=0.5 -> scorer.frequency_penalty=0.5"),
])
def test_a_worker_key_becomes_its_thresher_key_with_a_log_line(given, expected, logged):
    rewritten = rewrite_worker_keys(["hardware=cpu", *given, "-m"])
    assert rewritten.args == ["hardware=cpu", *expected, "-m"]
    assert len(rewritten.messages) == len(given)
    assert any(logged in line for level, line in rewritten.messages if level == logging.INFO)


def test_a_command_line_without_worker_keys_is_left_as_it_is():
    args = ["sampler=random", "trainer.epochs=3", "--cfg", "job", "+experiment=x"]
    assert rewrite_worker_keys(args).args == args


@pytest.mark.parametrize("given, message", [
    ("lightly.loader.batch_sise=512", "lightly.loader.batch_sise: not a key of the lightly CLI "
                                      "(did you mean lightly.loader.batch_size?)"),
    ("+lightly.trainer.max_epoch=5", "did you mean lightly.trainer.max_epochs?"),
    ("scorer_config.min_scor=0.5", "did you mean scorer_config.min_score?"),
    ("lightly.model.num_ftrs=32", "lightly.model.num_ftrs=32: thresher has no equivalent: thresher embeds with "
                                  "the backbone's own features"),
    ("lightly.input_dir=/images", "use data=folder data.input_dir=PATH"),
    ("lightly.pre_trained=true", "give checkpoint=PATH"),
    ("lightly.criterion.memory_bank_size=4096", "uses no memory bank"),
    ("lightly.trainer.gpus=2", "lightly.trainer.gpus=2 is not allowed: use 0 (hardware.device=cpu) or 1"),
    ("lightly.loader=16", "lightly.loader is a group of keys: give them one by one, e.g. lightly.loader.batch_size"),
    ("~lightly.seed", "nothing to delete"),
])
def test_a_worker_key_thresher_cannot_honour_is_refused_in_one_line(given, message):
    with pytest.raises(UserError) as refused:
        rewrite_worker_keys(["hardware=cpu", given])
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_values_that_are_what_thresher_does_anyway_are_accepted_and_ignored_keys_warn():
    rewritten = rewrite_worker_keys(["lightly.criterion.memory_bank_size=0", "lightly.pre_trained=false",
                                     "lightly.trainer.precision=32", "lightly.loader.shuffle=false",
                                     "lightly.trainer.precision=16"])
    assert rewritten.args == []
    levels = [level for level, _ in rewritten.messages]
    assert levels == [logging.INFO] * 3 + [logging.WARNING] * 2
    assert "lightly.trainer.precision=16: ignored:" in rewritten.messages[-1][1]
    assert "trainer.amp" in rewritten.messages[-1][1]


def test_a_worker_key_and_its_thresher_key_with_different_values_are_refused_naming_both():
    with pytest.raises(UserError, match=r"lightly.loader.batch_size=512 sets sampler.batch_size=512, and "
                                        r"sampler.batch_size=256 is given too: give one of them"):
        rewrite_worker_keys(["sampler.batch_size=256", "lightly.loader.batch_size=512"])
    with pytest.raises(UserError, match="hardware.num_workers=2 is given too"):
        rewrite_worker_keys(["lightly.loader.num_workers=8", "hardware.num_workers=2"])
    same = rewrite_worker_keys(["sampler.batch_size=512", "lightly.loader.batch_size=512"])
    assert same.args == ["sampler.batch_size=512", "ssl.batch_size=512"]


def test_a_lightly_learning_rate_brings_lightlys_optimizer_where_thresher_has_a_choice():
    if not schema_has("ssl.optimizer"):
        assert rewrite_worker_keys(["lightly.optimizer.lr=0.1"]).args == ["ssl.lr=0.1"]
        return
    assert rewrite_worker_keys(["lightly.optimizer.lr=0.1"]).args == ["ssl.lr=0.1", "ssl.optimizer=sgd"]
    with pytest.raises(UserError, match="set ssl.lr instead"):
        rewrite_worker_keys(["lightly.optimizer.lr=0.1", "ssl.optimizer=adamw"])


@pytest.mark.parametrize("given, expected", [
    ("lightly.loader.batch_size=64,128", ["sampler.batch_size=64,128", "ssl.batch_size=${sampler.batch_size}"]),
    ("lightly.loader.batch_size=range(64,257,64)",
     ["sampler.batch_size=range(64,257,64)", "ssl.batch_size=${sampler.batch_size}"]),
    ("lightly.model.name=resnet-18,resnet-34", ["sampler.embedding_model=resnet18,resnet34"]),
    ("lightly.trainer.gpus=choice(0,1)", ["hardware.device=choice(cpu,cuda)"]),
])
def test_a_swept_worker_key_sweeps_its_thresher_keys_together(given, expected):
    assert rewrite_worker_keys(["-m", given]).args == ["-m", *expected]


def test_the_second_key_of_a_sweep_follows_the_first_in_each_job(registered):
    cfg = compose("sampler.batch_size=128", "ssl.batch_size=${sampler.batch_size}")
    assert cfg.ssl.batch_size == 128


def test_a_later_config_error_names_the_worker_key_it_came_from(monkeypatch, capsys, tmp_path, cache_dir):
    code, out, err = main_in_process([*TINY_SCAN, "lightly.model.name=vit-b"], monkeypatch, capsys, tmp_path,
                                     cache_dir)
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines() == [err.strip()]
    assert "sampler.embedding_model='vitb' is not allowed" in err and "(from lightly.model.name=vit-b)" in err
    assert not (tmp_path / "runs").exists()


def test_a_run_with_worker_keys_logs_each_mapping_and_records_thresher_keys(monkeypatch, capsys, tmp_path,
                                                                             cache_dir):
    code, out, err = main_in_process([*TINY_SCAN, "lightly.loader.batch_size=48", "lightly.loader.shuffle=true",
                                      "run_directory=mapped"], monkeypatch, capsys, tmp_path, cache_dir)
    assert code == 0, err
    assert "lightly.loader.batch_size=48 -> sampler.batch_size=48, ssl.batch_size=48" in out
    assert "lightly.loader.shuffle=true: ignored:" in out
    hydra_dir = tmp_path / "runs" / "mapped" / ".hydra"
    overrides = OmegaConf.to_container(OmegaConf.load(hydra_dir / "overrides.yaml"))
    assert "sampler.batch_size=48" in overrides and not any("lightly" in o for o in overrides)
    config = OmegaConf.load(hydra_dir / "config.yaml")
    assert (config.sampler.batch_size, config.ssl.batch_size) == (48, 48)


def test_a_multirun_over_a_worker_key_runs_one_job_per_value(monkeypatch, capsys, tmp_path, cache_dir):
    code, out, err = main_in_process(["-m", *TINY_SCAN, "lightly.loader.batch_size=32,64"], monkeypatch, capsys,
                                     tmp_path, cache_dir)
    assert code == 0, err
    configs = sorted((tmp_path / "runs" / "multirun").glob("*/*/.hydra/config.yaml"))
    assert len(configs) == 2
    swept = [OmegaConf.load(path) for path in configs]
    assert sorted((c.sampler.batch_size, c.ssl.batch_size) for c in swept) == [(32, 32), (64, 64)]


def test_scorer_config_sets_the_scorer_groups_keys(registered):
    rewritten = rewrite_worker_keys(["scorer=object-frequency", "scorer_config.frequency_penalty=0.5",
                                     "scorer_config.min_score=0.8"])
    cfg = compose(*rewritten.args)
    assert (cfg.scorer.frequency_penalty, cfg.scorer.min_score) == (0.5, 0.8)


def test_lightly_rules_are_each_a_mapping_an_ignore_or_a_refusal():
    for key, rule in LIGHTLY_RULES.items():
        assert rule.targets or rule.ignored or rule.refused, key
        assert not (rule.ignored and rule.refused), key
