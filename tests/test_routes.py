"""The five routes and their status codes, through WebTest over each storage backend: a
real files directory, and an S3 bucket on a real SeaweedFS (the seaweed fixture)."""

import email.utils
import errno
import hashlib
import json
import logging
import os
import sys
import threading
import time
import urllib.parse

import pytest
from conftest import SERVER_ID, blob, object_url, sha256
from seaweed import listed_segments, stored_content

import file_relay


@pytest.fixture(params=["filesystem", "s3"])
def backend(request) -> str:
    return request.param


@pytest.fixture
def make_config(backend, files, request):
    """conftest's make_config, over the backend of the test's parameter."""
    where = {"files_directory": files}
    if backend == "s3":
        request.getfixturevalue("s3_env")
        endpoint = request.getfixturevalue("seaweed").endpoint
        where = {"storage": request.getfixturevalue("s3_storage_url"), "s3_endpoint": endpoint}

    def make(**settings) -> file_relay.RelayConfig:
        settings.setdefault("get_wait_timeout", 0)
        return file_relay.RelayConfig(server_id=SERVER_ID, **where, **settings)

    return make


class Stored:
    """What the backend holds, looked at behind the relay's back: the objects' names and
    bytes, and what is left of uploads (partial directories, multipart uploads)."""

    def __init__(self, config: file_relay.RelayConfig, seaweed=None):
        self.config = config
        if config.storage:
            self.bucket, self.prefix = file_relay.parse_storage_url(config.storage)
            self.client = seaweed.client()

    def names(self) -> list[str]:
        if not self.config.storage:
            return sorted(path.name for path in self.config.files_directory.iterdir() if len(path.name) == 64)
        listed = self.client.list_objects_v2(Bucket=self.bucket, Prefix=f"{self.prefix}objects/")
        return sorted(item["Key"].rsplit("/", 1)[-1] for item in listed.get("Contents", ()))

    def data(self, oid: str) -> bytes:
        if not self.config.storage:
            return (self.config.files_directory / oid).read_bytes()
        return stored_content(self.client, self.bucket, self.prefix, f"{self.prefix}objects/{oid}")

    def leftovers(self) -> list[str]:
        """Uploads' remains: partial files; multipart uploads and the segments no object is made of."""
        if not self.config.storage:
            return os.listdir(self.config.files_directory / ".relay" / "partial")
        listed = self.client.list_multipart_uploads(Bucket=self.bucket, Prefix=self.prefix)
        made_of = {
            segment
            for oid in self.names()
            for segment in listed_segments(self.client, self.bucket, self.prefix, f"{self.prefix}objects/{oid}") or ()
        }
        segments = self.client.list_objects_v2(Bucket=self.bucket, Prefix=f"{self.prefix}segments/")
        left = [item["Key"] for item in segments.get("Contents", ()) if item["Key"] not in made_of]
        return [upload["Key"] for upload in listed.get("Uploads", ())] + left


@pytest.fixture
def stored(make_config, backend, request) -> Stored:
    return Stored(make_config(), request.getfixturevalue("seaweed") if backend == "s3" else None)


def only_on(backend: str, wanted: str, why: str) -> None:
    if backend != wanted:
        pytest.skip(f"{wanted} only: {why}")


# -- PUT ------------------------------------------------------------------------


def test_put_stores_verified_content_under_its_hash(app, stored):
    data, oid = blob(300_000)  # larger than Bottle's MEMFILE_MAX (100 KiB)
    response = app.put(object_url(oid), data, status=201)
    assert oid in response.text
    assert response.headers["ETag"] == f'"{oid}"'
    assert stored.data(oid) == data
    assert stored.names() == [oid]


def test_put_of_a_stored_object_is_idempotent(app, stored):
    data, oid = blob(1000)
    app.put(object_url(oid), data, status=201)
    response = app.put(object_url(oid), data, status=200)
    assert "already stored" in response.text
    assert stored.data(oid) == data


