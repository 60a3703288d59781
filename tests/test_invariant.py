"""The storage invariant under the interleavings and leftovers that random tests miss:
a name always means exactly its bytes, with its limits, and nothing acknowledged is lost.

Each test makes one narrow window certain (a request paused at a known point, the state
a crash leaves behind, an entry planted in the files directory) instead of hoping that
random timing reaches it. The crash-point and delay-injection suites (test_crashpoints,
test_races) explore the same windows with strace.
"""

import concurrent.futures
import fcntl
import http.client
import os
import socket
import stat
import threading
import time

import pytest
import requests
from conftest import SERVER_ID, blob, object_url, wait_until
from invariants import answered, finisher_waiting, verify_objects

import file_relay


def put_chunk(app, oid, first, last, total, body, status="*", **headers):
    headers = {"Content-Range": f"bytes {first}-{last}/{total}", **headers}
    return app.put(object_url(oid), body, headers=headers, status=status)


# -- 1: a cancelled attempt's state never carries over to the next ---------------------


@pytest.mark.parametrize("round_", range(4))
def test_a_cancelled_attempts_running_hash_is_never_reused(app, files, round_):
    """Chunk 0-99, DELETE, then a new attempt whose first chunk is zeros: the finisher
    must hash what the new attempt holds, not resume the cancelled attempt's hash (the
    freed inode number is often given to the new attempt's data file)."""
    data, oid = blob(300, seed=round_)
    put_chunk(app, oid, 0, 99, 300, data[:100], status=202)
    app.delete(object_url(oid), status=200)
    put_chunk(app, oid, 100, 199, 300, data[100:200], status=202)
    put_chunk(app, oid, 0, 99, 300, bytes(100), status=202)
    response = put_chunk(app, oid, 200, 299, 300, data[200:], status="*")
    assert response.status_int == 400, response.text
    assert verify_objects(files) == {}
    app.get(object_url(oid), status=404)


@pytest.mark.parametrize("round_", range(4))
def test_a_correct_attempt_after_a_wrong_one_is_stored(app, files, round_):
    data, oid = blob(300, seed=round_)
    put_chunk(app, oid, 0, 99, 300, bytes(100), status=202)
    app.delete(object_url(oid), status=200)
    put_chunk(app, oid, 100, 199, 300, data[100:200], status=202)
    put_chunk(app, oid, 0, 99, 300, data[:100], status=202)
    put_chunk(app, oid, 200, 299, 300, data[200:], status=201)
    assert verify_objects(files) == {oid: 300}


# -- 2: no request writes to a data file while it becomes the object -------------------


def test_a_chunk_racing_the_completing_chunk_never_writes_into_the_object(make_app, make_config, files, monkeypatch):
    """A retried sub-range of chunk 0, holding zeros, has found its upload current and is
    paused just before it looks at the acknowledged ranges; meanwhile chunk 1 completes
    the object. The completion must wait for it (publishing excludes writers), and the
    zeros must be compared, refused, and never reach the object."""
    app = make_app()
    data, oid = blob(2 << 20)
    half = len(data) // 2
    put_chunk(app, oid, 0, half - 1, len(data), data[:half], status=202)
    store = file_relay.Store(make_config())
    joined, release = threading.Event(), threading.Event()
    original = file_relay.Store._receive_chunk
    racer = []

    def paused_receive(self, *args, **kwargs):
        if threading.current_thread() in racer:
            joined.set()
            release.wait(20)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(file_relay.Store, "_receive_chunk", paused_receive)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:

        def race():
            racer.append(threading.current_thread())
            try:
                return file_relay.status_of(
                    store.put_chunk(oid, 1024, 2047, len(data), [bytes(1024)], None, file_relay.Limits())
                )
            except file_relay.StorageError as exc:
                return file_relay.status_of(exc)

        racing = pool.submit(race)
        assert joined.wait(10)
        completing = pool.submit(put_chunk, app, oid, half, len(data) - 1, len(data), data[half:])
        # Until the racer goes, the completion must not publish: it waits for writers.
        wait_until(lambda: completing.done() or finisher_waiting(files, oid), message="the completing chunk")
        published_early = (files / oid).exists()
        release.set()
        assert racing.result(20) in (200, 409)
        assert completing.result(20).status_int == 201
    assert not published_early
    assert verify_objects(files) == {oid: len(data)}
    assert (files / oid).read_bytes() == data


