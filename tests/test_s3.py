"""--storage s3://BUCKET/PREFIX against a real S3 server (SeaweedFS's weed mini, the
seaweed fixture): a configuration that cannot work fails at start with one line."""

import socket
import subprocess
import sys

import pytest
from harness import SCRIPT

SERVER_ID = "s3-relay-secret-0123456789"


def start(env: dict, *args, timeout: float = 60) -> subprocess.CompletedProcess:
    command = [sys.executable, str(SCRIPT), SERVER_ID, "--bind", "127.0.0.1:0", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("file_relay.py: error: storage: ")
    assert "Traceback" not in result.stderr
    return lines[-1]


@pytest.fixture
def relay_env(seaweed, tmp_path) -> dict:
    """The environment of a relay on the test server, nothing of this machine's AWS setup."""
    import os

    env = {key: value for key, value in os.environ.items() if not key.startswith("AWS_")}
    return {**env, **seaweed.env, "HOME": str(tmp_path)}


def test_a_good_configuration_is_checked_and_then_refused_as_not_served_yet(seaweed, relay_env, s3_storage_url):
    result = start(relay_env, "--storage", s3_storage_url, "--s3-endpoint", seaweed.endpoint)
    assert "does not serve objects yet" in one_line_error(result)


def test_wrong_credentials_fail_at_start(seaweed, relay_env, s3_storage_url):
    env = {**relay_env, "AWS_SECRET_ACCESS_KEY": "not-the-secret-key-0000"}
    line = one_line_error(start(env, "--storage", s3_storage_url, "--s3-endpoint", seaweed.endpoint))
    assert "refused the credentials" in line


def test_a_missing_bucket_fails_at_start(seaweed, relay_env):
    line = one_line_error(start(relay_env, "--storage", "s3://no-such-bucket/x", "--s3-endpoint", seaweed.endpoint))
    assert "bucket 'no-such-bucket' does not exist" in line


def test_credentials_that_cannot_write_fail_at_start(seaweed, relay_env, s3_storage_url):
    env = {**relay_env, "AWS_ACCESS_KEY_ID": "readonlykey", "AWS_SECRET_ACCESS_KEY": "readonlysecret0123"}
    line = one_line_error(start(env, "--storage", s3_storage_url, "--s3-endpoint", seaweed.endpoint))
    assert "no permission to write" in line


def test_an_unreachable_endpoint_fails_at_start(relay_env, s3_storage_url):
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    line = one_line_error(start(relay_env, "--storage", s3_storage_url, "--s3-endpoint", f"http://127.0.0.1:{port}"))
    assert "cannot reach the object store" in line


def test_missing_credentials_fail_at_start(seaweed, relay_env, s3_storage_url):
    env = {key: value for key, value in relay_env.items() if not key.startswith("AWS_ACCESS_KEY_ID")}
    env = {key: value for key, value in env.items() if key != "AWS_SECRET_ACCESS_KEY"}
    line = one_line_error(start(env, "--storage", s3_storage_url, "--s3-endpoint", seaweed.endpoint))
    assert "no AWS credentials" in line


@pytest.mark.parametrize(("option", "word"), [("--min-free=1G", "--min-free"), ("--purge-on-exit", "--purge-on-exit")])
def test_options_without_meaning_on_s3_are_refused(relay_env, s3_storage_url, option, word):
    line = one_line_error(start(relay_env, "--storage", s3_storage_url, option))
    assert word in line


@pytest.mark.parametrize("url", ["s3:/relay", "http://relay/x", "s3://Bad_Bucket/x"])
def test_a_malformed_storage_url_is_refused(relay_env, url):
    result = start(relay_env, "--storage", url)
    assert result.returncode == 2 and "storage" in result.stderr and "Traceback" not in result.stderr
