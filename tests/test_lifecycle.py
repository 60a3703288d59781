"""Lifecycle, limits and observability: expiry, download limits, quotas, drain, metrics."""

import concurrent.futures
import json
import os
import re
import shutil
import signal
import socket
import threading
import time

import pytest
import requests
from conftest import ROOT, SERVER_ID, Paced, RelayProcess, blob, object_url, wait_until

import file_relay


def age(path, seconds: float) -> None:
    """Make a stored object look *seconds* older (its mtime is its completion time)."""
    then = time.time() - seconds
    os.utime(path, (then, then))


# -- expiry ---------------------------------------------------------------------


def test_objects_expire_ttl_after_their_upload(make_app, files):
    app = make_app(ttl=3600)
    data, oid = blob(1000)
    app.put(object_url(oid), data, status=201)
    response = app.head(object_url(oid))
    assert 0.04 < float(response.headers["X-Remaining-Days"]) <= 0.042  # 1/24, to 3 decimals
    assert response.headers["Expires"]
    age(files / oid, 3599)
    app.get(object_url(oid), status=200)
    age(files / oid, 3601)
    app.get(object_url(oid), status=404)
    assert not (files / oid).exists()


def test_by_default_objects_never_expire(app, files):
    data, oid = blob(1000)
    app.put(object_url(oid), data)
    age(files / oid, 10 * 365 * 86400)
    response = app.get(object_url(oid), status=200)
    assert "Expires" not in response.headers and "X-Remaining-Downloads" not in response.headers


def test_max_days_asks_for_less_and_is_capped(make_app, files):
    app = make_app(ttl=7 * 86400)
    short, short_oid = blob(1000, seed=1)
    app.put(object_url(short_oid), short, headers={"Max-Days": "0.5"}, status=201)
    assert float(app.head(object_url(short_oid)).headers["X-Remaining-Days"]) <= 0.5
    age(files / short_oid, 13 * 3600)
    app.get(object_url(short_oid), status=404)
    long, long_oid = blob(1000, seed=2)
    app.put(object_url(long_oid), long, headers={"Max-Days": "30"}, status=201)
    assert float(app.head(object_url(long_oid)).headers["X-Remaining-Days"]) <= 7  # capped by --ttl


def test_max_ttl_lets_clients_ask_for_more_than_the_default(make_app, files):
    app = make_app(ttl=86400, max_ttl=10 * 86400)
    data, oid = blob(1000)
    app.put(object_url(oid), data, headers={"Max-Days": "30"}, status=201)
    assert 9.9 < float(app.head(object_url(oid)).headers["X-Remaining-Days"]) <= 10
    age(files / oid, 5 * 86400)
    app.get(object_url(oid), status=200)  # past --ttl, within what it asked for


def test_bad_limits_are_400(app):
    data, oid = blob(100)
    for headers in ({"Max-Days": "soon"}, {"Max-Days": "-1"}, {"Max-Days": "nan"}, {"Max-Downloads": "0"}):
        app.put(object_url(oid), data, headers=headers, status=400)
    app.get(object_url(oid), status=404)


# -- download limits -----------------------------------------------------------------


def test_max_downloads_counts_whole_downloads_only(app, files):
    data, oid = blob(5000)
    app.put(object_url(oid), data, headers={"Max-Downloads": "2"}, status=201)
    assert app.head(object_url(oid)).headers["X-Remaining-Downloads"] == "2"
    app.get(object_url(oid), headers={"Range": "bytes=0-99"}, status=206)
    app.get(object_url(oid), headers={"If-None-Match": f'"{oid}"'}, status=304)
    app.head(object_url(oid), status=200)
    assert app.head(object_url(oid)).headers["X-Remaining-Downloads"] == "2"
    first = app.get(object_url(oid), status=200)
    assert first.body == data and first.headers["X-Remaining-Downloads"] == "1"
    assert app.head(object_url(oid)).headers["X-Remaining-Downloads"] == "1"
    assert app.get(object_url(oid), status=200).headers["X-Remaining-Downloads"] == "0"
    app.get(object_url(oid), status=404)
    assert not (files / oid).exists()
    assert os.listdir(files / ".relay" / "meta") == []


def test_the_sweeper_removes_expired_objects_and_stale_limits(make_app, make_config, files):
    app = make_app(ttl=60)
    data, oid = blob(1000)
    app.put(object_url(oid), data, headers={"Max-Downloads": "3"})
    kept, kept_oid = blob(1000, seed=1)
    app.put(object_url(kept_oid), kept)
    age(files / oid, 120)
    stores = [file_relay.Store(make_config(ttl=60)) for _ in range(4)]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:  # several sweepers at once
        results = list(pool.map(lambda store: store.sweep(), stores))
    assert sum(result["objects"] for result in results) == 1
    assert not (files / oid).exists() and (files / kept_oid).exists()
    for path in (files / ".relay" / "meta").iterdir():
        age(path, 120)  # limits younger than a minute are spared (their upload may be starting)
    stores[0].sweep()
    assert os.listdir(files / ".relay" / "meta") == []


