"""The console without training: logging in and out, a dataset's validation and preview,
and what a tenant key cannot see (admin pages, another tenant's objects)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
from playwright.sync_api import expect

from api.settings import Settings
from tests.conftest import bearer, new_tenant, serve_in_thread
from tests.console.conftest import SCREENSHOTS
from tests.workers.conftest import TINY, tiny_dataset


def log_in(page, key: str) -> None:
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Log in").click()


def test_tenant_sees_validation_and_only_its_own(
    settings: Settings, new_page, tmp_path: Path, start_worker
) -> None:
    """`start_worker` is not called (no job runs here): it empties the test's queues after."""
    _, key = new_tenant(settings, name="support-team")
    _, other_key = new_tenant(settings, name="other-team")
    with serve_in_thread(settings) as url:
        theirs = httpx.post(f"{url}/v1/files", headers=bearer(other_key),
                            files={"file": ("theirs.jsonl", tiny_dataset())},
                            data={"purpose": "fine-tune"}).json()  # fmt: skip
        page = new_page(f"{url}/console/")
        assert "frame-ancestors 'none'" in page.evaluate(
            "fetch('/console/').then(r => r.headers.get('content-security-policy'))"
        )

        log_in(page, "lpx-not-a-key")  # the API's own words
        expect(page.get_by_role("alert")).to_contain_text("API key")
        log_in(page, key)
        expect(page.get_by_role("heading", name="Datasets", level=1)).to_be_visible()
        assert page.evaluate("document.cookie") == ""
        assert page.evaluate("sessionStorage.getItem('loraplex.apiKey')") == key

        bad = tmp_path / "bad.jsonl"
        rows = [json.dumps({"messages": [{"role": "user", "content": "hi"}]}), "{not json"]
        bad.write_text("\n".join(rows) + "\n")
        page.get_by_label("Choose a dataset file").set_input_files(bad)
        problems = page.get_by_role("list", name="Validation problems")
        expect(problems).to_contain_text(re.compile(r"line 1", re.I))
        expect(problems).to_contain_text(re.compile(r"line 2", re.I))
        expect(page.get_by_role("alert")).to_contain_text("has problems")
        page.screenshot(path=SCREENSHOTS / "dataset-problems.png")

        page.get_by_role("navigation").get_by_role("link", name="Datasets").click()
        good = tmp_path / "facts.jsonl"
        good.write_bytes(tiny_dataset())
        page.get_by_label("Choose a dataset file").set_input_files(good)
        expect(page.get_by_role("status")).to_contain_text("facts.jsonl is valid")
        expect(page).to_have_title("Dataset facts.jsonl · Loraplex console")
        good_id = page.url.rsplit("/", 1)[-1]
        first = page.get_by_role("article", name="Example 1")
        expect(first).to_contain_text("What colour is the sky?")
        expect(first).to_contain_text("Blue.")
        page.screenshot(path=SCREENSHOTS / "dataset.png")

        # Another tenant's file, and the admin pages: the API's 404, as the API words it.
        page.goto(f"{url}/console/#/datasets/{theirs['id']}")
        expect(page.get_by_role("alert")).to_contain_text(f"No such File object: {theirs['id']}")
        page.goto(f"{url}/console/#/admin/adapters")
        expect(page.get_by_role("alert")).to_contain_text("Unknown request URL")
        expect(page.get_by_role("link", name="Audit log")).to_have_count(0)

        # A queued job (no worker here) cancelled from its page, after a confirmation.
        job = httpx.post(f"{url}/v1/fine_tuning/jobs", headers=bearer(key), json={
            "model": TINY, "training_file": good_id}).json()  # fmt: skip
        page.goto(f"{url}/console/#/jobs/{job['id']}")
        # By keyboard: Enter opens the confirmation, focus is on its safe choice, Escape
        # closes it and nothing changed.
        page.get_by_role("button", name="Cancel fine-tune").focus()
        page.keyboard.press("Enter")
        dialog = page.get_by_role("dialog")
        expect(dialog).to_contain_text("no adapter version is produced")
        expect(dialog.get_by_role("button", name="Cancel")).to_be_focused()
        page.keyboard.press("Escape")
        expect(dialog).to_be_hidden()
        expect(page.get_by_text("Status: queued")).to_be_visible()
        page.get_by_role("button", name="Cancel fine-tune").click()
        dialog.get_by_role("button", name="Confirm").click()
        expect(page.get_by_text("Status: cancelled")).to_be_visible()
        expect(page.get_by_role("button", name="Cancel fine-tune")).to_have_count(0)

        page.get_by_role("button", name="Log out").click()
        expect(page.get_by_label("API key")).to_be_focused()
        assert page.evaluate("sessionStorage.getItem('loraplex.apiKey')") is None
        page.keyboard.type(key)  # the key field has focus: logging in by keyboard alone
        page.keyboard.press("Enter")
        expect(page.get_by_role("heading", name="Datasets", level=1)).to_be_focused()
        expect(page.get_by_role("table", name="Datasets")).to_be_visible()  # loaded
        page.keyboard.press("Tab")  # from the page's heading on into its content
        expect(page.get_by_label("Choose a dataset file")).to_be_focused()
