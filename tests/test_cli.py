"""The command line: options, environment fallbacks, fail-fast validation. The one seam
mocked is serve(), which would start the server (and, once, the lock primitive, to stand for
a filesystem whose locks do not exclude)."""

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

import file_relay


@pytest.fixture
def started(monkeypatch):
    """Run main() and return the config serve() would have been given."""
    seen = []
    monkeypatch.setattr(file_relay, "serve", lambda config, **options: seen.append(config) or 0)
    for name in [name for name in list(__import__("os").environ) if name.startswith("RELAY_")]:
        monkeypatch.delenv(name)

    def run(*argv):
        assert file_relay.main(list(argv)) == 0
        return seen[-1]

    return run


def fails(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        file_relay.main(list(argv))
    assert exit_info.value.code == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith("file_relay.py: error:")
    return message


def test_defaults(started, tmp_path):
    config = started("server-id-long-enough", "--files-directory", str(tmp_path / "f"))
    assert config.server_id == "server-id-long-enough"
    assert config.bind == "0.0.0.0:8080"
    assert config.max_file_size is None
    assert config.files_directory == tmp_path / "f" and config.files_directory.is_dir()
    assert (config.workers, config.threads) == (2, 256)


def test_the_default_files_directory_is_dedicated():
    default = file_relay.RelayConfig.files_directory
    assert default.name == "file-relay" and str(default) not in ("/var/tmp", "/tmp")


def test_options(started, tmp_path):
    config = started(
        "--server_id",
        "server-id-long-enough",
        "--bind",
        ":8002",
        "--files-directory",
        str(tmp_path),
        "--workers",
        "4",
        "--threads",
        "16",
        "--max-file-size",
        "1.5G",
        "--log-level",
        "debug",
    )
    assert config.server_id == "server-id-long-enough"
    assert config.bind == "0.0.0.0:8002"
    assert (config.workers, config.threads) == (4, 16)
    assert config.max_file_size == 3 << 29
    assert config.log_level == "debug"


def test_environment_fallbacks(started, tmp_path, monkeypatch):
    monkeypatch.setenv("RELAY_SERVER_ID", "from-the-environment-0123")
    monkeypatch.setenv("RELAY_BIND", "127.0.0.1:9000")
    monkeypatch.setenv("RELAY_FILES_DIRECTORY", str(tmp_path / "env"))
    monkeypatch.setenv("RELAY_MAX_FILE_SIZE", "10M")
    config = started()
    assert config.server_id == "from-the-environment-0123"
    assert config.bind == "127.0.0.1:9000"
    assert config.files_directory == tmp_path / "env"
    assert config.max_file_size == 10 << 20
    assert started("--bind", "127.0.0.1:9001").bind == "127.0.0.1:9001"  # the command line wins


@pytest.mark.parametrize(
    ("value", "purge"), [("1", True), ("Yes", True), ("on", True), ("False", False), ("OFF", False), ("", False)]
)
def test_a_yes_no_environment_variable_takes_the_usual_spellings(started, tmp_path, monkeypatch, value, purge):
    monkeypatch.setenv("RELAY_PURGE_ON_EXIT", value)
    assert started("--files-directory", str(tmp_path)).purge_on_exit is purge


def test_a_yes_no_environment_variable_that_is_neither_is_refused(started, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("RELAY_PURGE_ON_EXIT", "maybe")
    message = fails(capsys, "--files-directory", str(tmp_path))
    assert "RELAY_PURGE_ON_EXIT" in message and "maybe" in message


def test_no_server_id_generates_an_unguessable_one(started, tmp_path):
    first = started("--files-directory", str(tmp_path)).server_id
    second = started("--files-directory", str(tmp_path)).server_id
    assert first != second and len(first) >= 22  # 22 URL-safe characters hold 128 bits
    assert file_relay.SERVER_ID_RE.fullmatch(first)


def test_a_short_server_id_is_warned_about(started, tmp_path, capsys):
    started("short", "--files-directory", str(tmp_path))
    assert "can be guessed" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (":8002", "0.0.0.0:8002"),
        ("example.org:80", "example.org:80"),
        ("[::1]:8080", "[::1]:8080"),
        ("host", "host:8080"),
    ],
)
def test_bind_forms(text, expected):
    assert file_relay._bind_address(text) == expected


@pytest.mark.parametrize(
    ("text", "size"), [("0", 0), ("512", 512), ("1K", 1024), ("100M", 100 << 20), ("1.5G", 3 << 29), ("2TiB", 2 << 40)]
)
def test_sizes(text, size):
    assert file_relay.parse_size(text) == size


@pytest.mark.parametrize(
    ("size", "typed"), [(0, "0"), (1536, "1536"), (16 << 20, "16M"), (1 << 30, "1G"), (3 << 29, "1536M")]
)
def test_a_size_is_typed_in_its_largest_exact_unit(size, typed):
    assert file_relay.typed_size(size) == typed and file_relay.parse_size(typed) == size


@pytest.mark.parametrize(
    ("argv", "complaint"),
    [
        (["--bind", "host:port"], "bind"),
        (["--bind", "host:70000"], "bind"),
        (["--workers", "0"], "workers"),
        (["--threads", "many"], "threads"),
        (["--max-file-size", "12Q"], "max file size"),
        (["--ttl", "-5"], "ttl"),
        (["--log-level", "loud"], "log-level"),
        (["--server-id", "bad/id"], "server ID"),
        (["--certfile", "/nonexistent.pem"], "certfile"),
        (["--forwarded-allow-ips", "localhost"], "forwarded allow ips"),
        (["--idle-timeout", "0"], "idle timeout"),
    ],
)
def test_bad_options_fail_fast_with_one_line(capsys, tmp_path, argv, complaint):
    message = fails(capsys, "--files-directory", str(tmp_path), *argv)
    assert complaint in message


