"""The ``per-buffer`` command as a whole: help, version, usage errors, the console script,
what ``status`` imports, and messages for malformed settings."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import backlog, clean_env, one_error_line, run, script

from per_buffer import __version__
from per_buffer.cli import main

COMMANDS = [
    "demo",
    "status",
    "drain",
    "dead-letters",
    "salvage",
    "record",
    "report",
    "serve-local",
]
# the exit statuses each command documents (and may return)
EXIT_CODES = {
    "demo": {0, 1, 2, 130, 143},
    "status": {0, 1, 2},
    "drain": {0, 1, 2, 130, 143},
    "dead-letters": {0, 1, 2},
    "salvage": {0, 1, 2, 3},
    "record": {0, 1, 2, 3},
    "report": {0, 1, 2},
    "serve-local": {0, 1, 2},
}


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_exits_0_with_examples(
    command: str | None, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--help"] if command is None else [command, "--help"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "examples:" in out
    assert "per-buffer " + (command or "demo") in out


@pytest.mark.parametrize("command", COMMANDS)
def test_help_documents_every_exit_status(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([command, "--help"]) == 0
    epilog = capsys.readouterr().out.split("exit status:\n", 1)[1]
    documented = {int(m) for m in re.findall(r"^\s+(\d+)\s", epilog, flags=re.M)}
    assert documented == EXIT_CODES[command]


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert run("--version") == 0
    assert capsys.readouterr().out.strip() == f"per-buffer {__version__}"


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert run() == 2
    assert "COMMAND" in one_error_line(capsys.readouterr().err)


def test_console_script_help_version_and_error() -> None:
    env = clean_env()
    done = script("--help", env=env)
    assert done.returncode == 0 and "examples:" in done.stdout
    done = subprocess.run(
        [sys.executable, "-m", "per_buffer", "--version"],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0 and done.stdout.strip() == f"per-buffer {__version__}"
    done = script("report", "--start", "2024-05-01", env=env)
    assert done.returncode == 2
    assert done.stdout == ""
    assert "PER_REPORTING_TOKEN" in one_error_line(done.stderr)


def test_python_m_subcommand_help() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "per_buffer", "drain", "--help"],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=30,
        check=False,
    )
    assert done.returncode == 0
    assert "usage: per-buffer drain" in done.stdout


def test_status_does_not_import_the_test_server(tmp_path: Path) -> None:
    """``per-buffer status`` (the whole parser included) never loads per_buffer.testing."""
    backlog(tmp_path / "q", 2)
    code = (
        "import sys\n"
        "from per_buffer.cli import main\n"
        f"code = main(['status', '--dir', {str(tmp_path / 'q')!r}])\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('per_buffer.testing'))\n"
        "print(code, loaded)\n"
    )
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=30,
        check=False,
    )
    assert done.stdout.splitlines()[-1] == "0 []", done.stdout + done.stderr
    assert "per_buffer.cli.status" in done.stderr  # the import log saw the command
    assert "per_buffer.testing" not in done.stderr
    assert "per_buffer.cli.demo" in done.stderr  # its parser is built; its server is not


@pytest.mark.parametrize(
    ("argv", "code", "needle"),
    [
        (
            [
                "record",
                "--billing-id",
                "a",
                "--user-id",
                "u",
                "--activity-type-id",
                "t",
                "--direct",
            ],
            2,
            "PER_ACTIVITY_TOKEN",
        ),
        (["report", "--start", "2024-05-01"], 2, "PER_REPORTING_TOKEN"),
        (["status"], 2, "PER_BUFFER_DIR"),
        (["status", "--all", "--dir", "."], 2, "--all"),
        (["drain"], 2, "--dir"),
        (["demo", "--activities", "lots"], 2, "--activities"),
        (["demo", "--seconds-outage", "-1"], 2, "--seconds-outage"),
        (["drain", "--dir", ".", "--timeout", "nan"], 2, "--timeout"),
        (["dead-letters", "list", "--limit", "0"], 2, "--limit"),
        (["dead-letters", "zap"], 2, "zap"),
        (["serve-local", "--port", "70000"], 2, "--port"),
        (["record", "--billing-id", "", "--user-id", "u"], 2, "--billing-id"),
        (["salvage"], 2, "QUARANTINE_DIR"),
    ],
)
def test_usage_errors_are_one_line(
    argv: list[str], code: int, needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == code
    captured = capsys.readouterr()
    assert needle in one_error_line(captured.err)
    assert captured.out == ""


def test_bad_base_url(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("PER_BASE_URL", "http://per.example.com")
    monkeypatch.setenv("PER_REPORTING_TOKEN", "t")
    assert run("report") == 2
    assert "PER_BASE_URL" in one_error_line(capsys.readouterr().err)


def test_unknown_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope"
    for argv in (["status"], ["drain"], ["dead-letters", "list"]):
        assert main([*argv, "--dir", str(missing)]) == 2
        line = one_error_line(capsys.readouterr().err)
        assert "does not exist" in line and "--dir" in line
    assert not missing.exists()


def test_unknown_default_dir(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("PER_ACTIVITY_TOKEN", "some-token")
    assert run("status") == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(tmp_path) in line and "PER_BUFFER_DIR" in line


def test_a_malformed_setting_names_its_unit(tmp_path: Path) -> None:
    """``PER_BUFFER_TIMEOUT=15m`` is a usage error whose one line says the unit is seconds."""
    env = clean_env(
        PER_ACTIVITY_TOKEN="t",
        PER_ACTIVITY_TYPE_ID="login",
        PER_BASE_URL="http://127.0.0.1:9",
        PER_BUFFER_DIR=str(tmp_path / "q"),
        PER_BUFFER_TIMEOUT="15m",
    )
    done = script("record", "--billing-id", "acme", "--user-id", "u1", env=env)
    assert done.returncode == 2 and done.stdout == ""
    line = one_error_line(done.stderr)
    assert "PER_BUFFER_TIMEOUT='15m' is not a valid timeout (a number of seconds)" in line
