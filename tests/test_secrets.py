"""No secret value reaches stdout, stderr, the log or any file of the run directory."""
from __future__ import annotations

import logging
import os
import secrets as token_source
from pathlib import Path

import pytest

from app import secrets
from conftest import SMALL, only_run_dir, thresher


@pytest.fixture(autouse=True)
def _clean_registry(monkeypatch):
    monkeypatch.setattr(secrets, "_secret_values", set())
    monkeypatch.delenv("THRESHER_TOKEN", raising=False)
    monkeypatch.delenv("THRESHER_TOKEN_FILE", raising=False)


def every_byte_written(run_dir: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file())


def test_token_override_is_taken_off_the_command_line():
    argv = secrets.take_secret_overrides(["sampler=random", "token=s3cr3t-value", "trainer.epochs=1"])
    assert argv == ["sampler=random", "trainer.epochs=1"]
    assert os.environ["THRESHER_TOKEN"] == "s3cr3t-value"
    assert secrets.redact("the token is s3cr3t-value.") == "the token is ***."


def test_token_file_is_read_when_the_variable_is_absent(tmp_path, monkeypatch):
    (tmp_path / "token").write_text("from-a-file\n")
    monkeypatch.setenv("THRESHER_TOKEN_FILE", str(tmp_path / "token"))
    assert secrets.read_secret("THRESHER_TOKEN") == "from-a-file"
    assert secrets.redact("x from-a-file y") == "x *** y"


def test_missing_token_file_is_a_user_error_naming_the_variable(tmp_path, monkeypatch):
    from app.config import UserError

    monkeypatch.setenv("THRESHER_TOKEN_FILE", str(tmp_path / "absent"))
    with pytest.raises(UserError, match="THRESHER_TOKEN_FILE"):
        secrets.read_secret("THRESHER_TOKEN")


def test_log_records_and_their_tracebacks_are_redacted():
    secrets.register_secret("hunter2-hunter2")
    record = logging.LogRecord("t", logging.ERROR, __file__, 1, "login with %s", ("hunter2-hunter2",), None)
    try:
        raise RuntimeError("bad token hunter2-hunter2")
    except RuntimeError:
        import sys

        record.exc_info = sys.exc_info()
    secrets.RedactingFilter().filter(record)
    assert "hunter2" not in record.getMessage() and "hunter2" not in record.exc_text


@pytest.mark.parametrize("channel", ["argv", "env", "file"])
def test_no_secret_anywhere_in_a_full_run(channel, env, tmp_path):
    token = f"tok-{channel}-{token_source.token_hex(12)}"
    args = [*SMALL, "sampler=random", "sampler.stopping_condition.n_samples=10", "note=secret_check"]
    if channel == "argv":
        args.append(f"token={token}")
    elif channel == "env":
        env = {**env, "THRESHER_TOKEN": token}
    else:
        (tmp_path / "token.txt").write_text(token + "\n")
        env = {**env, "THRESHER_TOKEN_FILE": str(tmp_path / "token.txt")}
    result = thresher(args, env, tmp_path)
    assert result.returncode == 0, result.stderr
    run_dir = only_run_dir(tmp_path / "runs")
    written = every_byte_written(run_dir)
    assert (run_dir / ".hydra/overrides.yaml").is_file()
    assert token.encode() not in written
    assert token not in result.stdout + result.stderr
    assert "token: '***'" in (run_dir / ".hydra/config.yaml").read_text()


def test_no_secret_in_the_error_of_a_failed_run(env, tmp_path):
    token = f"tok-{token_source.token_hex(12)}"
    # the token is also the name of a missing input folder, so the error message would hold it
    result = thresher(["data=folder", f"data.input_dir=/data/{token}", f"token={token}"], env, tmp_path)
    assert result.returncode == 2
    assert token not in result.stdout + result.stderr
    assert "***" in result.stderr
