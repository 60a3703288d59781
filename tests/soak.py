#!/usr/bin/env python3
"""Soak a relay: many concurrent clients doing mixed operations for a set time.

Starts its own relay (this checkout's file_relay.py, port 0, a temporary files
directory), runs --clients clients for --duration seconds, and verifies every answer and
every byte downloaded. Every second it samples the relay's process tree (master and
workers): RSS, PSS (shared pages counted once), open file descriptors and threads.

Prints a table of the samples and a JSON summary (also written to --json PATH). Exits 1
on any error (an unexpected status, wrong bytes, a failed request, an object lost or
corrupted, the server ID or a traceback in the log), or if RSS, PSS or open fds grew
beyond the threshold between the first and the last quarter of the run (after the
warm-up); 0 otherwise.

    .venv/bin/python tests/soak.py --clients 64 --duration 300 --json soak.json
"""

import argparse
import concurrent.futures
import hashlib
import json
import random
import secrets
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Paced, RelayProcess
from invariants import memory_kib, open_fds, process_tree, threads, verify_objects

SHARED_LIMIT = 256  # objects kept for downloads; later uploads are deleted again by their client
OPERATIONS = {  # weights
    "upload": 14,
    "chunked_upload": 8,
    "unsized_upload": 4,
    "reupload": 4,
    "download": 24,
    "range_download": 12,
    "head": 10,
    "status": 4,
    "delete": 6,
    "follow": 4,
}


class Failure(Exception):
    """An answer the relay should not have given."""


class Relay(RelayProcess):
    """The relay under test: its own process group, log and files directory."""

    def __init__(self, directory: Path, workers: int, threads_per_worker: int | None):
        self.server_id = secrets.token_urlsafe(24)
        args = ["--workers", str(workers), "--get-wait-timeout", "0"]
        if threads_per_worker:
            args += ["--threads", str(threads_per_worker)]
        env = {"RELAY_SERVER_ID": self.server_id}  # not on the command line
        super().__init__(directory / "files", directory / "relay.log", args, env=env)
        try:
            self.start(timeout=30)
        except AssertionError:  # it exited, or did not listen in time
            raise SystemExit(f"soak: the relay did not start:\n{self.log()}") from None

    def url(self, oid: str = "") -> str:
        return f"{self.base}/{self.server_id}" + (f"/{oid}" if oid else "")

    def sample(self) -> dict:
        """RSS, PSS, fds and threads of the master and its workers, summed."""
        totals = {"rss_kib": 0, "pss_kib": 0, "fds": 0, "threads": 0, "processes": 0}
        for pid in process_tree(self.process.pid):
            try:
                rss, pss = memory_kib(pid)
                totals["fds"] += open_fds(pid)
                totals["threads"] += threads(pid)
            except (FileNotFoundError, ProcessLookupError):
                continue  # a worker restarting
            totals["rss_kib"] += rss
            totals["pss_kib"] += pss
            totals["processes"] += 1
        return totals