def test_uppercase_names_are_the_same_object(app, stored):
    data, oid = blob(1000)
    app.put(object_url(oid.upper()), data, status=201)
    assert stored.names() == [oid]
    assert app.get(object_url(oid.upper())).body == data
    app.put(object_url(oid), data, status=200)


@pytest.mark.parametrize("size", [5000, 9 << 20])  # on S3: one PutObject, a multipart upload
def test_content_that_does_not_match_its_name_is_refused_and_not_kept(app, stored, size):
    data, oid = blob(size)
    tampered = b"X" + data[1:]
    response = app.put(object_url(oid), tampered, status=400)
    assert oid in response.text and sha256(tampered) in response.text
    assert stored.names() == []
    assert stored.leftovers() == []


@pytest.mark.parametrize("bad_id", ["abc", "g" * 64, "a" * 63, "a" * 65, "..", "%2e%2e"])
def test_malformed_object_ids_are_refused(app, bad_id):
    assert "64 hex digits" in app.put(f"/{SERVER_ID}/{bad_id}", b"x", status=400).text
    app.get(f"/{SERVER_ID}/{bad_id}", status=400)
    app.delete(f"/{SERVER_ID}/{bad_id}", status=400)


def test_an_empty_file_is_a_valid_object(app, stored):
    oid = sha256(b"")
    app.put(object_url(oid), b"", status=201)
    response = app.get(object_url(oid), status=200)
    assert response.body == b"" and response.headers["Content-Length"] == "0"
    assert stored.data(oid) == b""


def test_larger_than_max_file_size_is_413_before_reading(make_app, stored):
    app = make_app(max_file_size=1000)
    data, oid = blob(1001)
    response = app.put(object_url(oid), data, status=413)
    assert "1000 bytes" in response.text
    assert stored.names() == []
    small, small_oid = blob(1000)
    app.put(object_url(small_oid), small, status=201)


def test_not_enough_free_space_is_507_before_reading(make_app, files, backend):
    only_on(backend, "filesystem", "--min-free is refused with --storage s3://")
    app = make_app(min_free=1 << 60)  # more than any disk has
    data, oid = blob(1000)
    assert "free space" in app.put(object_url(oid), data, status=507).text
    assert Stored(file_relay.RelayConfig(server_id=SERVER_ID, files_directory=files)).names() == []


def test_an_upload_over_the_quota_is_507_before_reading(make_app, stored):
    app = make_app(max_disk=10_000)
    first, first_oid = blob(6000)
    app.put(object_url(first_oid), first, status=201)
    data, oid = blob(6000, seed=1)
    assert "quota" in app.put(object_url(oid), data, status=507).text
    assert stored.names() == [first_oid]


def test_disk_full_while_writing_is_507_and_leaves_nothing(app, files, monkeypatch, backend):
    only_on(backend, "filesystem", "a write helper that fails with ENOSPC")
    real_write_all = file_relay._write_all

    def write_until_full(fd, data, offset=None):
        if os.fstat(fd).st_size > 100_000:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write_all(fd, data, offset)

    monkeypatch.setattr(file_relay, "_write_all", write_until_full)
    data, oid = blob(3 << 20)
    assert "disk space" in app.put(object_url(oid), data, status=507).text
    assert Stored(file_relay.RelayConfig(server_id=SERVER_ID, files_directory=files)).names() == []
    assert os.listdir(files / ".relay" / "partial") == []
    monkeypatch.setattr(file_relay, "_write_all", real_write_all)
    app.put(object_url(oid), data, status=201)


