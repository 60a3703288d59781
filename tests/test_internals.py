"""What the relay relies on in gunicorn and Bottle beyond their documented interfaces
(the section "gunicorn and Bottle: every use of their internals" of file_relay.py).

Each test names one reliance; it fails when a new version of gunicorn or Bottle changes
it, before a live test fails in some roundabout way."""

import inspect
import io
import socket

import bottle
import pytest
from gunicorn.app.base import BaseApplication
from gunicorn.arbiter import Arbiter
from gunicorn.config import Config
from gunicorn.glogging import Logger
from gunicorn.http import body as gunicorn_body
from gunicorn.http import errors as gunicorn_errors
from gunicorn.http import message as gunicorn_message
from gunicorn.http import unreader as gunicorn_unreader
from gunicorn.http import wsgi as gunicorn_wsgi
from gunicorn.workers import gthread

import file_relay


def source(obj) -> str:
    return inspect.getsource(obj)


# -- the worker: gthread's main loop ----------------------------------------------------


@pytest.mark.parametrize(
    "mixin, base",
    [
        (file_relay._RelayWorker, gthread.ThreadWorker),
        (file_relay._RelayArbiter, Arbiter),
        (file_relay._RelayLogger, Logger),
    ],
)
def test_every_method_the_relay_overrides_is_still_there_to_override(mixin, base):
    for name, member in vars(mixin).items():
        if callable(member) and getattr(base, name, None) is not None:
            assert callable(getattr(base, name)), name
    overridden = {
        gthread.ThreadWorker: [
            "init_process",
            "init_signals",
            "handle_request",
            "enqueue_req",
            "finish_request",
            "murder_pending",
        ],
        Arbiter: ["handle_term", "handle_int", "spawn_worker", "manage_workers", "kill_workers", "reap_workers"],
        Logger: ["setup"],
    }[base]
    for name in overridden:
        assert callable(getattr(base, name, None)), f"{base.__name__}.{name} is gone"


def test_the_worker_keeps_its_connections_count_limit_and_poller_where_the_relay_looks():
    init = source(gthread.ThreadWorker.__init__)
    for attribute in ("self.nr_conns", "self.worker_connections", "self.poller"):
        assert attribute in init
    assert "self.poller.register" in source(gthread.ThreadWorker) or "poller.register" in source(gthread)


def test_a_connection_still_has_its_socket_parser_client_and_data_ready_flag():
    connection = gthread.TConn(Config(), socket.socket(), ("127.0.0.1", 1), ("127.0.0.1", 2))
    try:
        for attribute in ("sock", "parser", "client", "data_ready"):
            assert hasattr(connection, attribute), attribute
    finally:
        connection.sock.close()
    assert "def finish_request(self, conn, fs)" in source(gthread.ThreadWorker)
    assert "def enqueue_req(self, conn)" in source(gthread.ThreadWorker)


def test_gunicorn_still_sends_100_continue_itself_unless_told_not_to():
    """The worker clears Request._expected_100_continue so that the app sends it."""
    assert gunicorn_message.Request._expected_100_continue is False
    assert "req._expected_100_continue" in source(gunicorn_wsgi.create)


def test_the_unreader_still_hands_over_what_it_read_past_a_request():
    assert callable(getattr(gunicorn_unreader.Unreader, "take_buffered", None))
    assert callable(getattr(__import__("gunicorn.http", fromlist=["get_parser"]), "get_parser", None))


def test_a_head_too_long_is_still_refused_with_limit_request_headers():
    assert issubclass(gunicorn_errors.LimitRequestHeaders, Exception)


def test_tls_is_still_set_up_through_the_ssl_context_hook():
    from gunicorn import sock as gunicorn_sock

    assert "ssl_context" in Config().settings
    assert "conf.ssl_context(conf, default_ssl_context_factory)" in source(gunicorn_sock.ssl_context)
    for attribute in ("is_ssl", "suppress_ragged_eofs"):
        assert hasattr(Config(), attribute), attribute


def test_the_app_still_finds_the_client_socket_in_the_environ():
    class Request:
        body, method, query, uri, version = None, "GET", "", "/", (1, 1)

    environ = gunicorn_wsgi.default_environ(Request(), "the socket", Config())
    assert file_relay._client_socket(environ) == "the socket"


# -- the request body: read past gunicorn's buffers -------------------------------------


def test_a_content_length_body_is_still_a_body_over_a_length_reader():
    unreader = gunicorn_unreader.IterUnreader([b"hello"])
    body = gunicorn_body.Body(gunicorn_body.LengthReader(unreader, 5))
    assert file_relay._is_length_reader(body, body.reader)
    assert body.read(5) == b"hello" and body.reader.length == 0  # the count the relay keeps in step


# -- responses ------------------------------------------------------------------------


def test_the_response_can_still_be_told_to_close_its_connection():
    assert callable(getattr(gunicorn_wsgi.Response, "force_close", None))
    assert "self.must_close" in source(gunicorn_wsgi.Response.force_close)


def test_file_wrappers_still_keep_the_body_where_the_relay_looks():
    body = io.BytesIO(b"x")
    assert file_relay._wrapped_body(gunicorn_wsgi.FileWrapper(body)) is body
    assert file_relay._wrapped_body(bottle.WSGIFileWrapper(body)) is body
    assert "respiter.filelike" in source(gunicorn_wsgi.Response.sendfile)


def test_sendfile_still_tells_a_reader_where_it_stopped(tmp_path):
    """socket.sendfile() seeks the file it sent to where it stopped: an object reader
    (and so the relay's download count) learns from that that everything went out."""
    path = tmp_path / "object"
    path.write_bytes(b"0123456789")
    obj = file_relay.StoredObject("0" * 64, 10, 0.0, None, None, 0)
    fd = __import__("os").open(path, __import__("os").O_RDONLY)
    reader = file_relay.ObjectReader(fd, obj)
    reader.select(2, 7)
    left, right = socket.socketpair()
    try:
        left.sendfile(reader, 2, 6)
        assert right.recv(100) == b"234567"
        assert reader.finished and reader.sent == 6
    finally:
        reader.close()
        left.close()
        right.close()


# -- Bottle -----------------------------------------------------------------------------


def test_bottle_still_answers_unhandled_errors_through_default_error_handler():
    assert "self.default_error_handler" in source(bottle.Bottle)
    assert "traceback" in inspect.signature(bottle.HTTPError.__init__).parameters


def test_bottle_still_routes_head_to_get_routes():
    app = bottle.Bottle()
    app.get("/x", callback=lambda: "x")
    route, _ = app.router.match({"REQUEST_METHOD": "HEAD", "PATH_INFO": "/x"})
    assert route.method == "GET"


def test_gunicorn_is_still_embedded_through_base_application():
    for name in ("load_config", "load", "run"):
        assert callable(getattr(BaseApplication, name, None)), name
    for name in ("WORKERS", "LISTENERS"):
        assert hasattr(Arbiter, name), name
