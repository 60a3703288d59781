"""Bad input, generated: hypothesis sends every route random methods, paths, IDs, headers,
query strings and bodies through WebTest, over one app and files directory per test.

After every example: never a 5xx, never a traceback in the response, every refusal one
line of text, a wrong server ID always the same 403 and no change on disk, what a 2xx
download sends is the object's bytes, and the storage invariant holds (every object
hashes to its name, no temporary files, no orphaned limits).
"""

import contextlib
import hashlib
import io
import os
import re
import tempfile
import urllib.parse
from pathlib import Path

import pytest
import webtest
from conftest import SERVER_ID, blob
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from invariants import orphaned_limits, partials, verify_objects

import file_relay

# Objects present at the start: empty, tiny, small, larger than Bottle's MEMFILE_MAX.
SEEDED = {oid: data for data, oid in (blob(size, seed=size) for size in (0, 1, 1000, 150_000))}
PARTIAL_DATA, PARTIAL_OID = blob(300_000, seed=7)  # a chunked upload with its first chunk received

pytestmark = pytest.mark.filterwarnings("ignore:Unknown REQUEST_METHOD")

# Per test and configuration: the whole file runs in well under a minute. A longer hunt:
# FUZZ_EXAMPLES=20000 pytest tests/test_fuzz.py
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "300"))

CONFIGS = {
    "defaults": {},
    "limited": {"max_file_size": 400_000, "ttl": 3600.0, "max_disk": 2 << 20},
}


class Relay:
    """One app over one files directory, for all the examples of a test."""

    def __init__(self, files, settings: dict, seed: bool = True):
        self.files = files
        self.config = file_relay.RelayConfig(
            server_id=SERVER_ID,
            files_directory=files,
            get_wait_timeout=0,
            max_get_wait=0.02,
            idle_timeout=0.05,  # a reader of the stalled partial upload is cut off at once
            **settings,
        )
        self.contents = dict(SEEDED)
        self.contents[PARTIAL_OID] = PARTIAL_DATA
        self.examples = 0
        self.build()
        if not seed:
            return
        for oid, data in SEEDED.items():
            self.linted.put(f"/{SERVER_ID}/{oid}", data, status=201)
        chunk = {"Content-Range": f"bytes 0-99999/{len(PARTIAL_DATA)}"}
        self.linted.put(f"/{SERVER_ID}/{PARTIAL_OID}", PARTIAL_DATA[:100_000], headers=chunk, status=202)

    def build(self) -> None:
        """A fresh app (and counters) over the same directory: after a drain was asked for."""
        self.state = file_relay.SharedState()
        wsgi = file_relay.make_app(self.config, self.state)
        self.linted = webtest.TestApp(wsgi)  # checks the app's side of WSGI too
        self.raw = webtest.TestApp(wsgi, lint=False)  # for environs lint refuses to build

    def request(self, method: str, target: str, headers: dict, body: bytes, content_length):
        """Send what a server would hand the app for this request: PATH_INFO decoded from
        the target, QUERY_STRING as sent, CONTENT_LENGTH as given (None: absent)."""
        path, _, query = target.partition("?")
        request = webtest.TestRequest.blank("/")
        environ = request.environ
        environ["REQUEST_METHOD"] = method
        environ["PATH_INFO"] = urllib.parse.unquote(path, encoding="latin-1")
        environ["QUERY_STRING"] = query
        environ["wsgi.input"] = io.BytesIO(body)
        environ.pop("CONTENT_LENGTH", None)
        if content_length is not None:
            environ["CONTENT_LENGTH"] = content_length
        for name, value in headers.items():
            environ["HTTP_" + name.upper().replace("-", "_")] = value
        lintable = environ["PATH_INFO"].startswith("/") and (content_length or "0").strip().isdecimal()
        app = self.linted if lintable else self.raw
        self.examples += 1
        try:
            return app.do_request(request, expect_errors=True)
        except file_relay._CutOff:
            # A download following an upload that stalled: the server would drop the
            # connection mid-body. Only a GET of an upload in progress may end so.
            oid = file_relay.parse_object_id(environ["PATH_INFO"].rsplit("/", 1)[-1])
            assert method.upper() == "GET" and oid and (self.files / ".relay" / "partial" / oid).exists()
            return None

    def check(self, response, method: str, target: str) -> None:
        """What must hold of every answer, and of the files directory after it."""
        if response is None:  # cut off
            self.check_files()
            return
        status, body = response.status_int, response.body
        method = method.upper()  # as Bottle takes it
        # No 5xx but the one the README documents for this: 507, the disk (or the quota)
        # cannot hold the upload. (A drain's 503 never shows: the app is rebuilt at once.)
        assert status < 500 or status == 507, (status, body)
        if status == 507:
            assert method == "PUT" and re.search(rb"free space|disk space|quota", body), body
        assert b"Traceback" not in body
        if status >= 300 and body:
            assert body.endswith(b"\n") and body.count(b"\n") == 1, body  # one line of text
        if method == "HEAD":
            assert body == b""
        segments = urllib.parse.unquote(target.partition("?")[0], encoding="latin-1").split("/", 2)
        if segments[1:2] != [SERVER_ID]:
            assert (status, body) == (403, b"" if method == "HEAD" else b"forbidden\n")
            assert set(response.headers) == {"Content-Type", "Content-Length"}
        if method == "GET" and status in (200, 206) and len(segments) == 3:
            oid = file_relay.parse_object_id(segments[2])
            content = self.contents.get(oid) if oid else None
            assert content is not None, f"sent {len(body)} bytes of an unknown object"
            if status == 200:
                assert body == content
            else:
                first, last, total = map(int, response.headers["Content-Range"][6:].replace("/", "-").split("-"))
                assert total == len(content) and body == content[first : last + 1]
        self.check_files()

    def check_files(self) -> None:
        stored = verify_objects(self.files)
        for oid in stored:
            assert oid in self.contents  # nothing the fuzzer could not have uploaded
        left = partials(self.files)
        assert not (left["stream"] or left["staging"] or left["trash"] or left["other"]), left
        assert orphaned_limits(self.files) == []
        if self.state.draining:  # DELETE /<sid>: start again rather than refuse every upload
            self.build()


