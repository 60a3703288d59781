"""The S3 backend (--storage s3://BUCKET/PREFIX) against a real S3 server: SeaweedFS's
`weed mini` on 127.0.0.1 (the seaweed fixture)."""

import concurrent.futures
import contextlib
import dataclasses
import hashlib
import http.client
import os
import socket
import subprocess
import sys
import threading
import time

import botocore.exceptions
import pytest
import requests
from conftest import blob
from harness import SCRIPT, Paced, RelayProcess, wait_until
from seaweed import listed_segments, stored_content

import file_relay

# -- the test server does what the backend relies on ------------------------------------


def test_the_test_server_is_ready_and_keeps_create_only_writes(seaweed):
    client = seaweed.client()
    key = "server-check/create-only"
    client.put_object(Bucket="relay", Key=key, Body=b"first", IfNoneMatch="*")
    with pytest.raises(botocore.exceptions.ClientError) as refused:
        client.put_object(Bucket="relay", Key=key, Body=b"second", IfNoneMatch="*")
    assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    assert client.get_object(Bucket="relay", Key=key)["Body"].read() == b"first"
    client.delete_object(Bucket="relay", Key=key)


def test_the_test_server_lets_one_of_racing_compare_and_swaps_win(seaweed):
    client = seaweed.client()
    key = "server-check/counter"
    etag = client.put_object(Bucket="relay", Key=key, Body=b"0")["ETag"]

    def swap(value: int) -> bool:
        try:
            seaweed.client().put_object(Bucket="relay", Key=key, Body=str(value).encode(), IfMatch=etag)
            return True
        except botocore.exceptions.ClientError as exc:
            assert exc.response["ResponseMetadata"]["HTTPStatusCode"] == 412
            return False

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        won = list(pool.map(swap, range(1, 9)))
    assert won.count(True) == 1
    assert client.get_object(Bucket="relay", Key=key)["Body"].read() == str(won.index(True) + 1).encode()
    client.delete_object(Bucket="relay", Key=key)


# -- start-up: a configuration that cannot work fails with one line ----------------------

SERVER_ID = "s3-relay-secret-0123456789"


def start(env: dict, *args, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run a relay that is expected to refuse to start."""
    command = [sys.executable, str(SCRIPT), SERVER_ID, "--bind", "127.0.0.1:0", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("file_relay.py: error: storage: "), result.stderr
    assert "Traceback" not in result.stderr
    return lines[-1]


@pytest.fixture
def relay_env(seaweed, tmp_path) -> dict:
    """The environment of a relay on the test server, nothing of this machine's AWS setup."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("AWS_")}
    return {**env, **seaweed.env, "HOME": str(tmp_path)}


def test_wrong_credentials_fail_at_start(seaweed, relay_env, s3_storage_url):
    env = {**relay_env, "AWS_SECRET_ACCESS_KEY": "not-the-secret-key-0000"}
    line = one_line_error(start(env, "--storage", s3_storage_url, "--s3-endpoint", seaweed.endpoint))
    assert "refused the credentials" in line


def test_a_missing_bucket_fails_at_start(seaweed, relay_env):
    line = one_line_error(start(relay_env, "--storage", "s3://no-such-bucket/x", "--s3-endpoint", seaweed.endpoint))
    assert "bucket 'no-such-bucket' does not exist" in line


def test_credentials_that_cannot_write_fail_at_start(seaweed, relay_env, s3_storage_url):
    env = {**relay_env, "AWS_ACCESS_KEY_ID": "readonlykey", "AWS_SECRET_ACCESS_KEY": "readonlysecret0123"}
    line = one_line_error(start(env, "--storage", s3_storage_url, "--s3-endpoint", seaweed.endpoint))
    assert "no permission to write" in line


def test_an_unreachable_endpoint_fails_at_start(relay_env, s3_storage_url):
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    line = one_line_error(start(relay_env, "--storage", s3_storage_url, "--s3-endpoint", f"http://127.0.0.1:{port}"))
    assert "cannot reach the object store" in line


def test_missing_credentials_fail_at_start(seaweed, relay_env, s3_storage_url):
    env = {key: value for key, value in relay_env.items() if key not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    line = one_line_error(start(env, "--storage", s3_storage_url, "--s3-endpoint", seaweed.endpoint))
    assert "no AWS credentials" in line


@pytest.mark.parametrize(
    ("option", "word"),
    [("--min-free=1G", "--min-free"), ("--purge-on-exit", "--purge-on-exit"), ("--files-directory=/tmp/x", "--files")],
)
def test_options_without_meaning_on_s3_are_refused(relay_env, s3_storage_url, option, word):
    line = one_line_error(start(relay_env, "--storage", s3_storage_url, option))
    assert word in line


def test_a_files_directory_set_only_in_the_environment_is_no_reason_to_refuse_s3(s3_relays, tmp_path):
    """The container image sets RELAY_FILES_DIRECTORY for its volume; --storage s3:// in that
    image must still start (--files-directory on the command line is refused, above)."""
    (relay,) = s3_relays(1, env={"RELAY_FILES_DIRECTORY": str(tmp_path / "unused")})
    data, oid = blob(1000)
    assert requests.put(url(relay, oid), data=data, timeout=60).status_code == 201
    assert requests.get(url(relay, oid), timeout=60).content == data
    assert not list((tmp_path / "unused").glob("*"))  # named, so made when parsed; never used


@pytest.mark.parametrize("url", ["s3:/relay", "http://relay/x", "s3://Bad_Bucket/x"])
def test_a_malformed_storage_url_is_refused(relay_env, url):
    result = start(relay_env, "--storage", url)
    assert result.returncode == 2 and "storage" in result.stderr and "Traceback" not in result.stderr


# -- several hosts on one bucket ---------------------------------------------------------


@pytest.fixture
def s3_relays(seaweed, relay_env, s3_storage_url, tmp_path):
    """start(count, *options) -> that many relay processes on one bucket and prefix, each
    on its own port (as on hosts of their own); all killed at the end."""
    relays = []

    def start_relays(count: int = 3, *options, env: dict | None = None) -> list[RelayProcess]:
        started = []
        for _ in range(count):
            name = f"host{len(relays)}"
            args = ["--storage", s3_storage_url, "--s3-endpoint", seaweed.endpoint, "--get-wait-timeout=0", *options]
            relay = RelayProcess(None, tmp_path / f"{name}.log", args, env={**relay_env, **(env or {})})
            relays.append(relay)
            started.append(relay.start(SERVER_ID))
        return started

    yield start_relays
    for relay in relays:
        relay.kill()


def url(relay: RelayProcess, oid: str = "") -> str:
    return f"{relay.base}/{SERVER_ID}" + (f"/{oid}" if oid else "")


def keys_under(seaweed, s3_storage_url: str, what: str = "objects/") -> list[str]:
    bucket, prefix = file_relay.parse_storage_url(s3_storage_url)
    listed = seaweed.client().list_objects_v2(Bucket=bucket, Prefix=f"{prefix}{what}")
    return sorted(item["Key"].rsplit("/", 1)[-1] for item in listed.get("Contents", ()))


def leftover_segments(seaweed, s3_storage_url: str) -> list[str]:
    """The segments under the prefix that no stored object is made of: an upload's."""
    bucket, prefix = file_relay.parse_storage_url(s3_storage_url)
    client = seaweed.client()
    listed = client.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}segments/").get("Contents", ())
    made_of = set()
    for item in client.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}objects/").get("Contents", ()):
        made_of.update(listed_segments(client, bucket, prefix, item["Key"]) or ())
    return sorted(item["Key"].rsplit("/", 1)[-1] for item in listed if item["Key"] not in made_of)


def multipart_uploads(seaweed, s3_storage_url: str) -> list[str]:
    bucket, prefix = file_relay.parse_storage_url(s3_storage_url)
    listed = seaweed.client().list_multipart_uploads(Bucket=bucket, Prefix=prefix)
    return [upload["Key"] for upload in listed.get("Uploads", ())]


def test_an_object_uploaded_on_one_host_downloads_from_the_others(s3_relays, seaweed, s3_storage_url):
    a, b, c = s3_relays(3)
    data, oid = blob(9 << 20)  # a multipart upload
    small, small_oid = blob(1000, seed=1)  # one PutObject
    assert requests.put(url(a, oid), data=data, timeout=60).status_code == 201
    assert requests.put(url(a, small_oid), data=small, timeout=60).status_code == 201
    for relay in (b, c):
        got = requests.get(url(relay, oid), timeout=60)
        assert got.status_code == 200 and got.content == data
        assert got.headers["ETag"] == f'"{oid}"'
        assert got.headers["Repr-Digest"] == file_relay.sha256_field(bytes.fromhex(oid))
        assert requests.get(url(relay, small_oid), timeout=60).content == small
        ranged = requests.get(url(relay, oid), headers={"Range": "bytes=8388600-8388700"}, timeout=60)
        assert ranged.status_code == 206 and ranged.content == data[8388600:8388701]
        assert ranged.headers["Content-Range"] == f"bytes 8388600-8388700/{len(data)}"
        head = requests.head(url(relay, oid), timeout=60)
        assert head.status_code == 200 and head.headers["Content-Length"] == str(len(data))
        assert requests.get(url(relay, oid), headers={"If-None-Match": f'"{oid}"'}, timeout=60).status_code == 304
        status = requests.get(url(relay), timeout=60).json()
        assert (status["stored_objects"], status["stored_bytes"]) == (2, len(data) + len(small))
    assert requests.put(url(b, oid), data=data, timeout=60).status_code == 200  # stored already, on any host
    assert requests.delete(url(c, small_oid), timeout=60).status_code == 200
    assert requests.get(url(a, small_oid), timeout=60).status_code == 404
    assert keys_under(seaweed, s3_storage_url) == [oid] and multipart_uploads(seaweed, s3_storage_url) == []


def test_a_large_upload_is_written_once_as_segments_that_stay_while_their_object_does(
    s3_relays, seaweed, s3_env, s3_storage_url
):
    """Its segments are the object: the object's key holds their list, each byte is in the
    store once, and no sweep takes them for an abandoned upload's; a DELETE, or the
    download that uses the object up, removes them with it."""
    a, b, _ = s3_relays(3)
    bucket, prefix = file_relay.parse_storage_url(s3_storage_url)
    client = seaweed.client()
    data, oid = blob(20 << 20, seed=31)  # three segments of 8 MiB
    assert requests.put(url(a, oid), data=data, timeout=60).status_code == 201
    head = client.head_object(Bucket=bucket, Key=f"{prefix}objects/{oid}")
    assert head["ContentLength"] < 4096 and head["Metadata"]["layout"] == "segments"
    segments = listed_segments(client, bucket, prefix, f"{prefix}objects/{oid}")
    assert [key.rsplit("/", 1)[-1] for key in segments] == keys_under(seaweed, s3_storage_url, f"segments/{oid}/")
    assert [client.head_object(Bucket=bucket, Key=key)["ContentLength"] for key in segments] == [8 << 20] * 2 + [
        4 << 20
    ]
    assert multipart_uploads(seaweed, s3_storage_url) == []

    config = file_relay.RelayConfig(
        server_id=SERVER_ID, storage=s3_storage_url, s3_endpoint=seaweed.endpoint, partial_ttl=1
    )
    assert file_relay.S3Store(config).sweep(now=time.time() + 3600)["partials"] == 0
    assert len(keys_under(seaweed, s3_storage_url, f"segments/{oid}/")) == 3
    got = requests.get(url(b, oid), timeout=60)
    assert got.status_code == 200 and got.content == data and got.headers["Content-Length"] == str(len(data))
    across = requests.get(url(b, oid), headers={"Range": "bytes=8388600-16777300"}, timeout=60)
    assert across.status_code == 206 and across.content == data[8388600:16777301]
    tail = requests.get(url(b, oid), headers={"Range": "bytes=-5"}, timeout=60)
    assert tail.status_code == 206 and tail.content == data[-5:]
    assert requests.head(url(b, oid), timeout=60).headers["Content-Length"] == str(len(data))
    status = requests.get(url(b), timeout=60).json()
    assert (status["stored_objects"], status["stored_bytes"], status["partial_uploads"]) == (1, len(data), 0)

    assert requests.delete(url(b, oid), timeout=60).status_code == 200
    assert requests.get(url(a, oid), timeout=60).status_code == 404
    assert keys_under(seaweed, s3_storage_url, "segments/") == [] and keys_under(seaweed, s3_storage_url) == []

    once, once_oid = blob(9 << 20, seed=32)
    assert requests.put(url(a, once_oid), data=once, headers={"Max-Downloads": "1"}, timeout=60).status_code == 201
    assert requests.get(url(b, once_oid), timeout=60).content == once
    wait_until(lambda: requests.get(url(a, once_oid), timeout=60).status_code == 404, message="the object used up")
    wait_until(lambda: not keys_under(seaweed, s3_storage_url, "segments/"), message="its segments removed with it")


