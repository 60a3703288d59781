"""The built-in client against real relays: round trips, resume after kill -9 of either
side, retries across a relay restart, following an upload in progress, verification,
parallel chunks, TLS, and the standard library alone. Real files, real SHA-256."""

import http.client
import http.server
import io
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading

import pytest
import requests
from conftest import ROOT, SERVER_ID, blob, sha256, wait_until

import file_relay

CHUNK = 256 << 10
ACCESS_RE = re.compile(r'"(\w+) /\*\*\*/(\w*)[^"]*" (\d+) (\d+) (\d+)')


def accesses(relay, oid: str | None, method=None) -> list:
    """(method, status, bytes out, bytes in) of each logged request for *oid* (or the first
    path segment after the server ID: "new", "uploads"; None: any)."""
    found = []
    for line in relay.log().splitlines():
        match = ACCESS_RE.search(line)
        if match and oid in (None, match[2]) and method in (None, match[1]):
            found.append((match[1], int(match[3]), int(match[4]), int(match[5])))
    return found


def logged(relay, oid: str, method, until) -> list:
    """accesses(), once *until* holds for them (the access line follows the response)."""

    def look():
        found = accesses(relay, oid, method)
        return found if until(found) else None

    return wait_until(look, message="the access log")


def write(path, data: bytes):
    path.write_bytes(data)
    return path


def client(*argv) -> int:
    """Run the client in this process, as the command line would."""
    return file_relay.main([str(arg) for arg in argv])


def range_markers(files, oid: str) -> list:
    try:
        return [name for name in os.listdir(files / ".relay" / "partial" / oid) if name.startswith("range-")]
    except FileNotFoundError:
        return []


def unnamed_uploads(files) -> list:
    """The partial uploads the relay names (send's larger files), as (token, range markers)."""
    found = []
    for partial in (files / ".relay" / "partial").glob("new-*"):
        found.append((partial.name.removeprefix("new-"), [p for p in os.listdir(partial) if p.startswith("range-")]))
    return found


def unnamed_markers(files) -> list:
    return [marker for _, markers in unnamed_uploads(files) for marker in markers]


