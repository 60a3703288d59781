"""Pipes: PUT /<sid>/<sha256>?pipe passes a body to the GETs of its name without storing
it, verified, through a bounded buffer. Live relays, real curl and raw sockets; the
pipe's state is read from its real file where a test must know it."""

import concurrent.futures
import hashlib
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest
import requests
from conftest import ROOT, SERVER_ID, Paced, blob, sha256, wait_until

import file_relay

EMPTY = hashlib.sha256(b"").hexdigest()


def pipe_url(relay, oid: str, receivers: int | None = None, wait: float | None = None) -> str:
    url = relay.url(oid) + "?pipe"
    if receivers is not None:
        url += f"&receivers={receivers}"
    if wait is not None:
        url += f"&wait={wait:g}"
    return url


def pipe_state(files, oid: str) -> str | None:
    """The state in the pipe's file (PipeState's name), or None if there is none."""
    try:
        with open(files / ".relay" / "pipes" / oid, "rb") as file:
            header = file.read(file_relay._PIPE_HEADER.size)
    except FileNotFoundError:
        return None
    return file_relay.PipeState(struct.unpack_from("q", header, 8)[0]).name


def pipe_written(files, oid: str) -> int:
    try:
        with open(files / ".relay" / "pipes" / oid, "rb") as file:
            header = file.read(file_relay._PIPE_HEADER.size)
    except FileNotFoundError:
        return -1
    return file_relay._PIPE_HEADER.unpack(header)[6]


def pipe_slots_taken(files, oid: str) -> int:
    """Receivers in the pipe's file reading now."""
    with open(files / ".relay" / "pipes" / oid, "rb") as file:
        header = file.read(file_relay._PIPE_DATA_AT)
    slots = file_relay._PIPE_ALL_SLOTS.unpack_from(header, file_relay._PIPE_SLOTS_AT)
    return sum(1 for status in slots[::2] if status == file_relay._Receiver.ACTIVE)


def assert_nothing_kept(files) -> None:
    """Nothing of a pipe is stored: no object, no partial upload, no pipe file."""
    objects = [path.name for path in files.iterdir() if len(path.name) == 64]
    assert objects == []
    assert list((files / ".relay" / "partial").iterdir()) == []
    assert list((files / ".relay" / "pipes").iterdir()) == []


class Receiver:
    """A GET on a raw socket, its body hashed as it arrives, in a thread: it knows its
    local port (to find the worker serving it), and can be paused or dropped."""

    def __init__(self, relay, oid: str, wait: float = 30, method: str = "GET"):
        self.sock = socket.create_connection(relay.address, timeout=60)
        self.port = self.sock.getsockname()[1]
        request = f"{method} /{SERVER_ID}/{oid}?wait={wait:g} HTTP/1.1\r\nHost: x\r\n\r\n"
        self.sock.sendall(request.encode())
        self.head = b""
        self.status = None
        self.length = None
        self.received = 0
        self.hasher = hashlib.sha256()
        self.ended = None  # "complete" (every byte of Content-Length), "cut" (closed early)
        self.reading = threading.Event()
        self.reading.set()
        self.method = method
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            rest = b""
            while b"\r\n\r\n" not in rest:
                data = self.sock.recv(65536)
                if not data:
                    self.ended = "cut"
                    return
                rest += data
            self.head, _, rest = rest.partition(b"\r\n\r\n")
            lines = self.head.decode("latin-1").split("\r\n")
            self.status = int(lines[0].split()[1])
            headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
            self.length = int(headers["content-length"]) if "content-length" in headers else None
            if self.method == "HEAD" or self.status != 200:
                while self.method != "HEAD" and len(rest) < (self.length or 0):
                    data = self.sock.recv(65536)
                    if not data:
                        break
                    rest += data
                self.body = rest
                self.ended = "complete"
                return
            self._take(rest)
            while self.received < self.length:
                self.reading.wait()
                data = self.sock.recv(1 << 20)
                if not data:
                    self.ended = "cut"
                    return
                self._take(data)
            self.ended = "complete"
        except OSError:
            self.ended = "cut"
        finally:
            self.sock.close()

    def _take(self, data: bytes) -> None:
        self.received += len(data)
        self.hasher.update(data)

    def result(self, timeout: float = 60) -> "Receiver":
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the receiver did not end"
        return self

    def verified(self, oid: str) -> bool:
        return self.ended == "complete" and self.received == self.length and self.hasher.hexdigest() == oid

    def drop(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)