def test_a_name_less_upload_of_an_object_stored_as_segments_is_compared_with_them(seaweed, s3_env, s3_storage_url):
    store = file_relay.S3Store(
        file_relay.RelayConfig(server_id=SERVER_ID, storage=s3_storage_url, s3_endpoint=seaweed.endpoint)
    )
    data, oid = blob(9 << 20, seed=33)
    assert store.put_stream(oid, pieces(data), len(data), file_relay.Limits())
    token = store.start_unnamed(len(data), file_relay.Limits(), "same.bin")
    half = len(data) // 2
    assert isinstance(store.put_unnamed_chunk(token, 0, half - 1, len(data), [data[:half]], None), file_relay.Progress)
    named = store.put_unnamed_chunk(token, half, len(data) - 1, len(data), [data[half:]], None)
    assert (named.oid, named.stored) == (oid, file_relay.Stored.ALREADY)
    again = store.put_unnamed_chunk(token, half - 10, half + 9, len(data), [data[half - 10 : half + 10]], None)
    assert again.oid == oid  # a retry across the two segments, the same bytes
    changed = bytes([data[half] ^ 1])
    with pytest.raises(file_relay.Conflict):
        store.put_unnamed_chunk(token, half, half, len(data), [changed], None)
    assert store.open(oid) is not None


@pytest.mark.parametrize("size", [100_000, 9 << 20])
def test_eight_uploads_of_one_object_over_three_hosts_store_it_once(s3_relays, seaweed, s3_storage_url, size):
    relays = s3_relays(3)
    data, oid = blob(size)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(
            pool.map(lambda i: requests.put(url(relays[i % 3], oid), data=data, timeout=120).status_code, range(8))
        )
    assert sorted(answers) == [200] * 7 + [201], answers
    assert keys_under(seaweed, s3_storage_url) == [oid]
    assert multipart_uploads(seaweed, s3_storage_url) == []
    assert requests.get(url(relays[1], oid), timeout=60).content == data


def test_one_download_allowed_and_eight_at_once_across_hosts_make_exactly_one_whole_one(s3_relays):
    relays = s3_relays(3)
    data, oid = blob(2 << 20)
    assert requests.put(url(relays[0], oid), data=data, headers={"Max-Downloads": "1"}, timeout=60).status_code == 201

    def download(i: int) -> tuple[int, bool]:
        got = requests.get(url(relays[i % 3], oid), timeout=60)
        return got.status_code, got.content == data

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(download, range(8)))
    assert [answer for answer in answers if answer[0] == 200] == [(200, True)], answers
    assert {status for status, _ in answers} <= {200, 404, 409}, answers
    for relay in relays:  # 409 only while the download that went through is still being counted
        wait_until(lambda r=relay: requests.get(url(r, oid), timeout=60).status_code == 404, message="404")


def test_a_download_cut_short_gives_its_slot_back_to_any_host(s3_relays):
    a, b, _ = s3_relays(3)
    data, oid = blob(32 << 20)  # more than loopback's socket buffers hold: the cut is seen
    assert requests.put(url(a, oid), data=data, headers={"Max-Downloads": "1"}, timeout=60).status_code == 201
    cut_short = http.client.HTTPConnection(*a.address, timeout=60)
    try:
        cut_short.request("GET", f"/{SERVER_ID}/{oid}")
        response = cut_short.getresponse()
        assert response.status == 200 and len(response.read(1000)) == 1000
        assert requests.get(url(b, oid), timeout=60).status_code == 409  # the last one is in flight
    finally:
        cut_short.sock.shutdown(socket.SHUT_RDWR)  # the client goes, now (not when collected)
        cut_short.close()

    def answered_but_busy():
        answer = requests.get(url(b, oid), timeout=60)
        return None if answer.status_code == 409 else answer

    got = wait_until(answered_but_busy, timeout=30, message="the cut-short download to give its slot back")
    assert got.status_code == 200 and got.content == data
    assert requests.get(url(a, oid), timeout=60).status_code == 404


def test_a_download_on_one_host_follows_a_whole_upload_arriving_at_another(s3_relays, seaweed, s3_storage_url):
    a, b, c = s3_relays(3)
    data, oid = blob(20 << 20, seed=5)  # three segments
    body = Paced(data, seconds=6, pieces=40)
    answers = []
    sending = threading.Thread(target=lambda: answers.append(requests.put(url(a, oid), data=body, timeout=60)))
    sending.start()
    try:
        wait_until(lambda: keys_under(seaweed, s3_storage_url, "segments/"), timeout=30, message="a first segment")
        head = requests.head(url(c, oid), timeout=60)
        assert head.status_code == 200 and int(head.headers["Upload-Offset"]) > 0, head.headers
        assert head.headers["Upload-Incomplete"] == "?1"
        with requests.get(url(b, oid), stream=True, timeout=60) as following:
            assert following.status_code == 200 and following.headers["Content-Length"] == str(len(data))
            received = following.raw.read(len(data) + 1)
        assert body.sent < len(data) or body.finished_at is not None
    finally:
        sending.join(60)
    assert answers[0].status_code == 201, answers[0].text
    assert hashlib.sha256(received).hexdigest() == oid
    assert leftover_segments(seaweed, s3_storage_url) == [] and multipart_uploads(seaweed, s3_storage_url) == []
    assert requests.get(url(c, oid), timeout=60).content == data


def seen_in_progress(relay: RelayProcess, oid: str) -> requests.Response:
    """A HEAD on *relay* of the upload of *oid* once it is under way (before: 404)."""
    seen = wait_until(  # a list: a Response is false when its status is an error
        lambda: [answer] if (answer := requests.head(url(relay, oid), timeout=60)).status_code != 404 else None,
        timeout=30,
        interval=0.2,
        message="the upload to be seen",
    )
    return seen[0]


def test_a_download_on_one_host_follows_an_upload_of_unknown_length_arriving_at_another(
    s3_relays, seaweed, s3_storage_url
):
    a, b, c = s3_relays(3)
    data, oid = blob(20 << 20, seed=6)  # two segments of an upload of unknown length
    body = Paced(data, seconds=8, pieces=40)
    answers = []
    sending = threading.Thread(target=lambda: answers.append(requests.put(url(a, oid), data=iter(body), timeout=60)))
    sending.start()
    try:
        head = seen_in_progress(c, oid)
        assert head.status_code == 200 and int(head.headers["Upload-Offset"]) > 0, (head.status_code, head.headers)
        assert head.headers["Upload-Incomplete"] == "?1" and "Upload-Length" not in head.headers
        assert "Upload-Ranges" not in head.headers  # not an upload in chunks
        with requests.get(url(b, oid), stream=True, timeout=60) as following:
            assert following.status_code == 200, following.text
            assert "Content-Length" not in following.headers
            began_before_the_end = body.finished_at is None
            received = b"".join(following.iter_content(1 << 20))
        assert began_before_the_end
    finally:
        sending.join(60)
    assert answers[0].status_code == 201, answers[0].text
    assert hashlib.sha256(received).hexdigest() == oid
    assert leftover_segments(seaweed, s3_storage_url) == [] and multipart_uploads(seaweed, s3_storage_url) == []
    assert keys_under(seaweed, s3_storage_url) == [oid]
    assert requests.get(url(c, oid), timeout=60).content == data


class Follower(threading.Thread):
    """A GET of *target* read to its end on a thread of its own: status, body, and whether
    it was cut off."""

    def __init__(self, target: str):
        super().__init__()
        self.target = target
        self.status, self.received, self.cut = None, bytearray(), False
        self.finished_at = None
        self.start()

    @property
    def body(self) -> bytes:
        return bytes(self.received)

    def run(self) -> None:
        with requests.get(self.target, stream=True, timeout=60) as following:
            self.status = following.status_code
            try:
                for block in following.iter_content(1000):  # each block once it is there
                    self.received += block
            except requests.exceptions.ChunkedEncodingError:
                self.cut = True
        self.finished_at = time.monotonic()


def test_a_follower_of_a_discarded_attempt_is_never_handed_a_whole_wrong_file(s3_relays):
    """A follower reads the first chunk of an attempt that is then discarded (its last chunk
    does not verify); the client sends the upload again at once, right this time. When the
    follower's next look finds the new attempt's segments, what it read and what it reads
    next make a body of the right length but the wrong bytes: it must be cut off, never
    answered whole. Whether a look falls between the two attempts is timing: 8 turns."""
    a, b = s3_relays(2)
    for turn in range(8):
        data, oid = blob(3000, seed=40 + turn)
        wrong = blob(2000, seed=80 + turn)[0]
        ranges = {"first": "bytes 0-1999/3000", "bad end": "bytes 2000-2999/3000"}
        ranges |= {"again": "bytes 0-2499/3000", "end": "bytes 2500-2999/3000"}
        sent = {name: {"Content-Range": value} for name, value in ranges.items()}
        assert requests.put(url(b, oid), data=wrong, headers=sent["first"], timeout=60).status_code == 202
        follower = Follower(url(a, oid))
        wait_until(lambda f=follower: len(f.body) == 2000, message="the follower to read the first attempt")
        # The attempt does not verify, and is discarded; then the upload is sent again, right.
        assert requests.put(url(b, oid), data=data[2000:], headers=sent["bad end"], timeout=60).status_code == 400
        assert requests.put(url(b, oid), data=data[:2500], headers=sent["again"], timeout=60).status_code == 202
        assert requests.put(url(b, oid), data=data[2500:], headers=sent["end"], timeout=60).status_code == 201
        follower.join(60)
        assert follower.status == 200 and follower.body[:2000] == wrong
        whole = hashlib.sha256(follower.body).hexdigest() == oid
        assert follower.cut or whole, f"turn {turn}: {len(follower.body)} bytes, wrong, sent as whole"


def test_a_follower_of_an_upload_of_unknown_length_that_does_not_verify_is_cut_off(s3_relays, seaweed, s3_storage_url):
    a, b = s3_relays(2)
    data = blob(20 << 20, seed=8)[0]
    oid = blob(1000, seed=9)[1]  # not the name of what is sent
    body = Paced(data, seconds=8, pieces=40)
    answers = []
    sending = threading.Thread(target=lambda: answers.append(requests.put(url(a, oid), data=iter(body), timeout=60)))
    sending.start()
    try:
        assert seen_in_progress(b, oid).status_code == 200
        follower = Follower(url(b, oid))
        follower.join(60)
    finally:
        sending.join(60)
    assert answers[0].status_code == 400, answers[0].text
    assert follower.status == 200 and len(follower.body) > 0
    assert follower.cut and len(follower.body) < len(data), len(follower.body)
    assert leftover_segments(seaweed, s3_storage_url) == [] and keys_under(seaweed, s3_storage_url) == []
    assert multipart_uploads(seaweed, s3_storage_url) == []


