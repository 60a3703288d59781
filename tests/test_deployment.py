"""Deployment for real: HTTPS with gunicorn's TLS and a certificate made here, the client a
trusted proxy names in the access log, and nginx running deploy/nginx-file-relay.conf in
front of a relay for a large upload and a download that streams while its upload goes on."""

import concurrent.futures
import contextlib
import getpass
import http.client
import json
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time

import pytest
import requests
from conftest import ROOT, SERVER_ID, blob, trickle_until_cut_off, wait_until

NGINX_SNIPPET = ROOT / "deploy" / "nginx-file-relay.conf"


def https_session(cert: str) -> requests.Session:
    """A session that trusts *cert* alone. It ignores the environment: requests lets
    REQUESTS_CA_BUNDLE override a session's own verify setting."""
    session = requests.Session()
    session.trust_env = False
    session.verify = cert
    return session


def access_records(relay) -> list[dict]:
    """The access lines of a relay started with --log-format json."""
    records = []
    for line in relay.log().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line written before logging was configured
        if isinstance(record, dict) and "status" in record:
            records.append(record)
    return records


# -- TLS ---------------------------------------------------------------------------------


def test_https_upload_and_download_with_a_self_signed_certificate(live, certificate):
    cert, key = certificate
    relay = live("--certfile", cert, "--keyfile", key)
    assert relay.base.startswith("https://")
    assert "Listening at: https://" in relay.log()
    data, oid = blob(5 << 20)
    chunked, chunked_oid = blob(3 << 20, seed=1)
    with https_session(cert) as https:
        assert https.put(relay.url(oid), data=data).status_code == 201
        pieces = (chunked[i : i + 65536] for i in range(0, len(chunked), 65536))
        assert https.put(relay.url(chunked_oid), data=pieces).status_code == 201
        response = https.get(relay.url(oid))  # no sendfile through TLS: the relay's own reads
        assert response.status_code == 200 and response.content == data
        assert https.get(relay.url(chunked_oid)).content == chunked
        ranged = https.get(relay.url(oid), headers={"Range": "bytes=1000-1999"})
        assert ranged.status_code == 206 and ranged.content == data[1000:2000]
        assert https.get(relay.url()).json()["version"]
        assert https.get(relay.url(oid, server_id="wrong-id")).status_code == 403
    assert SERVER_ID not in relay.log()


def test_https_is_all_the_relay_speaks_and_its_certificate_is_checked(live, certificate):
    cert, key = certificate
    relay = live("--certfile", cert, "--keyfile", key)
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(relay.url(), timeout=10)  # the default trust store does not know this certificate
    plain = requests.get(relay.url().replace("https://", "http://"), timeout=10)
    assert plain.status_code == 400 and plain.text == "plain HTTP request sent to HTTPS port\n"
    assert requests.get(relay.url(), verify=cert, timeout=10).status_code == 200


def test_plain_http_with_a_body_sent_to_the_tls_port_reads_its_400(live, certificate):
    """A client still sending its body when the relay answers 400 reads it (a lingering
    close), as for every other refusal."""
    cert, key = certificate
    relay = live("--certfile", cert, "--keyfile", key)
    for attempt in range(3):
        connection = http.client.HTTPConnection(*relay.address, timeout=30)
        connection.request("PUT", f"/{SERVER_ID}/{'0' * 64}", body=bytes(20 << 20))
        answer = connection.getresponse()
        assert answer.status == 400 and answer.read() == b"plain HTTP request sent to HTTPS port\n", attempt
        connection.close()


RECVFROM = {"x86_64": 45, "aarch64": 207}.get(os.uname().machine)


def stopped_leaving_recvfrom(pid: int) -> bool:
    """Whether *pid*'s main thread is held by its tracer in a recvfrom call."""
    with open(f"/proc/{pid}/task/{pid}/status") as status:
        held = "tracing stop" in status.read()
    with open(f"/proc/{pid}/task/{pid}/syscall") as syscall:
        return held and syscall.read().split()[0] == str(RECVFROM)


