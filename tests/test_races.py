"""Races made likely: the concurrency scenarios again, with the relay's workers slowed at
their lock, link, rename and unlink calls by strace (`-e inject=...:delay_exit=...` or
`delay_enter`), so that an interleaving that happens once in a thousand runs happens in
most. Each scenario asserts what must hold whatever the interleaving: a name means its
bytes, a download budget is exact, correct bytes never hear that they did not verify.
"""

import concurrent.futures
import contextlib
import hashlib
import shutil
import subprocess
import threading

import pytest
import requests
from conftest import blob, wait_until
from invariants import traced_by, verify_objects

STRACE = shutil.which("strace")
pytestmark = pytest.mark.skipif(STRACE is None, reason="strace is not installed (Debian's strace package)")

LOCKS_AND_NAMES = ["fcntl", "link", "linkat", "rename", "renameat", "renameat2", "unlink", "unlinkat"]
DELAYS = [("exit", 20_000), ("enter", 20_000)]  # where in the call, microseconds


@contextlib.contextmanager
def slowed(relay, where: str, microseconds: int, calls=LOCKS_AND_NAMES):
    """Delay every worker of *relay* at *calls*, on entering or exiting them."""
    workers = int(relay.args[relay.args.index("--workers") + 1])
    pids = wait_until(lambda: len(found := relay.worker_pids()) == workers and found, message="the workers")
    spec = ",".join(f"?{call}" for call in calls)
    command = [STRACE, "-f", "-qq", "-o", "/dev/null", "-e", f"trace={spec}"]
    command += ["-e", f"inject={spec}:delay_{where}={microseconds}"]
    for pid in pids:
        command += ["-p", str(pid)]
    tracer = subprocess.Popen(command, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: all(traced_by(pid, tracer.pid) for pid in pids), message="strace to attach")
        yield
    finally:
        tracer.terminate()  # strace detaches, the workers go on
        tracer.wait(20)


def content_range(first: int, last: int, total: int) -> dict:
    return {"Content-Range": f"bytes {first}-{last}/{total}"}


def put_zeros(url: str, first: int, total: int) -> int:
    """Send 1 KiB of zeros as bytes first.. of the object: a wrong retry of a chunk."""
    return requests.put(
        url, data=bytes(1024), headers=content_range(first, first + 1023, total), timeout=60
    ).status_code


def race_zeros(url: str, first: int, total: int, completed: threading.Event) -> tuple[set, bool]:
    """put_zeros again and again until *completed* (at most 50 times): the statuses, and
    whether it stopped because the object was completed."""
    statuses = set()
    for _ in range(50):
        statuses.add(put_zeros(url, first, total))
        if completed.is_set():
            return statuses, True
    return statuses, False


def delete_until_removed(url: str, requests_racing: list) -> set:
    """DELETE again and again until it removes something or the racing requests are all
    answered (at most 100 times)."""
    statuses = set()
    for _ in range(100):
        status = requests.delete(url, timeout=60).status_code
        statuses.add(status)
        if status == 200 or all(future.done() for future in requests_racing):
            break
    return statuses


def download_until_gone(url: str, oid: str) -> int:
    """GET ?wait=0 until 404, retrying on 409; how many whole, verified downloads."""
    whole = 0
    with requests.Session() as session:
        for _ in range(200):
            response = session.get(url, params={"wait": "0"}, timeout=60)
            if response.status_code == 404:
                return whole
            if response.status_code == 200:
                assert hashlib.sha256(response.content).hexdigest() == oid
                whole += 1
            else:
                assert response.status_code == 409, response.status_code
    return whole


@pytest.mark.parametrize(("where", "microseconds"), [("exit", 100_000), ("enter", 100_000)])
def test_chunks_racing_the_completing_chunk_never_reach_the_object(live, files, where, microseconds):
    """Chunk 0 is acknowledged; 1 KiB pieces of it, re-sent as zeros by eight clients in
    a loop, race the chunk that completes the object. The object must hold the real
    bytes, every round."""
    relay = live("--workers", "1")
    with slowed(relay, where, microseconds, calls=["fcntl"]), concurrent.futures.ThreadPoolExecutor(9) as pool:
        for round_ in range(3):
            data, oid = blob(1 << 20, seed=round_)
            half = len(data) // 2
            url = relay.url(oid)
            assert requests.put(url, data=data[:half], headers=content_range(0, half - 1, len(data))).status_code == 202
            completed = threading.Event()

            racing = [pool.submit(race_zeros, url, index * 1024, len(data), completed) for index in range(8)]
            headers = content_range(half, len(data) - 1, len(data))
            completing = pool.submit(requests.put, url, data=data[half:], headers=headers, timeout=120)
            status = completing.result(120).status_code
            completed.set()
            results = [future.result(120) for future in racing]
            assert status == 201, completing.result().text
            assert set().union(*(statuses for statuses, _ in results)) <= {200, 409}, results
            # The completion excludes writers; retries arriving meanwhile must not starve it.
            assert all(stopped for _, stopped in results), "the completion waited for every retry to give up"
            assert requests.get(url).content == data
    verify_objects(files)


