"""Faults on purpose: kill -9 at random points of uploads, clients that hang up at random
points, a real full disk, and clients racing for one object. After each, the invariant
holds (a file under a hash name has that hash), nothing acknowledged is lost, nothing is
leaked, and the relay keeps serving.

The random choices are seeded (FAULT_SEED, default below): a failure names its seed, and
the same seed replays the same plan (the timing of a real kill still varies a little).
"""

import concurrent.futures
import dataclasses
import errno
import os
import random
import shutil
import signal
import socket
import struct
import threading
import time

import pytest
import requests
import urllib3
from conftest import SERVER_ID, Paced, blob, raw_request, sha256, unsized, wait_until
from invariants import answered, finisher_waiting, open_fds, orphaned_limits, partials, threads, verify_objects

import file_relay

SEED = int(os.environ.get("FAULT_SEED", "20240921"))


def relay_pid_in(relay) -> int:
    """The relay's only worker (started with --workers 1)."""
    return wait_until(lambda: relay.worker_pids()[:1], message="the worker")[0]


# -- kill -9 at random points of 20 uploads ----------------------------------------------


@dataclasses.dataclass
class Upload:
    """One object to get into the relay across relay lives, and what the relay confirmed."""

    kind: str  # "plain" (Content-Length), "unsized" (chunked body), "chunks" (Content-Range)
    data: bytes
    oid: str
    chunk_size: int
    seconds: float  # how long one attempt's body takes to send
    done: bool = False  # got 201 or 200: it must be stored, intact, from now on
    acked: list = dataclasses.field(default_factory=list)  # ranges acknowledged with 202
    problems: list = dataclasses.field(default_factory=list)
    attempts: int = 0


def missing_ranges(upload: Upload, response) -> list[tuple[int, int]]:
    """The chunks still to send, from what HEAD reports (Upload-Ranges)."""
    ranges = file_relay._parse_ranges(response.headers.get("Upload-Ranges")) if response.status_code == 200 else []
    gaps = file_relay._missing(ranges, len(upload.data))
    return file_relay._split(gaps, upload.chunk_size)


def attempt(upload: Upload, url: str, paced: bool = True) -> None:
    """Try to complete *upload* once; a killed relay ends the attempt with an exception."""
    upload.attempts += 1
    seconds = upload.seconds if paced else 0
    if upload.kind != "chunks":
        body = upload.data if not paced else Paced(upload.data, seconds)
        if upload.kind == "unsized":
            body = unsized(upload.data, seconds)
        response = requests.put(url, data=body, timeout=30)
        if response.status_code in (200, 201):
            upload.done = True
        else:
            upload.problems.append(f"PUT answered {response.status_code}: {response.text.strip()}")
        return
    head = requests.head(url, timeout=10)
    if head.status_code == 200 and "ETag" in head.headers:
        upload.done = True
        return
    # Every byte received but not stored: the relay was killed while verifying. Sending
    # the last byte again makes it verify (what the built-in client does).
    todo = missing_ranges(upload, head) or [(len(upload.data) - 1, len(upload.data) - 1)]
    per_chunk = seconds * upload.chunk_size / len(upload.data)
    for first, last in todo:
        piece = upload.data[first : last + 1]
        headers = {"Content-Range": f"bytes {first}-{last}/{len(upload.data)}"}
        response = requests.put(url, data=Paced(piece, per_chunk, 4) if paced else piece, headers=headers, timeout=30)
        if response.status_code == 202:
            ranges = file_relay._parse_ranges(response.headers["Upload-Ranges"])
            if not any(a <= first and last <= b for a, b in ranges):
                upload.problems.append(f"202 for {first}-{last} but Upload-Ranges {ranges}")
            upload.acked.append((first, last))
        elif response.status_code in (200, 201):
            upload.done = True
            return
        else:
            upload.problems.append(f"chunk {first}-{last} answered {response.status_code}: {response.text.strip()}")
            return


def check_after_restart(relay, files, uploads: list[Upload]) -> None:
    """Everything the relay confirmed before it was killed is still there."""
    stored = verify_objects(files)
    left = partials(files)
    assert not left["stream"] and not left["trash"] and not left["other"], left  # removed at startup
    with requests.Session() as session:
        for upload in uploads:
            if upload.done:
                assert stored.get(upload.oid) == len(upload.data), f"acknowledged {upload.kind} upload lost"
            elif upload.acked and upload.oid not in stored:
                head = session.head(relay.url(upload.oid), timeout=10)
                assert head.status_code == 200, f"a partial upload with acknowledged chunks is gone ({head})"
                ranges = file_relay._parse_ranges(head.headers["Upload-Ranges"])
                for first, last in upload.acked:
                    assert any(a <= first and last <= b for a, b in ranges), f"acknowledged {first}-{last} lost"