@pytest.mark.skipif(shutil.which("strace") is None or RECVFROM is None, reason="needs strace, on x86_64 or aarch64")
def test_plain_http_arriving_just_after_the_relay_looks_for_it_reads_its_400(live, certificate):
    """The relay looks at a TLS client's first byte before its handshake. Plain HTTP that
    arrives just after a look found nothing is still answered 400, not reset by a failed
    handshake: strace holds that look's answer for half a second while the request comes."""
    cert, key = certificate
    relay = live("--certfile", cert, "--keyfile", key, "--workers", "1")
    worker = wait_until(lambda: relay.worker_pids(), message="the worker")[0]
    command = ["strace", "-qq", "-o", os.devnull, "-e", "trace=recvfrom", "-p", str(worker)]
    tracer = subprocess.Popen([*command, "-e", "inject=recvfrom:delay_exit=500000:when=1"], stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: f"TracerPid:\t{tracer.pid}\n" in open(f"/proc/{worker}/status").read(), message="strace")
        connection = http.client.HTTPConnection(*relay.address, timeout=30)
        connection.connect()
        wait_until(lambda: stopped_leaving_recvfrom(worker), message="the relay to look at the connection")
        connection.request("PUT", f"/{SERVER_ID}/{'0' * 64}", body=bytes(20 << 20))
        answer = connection.getresponse()
        assert answer.status == 400 and answer.read() == b"plain HTTP request sent to HTTPS port\n"
        connection.close()
    finally:
        tracer.terminate()
        tracer.wait(20)


def test_the_pbench_push_over_https_sees_the_refusal(live, certificate, tmp_path):
    """The pbench agent's push: requests.put of a file object, then r.ok and r.status_code.
    A refusal before the body comes over TLS too, although the client is still sending."""
    cert, key = certificate
    relay = live("--certfile", cert, "--keyfile", key, "--max-file-size", "10M")
    data, oid = blob(20 << 20, seed=3)
    tarball = tmp_path / "tarball"
    tarball.write_bytes(data)
    for attempt in range(3):
        for url, status in ((relay.url(oid), 413), (relay.url(oid, server_id="wrong-id"), 403)):
            with open(tarball, "rb") as body:
                response = requests.put(url, data=body, verify=cert, timeout=60)
            assert not response.ok and response.status_code == status, attempt


def test_tls_clients_too_slow_to_handshake_or_to_send_headers_are_cut_off(live, certificate):
    """Four stalled TLS handshakes, then four clients trickling their headers through TLS,
    each time as many as the worker has threads: both are cut off at the header deadline
    (HEADER_TIMEOUT, 10 s), and a real client is served meanwhile."""
    cert, key = certificate
    relay = live("--certfile", cert, "--keyfile", key, "--workers", "1", "--threads", "4")
    host, port = relay.address
    address = (host, port)
    client_tls = ssl.create_default_context(cafile=cert)

    stalled = [socket.create_connection(address) for _ in range(4)]
    for sock in stalled:
        sock.sendall(b"\x16\x03\x01\x02\x00")  # the header of a ClientHello record, and no more
    started = time.monotonic()
    with https_session(cert) as https:
        assert https.get(relay.url(), timeout=30).status_code == 200
    assert time.monotonic() - started < 20  # not the 30 s timeout
    for sock in stalled:
        sock.settimeout(30)
        with contextlib.suppress(ConnectionResetError):
            assert sock.recv(100) == b""  # closed by the relay: no alert, no answer
        sock.close()
    assert time.monotonic() - started < 20  # at the deadline

    trickling = []
    for _ in range(4):
        tls = client_tls.wrap_socket(socket.create_connection(address, timeout=30), server_hostname="localhost")
        tls.sendall(f"GET /{SERVER_ID} HTTP/1.1\r\nHost: localhost\r\n".encode())
        trickling.append(tls)
    started = time.monotonic()
    assert len(trickle_until_cut_off(trickling, started + 30)) == len(trickling)
    assert time.monotonic() - started < 20
    with https_session(cert) as https:
        assert https.get(relay.url(), timeout=10).status_code == 200
    for tls in trickling:
        tls.close()