@pytest.fixture(params=list(CONFIGS))
def relay(request, tmp_path):
    return Relay(tmp_path / "files", CONFIGS[request.param])


fuzz_settings = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)

# -- strategies ---------------------------------------------------------------------------

KNOWN_OIDS = [*SEEDED, PARTIAL_OID]
latin1 = st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f")
field_text = st.text(latin1, max_size=40)  # what a server passes on: no CR, LF or NUL
huge = st.integers(min_value=0, max_value=2**70)
small = st.integers(min_value=-2, max_value=300_001)
number = st.one_of(small, huge, st.integers(min_value=-(2**70), max_value=-1))

methods = st.one_of(
    st.sampled_from(["GET", "HEAD", "PUT", "DELETE"]),
    st.sampled_from(["GET", "HEAD", "PUT", "DELETE", "POST", "OPTIONS", "PATCH"]),
    st.sampled_from(["get", "TRACE", "CONNECT", "PROPFIND", "X" * 100]),
)
server_ids = st.one_of(
    st.just(SERVER_ID),
    st.just(SERVER_ID),
    st.sampled_from(
        [
            "",
            SERVER_ID[:-1],
            SERVER_ID + "x",
            SERVER_ID.upper(),
            "x" + SERVER_ID,
            "".join(f"%{ord(c):02x}" for c in SERVER_ID),  # the right ID, percent-encoded
            SERVER_ID[:4] + "%00" + SERVER_ID[4:],
            "..",
            ".",
        ]
    ),
    field_text.map(lambda text: urllib.parse.quote(text, safe="", encoding="latin-1")),
)
known_oids = st.sampled_from(KNOWN_OIDS)
object_ids = st.one_of(  # one_of picks a branch uniformly: known objects come up half the time
    known_oids,
    known_oids,
    known_oids,
    known_oids,
    known_oids.map(str.upper),
    st.text("0123456789abcdef", min_size=64, max_size=64),
    st.text("0123456789abcdefABCDEF", min_size=63, max_size=65),
    st.text("0123456789abcdefg", min_size=64, max_size=64),
    st.sampled_from(["", ".", "..", "%2e%2e", "%2F" + KNOWN_OIDS[0], KNOWN_OIDS[0] + "%00", KNOWN_OIDS[0] + "/"]),
    field_text.map(lambda text: urllib.parse.quote(text, safe="/", encoding="latin-1")),
)
queries = st.one_of(
    st.just(""),
    st.builds(
        lambda value: f"wait={value}",
        st.one_of(
            st.sampled_from(["0", "0.01", "-1", "nan", "inf", "-inf", "1e309", "", "x", "0x10"]),
            st.floats(allow_nan=True, allow_infinity=True).map(str),
        ),
    ),
    st.sampled_from(["format=prometheus", "format=json", "format=", "wait=0&wait=1", "&&=", "%zz"]),
    field_text.map(lambda text: urllib.parse.quote(text, safe="=&", encoding="latin-1")),
)


@st.composite
def targets(draw, right_id: bool = False):
    sid, oid = SERVER_ID if right_id else draw(server_ids), draw(object_ids)
    shapes = ["object"] if right_id else ["object"] * 4 + ["relay", "relay/", "extra", "double", "root", "text"]
    shape = draw(st.sampled_from(shapes))
    path = {
        "object": f"/{sid}/{oid}",
        "relay": f"/{sid}",
        "relay/": f"/{sid}/",
        "extra": f"/{sid}/{oid}/{draw(field_text)}",
        "double": f"//{sid}/{oid}",
        "root": "/",
        "text": "/" + draw(field_text),
    }[shape]
    query = draw(queries)
    return path + (f"?{query}" if query else ""), oid


