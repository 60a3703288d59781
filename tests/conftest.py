"""Fixtures: the app over a temporary directory (WebTest), and real relay processes."""

import hashlib
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import pytest
import requests
import webtest

import file_relay

ROOT = Path(__file__).resolve().parent.parent
SERVER_ID = "test-relay-secret-0123456789"


def blob(size: int, seed: int = 0) -> tuple[bytes, str]:
    """Reproducible random bytes and their SHA-256."""
    data = random.Random(seed).randbytes(size)
    return data, hashlib.sha256(data).hexdigest()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.02, message: str = "condition"):
    """Poll *predicate* until it returns something truthy, or fail at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {message}")
        time.sleep(interval)


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


def host_and_port(url: str) -> tuple[str, int]:
    """The host and port of an http(s)://HOST:PORT URL, to connect a socket to."""
    parts = urllib.parse.urlsplit(url)
    return parts.hostname, parts.port


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


class LiveRelay:
    """A real relay process on an ephemeral port, logging to files under tmp_path."""

    def __init__(self, tmp_path: Path, name: str, args: list, env: dict | None, files: Path):
        self.files = files
        self.log_path = tmp_path / f"{name}.log"
        self.out_path = tmp_path / f"{name}.out"
        self.args = args
        self.env = {**os.environ, **(env or {})}
        self.process: subprocess.Popen | None = None
        self.base = ""

    def start(self, server_id: str | None = SERVER_ID, bind: str = "127.0.0.1:0", timeout: float = 20) -> "LiveRelay":
        command = [sys.executable, str(ROOT / "file_relay.py")]
        if server_id is not None:
            command.append(server_id)
        command += ["--bind", bind, "--files-directory", str(self.files), *self.args]
        with open(self.log_path, "ab") as log, open(self.out_path, "ab") as out:
            self.process = subprocess.Popen(
                command, stdout=out, stderr=log, stdin=subprocess.DEVNULL, env=self.env, start_new_session=True
            )
        port = wait_until(self._port, timeout, message="the relay to listen")
        scheme = "https" if "--certfile" in self.args else "http"
        self.base = f"{scheme}://127.0.0.1:{port}"
        return self

    def _port(self):
        if self.process.poll() is not None:
            raise AssertionError(f"the relay exited with {self.process.returncode}:\n{self.log()}")
        listening = re.findall(r"Listening at: https?://[^ ]*:(\d+) \(", self.log())
        return listening[-1] if listening else None

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) to connect a socket to."""
        return host_and_port(self.base)

    def url(self, oid: str | None = None, server_id: str = SERVER_ID) -> str:
        return f"{self.base}/{server_id}" + (f"/{oid}" if oid else "")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def output(self) -> str:
        return self.out_path.read_text(errors="replace") if self.out_path.exists() else ""

    def wait_exit(self, timeout: float = 30) -> int:
        return self.process.wait(timeout)

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def kill(self) -> None:
        """kill -9 the whole relay: master and workers."""
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
        elif self.process:
            # The master is gone; make sure no orphaned worker survives it.
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def worker_pids(self) -> list[int]:
        result = subprocess.run(["pgrep", "-P", str(self.process.pid)], capture_output=True, text=True)
        return [int(pid) for pid in result.stdout.split()]


@pytest.fixture
def live(tmp_path, files):
    """Start real relays: live(*options, env=..., files=...) returns a started LiveRelay."""
    relays = []

    def start(*args, env=None, files_dir=None, server_id=SERVER_ID, name=None, bind="127.0.0.1:0"):
        relay = LiveRelay(tmp_path, name or f"relay{len(relays)}", list(args), env, files_dir or files)
        relays.append(relay)
        return relay.start(server_id=server_id, bind=bind)

    yield start
    for relay in relays:
        relay.kill()


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
