"""The status page in a real browser: headless Chromium (Debian's package, driven by
Playwright) against a real server with an API key. It sees the model, a slot go busy and
the tok/s plot move while a chat streams, unloads and loads the model with its buttons,
and leaves a screenshot in .artifacts/ (or $HOSTLER_ARTIFACTS)."""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import Server

ROOT = Path(__file__).resolve().parents[2]
KEY = "page-test-key"
MODEL = "smollm2-135m"
# As the machine's own browser tests start it: no sandbox as root, and none of the
# background connections a closed network refuses.
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


def chromium() -> str:
    found = os.environ.get("HOSTLER_CHROMIUM") or next(
        filter(None, (shutil.which(n) for n in ("chromium", "chromium-browser"))), None
    )
    if not found:
        pytest.fail(
            "no Chromium: scripts/test installs Debian's chromium package; elsewhere install"
            " it or set HOSTLER_CHROMIUM to its path"
        )
    return found


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("status-page")
    s = Server(
        folder / "server.log", "--api-key", KEY, "--slots", "2",
        "--cache-dir", str(folder / "cache"),
    )  # fmt: skip
    try:
        yield s
    finally:
        s.stop(timeout=30)


def _status(server: Server) -> dict[str, object]:
    r = httpx.get(server.url + "/status", headers={"Authorization": f"Bearer {KEY}"})
    r.raise_for_status()
    return dict(r.json())


def test_status_page_in_a_browser(server: Server) -> None:
    from playwright.sync_api import expect, sync_playwright

    artifacts = Path(os.environ.get("HOSTLER_ARTIFACTS", ROOT / ".artifacts"))
    artifacts.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium(), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 1300})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(server.url + "/")
            # The key is asked for once, and kept in the tab's session storage only.
            expect(page.locator("#key-panel")).to_be_visible()
            page.get_by_label("This server needs an API key").fill(KEY)
            page.get_by_role("button", name="Use key").click()
            card = page.locator(f"article[data-model='{MODEL}']")
            expect(card).to_have_attribute("data-state", "loaded")
            expect(page.locator("#connection")).to_have_text("Live")
            assert page.evaluate("sessionStorage.getItem('hostler-api-key')") == KEY
            assert page.evaluate("localStorage.length") == 0
            assert _status(server)["server"]["status_pages"] == 1  # type: ignore[index]

            # A chat through the API: a slot goes busy and the tok/s plot moves.
            done = threading.Event()

            def chat() -> None:
                try:
                    httpx.post(
                        server.url + "/v1/chat/completions",
                        headers={"Authorization": f"Bearer {KEY}"},
                        json={
                            "model": MODEL, "max_tokens": 400, "temperature": 0,
                            "logit_bias": {"0": -100, "2": -100},
                            "messages": [{"role": "user", "content": "Tell me a long story."}],
                        },
                        timeout=120,
                    )  # fmt: skip
                finally:
                    done.set()

            worker = threading.Thread(target=chat)
            worker.start()
            expect(card.locator("li.slot[data-busy='true']")).to_have_count(1, timeout=20000)
            # (No wait_for_function: the page's CSP forbids evaluating strings.)
            plot = page.locator("#plot")
            deadline = time.monotonic() + 20
            while float(plot.get_attribute("data-latest") or 0) <= 0:
                assert time.monotonic() < deadline, "the tok/s plot did not move"
                time.sleep(0.2)
            page.screenshot(path=str(artifacts / "status-page.png"), full_page=True)
            worker.join(timeout=120)
            assert done.is_set()
            expect(card.locator("li.slot[data-busy='true']")).to_have_count(0, timeout=20000)
            row = page.locator("#requests tbody tr").first
            expect(row).to_contain_text("/v1/chat/completions")
            expect(row).to_contain_text("400")  # completion tokens
            assert "Tell me a long story" not in page.content()  # no prompt on the page

            # Unload and load with the buttons (the key goes with them).
            card.get_by_role("button", name=f"Unload {MODEL}").click()
            expect(card).to_have_attribute("data-state", "downloaded", timeout=30000)
            card.get_by_role("button", name=f"Load {MODEL}").click()
            expect(card).to_have_attribute("data-state", "loaded", timeout=60000)
            expect(page.locator("#action")).to_have_text(f"Loaded {MODEL}.")
            page.keyboard.press("Tab")  # the page is usable from the keyboard
            page.screenshot(path=str(artifacts / "status-page-reloaded.png"), full_page=True)
            assert errors == []
        finally:
            browser.close()
    # The tab is gone: so is its feed.
    deadline = time.monotonic() + 10
    while _status(server)["server"]["status_pages"] != 0:  # type: ignore[index]
        assert time.monotonic() < deadline, "the page's feed stayed open"
        time.sleep(0.2)


def test_a_wrong_key_is_asked_again(server: Server) -> None:
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium(), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 390, "height": 844})  # a phone
            page.goto(server.url + "/")
            page.get_by_label("This server needs an API key").fill("wrong")
            page.get_by_role("button", name="Use key").click()
            expect(page.locator("#key-error")).to_have_text("That key was refused.")
            expect(page.locator("#models article")).to_have_count(0)
        finally:
            browser.close()


def test_the_feed_streams_snapshots(server: Server) -> None:
    headers = {"Authorization": f"Bearer {KEY}"}
    seen = 0
    started = time.monotonic()
    with httpx.stream("GET", server.url + "/status/events", headers=headers, timeout=10) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("event: status"):
                seen += 1
                if seen == 3:
                    break
    assert 0.5 < time.monotonic() - started < 5  # a few a second, not a busy loop
