"""The console end to end: a real gateway (transformers engine on the learnable tiny Llama),
a real training worker, and headless chromium.

A tenant drops a dataset on the page, starts a fine-tune and watches it succeed with a loss
chart, and compares the base and the adapter in the playground (streamed). An admin then
promotes the version, runs a canary of a second version at 25 %, promotes it, rolls back,
and finds each action in the audit log; usage shows the playground's requests with their
latency percentiles; a tenant is created and its key revoked. Screenshots of each page go
to docs/console/.
"""

from __future__ import annotations

import re
import time

import httpx
import pytest
from playwright.sync_api import expect

from api.settings import Settings
from tests.conftest import bearer, new_admin_key, new_tenant, serve_in_thread
from tests.console.conftest import SCREENSHOTS, assert_controls_labelled
from tests.console.test_console_access import log_in
from tests.workers.conftest import TINY, hp, tiny_dataset

pytestmark = pytest.mark.timeout(600)
FAST = {"n_epochs": 30, "batch_size": 4, "method": "lora", "learning_rate_multiplier": 50}
TRAINING = 240_000  # ms a fine-tune may take on 2 busy cores


@pytest.fixture
def settings(settings: Settings, learnable_llama) -> Settings:
    return settings.model_copy(
        update={
            "base_models": {TINY: str(learnable_llama)},
            "base_model": TINY,
            "serving_engine": "transformers",
        }
    )


def _wait_ready(url: str) -> None:
    deadline = time.monotonic() + 120
    while httpx.get(f"{url}/readyz").status_code != 200:  # the engine loads in the background
        assert time.monotonic() < deadline, "the serving engine never got ready"
        time.sleep(0.3)


def _wait_succeeded(url: str, key: str, job_id: str) -> None:
    deadline = time.monotonic() + TRAINING / 1000
    while time.monotonic() < deadline:
        job = httpx.get(f"{url}/v1/fine_tuning/jobs/{job_id}", headers=bearer(key)).json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            assert job["status"] == "succeeded", job
            return
        time.sleep(0.5)
    raise TimeoutError(job_id)


def _drop_dataset(page, name: str, data: bytes) -> None:
    """A file dragged from the desktop onto the drop zone."""
    transfer = page.evaluate_handle(
        "([name, text]) => { const dt = new DataTransfer();"
        " dt.items.add(new File([text], name, {type: 'application/jsonl'})); return dt; }",
        [name, data.decode()],
    )
    page.locator(".dropzone").dispatch_event("drop", {"dataTransfer": transfer})


