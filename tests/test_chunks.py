"""Resumable chunked uploads: PUT with Content-Range, in any order, in parallel, resumed."""

import base64
import concurrent.futures
import hashlib
import os
import socket
import threading
import time

import pytest
import requests
from conftest import SERVER_ID, blob, object_url, sha256, wait_until
from invariants import answered

import file_relay


def chunks_of(data: bytes, size: int) -> list[tuple[int, int, bytes]]:
    return [
        (first, min(first + size, len(data)) - 1, data[first : first + size]) for first in range(0, len(data), size)
    ]


def put_chunk(app, oid, first, last, total, body, status="*", **headers):
    headers = {"Content-Range": f"bytes {first}-{last}/{total}", **headers}
    return app.put(object_url(oid), body, headers=headers, status=status)


def partial_ranges(app, oid) -> str | None:
    response = app.head(object_url(oid), status="*")
    return response.headers.get("Upload-Ranges") if response.status_int == 200 else None


def test_three_chunks_in_order(app, files):
    data, oid = blob(300_000)
    first, second, third = chunks_of(data, 100_000)
    response = put_chunk(app, oid, *first[:2], len(data), first[2], status=202)
    assert response.headers["Upload-Offset"] == "100000"
    assert response.headers["Upload-Ranges"] == "0-99999"
    assert "received 100000 of 300000" in response.text
    assert put_chunk(app, oid, *second[:2], len(data), second[2], status=202).headers["Upload-Offset"] == "200000"
    response = put_chunk(app, oid, *third[:2], len(data), third[2], status=201)
    assert response.headers["ETag"] == f'"{oid}"'
    assert (files / oid).read_bytes() == data
    assert os.listdir(files / ".relay" / "partial") == []


def test_three_chunks_out_of_order(app, files):
    data, oid = blob(300_000)
    first, second, third = chunks_of(data, 100_000)
    response = put_chunk(app, oid, *third[:2], len(data), third[2], status=202)
    assert response.headers["Upload-Offset"] == "0"
    assert response.headers["Upload-Ranges"] == "200000-299999"
    response = put_chunk(app, oid, *first[:2], len(data), first[2], status=202)
    assert response.headers["Upload-Ranges"] == "0-99999, 200000-299999"
    put_chunk(app, oid, *second[:2], len(data), second[2], status=201)
    assert (files / oid).read_bytes() == data


def test_head_of_a_partial_upload_says_where_to_resume(app):
    data, oid = blob(300_000)
    first, _, third = chunks_of(data, 100_000)
    put_chunk(app, oid, *first[:2], len(data), first[2])
    put_chunk(app, oid, *third[:2], len(data), third[2])
    response = app.head(object_url(oid), status=200)
    assert response.headers["Upload-Offset"] == "100000"
    assert response.headers["Upload-Ranges"] == "0-99999, 200000-299999"
    assert response.headers["Upload-Length"] == response.headers["Content-Length"] == "300000"
    assert response.headers["Upload-Incomplete"] == "?1"
    assert "ETag" not in response.headers


def test_a_retried_chunk_is_accepted_and_a_different_one_refused(app, files):
    data, oid = blob(300_000)
    put_chunk(app, oid, 0, 99_999, len(data), data[:100_000], status=202)
    put_chunk(app, oid, 0, 99_999, len(data), data[:100_000], status=202)  # the same bytes again
    response = put_chunk(app, oid, 0, 99_999, len(data), bytes(100_000), status=409)
    assert "differ" in response.text
    put_chunk(app, oid, 50_000, 149_999, len(data), data[50_000:150_000], status=202)  # overlapping, right
    assert partial_ranges(app, oid) == "0-149999"
    overlapping_garbage = bytes(50_000) + data[150_000:]  # 100000-149999 differ from what was received
    put_chunk(app, oid, 100_000, 299_999, len(data), overlapping_garbage, status=409)
    assert partial_ranges(app, oid) == "0-149999"
    put_chunk(app, oid, 150_000, 299_999, len(data), data[150_000:], status=201)
    assert (files / oid).read_bytes() == data


def test_a_refused_first_chunk_leaves_no_partial_upload_holding_space(make_app, files):
    app = make_app(max_disk=1 << 20)
    data, oid = blob(800_000)
    wrong = file_relay.sha256_field(hashlib.sha256(b"other").digest())
    put_chunk(app, oid, 0, 99_999, len(data), data[:100_000], status=400, **{"Content-Digest": wrong})
    app.head(object_url(oid), status=404)
    assert os.listdir(files / ".relay" / "partial") == []
    other, other_oid = blob(800_000, seed=1)  # would not fit beside a reservation of 800 KB
    app.put(object_url(other_oid), other, status=201)