class Soak:
    """The clients, the objects they share, and what they counted."""

    def __init__(self, relay: Relay, seed: int):
        self.relay = relay
        self.seed = seed
        self.lock = threading.Lock()
        self.shared: list[tuple[str, bytes]] = []  # uploaded, never deleted
        self.counts = {name: 0 for name in OPERATIONS}
        self.requests = 0
        self.errors = 0
        self.error_samples: list[str] = []
        self.bytes_up = self.bytes_down = 0

    # -- bookkeeping ---------------------------------------------------------------

    def count(self, up: int = 0, down: int = 0) -> None:
        with self.lock:
            self.requests += 1
            self.bytes_up += up
            self.bytes_down += down

    def fail(self, text: str) -> None:
        with self.lock:
            self.errors += 1
            if len(self.error_samples) < 20:
                self.error_samples.append(text)

    def share(self, oid: str, data: bytes) -> bool:
        with self.lock:
            if len(self.shared) < SHARED_LIMIT:
                self.shared.append((oid, data))
                return True
        return False

    def pick(self, rng: random.Random):
        with self.lock:
            return rng.choice(self.shared) if self.shared else None

    @staticmethod
    def expect(response, *statuses: int) -> None:
        if response.status_code not in statuses:
            raise Failure(f"{response.request.method} answered {response.status_code}: {response.text[:200].strip()}")

    # -- one client --------------------------------------------------------------------

    def client(self, number: int, deadline: float) -> None:
        rng = random.Random(self.seed * 1000 + number)
        names, weights = zip(*OPERATIONS.items(), strict=True)
        with requests.Session() as session:
            while time.monotonic() < deadline:
                name = rng.choices(names, weights)[0]
                if name in ("download", "range_download", "head", "reupload") and not self.shared:
                    name = "upload"
                try:
                    getattr(self, name)(session, rng)
                except Failure as exc:
                    self.fail(f"{name}: {exc}")
                except (requests.RequestException, OSError) as exc:
                    self.fail(f"{name}: {exc.__class__.__name__}: {exc}")
                    session.close()
                with self.lock:
                    self.counts[name] += 1

    @staticmethod
    def new_blob(rng: random.Random, largest: int = 1 << 20) -> tuple[str, bytes]:
        size = min(largest, int(rng.paretovariate(1.2) * 4096))  # mostly small, some large
        data = rng.randbytes(size)
        return hashlib.sha256(data).hexdigest(), data

    def keep_or_delete(self, session, oid: str, data: bytes) -> None:
        if not self.share(oid, data):
            response = session.delete(self.relay.url(oid), timeout=60)
            self.count()
            self.expect(response, 200)

    def upload(self, session, rng):
        oid, data = self.new_blob(rng)
        response = session.put(self.relay.url(oid), data=data, timeout=60)
        self.count(up=len(data))
        self.expect(response, 201)
        self.keep_or_delete(session, oid, data)

    def unsized_upload(self, session, rng):
        oid, data = self.new_blob(rng)
        pieces = (data[i : i + 65536] for i in range(0, len(data), 65536))
        response = session.put(self.relay.url(oid), data=pieces, timeout=60)  # chunked body
        self.count(up=len(data))
        self.expect(response, 201)
        self.keep_or_delete(session, oid, data)

    def chunked_upload(self, session, rng):
        oid, data = self.new_blob(rng)  # at least 4 KiB
        cuts = sorted(rng.sample(range(1, len(data)), rng.randint(1, 3))) + [len(data)]
        chunks = [(first, last - 1) for first, last in zip([0] + cuts[:-1], cuts, strict=True)]
        rng.shuffle(chunks)
        for index, (first, last) in enumerate(chunks):
            headers = {"Content-Range": f"bytes {first}-{last}/{len(data)}"}
            response = session.put(self.relay.url(oid), data=data[first : last + 1], headers=headers, timeout=60)
            self.count(up=last - first + 1)
            self.expect(response, 201 if index == len(chunks) - 1 else 202)
        self.keep_or_delete(session, oid, data)

    def reupload(self, session, rng):
        oid, data = self.pick(rng)
        response = session.put(self.relay.url(oid), data=data, timeout=60)
        self.count(up=len(data))
        self.expect(response, 200)

    def download(self, session, rng):
        oid, data = self.pick(rng)
        response = session.get(self.relay.url(oid), timeout=60)
        self.count(down=len(response.content))
        self.expect(response, 200)
        if hashlib.sha256(response.content).hexdigest() != oid:
            raise Failure(f"GET {oid[:12]}: {len(response.content)} bytes that do not hash to the name")

    def range_download(self, session, rng):
        oid, data = self.pick(rng)
        if not data:
            return self.download(session, rng)
        first = rng.randrange(len(data))
        last = rng.randrange(first, len(data)) if rng.random() < 0.7 else None  # None: to the end
        spec = f"bytes={first}-{'' if last is None else last}"
        response = session.get(self.relay.url(oid), headers={"Range": spec}, timeout=60)
        self.count(down=len(response.content))
        self.expect(response, 206)
        if response.content != data[first : None if last is None else last + 1]:
            raise Failure(f"GET {oid[:12]} {spec}: wrong bytes")

    def head(self, session, rng):
        oid, data = self.pick(rng)
        response = session.head(self.relay.url(oid), timeout=60)
        self.count()
        self.expect(response, 200)
        if response.headers.get("ETag") != f'"{oid}"' or response.headers.get("Content-Length") != str(len(data)):
            raise Failure(f"HEAD {oid[:12]}: {dict(response.headers)}")

    def status(self, session, rng):
        response = session.get(self.relay.url(), timeout=60)
        self.count()
        self.expect(response, 200)
        if "stored_objects" not in response.json():
            raise Failure("status without stored_objects")

    def delete(self, session, rng):
        oid, data = self.new_blob(rng, largest=64 << 10)
        response = session.put(self.relay.url(oid), data=data, timeout=60)
        self.count(up=len(data))
        self.expect(response, 201)
        response = session.delete(self.relay.url(oid), timeout=60)
        self.count()
        self.expect(response, 200)
        response = session.get(self.relay.url(oid) + "?wait=0", timeout=60)
        self.count()
        self.expect(response, 404)

    def follow(self, session, rng):
        """A download started before (or while) its upload runs gets exactly its bytes."""
        oid, data = self.new_blob(rng)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            upload = pool.submit(requests.put, self.relay.url(oid), data=Paced(data, 0.4, pieces=8), timeout=60)
            response = session.get(self.relay.url(oid) + "?wait=10", timeout=60)
            self.count(down=len(response.content))
            uploaded = upload.result()
        self.count(up=len(data))
        self.expect(response, 200)
        self.expect(uploaded, 201)
        if response.content != data:
            raise Failure(f"following {oid[:12]}: {len(response.content)} bytes, not the {len(data)} uploaded")
        self.keep_or_delete(session, oid, data)