def _tenant_trains_and_compares(page, url: str, key: str) -> str:
    """Returns the second job's id (a second version of the same adapter, for the canary)."""
    log_in(page, key)
    _drop_dataset(page, "facts.jsonl", tiny_dataset())
    expect(page.get_by_role("status")).to_contain_text("facts.jsonl is valid")
    page.get_by_role("navigation").get_by_role("link", name="Fine-tunes").click()
    assert_controls_labelled(page)
    page.get_by_label("Training file").select_option(label="facts.jsonl")
    page.get_by_label("Validation file").select_option(label="facts.jsonl")
    page.get_by_label("Adapter name (suffix)").fill("facts")
    page.get_by_label("Epochs (blank: auto)").fill(str(FAST["n_epochs"]))
    page.get_by_label("Batch size (blank: auto)").fill(str(FAST["batch_size"]))
    page.get_by_label("Learning rate multiplier (blank: auto)").fill("50")
    page.get_by_label("Method").select_option("lora")
    page.get_by_role("button", name="Start fine-tune").click()
    page.wait_for_url(re.compile(r"#/jobs/ftjob-"))
    job_id = page.url.rsplit("/", 1)[-1]
    training_file = httpx.get(f"{url}/v1/fine_tuning/jobs/{job_id}", headers=bearer(key)).json()
    assert "training_file" in training_file, (page.url, training_file)
    second = httpx.post(f"{url}/v1/fine_tuning/jobs", headers=bearer(key), json={
        "model": TINY, "training_file": training_file["training_file"], "suffix": "facts",
        "method": hp(**FAST)}).json()  # fmt: skip

    # The chart fills in while it trains, then the job succeeds.
    chart = page.get_by_role("img", name=re.compile("Training loss by step"))
    expect(chart).to_be_visible(timeout=TRAINING)
    expect(page.get_by_text("Status: succeeded")).to_be_visible(timeout=TRAINING)
    label = chart.get_attribute("aria-label") or ""
    first, last = (float(x) for x in re.findall(r"(\d+\.\d+) at step", label))
    assert last < first, label
    expect(page.get_by_role("table", name="Newest events first")).to_contain_text(
        "successfully completed"
    )
    page.screenshot(path=SCREENSHOTS / "fine-tune.png", full_page=True)

    # The adapter's page: its version, stage and files to download.
    page.get_by_role("navigation").get_by_role("link", name="Adapters").click()
    page.get_by_role("link", name="facts").click()
    expect(page.get_by_role("heading", name="Adapter facts", level=1)).to_be_visible()
    expect(page.get_by_role("heading", name=re.compile(r"^Version 1 candidate"))).to_be_visible()
    with page.expect_download() as download:
        page.get_by_role("button", name="Download v1").click()
    assert download.value.suggested_filename == "facts-v1.tar"
    # The validation file became the adapter's eval (its runs wait for an eval worker).
    page.get_by_role("navigation").get_by_role("link", name="Evals").click()
    expect(page.get_by_role("heading", name="facts: validation file")).to_be_visible()
    expect(page.get_by_role("table", name="Runs")).to_contain_text("v1 (candidate)")

    _wait_ready(url)
    page.get_by_role("navigation").get_by_role("link", name="Playground").click()
    assert_controls_labelled(page)
    for box in page.get_by_role("checkbox").all():
        box.uncheck()
    page.get_by_label(f"{TINY} (base)").check()
    page.get_by_label(re.compile(r"^facts v1 ")).check()
    question, answer = "What colour is the sky?", "Blue."
    page.get_by_label("Prompt").fill(question)
    page.get_by_label("Max tokens").fill("12")
    page.get_by_role("button", name="Send to all").click()
    base = page.get_by_role("region", name=f"Answer from {TINY}")
    tuned = page.get_by_role("region", name=re.compile(r"Answer from ft:"))
    expect(tuned).to_have_class(re.compile("done"), timeout=60_000)
    expect(base).to_have_class(re.compile("done"), timeout=60_000)
    expect(tuned.locator(".answer")).to_contain_text(answer)
    assert answer not in base.locator(".answer").inner_text()  # the base says another fact's
    page.screenshot(path=SCREENSHOTS / "playground.png")
    return second["id"]


def _confirm(page, button: str, says: str) -> None:
    page.get_by_role("button", name=button).click()
    dialog = page.get_by_role("dialog")
    expect(dialog).to_contain_text(says)
    dialog.get_by_role("button", name="Confirm").click()