class ClientProcess:
    """The client as its own process (so it can be killed), output in files."""

    def __init__(self, tmp_path, name: str, argv, python=(sys.executable,)):
        self.out_path, self.err_path = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.process = subprocess.Popen(
                [*python, str(ROOT / "file_relay.py"), *map(str, argv)],
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def wait(self, timeout: float = 30) -> int:
        return self.process.wait(timeout)

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def running(self) -> bool:
        return self.process.poll() is None

    @property
    def out(self) -> str:
        return self.out_path.read_text()

    @property
    def err(self) -> str:
        return self.err_path.read_text()


@pytest.fixture
def spawn(tmp_path):
    started = []

    def start(*argv, python=(sys.executable,)) -> ClientProcess:
        process = ClientProcess(tmp_path, f"client{len(started)}", argv, python)
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()


# -- round trips -------------------------------------------------------------


def test_a_small_file_goes_in_one_put_and_the_printed_commands_receive_it(live, tmp_path, capsys):
    relay = live()
    data, oid = blob(100_000)
    source = write(tmp_path / "report final.pdf", data)
    assert client("send", relay.url(), source) == 0
    printed = capsys.readouterr().out.splitlines()
    named_url = f"{relay.url(oid)}?name=report%20final.pdf"
    assert printed[0] == f"{named_url}  report final.pdf"
    assert [(m, s) for m, s, _, _ in logged(relay, oid, None, lambda found: len(found) == 2)] == [
        ("HEAD", 404),
        ("PUT", 201),
    ]

    curl_line, get_line = (line.strip() for line in printed[1:3])
    for receiver, line in (("by-curl", curl_line), ("by-client", get_line)):
        directory = tmp_path / receiver
        directory.mkdir()
        command = line.replace("python3 file_relay.py", f"{shlex.quote(sys.executable)} {ROOT / 'file_relay.py'}")
        result = subprocess.run(command, shell=True, cwd=directory, capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        assert (directory / "report final.pdf").read_bytes() == data
        assert os.listdir(directory) == ["report final.pdf"]  # no temporary file left
    by_name = tmp_path / "by-its-name"
    by_name.mkdir()
    subprocess.run(["curl", "-fsSOJ", named_url], cwd=by_name, check=True, timeout=30)  # the relay names it
    assert os.listdir(by_name) == ["report final.pdf"] and (by_name / "report final.pdf").read_bytes() == data


def test_a_multi_chunk_file_round_trips(live, tmp_path, files):
    relay = live()
    data, oid = blob(12 * CHUNK + 1000)
    source = write(tmp_path / "big.bin", data)
    assert client("send", relay.url(), source, "--chunk-size", "256K") == 0
    assert [(m, s) for m, s, _, _ in accesses(relay, "new")] == [("POST", 201)]  # the relay names it
    puts = logged(relay, "uploads", "PUT", lambda found: len(found) == 13)
    assert [status for _, status, _, _ in puts] == [202] * 12 + [201]
    assert sum(received for _, _, _, received in puts) == len(data)  # every byte once
    assert (files / oid).read_bytes() == data
    assert client("get", relay.url(oid), "-o", tmp_path / "copy") == 0
    assert (tmp_path / "copy").read_bytes() == data


def test_an_empty_file_round_trips(live, tmp_path):
    relay = live()
    _, oid = blob(0)
    assert client("send", relay.url(), write(tmp_path / "empty", b"")) == 0
    assert client("get", relay.url(oid), "-o", tmp_path / "copy") == 0
    assert (tmp_path / "copy").read_bytes() == b""


@pytest.mark.parametrize("size", [3 * CHUNK, CHUNK // 2], ids=["in-chunks", "in-one-put"])
def test_a_file_the_relay_has_is_not_sent_again(live, tmp_path, capsys, send_records, size):
    relay = live()
    data, oid = blob(size)
    source = write(tmp_path / "f", data)
    assert client("send", relay.url(), source, "--chunk-size", "256K") == 0
    sent = len(logged(relay, None, "PUT", lambda found: found and found[-1][1] == 201))
    capsys.readouterr()
    assert client("send", relay.url(), source, "--chunk-size", "256K") == 0
    output = capsys.readouterr()
    assert "already on the relay" in output.err and relay.url(oid) in output.out
    assert client("send", "--quiet", relay.url(), source) == 0
    assert capsys.readouterr() == (relay.url(oid) + "?name=f\n", "")  # only the URL, for scripts
    logged(relay, oid, "HEAD", lambda found: len(found) == (3 if size <= CHUNK else 2))
    assert len(accesses(relay, None, "PUT")) == sent

    # A copy with other metadata has no record: it is read (once) and the relay answers it has it.
    copy = write(tmp_path / "copy", data)
    assert client("send", relay.url(), copy, "--chunk-size", "256K") == 0
    assert "already" in capsys.readouterr().err
    assert len(os.listdir(send_records)) == 2
    assert all(SERVER_ID not in path.read_text() for path in send_records.iterdir())


def test_send_passes_the_limits_asked_for(live, tmp_path, http):
    relay = live()
    data, oid = blob(3 * CHUNK)
    source = write(tmp_path / "f", data)
    assert client("send", relay.url(), source, "--chunk-size", "256K", "--max-downloads", "1", "--max-days", "0.5") == 0
    head = http.head(relay.url(oid))
    assert head.headers["X-Remaining-Downloads"] == "1" and 0.49 < float(head.headers["X-Remaining-Days"]) <= 0.5
    assert client("get", relay.url(oid), "-o", tmp_path / "once") == 0
    assert client("get", relay.url(oid), "-o", tmp_path / "twice", "--wait", "0") == file_relay.EXIT_FAILED
    assert (tmp_path / "once").read_bytes() == data and not (tmp_path / "twice").exists()


def test_get_saves_under_the_sha256_by_default_and_never_overwrites_unless_forced(live, tmp_path, http, monkeypatch):
    relay = live()
    data, oid = blob(5000)
    assert http.put(relay.url(oid), data=data).status_code == 201
    monkeypatch.chdir(tmp_path)  # the default output is the current directory
    assert client("get", relay.url(oid)) == 0
    assert (tmp_path / oid).read_bytes() == data
    existing = write(tmp_path / "existing", b"keep me")
    assert client("get", relay.url(oid), "-o", existing) == file_relay.EXIT_LOCAL
    assert existing.read_bytes() == b"keep me"
    assert client("get", relay.url(oid), "-o", existing, "--force") == 0
    assert existing.read_bytes() == data
    (tmp_path / "dir").mkdir()
    assert client("get", relay.url(oid), "-o", tmp_path / "dir") == 0
    assert (tmp_path / "dir" / oid).read_bytes() == data


def test_progress_shows_bytes_rate_and_eta_when_asked(live, tmp_path):
    relay = live()
    data, _ = blob(16 * CHUNK)
    stream = io.StringIO()
    console = file_relay._Console(progress=True, stream=stream)
    options = file_relay.ClientOptions(chunk_size=CHUNK, limit_rate=8 << 20)
    out = io.StringIO()
    assert file_relay.send_files(relay.url(), [str(write(tmp_path / "f", data))], options, console, out) == 0
    shown = stream.getvalue()
    assert re.search(r"f: [\d.]+ (KiB|MiB) of 4\.0 MiB \(\d+%\)  [\d.]+ (B|KiB|MiB)/s  ETA \d+:\d\d:\d\d", shown)
    assert "f: stored and verified; sent 4.0 MiB in" in shown


# -- resume, retries, following ----------------------------------------------


def test_a_send_killed_midway_and_rerun_sends_only_what_is_missing(live, tmp_path, files, spawn):
    relay = live()
    data, oid = blob(16 * CHUNK)
    source = write(tmp_path / "f", data)
    sender = spawn("send", relay.url(), source, "--chunk-size", "256K", "--limit-rate", "3M")
    wait_until(lambda: len(unnamed_markers(files)) >= 4, message="four chunks on the relay")
    sender.kill()
    # The relay finishes (and logs) the killed sender's last request on its own time.
    wait_until(lambda: requests.get(relay.url()).json()["uploads_in_progress"] == 0, message="the last chunk")
    assert not (files / oid).exists()
    [(token, _)] = unnamed_uploads(files)
    head = requests.head(f"{relay.url()}/uploads/{token}")
    acknowledged = sum(b - a + 1 for a, b in file_relay._parse_ranges(head.headers["Upload-Ranges"]))
    assert 4 * CHUNK <= acknowledged < len(data)
    before = len(accesses(relay, "uploads", "PUT"))

    assert client("send", relay.url(), source, "--chunk-size", "256K") == 0
    assert [m for m, _, _, _ in accesses(relay, "new")] == ["POST"]  # the rerun resumed the same upload
    puts = logged(relay, "uploads", "PUT", lambda found: found and found[-1][1] == 201)
    # Only the rerun's answered chunks: the killed request's line (a 400) may come late.
    resent = sum(received for _, status, _, received in puts[before:] if status in (200, 201, 202))
    assert 0 < resent <= len(data) - acknowledged
    assert (files / oid).read_bytes() == data


def test_a_get_killed_midway_and_rerun_resumes_with_range(live, tmp_path, http, spawn):
    relay = live()
    data, oid = blob(16 * CHUNK)
    assert http.put(relay.url(oid), data=data).status_code == 201
    target = tmp_path / "copy"
    part = tmp_path / ".copy.part"
    getter = spawn("get", relay.url(oid), "-o", target, "--limit-rate", "1M")
    wait_until(lambda: part.exists() and part.stat().st_size >= 1 << 20, message="a partial download")
    getter.kill()
    kept = part.stat().st_size
    assert not target.exists() and kept < len(data)

    assert client("get", relay.url(oid), "-o", target) == 0
    method, status, sent, _ = logged(relay, oid, "GET", lambda found: len(found) == 2)[1]
    assert (status, sent) == (206, len(data) - kept)
    assert target.read_bytes() == data and not part.exists()


def test_a_relay_restarted_during_send_is_survived_by_retries(live, tmp_path, files, spawn):
    relay = live()
    port = relay.address[1]
    data, oid = blob(16 * CHUNK)
    sender = spawn("send", relay.url(), write(tmp_path / "f", data), "--chunk-size", "256K", "--limit-rate", "3M")
    wait_until(lambda: len(unnamed_markers(files)) >= 3, message="three chunks on the relay")
    relay.kill()
    live(bind=f"127.0.0.1:{port}", name="restarted")
    assert sender.wait(30) == 0, sender.err
    assert "retrying" in sender.err
    assert (files / oid).read_bytes() == data
    assert sender.out.startswith(relay.url(oid))


def test_get_waits_for_an_upload_and_follows_it_in_progress(live, tmp_path, files, spawn):
    relay = live()
    data, oid = blob(16 * CHUNK)
    target = tmp_path / "copy"
    getter = spawn("get", relay.url(oid), "-o", target, "--wait", "20")
    wait_until(lambda: requests.get(relay.url()).json()["waiting_readers"], message="the get to wait for the upload")
    source = write(tmp_path / "f", data)
    sender = spawn("send", relay.url(), source, "--chunk-size", "256K", "--limit-rate", "4M", "--hash-first")
    wait_until(lambda: range_markers(files, oid), message="the upload to start")
    assert f"receivers can start now, and follow the upload: {relay.url(oid)}?name=f" in sender.err
    assert getter.running()  # it is following the upload, which is not finished
    assert sender.wait(30) == 0, sender.err
    assert getter.wait(30) == 0, getter.err
    assert target.read_bytes() == data


def test_get_asks_for_its_own_wait_whatever_the_relays_default(live, tmp_path, spawn):
    relay = live("--get-wait-timeout", "0")
    data, oid = blob(1000)
    target = tmp_path / "copy"
    getter = spawn("get", relay.url(oid), "-o", target)
    wait_until(lambda: requests.get(relay.url()).json()["waiting_readers"], message="the get to wait for the upload")
    assert requests.put(relay.url(oid), data=data).status_code == 201
    assert getter.wait(30) == 0, getter.err
    assert target.read_bytes() == data


def test_get_follows_a_plain_upload_in_progress(live, tmp_path, files):
    relay = live()
    data, oid = blob(8 * CHUNK)
    host, port = relay.address

    def upload_slowly():  # like curl -T with a slow link: one PUT with a Content-Length
        connection = http.client.HTTPConnection(host, port, timeout=30)
        connection.putrequest("PUT", f"/{SERVER_ID}/{oid}")
        connection.putheader("Content-Length", str(len(data)))
        connection.endheaders()
        for start in range(0, len(data), CHUNK // 2):
            connection.send(data[start : start + CHUNK // 2])
            threading.Event().wait(0.05)
        statuses.append(connection.getresponse().status)
        connection.close()

    statuses = []
    uploader = threading.Thread(target=upload_slowly)
    uploader.start()
    try:
        partial = files / ".relay" / "partial" / oid / "data"
        wait_until(lambda: partial.exists() and partial.stat().st_size, message="the upload to start")
        assert client("get", relay.url(oid), "-o", tmp_path / "copy") == 0
    finally:
        uploader.join(30)
    assert statuses == [201]
    assert (tmp_path / "copy").read_bytes() == data
    gets = logged(relay, oid, "GET", lambda found: found)
    assert [status for _, status, _, _ in gets] == [200]  # one GET, which followed the upload


def test_a_relay_that_stays_down_makes_the_client_give_up_with_status_3(tmp_path, capsys):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again: nothing listens there
    url = f"http://127.0.0.1:{port}/{SERVER_ID}"
    assert client("send", url, write(tmp_path / "f", b"x"), "--retry-for", "1") == file_relay.EXIT_NETWORK
    assert "connection refused; giving up" in capsys.readouterr().err
    assert client("get", f"{url}/{'0' * 64}", "-o", tmp_path / "out", "--retry-for", "0") == file_relay.EXIT_NETWORK
    assert not (tmp_path / "out").exists()


# -- reading a file once -----------------------------------------------------------

READ_COUNTER = """
import atexit, runpy, sys
def report():
    counts = dict(line.split(": ") for line in open("/proc/self/io").read().splitlines())
    print("rchar", counts["rchar"], file=sys.stderr)
atexit.register(report)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="needs Linux's /proc/self/io to count bytes read")
def test_send_reads_a_large_file_once(live, tmp_path, files):
    relay = live()
    data, oid = blob(40 << 20)
    source = write(tmp_path / "big", data)
    counter = write(tmp_path / "count_reads.py", READ_COUNTER.encode())

    def bytes_read(*options) -> int:
        argv = [sys.executable, counter, ROOT / "file_relay.py", "send", relay.url(), source, "--chunk-size", "4M"]
        result = subprocess.run([*map(str, argv), *options], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert (files / oid).read_bytes() == data
        return int(re.search(r"rchar (\d+)", result.stderr)[1])

    once = bytes_read("--parallel", "2")
    assert len(data) <= once < 1.2 * len(data)  # the rest is Python reading its modules
    assert requests.delete(relay.url(oid)).status_code == 200
    assert bytes_read("--hash-first") > 2 * len(data)  # what the count would show for two reads


def test_a_resumed_upload_of_other_bytes_is_deleted_and_sent_again(live, tmp_path, files, send_records, capsys):
    relay = live()
    data, oid = blob(8 * CHUNK)
    other, _ = blob(8 * CHUNK, seed=1)
    source = write(tmp_path / "f", data)
    # An upload in progress holding other bytes in the same ranges, and a record that
    # (wrongly) says it is this file's: as if the file had changed behind send's back.
    started = requests.post(f"{relay.url()}/new/f", headers={"Upload-Length": str(len(data))})
    token = started.headers["Location"].rsplit("/", 1)[1]
    digest = file_relay.sha256_field(bytes.fromhex(sha256(other[: 4 * CHUNK])))
    chunk = {"Content-Range": f"bytes 0-{4 * CHUNK - 1}/{len(data)}", "Content-Digest": digest}
    assert requests.put(started.headers["Location"], data=other[: 4 * CHUNK], headers=chunk).status_code == 202
    address = file_relay.parse_relay_url(relay.url())
    key = file_relay._SendRecords.key(address, str(source), os.stat(source))
    file_relay._SendRecords(send_records).save(key, {"token": token})

    assert client("send", relay.url(), source, "--chunk-size", "256K") == file_relay.EXIT_FAILED
    assert "but the file hashes to " + oid in capsys.readouterr().err
    assert [name for name in os.listdir(files) if name != ".relay"] == []  # the mixture is deleted
    assert client("send", relay.url(), source, "--chunk-size", "256K") == 0  # afresh: the record is gone
    assert (files / oid).read_bytes() == data


class _WithoutUnnamedUploads(file_relay.Store):
    """The files directory without the capability to name uploads, as a backend may lack it."""

    put_unnamed = start_unnamed = put_unnamed_chunk = unnamed_progress = cancel_unnamed = None


def test_a_relay_that_cannot_name_uploads_gets_the_file_hashed_first(make_config, tmp_path, files, capsys):
    from socketserver import ThreadingMixIn
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

    class Server(ThreadingMixIn, WSGIServer):
        daemon_threads = True

    class QuietHandler(WSGIRequestHandler):
        def log_message(self, *args):
            pass

    config = make_config()
    app = file_relay.make_app(config, storage=_WithoutUnnamedUploads(config))
    server = make_server("127.0.0.1", 0, app, server_class=Server, handler_class=QuietHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/{SERVER_ID}"
        data, oid = blob(4 * CHUNK)
        assert client("send", url, write(tmp_path / "f", data), "--chunk-size", "256K") == 0
    finally:
        server.shutdown()
    assert (files / oid).read_bytes() == data
    assert f"{url}/{oid}?name=f" in capsys.readouterr().out


# -- verification --------------------------------------------------------------


def test_a_tampered_stored_file_makes_get_fail_and_leaves_no_file(live, tmp_path, http, files, capsys):
    relay = live()
    data, oid = blob(4 * CHUNK)
    assert http.put(relay.url(oid), data=data).status_code == 201
    with open(files / oid, "r+b") as stored:
        stored.seek(CHUNK)
        stored.write(b"\0" if data[CHUNK] else b"\1")
    (tmp_path / "received").mkdir()
    assert client("get", relay.url(oid), "-o", tmp_path / "received" / "copy") == file_relay.EXIT_FAILED
    assert "does not match its SHA-256" in capsys.readouterr().err
    assert os.listdir(tmp_path / "received") == []  # no output, no temporary file


@pytest.mark.parametrize("disguised", [False, True], ids=["plainly", "mtime-restored"])
def test_a_file_changed_while_it_is_sent_fails_and_the_relay_keeps_nothing(live, tmp_path, files, spawn, disguised):
    relay = live()
    data, oid = blob(16 * CHUNK)
    source = write(tmp_path / "f", data)
    before = os.stat(source)
    sender = spawn("send", relay.url(), source, "--chunk-size", "256K", "--limit-rate", "3M")
    wait_until(lambda: len(unnamed_markers(files)) >= 2, message="two chunks on the relay")
    with open(source, "r+b") as changing:
        changing.seek(len(data) - 10)  # in the last chunk, not sent yet
        changing.write(b"x" * 10)
    if disguised:  # as `touch -r` would: the same size and modification time
        os.utime(source, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert sender.wait(30) == file_relay.EXIT_FAILED
    assert "did the file change" in sender.err and sender.out == ""
    assert [name for name in os.listdir(files) if name != ".relay"] == []  # what it stored is deleted
    assert unnamed_uploads(files) == []


def test_a_small_file_changed_while_it_is_sent_fails_and_the_relay_keeps_nothing(live, tmp_path, files, spawn):
    relay = live()
    data, oid = blob(4 * CHUNK)  # one PUT, from memory
    source = write(tmp_path / "f", data)
    sender = spawn("send", relay.url(), source, "--limit-rate", "1M")
    partial = files / ".relay" / "partial" / oid
    wait_until(lambda: partial.exists(), message="the upload to start")
    with open(source, "r+b") as changing:
        changing.write(b"x" * 10)
    assert sender.wait(30) == file_relay.EXIT_FAILED
    assert "did the file change" in sender.err and sender.out == ""
    assert [name for name in os.listdir(files) if name != ".relay"] == []  # stored, then deleted


def test_a_file_that_shrinks_while_it_is_sent_fails_and_its_upload_is_cancelled(live, tmp_path, files, spawn):
    relay = live()
    data, _ = blob(16 * CHUNK)
    source = write(tmp_path / "f", data)
    sender = spawn("send", relay.url(), source, "--chunk-size", "256K", "--limit-rate", "3M")
    wait_until(lambda: len(unnamed_markers(files)) >= 2, message="two chunks on the relay")
    os.truncate(source, 4 * CHUNK)
    assert sender.wait(30) == file_relay.EXIT_FAILED
    assert f"{source}: it shrank while it was being sent" in sender.err
    wait_until(lambda: unnamed_uploads(files) == [], message="the upload to be cancelled")
    assert [name for name in os.listdir(files) if name != ".relay"] == []


@pytest.mark.parametrize("source", ["/dev/stdin", "/proc/self/status"], ids=["pipe", "proc"])
def test_what_is_not_a_plain_file_is_refused_and_nothing_stored(live, files, source):
    relay = live()
    reader, writer = os.pipe()
    os.write(writer, b"piped bytes\n")
    os.close(writer)
    argv = [sys.executable, ROOT / "file_relay.py", "send", relay.url(), source]
    result = subprocess.run(list(map(str, argv)), stdin=reader, capture_output=True, text=True, timeout=30)
    os.close(reader)
    assert result.returncode == file_relay.EXIT_LOCAL if source == "/dev/stdin" else file_relay.EXIT_FAILED
    assert ("not a regular file" if source == "/dev/stdin" else "did the file change") in result.stderr
    assert result.stdout == "" and [name for name in os.listdir(files) if name != ".relay"] == []


def test_an_upload_an_earlier_run_finished_unheard_is_not_sent_again(live, tmp_path, send_records, capsys):
    relay = live()
    data, oid = blob(8 * CHUNK)
    source = write(tmp_path / "f", data)
    started = requests.post(f"{relay.url()}/new/f", headers={"Upload-Length": str(len(data))})
    token = started.headers["Location"].rsplit("/", 1)[1]
    whole = {"Content-Range": f"bytes 0-{len(data) - 1}/{len(data)}"}
    assert requests.put(started.headers["Location"], data=data, headers=whole).status_code == 201
    address = file_relay.parse_relay_url(relay.url())
    key = file_relay._SendRecords.key(address, str(source), os.stat(source))
    file_relay._SendRecords(send_records).save(key, {"token": token})  # as a run killed before the answer left it
    logged(relay, "uploads", "PUT", lambda found: len(found) == 1)

    assert client("send", relay.url(), source, "--chunk-size", "256K") == 0
    assert "an earlier run stored it; nothing to send" in capsys.readouterr().err
    # A request after the run, once logged, shows that the run's own requests were logged too.
    assert requests.head(relay.url("0" * 64)).status_code == 404
    logged(relay, "0" * 64, "HEAD", lambda found: len(found) == 1)
    assert len(accesses(relay, "uploads", "PUT")) == 1 and len(accesses(relay, "new")) == 1


def test_a_record_with_a_token_that_is_not_one_is_ignored(live, tmp_path, send_records, files):
    relay = live()
    data, oid = blob(8 * CHUNK)
    source = write(tmp_path / "f", data)
    address = file_relay.parse_relay_url(relay.url())
    key = file_relay._SendRecords.key(address, str(source), os.stat(source))
    file_relay._SendRecords(send_records).save(key, {"token": "a b"})
    assert client("send", relay.url(), source, "--chunk-size", "256K", "--retry-for", "5") == 0
    assert (files / oid).read_bytes() == data


@pytest.mark.parametrize("leftover", [b"garbage", b"garbage" * 100_000], ids=["shorter", "longer"])
def test_a_foreign_partial_download_is_replaced_not_trusted(live, tmp_path, http, leftover, capsys):
    relay = live()
    data, oid = blob(100_000)
    assert http.put(relay.url(oid), data=data).status_code == 201
    write(tmp_path / ".copy.part", leftover)
    assert client("get", relay.url(oid), "-o", tmp_path / "copy") == 0
    assert (tmp_path / "copy").read_bytes() == data
    assert "starting over" in capsys.readouterr().err


def give_to_another_user(part, victim) -> None:
    write(part, b"x" * 10)
    os.chown(part, 65534, 65534)


# What may be planted at .NAME.part before get starts: (how, what get says, needs root).
PLANTED = {
    "symbolic link": (lambda part, victim: part.symlink_to(victim), "a symbolic link", False),
    "hard link": (lambda part, victim: os.link(victim, part), "a file with other hard links", False),
    "FIFO": (lambda part, victim: os.mkfifo(part), "not a regular file", False),
    "another user's file": (give_to_another_user, "another user's file", True),
}


@pytest.mark.parametrize("planted", list(PLANTED))
def test_get_never_writes_through_a_planted_partial_download(live, tmp_path, http, planted, capsys):
    plant, reason, needs_root = PLANTED[planted]
    if needs_root and os.geteuid() != 0:
        pytest.skip("needs root to give a file to another user")
    relay = live()
    data, oid = blob(100_000)
    assert http.put(relay.url(oid), data=data).status_code == 201
    shared = tmp_path / "shared"
    shared.mkdir()
    victim = write(tmp_path / "victim", b"precious")
    part = shared / ".report.txt.part"
    plant(part, victim)
    before = os.lstat(part)
    assert client("get", relay.url(oid), "-o", shared / "report.txt") == file_relay.EXIT_LOCAL
    assert f"refusing to write through {part}: it is {reason}" in capsys.readouterr().err
    assert victim.read_bytes() == b"precious"
    assert os.listdir(shared) == [part.name] and os.lstat(part) == before  # left as it was


class EndlessRelay(http.server.ThreadingHTTPServer):
    """A fake relay on 127.0.0.1 that announces an object of 1000 bytes (by Content-Length,
    or by Content-Range when asked for a range), then sends up to 64 MiB of it, chunked."""

    daemon_threads = True
    LENGTH, LIMIT, BLOCK = 1000, 64 << 20, 64 << 10

    def __init__(self):
        super().__init__(("127.0.0.1", 0), self.Handler)
        self.range_end = self.LENGTH - 1  # the last byte its Content-Range claims to send
        self.sent = 0
        self.finished = threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            relay = self.server
            if match := re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", "")):
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {match[1]}-{relay.range_end}/{relay.LENGTH}")
            else:
                self.send_response(200)
                self.send_header("Content-Length", str(relay.LENGTH))
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            chunk = b"%x\r\n%s\r\n" % (relay.BLOCK, b"x" * relay.BLOCK)
            try:
                while relay.sent < relay.LIMIT:
                    self.wfile.write(chunk)
                    relay.sent += relay.BLOCK
            except OSError:
                pass  # the client hung up
            self.close_connection = True
            relay.finished.set()

        def log_message(self, *args):
            pass


@pytest.fixture
def endless_relay():
    relay = EndlessRelay()
    serving = threading.Thread(target=relay.serve_forever, daemon=True)
    serving.start()
    yield relay
    relay.shutdown()
    relay.server_close()
    serving.join(10)


@pytest.mark.parametrize("announced_by", ["Content-Length", "Content-Range", "Content-Range past the end"])
def test_get_stops_at_the_length_the_relay_announced_and_keeps_nothing(endless_relay, tmp_path, announced_by, capsys):
    """More bytes than announced cannot all be the object: get stops at once, fails, and
    keeps none of them. A range that ends past the object's length is not believed."""
    oid = sha256(b"x" * EndlessRelay.LENGTH)
    target, part = tmp_path / "copy", tmp_path / ".copy.part"
    if announced_by != "Content-Length":
        write(part, b"x" * 100)  # an earlier run's bytes: get asks for the rest
    if announced_by == "Content-Range past the end":
        endless_relay.range_end = EndlessRelay.LIMIT * 2
    url = f"http://127.0.0.1:{endless_relay.server_address[1]}/{SERVER_ID}/{oid}"
    assert client("get", url, "-o", target, "--retry-for", "0") == file_relay.EXIT_FAILED
    assert "bytes it announced; nothing was saved" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []
    assert endless_relay.finished.wait(10)
    assert endless_relay.sent < 16 << 20  # the client hung up soon after the announced length


def test_get_of_a_missing_object_fails_after_the_wait(live, tmp_path):
    relay = live()
    assert client("get", relay.url("a" * 64), "-o", tmp_path / "x", "--wait", "0") == file_relay.EXIT_FAILED
    assert not (tmp_path / "x").exists() and not (tmp_path / ".x.part").exists()


def test_a_wrong_server_id_fails_at_once(live, tmp_path, capsys):
    relay = live()
    url = relay.url(server_id="not-the-server-id-0123456789")
    assert client("send", url, write(tmp_path / "f", b"data")) == file_relay.EXIT_FAILED
    assert "403" in capsys.readouterr().err


# -- parallel chunks -------------------------------------------------------------


def test_parallel_chunks_are_in_flight_at_once(live, tmp_path, files, monkeypatch):
    relay = live()
    data, oid = blob(16 * CHUNK)
    together = threading.Barrier(4, timeout=10)  # broken unless four chunks are in flight at once
    calls = []
    put_piece = file_relay._OnePassUpload._put_piece

    def observed(self, connection, token, first, data, final):
        calls.append(first)
        if len(calls) <= 4:
            together.wait()
        return put_piece(self, connection, token, first, data, final)

    monkeypatch.setattr(file_relay._OnePassUpload, "_put_piece", observed)
    source = write(tmp_path / "f", data)
    assert client("send", relay.url(), source, "--chunk-size", "256K", "--parallel", "4") == 0
    assert sorted(calls) == list(range(0, len(data), CHUNK))
    assert (files / oid).read_bytes() == data


# -- command line, TLS, standard library only ---------------------------------------


def test_send_and_get_help_explain_exit_codes_and_the_server_form(capsys):
    for command in ("send", "get"):
        with pytest.raises(SystemExit) as exit_info:
            file_relay.main([command, "--help"])
        assert exit_info.value.code == 0
        text = capsys.readouterr().out
        assert f"file_relay.py {command}" in text and "exit status" in text and "--server-id" in text
    with pytest.raises(SystemExit):
        file_relay.main(["--help"])
    assert "--server-id" in capsys.readouterr().out.split("built-in client")[-1]


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["send", f"http://h:1/{SERVER_ID}/{'a' * 64}", "README.md"], "object URL"),
        (["send", "ftp://h/x", "README.md"], "not an http"),
        (["send", f"http://h:1/{SERVER_ID}", "/nonexistent"], "file"),
        (["get", f"http://h:1/{SERVER_ID}"], "not an object URL"),
        (["send", f"http://h:1/{SERVER_ID}", "README.md", "--chunk-size", "0"], "chunk size"),
        (["get", f"http://h:1/{SERVER_ID}/{'a' * 64}", "-o", "-"], "not supported"),
        (["get", f"http://h:1/{SERVER_ID}/{'a' * 64}", "--timeout", "0"], "timeout"),
        (["--bind", "127.0.0.1:0", "send"], "--server-id send"),
    ],
)
def test_usage_errors_exit_2_with_one_line(argv, expected, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exit_info:
        file_relay.main(argv)
    assert exit_info.value.code == file_relay.EXIT_USAGE
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith("file_relay.py") and expected in message


def test_a_server_id_spelled_send_is_given_with_the_option(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(file_relay, "serve", lambda config: seen.append(config) or 0)
    assert file_relay.main(["--server-id", "send", "--files-directory", str(tmp_path)]) == 0
    assert seen[0].server_id == "send"


def test_the_client_needs_only_the_standard_library(live, tmp_path, spawn):
    bare = (sys.executable, "-I", "-S")  # no site-packages: no bottle, no gunicorn
    probe = subprocess.run([*bare, "-c", "import bottle"], capture_output=True)
    assert probe.returncode != 0, "this interpreter finds bottle even without site-packages"
    importing = f"import sys; sys.path.insert(0, {str(ROOT)!r}); import file_relay"
    imported = subprocess.run([*bare, "-c", importing], capture_output=True, text=True)
    assert imported.returncode == 0, imported.stderr
    relay = live()
    data, oid = blob(3 * CHUNK + 5)
    sender = spawn("send", relay.url(), write(tmp_path / "f", data), "--chunk-size", "256K", python=bare)
    assert sender.wait() == 0, sender.err
    getter = spawn("get", relay.url(oid), "-o", tmp_path / "copy", python=bare)
    assert getter.wait() == 0, getter.err
    assert (tmp_path / "copy").read_bytes() == data


def test_https_needs_the_ca_certificate_or_insecure(live, tmp_path, certificate, capsys):
    cert, key = certificate
    relay = live("--certfile", cert, "--keyfile", key)
    data, oid = blob(3 * CHUNK)
    source = write(tmp_path / "f", data)
    assert client("send", relay.url(), source) == file_relay.EXIT_NETWORK
    assert "--cacert" in capsys.readouterr().err
    assert client("send", relay.url(), source, "--cacert", cert, "--chunk-size", "256K") == 0
    assert client("get", relay.url(oid), "-o", tmp_path / "copy", "--insecure") == 0
    assert (tmp_path / "copy").read_bytes() == data


# -- the one-pass upload's handoff -----------------------------------------------------


def test_the_handoff_gives_every_chunk_to_some_sender_however_threads_interleave():
    """The reader hands over its last chunk just as a sender finds the queue empty: that
    chunk must still be taken (thread switches forced as often as the interpreter can)."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for _ in range(1000):
            handoff = file_relay._Handoff(poll=0.0005)  # a sender's wait times out all the time
            taken = []
            sender = threading.Thread(target=lambda: taken.extend(iter(handoff.take, None)))  # noqa: B023
            sender.start()
            assert handoff.give("the only chunk")
            handoff.end(senders=1)
            sender.join(10)
            assert taken == ["the only chunk"]
    finally:
        sys.setswitchinterval(interval)


def test_the_handoff_remembers_that_an_answer_created_the_object():
    handoff = file_relay._Handoff()
    handoff.answered(("f" * 64, True))  # two chunks completed it together: 201, then 200
    handoff.answered(("f" * 64, False))
    assert handoff.named == ("f" * 64, True)