def test_a_chunk_that_does_not_match_its_content_digest_is_not_stored(app):
    data, oid = blob(200_000)
    first, second = chunks_of(data, 100_000)
    digest = file_relay.sha256_field(hashlib.sha256(first[2]).digest())
    put_chunk(app, oid, *first[:2], len(data), first[2], status=202, **{"Content-Digest": digest})
    wrong = file_relay.sha256_field(hashlib.sha256(b"other").digest())
    response = put_chunk(app, oid, *second[:2], len(data), second[2], status=400, **{"Content-Digest": wrong})
    assert "Content-Digest" in response.text
    assert partial_ranges(app, oid) == "0-99999"
    put_chunk(app, oid, *second[:2], len(data), second[2], status=400, **{"Content-Digest": "sha-256=:nope:"})
    put_chunk(app, oid, *second[:2], len(data), second[2], status=201)


def test_a_corrupted_chunk_fails_the_whole_upload_which_is_discarded(app, files):
    data, oid = blob(300_000)
    first, second, third = chunks_of(data, 100_000)
    put_chunk(app, oid, *first[:2], len(data), first[2])
    put_chunk(app, oid, *second[:2], len(data), b"\0" + second[2][1:])
    response = put_chunk(app, oid, *third[:2], len(data), third[2], status=400)
    assert "does not match" in response.text and "discarded" in response.text
    assert not (files / oid).exists()
    app.head(object_url(oid), status=404)
    for first_byte, last_byte, chunk in chunks_of(data, 100_000):  # a clean retry works
        put_chunk(app, oid, first_byte, last_byte, len(data), chunk)
    assert (files / oid).read_bytes() == data


@pytest.mark.parametrize(
    ("content_range", "body_size", "status", "reason"),
    [
        ("bytes 0-99/400000", 100, 409, "300000 bytes long, not 400000"),  # TOTAL differs from the first chunk
        ("bytes 0-300000/300000", 300_001, 400, "does not fit"),  # LAST >= TOTAL
        ("bytes 99-0/300000", 100, 400, "ends before it starts"),
        ("bytes 0-99/*", 100, 400, "FIRST-LAST/TOTAL"),
        ("bytes=0-99/300000", 100, 400, "FIRST-LAST/TOTAL"),
        ("bytes 0-99/300000", 50, 400, "Content-Length does not match"),
    ],
)
def test_inconsistent_chunks_are_refused_and_change_nothing(app, content_range, body_size, status, reason):
    data, oid = blob(300_000)
    put_chunk(app, oid, 200_000, 299_999, len(data), data[200_000:], status=202)
    response = app.put(object_url(oid), data[:body_size], headers={"Content-Range": content_range}, status=status)
    assert reason in response.text
    assert partial_ranges(app, oid) == "200000-299999"


def test_a_total_over_the_size_limit_is_413(make_app):
    app = make_app(max_file_size=1000)
    data, oid = blob(2000)
    assert put_chunk(app, oid, 0, 99, 2000, data[:100], status=413)
    app.head(object_url(oid), status=404)


def test_absurd_sizes_are_413_not_a_crash(app):
    data, oid = blob(100)
    put_chunk(app, oid, 0, 99, 2**70, data, status=413)
    put_chunk(app, oid, 2**62, 2**62 + 99, 2**62 + 100, data, status=413)
    app.head(object_url(oid), status=404)


def test_a_chunk_of_an_object_already_stored_is_200(app):
    data, oid = blob(1000)
    app.put(object_url(oid), data, status=201)
    put_chunk(app, oid, 0, 99, 1000, data[:100], status=200)


def test_a_plain_put_restarts_an_idle_partial_upload(app, files):
    data, oid = blob(300_000)
    put_chunk(app, oid, 0, 99_999, len(data), data[:100_000])
    app.put(object_url(oid), data, status=201)
    assert (files / oid).read_bytes() == data
    assert os.listdir(files / ".relay" / "partial") == []