def test_a_concurrent_upload_of_the_same_object_gets_409_and_the_first_is_unharmed(app, make_config, files, backend):
    only_on(backend, "filesystem", "on S3 both uploads go on, and the second to end gets 200 (tests/test_s3.py)")
    data, oid = blob(2 << 20)
    store = file_relay.Store(make_config())
    first_block_written = threading.Event()
    release = threading.Event()

    def slow_body():
        yield data[: 1 << 20]
        first_block_written.set()
        release.wait(10)
        yield data[1 << 20 :]

    result = {}
    first = threading.Thread(
        target=lambda: result.setdefault("created", store.put_stream(oid, slow_body(), len(data), file_relay.Limits()))
    )
    first.start()
    assert first_block_written.wait(10)
    response = app.put(object_url(oid), data, status=409)
    assert "in progress" in response.text
    assert response.headers["Retry-After"]
    release.set()
    first.join(10)
    assert result["created"] is True
    assert (files / oid).read_bytes() == data
    app.put(object_url(oid), data, status=200)


def test_if_none_match_star_skips_a_stored_object(app):
    data, oid = blob(1000)
    app.put(object_url(oid), data, headers={"If-None-Match": "*"}, status=201)
    app.put(object_url(oid), data, headers={"If-None-Match": "*"}, status=412)


# -- GET and HEAD ----------------------------------------------------------------


def test_get_returns_the_object_with_its_headers(app):
    data, oid = blob(200_000)
    app.put(object_url(oid), data)
    response = app.get(object_url(oid), status=200)
    assert response.body == data
    assert response.headers["Content-Length"] == str(len(data))
    assert response.headers["Content-Type"] == "application/octet-stream"
    assert response.headers["ETag"] == f'"{oid}"'
    assert response.headers["Accept-Ranges"] == "bytes"
    expected_digest = file_relay.sha256_field(hashlib.sha256(data).digest())
    assert response.headers["Repr-Digest"] == expected_digest


def test_head_returns_the_headers_only(app):
    data, oid = blob(5000)
    app.put(object_url(oid), data)
    response = app.head(object_url(oid), status=200)
    assert response.body == b""
    assert response.headers["Content-Length"] == "5000"
    assert response.headers["ETag"] == f'"{oid}"'


@pytest.mark.parametrize(
    ("range_header", "first", "last"),
    [("bytes=0-9", 0, 9), ("bytes=100-", 100, 4999), ("bytes=-10", 4990, 4999), ("bytes=4990-99999", 4990, 4999)],
)
def test_a_range_gives_206(app, range_header, first, last):
    data, oid = blob(5000)
    app.put(object_url(oid), data)
    response = app.get(object_url(oid), headers={"Range": range_header}, status=206)
    assert response.body == data[first : last + 1]
    assert response.headers["Content-Range"] == f"bytes {first}-{last}/5000"
    assert response.headers["Content-Length"] == str(last - first + 1)


def test_an_unsatisfiable_range_gives_416(app):
    data, oid = blob(5000)
    app.put(object_url(oid), data)
    response = app.get(object_url(oid), headers={"Range": "bytes=5000-"}, status=416)
    assert response.headers["Content-Range"] == "bytes */5000"


HUGE = "9" * 5000  # past the 4,300 digits Python converts to an int


@pytest.mark.parametrize(
    ("range_header", "status", "body"),
    [(f"bytes={HUGE}-", 416, None), (f"bytes=0-{HUGE}", 206, "all"), (f"bytes=-{HUGE}", 206, "all")],
)
def test_a_range_of_thousands_of_digits_is_answered_as_any_range_beyond_the_object(app, range_header, status, body):
    data, oid = blob(5000)
    app.put(object_url(oid), data)
    response = app.get(object_url(oid), headers={"Range": range_header}, status=status)
    if body == "all":
        assert response.body == data


