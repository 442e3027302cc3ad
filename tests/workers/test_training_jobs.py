"""Fine-tuning jobs through real worker processes: the user's flow, crashes, cancel, limits."""

from __future__ import annotations

import csv
import io
import signal
import time
from pathlib import Path

import openai
import pytest
import redis
from sqlmodel import Session, select

from api.db import get_engine
from api.models.jobs import JobCheckpoint
from api.storage import ArtifactStore
from tests.workers.conftest import (
    BROKEN,
    TINY,
    hp,
    upload,
    versions,
    wait_for_status,
    wait_until_probed,
)
from workers.celery_app import enqueue_training

pytestmark = pytest.mark.timeout(600)
FINISHED = {"succeeded", "failed", "cancelled"}


@pytest.mark.parametrize("broker_url", ["redis", "rabbitmq", "embedded"], indirect=True)
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_full_flow_through_the_sdk(sdk: openai.OpenAI, start_worker, settings) -> None:
    worker = start_worker()
    job = sdk.fine_tuning.jobs.create(
        model=TINY,
        training_file=upload(sdk),
        suffix="facts",
        method=hp(n_epochs=3, batch_size=4, method="lora"),
    )
    done = wait_for_status(sdk, job.id, {"succeeded", "failed", "cancelled"})
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model == f"ft:{TINY}:support:facts:{job.id[6:14]}"
    assert done.trained_tokens and done.trained_tokens > 0 and done.finished_at
    events = [e for e in sdk.fine_tuning.jobs.list_events(job.id, limit=100)]
    metrics = [e for e in events if e.type == "metrics"]
    assert metrics and metrics[0].message.startswith("Step 9/9: training loss=")
    assert {"step", "train_loss", "train_mean_token_accuracy"} <= set(metrics[0].data)
    assert events[0].message == "The job has successfully completed"

    (version,) = versions(settings, job.id)
    assert version.stage == "candidate" and version.version == 1 and version.rank == 16
    store = ArtifactStore(settings.storage_url)
    for name, info in version.files.items():
        key = f"{version.storage_prefix}/{name}"
        assert store.exists(key) and store.size(key) == info["size"]
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(version.files)

    (results_id,) = done.result_files
    assert sdk.files.retrieve(results_id).purpose == "fine-tune-results"
    rows = list(csv.DictReader(io.StringIO(sdk.files.content(results_id).text)))
    assert rows and set(rows[0]) == {
        "step",
        "train_loss",
        "train_accuracy",
        "valid_loss",
        "valid_mean_token_accuracy",
    }

    # A redelivered message for a finished job is dropped: never trained twice.
    enqueue_training(settings, job.id, queue=settings.train_queue)
    deadline = time.monotonic() + 30
    while f"job {job.id}: skipped" not in worker.log.read_text():
        assert time.monotonic() < deadline, "the redelivered task was not seen"
        time.sleep(0.2)
    assert len(versions(settings, job.id)) == 1
    assert sdk.fine_tuning.jobs.retrieve(job.id).finished_at == done.finished_at


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
@pytest.mark.parametrize("storage_url", ["file", "s3"], indirect=True)
def test_sigkilled_worker_resumes_from_checkpoint_once(
    sdk, start_worker, settings, tmp_path: Path
) -> None:
    """On S3 the second worker is on "another host": a home of its own, nothing shared with
    the dead one but the database, the broker and the bucket (checkpoints included)."""
    on_s3 = settings.storage_url.startswith("s3://")
    first = start_worker()
    job = sdk.fine_tuning.jobs.create(
        model=TINY,
        training_file=upload(sdk),
        suffix="crashy",
        method=hp(n_epochs=30, batch_size=1, method="lora", checkpoint_interval=60),
    )
    engine = get_engine(settings.database_url)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        with Session(engine) as s:
            if s.exec(select(JobCheckpoint).where(JobCheckpoint.job_id == job.id)).first():
                break
        time.sleep(0.2)
    else:
        pytest.fail("no checkpoint was written")
    first.kill()
    assert sdk.fine_tuning.jobs.retrieve(job.id).status == "running"

    # Its reaper sees the dead worker's stale heartbeat and re-queues the job.
    start_worker(home=tmp_path / "other-host" if on_s3 else None)
    done = wait_for_status(sdk, job.id, {"succeeded", "failed", "cancelled"}, timeout=300)
    assert done.status == "succeeded", done.error
    assert done.model_extra["attempts"] == 2
    messages = [e.message for e in sdk.fine_tuning.jobs.list_events(job.id, limit=1000)]
    resumed = [m for m in messages if m.startswith("Resuming from checkpoint at step")]
    assert len(resumed) == 1
    step = int(resumed[0].rsplit(" ", 1)[1])
    # After the resume, progress continues from the checkpoint rather than from step 1.
    assert step >= 60
    after_resume = messages[: messages.index(resumed[0])]  # events are newest first
    first_step = min(int(m.split()[1].split("/")[0]) for m in after_resume if m.startswith("Step "))
    assert first_step > step  # progress continued from the checkpoint, not from step 1
    assert len(versions(settings, job.id)) == 1
    # The resumed run went on checkpointing; only the newest three are kept (settings).
    checkpoints = sdk.fine_tuning.jobs.checkpoints.list(job.id)
    assert sorted(c.step_number for c in checkpoints) == [240, 300, 360]


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_failure_is_clean_then_cancel_stops_a_running_job(sdk, start_worker, settings) -> None:
    start_worker()
    broken = sdk.fine_tuning.jobs.create(model=BROKEN, training_file=upload(sdk))
    failed = wait_for_status(sdk, broken.id, {"failed", "succeeded"})
    assert failed.status == "failed" and failed.error.code == "model_not_available"
    assert "Traceback" not in failed.error.message and "missing" in failed.error.message

    job = sdk.fine_tuning.jobs.create(
        model=TINY,
        training_file=upload(sdk, repeat=2),
        method=hp(n_epochs=50, batch_size=1, method="lora"),
    )
    deadline = time.monotonic() + 120
    while not any(e.type == "metrics" for e in sdk.fine_tuning.jobs.list_events(job.id)):
        assert time.monotonic() < deadline, "training never started"
        time.sleep(0.2)
    assert sdk.fine_tuning.jobs.cancel(job.id).status == "cancelled"
    time.sleep(3)
    steps_then = _last_step(sdk, job.id)
    time.sleep(3)
    assert _last_step(sdk, job.id) == steps_then  # the worker stopped training
    final = sdk.fine_tuning.jobs.retrieve(job.id)
    assert final.status == "cancelled" and final.fine_tuned_model is None
    assert versions(settings, job.id) == []