def content_range(draw, length: int | None):
    if length and draw(st.booleans()):
        first = draw(st.integers(0, length - 1))
        last = draw(st.integers(first, length - 1))
        return f"bytes {first}-{last}/{length}"
    return draw(
        st.one_of(
            st.builds(lambda a, b, c: f"bytes {a}-{b}/{c}", number, number, number),
            st.builds(lambda a, b: f"bytes {a}-{b}/*", number, number),
            st.builds(lambda c: f"bytes */{c}", number),
            field_text,
        )
    )


ranges = st.one_of(
    st.builds(lambda a, b: f"bytes={a}-{b}", number, number),
    st.builds(lambda a: f"bytes={a}-", number),
    st.builds(lambda b: f"bytes=-{b}", number),
    st.builds(lambda a, b, c, d: f"bytes={a}-{b},{c}-{d}", small, small, small, small),
    st.sampled_from(["bytes=", "bytes=-", "items=0-1", "bytes=0-0", "bytes=-0", " bytes=1-2 "]),
    field_text,
)
days = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.floats(min_value=0, max_value=1e12).map(str),
    number.map(str),
    st.sampled_from(["1", "0.5", "0", "-1", "nan", "inf", "1e308", "1e7", "36500", "", " 2 ", "²", "1_0"]),
    field_text,
)
counts = st.one_of(
    number.map(str), st.sampled_from(["1", "0", "-1", "", " 3 ", "²", "١", "+1", "1.5", "0x1"]), field_text
)


@st.composite
def requests_(draw, right_id: bool = False):
    """(method, target, headers, body, content_length) of one request."""
    method = draw(methods)
    target, oid = draw(targets(right_id))
    content = dict(SEEDED, **{PARTIAL_OID: PARTIAL_DATA}).get(file_relay.parse_object_id(oid) or "")
    body_kind = draw(st.sampled_from(["empty", "random", "right", "right", "right", "prefix", "big"]))
    body = {
        "empty": b"",
        "random": draw(st.binary(max_size=2000)),
        "right": content if content is not None else draw(st.binary(max_size=200)),
        "prefix": (content or b"")[: draw(st.integers(0, len(content or b"")))],
        "big": draw(st.binary(min_size=1, max_size=64)) * 3000,
    }[body_kind]
    headers = {}
    if draw(st.booleans()):
        headers["Content-Range"] = content_range(draw, len(content) if content is not None else None)
        if content is not None and draw(st.booleans()) and headers["Content-Range"].startswith("bytes "):
            spec = headers["Content-Range"][6:]
            first, _, last = spec.partition("/")[0].partition("-")
            if first.isdigit() and last.isdigit() and int(first) <= int(last) < len(content):
                body = content[int(first) : int(last) + 1]  # the right bytes for the range
    optional = {
        "Range": ranges,
        "If-None-Match": st.one_of(st.sampled_from(["*", f'"{oid}"', f'W/"{oid}"', '"x", *', ""]), field_text),
        "If-Range": st.one_of(st.sampled_from([f'"{oid}"', "Sat, 01 Jan 2000 00:00:00 GMT", ""]), field_text),
        "Max-Days": days,
        "Max-Downloads": counts,
        "Content-Digest": st.one_of(
            st.just(file_relay.sha256_field(hashlib.sha256(body).digest())),
            st.just(file_relay.sha256_field(hashlib.sha256(b"other").digest())),
            st.sampled_from(["sha-256=:x:", "sha-256=:", "md5=:AAAA:", "sha-256=:" + "A" * 43 + "=:", "sha-256"]),
            field_text,
        ),
        "Transfer-Encoding": st.sampled_from(["chunked", "gzip", "chunked, gzip", "identity", "CHUNKED", "x"]),
        "Accept": st.sampled_from(["application/openmetrics-text", "text/plain;version=0.0.4", "*/*"]),
        "X-Forwarded-For": field_text,
    }
    for name in draw(st.sets(st.sampled_from(sorted(optional)), max_size=4)):
        headers[name] = draw(optional[name])
    content_length = draw(
        st.one_of(
            st.just(str(len(body))),
            st.just(str(len(body))),
            st.just(str(len(body))),
            st.just(str(len(body))),
            st.just(None),
            number.map(str),
            st.sampled_from(["", " 12", "1e3", "-0", "²", "0x10", "12abc", str(len(body)) + " "]),
        )
    )
    return method, target, headers, body, content_length


