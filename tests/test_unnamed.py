"""Uploads the relay names: PUT /new/[NAME] whole, or POST /new/[NAME] then chunks."""

import base64
import concurrent.futures
import hashlib
import subprocess
import urllib.parse

import pytest
import requests
from conftest import SERVER_ID, blob, object_url, sha256, wait_until

import file_relay

NEW = f"/{SERVER_ID}/new/"


def content_digest(data: bytes) -> str:
    return f"sha-256=:{base64.b64encode(hashlib.sha256(data).digest()).decode()}:"


def path_of(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return parts.path + (f"?{parts.query}" if parts.query else "")


def start(app, size: int, name: str = "", status=201):
    return app.post(NEW + name, headers={"Upload-Length": str(size)}, status=status, expect_errors=status != 201)


def send_chunk(app, upload: str, first: int, data: bytes, total: int, status="*", digest=True):
    headers = {"Content-Range": f"bytes {first}-{first + len(data) - 1}/{total}"}
    if digest:
        headers["Content-Digest"] = content_digest(data)
    return app.put(upload, data, headers=headers, status=status)


def test_a_plain_upload_is_stored_under_its_hash_and_answered_with_its_url(app, files):
    data, oid = blob(300_000, seed=1)
    response = app.put(NEW + "report.tar", data, status=201)
    url = f"http://localhost:80/{SERVER_ID}/{oid}?name=report.tar"
    assert response.headers["Location"] == url
    assert response.text.splitlines() == [url, f"stored {oid} (300000 bytes)"]
    assert response.headers["ETag"] == f'"{oid}"'
    assert (files / oid).read_bytes() == data
    download = app.get(path_of(url))
    assert download.body == data
    assert "report.tar" in download.headers["Content-Disposition"]


def test_the_same_content_again_is_200_with_the_same_url_and_without_a_name_none_is_given(app, files):
    data, oid = blob(1000, seed=2)
    app.put(f"/{SERVER_ID}/new", data, status=201)  # no slash, no name
    again = app.put(NEW, data, status=200)
    assert again.headers["Location"] == f"http://localhost:80/{SERVER_ID}/{oid}"
    assert again.text.splitlines()[1] == f"already stored {oid} (1000 bytes)"
    assert sorted(p.name for p in files.iterdir() if not p.name.startswith(".")) == [oid]


def test_an_empty_upload_is_the_empty_object(app, files):
    response = app.put(NEW, b"", status=201)
    assert response.text.splitlines()[1].startswith(f"stored {sha256(b'')}")


def test_a_mistyped_hash_on_the_verified_form_is_still_refused(app, files):
    data, oid = blob(1000, seed=3)
    response = app.put(object_url(oid[:-1] + "x"), data, status=400, expect_errors=True)
    assert "64 hex digits" in response.text
    response = app.put(object_url(oid[:-1]), data, status=400, expect_errors=True)
    assert not any(p.name == oid for p in files.iterdir())


@pytest.mark.parametrize(
    ("quoted", "reason"),
    [
        ("a%2Fb", "name must not hold a path"),
        ("a%5Cb", "name must not hold a path"),
        ("..", "not empty, '.' or '..'"),
        ("x" * 300, "at most 255 bytes"),
        ("bad%01name", "control characters"),
        ("%FFab", "name must be UTF-8"),
        ("x%0Ay", "control characters"),
    ],
)
@pytest.mark.parametrize("method", ["PUT", "POST"])
def test_a_bad_file_name_is_400_with_its_reason_and_stores_nothing(app, files, quoted, reason, method):
    headers = {"Upload-Length": "4"} if method == "POST" else {}
    response = app.request(NEW + quoted, method=method, body=b"data", headers=headers, expect_errors=True)
    assert response.status_int == 400 and reason in response.text, response.text
    assert len(response.text.strip().splitlines()) == 1
    assert not any(p.is_file() for p in files.iterdir())


def test_a_name_less_upload_keeps_its_limits(app):
    data, oid = blob(5000, seed=4)
    response = app.put(NEW, data, headers={"Max-Downloads": "1"}, status=201)
    assert response.headers["X-Remaining-Downloads"] == "1"
    app.get(object_url(oid), status=200)
    app.get(object_url(oid), status=404)


def test_a_content_range_on_the_plain_form_is_refused(app):
    response = app.put(NEW, b"abc", headers={"Content-Range": "bytes 0-2/3"}, status=400, expect_errors=True)
    assert "POST" in response.text


def test_chunks_in_any_order_with_digests_are_stored_under_the_hash(app, files):
    data, oid = blob(2_500_000, seed=5)
    created = start(app, len(data), "disk image.iso")
    upload = path_of(created.headers["Location"])
    assert created.text.strip() == created.headers["Location"]
    pieces = [(first, data[first : first + 1_000_000]) for first in range(0, len(data), 1_000_000)]
    for first, piece in reversed(pieces[1:]):
        assert send_chunk(app, upload, first, piece, len(data)).status_int == 202
    status = app.head(upload, status=200)
    assert status.headers["Upload-Ranges"] == "1000000-2499999"
    assert status.headers["Upload-Offset"] == "0"
    done = send_chunk(app, upload, 0, pieces[0][1], len(data), status=201)
    url = f"http://localhost:80/{SERVER_ID}/{oid}?name=disk%20image.iso"
    assert done.headers["Location"] == url
    assert done.text.splitlines()[0] == url
    assert (files / oid).read_bytes() == data
    # A sender that missed the answer asks again, and retries the last chunk: same name.
    status = app.get(upload, status=200)
    assert status.headers["Location"] == url and status.text.splitlines()[0] == url
    retried = send_chunk(app, upload, 0, pieces[0][1], len(data), status=200)
    assert retried.headers["Location"] == url


def test_a_chunk_with_a_wrong_content_digest_is_refused_and_not_recorded(app, files):
    data, oid = blob(200_000, seed=6)
    upload = path_of(start(app, len(data)).headers["Location"])
    damaged = bytearray(data[:100_000])
    damaged[500] ^= 1
    headers = {"Content-Range": f"bytes 0-99999/{len(data)}", "Content-Digest": content_digest(data[:100_000])}
    response = app.put(upload, bytes(damaged), headers=headers, status=400, expect_errors=True)
    assert "Content-Digest" in response.text
    assert "Upload-Ranges" not in app.head(upload).headers or app.head(upload).headers["Upload-Ranges"] == ""
    send_chunk(app, upload, 0, data[:100_000], len(data), status=202)
    send_chunk(app, upload, 100_000, data[100_000:], len(data), status=201)
    assert (files / oid).read_bytes() == data


@pytest.mark.parametrize("field", ["sha-512=:AAAA:", "md5=:AAAA:", "nonsense"])
def test_a_content_digest_that_names_no_sha_256_is_refused_not_ignored(app, files, field):
    data, _ = blob(100_000, seed=8)
    upload = path_of(start(app, len(data)).headers["Location"])
    headers = {"Content-Range": f"bytes 0-99999/{len(data)}", "Content-Digest": field}
    response = app.put(upload, data, headers=headers, status=400, expect_errors=True)
    assert "only sha-256 is checked" in response.text
    assert app.head(upload).headers.get("Upload-Ranges", "") == ""


def test_a_request_path_cannot_forge_a_line_in_the_log(live):
    relay = live()
    response = requests.put(relay.url() + "/new/x%0Aforged%20line%0D%0Aanother", data=b"data", timeout=10)
    assert response.status_code == 400
    wait_until(lambda: "x%0Aforged" in relay.log(), 10, message="the access line")
    assert not any(line.startswith(("forged", "another")) for line in relay.log().splitlines())


def test_chunks_without_digests_are_accepted_and_named_by_what_arrived(app, files):
    data, oid = blob(100_000, seed=7)
    upload = path_of(start(app, len(data)).headers["Location"])
    response = send_chunk(app, upload, 0, data, len(data), status=201, digest=False)
    assert response.text.splitlines()[1].startswith(f"stored {oid}")


def test_bad_starts_and_chunks_are_refused_clearly(app):
    assert "Upload-Length" in app.post(NEW, status=400, expect_errors=True).text
    assert "Upload-Length" in start(app, -1, status=400).text
    start(app, 1 << 62, status=413)
    upload = path_of(start(app, 10).headers["Location"])
    assert "Content-Range" in app.put(upload, b"0123456789", status=400, expect_errors=True).text
    response = send_chunk(app, upload, 0, b"0123456789", 11, status=409)
    assert "10 bytes long" in response.text
    unknown = f"/{SERVER_ID}/uploads/{'0' * 32}"
    assert send_chunk(app, unknown, 0, b"x", 1, status=404).status_int == 404
    app.head(unknown, status=404)
    app.head(f"/{SERVER_ID}/uploads/not-a-token", status=404)


def test_an_empty_resumable_upload_is_refused_for_the_plain_form(app, files):
    response = start(app, 0, status=400)
    assert "PUT it" in response.text
    assert list((files / ".relay" / "partial").iterdir()) == []


def test_a_finished_upload_whose_object_is_gone_names_nothing(app, files):
    data, oid = blob(1000, seed=9)
    started = app.post(NEW + "once", headers={"Upload-Length": str(len(data)), "Max-Downloads": "1"}, status=201)
    upload = path_of(started.headers["Location"])
    assert send_chunk(app, upload, 0, data, len(data), status=201).headers["Location"].endswith(f"/{oid}?name=once")
    assert app.head(upload, status=200).headers["Location"].endswith(f"/{oid}?name=once")
    assert app.get(object_url(oid)).body == data  # its one download: the object is gone
    app.head(upload, status=404)
    response = send_chunk(app, upload, 0, b"other bytes", 11, status=404)  # not 200 "already stored"
    assert oid in response.text and not (files / oid).exists()


def test_a_cancelled_upload_is_gone(app, files):
    data, _ = blob(1000, seed=8)
    upload = path_of(start(app, len(data)).headers["Location"])
    send_chunk(app, upload, 0, data[:500], len(data), status=202)
    app.delete(upload, status=200)
    app.head(upload, status=404)
    send_chunk(app, upload, 500, data[500:], len(data), status=404)
    app.delete(upload, status=404)
    assert list((files / ".relay" / "partial").iterdir()) == []


def test_the_server_id_guards_the_new_forms(app):
    app.put("/wrong/new/", b"x", status=403)
    app.post("/wrong/new/", headers={"Upload-Length": "1"}, status=403)
    app.head(f"/wrong/uploads/{'0' * 32}", status=403)


def test_records_of_ended_uploads_are_swept_after_the_partial_ttl(make_app, make_config, files):
    app = make_app(partial_ttl=60)
    upload = path_of(start(app, 3).headers["Location"])
    send_chunk(app, upload, 0, b"abc", 3, status=201)
    store = file_relay.Store(make_config(partial_ttl=60))
    store.sweep()
    assert app.head(upload).status_int == 200
    store.sweep(now=__import__("time").time() + 120)
    app.head(upload, status=404)


def test_chunks_in_parallel_on_several_workers(live, files):
    relay = live("--workers", "2", "--threads", "4")
    data, oid = blob(6 << 20, seed=9)
    created = subprocess.run(
        ["curl", "-sS", "-X", "POST", "-H", f"Upload-Length: {len(data)}", "-D", "-", relay.url() + "/new/x.bin"],
        capture_output=True,
        text=True,
        check=True,
    )
    location = next(
        line.split(" ", 1)[1].strip() for line in created.stdout.splitlines() if line.startswith("Location")
    )
    import requests

    def send(first):
        piece = data[first : first + (1 << 20)]
        headers = {
            "Content-Range": f"bytes {first}-{first + len(piece) - 1}/{len(data)}",
            "Content-Digest": content_digest(piece),
        }
        return requests.put(location, data=piece, headers=headers, timeout=30)

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(send, range(0, len(data), 1 << 20)))
    statuses = [a.status_code for a in answers]
    # Chunks that end together: one completes the object (201), one that waited for that
    # verdict is told it is stored (200), the others were acknowledged as they came (202).
    assert statuses.count(201) == 1 and set(statuses) <= {200, 201, 202}, statuses
    for final in (a for a in answers if a.status_code in (200, 201)):
        assert final.headers["Location"] == relay.url(oid) + "?name=x.bin"
    assert (files / oid).read_bytes() == data