def test_numbers_of_thousands_of_digits_in_upload_headers_get_4xx_and_change_nothing(app, stored):
    data, oid = blob(1000)
    app.put(object_url(oid), data, status=201)
    other, other_oid = blob(1000, seed=3)
    padded_one = "0" * 5000 + "1"
    for headers in ({"Content-Range": f"bytes 0-999/{HUGE}"}, {"Max-Downloads": HUGE}, {"Max-Downloads": padded_one}):
        response = app.put(object_url(other_oid), other, headers=headers, expect_errors=True)
        assert response.status_int < 500, (headers, response.status, response.text)
        response = app.put(object_url(oid), data, headers=headers, expect_errors=True)
        assert response.status_int < 500, (headers, response.status, response.text)
    response = app.post(f"/{SERVER_ID}/new/x", headers={"Upload-Length": HUGE}, expect_errors=True)
    assert 400 <= response.status_int < 500, response.text
    assert stored.data(oid) == data  # (the padded 1 is a valid Max-Downloads: the other may be stored)


def test_if_range_with_another_etag_sends_the_whole_object(app):
    data, oid = blob(5000)
    app.put(object_url(oid), data)
    headers = {"Range": "bytes=0-9", "If-Range": '"something-else"'}
    assert app.get(object_url(oid), headers=headers, status=200).body == data


def test_if_none_match_gives_304(app):
    data, oid = blob(5000)
    app.put(object_url(oid), data)
    response = app.get(object_url(oid), headers={"If-None-Match": f'"{oid}"'}, status=304)
    assert response.body == b""
    app.get(object_url(oid), headers={"If-None-Match": '"other"'}, status=200)


def test_if_modified_since_gives_304_unless_if_none_match_says_otherwise(app):
    data, oid = blob(5000)
    app.put(object_url(oid), data)
    last_modified = app.head(object_url(oid)).headers["Last-Modified"]
    for method in (app.get, app.head):
        assert method(object_url(oid), headers={"If-Modified-Since": last_modified}, status=304).body == b""
    earlier = email.utils.formatdate(email.utils.parsedate_to_datetime(last_modified).timestamp() - 1, usegmt=True)
    assert app.get(object_url(oid), headers={"If-Modified-Since": earlier}, status=200).body == data
    assert app.get(object_url(oid), headers={"If-Modified-Since": "not a date"}, status=200).body == data
    both = {"If-Modified-Since": last_modified, "If-None-Match": '"other"'}
    assert app.get(object_url(oid), headers=both, status=200).body == data  # If-None-Match decides


def test_get_and_head_of_a_missing_object_are_404(app):
    _, oid = blob(10)
    app.get(object_url(oid), status=404)
    app.head(object_url(oid), status=404)


# -- DELETE ---------------------------------------------------------------------


def test_delete_removes_the_object(app, stored):
    data, oid = blob(1000)
    app.put(object_url(oid), data)
    app.delete(object_url(oid), status=200)
    assert stored.names() == []
    app.get(object_url(oid), status=404)
    app.delete(object_url(oid), status=404)


# -- the relay itself --------------------------------------------------------------


def test_status_reports_disk_and_objects(app):
    data, oid = blob(1234)
    app.put(object_url(oid), data)
    report = app.get(f"/{SERVER_ID}", status=200).json
    utilization = report["disk utilization"]
    assert utilization["bytes_used"] > 0 and utilization["bytes_remaining"] > 0
    assert "remaining" in utilization["string"]
    assert report["version"] == file_relay.__version__
    assert report["uptime_seconds"] >= 0
    assert (report["stored_objects"], report["stored_bytes"]) == (1, 1234)
    assert report["uploads_in_progress"] == 0
    assert report["totals"]["uploads_completed"] == 1
    assert app.get(object_url(oid), headers={"Range": "bytes=0-9"}, status=206).body == data[:10]
    assert app.get(object_url(oid), status=200).body == data
    assert app.get(f"/{SERVER_ID}").json["totals"]["downloads_completed"] == 1  # whole ones only


def test_delete_of_the_relay_starts_a_drain(app):
    assert "draining" in app.delete(f"/{SERVER_ID}", status=200).text
    data, oid = blob(100)
    response = app.put(object_url(oid), data, status=503)
    assert response.headers["Retry-After"]
    assert app.get(f"/{SERVER_ID}").json["draining"] is True