def hold_chunk_open(store, oid, data, first, last, ready, release, result):
    """Write a chunk through the storage layer, pausing half-way (another request)."""
    body_data = data[first : last + 1]

    def body():
        yield body_data[: len(body_data) // 2]
        ready.set()
        release.wait(10)
        yield body_data[len(body_data) // 2 :]

    result.append(answered(store.put_chunk(oid, first, last, len(data), body(), None, file_relay.Limits())))


def test_requests_conflicting_with_a_chunk_being_written_get_409(app, make_config, files):
    data, oid = blob(300_000)
    store = file_relay.Store(make_config())
    ready, release, result = threading.Event(), threading.Event(), []
    writer = threading.Thread(target=hold_chunk_open, args=(store, oid, data, 0, 99_999, ready, release, result))
    writer.start()
    assert ready.wait(10)
    assert "in progress" in app.put(object_url(oid), data, status=409).text  # a plain PUT
    response = put_chunk(app, oid, 50_000, 149_999, len(data), data[50_000:150_000], status=409)
    assert response.headers["Retry-After"]  # the same bytes, being written: try again later
    put_chunk(app, oid, 100_000, 299_999, len(data), data[100_000:], status=202)  # disjoint: fine
    assert app.delete(object_url(oid), status=409)
    release.set()
    writer.join(10)
    assert result[0][0] == 201
    assert (files / oid).read_bytes() == data


def test_delete_cancels_a_partial_upload(app, files):
    data, oid = blob(300_000)
    put_chunk(app, oid, 0, 99_999, len(data), data[:100_000])
    app.delete(object_url(oid), status=200)
    app.head(object_url(oid), status=404)
    assert os.listdir(files / ".relay" / "partial") == []
    app.delete(object_url(oid), status=404)


def test_untouched_partial_uploads_are_swept_after_the_partial_ttl(make_app, make_config, files):
    app = make_app(partial_ttl=3600)
    old, old_oid = blob(300_000, seed=1)
    recent, recent_oid = blob(300_000, seed=2)
    put_chunk(app, old_oid, 0, 99_999, len(old), old[:100_000])
    put_chunk(app, recent_oid, 0, 99_999, len(recent), recent[:100_000])
    store = file_relay.Store(make_config(partial_ttl=3600))
    long_ago = time.time() - 7200
    partial = files / ".relay" / "partial" / old_oid
    for path in (partial, partial / "data"):
        os.utime(path, (long_ago, long_ago))
    assert store.sweep()["partials"] == 1
    app.head(object_url(old_oid), status=404)
    assert app.head(object_url(recent_oid), status=200).headers["Upload-Offset"] == "100000"


# -- live relays ---------------------------------------------------------------------


def test_chunks_in_parallel_on_several_workers(live, files):
    relay = live("--workers", "4")
    data, oid = blob(8 << 20)

    def send(chunk):
        first, last, body = chunk
        headers = {"Content-Range": f"bytes {first}-{last}/{len(data)}"}
        return requests.put(relay.url(oid), data=body, headers=headers, timeout=60).status_code

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(send, chunks_of(data, 1 << 20)))
    # One request publishes the object; one that completed it at the same moment waits for
    # that verdict and finds it stored.
    assert statuses.count(201) == 1 and set(statuses) <= {200, 201, 202}
    assert (files / oid).read_bytes() == data


def test_an_interrupted_chunk_is_resumed_from_what_head_reports(live, http, files):
    relay = live()
    data, oid = blob(3 << 20)
    first, second, third = chunks_of(data, 1 << 20)
    headers = {"Content-Range": f"bytes {first[0]}-{first[1]}/{len(data)}"}
    assert http.put(relay.url(oid), data=first[2], headers=headers).status_code == 202
    # The client dies half-way through the second chunk.
    host, port = relay.address
    with socket.create_connection((host, port)) as sock:
        head = (
            f"PUT /{SERVER_ID}/{oid} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(second[2])}\r\n"
            f"Content-Range: bytes {second[0]}-{second[1]}/{len(data)}\r\n\r\n"
        )
        sock.sendall(head.encode() + second[2][: len(second[2]) // 2])
    wait_until(lambda: '" 400 ' in relay.log(), message="the relay to notice")
    offset = int(http.head(relay.url(oid)).headers["Upload-Offset"])
    assert offset == 1 << 20
    rest = data[offset:]
    headers = {"Content-Range": f"bytes {offset}-{len(data) - 1}/{len(data)}"}
    assert http.put(relay.url(oid), data=rest, headers=headers).status_code == 201
    assert (files / oid).read_bytes() == data


def test_a_partial_upload_survives_kill_9_of_the_relay(live, files):
    relay = live()
    data, oid = blob(3 << 20)
    chunks = chunks_of(data, 1 << 20)
    for first, last, body in chunks[:2]:
        headers = {"Content-Range": f"bytes {first}-{last}/{len(data)}"}
        assert requests.put(relay.url(oid), data=body, headers=headers).status_code == 202
    relay.kill()
    restarted = live()
    head = requests.head(restarted.url(oid))
    assert head.headers["Upload-Offset"] == str(2 << 20)
    first, last, body = chunks[2]
    headers = {"Content-Range": f"bytes {first}-{last}/{len(data)}"}
    assert requests.put(restarted.url(oid), data=body, headers=headers).status_code == 201
    assert (files / oid).read_bytes() == data


def test_a_reader_follows_a_chunked_upload(live):
    relay = live()
    data, oid = blob(4 << 20)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        reader = pool.submit(requests.get, relay.url(oid) + "?wait=30", timeout=60)
        time.sleep(0.3)
        for first, last, body in reversed(chunks_of(data, 1 << 20)):  # out of order, too
            headers = {"Content-Range": f"bytes {first}-{last}/{len(data)}"}
            assert requests.put(relay.url(oid), data=body, headers=headers).status_code in (201, 202)
            time.sleep(0.2)
        response = reader.result()
    assert response.status_code == 200
    assert response.headers["Content-Length"] == str(len(data))
    assert sha256(response.content) == oid


def test_content_digest_helper_round_trips():
    digest = hashlib.sha256(b"abc").digest()
    field = file_relay.sha256_field(digest)
    assert field == "sha-256=:" + base64.b64encode(digest).decode() + ":"
    assert file_relay.parse_digest_field(f"md5=:xyz:, {field}") == digest
    assert file_relay.parse_digest_field("md5=:xyz:") is None


def _bytes_read() -> int:
    with open("/proc/self/io") as counts:
        return int(next(line for line in counts if line.startswith("rchar:")).split()[1])


def two_workers(config) -> list:
    """Two stores over one directory: two workers, each with its own running hashes."""
    workers = [file_relay.Store(config), file_relay.Store(config)]
    for store in workers:
        store.prepare()
    return workers


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="needs Linux's /proc/self/io to count bytes read")
@pytest.mark.parametrize("named", [True, False], ids=["by-hash", "name-less"])
def test_chunks_in_order_alternating_between_workers_leave_the_last_one_little_to_hash(make_config, named):
    """Two stores over one directory stand for two workers, each with its own running hash:
    the one that completes the object has hashed the other's chunks as they came, and
    reads back only the chunk before its own and its own (hashed from the file while it
    arrives); the name is the content's."""
    chunk = 256 << 10
    data, oid = blob(8 * chunk)
    config = make_config()
    workers = two_workers(config)
    token = None if named else workers[0].start_unnamed(len(data), file_relay.Limits(), None)
    for index, (first, last, body) in enumerate(chunks_of(data, chunk)):
        store = workers[index % 2]
        before = _bytes_read()
        if named:
            outcome = store.put_chunk(oid, first, last, len(data), [body], None, file_relay.Limits())
        else:
            outcome = store.put_unnamed_chunk(token, first, last, len(data), [body], None)
        read = _bytes_read() - before
    assert read < 3 * chunk  # the other worker's last chunk, this one, and the upload's small files
    if named:
        assert outcome is file_relay.Stored.CREATED
    else:
        assert outcome.oid == oid and outcome.stored is file_relay.Stored.CREATED
    assert sha256((config.files_directory / oid).read_bytes()) == oid


def test_a_chunk_cut_off_while_another_workers_chunks_are_hashed_leaves_the_running_hash_right(make_config):
    """A chunk that carries on a worker's hash past another worker's chunks, cut off
    half-way or refused as different, leaves no hash behind that would pass for the
    object's: sent again, then the rest, the object is created under its name."""
    chunk = 256 << 10
    data, oid = blob(6 * chunk)
    config = make_config()
    workers = two_workers(config)
    pieces = chunks_of(data, chunk)

    def cut_off(body):
        yield body[: len(body) // 2]
        raise file_relay.ClientGone("the client stopped sending")

    workers[0].put_chunk(oid, *pieces[0][:2], len(data), [pieces[0][2]], None, file_relay.Limits())
    workers[1].put_chunk(oid, *pieces[1][:2], len(data), [pieces[1][2]], None, file_relay.Limits())
    first, last, body = pieces[2]  # worker 0 carries its hash on past chunk 1, which it never saw
    with pytest.raises(file_relay.ClientGone):
        workers[0].put_chunk(oid, first, last, len(data), cut_off(body), None, file_relay.Limits())
    workers[1].put_chunk(oid, first, last, len(data), [body], None, file_relay.Limits())
    with pytest.raises(file_relay.Conflict):  # differs from what worker 1 stored
        workers[0].put_chunk(oid, first, last, len(data), [bytes(len(body))], None, file_relay.Limits())
    workers[0].put_chunk(oid, first, last, len(data), [body], None, file_relay.Limits())  # compared, not written
    workers[1].put_chunk(oid, *pieces[3][:2], len(data), [pieces[3][2]], None, file_relay.Limits())
    workers[1].put_chunk(oid, *pieces[4][:2], len(data), [pieces[4][2]], None, file_relay.Limits())
    outcome = workers[0].put_chunk(oid, *pieces[5][:2], len(data), [pieces[5][2]], None, file_relay.Limits())
    assert outcome is file_relay.Stored.CREATED
    assert sha256((config.files_directory / oid).read_bytes()) == oid