def test_a_chunk_written_while_another_request_completes_the_object_gets_200(app, make_config, files):
    data, oid = blob(300_000)
    put_chunk(app, oid, 100_000, 199_999, len(data), data[100_000:200_000], status=202)
    put_chunk(app, oid, 200_000, 299_999, len(data), data[200_000:], status=202)
    store = file_relay.Store(make_config())
    ready, release = threading.Event(), threading.Event()

    def slow_first_chunk():
        yield data[:50_000]
        ready.set()
        release.wait(20)
        yield data[50_000:100_000]

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        writer = pool.submit(
            lambda: answered(store.put_chunk(oid, 0, 99_999, len(data), slow_first_chunk(), None, file_relay.Limits()))
        )
        assert ready.wait(10)
        # A retry of the last chunk while the first is half-written: it is compared, and
        # as the upload is not complete it is acknowledged; the first chunk completes it.
        put_chunk(app, oid, 200_000, 299_999, len(data), data[200_000:], status=202)
        release.set()
        assert writer.result(20) == (201, None)
    assert (files / oid).read_bytes() == data
    assert os.listdir(files / ".relay" / "partial") == []


# -- 3: a download budget is judged on what is being served -----------------------------


def limited_object(make_config, max_downloads: int) -> tuple:
    """A store holding a 5000-byte object with a download budget: (store, data, oid)."""
    store = file_relay.Store(make_config())
    store.prepare()
    data, oid = blob(5000)
    assert store.put_stream(oid, [data], len(data), file_relay.Limits(max_downloads=max_downloads))
    return store, data, oid


def test_a_download_that_opened_a_used_up_object_is_refused(make_config, files):
    """Two downloads open an object with Max-Downloads: 1; the first completes, which
    removes the object. The second, holding the object open, must not get a slot."""
    store, data, oid = limited_object(make_config, max_downloads=1)
    first, second = store.open(oid), store.open(oid)
    try:
        ticket = store.reserve_download(first)
        with pytest.raises(file_relay.StorageError) as refused:
            store.reserve_download(second)
        assert file_relay.status_of(refused.value) == 409  # the last download is in flight
        ticket.complete()
        with pytest.raises(file_relay.StorageError) as gone:
            store.reserve_download(second)
        assert file_relay.status_of(gone.value) == 404
    finally:
        first.close()
        second.close()
    assert not (files / oid).exists()
    assert os.listdir(files / ".relay" / "meta") == []


def test_a_download_that_opened_an_object_as_its_last_download_removed_it_is_refused(make_config, files, monkeypatch):
    """A GET has opened an object with Max-Downloads: 1 and is about to read its limits
    when the last allowed download completes and removes the object and its limits. It
    must not take the missing limits for none, and serve an unlimited download."""
    store, data, oid = limited_object(make_config, max_downloads=1)
    first = store.open(oid)
    ticket = store.reserve_download(first)
    opened, release = threading.Event(), threading.Event()
    original = file_relay.Store._read_limits
    late = []

    def paused_read_limits(self, name):
        if threading.current_thread() in late:
            opened.set()
            release.wait(20)
        return original(self, name)

    monkeypatch.setattr(file_relay.Store, "_read_limits", paused_read_limits)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:

        def open_late():
            late.append(threading.current_thread())
            return store.open(oid)

        second = pool.submit(open_late)
        assert opened.wait(10)
        ticket.complete()  # the last allowed download: the object and its limits go
        first.close()
        release.set()
        opened_late = second.result(20)
    if opened_late is not None:
        obj = opened_late.object
        opened_late.close()
        assert obj.max_downloads == 1, f"served with no limit: {obj}"
    assert not (files / oid).exists()