def test_an_aborted_download_does_not_count(live):
    relay = live()
    data, oid = blob(32 << 20)
    assert requests.put(relay.url(oid), data=data, headers={"Max-Downloads": "1"}).status_code == 201
    with requests.get(relay.url(oid), stream=True, timeout=30) as response:
        assert response.status_code == 200
        response.raw.read(1 << 20)  # then hang up
    wait_until(lambda: requests.get(relay.url()).json()["downloads_in_progress"] == 0, message="the abort")
    assert requests.head(relay.url(oid)).headers["X-Remaining-Downloads"] == "1"
    assert requests.get(relay.url(oid)).content == data
    assert requests.get(relay.url(oid)).status_code == 404


def test_concurrent_downloads_of_the_last_copies_never_exceed_the_limit(live, files):
    relay = live("--workers", "2")
    data, oid = blob(8 << 20)
    assert requests.put(relay.url(oid), data=data, headers={"Max-Downloads": "2"}).status_code == 201
    barrier = threading.Barrier(6)

    def download():
        with requests.Session() as session:
            barrier.wait()
            with session.get(relay.url(oid), stream=True, timeout=30) as response:
                if response.status_code != 200:
                    return response.status_code, 0
                time.sleep(1)  # hold the transfer open while the others ask
                return 200, len(response.content)

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda _: download(), range(6)))
    whole = [size for status, size in results if status == 200]
    assert whole == [len(data)] * 2
    assert sorted(status for status, _ in results if status != 200) == [409] * 4
    assert requests.get(relay.url(oid)).status_code == 404
    assert not (files / oid).exists()


def test_a_follower_of_a_limited_upload_counts(live):
    relay = live()
    data, oid = blob(2 << 20)

    def body():  # the second half only once the reader follows the upload
        yield data[: 1 << 20]
        wait_until(lambda: requests.get(relay.url()).json()["downloads_in_progress"] == 1, message="the follower")
        yield data[1 << 20 :]

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        reader = pool.submit(requests.get, relay.url(oid) + "?wait=30", timeout=60)
        wait_until(lambda: requests.get(relay.url()).json()["waiting_readers"] == 1, message="the reader")
        assert requests.put(relay.url(oid), data=body(), headers={"Max-Downloads": "1"}).status_code == 201
        response = reader.result()
        assert response.content == data and "ETag" not in response.headers  # it followed the upload
    # Counted once its last byte has gone out, which the client may see first.
    wait_until(lambda: requests.head(relay.url(oid)).status_code == 404, message="the download to count")


# -- quotas ------------------------------------------------------------------------


def start_raw_upload(relay, oid: str, length: int, first_bytes: bytes) -> socket.socket:
    host, port = relay.address
    sock = socket.create_connection((host, port), timeout=10)
    sock.sendall(f"PUT /{SERVER_ID}/{oid} HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n".encode())
    sock.sendall(first_bytes)
    return sock


def test_max_disk_counts_stored_and_in_progress_uploads(live, files):
    relay = live("--max-disk", "10M")
    first, first_oid = blob(6 << 20, seed=1)
    second, second_oid = blob(6 << 20, seed=2)
    upload = start_raw_upload(relay, first_oid, len(first), first[:1000])
    partial = files / ".relay" / "partial" / first_oid
    wait_until(partial.exists, message="the first upload to start")
    response = requests.put(relay.url(second_oid), data=second)  # fits alone, not with the first
    assert response.status_code == 507 and "quota" in response.text
    upload.sendall(first[1000:])
    assert upload.recv(100).startswith(b"HTTP/1.1 201")
    upload.close()
    small, small_oid = blob(4 << 20, seed=3)
    assert requests.put(relay.url(small_oid), data=small + b"x").status_code == 507  # 6 + 4 MiB + 1 > 10 MiB
    assert requests.put(relay.url(small_oid), data=small).status_code == 201