def test_stalled_tls_handshakes_hold_no_thread(live, certificate):
    """Three times as many stalled TLS handshakes as the worker has threads (they need no
    server ID): a real client is served at once (these would have held every thread until
    the header deadline, 10 s, three times over), and they are still cut off then."""
    cert, key = certificate
    relay = live("--certfile", cert, "--keyfile", key, "--workers", "1", "--threads", "4")
    host, port = relay.address
    stalled = [socket.create_connection((host, port), timeout=30) for _ in range(12)]
    for sock in stalled:
        sock.sendall(b"\x16\x03\x01\x02\x00")  # the header of a ClientHello record, and no more
    started = time.monotonic()
    with https_session(cert) as https:
        assert https.get(relay.url(), timeout=60).status_code == 200
    assert time.monotonic() - started < 3
    for sock in stalled:
        with contextlib.suppress(ConnectionResetError):
            assert sock.recv(100) == b""
        sock.close()
    assert 9 < time.monotonic() - started < 20


# -- the client behind a proxy ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("trusted", "logged"),
    [("127.0.0.1", "203.0.113.7"), ("192.0.2.1", "127.0.0.1")],
    ids=["trusted-proxy", "untrusted-peer"],
)
def test_the_access_log_names_the_forwarded_client_only_for_a_trusted_proxy(live, http, trusted, logged):
    relay = live("--forwarded-allow-ips", trusted, "--log-format", "json")
    forwarded = {"X-Forwarded-For": "198.51.100.1, 203.0.113.7"}  # the rightmost entry: what the proxy saw
    assert http.get(relay.url(), headers=forwarded).status_code == 200
    record = wait_until(
        lambda: [r for r in access_records(relay) if r["method"] == "GET" and r["path"] == "/***"],
        message="the access line",
    )[0]
    assert record["client"] == logged and record["status"] == 200


# -- nginx in front --------------------------------------------------------------------------


def _nginx() -> str | None:
    return shutil.which("nginx", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))


class Nginx:
    """nginx running deploy/nginx-file-relay.conf with its places changed to the test's own."""

    def __init__(self, tmp_path, relay_port: int | list[int], certificate: tuple[str, str]):
        self.directory = tmp_path / "nginx"
        self.directory.mkdir()
        self.access_log = self.directory / "file-relay.access.log"
        self.error_log = self.directory / "error.log"
        # Bound here, handed over (nginx adopts the sockets listed in $NGINX): no port guessing.
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        cert, key = certificate
        snippet = NGINX_SNIPPET.read_text()
        ports = relay_port if isinstance(relay_port, list) else [relay_port]  # several: relays on a shared store
        upstreams = "\n    ".join(f"server 127.0.0.1:{port};" for port in ports)
        for documented, here in [
            ("server 127.0.0.1:8080;", upstreams),
            ("listen 443 ssl;", f"listen 127.0.0.1:{self.port} ssl;"),
            ("/etc/ssl/relay/fullchain.pem", cert),
            ("/etc/ssl/relay/privkey.pem", key),
            ("/var/log/nginx/file-relay.access.log", str(self.access_log)),
        ]:
            assert documented in snippet, f"{NGINX_SNIPPET.name} no longer says {documented!r}"
            snippet = snippet.replace(documented, here)
        (self.directory / "file-relay.conf").write_text(snippet)
        kinds = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        temp = "\n".join(f"    {kind}_temp_path {self.directory / kind};" for kind in kinds)
        (self.directory / "nginx.conf").write_text(
            f"daemon off;\nworker_processes 1;\nuser {getpass.getuser()};\n"
            f"pid {self.directory / 'nginx.pid'};\nerror_log {self.error_log} info;\n"
            "events { worker_connections 256; }\n"
            f"http {{\n{temp}\n    access_log off;\n    include {self.directory / 'file-relay.conf'};\n}}\n"
        )
        self.process: subprocess.Popen | None = None

    def start(self, nginx: str) -> "Nginx":
        fd = self.listener.fileno()
        command = [nginx, "-p", self.directory, "-c", self.directory / "nginx.conf", "-e", self.error_log]
        self.process = subprocess.Popen(
            command, pass_fds=[fd], env={**os.environ, "NGINX": f"{fd};"}, stdin=subprocess.DEVNULL
        )
        self.listener.close()

        def answering():
            if self.process.poll() is not None:
                raise AssertionError(f"nginx exited with {self.process.returncode}:\n{self.log()}")
            return "start worker process" in self.log()

        wait_until(answering, message="nginx to start")
        return self

    def log(self) -> str:
        return self.error_log.read_text(errors="replace") if self.error_log.exists() else ""

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