def test_a_re_upload_during_a_drain_gets_200_since_nothing_needs_storing(app):
    data, oid = blob(100)
    app.put(object_url(oid), data, status=201)
    app.delete(f"/{SERVER_ID}", status=200)
    assert app.put(object_url(oid), data, status=200).text.startswith("already stored")
    chunk = {"Content-Range": f"bytes 0-49/{len(data)}"}
    assert app.put(object_url(oid), data[:50], headers=chunk, status=200).text.startswith("already stored")
    app.put(object_url(oid), data, headers={"If-None-Match": "*"}, status=412)
    other, other_oid = blob(100, seed=1)
    assert app.put(object_url(other_oid), other, status=503).headers["Retry-After"]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/wrong"),
        ("DELETE", "/wrong"),
        ("GET", "/wrong/" + "a" * 64),
        ("PUT", "/wrong/" + "a" * 64),
        ("DELETE", "/wrong/" + "a" * 64),
        ("POST", "/wrong/x/y/z"),
        ("GET", "/"),
        ("GET", f"/{SERVER_ID}x"),
        ("GET", f"/{SERVER_ID[:-1]}"),
    ],
)
def test_a_wrong_server_id_gets_the_same_403_on_every_route(app, method, path):
    response = app.request(path, method=method, body=b"x" if method == "PUT" else b"", expect_errors=True)
    assert response.status_int == 403
    assert response.text == "forbidden\n"
    assert set(response.headers) == {"Content-Type", "Content-Length"}


def test_unknown_paths_and_methods_with_the_right_id(app):
    app.get(f"/{SERVER_ID}/a/b", status=404)
    response = app.request(f"/{SERVER_ID}/{'a' * 64}", method="POST", expect_errors=True)
    assert response.status_int == 405 and "PUT" in response.headers["Allow"]


def test_access_log_has_one_redacted_line_per_request(app, caplog):
    data, oid = blob(2000)
    with caplog.at_level(logging.INFO, logger="file_relay.access"):
        app.put(object_url(oid), data)
        app.get(object_url(oid))
        app.get(f"/{SERVER_ID}/{oid}", headers={"Range": "bytes=0-9"})
        app.get(f"/not-{SERVER_ID}", status=403)
    records = [record for record in caplog.records if record.name == "file_relay.access"]
    assert [(r.method, r.status) for r in records] == [("PUT", 201), ("GET", 200), ("GET", 206), ("GET", 403)]
    assert records[0].bytes_in == 2000
    assert records[1].bytes_out == 2000 and records[2].bytes_out == 10
    handler = file_relay.configure_logging(file_relay.RelayConfig(server_id=SERVER_ID))
    for record in records:
        line = handler.format(record)
        assert SERVER_ID not in line and "/***" in line
    json_handler = file_relay.configure_logging(file_relay.RelayConfig(server_id=SERVER_ID, log_format="json"))
    entry = json.loads(json_handler.format(records[0]))
    assert entry["status"] == 201 and entry["path"] == f"/***/{oid}"


def test_the_server_id_is_redacted_from_every_log_line_tracebacks_included():
    for log_format in ("text", "json"):
        handler = file_relay.configure_logging(file_relay.RelayConfig(server_id=SERVER_ID, log_format=log_format))
        try:
            raise ValueError(f"path /{SERVER_ID}/x")
        except ValueError:
            exc_info = sys.exc_info()
        record = logging.LogRecord("gunicorn.error", logging.ERROR, __file__, 1, "bad %s", (SERVER_ID,), exc_info)
        line = handler.format(record)
        assert SERVER_ID not in line and "ValueError" in line and "bad ***" in line


def test_the_server_id_percent_encoded_is_redacted_and_other_escapes_are_kept():
    encoded = "".join(f"%{ord(c):02x}" if i % 3 else c for i, c in enumerate(SERVER_ID))
    kept = f"/x/{'a' * 64}?name=%41%42%43&bad=%zz%4"
    for log_format in ("text", "json"):
        handler = file_relay.configure_logging(file_relay.RelayConfig(server_id=SERVER_ID, log_format=log_format))
        args = (encoded, kept)
        record = logging.LogRecord("gunicorn.error", logging.WARNING, __file__, 1, "line 'GET /%s' %s", args, None)
        line = handler.format(record)
        assert "line 'GET /***' " in line and kept in line