def test_curl_dash_t_to_new_slash(live, files, tmp_path):
    relay = live()
    data, oid = blob(3 << 20, seed=10)
    source = tmp_path / "report.tar"
    source.write_bytes(data)
    answer = subprocess.run(
        ["curl", "-fsS", "-T", str(source), relay.url() + "/new/"], capture_output=True, text=True, check=True
    )
    url = answer.stdout.splitlines()[0]
    assert url == relay.url(oid) + "?name=report.tar"
    assert answer.stdout.splitlines()[1] == f"stored {oid} ({len(data)} bytes)"
    got = subprocess.run(["curl", "-fsS", url], capture_output=True, check=True).stdout
    assert got == data


def test_a_chunk_sent_to_a_finished_upload_must_be_part_of_what_was_stored(app, files):
    data, oid = blob(100_000, seed=11)
    upload = path_of(start(app, len(data)).headers["Location"])
    send_chunk(app, upload, 0, data, len(data), status=201)
    assert "already stored" in send_chunk(app, upload, 0, data, len(data), status=200).text
    assert send_chunk(app, upload, 1000, data[1000:2000], len(data), status=200)
    other = bytearray(data)
    other[5] ^= 1
    refused = send_chunk(app, upload, 0, bytes(other), len(data), status=409)
    assert f"differ from those stored as {oid}" in refused.text
    refused = send_chunk(app, upload, 0, data[:1000], 1000, status=409)
    assert "100000 bytes long, not 1000" in refused.text
    assert (files / oid).read_bytes() == data