@pytest.fixture
def behind_nginx(live, tmp_path, certificate):
    """A relay and nginx in front of it: (relay, the nginx base URL, nginx)."""
    nginx = _nginx()
    if nginx is None:
        pytest.skip("nginx is not installed: the documented proxy configuration is not exercised")
    relay = live()
    proxy = Nginx(tmp_path, relay.address[1], certificate)
    try:
        yield relay, f"https://127.0.0.1:{proxy.start(nginx).port}", proxy
    finally:
        proxy.stop()


def test_nginx_passes_a_large_upload_and_download_and_keeps_the_secret_out_of_its_log(behind_nginx, certificate):
    relay, base, proxy = behind_nginx
    data, oid = blob(64 << 20)  # far past nginx's default 1 MiB body limit and its buffers
    url = f"{base}/{SERVER_ID}/{oid}"
    with https_session(certificate[0]) as session:
        # A forged X-Forwarded-For stays on the left: nginx appends the address it saw.
        stored = session.put(url, data=data, headers={"X-Forwarded-For": "198.51.100.23"})
        assert stored.status_code == 201, stored.text
        download = session.get(url, stream=True)
        assert download.status_code == 200 and download.headers["Content-Length"] == str(len(data))
        assert b"".join(download.iter_content(1 << 20)) == data
        assert session.get(f"{base}/{SERVER_ID}").json()["version"]
        assert session.get(f"{base}/wrong-id/{oid}").status_code == 403
    assert relay.files.joinpath(oid).read_bytes() == data
    put_lines = [line for line in relay.log().splitlines() if '"PUT /***/' in line]
    assert put_lines and all(" 127.0.0.1 " in line and "198.51.100.23" not in line for line in put_lines)
    logged = wait_until(lambda: proxy.access_log.read_text().count("\n") >= 4 and proxy.access_log.read_text())
    assert f'"PUT /***/{oid}" 201' in logged
    assert SERVER_ID not in logged


def test_nginx_streams_an_upload_to_a_download_that_follows_it(behind_nginx, certificate):
    """The reader gets the first half while the uploader still holds back the second: nginx
    neither spools the request body nor buffers the response."""
    _, base, _ = behind_nginx
    data, oid = blob(16 << 20)
    half = len(data) // 2
    url = f"{base}/{SERVER_ID}/{oid}"
    first_half_read = threading.Event()
    released = []  # whether the reader, not the deadline, let the uploader go on

    def upload_body():
        for start in range(0, len(data), 1 << 16):
            if start == half:
                released.append(first_half_read.wait(30))
            yield data[start : start + (1 << 16)]

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        upload = pool.submit(requests.put, url, data=upload_body(), verify=certificate[0], timeout=60)
        received = bytearray()
        with requests.get(url, stream=True, verify=certificate[0], timeout=60) as download:
            assert download.status_code == 200
            for piece in download.iter_content(1 << 16):
                received += piece
                if len(received) >= half:
                    first_half_read.set()
        assert upload.result(60).status_code == 201
    assert released == [True], "the reader got nothing before the upload finished"
    assert bytes(received) == data


def test_a_generated_server_id_is_printed_with_an_https_url(live, certificate):
    cert, key = certificate
    relay = live("--certfile", cert, "--keyfile", key, server_id=None)
    url = wait_until(lambda: relay.output().strip(), message="the URL on stdout")
    assert url.startswith("https://") and url.count("/") == 3