def spread(values: list) -> dict:
    return {"min": min(values), "max": max(values), "first": values[0], "last": values[-1]}


def growth(samples: list, warmup: float, key: str) -> dict:
    """Median of *key* over the first and over the last quarter of the samples after the
    warm-up, and how fast it still grew during the last quarter (per 1000 requests)."""
    steady = [sample for sample in samples if sample["t"] >= warmup] or samples
    quarter = max(1, len(steady) // 4)
    first, last = steady[:quarter], steady[-quarter:]
    served = last[-1]["requests"] - last[0]["requests"]
    return {
        "first_quarter": statistics.median(sample[key] for sample in first),
        "last_quarter": statistics.median(sample[key] for sample in last),
        "last_quarter_per_1000_requests": round((last[-1][key] - last[0][key]) * 1000 / served, 2) if served else 0,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=64, help="concurrent clients (default 64)")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load (default 60)")
    parser.add_argument("--json", metavar="PATH", help="also write the summary here")
    parser.add_argument("--workers", type=int, default=2, help="relay worker processes (default 2)")
    parser.add_argument("--threads", type=int, help="relay threads per worker (default: the relay's)")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds not compared for growth (default 3)")
    parser.add_argument(
        "--max-growth", type=float, default=0.25, help="allowed growth, first to last quarter (default 0.25)"
    )
    parser.add_argument("--seed", type=int, default=1, help="random seed of the clients (default 1)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="soak-") as directory:
        relay = Relay(Path(directory), args.workers, args.threads)
        soak = Soak(relay, args.seed)
        samples = []
        started = time.monotonic()
        deadline = started + args.duration
        done = threading.Event()

        def sampler():
            while not done.is_set():
                sample = {"t": round(time.monotonic() - started, 1), **relay.sample()}
                with soak.lock:
                    sample["requests"], sample["errors"] = soak.requests, soak.errors
                samples.append(sample)
                done.wait(1.0)

        watcher = threading.Thread(target=sampler, daemon=True)
        watcher.start()
        with concurrent.futures.ThreadPoolExecutor(args.clients) as pool:
            for future in [pool.submit(soak.client, n, deadline) for n in range(args.clients)]:
                future.result()
        done.set()
        watcher.join()
        elapsed = time.monotonic() - started

        # Nothing lost: every object kept is there and intact, and nothing else is wrong.
        stored = verify_objects(relay.files)
        for oid, data in soak.shared:
            if stored.get(oid) != len(data):
                soak.fail(f"object {oid[:12]} ({len(data)} bytes) lost")
        exit_status = relay.stop()
        if exit_status != 0:
            soak.fail(f"the relay exited with {exit_status} after SIGTERM")
        log = relay.log()
        if relay.server_id in log:
            soak.fail("the server ID is in the log")
        if "Traceback" in log:
            soak.fail("a traceback in the log")

    columns = ("t (s)", "requests", "req/s", "errors", "RSS MiB", "PSS MiB", "fds", "threads")
    print(" ".join(f"{name:>{width}}" for name, width in zip(columns, (6, 9, 7, 6, 8, 8, 5, 7), strict=True)))
    previous = {"t": 0.0, "requests": 0}
    for sample in samples:
        rate = (sample["requests"] - previous["requests"]) / max(sample["t"] - previous["t"], 1e-9)
        print(
            f"{sample['t']:6.1f} {sample['requests']:9d} {rate:7.0f} {sample['errors']:6d} "
            f"{sample['rss_kib'] / 1024:8.1f} {sample['pss_kib'] / 1024:8.1f} {sample['fds']:5d} {sample['threads']:7d}"
        )
        previous = sample
    checks = {}
    for key, slack in (("rss_kib", 32 << 10), ("pss_kib", 32 << 10), ("fds", 32)):
        checks[key] = growth(samples, args.warmup, key)
        checks[key]["ok"] = checks[key]["last_quarter"] <= checks[key]["first_quarter"] * (1 + args.max_growth) + slack
    summary = {
        "clients": args.clients,
        "duration_s": round(elapsed, 1),
        "workers": args.workers,
        "requests": soak.requests,
        "requests_per_s": round(soak.requests / elapsed, 1),
        "errors": soak.errors,
        "error_samples": soak.error_samples,
        "operations": soak.counts,
        "bytes_up": soak.bytes_up,
        "bytes_down": soak.bytes_down,
        "objects_kept": len(soak.shared),
        "rss_kib": spread([s["rss_kib"] for s in samples]),
        "pss_kib": spread([s["pss_kib"] for s in samples]),
        "fds": spread([s["fds"] for s in samples]),
        "threads": spread([s["threads"] for s in samples]),
        "growth": checks,
        "relay_exit_status": exit_status,
    }
    summary["ok"] = soak.errors == 0 and all(check["ok"] for check in checks.values())
    text = json.dumps(summary, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
