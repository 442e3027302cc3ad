"""A real browser for the console: Debian's chromium (the Makefile installs it) driven by
Playwright, failing a test on any console error or uncaught page error."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

# The workers' fixtures: a real broker, real worker processes, the tiny Llama as the base.
from tests.workers.conftest import (  # noqa: F401
    broker_url,
    settings,
    start_worker,
    storage_url,
)

CHROMIUM = "/usr/bin/chromium"
# Without the background-networking flags chromium dials out at start, which this closed
# network refuses (and reports as console errors).
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "console"


# Package-scoped, not session-scoped: Playwright's sync API runs an event loop in this
# thread until it stops, and every later test calling asyncio.run() would fail.
@pytest.fixture(scope="package")
def browser() -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


# Chromium logs every 4xx answer to fetch() as a console error. The console provokes some on
# purpose (a tenant key's 404 on an admin route tells it the key is not an admin's) and
# shows the API's message; any other console error, a 5xx, and any console file that does
# not load, fail the test.
API_REFUSAL = re.compile(r"^Failed to load resource: the server responded with a status of 4\d\d")


class PageErrors:
    """Every console error and uncaught exception of the pages it watches."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    def _console(self, message) -> None:
        if message.type == "error" and not API_REFUSAL.match(message.text):
            self.errors.append(f"console: {message.text} at {message.location}")

    def _response(self, response) -> None:
        if "/console/" in response.url and response.status != 200:
            self.errors.append(f"console file {response.url}: {response.status}")

    def watch(self, page) -> None:
        page.on("console", self._console)
        page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))
        page.on("response", self._response)


@pytest.fixture
def page_errors() -> Iterator[PageErrors]:
    errors = PageErrors()
    yield errors
    assert not errors.errors, errors.errors


@pytest.fixture
def new_page(browser, page_errors: PageErrors):
    """A fresh browser context (its own sessionStorage) at a laptop's 1280x800, watched."""
    contexts = []

    def open_page(url: str):
        context = browser.new_context(viewport={"width": 1280, "height": 800})
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(30_000)
        page_errors.watch(page)
        page.goto(url)
        return page

    yield open_page
    for context in contexts:
        context.close()


def assert_controls_labelled(page) -> None:
    """Every form control on the page has a label a screen reader announces."""
    unlabelled = page.evaluate(
        """() => [...document.querySelectorAll('input, select, textarea')]
            .filter((el) => el.type !== 'hidden' && !el.closest('[hidden]'))
            .filter((el) => !(el.labels && el.labels.length) && !el.getAttribute('aria-label'))
            .map((el) => el.outerHTML)"""
    )
    assert not unlabelled, unlabelled