def _last_step(sdk: openai.OpenAI, job_id: str) -> int:
    metrics = [
        e for e in sdk.fine_tuning.jobs.list_events(job_id, limit=100) if e.type == "metrics"
    ]
    return int(metrics[0].data["step"]) if metrics else 0


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_per_tenant_limit_keeps_the_second_job_queued(sdk, start_worker, settings) -> None:
    start_worker()
    start_worker()  # two workers, but the tenant may run one job at a time
    file_id = upload(sdk)
    a = sdk.fine_tuning.jobs.create(
        model=TINY, training_file=file_id, method=hp(n_epochs=30, batch_size=1, method="lora")
    )
    b = sdk.fine_tuning.jobs.create(
        model=TINY, training_file=file_id, method=hp(n_epochs=2, batch_size=4, method="lora")
    )
    # Either job may be claimed first (two workers race for the two messages); whichever it
    # is, the other waits until it is done. Polled while they run, then proven by timestamps.
    checks = 0
    while True:
        statuses = [sdk.fine_tuning.jobs.retrieve(j.id).status for j in (a, b)]
        assert statuses.count("running") <= 1, statuses
        if all(s in {"succeeded", "failed"} for s in statuses):
            break
        checks += "running" in statuses
        time.sleep(0.2)
    assert checks > 0  # the polls saw them run, never both at once
    spans = []
    for job in (a, b):
        done = sdk.fine_tuning.jobs.retrieve(job.id)
        assert done.status == "succeeded", done.error
        started = [
            e.created_at
            for e in sdk.fine_tuning.jobs.list_events(job.id, limit=100)
            if e.message.startswith("Fine-tuning job started")
        ]
        assert done.finished_at is not None
        spans.append((min(started), done.finished_at))
    first, second = sorted(spans)
    assert second[0] >= first[1] - 1  # the second started only once the first had finished


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_sigterm_checkpoints_and_hands_the_job_back(sdk, start_worker, settings) -> None:
    """A deploy stops a worker mid-run: it checkpoints at once and exits, the job waits
    queued, and the next worker resumes it from that very step."""
    first = start_worker()
    job = sdk.fine_tuning.jobs.create(
        model=TINY,
        training_file=upload(sdk),
        method=hp(n_epochs=30, batch_size=1, method="lora", checkpoint_interval=100_000),
    )
    deadline = time.monotonic() + 120
    while _last_step(sdk, job.id) < 5:
        assert time.monotonic() < deadline, "training never got going"
        time.sleep(0.2)
    first.proc.send_signal(signal.SIGTERM)  # celery's warm shutdown, as systemd or docker do
    first.proc.wait(60)
    assert first.proc.returncode == 0
    handed = sdk.fine_tuning.jobs.retrieve(job.id)
    assert handed.status == "queued"
    messages = [e.message for e in sdk.fine_tuning.jobs.list_events(job.id, limit=1000)]
    back = [m for m in messages if m.startswith("Worker stopping: job handed back after step")]
    assert len(back) == 1
    step = int(back[0].split("after step ")[1].split(";")[0])
    events = sdk.fine_tuning.jobs.list_events(job.id, limit=100)
    total = next(e.data["total_steps"] for e in events if e.type == "metrics")
    assert 5 <= step < total // 2  # stopped at once, not at the end of the run
    assert [c.step_number for c in sdk.fine_tuning.jobs.checkpoints.list(job.id)] == [step]

    start_worker()
    done = wait_for_status(sdk, job.id, {"succeeded", "failed", "cancelled"}, timeout=300)
    assert done.status == "succeeded", done.error
    assert done.model_extra["attempts"] == 1  # a hand-back is not a failed attempt
    messages = [e.message for e in sdk.fine_tuning.jobs.list_events(job.id, limit=1000)]
    assert f"Resuming from checkpoint at step {step}" in messages
    assert len(versions(settings, job.id)) == 1


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_pause_frees_the_worker_and_resume_finishes_from_that_step(
    sdk, start_worker, settings
) -> None:
    """POST .../pause (OpenAI's): the running job checkpoints and lets its worker go, which
    then trains another job; POST .../resume queues it, and it continues from that step."""
    start_worker()  # one worker: only a freed worker can run the second job
    long = sdk.fine_tuning.jobs.create(
        model=TINY,
        training_file=upload(sdk),
        suffix="pausable",
        method=hp(n_epochs=30, batch_size=1, method="lora", checkpoint_interval=100_000),
    )
    deadline = time.monotonic() + 120
    while _last_step(sdk, long.id) < 5:
        assert time.monotonic() < deadline, "training never got going"
        time.sleep(0.2)
    assert sdk.fine_tuning.jobs.pause(long.id).status == "paused"
    deadline = time.monotonic() + 60
    while not (parked := _event(sdk, long.id, "Fine-tuning job paused after step")):
        assert time.monotonic() < deadline, "the worker never let the job go"
        time.sleep(0.2)
    step = int(parked.split("after step ")[1].split(";")[0])
    assert [c.step_number for c in sdk.fine_tuning.jobs.checkpoints.list(long.id)] == [step]

    quick = sdk.fine_tuning.jobs.create(
        model=TINY, training_file=upload(sdk), method=hp(n_epochs=1, method="lora")
    )
    assert wait_for_status(sdk, quick.id, FINISHED).status == "succeeded"
    assert sdk.fine_tuning.jobs.retrieve(long.id).status == "paused"  # waited, untouched
    with pytest.raises(openai.BadRequestError, match="not paused"):
        sdk.fine_tuning.jobs.resume(quick.id)
    with pytest.raises(openai.BadRequestError, match="cannot be paused"):
        sdk.fine_tuning.jobs.pause(quick.id)

    assert sdk.fine_tuning.jobs.resume(long.id).status == "queued"
    done = wait_for_status(sdk, long.id, FINISHED, timeout=300)
    assert done.status == "succeeded", done.error
    assert done.model_extra["attempts"] == 1  # a pause is not a failed attempt
    messages = [e.message for e in sdk.fine_tuning.jobs.list_events(long.id, limit=1000)]
    assert f"Resuming from checkpoint at step {step}" in messages
    assert len(versions(settings, long.id)) == 1


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_queued_job_paused_never_starts_until_resumed(sdk, start_worker, settings) -> None:
    job = sdk.fine_tuning.jobs.create(
        model=TINY, training_file=upload(sdk), method=hp(n_epochs=1, method="lora")
    )
    assert sdk.fine_tuning.jobs.pause(job.id).status == "paused"
    assert sdk.fine_tuning.jobs.pause(job.id).status == "paused"  # idempotent
    start_worker()
    broker = redis.Redis.from_url(settings.broker_url)
    deadline = time.monotonic() + 30
    while broker.llen(settings.train_queue):  # the worker takes the job's message ...
        assert time.monotonic() < deadline, "the worker never took the message"
        time.sleep(0.1)
    time.sleep(1)
    assert sdk.fine_tuning.jobs.retrieve(job.id).status == "paused"  # ... and leaves it be
    assert sdk.fine_tuning.jobs.resume(job.id).status == "queued"
    assert wait_for_status(sdk, job.id, FINISHED).status == "succeeded"
    paused_then_cancelled = sdk.fine_tuning.jobs.create(
        model=TINY, training_file=upload(sdk), method=hp(n_epochs=1, method="lora")
    )
    sdk.fine_tuning.jobs.pause(paused_then_cancelled.id)
    assert sdk.fine_tuning.jobs.cancel(paused_then_cancelled.id).status == "cancelled"


