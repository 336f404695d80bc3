"""What a newcomer reads first: `thresher --help`, a mistyped option's list and tab completion name
only the real options of each group (the YAML files in conf/<group>/), never the schemas behind
them; and those schemas still type every option."""
from __future__ import annotations

import re

import pytest
from omegaconf import OmegaConf

from app import cli
from app.data.schema import CocoDataConfig, FolderDataConfig, OxfordPetDataConfig, ShapesDataConfig
from conftest import compose, main_in_process

SCHEMA_NAME = re.compile(r"\w*_schema\b")


def groups_in_help(text: str) -> dict:
    """The `group: option, option` lines of the help's "Configuration groups" section."""
    section = text.split("== Configuration groups ==", 1)[1].split("== Config ==", 1)[0]
    groups = {}
    for line in section.splitlines():
        match = re.match(r"^(\S+): (.*)$", line)
        if match:
            groups[match[1]] = match[2].split(", ")
    return groups


def test_help_lists_each_group_with_its_yaml_options_only(capsys, monkeypatch, tmp_path, cache_dir):
    code, out, _ = main_in_process(["--help"], monkeypatch, capsys, tmp_path, cache_dir)

    assert code == 0
    assert groups_in_help(out) == {group: cli.group_options(group) for group in cli.GROUPS}
    assert not SCHEMA_NAME.search(out), SCHEMA_NAME.findall(out)


def test_a_missing_option_in_a_sweep_lists_only_the_yaml_options(capsys, monkeypatch, tmp_path, cache_dir):
    """`-m` is checked before Hydra starts a job, with the one line a single run gets."""
    code, out, err = main_in_process(["-m", "data=shapes,cocoo"], monkeypatch, capsys, tmp_path, cache_dir)

    assert code == 2
    assert err.strip().splitlines() == [f"thresher: error: data=cocoo is not an option: choose from "
                                         f"{', '.join(cli.group_options('data'))} (did you mean coco?)"]
    assert not SCHEMA_NAME.search(out + err)


def test_a_missing_option_in_a_run_lists_only_the_yaml_options(capsys, monkeypatch, tmp_path, cache_dir):
    code, _, err = main_in_process(["sampler=corest", "--cfg", "job"], monkeypatch, capsys, tmp_path, cache_dir)

    assert code == 2
    assert err.strip().splitlines() == [
        "thresher: error: sampler=corest is not an option: choose from coreset, hybrid, none, random, typical, uncertainty (did you mean coreset?)"]


@pytest.mark.parametrize("group", ["data", "sampler"])
def test_tab_completion_offers_only_the_yaml_options(group, capsys, monkeypatch, tmp_path, cache_dir):
    monkeypatch.setenv("COMP_LINE", f"thresher {group}=")
    code, out, _ = main_in_process(["--shell-completion", "query=bash"], monkeypatch, capsys, tmp_path, cache_dir)

    assert code == 0
    assert sorted(out.split()) == [f"{group}={option}" for option in cli.group_options(group)]


@pytest.mark.parametrize("option, schema", [("shapes", ShapesDataConfig), ("folder", FolderDataConfig),
                                            ("coco", CocoDataConfig), ("oxford_pet", OxfordPetDataConfig)])
def test_every_data_option_is_typed_by_its_schema(option, schema):
    assert OmegaConf.get_type(compose(f"data={option}").data) is schema


def test_every_sampler_option_is_typed_by_its_registered_schema():
    from app.sampling.samplers import registry
    from app.sampling.schema import SamplerConfig

    for name, sampler in registry().items():
        assert OmegaConf.get_type(compose(f"sampler={name}").sampler) is (sampler.schema or SamplerConfig)


@pytest.mark.parametrize("override, refusal", [
    ("data.n_imagez=3", "data.n_imagez=3: no such key (did you mean data.n_images?)"),
    ("data.n_images=many", "data.n_images='many' is not allowed: expected an integer"),
    ("sampler.stopping_condition.n_sample=3", "sampler.stopping_condition.n_sample=3: no such key"),
])
def test_the_schemas_still_refuse_a_typo_or_a_wrong_type(override, refusal, capsys, monkeypatch, tmp_path, cache_dir):
    monkeypatch.setenv("THRESHER_WORK_DIR", str(tmp_path / "runs"))
    code, out, err = main_in_process([override], monkeypatch, capsys, tmp_path, cache_dir)

    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"thresher: error: {refusal}")
    assert not (tmp_path / "runs").exists()


def test_cfg_job_of_a_data_option_shows_its_schema_keys_and_yaml_values(capsys, monkeypatch, tmp_path, cache_dir):
    (tmp_path / "annotations.json").write_text('{"images": [], "annotations": [], "categories": []}')
    code, out, err = main_in_process(["data=coco", f"data.input_dir={tmp_path}",
                                      f"data.annotations={tmp_path / 'annotations.json'}", "--cfg", "job"],
                                     monkeypatch, capsys, tmp_path, cache_dir)

    assert code == 0, err
    data = OmegaConf.create(out).data
    assert data.name == "coco"
    assert set(data) == {"name", "image_size", "augment", "input_dir", "relevant_filenames_file", "annotations",
                         "holdout_fraction", "val_input_dir"}
