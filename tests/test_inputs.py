"""app.data.inputs: the paths each data config reads, named once for the config check, the scan and
the docker launcher (tests/test_launcher.py pins the mounts made from them)."""
from __future__ import annotations

import pytest

from app.config import validate
from app.data.inputs import FILE, FOLDER, data_inputs, images_location, run_inputs
from app.data.scan import resolve_input_dir
from app.errors import UserError
from conftest import compose


pytestmark = pytest.mark.usefixtures("registered")


def described(paths) -> list:
    return [(path.key, path.value, path.kind) for path in paths]


def test_each_data_format_names_the_paths_it_reads(tmp_path):
    images, root = tmp_path / "images", tmp_path / "pets"
    assert described(data_inputs(compose("data=folder", f"data.input_dir={images}").data)) == \
        [("data.input_dir", str(images), FOLDER)]
    coco = compose("data=coco", f"data.input_dir={images}", f"data.relevant_filenames_file={tmp_path}/list.txt")
    assert described(data_inputs(coco.data)) == [
        ("data.input_dir", str(images), FOLDER),
        ("data.relevant_filenames_file", f"{tmp_path}/list.txt", FILE),
        ("data.annotations", f"{images}/annotations.json", FILE)]  # the default follows data.input_dir
    assert described(data_inputs(compose("data=oxford_pet", f"data.root={root}").data)) == \
        [("data.root", str(root), FOLDER)]
    assert data_inputs(compose("data=shapes").data) == []  # generated into the cache


def test_where_the_images_are(tmp_path):
    assert images_location(compose("data=oxford_pet", f"data.root={tmp_path}").data) == tmp_path / "images"
    assert images_location(compose("data=folder", f"data.input_dir={tmp_path}").data) == tmp_path
    assert images_location(compose("data=coco", "data.input_dir=s3://bucket/images/").data) == "s3://bucket/images"
    assert images_location(compose("data=shapes").data) is None
    # The scan reads the same: only images/ of the Pets layout holds inputs.
    assert resolve_input_dir(compose("data=oxford_pet", f"data.root={tmp_path}").data) == tmp_path / "images"


def test_a_run_also_reads_its_own_files_and_a_weights_name_is_no_path(tmp_path):
    cfg = compose("data=shapes", f"embeddings={tmp_path}/e.csv", f"checkpoint={tmp_path}/c.pt",
                  f"model.weights={tmp_path}/w.pt", f"trainer.val_filenames_file={tmp_path}/val.txt")
    assert described(run_inputs(cfg)) == [("embeddings", f"{tmp_path}/e.csv", FILE),
                                          ("checkpoint", f"{tmp_path}/c.pt", FILE),
                                          ("model.weights", f"{tmp_path}/w.pt", FILE),
                                          ("trainer.val_filenames_file", f"{tmp_path}/val.txt", FILE)]
    assert run_inputs(compose("data=shapes", "model.weights=ResNet18_Weights.IMAGENET1K_V1")) == []


@pytest.mark.parametrize("format_overrides, missing, message", [
    (["data=folder"], "data.input_dir={tmp}/none/",
     "data.input_dir='{tmp}/none' is not allowed: it must be an existing folder of images (in Docker, mount it "
     "at /data/input)"),
    (["data=folder", "data.input_dir={tmp}"], "data.relevant_filenames_file={tmp}/list.txt",
     "data.relevant_filenames_file='{tmp}/list.txt' is not allowed: it must be an existing text file, one image "
     "path per line relative to data.input_dir"),
    (["data=coco", "data.input_dir={tmp}"], "data.annotations={tmp}/a.json",
     "data.annotations='{tmp}/a.json' is not allowed: it must be an existing COCO JSON file"),
    (["data=oxford_pet"], "data.root={tmp}/",  # a folder without images/
     "data.root='{tmp}' is not allowed: it must hold the Oxford-IIIT Pet layout: images/, annotations/xmls/ and "
     "annotations/trainval.txt"),
], ids=["input_dir", "relevant_filenames_file", "annotations", "root"])
def test_a_missing_input_is_refused_with_its_key_when_a_stage_reads_it(tmp_path, format_overrides, missing, message):
    overrides = [o.format(tmp=tmp_path) for o in (*format_overrides, missing)]
    with pytest.raises(UserError) as refused:
        validate(compose(*overrides, f"work_dir={tmp_path}/runs"))
    assert str(refused.value) == message.format(tmp=tmp_path)
    validate(compose(*overrides, f"work_dir={tmp_path}/runs", "stages=[train]"))  # no scan: not read now
