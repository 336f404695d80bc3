"""The sampler registry: a sampler is one module in app/sampling/samplers/ and one YAML in
conf/sampler/; the config refuses a name no module registers; the budget is parsed in one place."""
from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import yaml

from app import cli
from app.config import register_configs, register_resolvers, validate
from app.errors import UserError
from app.sampling.schema import Budget

EVERY_NTH = '''
"""sampler=every_nth: every `step`-th candidate, without embeddings."""
from dataclasses import dataclass

from app.errors import UserError
from app.sampling.schema import SamplerConfig
from app.sampling.samplers import Sampler, Selection


@dataclass
class EveryNthConfig(SamplerConfig):
    step: int = 2


def check(config):
    if config.step < 1:
        raise UserError(f"sampler.step={config.step} is not allowed: use an integer >= 1")


def select(candidates, count, pool, seed, device, config):
    return Selection(list(range(0, len(candidates.units), config.step))[:count], None, "n_samples")


SAMPLER = Sampler(name="every_nth", select=select, needs_embeddings=False, schema=EveryNthConfig, check=check)
'''

EVERY_NTH_YAML = """# Every step-th image.
defaults:
  - /sampler_every_nth_schema@_here_

method: every_nth
step: 2
stopping_condition:
  n_samples: -1
  min_distance: -1.0
"""


@pytest.fixture(autouse=True)
def configs(tmp_path, monkeypatch):
    monkeypatch.setenv("THRESHER_WORK_DIR", str(tmp_path / "runs"))
    register_configs()
    register_resolvers()


def refusal(overrides) -> str:
    with pytest.raises(UserError) as caught:
        validate(cli.compose(list(overrides)))
    return str(caught.value)


def test_every_registered_sampler_has_its_yaml_and_every_yaml_a_sampler():
    from app.sampling.samplers import registry

    yamls = {path.stem: yaml.safe_load(path.read_text()) for path in (cli.CONF_DIR / "sampler").glob("*.yaml")}
    assert sorted(yamls) == sorted(registry())
    assert {"coreset", "none", "random"} <= set(yamls)
    for name, content in yamls.items():
        assert content["method"] == name
        assert content["defaults"] == [f"/sampler_{name}_schema@_here_"]


def test_what_each_sampler_needs_comes_from_the_registry():
    from app.sampling.samplers import get_sampler

    assert [get_sampler(name).needs_embeddings for name in ("coreset", "random", "none")] == [True, False, False]
    assert get_sampler("coreset").uses_min_distance and not get_sampler("random").uses_min_distance


def test_an_unknown_sampler_method_is_refused_with_a_suggestion():
    assert refusal(["sampler.method=coreste"]) == ("sampler.method='coreste' is not allowed: choose from coreset, "
                                                    "hybrid, none, random, typical, uncertainty (did you mean coreset?)")


def test_the_registry_loads_no_torch():
    code = ("import sys\n"
            "from app.sampling.samplers import registry\n"
            "assert {'coreset', 'none', 'random'} <= set(registry())\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n"
            "print('no torch')\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=cli.CONF_DIR.parent, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "no torch" in result.stdout


def test_a_new_sampler_is_one_module_and_one_yaml(tmp_path, monkeypatch):
    """Its own key is typed and checked, what it declares is enforced, the select stage dispatches
    to it: with nothing but its module and its YAML added."""
    import app.sampling.samplers as samplers

    package = tmp_path / "samplers"
    package.mkdir()
    (package / "every_nth.py").write_text(EVERY_NTH)
    conf = tmp_path / "conf"
    shutil.copytree(cli.CONF_DIR, conf)
    (conf / "sampler/every_nth.yaml").write_text(EVERY_NTH_YAML)
    monkeypatch.setattr(samplers, "__path__", [*samplers.__path__, str(package)])
    monkeypatch.setattr(samplers, "_registry", None)
    monkeypatch.setattr(cli, "CONF_DIR", conf)
    monkeypatch.delitem(sys.modules, "app.sampling.samplers.every_nth", raising=False)
    register_configs()

    cfg = cli.compose(["sampler=every_nth", "sampler.step=3"])
    validate(cfg)
    assert cfg.sampler.step == 3 and "every_nth" in cli.group_options("sampler")
    assert refusal(["sampler=every_nth", "sampler.step=0"]) == "sampler.step=0 is not allowed: use an integer >= 1"
    assert "sampler.step='x' is not allowed: expected an integer" in refusal(["sampler=every_nth", "sampler.step=x"])
    assert "sampler.step=3: no such key" in refusal(["sampler=random", "sampler.step=3"])
    assert refusal(["sampler=every_nth", "sampler.near_duplicate_distance=0.1"]).endswith(
        "it needs embeddings; sampler=every_nth has none")
    assert refusal(["sampler=every_nth", "sampler.stopping_condition.min_distance=0.5"]).endswith(
        "it applies to sampler=coreset only, not sampler=every_nth; use -1")
    assert not samplers.needs_embeddings(cfg)  # so the runner skips the embed stage

    from app.sampling.select import choose

    chosen = choose(cfg, [f"{i}.png" for i in range(8)], None, None, "cpu")
    assert (chosen.picks, chosen.distances, chosen.stopped_by) == ([0, 3, 6], None, "n_samples")


@pytest.mark.parametrize("value, budget, count_of_40", [
    (-1, Budget(), 40), (-1.0, Budget(), 40), (10, Budget(count=10), 10), (100, Budget(count=100), 40),
    (0.25, Budget(fraction=0.25), 10), (1.0, Budget(fraction=1.0), 40), (0.001, Budget(fraction=0.001), 1),
])
def test_the_budget_is_parsed_once_into_a_count_a_fraction_or_off(value, budget, count_of_40):
    assert Budget.parse(value) == budget
    assert Budget.parse(value).count_for(40) == count_of_40
    assert Budget.parse(value).is_off == (value in (-1, -1.0))


@pytest.mark.parametrize("value", [0, -3, 1.5, 0.0, float("nan"), "many", True])
def test_a_budget_that_is_none_of_them_is_refused(value):
    with pytest.raises(UserError, match="sampler.stopping_condition.n_samples=.* is not allowed: use a count"):
        Budget.parse(value)