def _event(sdk: openai.OpenAI, job_id: str, prefix: str) -> str | None:
    messages = [e.message for e in sdk.fine_tuning.jobs.list_events(job_id, limit=100)]
    return next((m for m in messages if m.startswith(prefix)), None)


def _losses(sdk: openai.OpenAI, job_id: str) -> dict[int, float]:
    events = sdk.fine_tuning.jobs.list_events(job_id, limit=1000)
    return {int(e.data["step"]): float(e.data["train_loss"]) for e in events
            if e.type == "metrics" and e.data.get("train_loss") is not None}  # fmt: skip


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_continued_job_starts_from_its_parents_weights(sdk, start_worker, settings) -> None:
    """`model` = one of the tenant's `ft:` ids: the job starts from that version's weights
    (its loss where the parent's ended, not where the base starts), becomes the next version
    of the same adapter, and its lineage names the parent."""
    start_worker()
    data = upload(sdk)
    # As tests/serving/servingdata.py trains: a random tiny model needs a big push.
    fast = {"batch_size": 4, "method": "lora", "learning_rate_multiplier": 50}
    parent = sdk.fine_tuning.jobs.create(
        model=TINY, training_file=data, suffix="facts", method=hp(n_epochs=30, **fast)
    )
    parent_done = wait_for_status(sdk, parent.id, FINISHED)
    assert parent_done.status == "succeeded", parent_done.error
    before = _losses(sdk, parent.id)
    first, last = before[min(before)], before[max(before)]
    assert first - last > 0.3, before  # the parent learned something to continue from

    with pytest.raises(openai.BadRequestError, match="no production version"):
        sdk.fine_tuning.jobs.create(model="facts", training_file=data)  # a candidate only
    child = sdk.fine_tuning.jobs.create(
        model=parent_done.fine_tuned_model, training_file=data, method=hp(n_epochs=1, **fast)
    )
    assert child.model == TINY  # the base it trains on
    child_done = wait_for_status(sdk, child.id, FINISHED)
    assert child_done.status == "succeeded", child_done.error
    after = _losses(sdk, child.id)
    assert after[min(after)] < (first + last) / 2, (before, after)  # from the parent's weights
    (version,) = versions(settings, child.id)
    assert version.version == 2  # the next version of `facts`
    assert version.lineage["parent"]["fine_tuned_model"] == parent_done.fine_tuned_model
    messages = [e.message for e in sdk.fine_tuning.jobs.list_events(child.id, limit=100)]
    assert f"Continuing the training of {parent_done.fine_tuned_model}" in messages

    # The parent's checkpoints are models too, as OpenAI serves them: each one's
    # `fine_tuned_model_checkpoint` name answers with that checkpoint's weights.
    _chat_with_checkpoints(sdk, settings, parent.id, probed=(parent.id, child.id))