def test_a_download_of_an_object_used_up_while_its_upload_was_being_tidied_is_refused(make_config, files):
    """Between linking an object and removing its partial upload, the object's file has
    two names. A download that opened the object, when the last allowed download removed
    its name meanwhile, must not take the file still linked in the partial for an upload
    in progress, never downloaded."""
    store, data, oid = limited_object(make_config, max_downloads=1)
    leave_published_partial(files, oid, "stream")
    first, second = store.open(oid), store.open(oid)
    try:
        store.reserve_download(first).complete()
        with pytest.raises(file_relay.StorageError) as gone:
            store.reserve_download(second)
        assert file_relay.status_of(gone.value) == 404
    finally:
        first.close()
        second.close()


def test_a_download_of_a_deleted_then_reuploaded_object_does_not_spend_the_new_ones_budget(make_config, files):
    store, data, oid = limited_object(make_config, max_downloads=2)
    old = store.open(oid)
    try:
        ticket = store.reserve_download(old)
        assert store.delete(oid)
        assert store.put_stream(oid, [data], len(data), file_relay.Limits(max_downloads=1))
        ticket.complete()  # a download of the old object ends
    finally:
        old.close()
    assert store.lookup(oid).remaining_downloads == 1


# -- 4: a crash's leftovers never strip an object of its limits -------------------------


def leave_published_partial(files, oid, mode: str) -> None:
    """The state a crash right after publishing leaves: the partial upload whose data file
    is the object itself (a second link to it)."""
    path = files / ".relay" / "partial" / oid
    path.mkdir()
    os.link(files / oid, path / "data")
    (path / "info").write_text(f'{{"mode": "{mode}", "length": {os.stat(files / oid).st_size}, "created": 0}}')
    if mode == "chunks":
        (path / f"range-0-{os.stat(files / oid).st_size - 1}").touch()


@pytest.mark.parametrize("mode", ["stream", "chunks"])
def test_removing_a_published_leftover_keeps_the_objects_limits(make_app, make_config, files, mode):
    app = make_app()
    data, oid = blob(4000)
    app.put(object_url(oid), data, headers={"Max-Downloads": "1"}, status=201)
    leave_published_partial(files, oid, mode)
    swept = file_relay.Store(make_config(partial_ttl=0)).sweep()
    assert swept["partials"] == 1
    assert app.get(object_url(oid)).body == data
    app.get(object_url(oid), status=404)  # the limit held: one download, then gone


def test_a_published_leftover_is_never_written_to(make_app, make_config, files):
    """A chunk for the leftover of an object that then expired: the object's bytes, which
    downloads in flight still read, must not change."""
    app = make_app(ttl=60)
    data, oid = blob(4000)
    app.put(object_url(oid), data, status=201)
    leave_published_partial(files, oid, "chunks")
    reading = os.open(files / oid, os.O_RDONLY)
    try:
        then = time.time() - 120
        os.utime(files / oid, (then, then))
        put_chunk(app, oid, 0, 999, 4000, bytes(1000), status="*")
        assert os.pread(reading, 4000, 0) == data
    finally:
        os.close(reading)


def test_an_upload_of_an_object_that_expires_meanwhile_is_stored(make_app, make_config, files):
    """The stored copy expires while the same content is uploaded again: the upload must
    be stored (not answered "already stored" and lost when the old copy goes)."""
    app = make_app(ttl=60)
    data, oid = blob(4000)
    app.put(object_url(oid), data, status=201)
    store = file_relay.Store(make_config(ttl=60))

    def body():
        yield data[:2000]
        then = time.time() - 120
        os.utime(files / oid, (then, then))  # the stored copy expires
        yield data[2000:]

    with pytest.raises(file_relay.StorageError) as refused:  # never "already stored"
        store.put_stream(oid, body(), len(data), file_relay.Limits())
    assert file_relay.status_of(refused.value) == 409
    assert store.put_stream(oid, [data], len(data), file_relay.Limits()) is True  # sent again
    assert app.get(object_url(oid)).body == data


