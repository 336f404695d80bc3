"""bench/gpu_check.sh on the CPU with tiny sizes: the GPU check must not be first run on the rare
day a GPU is lent, so CI runs every one of its steps here."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT

EXPECTED_STEPS = ["coreset isotropic", "embed", "train fp32", "train bf16", "train fp16", "profile (NVML)",
                  "torchrun, 1 process", "coreset clustered"]


@pytest.mark.slow
def test_gpu_check_runs_every_step_on_the_cpu(env, tmp_path):
    env["OUT"] = str(tmp_path / "out")
    env["PYTHON"] = sys.executable  # this checkout's interpreter, wherever its venv is
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--device", "cpu", "--quick"], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=900)
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    rows = {row["step"]: row for row in report["steps"]}
    assert list(rows) == EXPECTED_STEPS, done.stdout[-3000:]
    for name, row in rows.items():
        # fp16 needs CUDA: thresher may refuse it on the CPU, or warn and train in float32.
        allowed = ("ok", "refused", "fell back") if name == "train fp16" else ("ok",)
        assert row["status"] in allowed, f"{name}: {row['status']}: {row.get('error')}\n{done.stdout[-3000:]}"
        assert all(isinstance(value, (int, float)) and not isinstance(value, bool)
                   for value in row["figures"].values()), (name, row["figures"])
        if row["status"] == "ok":
            assert row["figures"], name
    assert rows["embed"]["figures"]["images_per_s"] > 0
    assert rows["train bf16"]["figures"]["images_per_s"] > 0
    assert rows["torchrun, 1 process"]["figures"]["processes"] == 1
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "| step | status |" in done.stdout
    assert (tmp_path / "out" / "gpu_check.md").is_file()