def _admin_promotes_canaries_and_rolls_back(page, key: str) -> None:
    log_in(page, key)
    expect(page.get_by_role("heading", name="All adapters", level=1)).to_be_visible()
    page.get_by_role("link", name="facts").click()
    expect(page.get_by_role("heading", name="Adapter facts", level=1)).to_be_visible()
    # Cancelling changes nothing.
    page.get_by_role("button", name="Promote v1 to production").click()
    expect(page.get_by_role("dialog")).to_contain_text("answered by v1 instead of no version")
    page.get_by_role("dialog").get_by_role("button", name="Cancel").click()
    expect(page.get_by_role("dialog")).to_be_hidden()

    assert_controls_labelled(page)
    entry = page.locator(".audit-entry")
    _confirm(page, "Promote v1 to production", "answered by v1")
    expect(entry).to_contain_text("promote.production")
    page.get_by_label("Canary share").select_option("25")
    _confirm(page, "Start canary of v2", "25 % of calls to facts by name go to v2")
    expect(entry).to_contain_text("canary.set")
    expect(page.get_by_text("v2 at 25%")).to_be_visible()
    page.screenshot(path=SCREENSHOTS / "admin-adapter.png", full_page=True)
    _confirm(page, "Promote canary", "v2 takes all by-name calls")
    expect(entry).to_contain_text("canary.promote")
    _confirm(page, "Roll back production", "v2 leaves production")
    expect(entry).to_contain_text("rollback")
    expect(page.get_by_role("row", name=re.compile(r"^v1 production "))).to_be_visible()
    expect(page.get_by_role("row", name=re.compile(r"^v2 archived "))).to_be_visible()

    page.get_by_role("link", name="Audit log").click()
    log = page.get_by_role("table", name="Audit log, newest first")
    for action in ("promote.production", "canary.set", "canary.promote", "rollback"):
        expect(log).to_contain_text(action)
    page.screenshot(path=SCREENSHOTS / "audit.png")
    page.get_by_label("Action").fill("rollback")
    page.get_by_role("button", name="Filter").click()
    expect(log.locator("tbody tr")).to_have_count(1)
    expect(log).to_contain_text("rollback")

    page.get_by_role("link", name="Usage").click()
    per_adapter = page.get_by_role("table", name="Usage per adapter")
    expect(per_adapter).to_contain_text(TINY)
    expect(per_adapter.locator("td", has_text=re.compile(r"^\d+ ms$")).first).to_be_visible()
    page.screenshot(path=SCREENSHOTS / "usage.png")

    page.get_by_role("link", name="Replicas").click()
    replicas = page.get_by_role("table", name="Serving replicas")
    expect(replicas.locator("tbody tr")).to_have_count(1)  # the one in-process engine
    expect(replicas).to_contain_text("yes")
    expect(replicas).to_contain_text("ft:tiny-llama:support-team:facts:")  # the playground's

    page.get_by_role("link", name="Tenants and keys").click()
    assert_controls_labelled(page)
    page.get_by_label("New tenant name").fill("new-team")
    page.get_by_role("button", name="Create tenant").click()
    expect(page.get_by_role("status")).to_contain_text("Tenant new-team created")
    new_key = page.locator(".secret code").inner_text()
    assert new_key.startswith("lpx-")
    prefix = page.get_by_role("row", name=re.compile("new-team")).get_by_role(
        "button", name=re.compile("^Revoke")
    )
    _confirm(page, prefix.inner_text(), "refused from now on")
    expect(
        page.get_by_role("row", name=re.compile("new-team")).get_by_role(
            "button", name=re.compile("^Revoke")
        )
    ).to_have_count(0)
    page.screenshot(path=SCREENSHOTS / "tenants.png")

    # Past a page of audit entries, older ones load below.
    tenant_id = _tenant_id(page, "new-team")
    with httpx.Client(base_url=page.url.split("/console")[0], headers=bearer(key)) as http:
        for _ in range(100):
            assert http.post(f"/v1/admin/tenants/{tenant_id}/keys", json={}).status_code == 200
    page.get_by_role("link", name="Audit log").click()
    rows = page.get_by_role("table", name="Audit log, newest first").locator("tbody tr")
    expect(rows).to_have_count(100)
    page.get_by_role("button", name="Show older entries").click()
    expect(rows).to_have_count(100 + 4 + 2)  # and the 4 registry moves, tenant.create, key.revoke
    expect(page.get_by_role("button", name="Show older entries")).to_be_hidden()


def _tenant_id(page, name: str) -> str:
    row = page.get_by_role("table", name="Tenants").get_by_role("row", name=re.compile(name))
    return row.get_by_role("cell").nth(1).inner_text()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_tenant_trains_and_admin_promotes_through_the_console(
    settings: Settings, start_worker, new_page
) -> None:
    _, key = new_tenant(settings, name="support-team")
    admin_key = new_admin_key(settings)
    with serve_in_thread(settings, with_gateway=True) as url:
        start_worker()
        second = _tenant_trains_and_compares(new_page(f"{url}/console/"), url, key)
        _wait_succeeded(url, key, second)
        _admin_promotes_canaries_and_rolls_back(new_page(f"{url}/console/"), admin_key)