# -- 8: costs bounded by the request, not by the store ----------------------------------


def test_a_chunked_upload_in_too_many_pieces_is_refused_and_ranges_stay_short(app, files):
    oid = blob(1)[1]
    total = 4 * file_relay._MAX_FRAGMENTS
    for index in range(file_relay._MAX_FRAGMENTS):
        put_chunk(app, oid, 2 * index, 2 * index, total, b"x", status=202)
    refused = put_chunk(app, oid, total - 1, total - 1, total, b"x", status=409)
    assert "pieces" in refused.text
    ranges = app.head(object_url(oid)).headers["Upload-Ranges"]
    assert ranges.count("-") == file_relay._MAX_FRAGMENTS and len(ranges) < 16 << 10
    put_chunk(app, oid, 1, 1, total, b"x", status=202)  # filling a gap is fine


def test_range_markers_are_merged_as_they_pile_up(app, files):
    data, oid = blob(400)
    for offset in range(300):
        put_chunk(app, oid, offset, offset, 400, data[offset : offset + 1], status=202)
    markers = os.listdir(files / ".relay" / "partial" / oid)
    assert len(markers) <= file_relay._MARKER_SLACK + 3, len(markers)
    assert app.head(object_url(oid)).headers["Upload-Ranges"] == "0-299"
    put_chunk(app, oid, 300, 399, 400, data[300:], status=201)
    assert verify_objects(files) == {oid: 400}


def test_the_ledger_of_stored_objects_follows_uploads_and_deletes_and_is_recounted(make_app, make_config, files):
    app = make_app(max_disk=10 << 20)
    stored = {}
    for seed in range(5):
        data, oid = blob(1000 + seed, seed=seed)
        app.put(object_url(oid), data, status=201)
        stored[oid] = len(data)
    status = app.get(f"/{SERVER_ID}").json
    assert (status["stored_objects"], status["stored_bytes"]) == (5, sum(stored.values()))
    gone = next(iter(stored))
    app.delete(object_url(gone), status=200)
    status = app.get(f"/{SERVER_ID}").json
    assert (status["stored_objects"], status["stored_bytes"]) == (4, sum(stored.values()) - stored[gone])
    # Whatever the ledger says (a crash between its update and the link makes it count
    # too much), the sweeper recounts it from the directory.
    file_relay.Store(make_config())._account(3, 12345)
    file_relay.Store(make_config()).sweep()
    status = app.get(f"/{SERVER_ID}").json
    assert (status["stored_objects"], status["stored_bytes"]) == (4, sum(stored.values()) - stored[gone])


# -- 11: only regular files the relay made are served -----------------------------------


def test_a_symlink_under_an_object_name_is_not_served(app, files, tmp_path):
    data, oid = blob(1000)
    outside = tmp_path / "outside"
    outside.write_bytes(data)
    files.mkdir(exist_ok=True)
    app.get(f"/{SERVER_ID}", status=200)
    os.symlink(outside, files / oid)
    app.get(object_url(oid), status=404)
    app.head(object_url(oid), status=404)
    app.put(object_url(oid), data, status=201)  # the upload replaces the link
    assert not os.path.islink(files / oid) and (files / oid).read_bytes() == data
    assert outside.read_bytes() == data


def test_a_dangling_symlink_does_not_pass_for_a_stored_object(app, files):
    data, oid = blob(1000)
    app.get(f"/{SERVER_ID}", status=200)
    os.symlink("/nonexistent/target", files / oid)
    app.put(object_url(oid), data, status=201)
    assert app.get(object_url(oid)).body == data


def test_a_directory_under_an_object_name_is_not_served(app, files):
    data, oid = blob(1000)
    app.get(f"/{SERVER_ID}", status=200)
    (files / oid).mkdir()
    (files / oid / "inside").write_bytes(b"planted")
    app.get(object_url(oid), status=404)
    app.put(object_url(oid), data, status=201)
    assert app.get(object_url(oid)).body == data
    assert verify_objects(files) == {oid: 1000}


