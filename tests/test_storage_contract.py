"""The storage contract: what the web layer relies on of any Storage backend, specified
through the Storage protocol alone (no look at files, locks or descriptors).

Every backend runs the whole module: add it to BACKENDS and it inherits the
specification. The filesystem backend (Store) and the S3 backend (S3Store, over the
seaweed fixture's SeaweedFS) run it; what a backend does otherwise by design (OTHERWISE)
is skipped for it, with where that is tested instead."""

import hashlib
import time

import pytest

import file_relay

BACKENDS = {"filesystem": file_relay.Store, "s3": file_relay.S3Store}
# What a backend does otherwise, by design, and where that is specified instead.
OTHERWISE = {
    "s3": {"exclusive writers": "racing writers of one name each go on, the last to end told 200 (test_s3.py)"}
}
NONE = file_relay.Limits()


def needs(storage, capability: str) -> None:
    """Skip the test for a backend that does *capability* otherwise, saying how."""
    backend = next(name for name, kind in BACKENDS.items() if isinstance(storage, kind))
    if capability in OTHERWISE.get(backend, {}):
        pytest.skip(f"{backend}: no {capability}: {OTHERWISE[backend][capability]}")


def content(size: int, seed: int = 0) -> tuple[bytes, str]:
    data = hashlib.shake_256(f"{seed}".encode()).digest(size)
    return data, hashlib.sha256(data).hexdigest()


@pytest.fixture(params=sorted(BACKENDS))
def make_storage(request, tmp_path):
    where = {"files_directory": tmp_path / "files"}
    if request.param == "s3":
        endpoint = request.getfixturevalue("seaweed").endpoint
        request.getfixturevalue("s3_env")
        where = {"storage": request.getfixturevalue("s3_storage_url"), "s3_endpoint": endpoint}

    def make(**settings) -> file_relay.Storage:
        config = file_relay.RelayConfig(server_id="contract", **where, **settings)
        storage = BACKENDS[request.param](config)
        storage.prepare()
        return storage

    return make


@pytest.fixture
def storage(make_storage) -> file_relay.Storage:
    return make_storage()


def read_all(reader) -> bytes:
    received = b""
    while block := reader.read(1 << 16):
        received += block
    return received


# -- whole uploads ----------------------------------------------------------------------


def test_a_stored_object_reads_back_whole_and_is_stored_once(storage):
    data, oid = content(300_000)
    assert storage.put_stream(oid, [data[:1000], data[1000:]], len(data), NONE) is True
    assert storage.is_stored(oid) and storage.lookup(oid).size == len(data)
    reader = storage.open(oid)
    try:
        assert reader.object.oid == oid and read_all(reader) == data and reader.finished
    finally:
        reader.close()
    assert storage.put_stream(oid, [data], len(data), NONE) is False  # already stored


def test_an_object_of_unknown_length_is_stored(storage):
    data, oid = content(5000)
    assert storage.put_stream(oid, iter([data]), None, NONE) is True
    assert storage.lookup(oid).size == len(data)


def test_content_that_does_not_match_its_name_is_not_stored(storage):
    data, oid = content(1000)
    with pytest.raises(file_relay.Mismatch):
        storage.put_stream(oid, [data[:-1] + b"?"], len(data), NONE)
    assert storage.lookup(oid) is None and storage.open(oid) is None and storage.progress(oid) is None


def test_a_body_shorter_than_declared_is_refused(storage):
    data, oid = content(1000)
    with pytest.raises(file_relay.WrongLength):
        storage.put_stream(oid, [data[:500]], len(data), NONE)
    assert storage.lookup(oid) is None


def test_sizes_over_the_limit_are_too_large(make_storage):
    storage = make_storage(max_file_size=1000)
    storage.check_size(1000)
    with pytest.raises(file_relay.TooLarge):
        storage.check_size(1001)


def test_an_upload_over_the_quota_finds_no_space(make_storage):
    storage = make_storage(max_disk=10_000)
    data, oid = content(20_000)
    with pytest.raises(file_relay.NoSpace):
        storage.put_stream(oid, [data], len(data), NONE)
    assert storage.lookup(oid) is None