@pytest.mark.parametrize("field", ["Content-Digest", "Repr-Digest"])
def test_a_whole_name_less_upload_with_a_digest_is_checked_against_it(app, files, field):
    data, oid = blob(100_000, seed=12)
    damaged = bytearray(data)
    damaged[7] ^= 1
    refused = app.put(NEW + "x.txt", bytes(damaged), headers={field: content_digest(data)}, status=400)
    assert f"does not match its digest: expected sha256 {oid}" in refused.text
    assert not any(p.is_file() for p in files.iterdir())
    stored = app.put(NEW + "x.txt", data, headers={field: content_digest(data)}, status=201)
    assert stored.headers["Location"].endswith(f"/{oid}?name=x.txt")


def test_two_sha_256_digests_in_one_field_are_refused(app, files):
    data, _ = blob(1000, seed=13)
    upload = path_of(start(app, len(data)).headers["Location"])
    wrong = content_digest(b"other")
    for field in (f"{content_digest(data)}, {wrong}", f"{wrong}, {content_digest(data)}"):
        headers = {"Content-Range": f"bytes 0-999/{len(data)}", "Content-Digest": field}
        refused = app.put(upload, data, headers=headers, status=400, expect_errors=True)
        assert "more than one sha-256 digest" in refused.text
    both = {"Content-Digest": content_digest(data), "Repr-Digest": content_digest(b"other")}
    assert "give different" in app.put(NEW, data, headers=both, status=400).text
