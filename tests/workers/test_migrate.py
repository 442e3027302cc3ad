"""`loraplex migrate` against a second Loraplex instance playing the hosted source: its
succeeded job is recreated here (files distilled from the source model's own answers, the
method, the suffix), resumably, and the old `ft:` name answers here once promoted."""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from pathlib import Path

import openai
import pytest

from api.db import upgrade
from api.settings import Settings
from tests.conftest import bearer, new_admin_key, new_tenant, serve_in_thread
from tests.workers.conftest import (
    LORAPLEX,
    TINY,
    Worker,
    hp,
    upload,
    wait_for_status,
    wait_until_probed,
    worker_env,
)

pytestmark = pytest.mark.timeout(600)
FINISHED = {"succeeded", "failed", "cancelled"}
FAST = {"batch_size": 4, "method": "lora", "learning_rate_multiplier": 50}


def migrate(*args: str, settings: Settings) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [LORAPLEX, "migrate", *args],
        capture_output=True,
        text=True,
        env=worker_env(settings),
        timeout=300,
    )


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_migrate_recreates_the_sources_jobs_and_the_old_name_answers_after_promotion(
    settings: Settings, start_worker, tmp_path: Path
) -> None:
    import httpx

    serving = {"serving_engine": "transformers", "base_model": TINY, "serving_torch_threads": 1}
    source = settings.model_copy(update=serving)
    dest_db = f"sqlite:///{tmp_path / 'dest.db'}"
    upgrade(dest_db)
    dest = source.model_copy(
        update={
            "home": tmp_path / "dest-home",
            "database_url": dest_db,
            "storage_url": f"file://{tmp_path / 'dest-home' / 'artifacts'}",
            "train_queue": f"test-{uuid.uuid4().hex[:8]}",
        }
    )
    _, source_key = new_tenant(source, name="acme")
    _, dest_key = new_tenant(dest, name="acme-here")
    start_worker()
    dest_worker = Worker(dest, tmp_path / "dest-worker.log")
    stop = [dest_worker]
    try:
        dest_worker.wait_ready()
        with (
            serve_in_thread(source, with_gateway=True) as source_url,
            serve_in_thread(dest, with_gateway=True) as dest_url,
        ):
            for url in (source_url, dest_url):  # engines load in the background
                deadline = time.monotonic() + 120
                while httpx.get(f"{url}/readyz", timeout=10).status_code != 200:
                    assert time.monotonic() < deadline, f"{url} never became ready"
                    time.sleep(0.5)
            hosted = openai.OpenAI(base_url=f"{source_url}/v1", api_key=source_key, max_retries=0)
            here = openai.OpenAI(base_url=f"{dest_url}/v1", api_key=dest_key, max_retries=0)
            trained = hosted.fine_tuning.jobs.create(
                model=TINY, training_file=upload(hosted), suffix="support-bot",
                method=hp(n_epochs=30, **FAST), seed=7,
            )  # fmt: skip
            old = wait_for_status(hosted, trained.id, FINISHED)
            assert old.status == "succeeded", old.error
            assert old.fine_tuned_model.startswith(f"ft:{TINY}:acme:support-bot:")
            wait_until_probed(source, trained.id)  # then the answers below meet no batch

            args = ["--from", source_url, "--key", source_key, "--to", dest_url,
                    "--to-key", dest_key, "--base", TINY, "--distill",
                    "--state", str(tmp_path / "state.json")]  # fmt: skip
            done = migrate(*args, settings=dest)
            assert done.returncode == 0, done.stderr
            assert old.fine_tuned_model in done.stdout and "queued here; alias set" in done.stdout

            (job,) = here.fine_tuning.jobs.list()
            assert job.model == TINY and job.seed == 7
            assert job.metadata == {"migrated_from": old.id, "source_model": old.fine_tuned_model}
            assert job.method.type == "supervised"
            assert job.method.supervised.hyperparameters.n_epochs == 30
            # Distilled: each example's answer is what the old model says to its prompt.
            rows = [json.loads(line) for line in
                    here.files.content(job.training_file).text.splitlines()]  # fmt: skip
            for row in rows[:3]:
                prompt = row["messages"][:-1]
                said = hosted.chat.completions.create(
                    model=old.fine_tuned_model, messages=prompt, temperature=0
                )
                assert row["messages"][-1]["content"] == said.choices[0].message.content

            again = migrate(*args, settings=dest)  # resumed from its state: nothing twice
            assert again.returncode == 0, again.stderr
            assert len(here.fine_tuning.jobs.list().data) == 1
            assert len(here.files.list().data) == 1

            new = wait_for_status(here, job.id, FINISHED)
            assert new.status == "succeeded", new.error
            chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
            with pytest.raises(openai.NotFoundError, match="no production version yet"):
                here.chat.completions.create(model=old.fine_tuned_model, **chat)
            adapter = here.get("/adapters/support-bot", cast_to=httpx.Response).json()
            assert adapter["aliases"] == [old.fine_tuned_model]
            promoted = httpx.post(
                f"{dest_url}/v1/admin/adapters/{adapter['id']}/versions/1/promote",
                headers=bearer(new_admin_key(dest)),
                json={"stage": "production", "force": True},
                timeout=60,
            )
            assert promoted.status_code == 200, promoted.text
            reply = here.chat.completions.create(model=old.fine_tuned_model, **chat)
            assert reply.model == new.fine_tuned_model

            # The parity report: the source model and the new version on the same prompts
            # (the source job's training file: it had no validation file), graded here.
            graded = dest.model_copy(update={"gateway_url": f"{dest_url}/v1"})
            evals = Worker(graded, tmp_path / "dest-evals.log", args=("--queues", dest.eval_queue))
            stop.append(evals)
            evals.wait_ready()
            report = migrate(*args, "--report", settings=dest)
            assert report.returncode == 0, report.stderr
            header, row = report.stdout.strip().splitlines()
            assert header.split("\t")[3:] == ["source model", "here", "answer alike"]
            cells = row.split("\t")
            assert cells[:3] == [old.id, "support-bot", "12 (training)"], row
            figures = [int(c.rstrip("%")) for c in cells[3:]]
            assert all(0 <= f <= 100 for f in figures), row  # the tiny models ramble: no bar
            (parity,) = [e for e in here.evals.list() if e.name == "parity: support-bot"]
            runs = {r.name: r for r in here.evals.runs.list(parity.id)}
            assert set(runs) == {"source model", new.fine_tuned_model}
            assert all(r.status == "completed" and r.result_counts.total == 12
                       for r in runs.values())  # fmt: skip
            source_run = runs["source model"].id
            given = list(here.evals.runs.output_items.list(source_run, eval_id=parity.id))
            first = min(given, key=lambda i: i.datasource_item_id)
            said = hosted.chat.completions.create(
                model=old.fine_tuned_model, messages=first.datasource_item["input"], temperature=0
            )  # the source model's own answer is the sample graded
            assert first.sample.output_text == said.choices[0].message.content  # type: ignore[attr-defined]
            assert migrate(*args, "--report", settings=dest).stdout == report.stdout  # resumed
            assert len(list(here.evals.runs.list(parity.id))) == 2
    finally:
        for worker in stop:
            worker.stop()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_migrate_says_what_is_wrong_and_exits_1(settings: Settings, tmp_path: Path) -> None:
    state = ["--state", str(tmp_path / "state.json")]
    no_key = migrate("--from", "http://127.0.0.1:9", "--key", "k", *state, settings=settings)
    assert no_key.returncode == 1 and "--to-key" in no_key.stderr
    unreachable = migrate("--from", "http://127.0.0.1:9", "--key", "k", "--to-key", "x",
                          *state, settings=settings)  # fmt: skip
    assert (
        unreachable.returncode == 1 and "cannot reach http://127.0.0.1:9/v1" in unreachable.stderr
    )
    assert "Traceback" not in unreachable.stderr
    with serve_in_thread(settings) as url:  # a source that refuses the key
        refused = migrate("--from", url, "--key", "lpx-wrong", "--to-key", "x", *state,
                          settings=settings)  # fmt: skip
    assert refused.returncode == 1 and "API key" in refused.stderr, refused.stderr
    assert not (tmp_path / "state.json").exists()