@pytest.mark.parametrize(("where", "microseconds"), DELAYS)
def test_racing_downloads_of_an_object_with_max_downloads_1_get_it_once(live, files, where, microseconds):
    relay = live("--workers", "2")
    with slowed(relay, where, microseconds), concurrent.futures.ThreadPoolExecutor(8) as pool:
        for round_ in range(5):
            data, oid = blob(256 << 10, seed=round_)
            url = relay.url(oid)
            assert requests.put(url, data=data, headers={"Max-Downloads": "1"}).status_code == 201

            downloads = [pool.submit(download_until_gone, url, oid) for _ in range(8)]
            assert sum(future.result(120) for future in downloads) == 1
            assert not (files / oid).exists()


@pytest.mark.parametrize(("where", "microseconds"), DELAYS)
def test_completing_chunks_racing_a_delete_never_hear_400(live, files, where, microseconds):
    """The last chunk and a retry of the first, sent at once, race a DELETE: one request
    verifies, the other waits for its verdict while the DELETE may remove the object.
    Correct bytes must never be answered 400 (the client would give up)."""
    relay = live("--workers", "2")
    with slowed(relay, where, microseconds), concurrent.futures.ThreadPoolExecutor(3) as pool:
        for round_ in range(20):
            data, oid = blob(64 << 10, seed=round_)
            half = len(data) // 2
            url = relay.url(oid)
            assert requests.put(url, data=data[:half], headers=content_range(0, half - 1, len(data))).status_code == 202
            pieces = [(half, len(data) - 1), (0, half - 1)]  # the last chunk, and a retry of the first
            completing = [
                pool.submit(requests.put, url, data=data[a : b + 1], headers=content_range(a, b, len(data)), timeout=60)
                for a, b in pieces
            ]
            deleting = pool.submit(delete_until_removed, url, completing)
            for future in completing:
                # 202: the DELETE came first and cancelled chunk 0, so this chunk began anew.
                assert future.result(60).status_code in (200, 201, 202, 409), future.result().text
            assert deleting.result(60) <= {200, 404, 409}
            assert verify_objects(files).get(oid, len(data)) == len(data)
            requests.delete(url)


@pytest.mark.parametrize(("where", "microseconds"), DELAYS)
def test_racing_uploads_of_one_object_store_it_once(live, files, where, microseconds):
    relay = live("--workers", "2")
    with slowed(relay, where, microseconds), concurrent.futures.ThreadPoolExecutor(8) as pool:
        for round_ in range(3):
            data, oid = blob(128 << 10, seed=round_)
            uploads = [pool.submit(requests.put, relay.url(oid), data=data, timeout=60) for _ in range(8)]
            statuses = [future.result(60).status_code for future in uploads]
            assert statuses.count(201) == 1 and set(statuses) <= {200, 201, 409}, statuses
    assert all(size == 128 << 10 for size in verify_objects(files).values())


def test_downloads_racing_the_upload_of_an_object_with_max_downloads_1_get_it_once(live, files):
    """Readers loop on GET ?wait=0 while the object with Max-Downloads: 1 is uploaded:
    they follow the upload, or download it once stored, and only one whole download may
    get through, whichever way it goes. (No injected delay: this race needs none.)"""
    relay = live("--workers", "1", "--threads", "32")
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        for round_ in range(8):
            data, oid = blob(256 << 10, seed=round_)
            url = relay.url(oid)
            stop = threading.Event()

            def download_until_stopped(url=url, oid=oid, stop=stop) -> int:
                whole = 0
                with requests.Session() as session:
                    for _ in range(2000):
                        if stop.is_set():
                            break
                        try:
                            response = session.get(url, params={"wait": "0"}, timeout=60)
                            content = response.content
                        except requests.RequestException:
                            continue  # a follower cut off: not a whole download
                        if response.status_code == 200 and hashlib.sha256(content).hexdigest() == oid:
                            whole += 1
                return whole

            readers = [pool.submit(download_until_stopped) for _ in range(8)]
            assert requests.put(url, data=data, headers={"Max-Downloads": "1"}).status_code == 201
            wait_until(lambda oid=oid: not (files / oid).exists(), timeout=30, message="the one download")
            stop.set()
            assert sum(future.result(60) for future in readers) == 1
