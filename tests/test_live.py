"""A real relay process: shutdown, concurrency, long and slow transfers, crashes, early
rejects. What only a live gunicorn shows."""

import concurrent.futures
import contextlib
import os
import random
import re
import signal
import socket
import time

import pytest
import requests
from conftest import (
    SERVER_ID,
    blob,
    host_and_port,
    raw_request,
    sha256,
    trickle_until_cut_off,
    unsized,
    wait_until,
)


def test_upload_download_and_shutdown_exits_zero(live, http, files):
    relay = live()
    data, oid = blob(3 << 20)
    assert http.put(relay.url(oid), data=data).status_code == 201
    response = http.get(relay.url(oid))
    assert response.content == data and response.headers["Content-Length"] == str(len(data))
    assert http.delete(relay.url()).status_code == 200
    assert relay.wait_exit(20) == 0
    assert (files / oid).read_bytes() == data


def test_a_generated_server_id_is_printed_once_and_never_logged(live, http):
    relay = live(server_id=None)
    url = wait_until(lambda: relay.output().strip(), message="the URL on stdout")
    assert len(url.splitlines()) == 1
    server_id = url.rsplit("/", 1)[1]
    assert len(server_id) >= 22 and re.fullmatch(r"[A-Za-z0-9_-]+", server_id)  # >= 128 bits
    port = relay.address[1]
    assert http.get(f"http://127.0.0.1:{port}/{server_id}").status_code == 200
    assert server_id not in relay.log()


def test_a_given_server_id_is_printed_nowhere(live, http):
    relay = live()
    assert http.get(relay.url()).status_code == 200
    relay.signal(signal.SIGTERM)
    assert relay.wait_exit(20) == 0
    assert relay.output() == ""  # stdout may be a log too (podman logs, the journal)
    assert SERVER_ID not in relay.log()


def test_chunked_request_bodies_are_stored(live, http):
    relay = live()
    data, oid = blob(5 << 20)
    pieces = (data[i : i + 65536] for i in range(0, len(data), 65536))  # no Content-Length
    assert http.put(relay.url(oid), data=pieces).status_code == 201
    assert http.get(relay.url(oid)).content == data


def test_concurrent_clients_each_get_their_own_file(live):
    relay = live("--workers", "2")
    blobs = [blob(2 << 20, seed=i) for i in range(12)]

    def round_trip(item):
        data, oid = item
        with requests.Session() as session:
            assert session.put(relay.url(oid), data=data).status_code == 201
            return sha256(session.get(relay.url(oid)).content) == oid

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        assert all(pool.map(round_trip, blobs))


def test_a_transfer_longer_than_the_worker_timeout_completes_and_does_not_block_others(live, http):
    relay = live("--worker-timeout", "2", "--workers", "1")
    data, oid = blob(1 << 20)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        started = time.monotonic()
        upload = pool.submit(requests.put, relay.url(oid), data=unsized(data, 5, pieces=20))
        other, other_oid = blob(1000, seed=1)
        wait_until(lambda: http.get(relay.url()).json()["uploads_in_progress"] == 1, message="the slow upload")
        assert http.put(relay.url(other_oid), data=other).status_code == 201
        assert http.get(relay.url()).status_code == 200
        assert not upload.done()  # the others were answered while the slow upload went on
        assert upload.result(30).status_code == 201
        assert time.monotonic() - started > 4
    assert http.get(relay.url(oid)).content == data
    assert "WORKER TIMEOUT" not in relay.log()


def test_kill_9_mid_upload_leaves_no_bad_file_and_a_restart_cleans_up(live, http, files):
    relay = live()
    data, oid = blob(4 << 20)
    head = f"PUT /{SERVER_ID}/{oid} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\n\r\n".encode()
    sock = socket.create_connection(relay.address, timeout=10)
    sock.sendall(head + data[: 2 << 20])
    partial = files / ".relay" / "partial" / oid / "data"
    wait_until(lambda: partial.exists() and partial.stat().st_size >= 2 << 20, message="the partial upload")
    relay.kill()
    sock.close()
    assert not (files / oid).exists()
    restarted = live()
    assert not (files / ".relay" / "partial" / oid).exists()  # a plain upload's leftover is removed
    assert http.get(restarted.url(oid)).status_code == 404
    assert http.put(restarted.url(oid), data=data).status_code == 201
    assert (files / oid).read_bytes() == data


def test_a_body_shorter_than_its_content_length_is_400(live, files):
    relay = live()
    data, oid = blob(1000)
    head = f"PUT /{SERVER_ID}/{oid} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n".encode()
    host, port = relay.address
    sock = socket.create_connection((host, port), timeout=10)
    sock.sendall(head + data[:500])
    sock.shutdown(socket.SHUT_WR)
    answer = sock.makefile("rb").read()
    assert answer.startswith(b"HTTP/1.1 400")
    assert b"after 500 bytes" in answer
    assert not (files / oid).exists()