def curl_receiver(url: str, path, *extra) -> subprocess.Popen:
    return subprocess.Popen(
        ["curl", "-sS", "-o", str(path), "-w", "%{http_code} %{size_download}", *extra, url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def waiting_readers(relay, count: int) -> None:
    wait_until(lambda: requests.get(relay.url()).json()["waiting_readers"] == count, message=f"{count} waiting")


def send(pool, url: str, body, **kwargs) -> concurrent.futures.Future:
    return pool.submit(lambda: requests.put(url, data=body, timeout=120, **kwargs))


def raw_sender(relay, oid: str, length: int, query: str = "pipe") -> socket.socket:
    sock = socket.create_connection(relay.address, timeout=30)
    head = f"PUT /{SERVER_ID}/{oid}?{query} HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n"
    sock.sendall(head.encode())
    return sock


def answer_of(sock: socket.socket) -> bytes:
    """The relay's answer on *sock*: its head and its body (of Content-Length)."""
    received = b""
    with sock:
        while data := sock.recv(65536):
            received += data
            head, _, body = received.partition(b"\r\n\r\n")
            length = re.search(rb"(?i)\r\ncontent-length: *([0-9]+)", head)
            if length and len(body) >= int(length.group(1)):
                break
    return received


# -- the pipe's promise: verified, paced, whole --------------------------------------


def test_three_receivers_one_throttled_all_verify_and_the_sender_is_paced(live, tmp_path, files):
    relay = live("--pipe-buffer", "1M")
    data, oid = blob(32 << 20)
    receivers = [curl_receiver(relay.url(oid) + "?wait=30", tmp_path / f"r{n}") for n in range(2)]
    slow = curl_receiver(relay.url(oid) + "?wait=30", tmp_path / "slow", "--limit-rate", "2M")
    waiting_readers(relay, 3)
    started = time.monotonic()
    answer = requests.put(pipe_url(relay, oid, receivers=3), data=data, timeout=120)
    took = time.monotonic() - started
    assert answer.status_code == 200, answer.text
    assert answer.headers["X-Pipe-Delivered"] == answer.headers["X-Pipe-Receivers"] == "3"
    assert "verified; 3 of 3 receivers got every byte" in answer.text
    # 32 MiB at 2 MiB/s to the slowest: the sender waited for it, all but what the ring
    # and the sockets' buffers (a few MiB on loopback) held when it was answered, and what
    # curl's average rate let through at once after its wait for the pipe (a few MiB more)
    assert took > 4
    for process, name in [*zip(receivers, ("r0", "r1"), strict=True), (slow, "slow")]:
        out, err = process.communicate(timeout=60)
        assert process.returncode == 0 and out == f"200 {len(data)}", err
        assert sha256((tmp_path / name).read_bytes()) == oid
    assert_nothing_kept(files)


def test_a_mismatch_cuts_every_receiver_before_its_last_byte(live, tmp_path, files):
    relay = live("--pipe-buffer", "1M")
    data, oid = blob(4 << 20)
    tampered = data[:-1] + bytes([data[-1] ^ 1])  # only the very last byte differs
    receivers = [curl_receiver(relay.url(oid) + "?wait=30", tmp_path / f"r{n}") for n in range(2)]
    waiting_readers(relay, 2)
    answer = requests.put(pipe_url(relay, oid, receivers=2), data=tampered, timeout=60)
    assert answer.status_code == 400 and "does not match" in answer.text
    for n, process in enumerate(receivers):
        out, err = process.communicate(timeout=30)
        assert process.returncode == 18, (out, err)  # CURLE_PARTIAL_FILE: never a complete-looking body
        assert 0 < (tmp_path / f"r{n}").stat().st_size < len(data)
    assert_nothing_kept(files)


def test_a_sender_that_aborts_cuts_every_receiver(live, files):
    relay = live("--pipe-buffer", "1M")
    data, oid = blob(8 << 20)
    receivers = [Receiver(relay, oid) for _ in range(2)]
    waiting_readers(relay, 2)
    sock = raw_sender(relay, oid, len(data), "pipe&receivers=2")
    sock.sendall(data[: 3 << 20])
    wait_until(lambda: all(r.received >= 1 << 20 for r in receivers), message="bytes reaching the receivers")
    sock.close()
    for receiver in receivers:
        assert receiver.result().ended == "cut" and receiver.received < len(data)
    wait_until(lambda: pipe_state(files, oid) is None, message="the pipe's file to go")
    assert_nothing_kept(files)


@pytest.mark.parametrize("sent", [200_000, 5 << 19], ids=["before any byte passed", "after bytes passed"])
def test_a_stalled_sender_is_cut_after_the_idle_timeout_and_so_are_its_receivers(live, files, sent):
    relay = live("--pipe-buffer", "1M", "--idle-timeout", "1")
    data, oid = blob(4 << 20)
    receiver = Receiver(relay, oid)
    waiting_readers(relay, 1)
    sock = raw_sender(relay, oid, len(data))
    wait_until(lambda: pipe_state(files, oid) == "FLOWING", message="the receiver to join")  # none read ahead
    sock.sendall(data[:sent])  # then silence, the connection left open
    receiver.result()
    if sent < file_relay._PIPE_CLAIM:  # the sender has published none of it
        assert receiver.status == 502 and receiver.received == 0, (receiver.head, receiver.ended)
        assert b"its sender was answered 408: the client sent nothing for the idle timeout" in receiver.body
    else:
        assert receiver.ended == "cut" and 0 < receiver.received < sent
    assert answer_of(sock).startswith(b"HTTP/1.1 408")
    assert_nothing_kept(files)


def test_a_receiver_that_drops_does_not_stop_the_others(live, files):
    relay = live("--pipe-buffer", "1M")
    data, oid = blob(16 << 20)
    staying, leaving = Receiver(relay, oid), Receiver(relay, oid)
    waiting_readers(relay, 2)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        body = Paced(data, seconds=2, pieces=32)
        answer = send(pool, pipe_url(relay, oid, receivers=2), body)
        wait_until(lambda: leaving.received > 2 << 20, message="the leaving receiver's first bytes")
        leaving.drop()
        assert answer.result().status_code == 200, answer.result().text
    assert answer.result().headers["X-Pipe-Delivered"] == "1"
    assert "1 of 2 receivers got every byte" in answer.result().text
    assert staying.result().verified(oid)
    assert leaving.result().ended == "cut"
    assert_nothing_kept(files)


def test_a_receiver_that_stops_reading_is_dropped_after_the_idle_timeout(live, files):
    relay = live("--pipe-buffer", "1M", "--idle-timeout", "2")
    data, oid = blob(32 << 20)  # far more than the buffer and both sockets' buffers hold
    reading, stuck = Receiver(relay, oid), Receiver(relay, oid)
    stuck.reading.clear()  # its connection stays open, unread
    waiting_readers(relay, 2)
    started = time.monotonic()
    answer = requests.put(pipe_url(relay, oid, receivers=2), data=data, timeout=60)
    assert answer.status_code == 200, answer.text
    assert "1 of 2 receivers got every byte" in answer.text
    assert time.monotonic() - started < 30
    assert reading.result().verified(oid)
    stuck.reading.set()
    assert stuck.result().ended == "cut"
    assert_nothing_kept(files)


def test_a_pipe_whose_every_receiver_drops_fails_the_sender(live, files):
    relay = live("--pipe-buffer", "1M")
    data, oid = blob(16 << 20)
    receiver = Receiver(relay, oid)
    waiting_readers(relay, 1)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        answer = send(pool, pipe_url(relay, oid), Paced(data, seconds=2, pieces=32))
        wait_until(lambda: receiver.received > 2 << 20, message="the receiver's first bytes")
        receiver.drop()
        assert answer.result().status_code == 502
    assert "every receiver left" in answer.result().text
    assert_nothing_kept(files)


def test_a_pipe_of_unknown_length_reaches_its_receivers_chunked(live, files):
    relay = live("--pipe-buffer", "1M")
    data, oid = blob(6 << 20)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        reader = pool.submit(lambda: requests.get(relay.url(oid) + "?wait=30", timeout=60))
        waiting_readers(relay, 1)
        answer = requests.put(pipe_url(relay, oid), data=iter(Paced(data, seconds=1, pieces=24)), timeout=60)
        assert answer.status_code == 200, answer.text
        got = reader.result()
    assert got.status_code == 200 and got.headers.get("Transfer-Encoding") == "chunked"
    assert got.content == data
    assert_nothing_kept(files)


def test_a_slow_sender_of_unknown_length_sees_its_receiver_join_at_once(live, files):
    """A body sent in small chunks is not read while the pipe waits (a chunk is read
    whole, which would hold the wait up): the receiver joining starts the bytes at once."""
    relay = live()
    data, oid = blob(256 << 10)
    sender = socket.create_connection(relay.address, timeout=30)
    sender.sendall(f"PUT /{SERVER_ID}/{oid}?pipe HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
    flowing = threading.Event()

    def trickle():
        sent = 0
        while not flowing.wait(0.05) and sent < len(data) // 2:  # 1 KiB every 50 ms until it flows
            sender.sendall(b"400\r\n" + data[sent : sent + 1024] + b"\r\n")
            sent += 1024
        rest = data[sent:]
        sender.sendall(f"{len(rest):x}\r\n".encode() + rest + b"\r\n0\r\n\r\n")

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        trickling = pool.submit(trickle)
        wait_until(lambda: pipe_state(files, oid) == "WAITING", message="the pipe to wait")
        reader = pool.submit(lambda: requests.get(relay.url(oid), timeout=60))
        wait_until(lambda: pipe_state(files, oid) != "WAITING", timeout=3, message="the bytes to flow")
        flowing.set()
        trickling.result()
        got = reader.result()
    assert got.status_code == 200 and got.content == data
    assert answer_of(sender).startswith(b"HTTP/1.1 200")


def test_a_pipe_of_unknown_length_that_does_not_verify_never_ends_its_chunked_body(live, files):
    relay = live("--pipe-buffer", "1M")
    data, oid = blob(2 << 20)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        reader = pool.submit(lambda: requests.get(relay.url(oid) + "?wait=30", timeout=60))
        waiting_readers(relay, 1)
        answer = requests.put(pipe_url(relay, oid), data=iter(Paced(data + b"x", seconds=1, pieces=8)), timeout=60)
        assert answer.status_code == 400
        with pytest.raises(requests.exceptions.ChunkedEncodingError):
            reader.result()
    assert_nothing_kept(files)


def test_an_http10_receiver_of_a_pipe_of_unknown_length_is_told_to_retry_and_takes_no_place(live, files):
    relay = live("--pipe-buffer", "1M")
    data, oid = blob(2 << 20)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        answer = pool.submit(
            lambda: requests.put(pipe_url(relay, oid, wait=30), data=iter(Paced(data, seconds=1, pieces=8)), timeout=60)
        )
        wait_until(lambda: pipe_state(files, oid) == "WAITING", message="the pipe")
        for _ in range(file_relay._PIPE_SLOTS + 1):  # more than a pipe has places for
            sock = socket.create_connection(relay.address, timeout=30)
            sock.sendall(f"GET /{SERVER_ID}/{oid}?wait=0 HTTP/1.0\r\n\r\n".encode())
            assert answer_of(sock).startswith(b"HTTP/1.0 503")
        # One that would wait is told at once too: a pipe never gets a length.
        sock = socket.create_connection(relay.address, timeout=5)
        sock.sendall(f"GET /{SERVER_ID}/{oid}?wait=20 HTTP/1.0\r\n\r\n".encode())
        assert answer_of(sock).startswith(b"HTTP/1.0 503")
        receiver = requests.get(relay.url(oid), timeout=60)  # HTTP/1.1: chunked
        assert answer.result().status_code == 200, answer.result().text
    assert answer.result().headers["X-Pipe-Receivers"] == "1"
    assert receiver.status_code == 200 and receiver.content == data


# -- edges: late, early, none, empty, stored ----------------------------------------


def test_a_receiver_after_the_first_bytes_left_the_buffer_gets_409(live, files):
    relay = live("--pipe-buffer", "1M")
    data, oid = blob(8 << 20)
    first = Receiver(relay, oid)
    waiting_readers(relay, 1)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        body = Paced(data, seconds=2, pieces=32)
        answer = send(pool, pipe_url(relay, oid), body)
        wait_until(lambda: pipe_written(files, oid) > 2 << 20, message="the ring to wrap")
        late = requests.get(relay.url(oid), timeout=30)
        head = requests.head(relay.url(oid), timeout=30)
        assert answer.result().status_code == 200
    assert late.status_code == 409 and "too late" in late.text
    assert head.status_code == 409
    assert first.result().verified(oid)
    assert_nothing_kept(files)


def test_a_receiver_arriving_while_the_verified_content_is_handed_over_gets_it_all(live, files):
    relay = live("--pipe-buffer", "32M")
    data, oid = blob(16 << 20)  # all of it fits in the buffer
    first = Receiver(relay, oid)
    first.reading.clear()  # takes its headers, then stops reading: the hand-over lasts
    waiting_readers(relay, 1)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        answer = send(pool, pipe_url(relay, oid), data)
        wait_until(lambda: pipe_state(files, oid) == "VERIFIED", message="the content to verify")
        late = Receiver(relay, oid, wait=0)
        assert late.result().verified(oid), (late.head, late.status, late.received, late.ended)
        assert not answer.done()  # the sender waits for the first receiver
        first.reading.set()
        assert answer.result().status_code == 200
    assert answer.result().headers["X-Pipe-Delivered"] == answer.result().headers["X-Pipe-Receivers"] == "2"
    assert first.result().verified(oid)
    assert_nothing_kept(files)


def test_a_receiver_started_during_the_pipe_within_the_buffer_joins_it(live, files):
    relay = live("--pipe-buffer", "8M")
    data, oid = blob(6 << 20)
    first = Receiver(relay, oid)
    waiting_readers(relay, 1)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        body = Paced(data, seconds=2, pieces=16)
        answer = send(pool, pipe_url(relay, oid), body)
        wait_until(lambda: pipe_written(files, oid) > 1 << 20, message="the first bytes to pass")
        second = Receiver(relay, oid, wait=0)
        assert answer.result().status_code == 200
    assert first.result().verified(oid) and second.result().verified(oid)
    assert answer.result().headers["X-Pipe-Delivered"] == "2"


def test_a_sender_with_no_receiver_is_refused_after_its_wait(live, files):
    relay = live()
    data, oid = blob(1 << 20)
    started = time.monotonic()
    answer = requests.put(pipe_url(relay, oid, wait=1), data=data, timeout=30)
    assert answer.status_code == 504 and "no receiver came within 1 s" in answer.text
    assert time.monotonic() - started < 10
    assert_nothing_kept(files)


def test_the_sender_waits_for_as_many_receivers_as_it_asked_for(live, files):
    relay = live("--pipe-buffer", "1M")
    data, oid = blob(2 << 20)
    first = Receiver(relay, oid)
    waiting_readers(relay, 1)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        answer = send(pool, pipe_url(relay, oid, receivers=2), data)
        wait_until(lambda oid=oid: pipe_state(files, oid) == "WAITING", message="the pipe to wait")
        assert pipe_written(files, oid) == 0 and first.received == 0  # no byte flows for one of two
        second = Receiver(relay, oid)
        assert answer.result().status_code == 200
    assert first.result().verified(oid) and second.result().verified(oid)


def test_a_sender_short_of_receivers_is_told_how_many_came(live, files):
    relay = live()
    data, oid = blob(1 << 20)
    first = Receiver(relay, oid)
    waiting_readers(relay, 1)
    answer = requests.put(pipe_url(relay, oid, receivers=2, wait=1), data=data, timeout=30)
    assert answer.status_code == 504 and "1 of 2 receivers came within 1 s: start the rest" in answer.text
    assert first.result().status == 504, (first.head, first.ended)  # told so too, no byte having passed
    assert b"its sender was answered 504: 1 of 2 receivers came within 1 s" in first.body
    assert_nothing_kept(files)


def test_receivers_that_leave_before_bytes_flow_leave_their_places(live, files):
    relay = live()
    data, oid = blob(1 << 20)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        answer = send(pool, pipe_url(relay, oid, receivers=2, wait=60), data)
        wait_until(lambda: pipe_state(files, oid) == "WAITING", message="the pipe")
        for _ in range(file_relay._PIPE_SLOTS + 1):  # each joins, then hangs up
            receiver = Receiver(relay, oid, wait=0)
            wait_until(lambda: pipe_slots_taken(files, oid), message="the receiver to join")
            receiver.drop()
            assert receiver.result().ended == "cut"
            wait_until(lambda: not pipe_slots_taken(files, oid), message="the receiver to leave")
        staying = [Receiver(relay, oid) for _ in range(2)]
        assert answer.result().status_code == 200, answer.result().text
    assert answer.result().headers["X-Pipe-Delivered"] == answer.result().headers["X-Pipe-Receivers"] == "2"
    assert all(receiver.result().verified(oid) for receiver in staying)


def test_an_empty_pipe(live, files):
    relay = live()
    receiver = Receiver(relay, EMPTY)
    waiting_readers(relay, 1)
    answer = requests.put(pipe_url(relay, EMPTY), data=b"", timeout=30)
    assert answer.status_code == 200 and "(0 bytes)" in answer.text
    assert receiver.result().status == 200 and receiver.verified(EMPTY)
    assert_nothing_kept(files)


@pytest.mark.parametrize("body", [b"", b"x"], ids=["empty", "one byte"])
def test_a_pipe_too_small_to_pass_a_byte_under_a_wrong_name_tells_its_receiver_why(live, files, body):
    """Its every byte is held back until it verifies: the receiver has had none when it
    fails, and is answered the sender's reason instead of a 200 cut short."""
    relay = live()
    _, oid = blob(10)
    receiver = Receiver(relay, oid)
    waiting_readers(relay, 1)
    answer = requests.put(pipe_url(relay, oid), data=body, timeout=30)
    assert answer.status_code == 400
    assert receiver.result().status == 502, (receiver.head, receiver.ended)
    assert b"the pipe failed before any byte reached this receiver; its sender was answered 400" in receiver.body
    assert b"does not match the name" in receiver.body
    assert_nothing_kept(files)


def test_a_receiver_waiting_for_the_first_bytes_is_told_when_the_sender_hangs_up(live, files):
    relay = live()
    data, oid = blob(1 << 20)
    receiver = Receiver(relay, oid)
    waiting_readers(relay, 1)
    sock = raw_sender(relay, oid, len(data), "pipe&receivers=2&wait=30")  # waits for a second receiver
    wait_until(lambda: pipe_state(files, oid) == "WAITING" and pipe_slots_taken(files, oid), message="the receiver")
    sock.close()
    assert receiver.result().status == 502, (receiver.head, receiver.ended)
    assert b"its sender was answered 400: the sender hung up" in receiver.body
    assert_nothing_kept(files)


def _read_by(pid: int, path) -> int:
    """How far process *pid* has read the file *path* (its descriptor's position)."""
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == str(path):
                return int(open(f"/proc/{pid}/fdinfo/{fd}").readline().split()[1])
        except (FileNotFoundError, ValueError):
            continue
    return 0


@pytest.mark.parametrize("size", [200_000, 16 << 20], ids=["small", "medium"])  # medium: beyond the sockets' buffers
def test_a_curl_sender_killed_while_it_waits_ends_its_pipe(live, tmp_path, files, size):
    """curl waits a second for 100 Continue, then sends its body anyway: the relay takes
    what it sends into the pipe's buffer while the pipe waits, so a sender killed then is
    seen to go (its FIN not stuck behind unread bytes) and its pipe ends at once, not
    after --pipe-wait, which would leave its name refused (409) and a place of
    --max-pipes taken meanwhile."""
    relay = live()
    data, oid = blob(size, seed=31)
    source = tmp_path / "data.bin"
    source.write_bytes(data)
    curl = ["curl", "-sS", "-o", os.devnull, "-w", "%{http_code}", "-T", str(source), pipe_url(relay, oid, wait=120)]
    sender = subprocess.Popen(curl, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        sending = lambda: sender.poll() is not None or _read_by(sender.pid, source) >= min(size, 1 << 20)  # noqa: E731
        wait_until(sending, message="curl to give up waiting for 100 Continue and send its body")
        assert sender.poll() is None, sender.communicate()
        assert requests.get(relay.url(), timeout=30).json()["pipes_in_progress"] == 1
        sender.kill()
        sender.communicate(timeout=30)
    finally:
        sender.kill()
    ended = lambda: requests.get(relay.url(), timeout=30).json()["pipes_in_progress"] == 0  # noqa: E731
    wait_until(ended, timeout=5, message="the pipe of the killed sender to end")
    again = subprocess.Popen(curl, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        sending = lambda: again.poll() is not None or _read_by(again.pid, source) >= min(size, 1 << 20)  # noqa: E731
        wait_until(sending, message="the next sender to send its body")
        assert pipe_state(files, oid) == "WAITING"
        receiver = Receiver(relay, oid)  # joins with the first bytes in the buffer: gets them all
        out, err = again.communicate(timeout=60)
    finally:
        again.kill()
    assert out == "200", err
    assert receiver.result().verified(oid)
    assert_nothing_kept(files)


def test_a_receiver_waiting_with_a_curl_sender_killed_while_it_waits_is_told_why(live, tmp_path, files):
    relay = live()
    data, oid = blob(16 << 20, seed=33)
    source = tmp_path / "data.bin"
    source.write_bytes(data)
    receiver = Receiver(relay, oid)
    waiting_readers(relay, 1)
    curl = ["curl", "-sS", "-o", os.devnull, "-T", str(source), pipe_url(relay, oid, receivers=2, wait=120)]
    sender = subprocess.Popen(curl, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        sending = lambda: sender.poll() is not None or _read_by(sender.pid, source) >= 1 << 20  # noqa: E731
        wait_until(sending, message="curl to send its body")
        assert sender.poll() is None and pipe_slots_taken(files, oid) == 1
        sender.kill()
    finally:
        sender.kill()
        sender.wait(30)
    assert receiver.result(timeout=10).status == 502, (receiver.head, receiver.ended)
    assert b"its sender was answered 400: the sender hung up" in receiver.body
    assert_nothing_kept(files)


def test_a_receiver_joining_after_the_senders_first_bytes_filled_the_buffer_gets_them_all(live, tmp_path, files):
    relay = live("--pipe-buffer", "1M")
    data, oid = blob(8 << 20, seed=32)
    source = tmp_path / "data.bin"
    source.write_bytes(data)
    curl = ["curl", "-sS", "-o", os.devnull, "-w", "%{http_code}", "-T", str(source), pipe_url(relay, oid, wait=60)]
    sender = subprocess.Popen(curl, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        sending = lambda: sender.poll() is not None or _read_by(sender.pid, source) >= 2 << 20  # noqa: E731
        wait_until(sending, message="curl to send more than the buffer holds")
        assert pipe_state(files, oid) == "WAITING" and pipe_written(files, oid) == 0  # none passed on yet
        receiver = Receiver(relay, oid)
        out, err = sender.communicate(timeout=60)
    finally:
        sender.kill()
    assert out == "200", err
    assert receiver.result().verified(oid)
    assert_nothing_kept(files)


def test_a_stored_name_is_not_piped(live, files):
    relay = live()
    data, oid = blob(1 << 20)
    assert requests.put(relay.url(oid), data=data, timeout=30).status_code == 201
    sock = raw_sender(relay, oid, len(data))  # sends no body: the answer comes first
    answer = answer_of(sock)
    assert answer.startswith(b"HTTP/1.1 200") and b"already stored" in answer
    assert requests.get(relay.url(oid), timeout=30).content == data
    assert list((files / ".relay" / "pipes").iterdir()) == []


def test_head_of_a_pipe_in_progress_describes_it_as_get_would(live, files):
    relay = live("--pipe-buffer", "8M")
    data, oid = blob(4 << 20)
    first = Receiver(relay, oid)
    first.reading.clear()
    waiting_readers(relay, 1)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        answer = send(pool, pipe_url(relay, oid), data)
        wait_until(lambda: pipe_state(files, oid) is not None, message="the pipe")
        head = requests.head(relay.url(oid), timeout=30)
        assert head.status_code == 200 and head.content == b""
        assert head.headers["Content-Length"] == str(len(data))
        assert head.headers["Content-Type"] == "application/octet-stream"
        wait_until(lambda: first.head, message="the receiver's headers")
        got = dict(line.split(": ", 1) for line in first.head.decode().split("\r\n")[1:])
        same = ("Content-Length", "Content-Type", "Upload-Length", "Upload-Incomplete")
        assert {k: got.get(k) for k in same} == {k: head.headers.get(k) for k in same}
        first.reading.set()
        assert answer.result().status_code == 200
    assert answer.result().headers["X-Pipe-Receivers"] == "1"  # HEAD is not a receiver
    assert first.result().verified(oid)


def test_a_range_request_gets_the_whole_pipe(live):
    relay = live()
    data, oid = blob(1 << 20)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        reader = pool.submit(lambda: requests.get(relay.url(oid) + "?wait=30", headers={"Range": "bytes=10-"}))
        waiting_readers(relay, 1)
        assert requests.put(pipe_url(relay, oid), data=data, timeout=30).status_code == 200
        assert reader.result().status_code == 200 and reader.result().content == data


# -- limits ------------------------------------------------------------------------


def test_a_content_length_beyond_any_size_is_413_as_for_a_plain_put(live):
    relay = live()
    _, oid = blob(10)
    for query in ("pipe", "pipe&receivers=2", None):
        for length in (2**63, 2**64 + 5, file_relay._MAX_OBJECT_SIZE + 1):
            sock = socket.create_connection(relay.address, timeout=30)
            path = f"/{SERVER_ID}/{oid}" + (f"?{query}" if query else "")
            sock.sendall(f"PUT {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n".encode())
            assert answer_of(sock).startswith(b"HTTP/1.1 413"), (query, length)


def test_bad_receiver_counts_are_400(live):
    relay = live()
    _, oid = blob(10)
    for count in ("0", "65", "x", "-1", "²"):
        answer = requests.put(relay.url(oid) + f"?pipe&receivers={count}", data=b"x" * 10, timeout=30)
        assert answer.status_code == 400 and "receivers" in answer.text


def test_pipes_beyond_max_pipes_get_503_with_retry_after(live, files):
    relay = live("--max-pipes", "1")
    data, oid = blob(1 << 20)
    other, other_oid = blob(1 << 20, seed=1)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        first = send(pool, pipe_url(relay, oid, wait=30), data)
        wait_until(lambda: pipe_state(files, oid) == "WAITING", message="the first pipe")
        refused = requests.put(pipe_url(relay, other_oid), data=other, timeout=30)
        assert refused.status_code == 503 and refused.headers["Retry-After"]
        assert "pipes at once" in refused.text
        assert requests.get(relay.url()).json()["pipes_in_progress"] == 1
        receiver = Receiver(relay, oid)
        assert first.result().status_code == 200
    assert receiver.result().verified(oid)
    assert requests.put(pipe_url(relay, other_oid, wait=0.5), data=other, timeout=30).status_code == 504


def test_only_the_buffer_counts_against_max_disk(live, files):
    relay = live("--max-disk", "2M", "--pipe-buffer", "1M")
    data, oid = blob(8 << 20)  # four times the quota
    receiver = Receiver(relay, oid)
    waiting_readers(relay, 1)
    assert requests.put(pipe_url(relay, oid), data=data, timeout=60).status_code == 200
    assert receiver.result().verified(oid)
    too_big = live("--max-disk", "2M", "--pipe-buffer", "3M", name="small-quota", files_dir=files.parent / "other")
    answer = requests.put(pipe_url(too_big, oid), data=data, timeout=60)
    assert answer.status_code == 507 and "quota" in answer.text


def test_a_pipe_holds_its_buffer_against_other_uploads(live, files):
    relay = live("--max-disk", "3M", "--pipe-buffer", "2M")
    data, oid = blob(4 << 20)
    small, small_oid = blob(1536 << 10, seed=1)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        answer = send(pool, pipe_url(relay, oid, wait=30), data)
        wait_until(lambda: pipe_state(files, oid) == "WAITING", message="the pipe")
        refused = requests.put(relay.url(small_oid), data=small, timeout=30)
        assert refused.status_code == 507
        receiver = Receiver(relay, oid)
        assert answer.result().status_code == 200
    assert receiver.result().verified(oid)
    assert requests.put(relay.url(small_oid), data=small, timeout=30).status_code == 201


def test_a_pipe_whose_sender_died_counts_neither_in_the_status_nor_against_max_disk(live, files):
    relay = live("--workers", "1", "--max-disk", "3M", "--pipe-buffer", "2M", "--sweep-interval", "3600")
    data, oid = blob(4 << 20)
    sock = raw_sender(relay, oid, len(data), "pipe&wait=60")
    wait_until(lambda: pipe_state(files, oid) == "WAITING", message="the pipe")
    (worker,) = relay.worker_pids()
    os.kill(worker, signal.SIGKILL)  # its buffer's file stays: the sweep is an hour away
    sock.close()
    wait_until(lambda: relay.worker_pids() not in ([], [worker]), message="the next worker")
    assert requests.get(relay.url(), timeout=30).json()["pipes_in_progress"] == 0
    assert pipe_state(files, oid) == "WAITING"
    other, other_oid = blob(4 << 20, seed=1)
    small, small_oid = blob(512 << 10, seed=2)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        answer = send(pool, pipe_url(relay, other_oid, wait=30), other)  # the dead buffer and this: over 3M
        wait_until(lambda: answer.done() or pipe_state(files, other_oid) == "WAITING", message="the next pipe")
        assert not answer.done(), answer.result().text
        assert pipe_state(files, oid) is None  # the dead one's file went
        assert requests.put(relay.url(small_oid), data=small, timeout=30).status_code == 201  # beside the live one
        assert pipe_state(files, other_oid) == "WAITING"  # which is kept
        assert requests.get(relay.url(), timeout=30).json()["pipes_in_progress"] == 1
        receiver = Receiver(relay, other_oid)
        assert answer.result().status_code == 200, answer.result().text
    assert receiver.result().verified(other_oid)


def prometheus_samples(relay) -> dict[str, float]:
    text = requests.get(relay.url() + "?format=prometheus", timeout=30).text
    samples = (line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
    return {name: float(value) for name, value in samples}


def test_metrics_count_the_pipes_in_progress_and_those_delivered(live, files):
    relay = live()
    data, oid = blob(1 << 20)
    samples = prometheus_samples(relay)
    assert samples["file_relay_pipes_active"] == samples["file_relay_pipes_completed_total"] == 0
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        answer = send(pool, pipe_url(relay, oid, wait=30), data)
        wait_until(lambda: pipe_state(files, oid) == "WAITING", message="the pipe")
        assert prometheus_samples(relay)["file_relay_pipes_active"] == 1
        receiver = Receiver(relay, oid)
        assert answer.result().status_code == 200
    assert receiver.result().verified(oid)
    assert requests.put(pipe_url(relay, oid, wait=0.2), data=data, timeout=30).status_code == 504  # not counted
    samples = prometheus_samples(relay)
    assert samples["file_relay_pipes_active"] == 0 and samples["file_relay_pipes_completed_total"] == 1
    assert requests.get(relay.url(), timeout=30).json()["totals"]["pipes_completed"] == 1


# -- workers, crashes, shutdown --------------------------------------------------------


def _socket_inode(local_port: int, remote_port: int) -> str | None:
    """The inode of the relay's end of a loopback TCP connection, from /proc/net/tcp."""
    for line in open("/proc/net/tcp").read().splitlines()[1:]:
        fields = line.split()
        local, remote = fields[1], fields[2]
        if int(local.split(":")[1], 16) == local_port and int(remote.split(":")[1], 16) == remote_port:
            return fields[9]
    return None


def worker_of(relay, client_port: int) -> int | None:
    """The worker serving the connection from *client_port*."""
    inode = _socket_inode(relay.address[1], client_port)
    for pid in relay.worker_pids():
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                    return pid
        except FileNotFoundError:
            continue
    return None


def receivers_on_both_workers(relay, oid: str) -> list:
    """Receivers, added one at a time until both workers serve some."""
    receivers = []
    for _ in range(24):
        receivers.append(Receiver(relay, oid, wait=60))
        waiting_readers(relay, len(receivers))
        workers = {worker_of(relay, receiver.port) for receiver in receivers}
        if len(workers - {None}) == 2:
            return receivers
    raise AssertionError("every receiver went to one worker")


def test_receivers_on_both_workers_all_verify(live, files):
    relay = live("--workers", "2", "--pipe-buffer", "1M")
    data, oid = blob(16 << 20)
    receivers = receivers_on_both_workers(relay, oid)
    answer = requests.put(pipe_url(relay, oid, receivers=len(receivers)), data=data, timeout=120)
    assert answer.status_code == 200, answer.text
    assert answer.headers["X-Pipe-Delivered"] == str(len(receivers))
    assert all(receiver.result().verified(oid) for receiver in receivers)
    assert_nothing_kept(files)


def test_killing_the_senders_worker_cuts_the_receivers_on_the_other(live, files):
    relay = live("--workers", "2", "--pipe-buffer", "1M", "--sweep-interval", "1")
    data, oid = blob(16 << 20)
    receivers = receivers_on_both_workers(relay, oid)
    sock = raw_sender(relay, oid, len(data), f"pipe&receivers={len(receivers)}")
    sock.sendall(data[: 4 << 20])
    wait_until(lambda: all(r.received >= 1 << 20 for r in receivers), message="bytes reaching every receiver")
    sender_worker = worker_of(relay, sock.getsockname()[1])
    os.kill(sender_worker, signal.SIGKILL)
    for receiver in receivers:
        assert receiver.result().ended == "cut" and receiver.received < len(data)
    sock.close()
    wait_until(lambda: pipe_state(files, oid) is None, timeout=20, message="the sweep to remove the pipe's file")
    assert_nothing_kept(files)
    receiver = Receiver(relay, oid)  # the name can be piped again
    waiting_readers(relay, 1)
    assert requests.put(pipe_url(relay, oid), data=data, timeout=60).status_code == 200
    assert receiver.result().verified(oid)


def test_killing_the_senders_worker_before_bytes_flow_is_a_502_for_the_receivers_on_the_other(live, files):
    relay = live("--workers", "2", "--pipe-buffer", "1M", "--sweep-interval", "3600")
    data, oid = blob(1 << 20)
    receivers = receivers_on_both_workers(relay, oid)
    sock = raw_sender(relay, oid, len(data), f"pipe&receivers={len(receivers) + 1}&wait=60")  # one more: it waits
    wait_until(
        lambda: pipe_state(files, oid) == "WAITING" and pipe_slots_taken(files, oid) == len(receivers),
        message="every receiver to join",
    )
    sender_worker = worker_of(relay, sock.getsockname()[1])
    on_it = [receiver for receiver in receivers if worker_of(relay, receiver.port) == sender_worker]
    os.kill(sender_worker, signal.SIGKILL)
    for receiver in receivers:
        receiver.result()
    assert all(receiver.ended == "cut" and receiver.status is None for receiver in on_it)
    told = [receiver for receiver in receivers if receiver not in on_it]
    assert told and all(receiver.status == 502 for receiver in told), [(r.head, r.ended) for r in told]
    assert all(b"the pipe's sender went away before any byte reached this receiver" in r.body for r in told)
    sock.close()


def test_killing_a_receivers_worker_leaves_the_others_to_finish(live, files):
    relay = live("--workers", "2", "--pipe-buffer", "1M")
    data, oid = blob(16 << 20)
    receivers = receivers_on_both_workers(relay, oid)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        body = Paced(data, seconds=3, pieces=48)
        answer = send(pool, pipe_url(relay, oid, receivers=len(receivers)), body)
        wait_until(lambda: all(r.received >= 1 << 20 for r in receivers), message="bytes reaching every receiver")
        sender_worker = worker_of(relay, _sender_port(relay, receivers))
        victim = next(worker_of(relay, r.port) for r in receivers if worker_of(relay, r.port) != sender_worker)
        doomed = [r for r in receivers if worker_of(relay, r.port) == victim]
        os.kill(victim, signal.SIGKILL)
        assert answer.result().status_code == 200, answer.result().text
    survivors = [r for r in receivers if r not in doomed]
    assert answer.result().headers["X-Pipe-Delivered"] == str(len(survivors))
    assert all(r.result().verified(oid) for r in survivors)
    assert all(r.result().ended == "cut" for r in doomed)
    assert_nothing_kept(files)


def _sender_port(relay, receivers) -> int:
    """The client port of the one connection to the relay that is no receiver's."""
    ports = {r.port for r in receivers}
    relay_port = f"{relay.address[1]:04X}"
    for line in open("/proc/net/tcp").read().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "01" and fields[1].endswith(f":{relay_port}"):
            port = int(fields[2].split(":")[1], 16)
            if port not in ports:
                return port
    raise AssertionError("no sender connection")


def test_shutdown_during_a_pipe_lets_it_finish_and_refuses_new_ones(live, files):
    relay = live("--pipe-buffer", "1M")
    data, oid = blob(8 << 20)
    other, other_oid = blob(1 << 20, seed=1)
    receiver = Receiver(relay, oid)
    waiting_readers(relay, 1)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        waiting = send(pool, pipe_url(relay, other_oid, wait=30), other)
        wait_until(lambda: pipe_state(files, other_oid) == "WAITING", message="the waiting pipe")
        body = Paced(data, seconds=2, pieces=32)
        answer = send(pool, pipe_url(relay, oid), body)
        wait_until(lambda: pipe_written(files, oid) > 1 << 20, message="the pipe to flow")
        assert requests.delete(relay.url(), timeout=30).status_code == 200
        assert waiting.result().status_code == 503  # no byte of it had passed: told to retry
        assert answer.result().status_code == 200
    assert receiver.result().verified(oid)
    assert relay.wait_exit(30) == 0
    assert_nothing_kept(files)


# -- the built-in client ---------------------------------------------------------------


def test_send_pipe_and_get(live, tmp_path, files):
    relay = live("--pipe-buffer", "1M")
    data, oid = blob(6 << 20)
    source = tmp_path / "data.bin"
    source.write_bytes(data)
    client = [sys.executable, str(ROOT / "file_relay.py")]
    getter = subprocess.Popen(
        [*client, "get", relay.url(oid), "--wait", "60", "-o", str(tmp_path / "got.bin")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    waiting_readers(relay, 1)
    sender = subprocess.run([*client, "send", "--pipe", relay.url(), str(source)], capture_output=True, text=True)
    assert sender.returncode == 0, sender.stderr
    assert "1 of 1 receivers got every byte" in sender.stderr + sender.stdout
    out, err = getter.communicate(timeout=60)
    assert getter.returncode == 0, err
    assert (tmp_path / "got.bin").read_bytes() == data
    assert_nothing_kept(files)


def test_send_pipe_waits_for_a_slow_receiver_to_drain_the_ring(live, tmp_path, files):
    """The relay answers the sender once its receivers have the last byte: with a slow one,
    well after the sender's last byte and its --timeout."""
    relay = live("--pipe-buffer", "4M")
    data, oid = blob(6 << 20, seed=21)
    source = tmp_path / "data.bin"
    source.write_bytes(data)
    got = []

    def read_slowly():  # 64 KiB every 0.1 s (curl's --limit-rate bursts after a wait)
        with requests.get(relay.url(oid) + "?wait=60", stream=True, timeout=60) as answer:
            for block in answer.iter_content(64 << 10):
                got.append(block)
                time.sleep(0.1)

    receiver = threading.Thread(target=read_slowly)
    receiver.start()
    waiting_readers(relay, 1)
    client = [sys.executable, str(ROOT / "file_relay.py")]
    sender = subprocess.run(
        [*client, "send", "--pipe", "--wait", "2", "--timeout", "2", relay.url(), str(source)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert sender.returncode == 0, sender.stderr
    assert "1 of 1 receivers got every byte" in sender.stderr
    receiver.join(60)
    assert b"".join(got) == data


def test_a_pipe_is_not_deleted_by_delete_nor_started_without_a_name(live, tmp_path, files):
    relay = live()
    data, oid = blob(1 << 20, seed=22)
    sender = subprocess.Popen(
        ["curl", "-sS", "-o", "/dev/null", "-T", "-", relay.url(oid) + "?pipe&wait=30"], stdin=subprocess.PIPE
    )
    wait_until(lambda: requests.head(relay.url(oid), timeout=5).status_code == 200, 30, message="the pipe")
    refused = requests.delete(relay.url(oid), timeout=10)
    assert refused.status_code == 409 and "a pipe of this object is in progress" in refused.text
    sender.kill()
    sender.wait(10)
    unnamed = requests.put(relay.url() + "/new/x.bin?pipe", data=data, timeout=10)
    assert unnamed.status_code == 400 and "a pipe needs the object's name" in unnamed.text
    assert not any(p.is_file() for p in files.iterdir())
    client = [sys.executable, str(ROOT / "file_relay.py")]
    (tmp_path / "x").write_bytes(data)
    alone = subprocess.run(
        [*client, "send", "--receivers", "2", relay.url(), str(tmp_path / "x")], capture_output=True, text=True
    )
    assert alone.returncode == 2 and "--receivers and --wait go with --pipe" in alone.stderr


def test_send_pipe_of_a_stored_file_sends_nothing(live, tmp_path):
    relay = live()
    data, oid = blob(100_000)
    assert requests.put(relay.url(oid), data=data, timeout=30).status_code == 201
    source = tmp_path / "data.bin"
    source.write_bytes(data)
    client = [sys.executable, str(ROOT / "file_relay.py")]
    sender = subprocess.run([*client, "send", "--pipe", relay.url(), str(source)], capture_output=True, text=True)
    assert sender.returncode == 0, sender.stderr
    assert "not piped, the relay has it stored" in sender.stderr
    assert relay.url(oid) in sender.stdout


def test_send_pipe_stopped_while_it_waits_ends_its_pipe(live, tmp_path, files):
    """send --pipe sends its body only once the relay asks for it (100 Continue): a body
    sent at once would fill the connection's buffers, and a sender stopped then would not
    be seen to go, its pipe left in progress (refusing the next sender of the name with
    409, counting against --max-pipes) until --pipe-wait ran out."""
    relay = live()
    data, oid = blob(48 << 20, seed=23)  # more than loopback's socket buffers hold
    source = tmp_path / "data.bin"
    source.write_bytes(data)
    client = [sys.executable, str(ROOT / "file_relay.py")]
    sender = subprocess.Popen(
        [*client, "send", "--pipe", relay.url(), str(source)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        wait_until(lambda: requests.get(relay.url(), timeout=30).json()["pipes_in_progress"] == 1, timeout=60)
        sender.terminate()
        sender.communicate(timeout=30)
        ended = lambda: requests.get(relay.url(), timeout=30).json()["pipes_in_progress"] == 0  # noqa: E731
        wait_until(ended, timeout=10, message="the pipe of a stopped sender to end")
    finally:
        sender.kill()
    assert_nothing_kept(files)


def test_send_pipe_over_https(live, tmp_path, files, certificate):
    cert, key = certificate
    relay = live("--certfile", cert, "--keyfile", key)
    data, oid = blob(3 << 20, seed=29)
    source = tmp_path / "data.bin"
    source.write_bytes(data)
    client = [sys.executable, str(ROOT / "file_relay.py")]
    got = tmp_path / "got.bin"
    getter = subprocess.Popen([*client, "get", relay.url(oid), "--wait", "60", "--cacert", cert, "-o", str(got)])
    waiting = lambda: requests.get(relay.url(), verify=cert, timeout=30).json()["waiting_readers"] == 1  # noqa: E731
    wait_until(waiting, message="the receiver to wait")
    sending = [*client, "send", "--pipe", "--cacert", cert, relay.url(), str(source)]
    sender = subprocess.run(sending, capture_output=True)
    assert sender.returncode == 0, sender.stderr
    assert getter.wait(60) == 0 and got.read_bytes() == data
    assert_nothing_kept(files)


def test_send_pipe_with_no_receiver_fails_clearly(live, tmp_path, files):
    relay = live()
    source = tmp_path / "data.bin"
    source.write_bytes(os.urandom(1000))
    client = [sys.executable, str(ROOT / "file_relay.py")]
    sender = subprocess.run(
        [*client, "send", "--pipe", "--wait", "1", relay.url(), str(source)], capture_output=True, text=True
    )
    assert sender.returncode != 0
    assert "no receiver came" in sender.stderr
    assert_nothing_kept(files)


# -- 4 GiB through a 64 MiB disk ---------------------------------------------------------


def _memory_kib(pids) -> tuple[int, int, int]:
    """KiB resident in the processes *pids*: (all, anonymous, shared memory: the mapped
    ring on a tmpfs)."""
    resident = anonymous = shared = 0
    for pid in pids:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                resident += int(line.split()[1])
            elif line.startswith("RssAnon:"):
                anonymous += int(line.split()[1])
            elif line.startswith("RssShmem:"):
                shared += int(line.split()[1])
    return resident, anonymous, shared


def test_four_gib_through_a_64_mib_files_directory(live, tmp_path, small_filesystem):
    """One sender, three receivers (one throttled): every one verifies, the sender is
    paced by the slowest, and the relay's memory stays flat. Prints its figures."""
    files = small_filesystem("64M")
    relay = live("--pipe-buffer", "16M", "--workers", "1", files_dir=files)
    size = 4 << 30
    block = os.urandom(1 << 20)
    digest = hashlib.sha256()
    for _ in range(size >> 20):
        digest.update(block)
    oid = digest.hexdigest()
    fast = [curl_receiver(relay.url(oid) + "?wait=60", os.devnull) for _ in range(2)]
    slow = curl_receiver(relay.url(oid) + "?wait=60", os.devnull, "--limit-rate", "150M")
    waiting_readers(relay, 3)
    pids = [relay.process.pid, *relay.worker_pids()]
    rss = []

    class Body:  # a length, so requests sends Content-Length
        def __len__(self):
            return size

        def __iter__(self):
            for n in range(size >> 20):
                if n % 256 == 0:
                    rss.append(_memory_kib(pids))
                yield block

    started = time.monotonic()
    answer = requests.put(pipe_url(relay, oid, receivers=3), data=Body(), timeout=600)
    took = time.monotonic() - started
    assert answer.status_code == 200, answer.text
    assert answer.headers["X-Pipe-Delivered"] == "3"
    for process in [*fast, slow]:
        out, err = process.communicate(timeout=60)
        assert process.returncode == 0 and out == f"200 {size}", err
    assert took > size / (150 << 20) * 0.9  # paced by the throttled receiver
    flowing = [anonymous for _, anonymous, _ in rss[2:]]  # once the first 512 MiB have passed
    assert max(flowing) - min(flowing) < 8 << 10, rss  # flat: no growth with the bytes passed
    resident = [resident for resident, _, _ in rss]
    shared = max(shared for _, _, shared in rss)
    print(
        f"4 GiB pipe, 3 receivers (one at 150 MiB/s): {took:.1f} s ({size / took / (1 << 20):.0f} MiB/s);"
        f" relay (master and worker) RSS {resident[0] >> 10} MiB before, {min(resident[2:]) >> 10}"
        f"..{max(resident) >> 10} MiB while bytes passed: anonymous {min(flowing) >> 10}..{max(flowing) >> 10} MiB,"
        f" shared memory (the ring) {shared >> 10} MiB"
    )
    assert list((files / ".relay" / "pipes").iterdir()) == []


def test_a_receiver_joining_a_sender_that_has_waited_long_gets_bytes_at_once(live, files):
    """A sender's looks for its receivers grow a quarter of a second apart; a receiver
    that joins (in either worker) has it look again at once."""
    relay = live()
    for round in range(6):
        data, oid = blob(1 << 20, seed=round)
        sender = raw_sender(relay, oid, len(data))
        sender.sendall(data)
        wait_until(lambda oid=oid: pipe_state(files, oid) == "WAITING", message="the pipe to wait")
        time.sleep(1)  # the scenario itself: a sender that has waited long, its looks far apart
        receiver = socket.create_connection(relay.address, timeout=30)
        started = time.monotonic()
        receiver.sendall(f"GET /{SERVER_ID}/{oid} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        first = receiver.recv(1)
        began = time.monotonic() - started
        assert first == b"H"
        assert began < 0.12, f"round {round}: the receiver's answer began {began:.3f} s after it joined"
        received = first
        while chunk := receiver.recv(1 << 20):
            received += chunk
        assert received.startswith(b"HTTP/1.1 200") and received.endswith(data)
        assert answer_of(sender).startswith(b"HTTP/1.1 200")
        receiver.close()