def test_max_disk_holds_for_uploads_of_unknown_length(live, files):
    """A body sent without a Content-Length cannot be judged up front: the quota is
    checked as it arrives and before it is stored, so it never ends up over the quota."""
    relay = live("--max-disk", "10M")
    stored, stored_oid = blob(4 << 20, seed=1)
    assert requests.put(relay.url(stored_oid), data=stored).status_code == 201

    def unsized(data: bytes):
        return (data[i : i + 65536] for i in range(0, len(data), 65536))  # sent chunked

    for size in (7 << 20, (6 << 20) + 1):  # over the 6 MiB left: by a lot, and by a byte
        data, oid = blob(size, seed=size)
        response = requests.put(relay.url(oid), data=unsized(data))
        assert response.status_code == 507 and "quota" in response.text, size
        assert not (files / oid).exists()
    wait_until(lambda: not os.listdir(files / ".relay" / "partial"), message="the refused partials to go")
    assert requests.get(relay.url()).json()["stored_bytes"] == 4 << 20
    fits, fits_oid = blob(6 << 20, seed=2)  # exactly what is left
    assert requests.put(relay.url(fits_oid), data=unsized(fits)).status_code == 201


def test_max_disk_admits_one_of_eight_racing_uploads_that_fit_only_alone(live, files):
    relay = live("--max-disk", "10M", "--workers", "4")
    data = [blob(6 << 20, seed=10 + i) for i in range(8)]
    for _ in range(3):
        barrier = threading.Barrier(len(data))

        def put(item, barrier=barrier):
            barrier.wait()
            content, oid = item
            return requests.put(relay.url(oid), data=content).status_code

        with concurrent.futures.ThreadPoolExecutor(len(data)) as pool:
            statuses = sorted(pool.map(put, data))
        assert statuses == [201] + [507] * 7
        stored = [oid for _, oid in data if (files / oid).exists()]
        assert len(stored) == 1
        assert requests.delete(relay.url(stored[0])).status_code == 200


def test_min_free_is_judged_before_the_body_is_read(live, small_filesystem):
    files = small_filesystem("100m") / "files"
    relay = live("--min-free", "40M", files_dir=files)  # about 60 MiB may be used
    host, port = relay.address

    def announce(oid: str, length: int) -> bytes:
        with socket.create_connection((host, port), timeout=10) as sock:
            sock.sendall(f"PUT /{SERVER_ID}/{oid} HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n".encode())
            return sock.recv(1000)

    answer = announce("a" * 64, 70 << 20)
    assert answer.startswith(b"HTTP/1.1 507") and b"Connection: close" in answer
    # Two uploads that each fit, but not together: the second is refused.
    first = start_raw_upload(relay, "b" * 64, 40 << 20, b"x" * 1000)
    wait_until((files / ".relay" / "partial" / ("b" * 64)).exists, message="the first upload")
    assert announce("c" * 64, 40 << 20).startswith(b"HTTP/1.1 507")
    first.close()
    wait_until(lambda: not (files / ".relay" / "partial" / ("b" * 64)).exists(), message="the first to fail")
    second = start_raw_upload(relay, "c" * 64, 40 << 20, b"x" * 1000)  # now it fits
    wait_until((files / ".relay" / "partial" / ("c" * 64)).exists, message="the second upload")
    second.close()


# -- start -------------------------------------------------------------------------------


def master_command_line(relay: RelayProcess) -> list[str]:
    with open(f"/proc/{relay.process.pid}/cmdline", "rb") as cmdline:
        return cmdline.read().decode().rstrip("\0").split("\0")


def test_a_relay_run_from_its_file_runs_again_from_its_bytecode(tmp_path):
    """`python file_relay.py` compiles the file, and what compiling leaves on the heap would
    stay in the master and every worker: the master runs itself again from the bytecode,
    written beside the file even where Python is told to write none, with the
    interpreter's options and the relay's arguments as given."""
    script = tmp_path / "app" / "file_relay.py"
    script.parent.mkdir()
    shutil.copy(ROOT / "file_relay.py", script)
    env = {"PYTHONDONTWRITEBYTECODE": "1", "RELAY_SERVER_ID": SERVER_ID}
    relay = RelayProcess(
        tmp_path / "files",
        tmp_path / "relay.log",
        ["--ttl", "172800"],
        env=env,
        script=script,
        interpreter_flags=["-X", "utf8"],
    )
    try:
        relay.start()
        command = master_command_line(relay)
        assert command[1:4] == ["-X", "utf8", "-c"]
        files = str(tmp_path / "files")
        assert command[5:] == [str(script), "--bind", "127.0.0.1:0", "--files-directory", files, "--ttl", "172800"]
        assert list((script.parent / "__pycache__").glob("file_relay.*.pyc"))
        data, oid = blob(100_000)
        assert requests.put(f"{relay.base}/{SERVER_ID}/{oid}", data=data, timeout=30).status_code == 201
        response = requests.get(f"{relay.base}/{SERVER_ID}/{oid}", timeout=30)
        assert response.content == data and response.headers["X-Remaining-Days"].startswith("2")
        assert requests.get(f"{relay.base}/{SERVER_ID}", timeout=30).json()["limits"]["ttl"] == 2 * 86400
    finally:
        relay.stop()
    assert relay.process.returncode == 0