def test_a_fifo_under_an_object_name_never_hangs_a_download(live, files):
    relay = live("--workers", "1")
    data, oid = blob(1000)
    os.mkfifo(files / oid)
    connection = http.client.HTTPConnection(*relay.address, timeout=10)
    connection.request("GET", f"/{SERVER_ID}/{oid}?wait=0")
    assert connection.getresponse().status == 404
    connection.close()
    with socket.create_connection(relay.address, timeout=10) as sock:
        body = f"PUT /{SERVER_ID}/{oid} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data
        sock.sendall(body)
        assert sock.recv(100).startswith(b"HTTP/1.1 201")
    assert stat.S_ISREG(os.lstat(files / oid).st_mode)
    relay.signal(15)
    assert relay.wait_exit(30) == 0


# -- 12: a chunk racing a DELETE never hears that correct bytes did not verify -----------


def in_fcntl(native_id: int) -> bool:
    """Whether the thread is blocked in fcntl() (waiting for a lock), from /proc."""
    with open(f"/proc/self/task/{native_id}/syscall") as syscall:
        return syscall.read().split()[0] == str(72)  # x86_64's fcntl


def test_a_chunk_waiting_on_a_finisher_that_stored_nothing_is_not_told_its_bytes_were_wrong(
    make_app, make_config, files
):
    """The completing chunk finds another request verifying the upload and waits for its
    verdict; meanwhile the upload is deleted, and the verifier stores nothing. Correct
    bytes must not hear 400 "did not verify" (the client gives up on that)."""
    if os.uname().machine != "x86_64":
        pytest.skip("reads the blocked system call's number from /proc (x86_64 numbers)")
    app = make_app()
    data, oid = blob(300_000)
    put_chunk(app, oid, 0, 149_999, len(data), data[:150_000], status=202)
    store = file_relay.Store(make_config())
    holder = os.open(files / ".relay" / "partial" / oid / "data", os.O_RDWR)
    assert file_relay._lock(holder, fcntl.F_WRLCK, file_relay._FINISHER)  # another finisher
    thread_ids = []
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:

            def complete():
                thread_ids.append(threading.get_native_id())
                try:
                    return file_relay.status_of(
                        store.put_chunk(oid, 150_000, 299_999, len(data), [data[150_000:]], None, file_relay.Limits())
                    )
                except file_relay.StorageError as exc:
                    return file_relay.status_of(exc)

            completing = pool.submit(complete)
            wait_until(lambda: thread_ids and in_fcntl(thread_ids[0]), message="the chunk to wait for the verdict")
            deleted = app.delete(object_url(oid), status="*").status_int
            os.close(holder)
            holder = -1
            status = completing.result(20)
    finally:
        if holder >= 0:
            os.close(holder)
    assert status != 400
    assert (deleted, status) == (200, 202), (deleted, status)  # chunk 0 cancelled: it began anew
    assert verify_objects(files) == {}


def test_entries_planted_inside_the_relays_own_directory_never_hang_or_fail_a_request(live, files, make_config):
    """A directory or a FIFO where the relay keeps an object's limits or an upload's info:
    requests neither hang on it nor fail with 500, and the sweep removes it."""
    relay = live("--workers", "1")
    stored = {}
    for seed in range(2):
        data, oid = blob(1000, seed=seed)
        assert requests.put(relay.url(oid), data=data, timeout=10).status_code == 201
        stored[oid] = data
    first, second = stored
    (files / ".relay" / "meta" / first).mkdir()
    os.mkfifo(files / ".relay" / "meta" / second)
    for name, make in (("planted-dir", os.mkdir), ("planted-fifo", os.mkfifo)):
        (files / ".relay" / "partial" / name).mkdir()
        make(files / ".relay" / "partial" / name / "info")
        (files / ".relay" / "partial" / name / "data").write_bytes(b"x")
    for oid, data in stored.items():
        assert requests.get(relay.url(oid), params={"wait": "0"}, timeout=10).content == data
        assert requests.head(relay.url(oid), timeout=10).status_code == 200
    assert requests.get(relay.url(), timeout=10).status_code == 200
    data, oid = blob(1000, seed=9)
    assert requests.put(relay.url(oid), data=data, timeout=10).status_code == 201
    file_relay.Store(make_config()).sweep()
    assert os.listdir(files / ".relay" / "meta") == []
    assert [name for name in os.listdir(files / ".relay" / "partial") if not name.startswith(".")] == []
    assert verify_objects(files) == {**{oid: 1000}, **{name: 1000 for name in stored}}


