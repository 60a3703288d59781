"""Streaming relay: downloads that follow an upload in progress, and downloads that wait
for an upload to start. Live relays, real curl where the client's view matters."""

import concurrent.futures
import hashlib
import os
import socket
import ssl
import subprocess
import threading
import time

import pytest
import requests
from conftest import SERVER_ID, Paced, blob, sha256, wait_until


def start_upload(pool, url: str, body) -> concurrent.futures.Future:
    return pool.submit(lambda: requests.put(url, data=body, timeout=60))


def curl_download(url: str, path, *extra) -> subprocess.Popen:
    return subprocess.Popen(
        ["curl", "-sS", "-o", str(path), "-w", "%{http_code} %{size_download}", *extra, url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_readers_started_before_and_during_an_upload_get_the_exact_bytes(live, tmp_path):
    relay = live()
    data, oid = blob(8 << 20)
    early = curl_download(relay.url(oid), tmp_path / "early")  # waits for the upload to start
    wait_until(lambda: requests.get(relay.url()).json()["waiting_readers"] == 1, message="the reader to wait")
    body = Paced(data, seconds=3, pieces=40)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        upload = start_upload(pool, relay.url(oid), body)
        wait_until(lambda: body.sent > len(data) // 3, message="a third of the upload")
        late = curl_download(relay.url(oid), tmp_path / "late")
        assert upload.result().status_code == 201
    for reader, name in ((early, "early"), (late, "late")):
        out, err = reader.communicate(timeout=30)
        finished = time.monotonic()
        assert reader.returncode == 0, err
        assert out == f"200 {len(data)}"
        assert sha256((tmp_path / name).read_bytes()) == oid
    assert finished - body.finished_at < 5  # the readers finished with the upload, not long after


def test_a_reader_of_an_upload_that_fails_verification_is_cut_off(live, tmp_path, files):
    relay = live()
    data, oid = blob(4 << 20)
    tampered = data[:-1] + bytes([data[-1] ^ 1])  # only the very last byte differs
    reader = None
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        body = Paced(tampered, seconds=2, pieces=40)
        upload = start_upload(pool, relay.url(oid), body)
        wait_until(lambda: body.sent > 0, message="the upload to start")
        reader = curl_download(relay.url(oid), tmp_path / "cut")
        assert upload.result().status_code == 400
    out, err = reader.communicate(timeout=30)
    assert reader.returncode != 0  # curl reports the transfer as failed
    assert (tmp_path / "cut").stat().st_size < len(data)
    assert not (files / oid).exists()


def test_a_reader_of_an_upload_whose_client_disconnects_is_cut_off(live, tmp_path):
    relay = live()
    data, oid = blob(4 << 20)
    host, port = relay.address
    sock = socket.create_connection((host, port))
    sock.sendall(f"PUT /{SERVER_ID}/{oid} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\n\r\n".encode())
    sock.sendall(data[: 1 << 20])
    partial = relay.files / ".relay" / "partial" / oid / "data"
    wait_until(lambda: partial.exists() and partial.stat().st_size == 1 << 20, message="the first MiB")
    reader = curl_download(relay.url(oid), tmp_path / "cut")
    wait_until(lambda: (tmp_path / "cut").exists() and (tmp_path / "cut").stat().st_size > 0, message="reader bytes")
    sock.close()
    out, err = reader.communicate(timeout=30)
    assert reader.returncode == 18, err  # CURLE_PARTIAL_FILE
    assert (tmp_path / "cut").stat().st_size == 1 << 20


def test_a_stalled_upload_cuts_its_readers_after_the_idle_timeout(live, tmp_path):
    relay = live("--idle-timeout", "1")
    data, oid = blob(1 << 20)
    host, port = relay.address
    sock = socket.create_connection((host, port))
    sock.sendall(f"PUT /{SERVER_ID}/{oid} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\n\r\n".encode())
    sock.sendall(data[:200_000])  # then silence, the connection left open
    reader = curl_download(relay.url(oid), tmp_path / "cut")
    out, err = reader.communicate(timeout=30)
    assert reader.returncode == 18, err  # CURLE_PARTIAL_FILE
    assert 0 < (tmp_path / "cut").stat().st_size < len(data)
    sock.close()


def test_a_slow_upload_reaches_its_readers_as_it_comes(live):
    relay = live("--idle-timeout", "5")
    data, oid = blob(300_000)
    body = Paced(data, seconds=6, pieces=60)  # 50 KB/s: a MiB would take 20 s
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        upload = start_upload(pool, relay.url(oid), body)
        wait_until(lambda: body.sent > 0, message="the upload to start")
        with requests.get(relay.url(oid), stream=True, timeout=30) as response:
            first = response.raw.read(100_000)
            assert body.sent < 250_000  # the first bytes came long before the end of the upload
            rest = response.raw.read()
        assert upload.result().status_code == 201
    assert first + rest == data


def test_an_upload_of_unknown_length_is_followed_with_chunked_transfer(live, tmp_path):
    relay = live()
    data, oid = blob(3 << 20)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        body = Paced(data, seconds=2, pieces=40)
        upload = start_upload(pool, relay.url(oid), iter(body))  # a generator: no Content-Length
        wait_until(lambda: body.sent > 0, message="the upload to start")
        with requests.get(relay.url(oid), stream=True, timeout=30) as response:
            assert response.headers.get("Transfer-Encoding") == "chunked"
            received = response.raw.read()
        assert upload.result().status_code == 201
    assert sha256(received) == oid


def test_readers_in_other_workers_follow_the_upload(live):
    relay = live("--workers", "4")
    data, oid = blob(6 << 20)
    body = Paced(data, seconds=3, pieces=40)

    def read():
        with requests.Session() as session:  # a connection each: they land on several workers
            return hashlib.sha256(session.get(relay.url(oid), timeout=60).content).hexdigest()

    with concurrent.futures.ThreadPoolExecutor(9) as pool:
        readers = [pool.submit(read) for _ in range(8)]
        wait_until(lambda: requests.get(relay.url()).json()["waiting_readers"] == 8, message="the readers to wait")
        upload = start_upload(pool, relay.url(oid), body)
        assert upload.result().status_code == 201
        assert [reader.result() for reader in readers] == [oid] * 8


def test_head_during_an_upload_marks_it_incomplete(live, http):
    relay = live()
    data, oid = blob(4 << 20)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        body = Paced(data, seconds=2, pieces=40)
        upload = start_upload(pool, relay.url(oid), body)
        wait_until(lambda: body.sent > len(data) // 4, message="a quarter of the upload")
        started = time.monotonic()
        head = http.head(relay.url(oid))
        assert time.monotonic() - started < 1  # HEAD never waits
        assert head.status_code == 200
        assert head.headers["Content-Length"] == str(len(data))
        assert head.headers["Upload-Incomplete"] == "?1"
        assert 0 < int(head.headers["Upload-Offset"]) < len(data)
        assert "ETag" not in head.headers
        assert upload.result().status_code == 201
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        other, other_oid = blob(2 << 20, seed=1)
        body = Paced(other, seconds=2, pieces=40)
        upload = pool.submit(requests.put, relay.url(other_oid), data=iter(body))  # no length
        wait_until(lambda: body.sent > 0, message="the upload to start")
        head = http.head(relay.url(other_oid))
        assert head.headers["Upload-Incomplete"] == "?1" and "Content-Length" not in head.headers
        assert upload.result().status_code == 201
    stored = http.head(relay.url(oid))
    assert stored.headers["ETag"] == f'"{oid}"' and "Upload-Offset" not in stored.headers


def test_wait_parameter_and_timeout(live, http):
    relay = live("--get-wait-timeout", "1")
    data, oid = blob(1000)
    started = time.monotonic()
    assert http.get(relay.url(oid)).status_code == 404
    assert 1 <= time.monotonic() - started < 5
    started = time.monotonic()
    assert http.get(relay.url(oid) + "?wait=0").status_code == 404
    assert time.monotonic() - started < 1
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(http.get, relay.url(oid) + "?wait=20")
        time.sleep(1.5)  # longer than the default wait: ?wait is what keeps it waiting
        assert requests.put(relay.url(oid), data=data).status_code == 201
        assert waiting.result(30).content == data
    assert http.head(relay.url("0" * 64)).status_code == 404  # HEAD never waits


def test_a_missing_object_is_404_after_a_short_wait_by_default(live, http):
    relay = live()
    started = time.monotonic()
    assert http.get(relay.url("2" * 64)).status_code == 404
    assert 4 <= time.monotonic() - started < 8


def test_prefer_wait_is_honoured_and_said_so(live, http):
    relay = live("--get-wait-timeout", "0", "--max-get-wait", "2")
    data, oid = blob(1000)
    started = time.monotonic()
    response = http.get(relay.url(oid), headers={"Prefer": "respond-async, wait=1"})
    assert response.status_code == 404 and response.headers["Preference-Applied"] == "wait=1"
    assert 1 <= time.monotonic() - started < 5
    capped = http.get(relay.url(oid), headers={"Prefer": "wait=3600"})
    assert capped.status_code == 404 and capped.headers["Preference-Applied"] == "wait=2"
    started = time.monotonic()
    overridden = http.get(relay.url(oid) + "?wait=0", headers={"Prefer": "wait=10"})
    assert overridden.status_code == 404 and "Preference-Applied" not in overridden.headers
    assert time.monotonic() - started < 1
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(http.get, relay.url(oid), headers={"Prefer": "wait=2"})
        wait_until(lambda: requests.get(relay.url()).json()["waiting_readers"] == 1, message="the reader to wait")
        assert requests.put(relay.url(oid), data=data).status_code == 201
        response = waiting.result(30)
    assert response.content == data and response.headers["Preference-Applied"] == "wait=2"


def test_the_wait_is_bounded_by_the_server_maximum(live, http):
    relay = live("--max-get-wait", "1", "--get-wait-timeout", "0")
    started = time.monotonic()
    assert http.get(relay.url("1" * 64) + "?wait=3600").status_code == 404
    assert time.monotonic() - started < 5


def test_dozens_of_waiting_readers_leave_the_relay_responsive(live):
    relay = live("--threads", "64", "--get-wait-timeout", "60")
    awaited, awaited_oid = blob(100_000)
    other, other_oid = blob(50_000, seed=1)
    with concurrent.futures.ThreadPoolExecutor(40) as pool:
        readers = [pool.submit(requests.get, relay.url(awaited_oid), timeout=90) for _ in range(30)]
        wait_until(lambda: requests.get(relay.url()).json()["waiting_readers"] == 30, message="30 waiting readers")
        started = time.monotonic()
        assert requests.put(relay.url(other_oid), data=other, timeout=10).status_code == 201
        assert requests.get(relay.url(other_oid), timeout=10).content == other
        assert requests.get(relay.url(), timeout=10).status_code == 200
        assert time.monotonic() - started < 5
        assert requests.put(relay.url(awaited_oid), data=awaited, timeout=10).status_code == 201
        assert all(reader.result().content == awaited for reader in readers)


def test_readers_beyond_the_waiting_limit_are_told_to_retry(live):
    relay = live("--workers", "1", "--threads", "8", "--get-wait-timeout", "30")  # at most 4 may wait (per worker)
    _, oid = blob(10)
    stop = threading.Event()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        for _ in range(4):
            pool.submit(requests.get, relay.url(oid), timeout=60)
        wait_until(lambda: requests.get(relay.url()).json()["waiting_readers"] == 4, message="4 waiting readers")
        refused = requests.get(relay.url(oid), timeout=10)
        assert refused.status_code == 503 and refused.headers["Retry-After"]
        assert requests.get(relay.url(), timeout=10).status_code == 200
        stop.set()
        requests.put(relay.url(oid), data=blob(10)[0])


@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
def test_readers_that_hang_up_while_waiting_give_their_places_back_at_once(live, request, tls):
    """Four readers take every waiting place of the worker with ?wait=600, then close their
    connections: their places (and threads) are free again within seconds, not after the
    ten minutes they asked to wait, and the next reader waits instead of getting 503."""
    options, verify = ["--workers", "1", "--threads", "8"], True  # at most 4 may wait
    if tls:
        cert, key = request.getfixturevalue("certificate")
        options, verify = [*options, "--certfile", cert, "--keyfile", key], cert
    relay = live(*options)
    host, port = relay.address

    def waiting_readers() -> int:
        return requests.get(relay.url(), verify=verify, timeout=10).json()["waiting_readers"]

    readers = []
    for seed in range(4):
        sock = socket.create_connection((host, port), timeout=10)
        if tls:
            sock = ssl.create_default_context(cafile=cert).wrap_socket(sock, server_hostname="localhost")
        sock.sendall(f"GET /{SERVER_ID}/{blob(10, seed)[1]}?wait=600 HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        readers.append(sock)
    wait_until(lambda: waiting_readers() == 4, message="4 waiting readers")
    for sock in readers:
        sock.close()
    hung_up = time.monotonic()
    wait_until(lambda: waiting_readers() == 0, timeout=30, message="the waiting places to be given back")
    assert time.monotonic() - hung_up < 5
    started = time.monotonic()
    response = requests.get(relay.url(blob(10, 99)[1]) + "?wait=2", verify=verify, timeout=30)
    assert response.status_code == 404 and time.monotonic() - started >= 2  # it waited: no 503


def test_a_range_request_can_resume_following_an_upload(live):
    relay = live()
    data, oid = blob(4 << 20)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        body = Paced(data, seconds=2, pieces=40)
        upload = start_upload(pool, relay.url(oid), body)
        wait_until(lambda: body.sent > 0, message="the upload to start")
        response = requests.get(relay.url(oid), headers={"Range": "bytes=1000-"}, timeout=30)
        assert upload.result().status_code == 201
    assert response.status_code == 206
    assert response.headers["Content-Range"] == f"bytes 1000-{len(data) - 1}/{len(data)}"
    assert response.content == data[1000:]


def test_a_follower_waits_for_a_slow_chunk_and_for_the_final_verification(live, tmp_path):
    """While a request writes to the upload (a chunk slower than the idle timeout, then the
    verification of the whole object), its readers keep waiting."""
    relay = live("--idle-timeout", "2")
    data, oid = blob(600_000)
    headers = {"Content-Range": f"bytes 0-{len(data) - 1}/{len(data)}"}
    body = Paced(data, seconds=5, pieces=50)  # one chunk, 5 s: longer than the idle timeout
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        upload = pool.submit(requests.put, relay.url(oid), data=body, headers=headers, timeout=60)
        wait_until(lambda: body.sent > 0, message="the chunk to start")
        reader = curl_download(relay.url(oid), tmp_path / "followed")
        assert upload.result().status_code == 201
    out, err = reader.communicate(timeout=30)
    assert reader.returncode == 0, err
    assert sha256((tmp_path / "followed").read_bytes()) == oid


def test_a_range_beyond_an_upload_in_progress_is_416_with_its_length(live, http):
    relay = live()
    data, oid = blob(3000)
    http.put(relay.url(oid), data=data[:1000], headers={"Content-Range": "bytes 0-999/3000"})
    response = http.get(relay.url(oid), headers={"Range": "bytes=5000-"})
    assert response.status_code == 416 and response.headers["Content-Range"] == "bytes */3000"


def test_a_reader_of_a_stalled_chunked_upload_that_hangs_up_is_let_go_at_once(live):
    """Between the chunks of an upload nothing is written to the reader, so its hang-up
    shows only when the relay looks for it: it must give the thread back then, not after
    the idle timeout (here 60 s) when the upload is taken for stalled."""
    relay = live("--workers", "1", "--idle-timeout", "60")
    data, oid = blob(2 << 20)
    half = len(data) // 2
    headers = {"Content-Range": f"bytes 0-{half - 1}/{len(data)}"}
    assert requests.put(relay.url(oid), data=data[:half], headers=headers).status_code == 202
    host, port = relay.address
    with socket.create_connection((host, port), timeout=10) as reader:
        reader.sendall(f"GET /{SERVER_ID}/{oid} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        received = b""
        while len(received) < half:  # the bytes there are, then it waits for the next chunk
            received += reader.recv(1 << 20)
        wait_until(lambda: requests.get(relay.url()).json()["downloads_in_progress"] == 1, message="the follower")
    wait_until(
        lambda: requests.get(relay.url()).json()["downloads_in_progress"] == 0,
        timeout=10,
        message="the follower to notice its reader hung up",
    )
    assert "the reader hung up" in relay.log()


def test_a_closed_range_of_an_upload_in_progress_is_served_exactly(live, tmp_path):
    """A range that ends before the upload does is sent as soon as its bytes are there, with
    its own Content-Range; one that reaches the last byte waits for the verification."""
    relay = live()
    data, oid = blob(4 << 20)
    size = len(data)
    body = Paced(data, seconds=4, pieces=40)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        upload = start_upload(pool, relay.url(oid), body)
        wait_until(lambda: body.sent > 0, message="the upload to start")
        first = requests.get(relay.url(oid), headers={"Range": "bytes=0-99"}, timeout=30)
        assert not upload.done()  # answered while the upload goes on
        assert first.status_code == 206
        assert first.headers["Content-Range"] == f"bytes 0-99/{size}" and first.content == data[:100]
        middle = requests.get(relay.url(oid), headers={"Range": "bytes=1000000-2999999"}, timeout=30)
        assert middle.headers["Content-Range"] == f"bytes 1000000-2999999/{size}"
        assert middle.content == data[1000000:3000000]
        curl = curl_download(relay.url(oid), tmp_path / "first100", "-r", "0-99")
        out, err = curl.communicate(timeout=30)
        assert curl.returncode == 0 and out == "206 100", err
        tail = requests.get(relay.url(oid), headers={"Range": f"bytes={size - 10}-{size + 10}"}, timeout=30)
        assert upload.result().status_code == 201
    assert tail.headers["Content-Range"] == f"bytes {size - 10}-{size - 1}/{size}" and tail.content == data[-10:]


def test_a_closed_range_of_an_upload_of_unknown_length_is_served_exactly(live):
    """Without a Content-Length the object's length is not known yet, but a closed range
    has its own: 206 with 'bytes A-B/*', not the whole upload as a 200. A range past the
    object's end, once known, is cut off rather than ended as if complete."""
    relay = live()
    data, oid = blob(3 << 20)
    sock = start_unsized_upload(relay, oid, data[: 1 << 20])
    try:
        first = requests.get(relay.url(oid), headers={"Range": "bytes=0-99"}, timeout=30)
        assert first.status_code == 206 and first.headers["Content-Range"] == "bytes 0-99/*"
        assert first.content == data[:100]
        with requests.get(relay.url(oid), headers={"Range": f"bytes=0-{len(data)}"}, stream=True, timeout=30) as past:
            assert past.status_code == 206 and past.headers["Content-Length"] == str(len(data) + 1)
            rest = data[1 << 20 :]
            sock.sendall(b"%x\r\n%s\r\n0\r\n\r\n" % (len(rest), rest))
            with pytest.raises(requests.exceptions.ChunkedEncodingError):
                b"".join(past.iter_content(1 << 16))
        assert sock.recv(100).startswith(b"HTTP/1.1 201")
    finally:
        sock.close()


def test_get_and_head_of_an_upload_in_progress_send_the_same_headers(live, http):
    relay = live()
    data, oid = blob(4 << 20)
    body = Paced(data, seconds=3, pieces=40)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        upload = start_upload(pool, relay.url(oid), body)
        wait_until(lambda: body.sent > 0, message="the upload to start")
        head = http.head(relay.url(oid))
        with http.get(relay.url(oid), stream=True) as get:
            get_headers = dict(get.headers)
        assert upload.result().status_code == 201
    assert head.headers["Accept-Ranges"] == "bytes"
    assert head.headers["Upload-Incomplete"] == get_headers["Upload-Incomplete"] == "?1"
    assert set(head.headers) - {"Date"} == set(get_headers) - {"Date"}


def start_unsized_upload(relay, oid: str, first_piece: bytes) -> socket.socket:
    """A raw chunked PUT that has sent *first_piece* and stays open."""
    host, port = relay.address
    sock = socket.create_connection((host, port), timeout=30)
    head = f"PUT /{SERVER_ID}/{oid} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    sock.sendall(head.encode() + b"%x\r\n%s\r\n" % (len(first_piece), first_piece))
    partial = relay.files / ".relay" / "partial" / oid / "data"
    wait_until(lambda: partial.exists() and partial.stat().st_size == len(first_piece), message="the first piece")
    return sock


def http10_get(relay, path: str) -> tuple[int, dict, bytes]:
    """GET over HTTP/1.0 on a raw socket, read to the close: (status, headers, body)."""
    host, port = relay.address
    with socket.create_connection((host, port), timeout=30) as sock:
        sock.sendall(f"GET {path} HTTP/1.0\r\n\r\n".encode())
        received = b""
        while chunk := sock.recv(1 << 20):
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {name.lower(): value for name, value in headers.items()}, body


def test_an_http10_reader_of_an_upload_of_unknown_length_gets_it_only_once_stored(live):
    """To HTTP/1.0 a body of unknown length ends with the connection: a cut-off upload
    would look complete. Such a reader is told to retry, or waits for the stored object."""
    relay = live()
    data, oid = blob(300_000)
    upload = start_unsized_upload(relay, oid, data[: 128 << 10])
    status, headers, body = http10_get(relay, f"/{SERVER_ID}/{oid}?wait=0")
    assert status == 503 and headers["retry-after"] and b"HTTP/1.1" in body
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        reader = pool.submit(http10_get, relay, f"/{SERVER_ID}/{oid}?wait=30")
        wait_until(lambda: requests.get(relay.url()).json()["waiting_readers"] == 1, message="the reader to wait")
        rest = data[128 << 10 :]
        upload.sendall(b"%x\r\n%s\r\n0\r\n\r\n" % (len(rest), rest))
        assert upload.recv(100).startswith(b"HTTP/1.1 201")
        status, headers, body = reader.result(timeout=60)
    upload.close()
    assert status == 200 and headers["content-length"] == str(len(data)) and body == data


def test_an_http10_reader_of_an_aborted_upload_of_unknown_length_never_gets_a_200(live):
    relay = live()
    data, oid = blob(300_000)
    upload = start_unsized_upload(relay, oid, data[: 128 << 10])
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        reader = pool.submit(http10_get, relay, f"/{SERVER_ID}/{oid}?wait=3")

        def reader_in() -> bool:
            report = requests.get(relay.url()).json()
            return report["waiting_readers"] + report["downloads_in_progress"] == 1

        wait_until(reader_in, message="the reader to wait or follow")
        upload.close()
        status, _, body = reader.result(timeout=60)
    assert status == 404 and data[:1000] not in body


def test_a_follower_behind_an_upload_that_completes_and_is_deleted_still_gets_every_byte(live):
    """The upload verified and became the object, then the object was deleted while a slow
    reader was still behind: like a download of the stored object, it completes (the file
    waits in retired/ for it) instead of being cut as if the upload had failed."""
    relay = live()
    data, oid = blob(32 << 20, seed=5)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        upload = start_upload(pool, relay.url(oid), Paced(data, seconds=1, pieces=32))
        with requests.get(relay.url(oid) + "?wait=10", stream=True, timeout=60) as download:
            blocks = download.iter_content(1 << 20)
            received = next(blocks)
            assert upload.result().status_code == 201
            assert requests.delete(relay.url(oid), timeout=30).status_code == 200
            for block in blocks:
                received += block
    assert sha256(received) == oid


def test_a_reader_that_has_waited_long_starts_as_soon_as_the_upload_does(live):
    """A waiting reader's looks for its upload grow half a second apart; an upload that
    begins on the relay (in either worker) has it look again at once."""
    relay = live()
    for round in range(5):
        data, oid = blob(1 << 20, seed=round)
        reader = socket.create_connection(relay.address, timeout=30)
        reader.sendall(f"GET /{SERVER_ID}/{oid}?wait=30 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        wait_until(lambda: requests.get(relay.url()).json()["waiting_readers"] == 1, message="the reader to wait")
        time.sleep(1.5 + round / 10)  # the scenario: a reader that has waited long, its looks far apart
        sender = socket.create_connection(relay.address, timeout=30)
        head = f"PUT /{SERVER_ID}/{oid} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\n\r\n".encode()
        started = time.monotonic()
        sender.sendall(head + data[: len(data) // 2])
        first = reader.recv(1)
        began = time.monotonic() - started
        assert first == b"H"
        assert began < 0.12, f"round {round}: the reader's answer began {began:.3f} s after the upload"
        sender.sendall(data[len(data) // 2 :])
        assert sender.recv(100).startswith(b"HTTP/1.1 201")
        received = first
        while chunk := reader.recv(1 << 20):
            received += chunk
        assert received.startswith(b"HTTP/1.1 200") and received.endswith(data)
        sender.close()
        reader.close()


def _cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def test_readers_waiting_idle_cost_the_relay_next_to_nothing(live):
    """Readers waiting for uploads that do not begin, and uploads of other names meanwhile,
    take little CPU: a waiter is woken by the transfers of its own object only. The same
    uploads without waiters are the baseline."""
    relay = live()

    def uploads_for_3_s(seed: int) -> float:
        """The workers' CPU seconds over 3 s in which 200 small uploads come."""
        workers = relay.worker_pids()
        before, started = _cpu_seconds(workers), time.monotonic()
        with requests.Session() as session:
            for index in range(200):
                data, oid = blob(1000, seed=seed + index)
                assert session.put(relay.url(oid), data=data).status_code == 201
        while time.monotonic() - started < 3:  # and idle the rest of 3 s
            time.sleep(0.1)
        return _cpu_seconds(workers) - before

    uploads_for_3_s(0)  # the workers warmed up
    alone = uploads_for_3_s(1000)
    waiters = []
    for index in range(100):
        reader = socket.create_connection(relay.address, timeout=30)
        reader.sendall(f"GET /{SERVER_ID}/{index + 1:064x}?wait=60 HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        waiters.append(reader)
    wait_until(lambda: requests.get(relay.url()).json()["waiting_readers"] == 100, message="100 readers to wait")
    beside_waiters = uploads_for_3_s(2000)
    assert beside_waiters - alone < 0.6, f"100 waiters cost the workers {beside_waiters - alone:.2f} CPU s in 3 s"
    for reader in waiters:
        reader.close()