# -- chunked uploads --------------------------------------------------------------------


def test_chunks_report_their_progress_then_complete_the_object(storage):
    data, oid = content(200_000)
    progress = storage.put_chunk(oid, 100_000, 199_999, len(data), [data[100_000:]], None, NONE)
    assert isinstance(progress, file_relay.Progress)
    assert progress.ranges == [(100_000, 199_999)] and progress.length == len(data) and progress.offset == 0
    assert storage.progress(oid).ranges == [(100_000, 199_999)]
    digest = hashlib.sha256(data[:100_000]).digest()
    assert storage.put_chunk(oid, 0, 99_999, len(data), [data[:100_000]], digest, NONE) is file_relay.Stored.CREATED
    assert storage.progress(oid) is None and storage.lookup(oid).size == len(data)
    again = storage.put_chunk(oid, 0, 99_999, len(data), [data[:100_000]], None, NONE)
    assert again is file_relay.Stored.ALREADY


def test_a_chunk_that_does_not_match_its_digest_is_not_stored(storage):
    data, oid = content(200_000)
    wrong = hashlib.sha256(b"other").digest()
    with pytest.raises(file_relay.Mismatch):
        storage.put_chunk(oid, 0, 99_999, len(data), [data[:100_000]], wrong, NONE)
    assert not (storage.progress(oid) or file_relay.Progress("chunks", None, [], False)).ranges


def test_a_chunk_contradicting_what_was_received_is_a_conflict(storage):
    data, oid = content(200_000)
    storage.put_chunk(oid, 0, 99_999, len(data), [data[:100_000]], None, NONE)
    with pytest.raises(file_relay.Conflict):
        storage.put_chunk(oid, 0, 999, len(data), [bytes(1000)], None, NONE)  # other bytes
    with pytest.raises(file_relay.Conflict):
        storage.put_chunk(oid, 100_000, 100_999, len(data) + 1, [data[100_000:101_000]], None, NONE)  # other length
    assert storage.put_chunk(oid, 0, 999, len(data), [data[:1000]], None, NONE).ranges == [(0, 99_999)]  # a retry


def test_a_request_writing_what_another_is_writing_is_told_to_come_back(storage):
    needs(storage, "exclusive writers")
    data, oid = content(200_000)
    refused = []

    def body():
        yield data[:50_000]
        for attempt in (
            lambda: storage.delete(oid),
            lambda: storage.put_chunk(oid, 0, 99_999, len(data), [data[:100_000]], None, NONE),
        ):
            try:
                attempt()
            except file_relay.Busy as exc:
                refused.append(exc.retry_after)
        yield data[50_000:100_000]

    storage.put_chunk(oid, 0, 99_999, len(data), body(), None, NONE)
    assert len(refused) == 2 and all(seconds > 0 for seconds in refused)


def test_deleting_cancels_an_upload_and_removes_an_object(storage):
    data, oid = content(200_000)
    storage.put_chunk(oid, 0, 99_999, len(data), [data[:100_000]], None, NONE)
    assert storage.delete(oid) is True
    assert storage.progress(oid) is None
    assert storage.put_stream(oid, [data], len(data), NONE)
    assert storage.delete(oid) is True
    assert storage.lookup(oid) is None and storage.open(oid) is None
    assert storage.delete(oid) is False


# -- reading ----------------------------------------------------------------------------


def test_a_reader_delivers_a_selected_range(storage):
    data, oid = content(10_000)
    storage.put_stream(oid, [data], len(data), NONE)
    reader = storage.open(oid)
    try:
        reader.select(100, 199)
        assert read_all(reader) == data[100:200] and reader.sent == 100 and reader.finished
    finally:
        reader.close()


def test_usage_counts_objects_and_space(storage):
    data, oid = content(5000)
    storage.put_stream(oid, [data], len(data), NONE)
    usage = storage.usage()
    assert (usage["stored_count"], usage["stored_bytes"], usage["partial_count"]) == (1, len(data), 0)
    assert 0 < usage["disk_free_bytes"] <= usage["disk_total_bytes"]
    assert 0 <= usage["disk_used_bytes"] <= usage["disk_total_bytes"]