def test_redacting_a_long_log_line_takes_time_in_proportion_to_its_length():
    """A client decides much of what is logged (a path of 4 KB, a header gunicorn quotes):
    masking the ID must not take seconds per line, all the while holding the log's lock."""
    handler = file_relay.configure_logging(file_relay.RelayConfig(server_id=SERVER_ID))
    long_words = ("a" * 20_000, "b" * 20_000 + SERVER_ID[:12])
    record = logging.LogRecord("gunicorn.error", logging.INFO, __file__, 1, "path /x/%s %s", long_words, None)
    started = time.monotonic()
    line = handler.format(record)
    assert time.monotonic() - started < 1
    assert line.endswith(f"path /x/{long_words[0]} ***")


@pytest.mark.parametrize(
    "name, disposition",
    [
        ("report.tar", 'attachment; filename="report.tar"'),
        (
            'say "hi" 100%.txt',
            "attachment; filename=\"say _hi_ 100_.txt\"; filename*=UTF-8''say%20%22hi%22%20100%25.txt",
        ),
        ("résumé.pdf", "attachment; filename=\"r_sum_.pdf\"; filename*=UTF-8''r%C3%A9sum%C3%A9.pdf"),
    ],
)
def test_a_name_in_the_url_names_the_download(app, name, disposition):
    data, oid = blob(1000)
    app.put(object_url(oid), data, status=201)
    query = "?" + urllib.parse.urlencode({"name": name})
    assert app.get(object_url(oid) + query).headers["Content-Disposition"] == disposition
    assert app.head(object_url(oid) + query).headers["Content-Disposition"] == disposition
    ranged = app.get(object_url(oid) + query, headers={"Range": "bytes=0-9"}, status=206)
    assert ranged.headers["Content-Disposition"] == disposition
    assert "Content-Disposition" not in app.get(object_url(oid)).headers


@pytest.mark.parametrize(
    "query",
    [
        "name=../etc/passwd",
        "name=a%5Cb",
        "name=a%0D%0ASet-Cookie:%20x",
        "name=a%00b",
        "name=",
        "name=..",
        "name=%E2%80%AEfdp.exe",
        "name=%FF",
        "name=" + "a" * 256,
        "name=a&name=b",
    ],
)
def test_a_bad_name_is_400_with_its_reason(app, query):
    data, oid = blob(1000)
    app.put(object_url(oid), data, status=201)
    response = app.get(object_url(oid) + "?" + query, status=400)
    assert response.text.startswith("name ") and response.text.count("\n") == 1
    assert "Content-Disposition" not in response.headers


# -- CORS: pages on other origins, only where configured ----------------------------------

PAGE_ORIGIN = "http://page.example:8000"


def test_without_cors_origins_no_page_elsewhere_may_read_or_preflight(app):
    data, oid = blob(1000)
    app.put(object_url(oid), data)
    answer = app.get(object_url(oid), headers={"Origin": PAGE_ORIGIN})
    assert not [name for name in answer.headers if name.lower().startswith("access-control-")]
    preflight = {"Origin": PAGE_ORIGIN, "Access-Control-Request-Method": "PUT"}
    assert app.options(object_url(oid), headers=preflight, status=405).headers["Allow"] == "GET, HEAD, PUT, DELETE"