def test_partial_uploads_are_bounded_so_their_cost_to_each_upload_is(make_app, files):
    """Each new upload weighs the uploads in progress against the space; there may be at
    most _MAX_PARTIALS of them, so that cost is bounded (503 with Retry-After beyond)."""
    app = make_app()
    data, oid = blob(1000)
    put_chunk(app, oid, 0, 99, 1000, data[:100], status=202)
    partial = files / ".relay" / "partial" / oid
    for index in range(file_relay._MAX_PARTIALS - 1):
        clone = files / ".relay" / "partial" / f"{index:064x}"
        clone.mkdir()
        for entry in partial.iterdir():
            os.link(entry, clone / entry.name)
    other, other_oid = blob(500, seed=1)
    refused = app.put(object_url(other_oid), other, status=503)
    assert refused.headers["Retry-After"] and "uploads in progress" in refused.text
    put_chunk(app, other_oid, 0, 99, 500, other[:100], status=503)
    put_chunk(app, oid, 100, 999, 1000, data[100:], status=201)  # an upload in progress goes on
    app.put(object_url(other_oid), other, status=201)  # and its place is free again
    assert app.get(f"/{SERVER_ID}").json["partial_uploads"] == file_relay._MAX_PARTIALS - 1


def test_links_planted_inside_the_relays_own_directory_are_never_written_through(live, files):
    """A symbolic link planted where the relay keeps its ledger or a download count, pointing
    at a stored object: the relay's own writes must not change the object's bytes."""
    relay = live("--workers", "1")
    victims = {}
    for seed in range(2):
        data, oid = blob(1000, seed=seed)
        assert requests.put(relay.url(oid), data=data, timeout=10).status_code == 201
        victims[oid] = data
    limited, limited_oid = blob(1000, seed=5)
    assert requests.put(relay.url(limited_oid), data=limited, headers={"Max-Downloads": "5"}).status_code == 201
    first, second = victims
    (files / ".relay" / "usage").unlink()
    os.symlink(f"../{first}", files / ".relay" / "usage")
    os.symlink(f"../../{second}", files / ".relay" / "meta" / f"{limited_oid}.count")
    data, oid = blob(1000, seed=9)
    assert requests.put(relay.url(oid), data=data, timeout=10).status_code == 201  # the ledger changes
    response = requests.get(relay.url(limited_oid), timeout=10)  # a counted download
    assert response.content == limited and response.headers["X-Remaining-Downloads"] == "4"
    for victim, content in victims.items():
        assert (files / victim).read_bytes() == content
    assert requests.head(relay.url(limited_oid), timeout=10).headers["X-Remaining-Downloads"] == "4"


def test_a_download_is_counted_when_it_starts_and_given_back_if_it_fails(make_config, files):
    """So that a crash after the last byte went out, before the download was counted,
    cannot let one more download through: it was counted already."""
    store, data, oid = limited_object(make_config, max_downloads=2)
    reader = store.open(oid)
    try:
        ticket = store.reserve_download(reader)
        assert store.lookup(oid).remaining_downloads == 1  # counted before a byte is sent
        ticket.release()  # the download failed: given back
        assert store.lookup(oid).remaining_downloads == 2
        store.reserve_download(reader).complete()
        assert store.lookup(oid).remaining_downloads == 1
    finally:
        reader.close()