def test_where_its_bytecode_cannot_be_written_the_relay_runs_from_its_file(tmp_path):
    script = tmp_path / "app" / "file_relay.py"
    script.parent.mkdir()
    shutil.copy(ROOT / "file_relay.py", script)
    (script.parent / "__pycache__").write_text("a file, where the bytecode's directory would be")
    relay = RelayProcess(tmp_path / "files", tmp_path / "relay.log", env={"RELAY_SERVER_ID": SERVER_ID}, script=script)
    try:
        relay.start()
        assert master_command_line(relay)[1:3] == [str(script), "--bind"]
        data, oid = blob(1000)
        assert requests.put(f"{relay.base}/{SERVER_ID}/{oid}", data=data, timeout=30).status_code == 201
        assert requests.get(f"{relay.base}/{SERVER_ID}/{oid}", timeout=30).content == data
    finally:
        relay.stop()


# -- drain and shutdown ----------------------------------------------------------------


def slow_put(url: str, data: bytes, seconds: float, **kwargs):
    return requests.put(url, data=Paced(data, seconds, pieces=20), timeout=60, **kwargs)


def test_a_drain_refuses_new_uploads_lets_transfers_finish_then_exits_zero(live, files):
    relay = live()
    data, oid = blob(2 << 20)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        upload = pool.submit(slow_put, relay.url(oid), data, 3)
        wait_until(lambda: requests.get(relay.url()).json()["uploads_in_progress"] == 1, message="the upload")
        assert requests.delete(relay.url()).status_code == 200
        wait_until(lambda: requests.get(relay.url()).json()["draining"], message="the drain")
        other, other_oid = blob(1000, seed=1)
        refused = requests.put(relay.url(other_oid), data=other)
        assert refused.status_code == 503 and refused.headers["Retry-After"]
        assert upload.result().status_code == 201
    assert relay.wait_exit(20) == 0
    assert (files / oid).read_bytes() == data


def test_sigterm_drains_too_and_a_download_in_flight_finishes(live):
    relay = live()
    data, oid = blob(16 << 20)
    assert requests.put(relay.url(oid), data=data).status_code == 201
    with requests.get(relay.url(oid), stream=True, timeout=30) as response:
        first = response.raw.read(1 << 20)
        relay.signal(signal.SIGTERM)
        time.sleep(1)
        rest = response.raw.read()
    assert first + rest == data
    assert relay.wait_exit(20) == 0


def test_the_graceful_timeout_bounds_the_drain(live):
    relay = live("--graceful-timeout", "1")
    data, oid = blob(1 << 20)
    upload = start_raw_upload(relay, oid, len(data), data[:1000])  # and never more
    wait_until(lambda: requests.get(relay.url()).json()["uploads_in_progress"] == 1, message="the upload")
    started = time.monotonic()
    relay.signal(signal.SIGTERM)
    assert relay.wait_exit(20) == 0
    assert time.monotonic() - started < 8
    upload.close()


def test_a_retried_shutdown_request_cuts_no_transfer(live, files):
    """DELETE /<sid> asked for twice at once (on two workers), and again once the drain
    has begun, is asked for once: the upload in flight finishes and the relay exits 0."""
    relay = live("--workers", "2")
    data, oid = blob(2 << 20)
    barrier = threading.Barrier(2)

    def shut_down():
        with requests.Session() as session:
            barrier.wait()
            return session.delete(relay.url(), timeout=10).status_code

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        upload = pool.submit(slow_put, relay.url(oid), data, 4)
        wait_until(lambda: requests.get(relay.url()).json()["uploads_in_progress"] == 1, message="the upload")
        assert list(pool.map(lambda _: shut_down(), range(2))) == [200, 200]
        wait_until(lambda: "draining:" in relay.log(), timeout=5, message="the master to start draining")
        assert requests.delete(relay.url(), timeout=10).status_code == 200
        assert upload.result().status_code == 201
    assert relay.wait_exit(20) == 0
    assert (files / oid).read_bytes() == data
    assert "exiting now" not in relay.log()