def test_a_configured_origin_passes_preflight_and_reads_every_answer(make_app):
    app = make_app(cors_origins=(PAGE_ORIGIN,))
    data, oid = blob(1000)
    preflight = {
        "Origin": PAGE_ORIGIN,
        "Access-Control-Request-Method": "PUT",
        "Access-Control-Request-Headers": "content-type, content-range",
    }
    answer = app.options(object_url(oid), headers=preflight, status=204)
    assert answer.headers["Access-Control-Allow-Origin"] == PAGE_ORIGIN
    assert "PUT" in answer.headers["Access-Control-Allow-Methods"]
    allowed = {name.strip().lower() for name in answer.headers["Access-Control-Allow-Headers"].split(",")}
    assert {"content-type", "content-range", "content-digest", "range", "max-downloads"} <= allowed
    assert int(answer.headers["Access-Control-Max-Age"]) > 0

    origin = {"Origin": PAGE_ORIGIN}
    stored = app.put(object_url(oid), data, headers=origin, status=201)
    ranged = app.get(object_url(oid), headers={**origin, "Range": "bytes=10-19"}, status=206)
    refused = app.get(object_url(oid, server_id="wrong-id"), headers=origin, status=403)
    for answer in (stored, ranged, refused):
        assert answer.headers["Access-Control-Allow-Origin"] == PAGE_ORIGIN
        assert answer.headers["Vary"] == "Origin"
        exposed = {name.strip() for name in answer.headers["Access-Control-Expose-Headers"].split(",")}
        assert {"ETag", "Content-Range", "Upload-Offset", "Upload-Ranges", "Retry-After"} <= exposed
        assert {"X-Remaining-Downloads", "X-Remaining-Days"} <= exposed
    assert ranged.body == data[10:20]


def test_an_origin_not_configured_gets_no_cors_headers(make_app):
    app = make_app(cors_origins=(PAGE_ORIGIN,))
    data, oid = blob(1000)
    app.put(object_url(oid), data)
    other = {"Origin": "http://elsewhere.example"}
    answer = app.get(object_url(oid), headers=other)
    assert "Access-Control-Allow-Origin" not in answer.headers and answer.headers["Vary"] == "Origin"
    app.options(object_url(oid), headers={**other, "Access-Control-Request-Method": "GET"}, status=405)


def test_any_origin(make_app):
    app = make_app(cors_origins=("*",))
    data, oid = blob(1000)
    answer = app.put(object_url(oid), data, headers={"Origin": PAGE_ORIGIN}, status=201)
    assert answer.headers["Access-Control-Allow-Origin"] == "*" and "Vary" not in answer.headers
    preflight = {"Origin": PAGE_ORIGIN, "Access-Control-Request-Method": "DELETE"}
    assert app.options(object_url(oid), headers=preflight, status=204).headers["Access-Control-Allow-Methods"]


def test_a_preflight_is_answered_alike_whatever_the_server_id_so_a_page_reads_its_403(make_app):
    """A page's PUT is preflighted: if the preflight of a wrong server ID were refused, the
    page would see only a network error. Every path gets the same preflight answer, so it
    tells nothing about the ID, and the PUT itself gets a 403 the page can read."""
    app = make_app(cors_origins=(PAGE_ORIGIN,))
    data, oid = blob(1000)
    preflight = {"Origin": PAGE_ORIGIN, "Access-Control-Request-Method": "PUT"}
    right = app.options(object_url(oid), headers=preflight, status=204)
    wrong = app.options(object_url(oid, server_id="wrong-id"), headers=preflight, status=204)
    assert right.headers == wrong.headers
    refused = app.put(object_url(oid, server_id="wrong-id"), data, headers={"Origin": PAGE_ORIGIN}, status=403)
    assert refused.headers["Access-Control-Allow-Origin"] == PAGE_ORIGIN


def test_a_refusal_of_a_kind_the_table_does_not_name_is_answered_as_its_kind():
    """A backend's own refusal, a subclass of a named kind, gets that kind's status; a
    bare StorageError is the relay's own fault (500), never a KeyError."""
    own_busy = type("OwnBusy", (file_relay.Busy,), {})
    assert file_relay.status_of(own_busy("held", retry_after=1)) == 409
    assert file_relay.status_of(file_relay.StorageError("something")) == 500
