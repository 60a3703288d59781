"""What the tests, the soak (tests/soak.py) and the benchmark (tests/bench.py) share,
standard library only: a real relay process, polling up to a deadline, and request bodies
paced over time.

A relay is started one way for all three: this checkout's file_relay.py under
sys.executable, on a port the kernel picks (read back from gunicorn's "Listening at"
line), its stderr in a log file, in a session of its own so that the whole process group
(master and workers) can be stopped."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "file_relay.py"
_LISTENING_RE = re.compile(r"Listening at: https?://[^ ]*:(\d+) \(")


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


class RelayExited(AssertionError):
    """The relay exited while it was expected to start or to run."""


class RelayProcess:
    """One relay: `start()` it, talk to `base` (scheme://127.0.0.1:PORT), stop it with
    `signal()`, `stop()` (drain) or `kill()` (the whole process group, at once). With
    *files* None it gets no --files-directory (its storage is in *args*)."""

    def __init__(
        self,
        files: Path | None,
        log_path: Path,
        args=(),
        *,
        out_path: Path | None = None,
        env: dict | None = None,
        script: Path = SCRIPT,
        interpreter_flags: tuple = (),
    ):
        self.files = files
        self.log_path = log_path
        self.out_path = out_path
        self.args = list(args)
        self.env = {**os.environ, **(env or {})}
        self.script = script
        self.interpreter_flags = list(interpreter_flags)
        self.process: subprocess.Popen | None = None
        self.base = ""
        self._log_start = 0

    def start(self, server_id: str | None = None, bind: str = "127.0.0.1:0", timeout: float = 20) -> RelayProcess:
        """Start the relay (*server_id* on its command line, if given) and return once it
        listens; the log is appended to, and only what this start wrote is read for the port."""
        command = [sys.executable, *self.interpreter_flags, str(self.script)]
        if server_id is not None:
            command.append(server_id)
        command += ["--bind", bind, *(["--files-directory", str(self.files)] if self.files else []), *self.args]
        self._log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log, open(self.out_path or os.devnull, "ab") as out:
            self.process = subprocess.Popen(
                command, stdout=out, stderr=log, stdin=subprocess.DEVNULL, env=self.env, start_new_session=True
            )
        port = wait_until(self._port, timeout, message="the relay to listen")
        scheme = "https" if "--certfile" in self.args else "http"
        self.base = f"{scheme}://127.0.0.1:{port}"
        return self

    def _port(self) -> str | None:
        if self.process.poll() is not None:
            raise RelayExited(f"the relay exited with {self.process.returncode}:\n{self.log()}")
        with open(self.log_path, "rb") as log:
            log.seek(self._log_start)
            listening = _LISTENING_RE.findall(log.read().decode(errors="replace"))
        return listening[-1] if listening else None

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) to connect a socket to."""
        return host_and_port(self.base)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def output(self) -> str:
        return self.out_path.read_text(errors="replace") if self.out_path and self.out_path.exists() else ""

    def wait_exit(self, timeout: float = 30) -> int:
        return self.process.wait(timeout)

    def signal(self, signum: int) -> None:
        """Send *signum* to the master only, as an operator's kill would."""
        self.process.send_signal(signum)

    def stop(self, timeout: float = 60) -> int | None:
        """Drain and exit (SIGTERM to the master); the status it exited with, or None if it
        did not within *timeout*. Whatever is left of the group is killed."""
        self.signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        finally:
            self.kill()

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


def host_and_port(url: str) -> tuple[str, int]:
    """The host and port of an http(s)://HOST:PORT URL, to connect a socket to."""
    parts = urllib.parse.urlsplit(url)
    return parts.hostname, parts.port


class Paced:
    """A request body sent in *pieces* over *seconds*, a pause before each piece. It has a
    length, so requests sends a Content-Length (iterate it for a body without one). It
    counts the bytes it has handed over, and notes when it handed over the last."""

    def __init__(self, data: bytes, seconds: float, pieces: int = 16):
        self.data = data
        self.delay = seconds / pieces
        self.step = len(data) // pieces + 1
        self.sent = 0
        self.finished_at = None

    def __len__(self):
        return len(self.data)

    def __iter__(self):
        for start in range(0, len(self.data), self.step):
            time.sleep(self.delay)
            piece = self.data[start : start + self.step]
            self.sent += len(piece)
            yield piece
        self.finished_at = time.monotonic()


def unsized(data: bytes, seconds: float, pieces: int = 16):
    """A Paced body as a generator: requests sends it with Transfer-Encoding: chunked."""
    yield from Paced(data, seconds, pieces)
