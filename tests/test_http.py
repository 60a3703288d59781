"""Malformed HTTP on raw sockets, wrong server IDs, and the log: what a hostile or broken
client can get out of a live relay (gunicorn parsing in front of the app).

Every malformed request gets a 4xx status line or a closed connection, never a hang
(every read is bounded) and never a traceback; the relay keeps answering; no log line
holds the server ID, or any ten characters of it, whatever was sent.
"""

import contextlib
import hashlib
import resource
import secrets
import shutil
import socket
import statistics
import time
import urllib.parse

import pytest
import requests
from conftest import SERVER_ID, LiveRelay, blob, wait_until

import file_relay

# A random ID for the relays here: any ten characters of it in the log are a leak.
SECRET = secrets.token_urlsafe(24)
STORED, STORED_OID = blob(1000, seed=1)
MISSING_OID = hashlib.sha256(b"missing").hexdigest()


@pytest.fixture(scope="module")
def relay(tmp_path_factory):
    """One live relay for the module, logging at debug level."""
    tmp_path = tmp_path_factory.mktemp("http")
    started = LiveRelay(tmp_path, "relay", ["--log-level", "debug"], None, tmp_path / "files")
    started.start(server_id=SECRET)
    assert requests.put(started.url(STORED_OID, server_id=SECRET), data=STORED).status_code == 201
    yield started
    started.kill()


def exchange(relay, raw: bytes, timeout: float = 10) -> bytes:
    """Send *raw*, end our side of the connection, and return everything the relay sends
    until it closes; fail if that takes longer than *timeout*."""
    deadline = time.monotonic() + timeout
    with socket.create_connection(relay.address, timeout=timeout) as sock:
        try:
            sock.sendall(raw)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the relay refused and closed before reading it all
        answer = b""
        while True:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                block = sock.recv(65536)
            except ConnectionResetError:
                break
            except TimeoutError:
                raise AssertionError(f"no end after {timeout} s; got {answer[:200]!r}") from None
            if not block:
                break
            answer += block
    return answer


def status_of(answer: bytes) -> int | None:
    """The status of the first response in *answer*; None for a closed connection."""
    if not answer:
        return None
    assert answer.startswith(b"HTTP/1.1 ") or answer.startswith(b"HTTP/1.0 "), answer[:200]
    return int(answer[9:12])


def still_serving(relay) -> None:
    assert requests.get(relay.url(server_id=SECRET), timeout=10).status_code == 200
    assert requests.get(relay.url(STORED_OID, server_id=SECRET), timeout=10).content == STORED


def leaks(log: str, secret: str = SECRET) -> list[str]:
    """Pieces of the secret in the log: itself or any ten characters of it, as they are or
    percent-encoded (once or twice, in any mix with plain characters, in either case)."""
    pieces = {secret[i : i + 10] for i in range(len(secret) - 9)}
    decoded_once = urllib.parse.unquote(log)
    views = (log, decoded_once, urllib.parse.unquote(decoded_once))
    return sorted(piece for piece in pieces if any(piece in view for view in views))


def encoded_forms(secret: str) -> dict[str, str]:
    """The secret percent-encoded as a client may send it."""
    return {
        "every character": "".join(f"%{ord(c):02X}" for c in secret),
        "every character, lower-case hex": "".join(f"%{ord(c):02x}" for c in secret),
        "every other character, mixed case": "".join(
            c if i % 2 else (f"%{ord(c):02x}" if i % 4 else f"%{ord(c):02X}") for i, c in enumerate(secret)
        ),
        "ten characters in other text": "q" + "".join(f"%{ord(c):02X}" for c in secret[3:13]) + "q",
        "every character, escaped twice": "".join(f"%25{ord(c):02X}" for c in secret),
    }


sid, oid = SECRET, STORED_OID
PUT_HEAD = f"PUT /{sid}/{MISSING_OID} HTTP/1.1\r\nHost: x\r\n"