def test_a_server_id_must_be_url_safe(capsys, tmp_path):
    assert "server ID" in fails(capsys, "bad/id", "--files-directory", str(tmp_path))


def test_a_files_directory_that_is_a_file_is_refused(capsys, tmp_path):
    plain_file = tmp_path / "plain"
    plain_file.write_text("x")
    assert "not a directory" in fails(capsys, "server-id-long-enough", "--files-directory", str(plain_file))


def test_a_certificate_needs_its_key(capsys, tmp_path):
    cert = tmp_path / "cert.pem"
    cert.write_text("x")
    assert "go together" in fails(capsys, "--files-directory", str(tmp_path), "--certfile", str(cert))


def test_help_names_the_environment_variables():
    result = subprocess.run([sys.executable, str(ROOT / "file_relay.py"), "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for variable in ("RELAY_SERVER_ID", "RELAY_BIND", "RELAY_FILES_DIRECTORY", "RELAY_MAX_FILE_SIZE"):
        assert variable in result.stdout


def test_a_bad_option_starts_nothing(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "file_relay.py"), "--bind", "nowhere:x", "--files-directory", str(tmp_path / "d")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert result.stdout == "" and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "d").exists()


def test_trusted_proxies_may_be_networks():
    trusted = file_relay.parse_trusted_proxies("127.0.0.1, 10.88.0.0/16, ::1")
    forwarded = {"HTTP_X_FORWARDED_FOR": "198.51.100.1, 203.0.113.7"}
    assert file_relay._client_address({"REMOTE_ADDR": "10.88.3.4", **forwarded}, trusted) == "203.0.113.7"
    assert file_relay._client_address({"REMOTE_ADDR": "10.89.0.1", **forwarded}, trusted) == "10.89.0.1"
    assert file_relay._client_address({"REMOTE_ADDR": "::1", **forwarded}, trusted) == "203.0.113.7"
    anyone = file_relay.parse_trusted_proxies("*")
    assert file_relay._client_address({"REMOTE_ADDR": "192.0.2.9", **forwarded}, anyone) == "203.0.113.7"
    assert file_relay._client_address({"REMOTE_ADDR": "192.0.2.9"}, anyone) == "192.0.2.9"


def test_cors_origins_and_lingering(started, tmp_path, capsys):
    files = str(tmp_path / "f")
    config = started("server-id-long-enough", "--files-directory", files)
    assert (config.cors_origins, config.linger_time, config.linger_size) == ((), 30.0, 1 << 30)
    config = started(
        "server-id-long-enough",
        "--files-directory",
        files,
        "--cors-origin",
        "https://a.example, http://127.0.0.1:8000",
        "--linger-time",
        "2",
        "--linger-size",
        "8M",
    )
    assert config.cors_origins == ("https://a.example", "http://127.0.0.1:8000")
    assert (config.linger_time, config.linger_size) == (2.0, 8 << 20)
    assert started("server-id-long-enough", "--files-directory", files, "--cors-origin", "*").cors_origins == ("*",)
    as_browsers_send = started(
        "server-id-long-enough",
        "--files-directory",
        files,
        "--cors-origin",
        "HTTP://LOCALHOST:80,https://A.example:443",
    )
    assert as_browsers_send.cors_origins == ("http://localhost", "https://a.example")
    for bad in ("ftp://a.example", "https://a.example/path", "*,https://a.example"):
        assert "cors origin" in fails(capsys, "server-id-long-enough", "--files-directory", files, "--cors-origin", bad)


def _readme_options_table() -> dict[tuple[str, ...], tuple[str, str]]:
    """The README's relay options table: flags -> (environment variable, default)."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Options\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")][1:]  # past the header
    table = {}
    for row in rows:
        option, env, default, _meaning = (cell.strip() for cell in row.strip("|").split(" | ", 3))
        flags = tuple(word for span in re.findall(r"`([^`]+)`", option) if (word := span.split()[0]).startswith("-"))
        table[flags] = (env.strip("`"), default.replace("`", ""))
    return table


def test_the_readme_options_table_is_the_declared_options():
    declared = {option.flags: (option.env, option.documented_default) for option in file_relay.OPTIONS}
    assert _readme_options_table() == declared


def test_each_option_is_a_relay_config_field():
    fields = [field.name for field in dataclasses.fields(file_relay.RelayConfig)]
    assert fields == [option.name for option in file_relay.OPTIONS]
    for option in file_relay.OPTIONS:
        assert option.env == "RELAY_" + option.dest.upper()


@pytest.mark.parametrize("option", [option for option in file_relay.OPTIONS if option.typed], ids=lambda o: o.name)
def test_a_default_as_typed_is_the_default(option):
    """What --help shows (and argparse parses) as the default is RelayConfig's default."""
    if option.name == "files_directory":  # parsing it would create the directory
        assert Path(option.typed) == option.default
    else:
        assert (option.parse or str)(option.typed) == option.default


def test_a_files_directory_whose_locks_do_not_exclude_is_refused(capsys, tmp_path, monkeypatch):
    """The start-up probe: a filesystem on which a lock taken through one open file does
    not block another (here: every lock granted, as a filesystem without locks would)
    cannot keep the relay's promises, and the relay says so instead of starting."""
    monkeypatch.setattr(file_relay, "_lock", lambda fd, kind, start, length=1, *, wait=False: True)
    message = fails(capsys, "server-id-long-enough", "--files-directory", str(tmp_path))
    assert "does not block another" in message
    assert not [name for name in os.listdir(tmp_path / ".relay") if name.startswith(".probe")]