@pytest.mark.parametrize("first", ["SIGTERM", "DELETE"])
def test_a_second_signal_exits_at_once(live, first):
    relay = live("--graceful-timeout", "60")
    data, oid = blob(1 << 20)
    upload = start_raw_upload(relay, oid, len(data), data[:1000])
    wait_until(lambda: requests.get(relay.url()).json()["uploads_in_progress"] == 1, message="the upload")
    if first == "SIGTERM":
        relay.signal(signal.SIGTERM)
    else:
        assert requests.delete(relay.url()).status_code == 200
    wait_until(lambda: "draining:" in relay.log(), timeout=5, message="the master to start draining")
    started = time.monotonic()
    relay.signal(signal.SIGINT)
    assert relay.wait_exit(20) == 0
    assert time.monotonic() - started < 5
    upload.close()


def test_purge_on_exit_removes_every_object(live, files):
    relay = live("--purge-on-exit")
    data, oid = blob(1000)
    assert requests.put(relay.url(oid), data=data).status_code == 201
    chunk = {"Content-Range": f"bytes 0-99/{len(data)}"}
    other, other_oid = blob(1000, seed=1)
    assert requests.put(relay.url(other_oid), data=other[:100], headers=chunk).status_code == 202
    assert requests.delete(relay.url()).status_code == 200
    assert relay.wait_exit(20) == 0
    assert os.listdir(files) == []


def test_the_sweeper_runs_in_a_live_relay(live, files):
    relay = live("--ttl", "1", "--sweep-interval", "0.5")
    data, oid = blob(1000)
    assert requests.put(relay.url(oid), data=data).status_code == 201
    wait_until(lambda: not (files / oid).exists(), message="the sweeper", timeout=15)


# -- observability ---------------------------------------------------------------------


def test_status_reports_activity_totals_and_limits(live):
    relay = live("--max-file-size", "1G", "--ttl", "3600")
    data, oid = blob(1 << 20)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        upload = pool.submit(slow_put, relay.url(oid), data, 2)
        wait_until(
            lambda: (r := requests.get(relay.url()).json())["uploads_in_progress"] == r["partial_uploads"] == 1,
            message="the upload in the report",
        )
        assert upload.result().status_code == 201
    requests.get(relay.url(oid))
    requests.get(relay.url("0" * 64) + "?wait=0")
    report = requests.get(relay.url()).json()
    assert (report["stored_objects"], report["stored_bytes"]) == (1, len(data))
    assert report["partial_uploads"] == report["uploads_in_progress"] == report["downloads_in_progress"] == 0
    totals = report["totals"]
    assert totals["bytes_in"] >= len(data) and totals["bytes_out"] >= len(data)
    assert totals["requests"]["2xx"] >= 3 and totals["requests"]["4xx"] == 1
    assert report["limits"]["max_file_size"] == 1 << 30 and report["limits"]["ttl"] == 3600
    assert report["draining"] is False


PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8,application/openmetrics-text;"
    "version=0.0.1;q=0.75,text/plain;version=1.0.0;escaping=allow-utf-8;q=0.5,text/plain;version=0.0.4;q=0.4,*/*;q=0.1"
)


def test_prometheus_text_when_asked(app):
    data, oid = blob(1000)
    app.put(object_url(oid), data)
    for response in (
        app.get(f"/{SERVER_ID}", headers={"Accept": PROMETHEUS_ACCEPT}),
        app.get(f"/{SERVER_ID}?format=prometheus"),
    ):
        assert response.content_type == "text/plain"
        samples = {}
        for line in response.text.splitlines():
            if line.startswith("#"):
                assert re.fullmatch(r"# (HELP|TYPE) file_relay_\w+ .+", line)
                continue
            name, value = line.rsplit(" ", 1)
            assert re.fullmatch(r'file_relay_\w+(\{\w+="[^"]*"\})?', name)
            samples[name] = float(value)
        assert samples["file_relay_stored_objects"] == 1
        assert samples['file_relay_requests_total{class="2xx"}'] >= 1
        assert samples["file_relay_draining"] == 0
    assert app.get(f"/{SERVER_ID}").content_type == "application/json"


def test_json_log_format(live):
    relay = live("--log-format", "json")
    data, oid = blob(1000)
    requests.put(relay.url(oid), data=data)
    requests.get(relay.url(oid, server_id="wrong"))
    relay.signal(signal.SIGTERM)
    relay.wait_exit(20)
    entries = [json.loads(line) for line in relay.log().splitlines()]  # every line is JSON
    access = [entry for entry in entries if "status" in entry]
    assert [(entry["method"], entry["status"]) for entry in access] == [("PUT", 201), ("GET", 403)]
    assert access[0]["path"] == f"/***/{oid}" and access[0]["bytes_in"] == 1000
    assert any("Listening at" in entry.get("message", "") for entry in entries)
    assert SERVER_ID not in relay.log()