MALFORMED = {
    "garbage request line": b"GARBAGE\r\n\r\n",
    "request line without target": b"GET\r\n\r\n",
    "HTTP/0.9 request": f"GET /{sid}\r\n".encode(),
    "HTTP/0.9 request with a blank line": f"GET /{sid}\r\n\r\n".encode(),
    "unknown HTTP version": f"GET /{sid} HTTP/9.9\r\nHost: x\r\n\r\n".encode(),
    "malformed HTTP version": f"GET /{sid} HTTP/1.1x\r\nHost: x\r\n\r\n".encode(),
    "extra token in the request line": f"GET /{sid} HTTP/1.1 extra\r\nHost: x\r\n\r\n".encode(),
    "lower-case method": f"get /{sid} HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
    "method with a NUL": f"G\x00T /{sid} HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
    "method of punctuation": f"<{{}}> /{sid} HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
    "method of 10 KB": b"A" * 10_000 + f" /{sid} HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
    "target with a NUL": f"GET /{sid}/\x00 HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
    "target with a space": f"GET /{sid}/a b HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
    "target with raw bytes 0x80-0xff": f"GET /{sid}/".encode() + bytes(range(0x80, 0x100)) + b" HTTP/1.1\r\n\r\n",
    "request line of 10 KB": f"GET /{sid}/{'a' * 10_000} HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
    "header line without a colon": f"GET /{sid} HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n".encode(),
    "header name with a space": f"GET /{sid} HTTP/1.1\r\nHost : x\r\n\r\n".encode(),
    "header name of punctuation": f"GET /{sid} HTTP/1.1\r\nX(y): z\r\n\r\n".encode(),
    "header value with a NUL": f"GET /{sid} HTTP/1.1\r\nX-A: a\x00b\r\n\r\n".encode(),
    "obsolete line folding": f"GET /{sid} HTTP/1.1\r\nX-A: a\r\n b\r\n\r\n".encode(),
    "a header of 100 KB": f"GET /{sid} HTTP/1.1\r\nX-Big: {'b' * 100_000}\r\n\r\n".encode(),
    "200 headers": (f"GET /{sid} HTTP/1.1\r\n" + "".join(f"X-H{n}: v\r\n" for n in range(200)) + "\r\n").encode(),
    "headers of 1 MB in all": (f"GET /{sid} HTTP/1.1\r\n" + f"X-H: {'v' * 8000}\r\n" * 128 + "\r\n").encode(),
    "bare LF line endings": f"GET /{sid} HTTP/1.1\nHost: x\n\n".encode(),
    "bare CR line endings": f"GET /{sid} HTTP/1.1\rHost: x\r\r".encode(),
    "Content-Length and Transfer-Encoding": (
        PUT_HEAD + "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    ).encode(),
    "two different Content-Lengths": (PUT_HEAD + "Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!").encode(),
    "two equal Content-Lengths": (PUT_HEAD + "Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello").encode(),
    "Content-Length list": (PUT_HEAD + "Content-Length: 5, 5\r\n\r\nhello").encode(),
    "negative Content-Length": (PUT_HEAD + "Content-Length: -5\r\n\r\nhello").encode(),
    "Content-Length with a sign": (PUT_HEAD + "Content-Length: +5\r\n\r\nhello").encode(),
    "hexadecimal Content-Length": (PUT_HEAD + "Content-Length: 0x5\r\n\r\nhello").encode(),
    "Content-Length beyond the body": (PUT_HEAD + "Content-Length: 100\r\n\r\nhello").encode(),
    "chunk size not hexadecimal": (PUT_HEAD + "Transfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n").encode(),
    "negative chunk size": (PUT_HEAD + "Transfer-Encoding: chunked\r\n\r\n-5\r\nhello\r\n0\r\n\r\n").encode(),
    "chunk size of 2**80": (PUT_HEAD + f"Transfer-Encoding: chunked\r\n\r\n{2**80:x}\r\nhello\r\n").encode(),
    "chunk longer than its size": (PUT_HEAD + "Transfer-Encoding: chunked\r\n\r\n2\r\nhello\r\n0\r\n\r\n").encode(),
    "chunk without its CRLF": (PUT_HEAD + "Transfer-Encoding: chunked\r\n\r\n5\r\nhello0\r\n\r\n").encode(),
    "chunked body without its last chunk": (PUT_HEAD + "Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n").encode(),
    "chunk extension of 10 KB": (
        PUT_HEAD + f"Transfer-Encoding: chunked\r\n\r\n5;{'e' * 10_000}\r\nhello\r\n0\r\n\r\n"
    ).encode(),
    "chunked twice": (PUT_HEAD + "Transfer-Encoding: chunked, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n").encode(),
    "chunked on HTTP/1.0": (
        f"PUT /{sid}/{MISSING_OID} HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    ).encode(),
    "NUL bytes only": b"\x00" * 1000,
    "TLS handshake on the plain port": bytes.fromhex("16030100a5010000a103030000"),
    "only CRLFs": b"\r\n" * 1000,
}

# Transfer codings the relay does not implement: 501 is the status RFC 9112 (6.1) asks for.
UNIMPLEMENTED = {
    "Transfer-Encoding gzip": (PUT_HEAD + "Transfer-Encoding: gzip\r\n\r\nhello").encode(),
    "Transfer-Encoding chunked then gzip": (PUT_HEAD + "Transfer-Encoding: chunked, gzip\r\n\r\nhello").encode(),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_requests_get_a_4xx_or_a_closed_connection(relay, name):
    answer = exchange(relay, MALFORMED[name])
    status = status_of(answer)
    assert status is None or 400 <= status < 500, answer[:300]
    assert b"Traceback" not in answer
    still_serving(relay)


@pytest.mark.parametrize("name", list(UNIMPLEMENTED))
def test_unknown_transfer_codings_get_501_and_nothing_is_stored(relay, name):
    answer = exchange(relay, UNIMPLEMENTED[name])
    assert status_of(answer) in (400, 501), answer[:300]
    assert requests.head(relay.url(MISSING_OID, server_id=SECRET)).status_code == 404
    still_serving(relay)


@pytest.mark.parametrize(
    ("length", "status", "reason"),
    [
        (2**50, 507, b"not enough free space"),  # more than the disk holds
        (2**62, 413, b"larger than any object"),  # more than any object may hold (1 EiB)
        (2**64, 413, b"larger than any object"),
        (10**30 - 1, 413, b"larger than any object"),
    ],
)
def test_a_huge_content_length_on_an_upload_is_refused_before_any_body(relay, length, status, reason):
    """An upload announcing more than the relay can hold: refused at once, the body never read."""
    answer = exchange(relay, (PUT_HEAD + f"Content-Length: {length}\r\n\r\nhello").encode())
    assert status_of(answer) == status and reason in answer and b"Connection: close" in answer
    still_serving(relay)


def test_after_every_malformed_request_the_log_holds_no_part_of_the_server_id(tmp_path):
    """A relay of its own, so that the log holds this battery only."""
    relay = LiveRelay(tmp_path, "malformed", ["--log-level", "debug"], None, tmp_path / "files").start(server_id=SECRET)
    try:
        workers = wait_until(lambda: len(pids := relay.worker_pids()) == 2 and pids, message="both workers")
        for raw in [*MALFORMED.values(), *UNIMPLEMENTED.values()]:
            exchange(relay, raw)
        assert requests.get(relay.url(server_id=SECRET), timeout=10).status_code == 200
        assert relay.worker_pids() == workers  # no worker died on the way
    finally:
        relay.kill()
    log = relay.log()
    assert log.count("Invalid request from") >= 30  # the battery was logged...
    assert leaks(log) == []  # ...without the ID
    assert "Traceback" not in log


# -- wrong server IDs ------------------------------------------------------------------------

WRONG_PATHS = [
    "/wrong",
    "/wrong/" + STORED_OID,  # a stored object...
    "/wrong/" + MISSING_OID,  # ...and a missing one: no oracle for which objects exist
    "/",
    "/x/y/z",
    f"/{SECRET[:-1]}/{STORED_OID}",  # all but the last character right
    f"/{SECRET[:-1]}{chr(ord(SECRET[-1]) ^ 1)}/{STORED_OID}",
    f"/{SECRET}x/{STORED_OID}",
    f"/{SECRET.upper() if SECRET.upper() != SECRET else SECRET.lower()}/{STORED_OID}",
    f"/{'a' * 200}",
    "/%00/" + STORED_OID,
    f"/wrong/{STORED_OID}?wait=30",
    f"/wrong/{SECRET}/{STORED_OID}",
    f"//{SECRET}/{STORED_OID}",
]


def without_date(answer: bytes) -> bytes:
    return b"\r\n".join(line for line in answer.split(b"\r\n") if not line.lower().startswith(b"date:"))


def test_wrong_ids_get_byte_identical_answers_whatever_the_path_and_method(relay):
    answers = {}
    for method in ("GET", "HEAD", "PUT", "DELETE", "POST", "OPTIONS", "PATCH"):
        for path in WRONG_PATHS:
            body = b"x" * 100 if method in ("PUT", "POST", "PATCH") else b""
            length = f"Content-Length: {len(body)}\r\n" if body else ""
            raw = f"{method} {path} HTTP/1.1\r\nHost: x\r\n{length}\r\n".encode() + body
            answers[(method, path)] = without_date(exchange(relay, raw))
    heads = {answer for (method, _), answer in answers.items() if method == "HEAD"}
    others = {answer for (method, _), answer in answers.items() if method != "HEAD"}
    assert len(others) == 1 and len(heads) == 1, others | heads
    (answer,) = others
    assert answer.startswith(b"HTTP/1.1 403 Forbidden\r\n") and answer.endswith(b"\r\n\r\nforbidden\n")
    assert b"Connection: close" in answer
    assert heads == {answer[: -len(b"forbidden\n")]}  # the same head, without the body
    still_serving(relay)


def test_a_wrong_id_costs_the_same_time_whatever_the_guess(make_config):
    """Measured in-process, where the noise is smallest: the median time of a refusal is
    the same (within a generous factor) for a guess that shares all but one character
    with the ID, a guess that shares none, a short guess, and guesses at a stored or a
    missing object. This catches work done before the check (a disk lookup, an early
    exit on length); a comparison that stops at the first wrong character differs by
    nanoseconds, which no test on a shared machine can see: the code hashes both sides
    with SHA-256 and compares the digests with hmac.compare_digest."""
    app = file_relay.make_app(make_config())
    store = file_relay.Store(make_config())
    assert store.put_stream(STORED_OID, [STORED], len(STORED), file_relay.Limits())
    guesses = {
        "all but the last character": f"/{SERVER_ID[:-1]}x/{MISSING_OID}",
        "nothing in common": f"/{'#' * len(SERVER_ID)}/{MISSING_OID}",
        "short": f"/x/{MISSING_OID}",
        "stored object": f"/{'y' * len(SERVER_ID)}/{STORED_OID}",
        "missing object": f"/{'y' * len(SERVER_ID)}/{MISSING_OID}",
    }
    samples = {name: [] for name in guesses}

    def call(path: str) -> int:
        environ = {
            "REQUEST_METHOD": "GET",
            "PATH_INFO": path,
            "QUERY_STRING": "",
            "SERVER_NAME": "x",
            "SERVER_PORT": "80",
            "wsgi.url_scheme": "http",
            "wsgi.input": None,
        }
        started = time.perf_counter_ns()
        body = app(environ, lambda status, headers, exc_info=None: None)
        b"".join(body)
        body.close()
        return time.perf_counter_ns() - started

    for _ in range(50):  # warm up
        for path in guesses.values():
            call(path)
    for _ in range(600):  # interleaved, so load on the machine falls on all alike
        for name, path in guesses.items():
            samples[name].append(call(path))
    medians = {name: statistics.median(times) for name, times in samples.items()}
    assert max(medians.values()) < 1.5 * min(medians.values()), medians


# -- slow clients ----------------------------------------------------------------------------


def stalled_connections(relay, count: int, first_bytes: bytes) -> list[socket.socket]:
    connections = []
    for _ in range(count):
        sock = socket.create_connection(relay.address, timeout=30)
        sock.sendall(first_bytes)
        connections.append(sock)
    return connections


def time_a_status_request(relay) -> float:
    started = time.monotonic()
    assert requests.get(relay.url(), timeout=60).status_code == 200
    return time.monotonic() - started


def test_connections_stalled_in_their_request_line_hold_no_thread(live):
    """Three times as many connections as the worker has threads, each stopped half-way
    through its request line (slowloris, without the server ID): a real client is served
    at once (these would have held every thread until the header deadline, 10 s, three
    times over), and they are still cut off at that deadline."""
    relay = live("--workers", "1", "--threads", "4")
    stalled = stalled_connections(relay, 12, b"GET /abc")
    started = time.monotonic()
    assert time_a_status_request(relay) < 3
    for sock in stalled:
        with contextlib.suppress(ConnectionResetError):
            assert sock.recv(100) == b""
        sock.close()
    assert 9 < time.monotonic() - started < 20


def test_kept_alive_connections_stalled_in_their_next_request_hold_no_thread(live):
    """Twelve connections each make a request and stop half-way through the next one, sent
    after the answer or pipelined behind the first request (on 4 threads): a real client is
    served at once."""
    relay = live("--workers", "1", "--threads", "4")
    status_request = f"GET /{SERVER_ID} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    after_the_answer = stalled_connections(relay, 6, status_request)
    pipelined = stalled_connections(relay, 6, status_request + status_request[:10])
    for sock in after_the_answer + pipelined:
        answer = sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 200") and b"Connection: close" not in answer
    for sock in after_the_answer:
        sock.sendall(status_request[:10])
    assert time_a_status_request(relay) < 3
    for sock in after_the_answer + pipelined:
        sock.close()


def test_clients_that_never_close_after_a_refusal_hold_no_thread(live):
    """24 clients with a wrong server ID read their 403 and never close their side: the
    relay's lingering close (for the client to read the answer) would have held
    a thread for each; a real client is served at once."""
    relay = live("--workers", "1", "--threads", "4")
    refused = stalled_connections(relay, 24, b"GET /wrong HTTP/1.1\r\nHost: x\r\n\r\n")
    for sock in refused:
        assert sock.recv(65536).startswith(b"HTTP/1.1 403")
    assert time_a_status_request(relay) < 3
    for sock in refused:
        sock.close()


@contextlib.contextmanager
def open_files_limit(wanted: int):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < wanted:
        pytest.skip(f"needs {wanted} open files, the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_more_stalled_connections_than_a_worker_holds_do_not_lock_clients_out(live):
    """1100 stalled connections, more than the 1000 a worker holds at once (gunicorn's
    worker_connections): the one that has stalled longest makes way for each new one, so a
    real client is served at once rather than left unaccepted until the header deadline."""
    with open_files_limit(4096):
        relay = live("--workers", "1", "--threads", "4")
        stalled = stalled_connections(relay, 1100, b"GET /abc")
        try:
            assert time_a_status_request(relay) < 3
        finally:
            for sock in stalled:
                sock.close()


def test_more_lingering_refusals_than_a_worker_holds_do_not_lock_clients_out(live):
    """1100 refused uploads still sending their bodies, lingering for --linger-time: at the
    worker's limit the oldest lingering close makes way, so a real client is served at once
    rather than left unaccepted until those clients fall silent."""
    refused_head = f"PUT /wrong-id/{MISSING_OID} HTTP/1.1\r\nHost: x\r\nContent-Length: {1 << 30}\r\n\r\n"
    with open_files_limit(4096):
        relay = live("--workers", "1", "--threads", "4")
        lingering = stalled_connections(relay, 1100, refused_head.encode() + bytes(100))
        try:
            assert time_a_status_request(relay) < 3
        finally:
            for sock in lingering:
                sock.close()


# -- the log ----------------------------------------------------------------------------------


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_the_server_id_reaches_no_log_line_after_a_battery_of_errors(tmp_path, log_format):
    relay = LiveRelay(tmp_path, "battery", ["--log-level", "debug", "--log-format", log_format], None, tmp_path / "f")
    relay.start(server_id=SECRET)
    try:
        url = relay.url(server_id=SECRET)
        data, data_oid = blob(100_000, seed=3)
        encoded = "".join(f"%{ord(c):02x}" for c in SECRET)
        with requests.Session() as http:
            # Normal traffic, and the ID where a careless relay would echo or log it.
            assert http.put(f"{url}/{data_oid}", data=data).status_code == 201
            assert http.get(f"{url}/{data_oid}").content == data
            http.get(f"{url}?wait=1&id={SECRET}")
            http.get(f"{url}/{data_oid}", headers={"X-Forwarded-For": SECRET, "Referer": url, "User-Agent": SECRET})
            # Wrong IDs holding the ID: elsewhere in the path, percent-encoded, with more after it.
            for path in (SECRET + "x", f"wrong/{SECRET}", encoded, f"{SECRET}%00", f"{SECRET}{SECRET}"):
                http.get(f"{relay.base}/{path}/{data_oid}")
            # Refusals: bad names, bad limits, bad ranges, content that does not match.
            http.put(f"{url}/not-a-hash", data=b"x")
            http.put(f"{url}/{MISSING_OID}", data=b"wrong content")
            http.put(f"{url}/{MISSING_OID}", data=b"x", headers={"Max-Days": "soon", "Max-Downloads": "-1"})
            http.put(f"{url}/{MISSING_OID}", data=b"x", headers={"Content-Range": f"bytes 0-0/{2**70}"})
            http.get(f"{url}/{data_oid}", headers={"Range": f"bytes={2**70}-"})
            # An upload that makes the app fail (a 500 with a traceback, if it still does).
            empty = hashlib.sha256(b"").hexdigest()
            http.put(f"{url}/{empty}", data=b"", headers={"Max-Days": "1e7"})
            http.get(f"{url}/{empty}")
            http.delete(f"{url}/{empty}")
        # Broken bodies and malformed requests, the ID in each.
        head = f"PUT /{SECRET}/{data_oid} HTTP/1.1\r\nHost: x\r\n"
        for raw in (
            (head + "Content-Length: 100000\r\n\r\n").encode() + data[:5000],
            (head + "Transfer-Encoding: chunked\r\n\r\n10\r\nnot sixteen\r\nzz\r\n").encode(),
            (head + f"Content-Range: bytes 0-99999/{len(data)}\r\nContent-Length: 100000\r\n\r\n").encode() + data[:10],
            f"GET /{SECRET} HTTP/1.1 extra\r\n\r\n".encode(),
            f"GET /{SECRET} HTTP/9.9\r\n\r\n".encode(),
            f"GET /{SECRET}\x00 HTTP/1.1\r\n\r\n".encode(),
            f"GET /{encoded} HTTP/1.1 extra\r\n\r\n".encode(),
            f"GET /{SECRET} HTTP/1.1\r\n{SECRET}\r\n\r\n".encode(),
            f"GET /{SECRET} HTTP/1.1\r\nX-{SECRET}: 1\r\nBad\x00: 1\r\n\r\n".encode(),
            f"GET /{SECRET}/{'a' * 5000} HTTP/1.1\r\n\r\n".encode(),
            f"GET /{'a' * 4080}{SECRET} HTTP/1.1\r\n\r\n".encode(),  # cut by the line limit mid-ID
            f"GET /{SECRET} HTTP/1.1\r\nX-Big: {SECRET * 400}\r\n\r\n".encode(),
            f"{SECRET} / HTTP/1.1\r\n\r\n".encode(),
            (head + "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n").encode(),
            (head + "Transfer-Encoding: gzip\r\n\r\n").encode(),
        ):
            exchange(relay, raw)
        wait_until(lambda: relay.log().count("\n") > 20, message="the log")
        assert requests.get(url).status_code == 200
    finally:
        relay.signal(2)
        relay.wait_exit(20)
    log = relay.log()
    assert leaks(log) == [], [line for line in log.splitlines() if leaks(line)]
    assert "***" in log  # redaction was at work
    print(f"{len(log.splitlines())} log lines, none with the ID")


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_percent_encoded_server_id_reaches_no_log_line(tmp_path, log_format):
    """Encoded, the ID is still the ID (gunicorn decodes the path, so the relay accepts it):
    not in a request line gunicorn refuses and quotes, nor in the access log's path, query
    or forwarded client address, at the default log level."""
    relay = LiveRelay(tmp_path, "encoded", ["--log-format", log_format], None, tmp_path / "f").start(server_id=SECRET)
    forms = encoded_forms(SECRET)
    try:
        assert requests.get(f"{relay.base}/{forms['every character']}", timeout=10).status_code == 200
        for form in forms.values():
            assert status_of(exchange(relay, f"GET /{form}/x\r\n\r\n".encode())) in (None, 400)
            url = relay.url(MISSING_OID, server_id=SECRET)
            requests.get(f"{url}?wait=0&id={form}", timeout=10)
            requests.get(f"{url}?wait=0", headers={"X-Forwarded-For": form}, timeout=10)
            requests.get(f"{url}/{form}", timeout=10)  # in the path after the ID, decoded once
    finally:
        relay.kill()
    log = relay.log()
    assert log.count("Invalid HTTP request line") == len(forms)  # gunicorn's refusals were logged...
    assert leaks(log) == [], [line for line in log.splitlines() if leaks(line)]  # ...without the ID


def near_misses() -> list[str]:
    """Wrong IDs a user with the right one might send: cut short, one character off."""
    return [SECRET[:-1], SECRET[1:], SECRET[:-1] + chr(ord(SECRET[-1]) ^ 1), SECRET[:20]]


@pytest.mark.parametrize("log_level", ["info", "debug"])
def test_a_near_miss_of_the_id_reaches_no_log_line(tmp_path, log_level):
    """A user who pastes the URL one character short sends nearly the whole ID: the log
    must not keep it (whoever reads the log could guess the rest)."""
    relay = LiveRelay(tmp_path, "near", ["--log-level", log_level], None, tmp_path / "f").start(server_id=SECRET)
    try:
        for guess in near_misses():
            assert requests.get(f"{relay.base}/{guess}/{STORED_OID}").status_code == 403
            assert requests.put(f"{relay.base}/{guess}/{STORED_OID}", data=STORED).status_code == 403
        assert requests.get(relay.url(server_id=SECRET)).status_code == 200
    finally:
        relay.kill()
    assert leaks(relay.log()) == [], [line for line in relay.log().splitlines() if leaks(line)]


def test_a_near_miss_of_the_id_in_a_malformed_request_reaches_no_log_line(tmp_path):
    relay = LiveRelay(tmp_path, "malformed", [], None, tmp_path / "f").start(server_id=SECRET)
    guess = SECRET[:-1]
    try:
        for raw in (
            f"GET /{guess}\x00 HTTP/1.1\r\n\r\n",
            f"GET /{guess} HTTP/1.1\r\n{guess}\r\n\r\n",
            f"{guess} / HTTP/1.1\r\n\r\n",
        ):
            assert status_of(exchange(relay, raw.encode())) == 400
    finally:
        relay.kill()
    assert leaks(relay.log()) == [], [line for line in relay.log().splitlines() if leaks(line)]


# -- Refusals before the body: the client must read them ----------------------------------


@pytest.fixture(scope="module")
def refused_body(tmp_path_factory) -> tuple[str, str]:
    """A 20 MB file to upload where the relay refuses before reading a byte: (path, sha256)."""
    data, oid = blob(20 << 20, seed=7)
    path = tmp_path_factory.mktemp("refused") / "body"
    path.write_bytes(data)
    return str(path), oid


def test_clients_that_send_their_whole_body_first_read_the_refusal(live, refused_body):
    """urllib, http.client and wget send a body before they read any answer: the relay reads
    and discards a refused body (a lingering close), so they see 413 and 403, not a reset."""
    import http.client
    import subprocess
    import urllib.error
    import urllib.request

    relay = live("--max-file-size", "10M")
    path, oid = refused_body
    for attempt in range(3):
        request = urllib.request.Request(relay.url(oid), data=open(path, "rb").read(), method="PUT")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
        assert refused.value.code == 413, attempt
        connection = http.client.HTTPConnection(*relay.address, timeout=30)
        with open(path, "rb") as body:
            connection.request("PUT", urllib.parse.urlsplit(relay.url(oid, server_id="wrong-id")).path, body=body)
        assert connection.getresponse().status == 403, attempt
        connection.close()
    if shutil.which("wget") is None:
        pytest.skip("wget is not installed")
    for url, status in ((relay.url(oid), "413"), (relay.url(oid, server_id="wrong-id"), "403")):
        wget = subprocess.run(
            ["wget", "--method=PUT", f"--body-file={path}", "--tries=1", "-S", "-O", "/dev/null", url],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert wget.returncode == 8 and f"HTTP/1.1 {status}" in wget.stderr, wget.stderr[-500:]


def test_the_bytes_and_time_spent_on_a_refused_body_are_bounded(live):
    """With --linger-size 4M the relay stops reading a refused 1 GB body after a few MB (the
    rest fills socket buffers, then the connection is closed); with --linger-time 1 a client
    trickling its body is cut off after about a second."""
    relay = live("--linger-size", "4M", "--linger-time", "1")
    head = f"PUT /wrong-id/{MISSING_OID} HTTP/1.1\r\nHost: x\r\nContent-Length: {1 << 30}\r\n\r\n".encode()
    sent = 0
    block = bytes(1 << 16)
    with socket.create_connection(relay.address, timeout=30) as sock:
        sock.sendall(head)
        with contextlib.suppress(OSError):
            while sent < 1 << 30:
                sent += sock.send(block)
    assert sent < 64 << 20, f"{sent} bytes of a refused body were taken"

    with socket.create_connection(relay.address, timeout=30) as sock:
        sock.sendall(head)
        started = time.monotonic()
        cut_off = None
        while cut_off is None and time.monotonic() - started < 20:
            try:
                sock.sendall(b"x" * 100)
            except OSError:
                cut_off = time.monotonic() - started
            time.sleep(0.05)  # the trickle's pace, not a wait for the relay
    assert cut_off is not None and cut_off < 10, cut_off