def send(relay: Relay, request) -> None:
    method, target, headers, body, content_length = request
    relay.check(relay.request(method, target, headers, body, content_length), method, target)


# -- the properties -----------------------------------------------------------------------


@fuzz_settings
@given(request=requests_())
def test_any_request_to_any_route(relay, request):
    send(relay, request)


@fuzz_settings
@given(request=requests_(right_id=True))
def test_requests_to_objects_with_the_right_server_id(relay, request):
    send(relay, request)


@fuzz_settings
@given(steps=st.lists(requests_(), min_size=2, max_size=6))
def test_sequences_of_requests(relay, steps):
    """A few requests in a row: an upload, then downloads and deletes of what it left."""
    for request in steps:
        send(relay, request)


@st.composite
def uploads(draw):
    """New content (so a new object) and the requests that upload it: one plain PUT, or
    chunks that cover it, in any order, some repeated; each with random extra headers."""
    data = draw(st.binary(max_size=3000))
    if draw(st.booleans()) or len(data) < 2:
        pieces = [(None, data)]
    else:
        cuts = sorted(draw(st.sets(st.integers(1, len(data) - 1), max_size=5)) | {0, len(data)})
        pieces = [(f"bytes {a}-{b - 1}/{len(data)}", data[a:b]) for a, b in zip(cuts, cuts[1:], strict=False)]
        pieces = draw(st.permutations(pieces))
        pieces += draw(st.lists(st.sampled_from(pieces), max_size=2))  # retried chunks
    optional = {
        "Max-Days": days,
        "Max-Downloads": counts,
        "If-None-Match": st.sampled_from(["*", '"x"']),
        "Content-Digest": st.sampled_from(["right", "wrong", "sha-256=:x:"]),
        "Transfer-Encoding": st.just("chunked"),
    }
    steps = []
    for content_range, body in pieces:
        headers = {} if content_range is None else {"Content-Range": content_range}
        for name in draw(st.sets(st.sampled_from(sorted(optional)), max_size=3)):
            headers[name] = draw(optional[name])
        if headers.get("Content-Digest") == "right":
            headers["Content-Digest"] = file_relay.sha256_field(hashlib.sha256(body).digest())
        elif headers.get("Content-Digest") == "wrong":
            headers["Content-Digest"] = file_relay.sha256_field(hashlib.sha256(body + b"x").digest())
        chunked = headers.get("Transfer-Encoding") == "chunked"
        steps.append((headers, body, None if chunked else str(len(body))))
    return data, steps


def short_lived(steps) -> bool:
    """Whether a Max-Days asks for less than a minute: such an object may expire (and be
    removed on sight) before its upload is even answered."""
    for headers, _, _ in steps:
        with contextlib.suppress(ValueError):
            if 0 < float(headers.get("Max-Days", "")) * 86400 < 60:
                return True
    return False


@pytest.mark.parametrize("config", list(CONFIGS))
@fuzz_settings
@given(upload=uploads())
def test_uploads_of_new_content_with_any_headers(tmp_path, config, upload):
    """Every answer as above; once an answer said stored (201, 200), a download gives the
    content (or 404 if a download limit of the upload was used up: never other bytes).
    Each example has a relay of its own, so that a failure shrinks to its own cause."""
    relay = Relay(Path(tempfile.mkdtemp(dir=tmp_path)) / "files", CONFIGS[config], seed=False)
    data, steps = upload
    oid = hashlib.sha256(data).hexdigest()
    relay.contents[oid] = data
    target = f"/{SERVER_ID}/{oid}"
    stored = False
    for headers, body, content_length in steps:
        response = relay.request("PUT", target, headers, body, content_length)
        relay.check(response, "PUT", target)
        stored = stored or response.status_int in (200, 201)
        if response.status_int in (200, 201) and not short_lived(steps):
            assert oid in verify_objects(relay.files)
    response = relay.request("GET", target, {}, b"", None)
    relay.check(response, "GET", target)
    if response is None:  # cut off following a partial upload: nothing stored, or expired already
        assert not stored or short_lived(steps)
    elif stored:
        assert response.status_int in (200, 404) and response.body in (data, b"no such object\n")
    relay.request("DELETE", target, {}, b"", None)


@pytest.mark.parametrize(("settings", "headers"), [({}, {"Max-Days": "1e7"}), ({"ttl": 1e12}, {})])
def test_an_expiry_after_the_year_9999_is_not_a_500(make_app, settings, headers):
    app = make_app(**settings)
    data, oid = blob(1000, seed=99)
    response = app.put(f"/{SERVER_ID}/{oid}", data, headers=headers, expect_errors=True)
    assert response.status_int in (201, 400), response.status
    for method in ("GET", "HEAD"):
        assert app.request(f"/{SERVER_ID}/{oid}", method=method, expect_errors=True).status_int in (200, 404)