def test_a_client_that_stops_sending_its_body_gets_408_after_the_idle_timeout(live, files):
    relay = live("--idle-timeout", "1")
    data, oid = blob(1000)
    for framing in ("Content-Length: 1000", "Transfer-Encoding: chunked"):
        head = f"PUT /{SERVER_ID}/{oid} HTTP/1.1\r\nHost: x\r\n{framing}\r\n\r\n".encode()
        piece = data[:500] if framing.startswith("Content") else b"1f4\r\n" + data[:500] + b"\r\n"
        answer, sock = raw_request(relay.base, head, piece)  # then silence, the connection left open
        with sock:
            answer += sock.makefile("rb").read()
        assert answer.startswith(b"HTTP/1.1 408"), (framing, answer)
        assert b"idle timeout" in answer
    assert not (files / oid).exists()


def test_an_early_reject_answers_at_once_and_closes_without_draining(live):
    relay = live()
    _, oid = blob(10)
    huge = 100 << 30  # announced, never sent
    for path in (f"/wrong-id/{oid}", f"/{SERVER_ID}/not-a-hash"):
        head = f"PUT {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {huge}\r\n\r\n".encode()
        started = time.monotonic()
        answer, sock = raw_request(relay.base, head, b"x" * 1000)
        assert answer.split(b"\r\n")[0] in (b"HTTP/1.1 403 Forbidden", b"HTTP/1.1 400 Bad Request")
        assert b"Connection: close" in answer
        # The relay closes the connection rather than reading 100 GiB.
        sock.settimeout(10)
        while sock.recv(65536):
            pass
        assert time.monotonic() - started < 5
        sock.close()


def test_requests_sending_a_big_body_to_a_refused_upload_sees_the_status(live):
    """requests writes the whole body before reading: it must still get the status."""
    relay = live("--max-file-size", "1M")
    data, oid = blob(64 << 20)
    assert requests.put(relay.url(oid, server_id="wrong"), data=data).status_code == 403
    assert requests.put(relay.url(oid), data=data).status_code == 413


def test_the_server_id_never_reaches_the_log(live, http):
    relay = live("--log-level", "debug")
    data, oid = blob(1000)
    http.put(relay.url(oid), data=data)
    http.get(relay.url(oid))
    http.get(relay.url(oid, server_id=SERVER_ID + "x"))
    http.get(f"{relay.base}/wrong/{SERVER_ID}")
    http.put(relay.url("f" * 64), data=b"bad")
    raw_request(relay.base, f"GET /{SERVER_ID} HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n".encode())
    http.get(relay.url())
    assert relay.log().count('"PUT /***/') == 2
    assert SERVER_ID not in relay.log()


def test_sigterm_exits_zero(live, http):
    relay = live()
    assert http.get(relay.url()).status_code == 200
    relay.signal(signal.SIGTERM)
    assert relay.wait_exit(20) == 0


def test_several_workers_share_one_directory(live, files):
    relay = live("--workers", "4")
    blobs = [blob(100_000, seed=i) for i in range(20)]
    with requests.Session() as session:
        for data, oid in blobs:
            assert session.put(relay.url(oid), data=data).status_code == 201
    for data, oid in blobs:  # new connections land on any worker
        assert requests.get(relay.url(oid)).content == data
        assert requests.put(relay.url(oid), data=data).status_code == 200
    wait_until(lambda: len(relay.worker_pids()) == 4, message="four workers")
    assert sorted(os.listdir(files)) == sorted([oid for _, oid in blobs] + [".relay"])