def _chat_with_checkpoints(
    sdk: openai.OpenAI, settings, job_id: str, *, probed: tuple[str, ...]
) -> None:
    from fastapi.testclient import TestClient

    from api.main import create_app
    from tests.trainer.trainer_testdata import TINY_FACTS

    question = TINY_FACTS[0][0]
    checkpoints = list(sdk.fine_tuning.jobs.checkpoints.list(job_id))
    assert checkpoints
    earliest = min(checkpoints, key=lambda c: c.step_number)
    name = earliest.fine_tuned_model_checkpoint
    assert name.startswith(f"ft:{TINY}:support:facts:") and name.endswith(
        f":ckpt-step-{earliest.step_number}"
    )
    with Session(get_engine(settings.database_url)) as session:
        row = session.get(JobCheckpoint, earliest.id)
        assert row is not None and row.files
        local = settings.home / "ckpt-download"
        ArtifactStore(settings.storage_url).get_dir(row.storage_prefix, local)
    expected = _peft_answer(Path(settings.base_models[TINY]), local, question)

    gateway = settings.model_copy(update={"serving_engine": "transformers", "base_model": TINY})
    with TestClient(create_app(gateway, with_gateway=True)) as client:
        body = {"messages": [{"role": "user", "content": question}], "max_tokens": 12,
                "temperature": 0}  # fmt: skip
        headers = {"Authorization": f"Bearer {sdk.api_key}"}
        deadline = time.monotonic() + 120
        while client.get("/readyz").status_code != 200:  # the engine loads in the background
            assert time.monotonic() < deadline, client.get("/readyz").text
            time.sleep(0.5)
        wait_until_probed(settings, *probed)
        response = client.post("/v1/chat/completions", json={"model": name, **body},
                               headers=headers)  # fmt: skip
        assert response.status_code == 200, response.text
        assert response.json()["model"] == name
        assert response.json()["choices"][0]["message"]["content"] == expected
        missing = name.replace(f"ckpt-step-{earliest.step_number}", "ckpt-step-999999")
        gone = client.post("/v1/chat/completions", json={"model": missing, **body},
                           headers=headers)  # fmt: skip
        assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"


def _peft_answer(base_dir: Path, adapter_dir: Path, question: str) -> str:
    """Greedy, 12 tokens, with transformers + peft: what the checkpoint's weights answer."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    ids = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                        add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)  # fmt: skip
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
