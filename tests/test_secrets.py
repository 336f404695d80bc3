"""No secret value reaches stdout, stderr, the log or any file of the run directory."""
from __future__ import annotations

import logging
import os
import secrets as token_source
from pathlib import Path

import pytest

from app import secrets
from conftest import SMALL, main_in_process, only_run_dir, thresher


@pytest.fixture(autouse=True)
def _clean_registry(monkeypatch):
    monkeypatch.setattr(secrets, "_secret_values", set())
    for variable in (*secrets.KNOWN_SECRETS, "MY_BUCKET_SECRET"):
        monkeypatch.delenv(variable, raising=False)
        monkeypatch.delenv(f"{variable}_FILE", raising=False)


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
    from app.errors import UserError

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


@pytest.mark.slow
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


@pytest.mark.slow
def test_no_secret_in_the_error_of_a_failed_run(env, tmp_path):
    token = f"tok-{token_source.token_hex(12)}"
    # the token is also the name of a missing input folder, so the error message would hold it
    result = thresher(["data=folder", f"data.input_dir=/data/{token}", f"token={token}"], env, tmp_path)
    assert result.returncode == 2
    assert token not in result.stdout + result.stderr
    assert "***" in result.stderr


def test_secret_resolver_reads_the_variable_or_its_file_and_registers_the_value(tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    secrets.register_secret_resolver()
    cfg = OmegaConf.create({"key": "${secret:MY_BUCKET_SECRET}", "optional": "${secret:WANDB_API_KEY,null}"})
    monkeypatch.setenv("MY_BUCKET_SECRET", "from-the-environment")
    assert cfg.key == "from-the-environment" and cfg.optional is None
    monkeypatch.delenv("MY_BUCKET_SECRET")
    (tmp_path / "secret").write_text("from-a-secret-file\n")
    monkeypatch.setenv("MY_BUCKET_SECRET_FILE", str(tmp_path / "secret"))
    assert cfg.key == "from-a-secret-file"
    assert secrets.redact("a from-the-environment b from-a-secret-file") == "a *** b ***"
    assert "from-a" not in OmegaConf.to_yaml(cfg), "a saved config holds the reference, not the value"


@pytest.mark.slow
def test_a_required_secret_that_is_missing_is_named_at_start(env, tmp_path):
    result = thresher(["data=folder", f"data.input_dir={tmp_path}", "storage_options.s3.secret=${secret:MY_BUCKET_SECRET}"],
                      env, tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("thresher: error: storage_options.s3.secret: the secret MY_BUCKET_SECRET is "
                                    "required and not set: export MY_BUCKET_SECRET, or MY_BUCKET_SECRET_FILE")
    assert "Traceback" not in result.stderr and not (tmp_path / "runs").exists(), "refused before any work"


@pytest.mark.slow
def test_known_secrets_are_redacted_from_errors_and_printed_configs(env, tmp_path):
    keys = {name: f"{name.lower()}-{token_source.token_hex(8)}" for name in
            ("WANDB_API_KEY", "AWS_SECRET_ACCESS_KEY", "AZURE_STORAGE_ACCOUNT_KEY")}
    (tmp_path / "wandb_key").write_text(keys["WANDB_API_KEY"])
    env = {**env, "WANDB_API_KEY_FILE": str(tmp_path / "wandb_key"), "AWS_SECRET_ACCESS_KEY": keys["AWS_SECRET_ACCESS_KEY"],
           "AZURE_STORAGE_ACCOUNT_KEY": keys["AZURE_STORAGE_ACCOUNT_KEY"]}
    # each key is also the name of a missing input folder, so the error message would hold it
    for key in keys.values():
        failed = thresher(["data=folder", f"data.input_dir=/data/{key}"], env, tmp_path)
        assert failed.returncode == 2 and "***" in failed.stderr
        assert key not in failed.stdout + failed.stderr
    printed = thresher(["--cfg", "job", "--resolve"], env, tmp_path)
    assert printed.returncode == 0, printed.stderr
    assert "secret: ***" in printed.stdout and "account_key: ***" in printed.stdout
    assert not any(key in printed.stdout + printed.stderr for key in keys.values())
    plain = thresher(["--cfg", "job"], env, tmp_path)
    assert "secret: ${secret:AWS_SECRET_ACCESS_KEY,null}" in plain.stdout


@pytest.mark.slow
def test_no_secret_in_any_file_of_a_selection_run(env, tmp_path):
    keys = {name: f"{name.lower()}-{token_source.token_hex(8)}" for name in ("THRESHER_TOKEN", "WANDB_API_KEY",
                                                                          "AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID")}
    env = {**env, **keys}
    result = thresher([*SMALL, "sampler=random", "sampler.stopping_condition.n_samples=10",
                       "stages=[scan,embed,select]"], env, tmp_path)
    assert result.returncode == 0, result.stderr
    run_dir = only_run_dir(tmp_path / "runs")
    written = every_byte_written(run_dir)
    for key in keys.values():
        assert key.encode() not in written and key not in result.stdout + result.stderr
    saved = (run_dir / ".hydra/config.yaml").read_text()
    assert "token: '***'" in saved and "key: ${secret:AWS_ACCESS_KEY_ID,null}" in saved


# ---- the fast tier's in-process checks of the CLI runs above -------------------------------------

def test_no_secret_in_the_error_of_a_run_refused_in_process(monkeypatch, capsys, tmp_path, cache_dir):
    """test_no_secret_in_the_error_of_a_failed_run (slow tier) through `app.cli.main` in this process."""
    token = f"tok-{token_source.token_hex(12)}"
    # the token is also the name of a missing input folder, so the error message would hold it
    code, out, err = main_in_process(["data=folder", f"data.input_dir=/data/{token}", f"token={token}"],
                                     monkeypatch, capsys, tmp_path, cache_dir)
    assert code == 2
    assert token not in out + err
    assert err.startswith("thresher: error: ") and "***" in err


def test_a_missing_required_secret_is_named_in_process_and_a_known_one_is_never_printed(monkeypatch, capsys,
                                                                                      tmp_path, cache_dir):
    """test_a_required_secret_that_is_missing_is_named_at_start and the printed config of
    test_known_secrets_are_redacted_from_errors_and_printed_configs (slow tier), in this process."""
    code, out, err = main_in_process(["data=folder", f"data.input_dir={tmp_path}",
                                      "storage_options.s3.secret=${secret:MY_BUCKET_SECRET}"],
                                     monkeypatch, capsys, tmp_path, cache_dir)
    assert code == 2
    assert err.startswith("thresher: error: storage_options.s3.secret: the secret MY_BUCKET_SECRET is required "
                          "and not set: export MY_BUCKET_SECRET, or MY_BUCKET_SECRET_FILE")
    assert "Traceback" not in err and not (tmp_path / "runs").exists(), "refused before any work"

    key = f"aws-{token_source.token_hex(8)}"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key)
    code, out, err = main_in_process(["--cfg", "job", "--resolve"], monkeypatch, capsys, tmp_path, cache_dir)
    assert code == 0, err
    assert "secret: ***" in out and key not in out + err