def test_kill_9_at_random_points_of_20_uploads_loses_nothing_acknowledged(live, files):
    rng = random.Random(SEED)
    kinds = ["plain", "unsized", "chunks", "chunks", "plain"] * 4
    uploads = []
    for index, kind in enumerate(kinds):
        data, oid = blob(rng.randrange(256 << 10, 2 << 20), seed=SEED + index)
        uploads.append(Upload(kind, data, oid, chunk_size=rng.choice([128 << 10, 256 << 10]), seconds=0))
    kills = 0
    interrupted = 0  # upload attempts cut short by a kill
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        for life in range(8):
            relay = live("--workers", "2", name=f"life{life}")
            check_after_restart(relay, files, uploads)
            batch = [upload for upload in uploads if not upload.done][:8]
            for upload in batch:
                upload.seconds = rng.uniform(0.4, 3.0)
            futures = {pool.submit(attempt, upload, relay.url(upload.oid)): upload for upload in batch}
            time.sleep(rng.uniform(0.3, 2.5))  # then kill, mostly in the middle of transfers
            relay.kill()
            kills += 1
            for future in futures:
                if future.exception(30) is not None:
                    interrupted += 1
        relay = live("--workers", "2", name="final")
        check_after_restart(relay, files, uploads)
        for upload in uploads:
            if not upload.done:
                attempt(upload, relay.url(upload.oid), paced=False)
    assert [upload.problems for upload in uploads if upload.problems] == []
    assert all(upload.done for upload in uploads), [
        (u.kind, len(u.data), u.acked, u.attempts) for u in uploads if not u.done
    ]
    stored = verify_objects(files)
    for upload in uploads:
        assert stored[upload.oid] == len(upload.data)
        assert requests.get(relay.url(upload.oid), timeout=30).content == upload.data
    left = partials(files)
    assert not any(left[kind] for kind in ("chunks", "stream", "trash", "other")), left
    assert orphaned_limits(files) == []
    # The plan did what it meant to: kills landed mid-transfer, chunks were acknowledged
    # before a kill and resumed after it.
    resumed = sum(1 for upload in uploads if upload.kind == "chunks" and upload.acked and upload.attempts > 1)
    assert kills == 8 and interrupted >= kills and resumed >= 2
    print(f"seed {SEED}: {kills} kills, {interrupted} interrupted upload attempts, {resumed} resumed, 20 intact")


def test_kill_9_while_a_completed_chunked_upload_verifies(live, files):
    """Every byte acknowledged, the relay killed while it hashes the whole object: after a
    restart HEAD reports every byte received (and no ETag: nothing unverified is served),
    and sending the last byte again makes the relay verify and store it."""
    data, oid = blob(48 << 20)
    last_chunk = (len(data) - (1 << 20), len(data) - 1)
    marker = files / ".relay" / "partial" / oid / f"range-{last_chunk[0]}-{last_chunk[1]}"
    for attempt_number in range(3):  # the kill must land in the ~0.1 s of hashing
        relay = live(name=f"verifying{attempt_number}")
        head = requests.head(relay.url(oid), timeout=10)
        if head.status_code == 404:
            headers = {"Content-Range": f"bytes 0-{last_chunk[0] - 1}/{len(data)}"}
            assert requests.put(relay.url(oid), data=data[: last_chunk[0]], headers=headers).status_code == 202
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            headers = {"Content-Range": f"bytes {last_chunk[0]}-{last_chunk[1]}/{len(data)}"}
            pool.submit(requests.put, relay.url(oid), data=data[last_chunk[0] :], headers=headers, timeout=30)
            deadline = time.monotonic() + 20
            while not marker.exists() and time.monotonic() < deadline:
                pass  # no sleep: the window is short
            relay.kill()
        if not (files / oid).exists():
            break
        (files / oid).unlink()  # published before the kill landed: try again
    else:
        pytest.skip("the kill never landed while the relay verified the upload")
    relay = live(name="restarted")
    assert verify_objects(files) == {}
    head = requests.head(relay.url(oid), timeout=10)
    assert head.status_code == 200 and "ETag" not in head.headers
    assert head.headers["Upload-Ranges"] == f"0-{len(data) - 1}"
    assert head.headers["Upload-Offset"] == str(len(data)) and head.headers["Upload-Incomplete"] == "?1"
    headers = {"Content-Range": f"bytes {len(data) - 1}-{len(data) - 1}/{len(data)}"}
    assert requests.put(relay.url(oid), data=data[-1:], headers=headers, timeout=30).status_code == 201
    assert verify_objects(files) == {oid: len(data)}