def test_requests_pipelined_after_an_upload_body_are_answered(live):
    """The upload body is read straight from the socket: the next request on the same
    connection must still be framed right."""
    relay = live()
    data, oid = blob(3 << 20)
    put = f"PUT /{SERVER_ID}/{oid} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\n\r\n".encode()
    get = f"GET /{SERVER_ID}/{oid} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
    host, port = relay.address
    with socket.create_connection((host, port), timeout=20) as sock:
        sock.sendall(put + data + get)
        answer = sock.makefile("rb").read()
    first, _, rest = answer.partition(b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 201")
    second = rest[rest.index(b"HTTP/1.1 ") :]
    assert second.startswith(b"HTTP/1.1 200")
    assert second.endswith(data)


def test_a_body_arriving_in_bursts_after_its_headers_is_stored_whole(live, files):
    """Headers with a few body bytes, then a pause, then the rest: what gunicorn buffered
    around the headers and what comes later must join up exactly."""
    relay = live()
    data, oid = blob(3 << 20)
    head = f"PUT /{SERVER_ID}/{oid} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\n\r\n".encode()
    host, port = relay.address
    with socket.create_connection((host, port), timeout=20) as sock:
        for piece in (head + data[:1000], data[1000:1500], data[1500:200_000], data[200_000:]):
            sock.sendall(piece)
            time.sleep(0.2)
        assert sock.recv(100).startswith(b"HTTP/1.1 201")
    assert (files / oid).read_bytes() == data


def sockets_held(relay) -> int:
    """Sockets open in the relay's workers: one per connection they have accepted."""
    held = 0
    for pid in relay.worker_pids():
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(FileNotFoundError):  # closed since it was listed
                held += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
    return held


def test_slowloris_connections_do_not_stop_a_real_client(live):
    """100 idle and 100 trickling connections: a real client still uploads and downloads,
    and a client trickling its headers is cut off once the header deadline passes."""
    relay = live()
    wait_until(lambda: len(relay.worker_pids()) == 2, message="the workers")
    before = sockets_held(relay)
    host, port = relay.address
    idle = [socket.create_connection((host, port)) for _ in range(100)]
    trickling = [socket.create_connection((host, port)) for _ in range(100)]
    for sock in trickling:
        sock.sendall(f"PUT /{SERVER_ID}/{'a' * 64} HTTP/1.1\r\n".encode())
    stop = time.monotonic() + 30
    cut_off = set()

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        trickler = pool.submit(trickle_until_cut_off, trickling, stop, cut_off)
        wait_until(lambda: sockets_held(relay) >= before + 200, message="the workers to hold all 200 connections")
        data, oid = blob(4 << 20)
        started = time.monotonic()
        with requests.Session() as session:
            assert session.put(relay.url(oid), data=data, timeout=20).status_code == 201
            assert session.get(relay.url(oid), timeout=20).content == data
        assert time.monotonic() - started < 10
        while len(cut_off) < 10 and time.monotonic() < stop:  # the cut-offs have begun
            time.sleep(0.1)
        started = time.monotonic()
        assert requests.get(relay.url(oid), timeout=20).content == data
        assert time.monotonic() - started < 5
        trickler.result()
    assert len(cut_off) == len(trickling)  # the header deadline cut every trickler off
    assert time.monotonic() < stop
    for sock in idle + trickling:
        sock.close()


def test_the_printed_url_of_a_relay_on_all_interfaces_names_a_reachable_host(live, http):
    """The URL is for the other machine: when this one has an address other than loopback,
    the URL must not name loopback."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("192.0.2.1", 9))
        routed = not probe.getsockname()[0].startswith("127.")
    except OSError:
        routed = False
    finally:
        probe.close()
    relay = live(server_id=None, bind="0.0.0.0:0")
    url = wait_until(lambda: relay.output().strip(), message="the URL on stdout")
    host = host_and_port(url)[0]
    assert http.get(f"{relay.base}/{url.rsplit('/', 1)[1]}").status_code == 200
    if not routed:
        pytest.skip("this machine has no address but loopback: the URL's host cannot be told from it")
    assert not socket.gethostbyname(host).startswith("127."), url


def test_sigterm_while_the_workers_boot_still_exits_at_once(live, http):
    """A SIGTERM reaching a worker between its fork and its own signal handlers was lost,
    and the relay then took the whole graceful timeout (30 s) to exit: about once in 30
    tries at random moments of the boot. 15 tries; then a booted worker must not be left
    with its signals blocked."""
    rng = random.Random(8)
    for attempt in range(15):
        relay = live("--workers", "2", name=f"boot{attempt}")
        time.sleep(rng.random() * 0.15)  # somewhere in the workers' boot, which is spread over 0.1 s
        relay.signal(signal.SIGTERM)
        assert relay.wait_exit(10) == 0
    relay = live("--workers", "2")
    pids = wait_until(lambda: len(p := re.findall(r"Booting worker with pid: (\d+)", relay.log())) == 2 and p)
    assert http.get(relay.url()).status_code == 200

    def unblocked(pid: int) -> bool:  # once booted (it may still be booting when logged)
        blocked = int(re.search(r"^SigBlk:\s*([0-9a-f]+)", open(f"/proc/{pid}/status").read(), re.M).group(1), 16)
        return not blocked & (1 << (signal.SIGTERM - 1) | 1 << (signal.SIGQUIT - 1))

    for pid in pids:
        wait_until(lambda pid=pid: unblocked(pid), message=f"worker {pid} to unblock its signals")


def test_100_continue_is_sent_only_once_the_body_is_wanted(live, files):
    """curl sends `Expect: 100-continue` and waits (up to 1 s) before sending a body. A
    refusal must come instead of "100 Continue", or curl has begun sending and can lose
    it when the relay closes the connection; an accepted upload gets it at once."""
    relay = live("--max-file-size", "1M")
    host, port = relay.address
    data, oid = blob(512 << 10)
    too_large, too_large_oid = blob(2 << 20, seed=1)

    def put_head(object_id: str, length: int) -> socket.socket:
        sock = socket.create_connection((host, port), timeout=10)
        head = f"PUT /{SERVER_ID}/{object_id} HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n"
        sock.sendall(f"{head}Expect: 100-continue\r\n\r\n".encode())
        return sock

    with put_head(too_large_oid, len(too_large)) as sock:
        answer = b""
        while chunk := sock.recv(65536):  # the relay closes: no body is coming
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 413 ") and b"100 Continue" not in answer

    with put_head(oid, len(data)) as sock:
        assert sock.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(data)
        assert sock.recv(100).startswith(b"HTTP/1.1 201 ")
    assert (files / oid).read_bytes() == data
    assert not (files / too_large_oid).exists()