@pytest.mark.parametrize("sized", [True, False], ids=["known length", "unknown length"])
def test_followers_on_every_host_count_against_the_upload_s_max_downloads(s3_relays, seaweed, s3_storage_url, sized):
    """Max-Downloads: 2 and four followers on three hosts while the upload arrives: two get
    the whole object, the others are refused while those are in flight; then the budget
    is spent, and the object is gone on every host."""
    relays = s3_relays(3)
    data, oid = blob(20 << 20, seed=10)
    body = Paced(data, seconds=8, pieces=40)
    sent = body if sized else iter(body)
    answers = []
    headers = {"Max-Downloads": "2"}
    sending = threading.Thread(
        target=lambda: answers.append(requests.put(url(relays[0], oid), data=sent, headers=headers, timeout=60))
    )
    sending.start()
    try:
        assert seen_in_progress(relays[1], oid).status_code == 200
        followers = [Follower(url(relays[i % 3], oid)) for i in range(1, 5)]
        for follower in followers:
            follower.join(60)
    finally:
        sending.join(60)
    assert answers[0].status_code == 201, answers[0].text
    outcomes = sorted((f.status, f.cut, hashlib.sha256(f.body).hexdigest() == oid) for f in followers)
    assert outcomes[:2] == [(200, False, True)] * 2, outcomes
    assert [status for status, _, _ in outcomes[2:]] == [409, 409], outcomes
    assert all(f.finished_at > body.finished_at for f in followers if f.status == 200)  # waited for the end
    for relay in relays:
        wait_until(lambda r=relay: requests.get(url(r, oid), timeout=60).status_code == 404, message="404")


def test_a_chunk_longer_than_its_content_range_is_refused_as_it_arrives(s3_relays, seaweed, s3_storage_url):
    """Sent without Content-Length (chunked coding), a chunk's body is bounded by its
    Content-Range: refused once it runs past it, nothing of it kept (as on a filesystem)."""
    (relay,) = s3_relays(1, "--max-file-size=1M")
    _, oid = blob(100)
    connection = http.client.HTTPConnection(*relay.address, timeout=60)
    try:
        pieces = (b"x" * (1 << 20) for _ in range(40))  # 40 MiB, if it were all read
        headers = {"Content-Range": "bytes 0-9/100"}
        connection.request("PUT", f"/{SERVER_ID}/{oid}", body=pieces, headers=headers, encode_chunked=True)
        response = connection.getresponse()
        assert response.status == 400 and b"longer than its Content-Range" in response.read()
    except (BrokenPipeError, ConnectionResetError):
        pass  # refused and closed while the body was still going out
    finally:
        connection.close()
    assert leftover_segments(seaweed, s3_storage_url) == [] and multipart_uploads(seaweed, s3_storage_url) == []