# -- clients that hang up at random points -------------------------------------------------


def hang_up(sock: socket.socket, rng: random.Random) -> None:
    """Close like a client that went away: half the time with a reset (SO_LINGER 0)."""
    if rng.random() < 0.5:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def receive(sock: socket.socket, count: int) -> int:
    """Read up to *count* bytes of an answer (fewer if the relay closes first)."""
    received = 0
    while received < count:
        block = sock.recv(min(65536, count - received))
        if not block:
            break
        received += len(block)
    return received


def chunked_framing(data: bytes, rng: random.Random) -> bytes:
    """*data* as a chunked body of random chunk sizes, with its last-chunk."""
    framed, position = b"", 0
    while position < len(data):
        size = rng.randrange(1, 300_000)
        piece = data[position : position + size]
        framed += b"%x\r\n" % len(piece) + piece + b"\r\n"
        position += len(piece)
    return framed + b"0\r\n\r\n"


class Disconnects:
    """The ways a client hangs up, each at a random byte count."""

    def __init__(self, relay, big: tuple, chunked: list, followed: str):
        self.address = relay.address
        self.relay = relay
        self.big_data, self.big_oid = big
        self.chunked = chunked  # (data, oid) of uploads sent with Content-Range
        self.followed = followed  # oid of an upload in progress for the whole test
        self.kinds: dict = {}

    def connect(self) -> socket.socket:
        return socket.create_connection(self.address, timeout=10)

    def run(self, rng: random.Random) -> None:
        kind = rng.choice(["put", "put_unsized", "chunk", "headers", "get", "range", "stream", "follow"])
        self.kinds[kind] = self.kinds.get(kind, 0) + 1
        getattr(self, kind)(rng)

    def put(self, rng):
        data, oid = blob(rng.randrange(1, 4 << 20), seed=rng.randrange(1 << 30))
        head = f"PUT /{SERVER_ID}/{oid} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\n\r\n".encode()
        sock = self.connect()
        sock.sendall(head + data[: rng.randrange(0, len(data))])
        hang_up(sock, rng)

    def put_unsized(self, rng):
        data, oid = blob(rng.randrange(1, 4 << 20), seed=rng.randrange(1 << 30))
        head = f"PUT /{SERVER_ID}/{oid} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
        body = chunked_framing(data, rng)
        sock = self.connect()
        sock.sendall(head + body[: rng.randrange(0, len(body))])  # cut anywhere, framing included
        hang_up(sock, rng)

    def chunk(self, rng):
        data, oid = rng.choice(self.chunked)
        first = rng.randrange(0, len(data))
        last = rng.randrange(first, len(data))
        head = (
            f"PUT /{SERVER_ID}/{oid} HTTP/1.1\r\nHost: x\r\nContent-Length: {last - first + 1}\r\n"
            f"Content-Range: bytes {first}-{last}/{len(data)}\r\n\r\n"
        ).encode()
        sock = self.connect()
        sock.sendall(head + data[first : first + rng.randrange(0, last - first + 1)])
        hang_up(sock, rng)

    def headers(self, rng):
        head = (
            f"{rng.choice(['GET', 'PUT', 'HEAD', 'DELETE'])} /{SERVER_ID}/{self.big_oid}?wait=1 HTTP/1.1\r\n"
            f"Host: x\r\nContent-Length: 100\r\nRange: bytes=0-\r\nX-Padding: {'p' * 500}\r\n\r\n"
        ).encode()
        sock = self.connect()
        sock.sendall(head[: rng.randrange(0, len(head))])
        hang_up(sock, rng)

    def get(self, rng, start=None):
        """A download (from *start* with a Range) cut before its end."""
        extra = "" if start is None else f"Range: bytes={start}-\r\n"
        sock = self.connect()
        sock.sendall(f"GET /{SERVER_ID}/{self.big_oid} HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode())
        receive(sock, rng.randrange(0, len(self.big_data) - (start or 0)))
        hang_up(sock, rng)

    def range(self, rng):
        self.get(rng, start=rng.randrange(0, len(self.big_data)))

    def stream(self, rng):
        with requests.get(self.relay.url(self.big_oid), stream=True, timeout=10) as response:
            assert response.status_code == 200
            response.raw.read(rng.randrange(0, len(self.big_data)))

    def follow(self, rng):
        sock = self.connect()
        sock.sendall(f"GET /{SERVER_ID}/{self.followed} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        receive(sock, rng.randrange(0, 1 << 20))
        hang_up(sock, rng)


def steady_fds(pid: int) -> int:
    """A process's open fd count once it has stayed the same for two seconds."""
    counts = []

    def steady():
        counts.append(open_fds(pid))
        return len(counts) >= 3 and len(set(counts[-3:])) == 1

    wait_until(steady, timeout=30, interval=1.0, message="the fd count to settle")
    return counts[-1]


def test_100_clients_hanging_up_at_random_points_leak_nothing(live, files):
    relay = live("--workers", "1", "--threads", "16")
    worker = relay_pid_in(relay)
    # What the worker holds with no client connected: its listener, log, pipes, poller.
    assert requests.get(relay.url(), headers={"Connection": "close"}).status_code == 200
    baseline_fds = steady_fds(worker)
    big = blob(8 << 20, seed=1)
    assert requests.put(relay.url(big[1]), data=big[0]).status_code == 201
    chunked = [blob(3 << 20, seed=10 + n) for n in range(4)]
    # Warm up: enough slow requests at once that the worker's thread pool reaches its
    # size (16); it never shrinks, so from then on a count above it is a leak.
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        warm = [blob(100_000, seed=100 + n) for n in range(20)]
        close = {"Connection": "close"}
        uploads = [
            pool.submit(requests.put, relay.url(oid), data=Paced(data, 1.0, 4), headers=close) for data, oid in warm
        ]
        assert [future.result().status_code for future in uploads] == [201] * 20
    wait_until(lambda: threads(worker) >= 17, message="the thread pool to be full")
    baseline_threads = threads(worker)
    wait_until(lambda: open_fds(worker) <= baseline_fds, timeout=20, message=f"fds back to {baseline_fds}")

    # An upload in progress for the whole test, followed by some of the clients.
    followed_data, followed_oid = blob(6 << 20, seed=2)
    upload = socket.create_connection(relay.address, timeout=30)
    head = f"PUT /{SERVER_ID}/{followed_oid} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(followed_data)}\r\n\r\n"
    upload.sendall(head.encode() + followed_data[: 2 << 20])
    wait_until(lambda: requests.head(relay.url(followed_oid)).status_code == 200, message="the followed upload")

    disconnects = Disconnects(relay, big, chunked, followed_oid)

    def client(number: int) -> None:
        rng = random.Random(SEED * 100 + number)
        for _ in range(25):
            disconnects.run(rng)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        for future in [pool.submit(client, number) for number in range(4)]:
            future.result()
    upload.sendall(followed_data[2 << 20 :])
    assert upload.recv(100).startswith(b"HTTP/1.1 201")
    upload.close()

    def idle():
        report = requests.get(relay.url(), headers={"Connection": "close"}).json()
        return report["uploads_in_progress"] == report["downloads_in_progress"] == report["waiting_readers"] == 0

    wait_until(idle, timeout=20, message="every transfer to end")
    wait_until(lambda: open_fds(worker) <= baseline_fds, timeout=20, message=f"fds back to {baseline_fds}")
    assert threads(worker) <= baseline_threads
    assert relay.worker_pids() == [worker]  # the same worker: nothing crashed (and reset its fds)
    # No temporary files: only the partials of the chunked uploads (resumable by design).
    left = partials(files)
    chunked_oids = {oid for _, oid in chunked}
    assert set(left["chunks"]) <= chunked_oids, left
    assert not left["stream"] and not left["staging"] and not left["trash"] and not left["other"], left
    assert orphaned_limits(files) == []
    stored = verify_objects(files)
    assert stored[followed_oid] == len(followed_data) and stored[big[1]] == len(big[0])
    # Still serving: a round trip, and the object downloaded (and cut) 100 times is intact.
    data, oid = blob(1 << 20, seed=3)
    assert requests.put(relay.url(oid), data=data).status_code == 201
    assert requests.get(relay.url(oid)).content == data
    assert requests.get(relay.url(big[1])).content == big[0]
    assert "Traceback" not in relay.log()
    assert sum(disconnects.kinds.values()) == 100 and len(disconnects.kinds) == 8, disconnects.kinds


# -- a real full disk ----------------------------------------------------------------------


def send_unsized(relay, oid: str, data: bytes) -> bytes:
    """PUT *data* with a chunked body (no Content-Length) on a raw socket, and return the
    answer's head; the relay may answer (and close) before the body is all sent."""
    sock = socket.create_connection(relay.address, timeout=30)
    head = f"PUT /{SERVER_ID}/{oid} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".encode()

    def send():
        try:
            sock.sendall(head)
            for start in range(0, len(data), 256 << 10):
                piece = data[start : start + (256 << 10)]
                sock.sendall(b"%x\r\n" % len(piece) + piece + b"\r\n")
            sock.sendall(b"0\r\n\r\n")
        except OSError:
            pass  # the relay answered early and closed

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        sender = pool.submit(send)
        answer = b""
        try:
            while b"\r\n\r\n" not in answer:
                block = sock.recv(65536)
                if not block:
                    break
                answer += block
        finally:
            sock.close()
            sender.result(30)
    return answer


def fill_disk(path) -> None:
    """Write zeros to *path* until the filesystem is full."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, bytes(1 << 20) if os.statvfs(fd).f_bavail > 256 else bytes(4096))
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)


def assert_nothing_partial(files) -> None:
    left = partials(files)
    assert not any(left.values()), left
    assert orphaned_limits(files) == []


def test_a_full_disk_is_507_leaves_nothing_and_the_relay_recovers(live, small_filesystem):
    mount = small_filesystem("16m")
    files = mount / "files"
    relay = live(files_dir=files)
    used_at_start = shutil.disk_usage(mount).used
    # Larger than the filesystem, by Content-Length: refused before the body is read.
    answer, sock = raw_request(
        relay.base, f"PUT /{SERVER_ID}/{'a' * 64} HTTP/1.1\r\nHost: x\r\nContent-Length: {32 << 20}\r\n\r\n".encode()
    )
    sock.close()
    assert answer.startswith(b"HTTP/1.1 507") and b"Connection: close" in answer
    # Of unknown length (chunked body), larger than the filesystem: refused when the disk fills.
    data, oid = blob(24 << 20)
    answer = send_unsized(relay, oid, data)
    assert answer.startswith(b"HTTP/1.1 507"), answer
    assert verify_objects(files) == {}
    assert_nothing_partial(files)
    assert shutil.disk_usage(mount).used <= used_at_start + (64 << 10)  # the partial's blocks are freed
    assert requests.get(relay.url()).status_code == 200
    # Now three stored objects take most of the space...
    stored = [blob(4 << 20, seed=n) for n in range(1, 4)]
    for body, object_id in stored:
        assert requests.put(relay.url(object_id), data=body).status_code == 201
    upload, upload_oid = blob(6 << 20, seed=9)
    # ...and an upload that does not fit is refused whichever way it is sent.
    response = requests.put(relay.url(upload_oid), data=upload)
    assert response.status_code == 507 and "not enough free space" in response.text
    assert send_unsized(relay, upload_oid, upload).startswith(b"HTTP/1.1 507")
    assert set(verify_objects(files)) == {object_id for _, object_id in stored}
    assert_nothing_partial(files)
    assert requests.get(relay.url()).json()["stored_objects"] == 3
    # Space freed: the same upload goes through, both ways, and everything verifies.
    for _, object_id in stored[:2]:
        assert requests.delete(relay.url(object_id)).status_code == 200
    assert send_unsized(relay, upload_oid, upload).startswith(b"HTTP/1.1 201")
    assert requests.delete(relay.url(upload_oid)).status_code == 200
    assert requests.put(relay.url(upload_oid), data=upload).status_code == 201
    assert requests.get(relay.url(upload_oid)).content == upload
    assert verify_objects(files) == {upload_oid: len(upload), stored[2][1]: len(stored[2][0])}
    assert_nothing_partial(files)
    assert "Traceback" not in relay.log()


def test_a_chunk_that_meets_a_full_disk_is_507_and_the_upload_resumes(live, small_filesystem):
    """Space taken by something else after the upload started: the chunk being written
    gets 507, the chunks acknowledged before stay, and the upload completes later."""
    mount = small_filesystem("16m")
    files = mount / "files"
    relay = live(files_dir=files)
    data, oid = blob(6 << 20)
    chunks = [(first, min(first + (2 << 20), len(data)) - 1) for first in range(0, len(data), 2 << 20)]

    def put(first, last):
        headers = {"Content-Range": f"bytes {first}-{last}/{len(data)}"}
        return requests.put(relay.url(oid), data=data[first : last + 1], headers=headers, timeout=30)

    assert put(*chunks[0]).status_code == 202
    fill_disk(mount / "filler")
    response = put(*chunks[1])
    assert response.status_code == 507 and "ran out of disk space" in response.text
    assert requests.get(relay.url()).status_code == 200
    head = requests.head(relay.url(oid))
    assert head.headers["Upload-Ranges"] == f"0-{chunks[0][1]}"
    (mount / "filler").unlink()
    assert put(*chunks[1]).status_code == 202
    assert put(*chunks[2]).status_code == 201
    assert verify_objects(files) == {oid: len(data)}
    assert_nothing_partial(files)


def test_a_completely_full_disk_is_507_for_empty_and_unsized_uploads_too(live, small_filesystem):
    mount = small_filesystem("4m")
    files = mount / "files"
    relay = live(files_dir=files)
    fill_disk(mount / "filler")
    empty_oid = sha256(b"")
    small, small_oid = blob(1000)
    try:
        assert requests.put(relay.url(empty_oid), data=b"").status_code == 507
        assert send_unsized(relay, small_oid, small).startswith(b"HTTP/1.1 507")
        assert requests.get(relay.url()).status_code == 200
        assert_nothing_partial(files)
    finally:
        (mount / "filler").unlink()
    assert requests.put(relay.url(empty_oid), data=b"").status_code == 201
    assert send_unsized(relay, small_oid, small).startswith(b"HTTP/1.1 201")


# -- races -----------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1000, 4 << 20])
def test_8_clients_uploading_the_same_object_at_once_store_it_once(live, files, size):
    relay = live("--workers", "2")

    def upload(url: str, data: bytes, barrier: threading.Barrier):
        barrier.wait(10)
        response = requests.put(url, data=data, timeout=30)
        return response.status_code, response.text, response.headers.get("Retry-After")

    for round_number in range(3):
        data, oid = blob(size, seed=round_number)
        barrier = threading.Barrier(8)
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            results = list(pool.map(upload, [relay.url(oid)] * 8, [data] * 8, [barrier] * 8))
        statuses = sorted(status for status, _, _ in results)
        assert statuses.count(201) == 1 and set(statuses) <= {200, 201, 409}, results
        for status, text, retry_after in results:
            if status == 409:  # the winner's upload was in progress: try again later
                assert "in progress" in text and retry_after, text
        assert requests.get(relay.url(oid)).content == data
    assert len(verify_objects(files)) == 3
    assert_nothing_partial(files)


def test_8_clients_sending_every_chunk_of_the_same_object_at_once(live, files):
    """Each client sends all 8 chunks, in its own order, retrying a 409. What must hold:
    every answer is 202 (stored, Upload-Ranges covering it), 409 with Retry-After (another
    request is writing those bytes or finishing the upload), 201 (exactly once: the chunk
    that completed the object, which verified) or 200 (stored already: every request that
    starts after a client has seen 201 or 200 gets 200); no 400, no 'differ'."""
    relay = live("--workers", "2")
    data, oid = blob(2 << 20, seed=5)
    chunks = [(first, first + (256 << 10) - 1) for first in range(0, len(data), 256 << 10)]
    barrier = threading.Barrier(8)
    stored_seen_at = []  # when a client first saw 201 or 200
    lock = threading.Lock()

    def client(number: int) -> list:
        order = random.Random(SEED + number).sample(chunks, len(chunks))
        answers = []
        with requests.Session() as session:
            barrier.wait(10)
            for first, last in order:
                for _ in range(200):
                    started = time.monotonic()
                    headers = {"Content-Range": f"bytes {first}-{last}/{len(data)}"}
                    response = session.put(relay.url(oid), data=data[first : last + 1], headers=headers, timeout=30)
                    answers.append((started, first, last, response.status_code, response.text, response.headers))
                    if response.status_code in (200, 201):
                        with lock:
                            stored_seen_at.append(time.monotonic())
                    if response.status_code != 409:
                        break
                    time.sleep(0.01)
        return answers

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = [answer for result in pool.map(client, range(8)) for answer in result]
    statuses = [status for _, _, _, status, _, _ in answers]
    assert statuses.count(201) == 1, statuses
    assert set(statuses) <= {200, 201, 202, 409}, [a[3:5] for a in answers if a[3] not in (200, 201, 202, 409)]
    for started, first, last, status, text, headers in answers:
        if status == 202:
            ranges = file_relay._parse_ranges(headers["Upload-Ranges"])
            assert any(a <= first and last <= b for a, b in ranges), (first, last, ranges)
        elif status == 409:
            assert headers.get("Retry-After") and ("being written" in text or "in progress" in text), text
        if started > min(stored_seen_at):
            assert status == 200, (status, text)
    assert requests.get(relay.url(oid)).content == data
    assert verify_objects(files) == {oid: len(data)}
    # A chunk recorded into the upload's directory while the request that completed it
    # removes it leaves that directory behind (.trash-*, empty markers only) for the sweeper.
    for name in partials(files)["trash"]:
        assert all(entry.startswith("range-") for entry in os.listdir(files / ".relay" / "partial" / name)), name
    file_relay.Store(file_relay.RelayConfig(server_id=SERVER_ID, files_directory=files)).sweep()
    assert_nothing_partial(files)


def test_a_chunk_is_not_acknowledged_with_nothing_received_when_another_request_completes_the_object(
    make_app, make_config, files, monkeypatch
):
    """The race made certain: right after a chunk request has found its upload current,
    another request sends the last chunk, which completes the object."""
    app = make_app()
    data, oid = blob(300_000)
    thirds = [(0, 99_999), (100_000, 199_999), (200_000, 299_999)]

    def put(first: int, last: int):
        headers = {"Content-Range": f"bytes {first}-{last}/{len(data)}"}
        return app.put(f"/{SERVER_ID}/{oid}", data[first : last + 1], headers=headers, status="*")

    assert put(*thirds[0]).status_int == put(*thirds[1]).status_int == 202
    store = file_relay.Store(make_config())
    original = file_relay._Partial.ranges
    retry = threading.current_thread()
    calls, completed = [], []

    pool = concurrent.futures.ThreadPoolExecutor(1)

    def ranges(partial):
        # put_chunk lists the ranges twice: before writing (to compare) and after recording
        # its chunk. Before the second listing, the last chunk arrives and completes the
        # object; publishing it has to wait for this request, which may still write.
        if threading.current_thread() is retry:
            calls.append(partial)
            if len(calls) == 2:
                completed.append(pool.submit(put, *thirds[2]))
                wait_until(lambda: completed[0].done() or finisher_waiting(files, oid), message="the last chunk")
        return original(partial)

    monkeypatch.setattr(file_relay._Partial, "ranges", ranges)
    status, progress = answered(store.put_chunk(oid, 0, 99_999, len(data), [data[:100_000]], None, file_relay.Limits()))
    assert completed[0].result(20).status_int == 201
    pool.shutdown()
    assert verify_objects(files) == {oid: len(data)}
    assert (status, progress) == (200, None), (status, progress)


def read_slowly(url: str, started: threading.Barrier, pause: float) -> tuple[bytes, Exception | None]:
    """Download *url* in small steps; return what arrived and the error that ended it, if any."""
    received = b""
    try:
        with requests.get(url, stream=True, timeout=30) as response:
            assert response.status_code == 200
            declared = int(response.headers["Content-Length"])
            received += response.raw.read(256 << 10)
            started.wait(20)
            while block := response.raw.read(256 << 10):
                received += block
                time.sleep(pause)
            if len(received) != declared:
                return received, EOFError(f"{len(received)} of {declared} bytes")
    except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
        return received, exc
    return received, None


def test_delete_during_downloads_never_gives_wrong_bytes(live, files):
    relay = live("--workers", "2")
    data, oid = blob(16 << 20)
    assert requests.put(relay.url(oid), data=data).status_code == 201
    started = threading.Barrier(7)
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        downloads = [pool.submit(read_slowly, relay.url(oid), started, 0.005) for _ in range(6)]
        started.wait(20)  # every download is under way
        assert requests.delete(relay.url(oid)).status_code == 200
        assert requests.get(relay.url(oid) + "?wait=0").status_code == 404  # no new download...
        results = [future.result(60) for future in downloads]
    for received, error in results:
        assert data.startswith(received)  # ...and those in flight get the right bytes
        assert error is None or len(received) < len(data)
    # An object deleted while it is read stays readable through its open file: all complete.
    assert [received == data for received, _ in results] == [True] * 6
    assert not (files / oid).exists() and requests.head(relay.url(oid)).status_code == 404
    assert orphaned_limits(files) == []


def test_delete_of_a_chunked_upload_being_followed_cuts_its_readers_off(live, files):
    relay = live("--workers", "2")
    data, oid = blob(4 << 20)
    half = len(data) // 2
    headers = {"Content-Range": f"bytes 0-{half - 1}/{len(data)}"}
    assert requests.put(relay.url(oid), data=data[:half], headers=headers).status_code == 202
    started = threading.Barrier(5)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        readers = [pool.submit(read_slowly, relay.url(oid), started, 0) for _ in range(4)]
        started.wait(20)
        assert requests.delete(relay.url(oid)).status_code == 200  # cancels the partial upload
        results = [future.result(60) for future in readers]
    for received, error in results:
        assert data.startswith(received) and len(received) <= half  # a prefix of what was received
        assert error is not None  # cut off: never a short body that looks complete
    assert requests.head(relay.url(oid)).status_code == 404
    assert verify_objects(files) == {}
    assert_nothing_partial(files)


def test_drain_during_transfers_lets_them_finish_and_refuses_new_uploads(live, files):
    relay = live("--workers", "2", "--graceful-timeout", "30")
    stored, stored_oid = blob(16 << 20, seed=1)
    assert requests.put(relay.url(stored_oid), data=stored).status_code == 201
    plain = [blob(2 << 20, seed=10 + n) for n in range(3)]
    chunked, chunked_oid = blob(4 << 20, seed=20)
    headers = {"Content-Range": f"bytes 0-{(2 << 20) - 1}/{len(chunked)}"}
    assert requests.put(relay.url(chunked_oid), data=chunked[: 2 << 20], headers=headers).status_code == 202
    started = threading.Barrier(4)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        uploads = [pool.submit(requests.put, relay.url(oid), data=Paced(data, 3.0), timeout=60) for data, oid in plain]
        last_chunk = {"Content-Range": f"bytes {2 << 20}-{len(chunked) - 1}/{len(chunked)}"}
        chunk = pool.submit(
            requests.put, relay.url(chunked_oid), data=Paced(chunked[2 << 20 :], 3.0), headers=last_chunk, timeout=60
        )
        downloads = [pool.submit(read_slowly, relay.url(stored_oid), started, 0.02) for _ in range(3)]
        started.wait(20)
        wait_until(lambda: requests.get(relay.url()).json()["uploads_in_progress"] == 4, message="the uploads")
        relay.signal(signal.SIGTERM)
        wait_until(lambda: requests.get(relay.url()).json()["draining"], message="the drain")
        other, other_oid = blob(1000, seed=2)
        for extra in ({}, {"Content-Range": f"bytes 0-99/{len(other)}"}):
            refused = requests.put(relay.url(other_oid), data=other[:100] if extra else other, headers=extra)
            assert refused.status_code == 503 and refused.headers["Retry-After"]
        assert [future.result(60).status_code for future in uploads] == [201] * 3
        assert chunk.result(60).status_code == 201
        assert [future.result(60) for future in downloads] == [(stored, None)] * 3
    assert relay.wait_exit(30) == 0
    expected = {oid: len(data) for data, oid in [*plain, (stored, stored_oid), (chunked, chunked_oid)]}
    assert verify_objects(files) == expected
    assert_nothing_partial(files)


def test_a_lock_held_by_a_dead_host_delays_uploads_by_a_bounded_time_then_says_retry(live, files):
    """A process that holds the relay's space lock and never lets go (a host that died on a
    shared filesystem keeps its locks until its session expires): an upload is told 503
    with Retry-After after a bounded wait, a download is served at once, and once the lock
    is free uploads go on."""
    import subprocess
    import sys

    relay = live()
    data, oid = blob(1000, seed=50)
    assert requests.put(relay.url(oid), data=data, timeout=30).status_code == 201
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_SPACE_LOCK, str(files / ".relay" / "lock")],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        more, more_oid = blob(1000, seed=51)
        started = time.monotonic()
        refused = requests.put(relay.url(more_oid), data=more, timeout=60)
        waited = time.monotonic() - started
        assert refused.status_code == 503 and int(refused.headers["Retry-After"]) > 0, refused.text
        assert waited < 30, waited
        assert requests.get(relay.url(oid) + "?wait=0", timeout=10).content == data
    finally:
        holder.kill()
        holder.wait(10)
    assert requests.put(relay.url(more_oid), data=more, timeout=30).status_code == 201


HOLD_SPACE_LOCK = """
import fcntl, os, struct, sys, time
fd = os.open(sys.argv[1], os.O_RDWR)
fcntl.fcntl(fd, fcntl.F_OFD_SETLKW, struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, 0, 1, 0))
print("held", flush=True)
time.sleep(300)
"""