def test_nothing_to_read_is_none(storage):
    assert storage.open(content(10)[1]) is None
    assert storage.follow(content(10)[1]) is None


def test_a_follower_reads_an_upload_as_it_arrives(storage):
    data, oid = content(200_000)
    storage.put_chunk(oid, 0, 99_999, len(data), [data[:100_000]], None, NONE)
    reader = storage.follow(oid)
    assert reader.object is None and reader.length == len(data)
    assert reader.progress().ranges == [(0, 99_999)]
    steps = [lambda: storage.put_chunk(oid, 100_000, 199_999, len(data), [data[100_000:]], None, NONE)]
    reader.pause = lambda seconds: steps.pop()() if steps else None  # the rest arrives while it waits
    try:
        assert read_all(reader) == data and reader.finished
    finally:
        reader.close()


def test_a_follower_of_an_upload_that_is_cancelled_fails(storage):
    data, oid = content(200_000)
    storage.put_chunk(oid, 0, 99_999, len(data), [data[:100_000]], None, NONE)
    reader = storage.follow(oid)
    reader.pause = lambda seconds: storage.delete(oid)
    try:
        with pytest.raises(file_relay.UploadFailed):
            read_all(reader)
        assert not reader.finished
    finally:
        reader.close()


# -- download budgets and expiry --------------------------------------------------------


def test_a_download_budget_is_spent_by_whole_downloads_only(storage):
    data, oid = content(5000)
    storage.put_stream(oid, [data], len(data), file_relay.Limits(max_downloads=2))
    cut_short = storage.open(oid)
    assert storage.reserve_download(cut_short).remaining == 1
    cut_short.close()  # nothing delivered: given back
    assert storage.lookup(oid).remaining_downloads == 2
    for left in (1, 0):
        reader = storage.open(oid)
        assert storage.reserve_download(reader).remaining == left
        assert read_all(reader) == data
        reader.close()
    assert storage.lookup(oid) is None and storage.open(oid) is None


def test_the_last_download_in_flight_holds_off_another(storage):
    data, oid = content(5000)
    storage.put_stream(oid, [data], len(data), file_relay.Limits(max_downloads=1))
    first, second = storage.open(oid), storage.open(oid)
    try:
        storage.reserve_download(first)
        with pytest.raises(file_relay.Busy):
            storage.reserve_download(second)
        read_all(first)
        first.close()
        with pytest.raises(file_relay.NotFound):
            storage.reserve_download(second)
    finally:
        first.close()
        second.close()


def test_an_unlimited_object_needs_no_reservation(storage):
    data, oid = content(5000)
    storage.put_stream(oid, [data], len(data), NONE)
    reader = storage.open(oid)
    try:
        assert storage.reserve_download(reader) is None
    finally:
        reader.close()


def test_an_expired_object_is_swept(storage):
    data, oid = content(5000)
    storage.put_stream(oid, [data], len(data), file_relay.Limits(ttl=0.2))
    obj = storage.lookup(oid)
    assert obj.expires_at == pytest.approx(obj.stored_at + 0.2)
    time.sleep(max(0.0, obj.expires_at - time.time()) + 0.05)
    assert storage.sweep()["objects"] == 1
    assert storage.lookup(oid) is None


def test_usage_counts_objects_uploads_and_free_space(storage):
    data, oid = content(5000)
    other, other_oid = content(200_000, seed=1)
    storage.put_stream(oid, [data], len(data), NONE)
    storage.put_chunk(other_oid, 0, 99_999, len(other), [other[:100_000]], None, NONE)
    usage = storage.usage()
    assert (usage["stored_count"], usage["stored_bytes"], usage["partial_count"]) == (1, len(data), 1)
    assert usage["reserved_bytes"] >= len(other)
    assert 0 < usage["disk_free_bytes"] <= usage["disk_total_bytes"]
    assert 0 <= usage["disk_used_bytes"] <= usage["disk_total_bytes"]


def test_purge_removes_everything(storage):
    data, oid = content(5000)
    storage.put_stream(oid, [data], len(data), NONE)
    storage.purge()
    storage.prepare()
    assert storage.lookup(oid) is None and storage.usage()["stored_count"] == 0
