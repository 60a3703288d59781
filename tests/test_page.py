"""The page at the relay's URL, in headless Chromium (Debian's, driven by playwright) and in
headless Firefox ESR (Debian's, driven over WebDriver BiDi)."""

import contextlib
import hashlib
import itertools
import json
import os
import re
import shutil
import subprocess
import threading
import time
import urllib.parse

import pytest
import requests
from conftest import ROOT, SERVER_ID, blob, wait_until

SCREENSHOT = ROOT / "tests" / "page.png"  # the README shows it


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def random_file(path, size: int, seed: int):
    """A file of *size* pseudo-random bytes, written in pieces; its SHA-256."""
    digest = hashlib.sha256()
    with open(path, "wb") as file:
        for piece in range(0, size, 8 << 20):
            data, _ = blob(min(8 << 20, size - piece), seed=seed * 1000 + piece // (8 << 20))
            digest.update(data)
            file.write(data)
    return digest.hexdigest()


def events(page, kind: str) -> list:
    return page.evaluate("kind => (window.relayEvents || []).filter(e => e.type === kind)", kind)


def wait_for_event(page, kind: str, timeout: float, count: int = 1) -> list:
    def seen():
        failed = events(page, "failed")
        assert not failed, failed
        found = events(page, kind)
        return found if len(found) >= count else None

    return wait_until(seen, timeout, message=f"the page to report {count} {kind} event(s)")


def hold_the_second_chunk(page) -> list:
    """Hold the page's request for the file's second 8 MiB chunk; the list gets its route,
    to continue_() when the test is ready."""
    held = []

    def hold(route):
        if route.request.headers.get("content-range", "").startswith("bytes 8388608-"):
            held.append(route)
        else:
            route.continue_()

    page.route("**/uploads/*", hold)
    return held


def while_routing(page, predicate, timeout: float, what: str):
    """wait_until *predicate* holds, while the page runs: playwright calls route handlers
    only while the test is inside one of its calls, so each look makes one."""

    def look():
        failed = events(page, "failed")
        assert not failed, failed
        return predicate()

    return wait_until(look, timeout, message=what)


def test_browsers_get_the_page_and_every_other_client_the_json(app):
    page = app.get(f"/{SERVER_ID}", headers={"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"})
    assert page.content_type == "text/html"
    policy = page.headers["Content-Security-Policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy
    assert page.headers["Referrer-Policy"] == "no-referrer"
    assert SERVER_ID not in page.text  # the page finds it in its own URL, and writes it nowhere
    assert "http" not in page.text.replace("http://www.w3.org", "")  # nothing from other hosts
    for accept in (None, "*/*", "application/json"):
        status = app.get(f"/{SERVER_ID}", headers={"Accept": accept} if accept else {})
        assert status.content_type == "application/json"
        assert "stored_objects" in status.json
    app.get("/wrong-id", headers={"Accept": "text/html"}, status=403)


def test_a_300_mb_file_sent_through_the_page_is_stored_and_downloads_under_its_name(live, files, browser, tmp_path):
    relay = live()
    source = tmp_path / "holiday photos.tar"
    oid = random_file(source, 300_000_000, seed=1)
    context = browser.new_context(accept_downloads=True)
    try:
        page = context.new_page()
        page.goto(relay.url())
        wait_until(lambda: "free" in page.inner_text("#status"), 10, message="the status line")
        page.set_input_files("#pick", str(source))
        stored = wait_for_event(page, "stored", 180)[0]
        assert stored["sha256"] == oid
        assert stored["url"] == relay.url(oid) + "?name=" + urllib.parse.quote("holiday photos.tar", safe="")
        assert file_sha256(files / oid) == oid and (files / oid).stat().st_size == 300_000_000
        progress = [event["sent"] for event in events(page, "progress")]
        assert len(progress) > 10 and progress[-1] == 300_000_000
        chunks = events(page, "chunk")
        assert sum(e["last"] - e["first"] + 1 for e in chunks) == 300_000_000  # each byte sent once
        text = page.inner_text("#files")
        assert f"SHA-256 {oid}" in text
        assert f"curl -fo 'holiday photos.tar' '{stored['url']}'" in text
        assert f"python3 file_relay.py get '{stored['url']}' -o 'holiday photos.tar'" in text
        page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
        if os.environ.get("RELAY_SCREENSHOT"):
            shutil.copy(tmp_path / "page.png", SCREENSHOT)
        with page.expect_download(timeout=60_000) as download_info:
            page.get_by_role("link", name="Download holiday photos.tar").click()
        download = download_info.value
        assert download.suggested_filename == "holiday photos.tar"
        saved = tmp_path / "saved"
        download.save_as(saved)
        assert file_sha256(saved) == oid
    finally:
        context.close()


def test_after_a_relay_restart_and_a_reload_only_the_missing_chunks_are_sent(live, files, browser, tmp_path):
    relay = live()
    port = relay.address[1]
    source = tmp_path / "big.bin"
    size = 120_000_000
    oid = random_file(source, size, seed=2)
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(relay.url())
        throttle = context.new_cdp_session(page)
        throttle.send("Network.enable")
        conditions = {"offline": False, "latency": 0, "downloadThroughput": -1, "uploadThroughput": 20_000_000}
        throttle.send("Network.emulateNetworkConditions", conditions)
        page.set_input_files("#pick", str(source))
        wait_for_event(page, "chunk", 60, count=3)
        relay.kill()
        page.goto("about:blank")  # the old page and its retries are gone
        relay = live(bind=f"127.0.0.1:{port}")
        page.goto(relay.url())
        [record] = [json.loads(value) for value in page.evaluate("Object.values(localStorage)")]
        token = record["token"]
        head = requests.head(relay.url() + f"/uploads/{token}", timeout=10)
        acknowledged = [tuple(map(int, r.split("-"))) for r in head.headers["Upload-Ranges"].split(",")]
        # The page remembers a chunk before sending it: those the relay acknowledged count.
        spans = [tuple(map(int, span.split("-"))) for span in record["digests"]]
        recorded = [(f, e) for f, e in spans if any(a <= f and e <= b for a, b in acknowledged)]
        assert 0 < sum(last - first + 1 for first, last in acknowledged) < size
        page.set_input_files("#pick", str(source))
        assert wait_for_event(page, "stored", 120)[0]["sha256"] == oid
        resumed = events(page, "resumed")
        assert [tuple(r) for r in resumed[0]["ranges"]] == acknowledged
        # Only bytes the relay had not acknowledged, or whose answer never reached the page.
        for chunk in events(page, "chunk"):
            assert not any(first <= chunk["first"] and chunk["last"] <= last for first, last in recorded), chunk
        assert sum(last - first + 1 for first, last in recorded) > 0
        assert not events(page, "changed")
        assert file_sha256(files / oid) == oid
    finally:
        context.close()


def throttled_page(context, url, bytes_per_second: int):
    page = context.new_page()
    page.goto(url)
    throttle = context.new_cdp_session(page)
    throttle.send("Network.enable")
    conditions = {"offline": False, "latency": 0, "downloadThroughput": -1, "uploadThroughput": bytes_per_second}
    throttle.send("Network.emulateNetworkConditions", conditions)
    return page


def test_another_file_with_the_same_name_size_and_time_is_not_spliced_into_an_upload(live, files, browser, tmp_path):
    relay = live()
    size = 64 << 20
    first, second = tmp_path / "a" / "photo.raw", tmp_path / "b" / "photo.raw"
    first.parent.mkdir()
    second.parent.mkdir()
    random_file(first, size, seed=4)
    oid = random_file(second, size, seed=5)
    stamp = os.stat(first).st_mtime_ns
    os.utime(second, ns=(stamp, stamp))
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(relay.url())
        sent = []

        def one_chunk_only(route):
            if sent:
                route.abort()
            else:
                sent.append(route.request.headers.get("content-range"))
                route.continue_()

        page.route("**/uploads/*", one_chunk_only)
        page.set_input_files("#pick", str(first))
        wait_for_event(page, "chunk", 60)
        page.goto("about:blank")  # the first upload is left with one chunk
        page.unroute("**/uploads/*")
        page.goto(relay.url())
        [old] = [json.loads(value)["token"] for value in page.evaluate("Object.values(localStorage)")]
        page.set_input_files("#pick", str(second))
        assert wait_for_event(page, "stored", 120)[0]["sha256"] == oid
        assert events(page, "changed") and not events(page, "resumed")
        assert file_sha256(files / oid) == oid
        # The first file's upload was cancelled, not left to expire.
        assert requests.head(relay.url() + f"/uploads/{old}", timeout=10).status_code == 404
    finally:
        context.close()


def test_a_relay_out_of_space_fails_the_file_at_once(live, browser, tmp_path):
    relay = live("--max-disk", "2M")
    source = tmp_path / "big.bin"
    random_file(source, 3_000_000, seed=6)
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(relay.url())
        page.set_input_files("#pick", str(source))
        failed = wait_until(lambda: events(page, "failed"), 30, message="the page to give up")
        assert "space" in failed[0]["reason"] or "disk" in failed[0]["reason"], failed
        assert "retrying" not in page.inner_text("#files")
    finally:
        context.close()


def test_a_file_whose_name_the_relay_refuses_is_sent_without_it(live, files, browser, tmp_path):
    relay = live()
    source = tmp_path / "back\\slash.txt"
    data, oid = blob(100_000, seed=7)
    source.write_bytes(data)
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(relay.url())
        page.set_input_files("#pick", str(source))
        stored = wait_for_event(page, "stored", 30)[0]
        assert stored["url"] == relay.url(oid)
        assert (files / oid).read_bytes() == data
        assert page.get_by_role("link", name="Download back\\slash.txt").get_attribute("download") == "back\\slash.txt"
    finally:
        context.close()


def test_a_download_link_opened_while_its_upload_arrives_saves_the_file_under_its_name(live, browser, tmp_path):
    relay = live()
    data, oid = blob(6 << 20, seed=3)
    source = tmp_path / "source"
    source.write_bytes(data)
    sender = subprocess.Popen(
        ["curl", "-fsS", "--limit-rate", "2M", "-T", str(source), relay.url(oid)], stdout=subprocess.DEVNULL
    )
    context = browser.new_context(accept_downloads=True)
    try:
        wait_until(
            lambda: requests.head(relay.url(oid), timeout=5).headers.get("Upload-Incomplete"), 10, message="upload"
        )
        page = context.new_page()
        page.goto(relay.url())
        url = relay.url(oid) + "?name=report%20v2.pdf"
        with page.expect_download(timeout=60_000) as download_info:
            page.evaluate(
                "url => { const a = document.createElement('a'); a.href = url; document.body.append(a); a.click(); }",
                url,
            )
        download = download_info.value
        saved = tmp_path / "saved"
        download.save_as(saved)
        assert sender.poll() is None or sender.returncode == 0  # it was still arriving when the download began
        assert download.suggested_filename == "report v2.pdf"
        assert saved.read_bytes() == data
    finally:
        context.close()
        sender.wait(60)
    assert sender.returncode == 0


def test_the_page_is_usable_from_the_keyboard(live, files, browser, tmp_path):
    relay = live()
    data, oid = blob(3 << 20, seed=5)
    source = tmp_path / "typed.bin"
    source.write_bytes(data)
    context = browser.new_context(permissions=["clipboard-read", "clipboard-write"])
    try:
        page = context.new_page()
        # playwright asks the browser to hand it file choosers when a page first gets a
        # listener, without waiting for the answer: listening from the start means the
        # chooser the key press opens cannot come before that.
        page.on("filechooser", lambda chooser: None)
        page.goto(relay.url())
        wait_until(lambda: "free" in page.inner_text("#status"), 30, message="the page to be ready")
        page.keyboard.press("Tab")
        assert page.evaluate("document.activeElement.id") == "pick"  # the first stop: choosing files
        with page.expect_file_chooser(timeout=60_000) as chooser:
            page.keyboard.press("Space")
        chooser.value.set_files(str(source))
        stored = wait_for_event(page, "stored", 60)[0]
        assert stored["sha256"] == oid and (files / oid).read_bytes() == data

        def tab_to(text: str) -> None:
            for _ in range(20):
                page.keyboard.press("Tab")
                if page.evaluate("document.activeElement.textContent") == text:
                    return
            raise AssertionError(f"Tab never reached {text!r}")

        tab_to("Download typed.bin")
        assert page.evaluate("document.activeElement.href") == stored["url"]
        tab_to("Copy link")
        page.evaluate(
            """() => { const button = document.activeElement; window.labels = [];
            new MutationObserver(() => labels.push(button.textContent)).observe(button, { childList: true }); }"""
        )
        page.keyboard.press("Enter")
        wait_until(lambda: "Copied" in page.evaluate("window.labels"), 10, message="the button to say Copied")
        assert page.evaluate("navigator.clipboard.readText()") == stored["url"]
    finally:
        context.close()


# -- Firefox, over WebDriver BiDi ------------------------------------------------------


def launch_firefox(executable: str, profile, downloads) -> tuple[subprocess.Popen, str]:
    """Debian's Firefox ESR, headless, with its WebDriver BiDi server (which it speaks
    itself: playwright's Firefox wants commands this release lacks): the process and the
    server's address. Downloads go to *downloads* without a question."""
    prefs = {
        "browser.download.dir": str(downloads),
        "browser.download.folderList": 2,
        "browser.download.useDownloadDir": True,
        "browser.download.always_ask_before_handling_new_types": False,
        "browser.download.alwaysOpenPanel": False,
    }
    lines = [f"user_pref({json.dumps(name)}, {json.dumps(value)});\n" for name, value in prefs.items()]
    (profile / "user.js").write_text("".join(lines))
    command = [executable, "--headless", "--no-remote", "--profile", str(profile), "--remote-debugging-port", "0"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (line := process.stderr.readline()):
        if found := re.search(r"WebDriver BiDi listening on (ws://\S+)", line):
            threading.Thread(target=process.stderr.read, daemon=True).start()  # keep its pipe drained
            return process, found[1]
    process.kill()
    process.wait()
    raise AssertionError("Firefox did not start its WebDriver BiDi server")


class Firefox:
    """A page in Firefox, driven over a WebDriver BiDi session."""

    def __init__(self, socket):
        self.socket = socket
        self.ids = itertools.count(1)
        self.call("session.new", capabilities={})
        self.context = self.call("browsingContext.getTree")["contexts"][0]["context"]

    def call(self, method: str, **params):
        number = next(self.ids)
        self.socket.send(json.dumps({"id": number, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv(timeout=60))
            if message.get("id") == number:
                assert message.get("type") != "error", message
                return message["result"]

    def goto(self, url: str) -> None:
        self.call("browsingContext.navigate", context=self.context, url=url, wait="complete")

    def evaluate(self, expression: str):
        """The value of a JavaScript expression, passed through JSON."""
        result = self.call(
            "script.evaluate",
            expression=f"JSON.stringify({expression}) ?? 'null'",
            target={"context": self.context},
            awaitPromise=True,
        )
        assert result["type"] == "success", result
        return json.loads(result["result"]["value"])

    def set_input_files(self, selector: str, path) -> None:
        node = self.call(
            "script.evaluate",
            expression=f"document.querySelector({json.dumps(selector)})",
            target={"context": self.context},
            awaitPromise=False,
        )["result"]
        self.call("input.setFiles", context=self.context, element={"sharedId": node["sharedId"]}, files=[str(path)])


@pytest.fixture
def firefox(tmp_path):
    executable = shutil.which("firefox-esr") or shutil.which("firefox")
    if executable is None:
        pytest.skip("Firefox is not installed (.ci/run installs Debian's firefox-esr)")
    client = pytest.importorskip(
        "websockets.sync.client", reason="websockets is not installed (tests/requirements.txt)"
    )
    (tmp_path / "profile").mkdir()
    (tmp_path / "downloads").mkdir()
    process, address = launch_firefox(executable, tmp_path / "profile", tmp_path / "downloads")
    try:
        with client.connect(f"{address}/session", max_size=None) as socket:
            browser = Firefox(socket)
            yield browser
            with contextlib.suppress(Exception):
                browser.call("browser.close")
        process.wait(20)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_in_firefox_a_file_sent_through_the_page_is_stored_and_downloads_under_its_name(live, files, firefox, tmp_path):
    relay = live()
    source = tmp_path / "notes 2026.bin"
    oid = random_file(source, 40_000_000, seed=4)
    firefox.goto(relay.url())
    wait_until(lambda: "free" in firefox.evaluate("document.querySelector('#status').innerText"), 10, message="status")
    firefox.set_input_files("#pick", source)

    def outcome():
        found = firefox.evaluate("(window.relayEvents || []).filter(e => e.type === 'stored' || e.type === 'failed')")
        assert not [event for event in found if event["type"] == "failed"], found
        return found

    stored = wait_until(outcome, 120, message="the page to store the file")[0]
    assert stored["sha256"] == oid and file_sha256(files / oid) == oid
    chunks = firefox.evaluate("window.relayEvents.filter(e => e.type === 'chunk')")
    assert len(chunks) > 1 and sum(e["last"] - e["first"] + 1 for e in chunks) == 40_000_000  # each byte once
    link = "[...document.querySelectorAll('a')].find(a => a.textContent === 'Download notes 2026.bin')"
    firefox.evaluate(f"{link}.click()")
    downloads = tmp_path / "downloads"
    saved = downloads / "notes 2026.bin"
    wait_until(lambda: saved.exists() and not list(downloads.glob("*.part")), 60, message="the download")
    assert os.listdir(downloads) == ["notes 2026.bin"] and file_sha256(saved) == oid


def test_a_finished_upload_whose_answer_was_lost_is_not_taken_for_another_file(live, files, browser, tmp_path):
    """The relay stored X but its 201 never reached the page; after a reload another file Y
    of the same name, size and time is picked: the page must not show X as Y's."""
    relay = live()
    first, second = tmp_path / "x" / "report.bin", tmp_path / "y" / "report.bin"
    for path, byte in ((first, b"X"), (second, b"Y")):
        path.parent.mkdir()
        path.write_bytes(byte * 1_000_000)
        os.utime(path, (1_700_000_000, 1_700_000_000))
    answered = []

    def lose_the_answer(route):
        if route.request.method == "PUT":
            answered.append(route.fetch().status)  # the relay stores it...
            route.abort()  # ...and its answer is lost
        else:
            route.continue_()

    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(relay.url())
        page.route("**/uploads/*", lose_the_answer)
        page.set_input_files("#pick", str(first))
        while_routing(page, lambda: answered, 30, "the relay to store X")
        assert answered == [201] and (files / sha256_of(first)).exists()
        page.unroute("**/uploads/*")
        page.reload()
        page.set_input_files("#pick", str(second))
        stored = wait_for_event(page, "stored", 30)[0]
        assert stored["sha256"] == sha256_of(second)
        assert (files / sha256_of(second)).read_bytes() == second.read_bytes()
    finally:
        context.close()


def sha256_of(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_file_changed_while_it_is_sent_is_not_stored(live, files, browser, tmp_path):
    relay = live()
    source = tmp_path / "log.bin"
    before = random_file(source, 24 << 20, seed=8)

    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(relay.url())
        held = hold_the_second_chunk(page)
        page.set_input_files("#pick", str(source))
        wait_for_event(page, "chunk", 60)
        while_routing(page, lambda: held, 10, "the second chunk held")
        stamp = os.stat(source).st_mtime_ns
        with open(source, "r+b") as file:  # the part already sent, rewritten in place; size and time kept
            file.write(blob(1 << 20, seed=9)[0])
        os.utime(source, ns=(stamp, stamp))
        held[0].continue_()
        failed = wait_until(lambda: events(page, "failed"), 60, message="the page to fail the file")
        assert "changed while it was sent" in failed[0]["reason"]
        assert not events(page, "stored")
        assert not any(p.is_file() for p in files.iterdir()), list(files.iterdir())
        assert before != file_sha256(source)
        assert requests.get(relay.url(), timeout=5).json()["uploads_in_progress"] == 0  # cancelled
    finally:
        context.close()


def test_a_chunk_damaged_on_the_way_is_sent_again(live, files, browser, tmp_path):
    relay = live()
    source = tmp_path / "data.bin"
    oid = random_file(source, 20 << 20, seed=10)
    damaged = []

    def damage_once(route):
        body = route.request.post_data_buffer
        if route.request.method == "PUT" and not damaged and body:
            flipped = bytearray(body)
            flipped[100] ^= 1
            answer = route.fetch(post_data=bytes(flipped))
            damaged.append((answer.status, answer.text()))
            route.fulfill(response=answer)
        else:
            route.continue_()

    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(relay.url())
        page.route("**/uploads/*", damage_once)
        page.set_input_files("#pick", str(source))
        assert wait_for_event(page, "stored", 60)[0]["sha256"] == oid
        assert damaged[0][0] == 400 and "Content-Digest" in damaged[0][1]
        assert file_sha256(files / oid) == oid
    finally:
        context.close()


def test_a_chunk_refused_for_good_stops_the_file_and_its_reason_stays(live, browser, tmp_path):
    relay = live()
    source = tmp_path / "data.bin"
    random_file(source, 64 << 20, seed=11)

    def refuse_one(route):
        if route.request.method == "PUT" and route.request.headers.get("content-range", "").startswith(
            "bytes 8388608-"
        ):
            route.fulfill(status=403, body="refused by a proxy\n")
        else:
            route.continue_()

    context = browser.new_context()
    try:
        page = throttled_page(context, relay.url(), 8_000_000)
        page.route("**/uploads/*", refuse_one)
        page.set_input_files("#pick", str(source))
        failed = wait_until(lambda: events(page, "failed"), 60, message="the page to fail the file")
        assert failed[0]["reason"] == "refused by a proxy"
        sent = len(events(page, "chunk"))
        page.wait_for_timeout(3000)  # the chunks in flight end; no new ones start
        assert len(events(page, "chunk")) <= sent + 3
        assert "Failed: refused by a proxy" in page.inner_text("#files")
    finally:
        context.close()


def test_a_full_local_storage_costs_the_resume_not_the_upload(live, files, browser, tmp_path):
    relay = live()
    source = tmp_path / "data.bin"
    oid = random_file(source, 20 << 20, seed=12)
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(relay.url())
        page.evaluate(
            """() => { let i = 0; const block = "x".repeat(1 << 16);
            try { for (;;) localStorage.setItem(`junk${i++}`, block); } catch (e) {}
            for (let n = 1 << 15; n >= 1; n >>= 1)
              try { localStorage.setItem(`fill${n}`, "x".repeat(n)); } catch (e) {} }"""
        )
        page.set_input_files("#pick", str(source))
        assert wait_for_event(page, "stored", 60)[0]["sha256"] == oid
        assert f"SHA-256 {oid}" in page.inner_text("#files")
    finally:
        context.close()


def test_a_dropped_folder_is_refused_plainly_and_starts_nothing(live, files, browser, tmp_path):
    relay = live()
    folder = tmp_path / "Holiday photos"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"jpeg" * 1000)
    single = tmp_path / "notes.txt"
    data = b"notes\n" * 1000
    single.write_bytes(data)
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(relay.url())
        box = page.locator("#drop").bounding_box()
        x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
        session = context.new_cdp_session(page)
        dragged = {"items": [], "files": [str(folder), str(single)], "dragOperationsMask": 1}
        for kind in ("dragEnter", "dragOver", "drop"):
            session.send("Input.dispatchDragEvent", {"type": kind, "x": x, "y": y, "data": dragged})
        stored = wait_until(lambda: events(page, "stored"), 30, message="the file beside the folder")
        assert stored[0]["sha256"] == hashlib.sha256(data).hexdigest()
        [failed] = events(page, "failed")
        assert failed["file"] == "Holiday photos" and "a folder cannot be sent" in failed["reason"]
        assert requests.get(relay.url(), timeout=5).json()["uploads_in_progress"] == 0
        assert [p.name for p in files.iterdir() if p.is_file()] == [stored[0]["sha256"]]
    finally:
        context.close()


def test_the_overall_figures_count_the_current_files_only(live, browser, tmp_path):
    relay = live()
    small, large = tmp_path / "small.bin", tmp_path / "large.bin"
    random_file(small, 1_000_000, seed=13)
    random_file(large, 5_000_000, seed=14)
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(relay.url())
        page.set_input_files("#pick", str(small))
        wait_for_event(page, "stored", 30)
        page.set_input_files("#pick", str(large))
        wait_for_event(page, "stored", 30, count=2)
        assert page.inner_text("#overall-figures").startswith("5.0 MB of 5.0 MB (100%)")
    finally:
        context.close()


def test_a_file_touched_while_it_is_sent_fails_plainly_and_its_upload_is_cancelled(live, files, browser, tmp_path):
    relay = live()
    source = tmp_path / "draft.bin"
    random_file(source, 24 << 20, seed=15)

    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(relay.url())
        held = hold_the_second_chunk(page)
        page.set_input_files("#pick", str(source))
        wait_for_event(page, "chunk", 60)
        while_routing(page, lambda: held, 10, "the second chunk held")
        os.utime(source)  # edited: Chromium will not read it again
        held[0].continue_()
        failed = wait_until(lambda: events(page, "failed"), 60, message="the page to fail the file")
        assert "changed or was removed while it was sent" in failed[0]["reason"]
        wait_until(
            lambda: requests.get(relay.url(), timeout=5).json()["uploads_in_progress"] == 0, 30, message="the cancel"
        )
        page.wait_for_timeout(1000)  # a chunk in flight would end meanwhile
        assert "Failed: the file changed or was removed" in page.inner_text("#files")
        assert not any(p.is_file() for p in files.iterdir())
    finally:
        context.close()


def test_on_plain_http_a_file_changed_while_it_is_sent_is_not_stored(live, files, browser, tmp_path):
    relay = live()
    plain = browser.browser_type.launch(
        executable_path=shutil.which("chromium"), args=["--host-resolver-rules=MAP relay.test 127.0.0.1"]
    )
    source = tmp_path / "log.bin"
    random_file(source, 24 << 20, seed=16)

    try:
        page = plain.new_page()
        page.goto(f"http://relay.test:{relay.address[1]}/{SERVER_ID}")
        assert page.evaluate("window.isSecureContext") is False
        held = hold_the_second_chunk(page)
        page.set_input_files("#pick", str(source))
        wait_for_event(page, "chunk", 60)
        while_routing(page, lambda: held, 10, "the second chunk held")
        stamp = os.stat(source).st_mtime_ns
        with open(source, "r+b") as file:
            file.write(blob(1 << 20, seed=17)[0])
        os.utime(source, ns=(stamp, stamp))
        held[0].continue_()
        failed = wait_until(lambda: events(page, "failed"), 60, message="the page to fail the file")
        assert "changed while it was sent" in failed[0]["reason"]
        assert not any(p.is_file() for p in files.iterdir())
    finally:
        plain.close()


def test_a_lost_answer_to_the_completing_chunk_costs_no_bytes_after_a_reload(live, files, browser, tmp_path):
    relay = live()
    source = tmp_path / "done.bin"
    oid = random_file(source, 24 << 20, seed=18)
    answered = []

    def lose_the_last_answer(route):
        if route.request.headers.get("content-range", "").startswith("bytes 16777216-"):
            answered.append(route.fetch().status)
            route.abort()
        else:
            route.continue_()

    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(relay.url())
        page.route("**/uploads/*", lose_the_last_answer)
        page.set_input_files("#pick", str(source))
        while_routing(page, lambda: answered, 60, "the completing chunk")
        assert answered[0] == 201 and file_sha256(files / oid) == oid
        page.unroute("**/uploads/*")
        page.reload()
        page.set_input_files("#pick", str(source))
        assert wait_for_event(page, "stored", 30)[0]["sha256"] == oid
        assert not events(page, "chunk")  # known from its recorded digests: nothing sent again
    finally:
        context.close()


def test_two_tabs_with_two_files_of_one_name_size_and_time_each_store_their_own(live, files, browser, tmp_path):
    relay = live()
    first, second = tmp_path / "a" / "IMG_0001.JPG", tmp_path / "b" / "IMG_0001.JPG"
    first.parent.mkdir()
    second.parent.mkdir()
    one, two = random_file(first, 20 << 20, seed=19), random_file(second, 20 << 20, seed=20)
    for path in (first, second):
        os.utime(path, (1_700_000_000, 1_700_000_000))
    held, released = {}, set()

    def hold(route):
        tab = route.request.frame.page
        if route.request.method == "PUT" and tab not in released:
            held.setdefault(tab, []).append(route)
        else:
            route.continue_()

    context = browser.new_context()
    try:
        context.route("**/uploads/*", hold)
        tab_a, tab_b = context.new_page(), context.new_page()
        for tab in (tab_a, tab_b):
            tab.goto(relay.url())
        tab_a.set_input_files("#pick", str(first))
        while_routing(tab_a, lambda: held.get(tab_a), 30, "tab A's chunks")
        tab_b.set_input_files("#pick", str(second))
        while_routing(tab_b, lambda: held.get(tab_b), 30, "tab B's chunks")
        for tab in (tab_a, tab_b):
            released.add(tab)
            for route in held.pop(tab):
                route.continue_()
            if tab is tab_a:
                assert wait_for_event(tab_a, "stored", 60)[0]["sha256"] == one
        assert wait_for_event(tab_b, "stored", 60)[0]["sha256"] == two
        assert file_sha256(files / one) == one and file_sha256(files / two) == two
    finally:
        context.close()