class HoldingProxy(threading.Thread):
    """A TCP proxy on 127.0.0.1 in front of the store that, while *holding* is set, holds
    each request whose first bytes name one of *methods* for *seconds* before passing it
    on (a relay's DELETE to the store, say): a race's window, widened."""

    def __init__(self, target_port: int, methods: tuple[bytes, ...], seconds: float):
        super().__init__(daemon=True)
        self.target_port, self.methods, self.seconds = target_port, methods, seconds
        self.holding, self.held = threading.Event(), threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.start()

    def run(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = self.listener.accept()
                server = socket.create_connection(("127.0.0.1", self.target_port))
                threading.Thread(target=self._pass, args=(client, server, True), daemon=True).start()
                threading.Thread(target=self._pass, args=(server, client, False), daemon=True).start()

    def _pass(self, source: socket.socket, sink: socket.socket, requests_side: bool) -> None:
        with contextlib.suppress(OSError), source, sink:
            while data := source.recv(1 << 16):
                if requests_side and self.holding.is_set() and data.startswith(self.methods):
                    self.held.set()
                    time.sleep(self.seconds)
                sink.sendall(data)

    def close(self) -> None:
        self.listener.close()


class CorruptingProxy(HoldingProxy):
    """A HoldingProxy that, while *holding* is set, flips one bit in the next full block of
    a request's body it passes on (the store's link corrupting what the relay sends)."""

    def __init__(self, target_port: int):
        super().__init__(target_port, (), 0.0)

    def _pass(self, source: socket.socket, sink: socket.socket, requests_side: bool) -> None:
        with contextlib.suppress(OSError), source, sink:
            while data := source.recv(1 << 16):
                if requests_side and self.holding.is_set() and len(data) == 1 << 16 and b"HTTP/1.1" not in data:
                    self.holding.clear()
                    data = data[:-1] + bytes([data[-1] ^ 1])
                    self.held.set()
                sink.sendall(data)


@pytest.fixture
def held_hosts(seaweed, relay_env, s3_storage_url, tmp_path):
    """start(methods, seconds) -> (proxy, a, b): two relays on one bucket, host A reaching
    the store through a HoldingProxy, host B directly; all stopped at the end."""
    proxies, relays = [], []

    def start(methods: tuple[bytes, ...], seconds: float):
        proxies.append(HoldingProxy(int(seaweed.endpoint.rsplit(":", 1)[1]), methods, seconds))
        for name, endpoint in (("a", proxies[-1].endpoint), ("b", seaweed.endpoint)):
            args = ["--storage", s3_storage_url, "--s3-endpoint", endpoint, "--get-wait-timeout=0"]
            relays.append(RelayProcess(None, tmp_path / f"{name}.log", args, env=relay_env).start(SERVER_ID))
        return proxies[-1], relays[-2], relays[-1]

    yield start
    for relay in relays:
        relay.kill()
    for proxy in proxies:
        proxy.close()


@pytest.mark.parametrize("how", ["whole", "in chunks"])
def test_bytes_corrupted_on_the_way_to_the_store_are_refused_by_it_never_stored(
    seaweed, relay_env, s3_storage_url, tmp_path, how
):
    """Each body the relay sends the store carries its x-amz-checksum-sha256: a segment of a
    whole upload, or a part of the object an upload in chunks completes, that arrives
    changed is refused, and nothing is stored under the name."""
    proxy = CorruptingProxy(int(seaweed.endpoint.rsplit(":", 1)[1]))
    args = ["--storage", s3_storage_url, "--s3-endpoint", proxy.endpoint, "--get-wait-timeout=0"]
    relay = RelayProcess(None, tmp_path / "a.log", args, env=relay_env).start(SERVER_ID)
    try:
        data, oid = blob(20 << 20, seed=41)
        if how == "whole":
            proxy.holding.set()
            answer = requests.put(url(relay, oid), data=data, timeout=60)
        else:
            half = len(data) // 2
            first = {"Content-Range": f"bytes 0-{half - 1}/{len(data)}"}
            assert requests.put(url(relay, oid), data=data[:half], headers=first, timeout=60).status_code == 202
            proxy.holding.set()
            last = {"Content-Range": f"bytes {half}-{len(data) - 1}/{len(data)}"}
            answer = requests.put(url(relay, oid), data=data[half:], headers=last, timeout=60)
        assert proxy.held.is_set(), "nothing was corrupted"
        assert answer.status_code == 503 and "changed bytes" in answer.text, (answer.status_code, answer.text)
        assert answer.headers["Retry-After"]
        assert keys_under(seaweed, s3_storage_url) == []
        if how == "whole":
            assert requests.get(url(relay, oid), timeout=60).status_code == 404
            assert leftover_segments(seaweed, s3_storage_url) == []
        else:  # the chunks stay: the last one, sent again, completes the upload
            assert requests.put(url(relay, oid), data=data[half:], headers=last, timeout=60).status_code == 201
        assert requests.put(url(relay, oid), data=data, timeout=60).status_code in (200, 201)
        assert requests.get(url(relay, oid), timeout=60).content == data
    finally:
        relay.kill()
        proxy.close()


def test_a_removal_on_one_host_never_deletes_a_copy_stored_since_on_another(held_hosts):
    """Host A removes an expired copy (it looked, then deletes, its DELETE held 2 s on the
    way); meanwhile host B stores the object again, acknowledged. That copy must stay."""
    proxy, a, b = held_hosts((b"DELETE ",), 2.0)
    data, oid = blob(1000)
    lifetime = 1.5
    put = requests.put(url(b, oid), data=data, headers={"Max-Days": repr(lifetime / 86400)}, timeout=60)
    assert put.status_code == 201
    expired_at = time.time() + lifetime
    wait_until(lambda: time.time() > expired_at + 0.2, message="the first copy to expire")
    proxy.holding.set()
    removing = threading.Thread(target=lambda: requests.get(url(a, oid), timeout=60))
    removing.start()
    assert proxy.held.wait(30), "host A sent no DELETE to the store"
    assert requests.put(url(b, oid), data=data, timeout=60).status_code == 201  # no limits this time
    removing.join(60)
    proxy.holding.clear()
    for relay in (a, b):
        got = requests.get(url(relay, oid), timeout=60)
        assert got.status_code == 200 and got.content == data, (relay.base, got.status_code)


def s3_store(s3_storage_url: str, endpoint: str) -> file_relay.S3Store:
    """A store on the test's prefix, as a relay process has it, reaching S3 at *endpoint*."""
    config = file_relay.RelayConfig(server_id=SERVER_ID, storage=s3_storage_url, s3_endpoint=endpoint)
    return file_relay.S3Store(config)


def held_upload(store: file_relay.S3Store, oid: str, data: bytes, sent: int):
    """A whole upload of *data* to *store* on a thread of its own, held once *sent* bytes
    went: (the event that lets the rest go, a future of put_stream's answer)."""
    go_on = threading.Event()

    def body():
        yield from pieces(data[:sent])
        go_on.wait(60)
        yield from pieces(data[sent:])

    pool = concurrent.futures.ThreadPoolExecutor(1)
    uploading = pool.submit(store.put_stream, oid, body(), len(data), file_relay.Limits())
    pool.shutdown(wait=False)
    return go_on, uploading


def test_the_upload_that_loses_a_race_of_whole_ones_is_told_already_stored(seaweed, s3_env, s3_storage_url):
    """Two whole uploads of one object: the one that finishes last finds it stored by the
    other. Its content was the same: it gets 200 (already stored), not 409, removes its own
    segments, and the object stays whole."""
    a, b = s3_store(s3_storage_url, seaweed.endpoint), s3_store(s3_storage_url, seaweed.endpoint)
    data, oid = blob(20 << 20, seed=51)
    go_on, losing = held_upload(a, oid, data, sent=9 << 20)
    try:
        wait_until(lambda: a._segments(oid), timeout=60, message="a first segment of the slower upload")
        assert b.put_stream(oid, pieces(data), len(data), file_relay.Limits()) is True
    finally:
        go_on.set()
    assert losing.result(60) is False
    assert seaweed_bytes(seaweed, s3_storage_url, oid) == data
    assert leftover_segments(seaweed, s3_storage_url) == []


def test_a_delete_on_another_host_does_not_cancel_a_whole_upload_in_progress(seaweed, s3_env, s3_storage_url):
    """DELETE removes the stored object and an upload in chunks; a whole upload still
    arriving on another host is not cancelled by it: it is stored, and reads back whole."""
    a, b = s3_store(s3_storage_url, seaweed.endpoint), s3_store(s3_storage_url, seaweed.endpoint)
    data, oid = blob(20 << 20, seed=52)
    go_on, uploading = held_upload(a, oid, data, sent=9 << 20)
    try:
        wait_until(lambda: a._segments(oid), timeout=60, message="a first segment")
        assert b.delete(oid) is False  # nothing stored, no upload in chunks
    finally:
        go_on.set()
    assert uploading.result(60) is True
    assert seaweed_bytes(seaweed, s3_storage_url, oid) == data


def test_a_chunk_of_bytes_a_whole_upload_in_progress_holds_is_kept_if_that_upload_fails(
    seaweed, s3_env, s3_storage_url
):
    """A chunk acknowledged with 202 is kept until its upload completes, even if a whole
    upload in progress holds its bytes already: that upload may yet fail (here: it does
    not verify), and its segments go with it."""
    a, b = s3_store(s3_storage_url, seaweed.endpoint), s3_store(s3_storage_url, seaweed.endpoint)
    data, oid = blob(20 << 20, seed=56)
    wrong = data[: 9 << 20] + bytes(len(data) - (9 << 20))
    go_on, failing = held_upload(a, oid, wrong, sent=9 << 20)
    try:
        wait_until(lambda: a._segments(oid), timeout=60, message="a first segment")
        chunk = b.put_chunk(oid, 0, (1 << 20) - 1, len(data), [data[: 1 << 20]], None, file_relay.Limits())
        assert isinstance(chunk, file_relay.Progress)
    finally:
        go_on.set()
    with pytest.raises(file_relay.Mismatch):
        failing.result(60)
    assert b.progress(oid).ranges == [(0, (1 << 20) - 1)]


def seaweed_bytes(seaweed, s3_storage_url: str, oid: str) -> bytes:
    bucket, prefix = file_relay.parse_storage_url(s3_storage_url)
    return stored_content(seaweed.client(), bucket, prefix, f"{prefix}objects/{oid}")


def test_an_upload_that_a_sweeper_took_for_abandoned_never_lists_a_segment_it_removes(seaweed, s3_env, s3_storage_url):
    """A whole upload idle for longer than --partial-ttl (4 s) after its first segment is
    taken for abandoned by a sweeper, whose DELETE of that segment is held 4 s on the way;
    meanwhile the upload resumes and ends. Listing its segments as the object would be
    acknowledged with 201, and the held DELETE would then take its first segment: it must
    get 409 (send it again) and store nothing. An upload never lists segments after an idle
    spell that a sweeper may judge abandoned (three quarters of --partial-ttl)."""
    config = file_relay.RelayConfig(
        server_id=SERVER_ID, storage=s3_storage_url, s3_endpoint=seaweed.endpoint, partial_ttl=4
    )
    uploader = file_relay.S3Store(config)
    data, oid = blob(20 << 20, seed=53)
    held = f"DELETE /{uploader.bucket}/{uploader.prefix}segments/{oid}/".encode()
    proxy = HoldingProxy(int(seaweed.endpoint.rsplit(":", 1)[1]), (held,), 4.0)
    try:
        sweeper = file_relay.S3Store(dataclasses.replace(config, s3_endpoint=proxy.endpoint))
        go_on, uploading = held_upload(uploader, oid, data, sent=9 << 20)
        try:
            wait_until(lambda: uploader._segments(oid), timeout=60, message="a first segment")
            idle_since = time.time()
            wait_until(lambda: time.time() > idle_since + 5.5, timeout=30, message="the upload idle past the ttl")
            proxy.holding.set()
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                sweeping = pool.submit(sweeper.sweep)
                assert proxy.held.wait(30), "the sweeper removed nothing"
                go_on.set()
                with pytest.raises(file_relay.Conflict, match="send it again"):
                    uploading.result(60)
                assert sweeping.result(60)["partials"] == 1
        finally:
            go_on.set()
    finally:
        proxy.close()
    assert keys_under(seaweed, s3_storage_url) == [] and leftover_segments(seaweed, s3_storage_url) == []


def holders_at_once(stores: list, key: str) -> list:
    """Each of *stores* takes the claim on *key* at once, holds it 0.3 s, releases it: who
    held it while another did, (name, [the others])."""
    inside, overlaps, lock, start = [], [], threading.Lock(), threading.Barrier(len(stores))

    def hold(store, name):
        start.wait()
        with store._claim(key, unless_stored=False, lease=60.0):
            with lock:
                if inside:
                    overlaps.append((name, list(inside)))
                inside.append(name)
            time.sleep(0.3)  # a holder's work, while the others try
            with lock:
                inside.remove(name)

    with concurrent.futures.ThreadPoolExecutor(len(stores)) as pool:
        for future in [pool.submit(hold, store, i) for i, store in enumerate(stores)]:
            future.result(120)
    return overlaps


def test_racing_takeovers_of_a_dead_host_s_claim_leave_one_holder_at_a_time(seaweed, s3_env, s3_storage_url):
    """Eight stores race for the claim of an object whose holder died (its lease run out):
    each removes the stale claim it saw, then takes its own. One holds it at a time, in
    every round: a stale claim is removed only if it is still the one seen, and a holder
    releases only its own (every claim's body, so its ETag, is its own)."""
    stores = [s3_store(s3_storage_url, seaweed.endpoint) for _ in range(8)]
    overlaps = {}
    for round_ in range(8):
        key = stores[0]._object_key(blob(10, seed=2000 + round_)[1])
        claim = f"{stores[0].prefix}claims/{key[len(stores[0].prefix) :]}"
        seaweed.client().put_object(Bucket=stores[0].bucket, Key=claim, Body=b"", Metadata={"lease": "0.2"})
        put_at = time.time()
        wait_until(lambda: time.time() > put_at + 1.3, message="the dead holder's claim to go stale")  # noqa: B023
        if found := holders_at_once(stores, key):
            overlaps[round_] = found
    assert overlaps == {}


def test_an_upload_in_chunks_is_its_own_beside_a_whole_upload_that_fails(seaweed, s3_env, s3_storage_url):
    """A whole upload in progress has not verified and may fail: an upload in chunks of the
    same object neither counts the whole one's segments as its bytes nor compares its
    chunks with them. Its correct chunks are kept (202), whatever the whole one holds, and
    it completes from its own chunks alone."""
    a, b = s3_store(s3_storage_url, seaweed.endpoint), s3_store(s3_storage_url, seaweed.endpoint)
    data, oid = blob(20 << 20, seed=57)
    eight, sixteen = 8 << 20, 16 << 20
    wrong = bytes(eight) + bytes(eight) + data[sixteen:]  # its first two segments are zeros
    go_on, failing = held_upload(a, oid, wrong, sent=sixteen + (1 << 20))
    limits = file_relay.Limits()
    try:
        wait_until(lambda: len(a._segments(oid)) == 2, timeout=60, message="two segments of the whole upload")
        first = b.put_chunk(oid, 0, (1 << 20) - 1, len(data), [data[: 1 << 20]], None, limits)
        assert isinstance(first, file_relay.Progress) and first.ranges == [(0, (1 << 20) - 1)]
        last = b.put_chunk(oid, sixteen, len(data) - 1, len(data), list(pieces(data[sixteen:])), None, limits)
        assert isinstance(last, file_relay.Progress) and last.ranges == [(0, (1 << 20) - 1), (sixteen, len(data) - 1)]
    finally:
        go_on.set()
    with pytest.raises(file_relay.Mismatch):
        failing.result(60)
    assert b.progress(oid).ranges == [(0, (1 << 20) - 1), (sixteen, len(data) - 1)]
    middle = list(pieces(data[1 << 20 : sixteen]))
    assert b.put_chunk(oid, 1 << 20, sixteen - 1, len(data), middle, None, limits) is file_relay.Stored.CREATED
    assert seaweed_bytes(seaweed, s3_storage_url, oid) == data


def test_an_upload_that_waited_for_a_dead_host_s_claim_never_lists_segments_a_sweeper_removes(
    seaweed, s3_env, s3_storage_url
):
    """A whole upload stores its segments without a pause, then waits for the claim a dead
    host left (lease 7 s) past --partial-ttl (4 s); a sweeper meanwhile takes its segments
    for abandoned, its DELETE held 3 s on the way. The upload must not list them as its
    object (201, then unreadable): the wait counts as idle, and it gets 409."""
    config = file_relay.RelayConfig(
        server_id=SERVER_ID, storage=s3_storage_url, s3_endpoint=seaweed.endpoint, partial_ttl=4
    )
    uploader = file_relay.S3Store(config)
    data, oid = blob(17 << 20, seed=72)
    key = uploader._object_key(oid)
    claim = f"{uploader.prefix}claims/{key[len(uploader.prefix) :]}"
    held = f"DELETE /{uploader.bucket}/{uploader.prefix}segments/{oid}/".encode()
    proxy = HoldingProxy(int(seaweed.endpoint.rsplit(":", 1)[1]), (held,), 3.0)
    try:
        sweeper = file_relay.S3Store(dataclasses.replace(config, s3_endpoint=proxy.endpoint))
        proxy.holding.set()
        seaweed.client().put_object(Bucket=uploader.bucket, Key=claim, Body=b"dead", Metadata={"lease": "7"})
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            uploading = pool.submit(uploader.put_stream, oid, pieces(data), len(data), file_relay.Limits())
            wait_until(lambda: len(uploader._segments(oid)) == 3, timeout=60, message="all three segments")
            stored_at = time.time()
            wait_until(lambda: time.time() > stored_at + 5, timeout=30, message="segments idle past the ttl")
            sweeping = pool.submit(sweeper.sweep)
            with pytest.raises(file_relay.Conflict, match="send it again"):
                uploading.result(60)
            sweeping.result(60)
    finally:
        proxy.close()
    assert keys_under(seaweed, s3_storage_url) == []


HOLDER_WITH_A_CLOCK_AHEAD = r"""
import sys, time
real = time.time
time.time = lambda: real() + float(sys.argv[1])
import file_relay
config = file_relay.RelayConfig(server_id="x" * 28, storage=sys.argv[2], s3_endpoint=sys.argv[3])
store = file_relay.S3Store(config)
with store._claim(sys.argv[4], unless_stored=False, lease=store._completion_lease(4)):
    print("holds", real(), flush=True)
"""


@pytest.mark.parametrize("ahead", [0.0, 8.0])
def test_a_host_whose_clock_runs_ahead_never_takes_a_live_claim(seaweed, s3_env, s3_storage_url, tmp_path, ahead):
    """Host A holds a completion's claim (lease about 5 s) for 3 s; host B, whose clock runs
    *ahead* s ahead of the store's, asks for it meanwhile: B must wait for A's release. A
    claim is judged stale by how long a host has seen it, on its own monotonic clock."""
    a = s3_store(s3_storage_url, seaweed.endpoint)
    key = a._object_key(blob(10, seed=73)[1])
    script = tmp_path / "holder.py"
    script.write_text(HOLDER_WITH_A_CLOCK_AHEAD)
    released, holding = [], threading.Event()

    def hold():
        with a._claim(key, unless_stored=False, lease=a._completion_lease(4)):
            holding.set()
            time.sleep(3)
            released.append(time.time())

    thread = threading.Thread(target=hold)
    thread.start()
    assert holding.wait(30)
    env = {**os.environ, "PYTHONPATH": str(SCRIPT.parent)}
    b = subprocess.run(
        [sys.executable, str(script), str(ahead), s3_storage_url, seaweed.endpoint, key],
        capture_output=True,
        text=True,
        timeout=90,
        env=env,
    )
    thread.join()
    assert b.returncode == 0, b.stderr[-2000:]
    b_holds = float(b.stdout.split("holds ")[1].split()[0])
    assert b_holds >= released[0], f"B took the claim {released[0] - b_holds:.2f} s before A released it"


def test_an_upload_the_relay_names_keeps_its_record_while_its_chunks_arrive(seaweed, s3_env, s3_storage_url):
    """--partial-ttl is how long an upload may stay idle: a name-less upload in chunks, one
    every 2.5 s (never idle for the 4 s ttl), keeps its record through a sweep."""
    config = file_relay.RelayConfig(
        server_id=SERVER_ID, storage=s3_storage_url, s3_endpoint=seaweed.endpoint, partial_ttl=4
    )
    store = file_relay.S3Store(config)
    data, oid = blob(3 << 20, seed=71)
    size = 1 << 20
    token = store.start_unnamed(len(data), file_relay.Limits(), "f.bin")
    for i in range(2):
        chunk = [data[i * size : (i + 1) * size]]
        assert isinstance(
            store.put_unnamed_chunk(token, i * size, (i + 1) * size - 1, len(data), chunk, None), file_relay.Progress
        )
        began = time.time()
        wait_until(lambda: time.time() > began + 2.5, message="the next chunk's turn")  # noqa: B023
    store.sweep()
    done = store.put_unnamed_chunk(token, 2 * size, 3 * size - 1, len(data), [data[2 * size :]], None)
    assert isinstance(done, file_relay.Named) and done.oid == oid


def test_a_whole_upload_s_segments_are_reported_in_progress_not_as_chunks_to_go_on_from(
    s3_relays, seaweed, s3_storage_url
):
    """A whole upload's segments (here, one left by a killed host) are no upload in chunks:
    HEAD reports them in progress (Upload-Offset) without Upload-Ranges, and a chunk sent
    from that offset is answered with the chunks alone, as they are."""
    (relay,) = s3_relays(1)
    store = s3_store(s3_storage_url, seaweed.endpoint)
    data, oid = blob(20 << 20, seed=74)
    left = store._segment_key(oid, len(data), 0, (8 << 20) - 1, whole=True)
    seaweed.client().put_object(Bucket=store.bucket, Key=left, Body=data[: 8 << 20])
    head = requests.head(url(relay, oid), timeout=60)
    assert head.status_code == 200 and head.headers["Upload-Offset"] == str(8 << 20), head.headers
    assert "Upload-Ranges" not in head.headers
    rest = {"Content-Range": f"bytes {8 << 20}-{len(data) - 1}/{len(data)}"}
    answer = requests.put(url(relay, oid), data=data[8 << 20 :], headers=rest, timeout=60)
    assert answer.status_code == 202 and answer.headers["Upload-Ranges"] == f"{8 << 20}-{len(data) - 1}"
    assert requests.head(url(relay, oid), timeout=60).headers["Upload-Ranges"] == f"{8 << 20}-{len(data) - 1}"


class RefusingProxy(HoldingProxy):
    """A HoldingProxy that, while *holding* is set, closes the connection of each request
    whose first bytes name one of *methods*, unanswered (the store gone for that request)."""

    def __init__(self, target_port: int, methods: tuple[bytes, ...]):
        super().__init__(target_port, methods, 0.0)

    def _pass(self, source: socket.socket, sink: socket.socket, requests_side: bool) -> None:
        with contextlib.suppress(OSError), source, sink:
            while data := source.recv(1 << 16):
                if requests_side and self.holding.is_set() and data.startswith(self.methods):
                    self.held.set()
                    return
                sink.sendall(data)


def test_the_segments_of_a_removed_object_are_never_taken_for_an_upload_in_progress(seaweed, s3_env, s3_storage_url):
    """A removal deletes an object's list, then its segments: if those outlive it (the
    store failed them, or the host died), no host follows them as an upload, nor reports
    them in progress; a sweeper removes them, and the note that named them, later."""
    direct = s3_store(s3_storage_url, seaweed.endpoint)
    data, oid = blob(20 << 20, seed=54)  # three segments
    assert direct.put_stream(oid, pieces(data), len(data), file_relay.Limits()) is True
    segments = f"DELETE /{direct.bucket}/{direct.prefix}segments/".encode()
    proxy = RefusingProxy(int(seaweed.endpoint.rsplit(":", 1)[1]), (segments,))
    try:
        proxy.holding.set()
        assert s3_store(s3_storage_url, proxy.endpoint).delete(oid) is True
        assert proxy.held.is_set(), "no segment's removal was refused"
    finally:
        proxy.close()
    assert keys_under(seaweed, s3_storage_url) == []
    assert len(keys_under(seaweed, s3_storage_url, f"segments/{oid}/")) == 4  # three segments and the note
    assert direct.follow(oid) is None and direct.progress(oid) is None and direct.lookup(oid) is None
    swept = direct.sweep(now=time.time() + direct.config.partial_ttl + 60)
    assert swept["partials"] == 1 and keys_under(seaweed, s3_storage_url, "segments/") == [], swept


def test_a_chunk_sent_again_after_its_upload_s_object_was_removed_gets_404(seaweed, s3_env, s3_storage_url):
    """A chunk of a finished upload the relay names is compared with the object it stored;
    if that object is removed while it is read (the GET held 3 s on the way), the chunk
    gets 404 with the reason, not 500."""
    direct = s3_store(s3_storage_url, seaweed.endpoint)
    data, oid = blob(1000, seed=55)
    token = direct.start_unnamed(len(data), file_relay.Limits(), None)
    direct.put_unnamed_chunk(token, 0, 499, len(data), [data[:500]], None)
    assert direct.put_unnamed_chunk(token, 500, 999, len(data), [data[500:]], None).oid == oid
    read = f"GET /{direct.bucket}/{direct.prefix}objects/{oid}".encode()
    proxy = HoldingProxy(int(seaweed.endpoint.rsplit(":", 1)[1]), (read,), 3.0)
    try:
        slow = s3_store(s3_storage_url, proxy.endpoint)
        proxy.holding.set()
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            again = pool.submit(slow.put_unnamed_chunk, token, 0, 499, len(data), [data[:500]], None)
            assert proxy.held.wait(30), "the chunk's comparison read nothing"
            assert direct.delete(oid) is True
            with pytest.raises(file_relay.NotFound, match="removed meanwhile"):
                again.result(60)
    finally:
        proxy.close()


def test_a_length_past_what_the_relay_stores_in_s3_is_refused_before_the_body(s3_relays):
    """Parts are at most 64 MiB (an upload holds three in memory), so 10,000 of them make
    the largest object: a larger Content-Length gets 413 at once, nothing read."""
    (relay,) = s3_relays(1)
    connection = http.client.HTTPConnection(*relay.address, timeout=60)
    try:
        connection.putrequest("PUT", f"/{SERVER_ID}/{blob(10)[1]}")
        connection.putheader("Content-Length", str(10**13))
        connection.endheaders()
        response = connection.getresponse()
        assert response.status == 413 and b"larger than the relay stores in S3" in response.read()
    finally:
        connection.close()


def test_an_upload_of_unknown_length_is_refused_once_it_outgrows_what_its_parts_hold(seaweed, s3_env, s3_storage_url):
    """Without a Content-Length the relay sends 16 MiB parts, so at most max_parts of them
    (10,000: 156 GiB) make the object: a body that grows past that is refused with
    TooLarge (413) as soon as it does, before a part beyond is sent, and leaves nothing;
    one of exactly that size is stored. Here max_parts is 2: 32 MiB."""
    config = file_relay.RelayConfig(server_id=SERVER_ID, storage=s3_storage_url, s3_endpoint=seaweed.endpoint)
    store = file_relay.S3Store(config)
    store.max_parts = 2
    exact, exact_oid = blob(32 << 20, seed=21)
    assert store.put_stream(exact_oid, pieces(exact), None, file_relay.Limits())
    over, over_oid = blob((32 << 20) + 1, seed=22)
    with pytest.raises(file_relay.TooLarge) as refused:
        store.put_stream(over_oid, pieces(over), None, file_relay.Limits())
    reason = str(refused.value)
    assert "without a Content-Length" in reason and "32.0 MiB" in reason and "\n" not in reason, reason
    assert file_relay.status_of(refused.value) == 413
    assert keys_under(seaweed, s3_storage_url) == [exact_oid]
    assert multipart_uploads(seaweed, s3_storage_url) == [] and leftover_segments(seaweed, s3_storage_url) == []


def test_an_upload_of_unknown_length_past_a_limit_gets_413_with_the_reason(s3_relays, seaweed, s3_storage_url):
    """The refusal of a body of unknown length that grows past a limit mid-body reaches the
    client as 413 and one line, and leaves nothing (here --max-file-size; past what 16 MiB
    parts hold is refused the same way, above)."""
    (relay,) = s3_relays(1, "--max-file-size=20M")
    data, oid = blob(24 << 20, seed=25)
    answer = requests.put(url(relay, oid), data=pieces(data), timeout=60)
    assert answer.status_code == 413 and "larger than the relay's limit" in answer.text, (
        answer.status_code,
        answer.text,
    )
    assert len(answer.text.strip().splitlines()) == 1, answer.text
    assert keys_under(seaweed, s3_storage_url) == [] and leftover_segments(seaweed, s3_storage_url) == []
    assert multipart_uploads(seaweed, s3_storage_url) == []


def pieces(data: bytes, size: int = 1 << 20):
    """*data* in blocks of *size* bytes, as a request body arrives."""
    return (data[start : start + size] for start in range(0, len(data), size))


def test_a_whole_upload_in_progress_is_counted_once_in_the_usage(seaweed, s3_env, s3_storage_url):
    """A whole upload of known length is stored as segments, which the listing tells from
    a chunk's: the usage counts it once, its length reserved once (its stored segments,
    and the rest that this process holds for it), beside an upload in chunks (its length).
    Once stored, its segments are the object's bytes, counted once, as stored."""
    config = file_relay.RelayConfig(server_id=SERVER_ID, storage=s3_storage_url, s3_endpoint=seaweed.endpoint)
    store = file_relay.S3Store(config)
    data, oid = blob(24 << 20, seed=23)  # three segments of 8 MiB
    chunked, chunked_oid = blob(200_000, seed=24)
    store.put_chunk(chunked_oid, 0, 99_999, len(chunked), [chunked[:100_000]], None, file_relay.Limits())
    go_on = threading.Event()

    def held_after_two_segments():
        yield from pieces(data[: 16 << 20])
        go_on.wait(60)
        yield from pieces(data[16 << 20 :])

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        uploading = pool.submit(store.put_stream, oid, held_after_two_segments(), len(data), file_relay.Limits())
        try:
            wait_until(
                lambda: (
                    len(keys_under(seaweed, s3_storage_url, f"segments/{oid}/")) == 2 and store._reserved == 8 << 20
                ),
                timeout=60,
                message="two segments stored",
            )
            usage = store.usage()
        finally:
            go_on.set()
        assert uploading.result(60)
    assert usage["partial_count"] == 2, usage
    assert usage["reserved_bytes"] == len(data) + len(chunked), usage
    assert usage["partial_allocated_bytes"] == (16 << 20) + 100_000, usage
    assert usage["disk_used_bytes"] == len(data) + 100_000, usage
    stored = store.usage()
    assert (stored["stored_count"], stored["stored_bytes"]) == (1, len(data)), stored
    assert (stored["partial_count"], stored["partial_allocated_bytes"]) == (1, 100_000), stored
    assert stored["disk_used_bytes"] == len(data) + 100_000, stored


def idle_between(data: bytes, pause: float):
    """A body of unknown length: the first 17 MiB (one segment, and a byte), then nothing
    for *pause* seconds, then the rest."""
    yield data[: 17 << 20]
    time.sleep(pause)
    yield data[17 << 20 :]


def test_an_upload_the_sweeper_took_for_abandoned_is_told_to_send_again(s3_relays, seaweed, s3_storage_url):
    """An upload of unknown length that stays idle for longer than --partial-ttl has its
    multipart upload aborted by a sweeper: it gets 409 with the reason, not 500, and
    nothing is stored."""
    (relay,) = s3_relays(1, "--partial-ttl=2", "--sweep-interval=1")
    data, oid = blob(20 << 20)
    answer = requests.put(url(relay, oid), data=idle_between(data, pause=6), timeout=60)
    assert answer.status_code == 409 and "send it again" in answer.text, (answer.status_code, answer.text)
    assert keys_under(seaweed, s3_storage_url) == []


@pytest.mark.parametrize("sized", [True, False], ids=["length", "unknown-length"])
def test_an_upload_still_arriving_is_never_swept_however_long_it_lasts(s3_relays, seaweed, s3_storage_url, sized):
    """--partial-ttl is how long an upload may stay idle, not how long it may last: a whole
    upload paced over more than twice the ttl, a segment stored every ttl/2 or so, is stored."""
    (relay,) = s3_relays(1, "--partial-ttl=6", "--sweep-interval=1")
    data, oid = blob((40 if sized else 64) << 20, seed=18)  # segments of 8 MiB, or of 16 MiB
    body = Paced(data, seconds=15 if sized else 14, pieces=60)
    answer = requests.put(url(relay, oid), data=body if sized else iter(body), timeout=120)
    assert answer.status_code == 201, (answer.status_code, answer.text)
    assert keys_under(seaweed, s3_storage_url) == [oid]
    assert multipart_uploads(seaweed, s3_storage_url) == [] and leftover_segments(seaweed, s3_storage_url) == []


def test_a_contradicting_chunk_being_compared_never_costs_the_acknowledged_ones(held_hosts, seaweed, s3_storage_url):
    """A chunk is stored as a segment, then compared with what overlaps it. While host A
    compares a chunk that contradicts an acknowledged one (its GETs held 3 s on the way), a
    chunk that completes the upload arrives at host B: the object does not verify, but the
    acknowledged chunks must stay, the contradicting one get 409, and the upload end 201."""
    proxy, a, b = held_hosts((b"GET ",), 3.0)
    data, oid = blob(3000)

    def chunk(relay, first: int, last: int, payload: bytes) -> requests.Response:
        headers = {"Content-Range": f"bytes {first}-{last}/3000"}
        return requests.put(url(relay, oid), data=payload, headers=headers, timeout=60)

    assert chunk(b, 0, 1499, data[:1500]).status_code == 202
    proxy.holding.set()
    answers = []
    contradicting = threading.Thread(target=lambda: answers.append(chunk(a, 1000, 1999, blob(1000, seed=9)[0])))
    contradicting.start()
    wait_until(lambda: len(keys_under(seaweed, s3_storage_url, "segments/")) == 2, message="A's segment")
    completing = chunk(b, 2000, 2999, data[2000:])
    contradicting.join(60)
    proxy.holding.clear()
    assert answers[0].status_code == 409, (answers[0].status_code, answers[0].text)
    assert completing.status_code in (201, 202, 409), (completing.status_code, completing.text)
    assert completing.status_code != 409 or completing.headers["Retry-After"]  # come back, not refused
    for _ in range(3):  # the client sends what the relay lacks, as send does
        head = requests.head(url(b, oid), timeout=60)
        if head.status_code == 200 and "Upload-Ranges" not in head.headers:
            break
        assert "0-1499" in head.headers.get("Upload-Ranges", "0-1499"), head.headers  # acknowledged: kept
        chunk(b, 1500, 2999, data[1500:])
    assert requests.get(url(a, oid), timeout=60).content == data


def test_a_host_killed_mid_upload_leaves_nothing_under_the_name(s3_relays, seaweed, s3_storage_url):
    a, b = s3_relays(2)
    data, oid = blob(20 << 20)
    body = Paced(data, seconds=6, pieces=40)

    def send() -> None:
        with contextlib.suppress(requests.RequestException):  # its relay is killed
            requests.put(url(a, oid), data=body, timeout=60)

    sending = threading.Thread(target=send)
    sending.start()
    wait_until(lambda: keys_under(seaweed, s3_storage_url, "segments/"), timeout=30, message="a first segment")
    following = requests.get(url(b, oid), stream=True, timeout=60)
    assert following.status_code == 200
    assert following.raw.read(1 << 20) == data[: 1 << 20]
    a.kill()
    sending.join(60)
    assert keys_under(seaweed, s3_storage_url) == []
    s3_relays(1, "--partial-ttl=1", "--sweep-interval=1")  # whose sweeps remove what was abandoned
    wait_until(
        lambda: not leftover_segments(seaweed, s3_storage_url) and not multipart_uploads(seaweed, s3_storage_url),
        timeout=20,
        message="the sweeps to remove the abandoned segments and multipart upload",
    )
    with pytest.raises(requests.exceptions.ChunkedEncodingError):  # cut off, never a body that looks whole
        b"".join(following.iter_content(1 << 20))
    following.close()
    assert requests.get(url(b, oid), timeout=60).status_code == 404
    data_b = requests.put(url(b, oid), data=data, timeout=60)  # another host stores it whole
    assert data_b.status_code == 201
    assert requests.get(url(b, oid), timeout=60).content == data


@pytest.mark.parametrize("size", [0, 2000, 9 << 20])  # in memory; staged and copied under its name
def test_a_name_less_upload_on_one_host_downloads_from_another(s3_relays, seaweed, s3_storage_url, size):
    a, b = s3_relays(2)
    data, oid = blob(size, seed=11)
    stored = requests.put(f"{url(a)}/new/report.bin", data=data, timeout=60)
    assert stored.status_code == 201, stored.text
    assert oid in stored.text and stored.headers["Location"].endswith(f"/{oid}?name=report.bin")
    assert requests.get(url(b, oid), timeout=60).content == data
    again = requests.put(f"{url(b)}/new/", data=data, timeout=60)
    assert again.status_code == 200 and oid in again.text
    assert keys_under(seaweed, s3_storage_url) == [oid] and keys_under(seaweed, s3_storage_url, "incoming/") == []
    assert multipart_uploads(seaweed, s3_storage_url) == []


def test_a_resumable_name_less_upload_goes_to_every_host(s3_relays, seaweed, s3_storage_url):
    relays = s3_relays(3)
    data, oid = blob(3 << 20, seed=12)
    piece = 1 << 20
    started = requests.post(f"{url(relays[0])}/new/data.bin", headers={"Upload-Length": str(len(data))}, timeout=60)
    assert started.status_code == 201, started.text
    token = started.headers["Location"].rsplit("/", 1)[-1]
    uploads = [f"{url(relay)}/uploads/{token}" for relay in relays]
    for step, index in enumerate([2, 0, 1]):
        first, last = index * piece, (index + 1) * piece - 1
        headers = {"Content-Range": f"bytes {first}-{last}/{len(data)}"}
        answer = requests.put(uploads[step], data=data[first : last + 1], headers=headers, timeout=60)
        assert answer.status_code == (201 if step == 2 else 202), answer.text
        state = requests.head(uploads[(step + 1) % 3], timeout=60)
        assert state.status_code == 200
    assert oid in answer.text and answer.headers["Location"].endswith(f"/{oid}?name=data.bin")
    assert requests.head(uploads[1], timeout=60).headers["Upload-Incomplete"] == "?0"
    assert requests.get(url(relays[2], oid), timeout=60).content == data
    assert leftover_segments(seaweed, s3_storage_url) == []
    cancelled = requests.post(f"{url(relays[1])}/new/", headers={"Upload-Length": "10"}, timeout=60)
    other = cancelled.headers["Location"].rsplit("/", 1)[-1]
    assert requests.delete(f"{url(relays[2])}/uploads/{other}", timeout=60).status_code == 200
    assert requests.head(f"{url(relays[0])}/uploads/{other}", timeout=60).status_code == 404


def chunk(relay, oid: str, data: bytes, first: int, last: int, **kwargs) -> requests.Response:
    headers = {"Content-Range": f"bytes {first}-{last}/{len(data)}"}
    return requests.put(url(relay, oid), data=data[first : last + 1], headers=headers, timeout=60, **kwargs)


def test_the_chunks_of_one_upload_go_to_different_hosts_in_any_order(s3_relays, seaweed, s3_storage_url):
    relays = s3_relays(3)
    data, oid = blob(6 << 20)
    piece = 1 << 20
    order = [4, 1, 5, 0, 3, 2]
    for step, index in enumerate(order):
        first, last = index * piece, (index + 1) * piece - 1
        answer = chunk(relays[step % 3], oid, data, first, last)
        if step < len(order) - 1:
            assert answer.status_code == 202, answer.text
            for relay in relays:  # every host knows where the upload stands
                head = requests.head(url(relay, oid), timeout=60)
                received = sorted(order[: step + 1])
                assert head.headers["Upload-Length"] == str(len(data))
                assert head.headers["Upload-Offset"] == str(piece * next(i for i in range(7) if i not in received))
                assert head.headers["Upload-Ranges"] == answer.headers["Upload-Ranges"]
        else:
            assert answer.status_code == 201, answer.text
    for relay in relays:
        assert requests.get(url(relay, oid), timeout=60).content == data
    assert leftover_segments(seaweed, s3_storage_url) == [] and keys_under(seaweed, s3_storage_url) == [oid]
    retried = chunk(relays[1], oid, data, 0, piece - 1)
    assert retried.status_code == 200 and "already stored" in retried.text


def test_a_download_on_one_host_follows_chunks_arriving_at_another(s3_relays):
    a, b = s3_relays(2)
    data, oid = blob(3 << 20, seed=3)
    piece = 1 << 20
    assert chunk(a, oid, data, 0, piece - 1).status_code == 202
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        following = pool.submit(lambda: requests.get(url(b, oid), timeout=60))
        wait_until(
            lambda: requests.get(url(b), timeout=60).json()["downloads_in_progress"] == 1,
            timeout=30,
            message="B's download of the upload to begin",
        )
        assert chunk(a, oid, data, piece, 2 * piece - 1).status_code == 202
        assert chunk(a, oid, data, 2 * piece, 3 * piece - 1).status_code == 201
        got = following.result(60)
    assert got.status_code == 200 and got.content == data


def test_a_chunk_that_contradicts_another_host_s_is_refused_and_the_upload_goes_on(s3_relays):
    a, b = s3_relays(2)
    data, oid = blob(2 << 20, seed=4)
    piece = 1 << 20
    assert chunk(a, oid, data, 0, piece - 1).status_code == 202
    other = bytearray(data)
    other[100] ^= 1
    refused = chunk(b, oid, bytes(other), 0, piece - 1)
    assert refused.status_code == 409 and "differ" in refused.text
    overlapping = chunk(b, oid, bytes(other), 0, piece + 99)
    assert overlapping.status_code == 409 and "differ" in overlapping.text
    assert requests.head(url(a, oid), timeout=60).headers["Upload-Ranges"] == f"0-{piece - 1}"
    assert chunk(b, oid, data, piece, 2 * piece - 1).status_code == 201
    assert requests.get(url(a, oid), timeout=60).content == data


def test_a_host_killed_mid_chunk_loses_nothing_acknowledged_and_another_resumes(s3_relays, seaweed, s3_storage_url):
    a, b = s3_relays(2)
    data, oid = blob(12 << 20, seed=5)
    piece = 4 << 20
    assert chunk(a, oid, data, 0, piece - 1).status_code == 202
    body = Paced(data[piece : 3 * piece], seconds=6, pieces=24)

    def send() -> None:
        with contextlib.suppress(requests.RequestException):  # its relay is killed
            requests.put(
                url(a, oid), data=body, headers={"Content-Range": f"bytes {piece}-{3 * piece - 1}/{len(data)}"}
            )

    sending = threading.Thread(target=send)
    sending.start()
    wait_until(lambda: body.sent > piece, timeout=30, message="half the chunk to be sent")
    a.kill()
    sending.join(60)
    head = requests.head(url(b, oid), timeout=60)
    assert head.headers["Upload-Ranges"] == f"0-{piece - 1}" and head.headers["Upload-Offset"] == str(piece)
    assert chunk(b, oid, data, piece, 3 * piece - 1).status_code == 201
    assert requests.get(url(b, oid), timeout=60).content == data
    assert leftover_segments(seaweed, s3_storage_url) == []


def test_racing_reservations_of_the_last_download_on_several_hosts_give_out_one(seaweed, s3_env, s3_storage_url):
    """Eight stores (one per host, each with its own client) reserve the one download of
    an object at the same moment: exactly one gets it, the others are told it is taken."""
    config = file_relay.RelayConfig(server_id=SERVER_ID, storage=s3_storage_url, s3_endpoint=seaweed.endpoint)
    stores = [file_relay.S3Store(config) for _ in range(8)]
    data, oid = blob(1000)
    assert stores[0].put_stream(oid, [data], len(data), file_relay.Limits(max_downloads=1))
    readers = [store.open(oid) for store in stores]
    together = threading.Barrier(len(readers))

    def reserve(reader) -> bool:
        together.wait(10)
        try:
            return reader.store.reserve_download(reader) is not None
        except file_relay.Busy:
            return False

    try:
        with concurrent.futures.ThreadPoolExecutor(len(readers)) as pool:
            assert list(pool.map(reserve, readers)).count(True) == 1
    finally:
        for reader in readers:
            reader.close()  # nothing was read: the one reserved is given back
    assert stores[1].lookup(oid).remaining_downloads == 1


# -- the store failing ---------------------------------------------------------------------


@pytest.fixture
def own_seaweed(tmp_path):
    """A SeaweedFS of this test's own, to stop and start again."""
    from seaweed import Seaweed

    server = Seaweed(tmp_path / "own-seaweed").start()
    yield server
    server.stop()


def own_relay(server, tmp_path, *options) -> RelayProcess:
    env = {key: value for key, value in os.environ.items() if not key.startswith("AWS_")}
    args = ["--storage", "s3://relay/faults", "--s3-endpoint", server.endpoint, "--get-wait-timeout=0", *options]
    relay = RelayProcess(None, tmp_path / "relay.log", args, env={**env, **server.env, "HOME": str(tmp_path)})
    return relay.start(SERVER_ID)


def test_the_store_stopped_mid_upload_gives_503_and_no_object(own_seaweed, tmp_path, monkeypatch):
    relay = own_relay(own_seaweed, tmp_path, "--idle-timeout=5")  # a follower of what it left stalls for 5 s
    try:
        data, oid = blob(24 << 20)
        body = Paced(data, seconds=6, pieces=48)
        answers = []
        sending = threading.Thread(target=lambda: answers.append(requests.put(url(relay, oid), data=body, timeout=60)))
        sending.start()
        wait_until(lambda: keys_under(own_seaweed, "s3://relay/faults", "segments/"), timeout=30, message="a segment")
        own_seaweed.stop()
        sending.join(60)
        assert answers and answers[0].status_code == 503, answers and answers[0].text
        assert "object store" in answers[0].text and answers[0].headers["Retry-After"]
        down = requests.get(url(relay, oid), timeout=60)
        assert down.status_code == 503 and down.headers["Retry-After"] and "object store" in down.text
        status = requests.get(url(relay), timeout=60)
        assert status.status_code == 503 and "object store" in status.text
        own_seaweed.start()
        assert keys_under(own_seaweed, "s3://relay/faults") == []
        with requests.get(url(relay, oid), stream=True, timeout=60) as left:  # the segments the store kept
            if left.status_code == 200:
                with pytest.raises(requests.exceptions.ChunkedEncodingError):  # never a body that looks whole
                    b"".join(left.iter_content(1 << 20))
            else:
                assert left.status_code == 404
        assert requests.put(url(relay, oid), data=data, timeout=60).status_code == 201
        assert requests.get(url(relay, oid), timeout=60).content == data
        for name, value in own_seaweed.env.items():  # the failed upload's segments: a sweeper's, once idle
            monkeypatch.setenv(name, value)
        config = file_relay.RelayConfig(
            server_id=SERVER_ID, storage="s3://relay/faults", s3_endpoint=own_seaweed.endpoint
        )
        assert file_relay.S3Store(config).sweep(now=time.time() + config.partial_ttl + 60)["partials"] == 1
        assert leftover_segments(own_seaweed, "s3://relay/faults") == []
        assert requests.get(url(relay, oid), timeout=60).content == data
    finally:
        relay.kill()


def test_the_store_stopped_mid_download_cuts_the_download_off(own_seaweed, tmp_path):
    relay = own_relay(own_seaweed, tmp_path)
    try:
        data, oid = blob(32 << 20)
        assert requests.put(url(relay, oid), data=data, timeout=60).status_code == 201
        with requests.get(url(relay, oid), stream=True, timeout=60) as download:
            assert download.status_code == 200 and download.headers["Content-Length"] == str(len(data))
            received = download.raw.read(1 << 20)
            own_seaweed.stop()
            with pytest.raises(requests.RequestException):
                for block in download.iter_content(1 << 16):
                    received += block
        assert len(received) < len(data) and data.startswith(received)
    finally:
        relay.kill()


def test_nginx_in_front_of_three_hosts_on_one_bucket(s3_relays, tmp_path, certificate):
    """deploy/nginx-file-relay.conf with the three relays as upstreams (round robin): no
    request needs a particular host, so every route works whichever host it reaches."""
    from test_deployment import Nginx, _nginx, https_session

    nginx = _nginx()
    if nginx is None:
        pytest.skip("nginx is not installed")
    relays = s3_relays(3)
    proxy = Nginx(tmp_path, [relay.address[1] for relay in relays], certificate).start(nginx)
    try:
        base = f"https://127.0.0.1:{proxy.port}/{SERVER_ID}"
        objects = [blob(size, seed=seed) for seed, size in enumerate((1000, 300_000, 9 << 20))]
        with https_session(certificate[0]) as https:
            for data, oid in objects:
                assert https.put(f"{base}/{oid}", data=data).status_code == 201
            for data, oid in objects * 2:
                assert https.get(f"{base}/{oid}").content == data
                ranged = https.get(f"{base}/{oid}", headers={"Range": "bytes=10-19"})
                assert ranged.status_code == 206 and ranged.content == data[10:20]
            once, once_oid = blob(5000, seed=9)
            assert https.put(f"{base}/{once_oid}", data=once, headers={"Max-Downloads": "1"}).status_code == 201
            assert https.get(f"{base}/{once_oid}").content == once
            # 409 only while the download that went through is still being counted
            assert {https.get(f"{base}/{once_oid}").status_code for _ in range(3)} <= {404, 409}
            wait_until(lambda: https.get(f"{base}/{once_oid}").status_code == 404, message="the used-up object to go")
            assert https.delete(f"{base}/{objects[0][1]}").status_code == 200
            assert [https.head(f"{base}/{objects[0][1]}").status_code for _ in range(3)] == [404] * 3
    finally:
        proxy.stop()
    served = [relay for relay in relays if f"GET /***/{objects[2][1]}" in relay.log()]
    assert len(served) >= 2, "nginx sent every download to the same relay"


def test_a_download_whose_host_died_counts_once_its_lease_runs_out(seaweed, s3_env, s3_storage_url):
    """Host A reserves the one download of an object and dies (its reader is never
    closed): the slot stays taken while its lease lasts, then counts as a download, as a
    crash on a filesystem counts one, so the object is used up for every host."""
    config = file_relay.RelayConfig(server_id=SERVER_ID, storage=s3_storage_url, s3_endpoint=seaweed.endpoint)
    a, b = file_relay.S3Store(config), file_relay.S3Store(config)
    a.lease_seconds = 5.0  # long enough for B to look while it lasts, on a busy machine too
    data, oid = blob(1000)
    assert a.put_stream(oid, [data], len(data), file_relay.Limits(max_downloads=1))
    a.reserve_download(a.open(oid))  # and nothing more from A
    reader = b.open(oid)

    def reserved_or_used_up() -> str | None:
        try:
            b.reserve_download(reader)
            return "reserved"
        except file_relay.Busy:
            return None  # A's lease still holds the slot
        except file_relay.NotFound:
            return "used up"

    try:
        assert reserved_or_used_up() is None
        assert wait_until(reserved_or_used_up, timeout=30, message="the dead host's lease to run out") == "used up"
    finally:
        reader.close()
    assert b.lookup(oid) is None and b.open(oid) is None


def test_sweepers_on_several_hosts_at_once_remove_what_expired_and_nothing_else(seaweed, s3_env, s3_storage_url):
    config = file_relay.RelayConfig(server_id=SERVER_ID, storage=s3_storage_url, s3_endpoint=seaweed.endpoint)
    stores = [file_relay.S3Store(config) for _ in range(3)]
    expiring = [blob(1000, seed=seed) for seed in range(6)]
    for data, oid in expiring:
        assert stores[0].put_stream(oid, [data], len(data), file_relay.Limits(ttl=0.5))
    kept, kept_oid = blob(1000, seed=99)
    assert stores[0].put_stream(kept_oid, [kept], len(kept), file_relay.Limits(ttl=3600))
    latest = max(stores[0].lookup(oid).expires_at for _, oid in expiring)
    now = latest + 0.1
    together = threading.Barrier(len(stores))

    def sweep(store) -> dict:
        together.wait(10)
        return store.sweep(now)

    with concurrent.futures.ThreadPoolExecutor(len(stores)) as pool:
        swept = list(pool.map(sweep, stores))
    assert sum(result["objects"] for result in swept) >= len(expiring)
    assert keys_under(seaweed, s3_storage_url) == [kept_oid]
    assert stores[2].lookup(kept_oid).size == len(kept)


def _paced_put(relay: RelayProcess, oid: str, data: bytes, headers: dict) -> tuple[threading.Thread, list]:
    """A PUT of *data* paced over 8 s, on a thread of its own (started): the thread, and
    the list its answer goes into."""
    body = Paced(data, seconds=8, pieces=40)
    answers = []
    sending = threading.Thread(
        target=lambda: answers.append(requests.put(url(relay, oid), data=body, headers=headers, timeout=60))
    )
    sending.start()
    return sending, answers


def test_a_follower_counted_on_an_upload_that_another_one_beat_is_cut_off(s3_relays):
    """Two uploads of one object with Max-Downloads: 1, each with a counter of its own. A
    follower counts on the slow one's; the fast one stores the object, with its own
    budget. The follower must be cut off: served whole, it would be a download the stored
    object's budget never counted."""
    a, b, c = s3_relays(3)
    data, oid = blob(20 << 20, seed=12)
    headers = {"Max-Downloads": "1"}
    slow, _ = _paced_put(a, oid, data, headers)
    try:
        assert seen_in_progress(b, oid).status_code == 200
        follower = Follower(url(b, oid))
        wait_until(lambda: len(follower.body) > 0, timeout=30, message="the follower to read")
        assert requests.put(url(c, oid), data=data, headers=headers, timeout=60).status_code == 201
        follower.join(60)
    finally:
        slow.join(60)
    assert follower.status == 200 and follower.cut and len(follower.body) < len(data), (
        follower.cut,
        len(follower.body),
    )
    got = requests.get(url(a, oid), timeout=60)  # the stored object's one download
    assert got.status_code == 200 and got.content == data
    wait_until(lambda: requests.get(url(c, oid), timeout=60).status_code == 404, message="404")


def test_a_follower_that_finds_the_upload_ended_meanwhile_still_counts(seaweed, s3_env, s3_storage_url):
    """follow() lists an upload's segments, then reads the budget off one of them: if the
    upload ends in between (its object stored, made of those segments), the reader it
    gives must still count against the object's budget, not serve it uncounted."""
    config = file_relay.RelayConfig(server_id=SERVER_ID, storage=s3_storage_url, s3_endpoint=seaweed.endpoint)
    store = file_relay.S3Store(config)
    data, oid = blob(20 << 20, seed=13)
    rest = threading.Event()

    def body():
        yield data[: 9 << 20]  # more than a segment
        rest.wait(30)
        yield data[9 << 20 :]

    stored = []
    upload = threading.Thread(
        target=lambda: stored.append(store.put_stream(oid, body(), len(data), file_relay.Limits(max_downloads=1)))
    )
    upload.start()
    wait_until(lambda: store._segments(oid), timeout=30, message="a first segment")
    read_metadata = store._segment_metadata

    def once_the_upload_ended(key):
        rest.set()
        upload.join(60)
        return read_metadata(key)

    store._segment_metadata = once_the_upload_ended
    try:
        reader = store.follow(oid)
    finally:
        rest.set()
        upload.join(60)
    assert stored == [True] and store.lookup(oid).max_downloads == 1
    assert reader is not None and reader.max_downloads == 1 and reader.token == store._head(oid)[1]
    reader.close()


def test_a_sweep_while_a_follower_counts_keeps_its_count(s3_relays, seaweed, s3_env, s3_storage_url):
    """A follower counts on the counter of the upload it follows before the object exists:
    a sweep then (on any host) must keep that counter, or the budget would be spent twice."""
    a, b = s3_relays(2)
    data, oid = blob(20 << 20, seed=11)
    sending, answers = _paced_put(a, oid, data, {"Max-Downloads": "1"})
    try:
        assert seen_in_progress(b, oid).status_code == 200
        follower = Follower(url(b, oid))
        wait_until(lambda: keys_under(seaweed, s3_storage_url, "downloads/"), message="the follower's count")
        config = file_relay.RelayConfig(server_id=SERVER_ID, storage=s3_storage_url, s3_endpoint=seaweed.endpoint)
        file_relay.S3Store(config).sweep()
        assert keys_under(seaweed, s3_storage_url, "downloads/"), "the sweep removed the follower's count"
        follower.join(60)
    finally:
        sending.join(60)
    assert answers[0].status_code == 201, answers[0].text
    assert follower.status == 200 and not follower.cut and hashlib.sha256(follower.body).hexdigest() == oid
    assert requests.get(url(a, oid), timeout=60).status_code in (404, 409)  # 409: the follower's end is being counted
    wait_until(lambda: requests.get(url(a, oid), timeout=60).status_code == 404, message="404")


def test_a_host_killed_while_it_composes_the_object_leaves_the_chunks_for_another(s3_relays, seaweed, s3_storage_url):
    """Killed after the last chunk was stored, while it writes the object from the
    segments (mid-verification): no object, every chunk kept, and the last chunk sent
    again to another host completes the upload."""
    a, b = s3_relays(2)
    data, oid = blob(40 << 20, seed=6)
    piece = 20 << 20
    assert chunk(a, oid, data, 0, piece - 1).status_code == 202
    _, prefix = file_relay.parse_storage_url(s3_storage_url)
    composing = f"{prefix}objects/{oid}"

    def send_last() -> None:
        with contextlib.suppress(requests.RequestException):  # its relay is killed
            chunk(a, oid, data, piece, 2 * piece - 1)

    sending = threading.Thread(target=send_last)
    sending.start()
    wait_until(
        lambda: composing in multipart_uploads(seaweed, s3_storage_url), timeout=60, message="the object being composed"
    )
    a.kill()
    sending.join(60)
    assert keys_under(seaweed, s3_storage_url) == []
    assert len(keys_under(seaweed, s3_storage_url, "segments/")) == 2
    assert requests.head(url(b, oid), timeout=60).headers["Upload-Offset"] == str(len(data))
    assert chunk(b, oid, data, piece, 2 * piece - 1).status_code == 201
    assert requests.get(url(b, oid), timeout=60).content == data


def test_the_built_in_client_sends_to_one_host_and_gets_from_another(s3_relays, tmp_path, relay_env):
    """send (the name-less resumable form: the file read once, sent in chunks) to one
    host; get downloads from another, verified."""
    a, b = s3_relays(2)
    data, oid = blob(20 << 20, seed=7)
    source, received = tmp_path / "big.bin", tmp_path / "received.bin"
    source.write_bytes(data)
    env = {**relay_env, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    client = [sys.executable, str(SCRIPT)]
    sent = subprocess.run([*client, "send", url(a), str(source)], env=env, capture_output=True, text=True, timeout=120)
    assert sent.returncode == 0, sent.stderr
    assert oid in sent.stdout and "stored and verified" in sent.stderr
    got = subprocess.run(
        [*client, "get", url(b, oid), "-o", str(received)], env=env, capture_output=True, text=True, timeout=120
    )
    assert got.returncode == 0, got.stderr
    assert received.read_bytes() == data


def test_a_finished_name_less_upload_whose_object_is_gone_names_nothing(s3_relays):
    a, b = s3_relays(2)
    data, oid = blob(1000, seed=13)
    headers = {"Upload-Length": str(len(data)), "Max-Downloads": "1"}
    upload = requests.post(f"{url(a)}/new/once", headers=headers, timeout=60).headers["Location"].rsplit("/", 1)[-1]
    chunk_headers = {"Content-Range": f"bytes 0-{len(data) - 1}/{len(data)}"}
    assert requests.put(f"{url(a)}/uploads/{upload}", data=data, headers=chunk_headers, timeout=60).status_code == 201
    assert requests.head(f"{url(b)}/uploads/{upload}", timeout=60).headers["Location"].endswith(f"/{oid}?name=once")
    assert requests.get(url(b, oid), timeout=60).content == data  # its one download: the object is gone
    assert requests.head(f"{url(a)}/uploads/{upload}", timeout=60).status_code == 404
    again = requests.put(f"{url(b)}/uploads/{upload}", data=data, headers=chunk_headers, timeout=60)
    assert again.status_code == 404 and oid in again.text


def test_name_less_uploads_are_checked_against_the_sender_s_digest_and_the_stored_object(s3_relays):
    a, b = s3_relays(2)
    data, oid = blob(3000, seed=15)
    wrong = {"Content-Digest": file_relay.sha256_field(hashlib.sha256(b"other").digest())}
    refused = requests.put(f"{url(a)}/new/x", data=data, headers=wrong, timeout=60)
    assert refused.status_code == 400 and "digest" in refused.text
    assert requests.get(url(b, oid), timeout=60).status_code == 404
    started = requests.post(f"{url(a)}/new/x", headers={"Upload-Length": str(len(data))}, timeout=60)
    upload = f"/uploads/{started.headers['Location'].rsplit('/', 1)[-1]}"
    whole = {"Content-Range": f"bytes 0-{len(data) - 1}/{len(data)}"}
    assert requests.put(url(a) + upload, data=data, headers=whole, timeout=60).status_code == 201
    assert requests.put(url(b) + upload, data=data, headers=whole, timeout=60).status_code == 200  # a retry
    other = bytes(reversed(data))
    assert requests.put(url(b) + upload, data=other, headers=whole, timeout=60).status_code == 409


def test_a_file_sent_through_the_page_on_one_host_downloads_from_another(s3_relays, browser, tmp_path):
    """The page (headless Chromium) sends a file to host A in digested chunks to the
    name-less resumable form; host B serves it under its name."""
    from test_page import random_file, wait_for_event

    a, b = s3_relays(2)
    source = tmp_path / "notes.bin"
    oid = random_file(source, 20 << 20, seed=14)
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(url(a))
        wait_until(lambda: "free" in page.inner_text("#status"), 10, message="the status line")
        page.set_input_files("#pick", str(source))
        stored = wait_for_event(page, "stored", 120)[0]
        assert stored["sha256"] == oid and stored["url"] == url(a, oid) + "?name=notes.bin"
    finally:
        context.close()
    got = requests.get(url(b, oid) + "?name=notes.bin", timeout=60)
    assert got.status_code == 200 and hashlib.sha256(got.content).hexdigest() == oid
    assert got.headers["Content-Disposition"] == 'attachment; filename="notes.bin"'


def _chunked_sender(relay: RelayProcess, oid: str, data: bytes) -> socket.socket:
    """A PUT of *oid* without a Content-Length whose body so far is *data*, left open."""
    host, port = relay.address
    sender = socket.create_connection((host, port), timeout=60)
    sender.sendall(f"PUT /{SERVER_ID}/{oid} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
    for start in range(0, len(data), 1 << 20):
        piece = data[start : start + (1 << 20)]
        sender.sendall(b"%x\r\n" % len(piece) + piece + b"\r\n")
    return sender


def _offset_reaches(relay: RelayProcess, oid: str, offset: int) -> None:
    def reached():
        head = requests.head(url(relay, oid), timeout=60)
        return head.status_code == 200 and int(head.headers.get("Upload-Offset", 0)) >= offset

    wait_until(reached, timeout=60, interval=0.2, message=f"the upload's segments to reach {offset} bytes")


def test_a_follower_that_read_past_the_end_of_the_object_stored_meanwhile_is_cut_off(s3_relays):
    """A whole upload of unknown length sends wrong bytes under a name, 32 MiB and more, and
    stays open; a follower on another host reads them; then the real, smaller object is
    stored. The follower has read past the object's end: it is cut off, never ended as if
    what it had were the object."""
    a, b = s3_relays(2)
    real, oid = blob(1000, seed=31)
    wrong, _ = blob((32 << 20) + 1, seed=32)
    sender = _chunked_sender(a, oid, wrong)
    try:
        _offset_reaches(b, oid, 32 << 20)
        follower = Follower(url(b, oid))
        wait_until(lambda: len(follower.received) >= (32 << 20) - 1, timeout=60, message="the follower to read it")
        assert requests.put(url(b, oid), data=real, timeout=60).status_code == 201
        follower.join(60)
        assert follower.status == 200 and follower.cut, (len(follower.received), follower.cut)
    finally:
        sender.close()
    assert requests.get(url(a, oid), timeout=60).content == real


def test_a_follower_of_an_upload_without_a_budget_is_cut_off_when_one_with_a_budget_is_stored(s3_relays):
    """A follower counts on no budget while the upload it follows has none; if another
    upload of the same content stores the object with Max-Downloads meanwhile, the
    follower is cut off rather than served a whole copy that budget did not count."""
    a, b, c = s3_relays(3)
    data, oid = blob(20 << 20, seed=33)
    sender = _chunked_sender(a, oid, data[: 17 << 20])
    try:
        _offset_reaches(b, oid, 16 << 20)
        follower = Follower(url(b, oid))
        wait_until(lambda: follower.received, timeout=60, message="the follower to begin")
        answer = requests.put(url(c, oid), data=data, headers={"Max-Downloads": "1"}, timeout=60)
        assert answer.status_code == 201, answer.text
        follower.join(60)
        assert follower.cut and follower.body != data, (len(follower.body), follower.cut)
    finally:
        sender.close()
    assert requests.get(url(a, oid), timeout=60).content == data  # the one download the budget allows
    assert requests.get(url(b, oid), timeout=60).status_code == 404


def test_a_reader_waiting_on_the_host_that_stores_a_small_object_gets_it_at_once(s3_relays):
    """A small object is not there to follow before it is stored (one PutObject once it
    verified): a reader waiting on that host is woken when it is stored, not at its next
    look, half a second later."""
    (relay,) = s3_relays(1)
    for round in range(4):
        data, oid = blob(1000, seed=40 + round)
        reader = socket.create_connection(relay.address, timeout=30)
        reader.sendall(f"GET /{SERVER_ID}/{oid}?wait=30 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        wait_until(lambda: requests.get(url(relay), timeout=30).json()["waiting_readers"] == 1, message="it waits")
        time.sleep(1.5 + round / 10)  # the scenario: a reader whose looks are half a second apart
        assert requests.put(url(relay, oid), data=data, timeout=60).status_code == 201
        stored = time.monotonic()
        first = reader.recv(1)
        assert first == b"H" and time.monotonic() - stored < 0.15, f"round {round}: {time.monotonic() - stored:.3f} s"
        reader.close()
