"""`loraplex migrate`: move a hosted fine-tuning account's models to Loraplex in one command.

Through the OpenAI API alone (the official SDK, on both sides), for each succeeded
fine-tuning job of the source account:

1. its training and validation files are read (`files.content`) and uploaded here; with
   `distill`, each chat example's last assistant turn is first replaced by the source
   model's own answer to the turns before it (greedy), so the new adapter learns what the
   old model actually said, not only what it was trained on;
2. a job is created here on the chosen base, with the source's method (supervised or dpo),
   its OpenAI hyperparameters (n_epochs, batch_size, learning_rate_multiplier, beta), its
   suffix (the adapter's name) and seed;
3. the source model's `ft:...` id becomes an alias of that adapter name
   (POST /v1/adapters/{name}/aliases): once an admin promotes the new version, a client that
   calls the old id here gets it, changing only its base URL and key.

Everything done is written to a state file after each step, so an interrupted migration run
again picks up where it stopped (no file uploaded twice, no job created twice, no source
answer asked twice). Calls to the source are rate-limited (`rps`).
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai

HYPERPARAMETERS = ("n_epochs", "batch_size", "learning_rate_multiplier", "beta")
METHODS = ("supervised", "dpo")
SUFFIX_OK = re.compile(r"[^a-z0-9-]+")
ProgressFactory = Callable[[int, str], AbstractContextManager[Any]]


class MigrationError(Exception):
    """The migration cannot go on (the source or destination refused); the message says why."""


def v1(url: str) -> str:
    """The SDK's base URL: the origin with `/v1` (given with or without it)."""
    url = url.rstrip("/")
    return url if url.endswith("/v1") else f"{url}/v1"


def adapter_name(job: Any) -> str:
    """The source job's suffix as an adapter name (a-z, 0-9, '-'; 1-64 characters)."""
    suffix = getattr(job, "user_provided_suffix", None)
    if not suffix and job.fine_tuned_model and job.fine_tuned_model.count(":") >= 4:
        suffix = job.fine_tuned_model.split(":")[3]  # ft:base:org:suffix:id
    name = SUFFIX_OK.sub("-", (suffix or "").lower()).strip("-")[:64].strip("-")
    return name or f"migrated-{job.id[-8:].lower()}"


def job_method(job: Any) -> dict[str, Any]:
    """The source job's method, with only OpenAI's hyperparameters, as explicit values."""
    method: dict[str, Any] = (
        job.method.model_dump() if getattr(job, "method", None) else {"type": "supervised"}
    )
    kind = method.get("type") or "supervised"
    if kind not in METHODS:
        raise MigrationError(f"method {kind!r} is not trained here (supervised and dpo are)")
    given = (method.get(kind) or {}).get("hyperparameters") or {}
    if not given and getattr(job, "hyperparameters", None):
        given = job.hyperparameters.model_dump()  # the deprecated top-level field
    hp = {k: v for k, v in given.items() if k in HYPERPARAMETERS and v not in (None, "auto")}
    return {"type": kind, kind: {"hyperparameters": hp}}


@dataclass
class State:
    """What has been done, per source job id; saved after every step (atomic replace)."""

    path: Path
    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> State:
        if path.is_file():
            return cls(path, json.loads(path.read_text()).get("jobs", {}))
        return cls(path)

    def of(self, job_id: str) -> dict[str, Any]:
        return self.jobs.setdefault(job_id, {})

    def save(self) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps({"jobs": self.jobs}, indent=2))
        os.replace(tmp, self.path)


@dataclass
class Outcome:
    source_job: str
    source_model: str | None
    job: str | None = None
    adapter: str | None = None
    problem: str | None = None


@dataclass
class Migration:
    source: openai.OpenAI
    dest: openai.OpenAI
    base_model: str
    state: State
    distill: bool = False
    rps: float = 2.0
    say: Callable[[str], None] = lambda _: None
    progress: ProgressFactory = lambda n, label: nullcontext(None)
    _last_call: float = 0.0

    def source_jobs(self, only: list[str] | None = None) -> list[Any]:
        if only:
            return [self.source.fine_tuning.jobs.retrieve(job_id) for job_id in only]
        jobs = [j for j in self.source.fine_tuning.jobs.list(limit=100) if j.status == "succeeded"]
        return sorted(jobs, key=lambda j: j.created_at)

    def run(self, only: list[str] | None = None) -> list[Outcome]:
        outcomes = []
        for job in self.source_jobs(only):
            outcome = Outcome(job.id, job.fine_tuned_model)
            try:
                self._migrate(job, outcome)
            except (MigrationError, openai.APIStatusError) as e:
                outcome.problem = str(getattr(e, "message", None) or e)
                self.say(f"{job.id}: not migrated: {outcome.problem}")
            outcomes.append(outcome)
        return outcomes

    def _migrate(self, job: Any, outcome: Outcome) -> None:
        done = self.state.of(job.id)
        outcome.adapter = name = adapter_name(job)
        method = job_method(job)
        if "job" not in done:
            chat = method["type"] == "supervised"
            training = self._copy_file(job, job.training_file, done, chat_only=chat)
            validation = (
                self._copy_file(job, job.validation_file, done, chat_only=chat)
                if job.validation_file
                else None
            )
            created = self.dest.fine_tuning.jobs.create(
                model=self.base_model,
                training_file=training,
                validation_file=validation,
                suffix=name,
                method=method,  # type: ignore[arg-type]
                seed=job.seed,
                metadata={
                    "migrated_from": job.id[:512],
                    "source_model": str(job.fine_tuned_model)[:512],
                },
            )
            done["job"] = created.id
            self.state.save()
            self.say(f"{job.id} -> {created.id} (adapter {name!r})")
        outcome.job = done["job"]
        if job.fine_tuned_model and not done.get("alias"):
            self._alias(name, job.fine_tuned_model)
            done["alias"] = job.fine_tuned_model
            self.state.save()

    def _copy_file(self, job: Any, file_id: str, done: dict[str, Any], *, chat_only: bool) -> str:
        copied = done.setdefault("files", {})
        if file_id in copied:
            return str(copied[file_id])
        meta = self._paced(lambda: self.source.files.retrieve(file_id))
        content = self._paced(lambda: self.source.files.content(file_id)).content
        if self.distill and chat_only:
            content = self._distilled(job, file_id, content, done)
        uploaded = self.dest.files.create(file=(meta.filename, content), purpose="fine-tune")
        uploaded = self.dest.files.wait_for_processing(uploaded.id, poll_interval=0.5)
        if uploaded.status != "processed":
            raise MigrationError(
                f"{meta.filename} ({file_id}) was refused here: {uploaded.status_details}"
            )
        copied[file_id] = uploaded.id
        self.state.save()
        self.say(f"{job.id}: {meta.filename} -> {uploaded.id}")
        return uploaded.id

    def _distilled(self, job: Any, file_id: str, content: bytes, done: dict[str, Any]) -> bytes:
        """Each chat line's last assistant turn, as the source model answers it."""
        lines = [line for line in content.decode("utf-8-sig").splitlines() if line.strip()]
        answers: list[str | None] = done.setdefault("distilled", {}).setdefault(file_id, [])
        out = []
        with self.progress(len(lines), f"distilling {file_id}") as bar:
            for i, line in enumerate(lines):
                row = json.loads(line)
                messages: Any = row.get("messages") if isinstance(row, dict) else None
                askable = (
                    isinstance(messages, list)
                    and len(messages) > 1
                    and isinstance(messages[-1], dict)
                    and messages[-1].get("role") == "assistant"
                )
                if askable and i >= len(answers):
                    answers.append(self._ask(job.fine_tuned_model, messages[:-1]))
                    self.state.save()  # resumable answer by answer
                elif i >= len(answers):
                    answers.append(None)  # not a chat example: kept as written
                if askable and answers[i] is not None:
                    row = {
                        **row,
                        "messages": [*messages[:-1], {**messages[-1], "content": answers[i]}],
                    }
                out.append(json.dumps(row, ensure_ascii=False))
                if bar is not None:
                    bar.update(1)
        return ("\n".join(out) + "\n").encode()

    def _ask(self, model: str, messages: list[dict[str, Any]]) -> str:
        prompt: Any = [
            {k: v for k, v in m.items() if k in ("role", "content", "name")} for m in messages
        ]
        reply = self._paced(
            lambda: self.source.chat.completions.create(model=model, messages=prompt, temperature=0)
        )
        return reply.choices[0].message.content or ""

    def _paced(self, call: Callable[[], Any]) -> Any:
        """One source call at most every 1/rps seconds (the source's rate limits are the
        account's; the SDK retries a 429 itself, with backoff)."""
        wait = self._last_call + 1 / self.rps - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        self._last_call = time.monotonic()
        return call()

    def _alias(self, name: str, alias: str) -> None:
        # Not an OpenAI operation: the SDK's raw post (4xx raise APIStatusError, as any call).
        self.dest.post(f"/adapters/{name}/aliases", body={"alias": alias}, cast_to=httpx.Response)


def outcomes_table(outcomes: list[Outcome]) -> Iterator[str]:
    yield "source job\tsource model\t-> job here\tadapter\tstatus"
    for o in outcomes:
        status = f"not migrated: {o.problem}" if o.problem else "queued here; alias set"
        yield f"{o.source_job}\t{o.source_model}\t{o.job or '-'}\t{o.adapter or '-'}\t{status}"


# -- the parity report: the same eval on the source model and the adapter here ---------------

PARITY_ITEMS = 200  # prompts of a file asked of both models: a fair sample, minutes at most
PARITY_CRITERIA = [
    {"type": "text_similarity", "name": "matches the reference", "input": "{{sample.output_text}}",
     "reference": "{{item.ideal}}", "evaluation_metric": "fuzzy_match", "pass_threshold": 0.8}
]  # fmt: skip
PARITY_SCHEMA: dict[str, object] = {
    "type": "object",
    "properties": {"input": {"type": "array"}, "ideal": {"type": "string"}},
    "required": ["input", "ideal"],
}


@dataclass
class Parity:
    source_job: str
    adapter: str
    on: str = "-"  # which file the prompts came from
    items: int = 0
    hosted: float | None = None  # share of answers matching the reference, source model
    here: float | None = None  # the same, the adapter's version here
    agreement: float | None = None  # share of prompts both answer alike
    problem: str | None = None


def chat_items(content: bytes, *, limit: int) -> list[dict[str, Any]]:
    """A chat file's first `limit` examples as eval items: the prompt and its answer."""
    items = []
    for line in content.decode("utf-8-sig").splitlines():
        row = json.loads(line) if line.strip() else None
        messages = row.get("messages") if isinstance(row, dict) else None
        if (isinstance(messages, list) and len(messages) > 1 and isinstance(messages[-1], dict)
                and messages[-1].get("role") == "assistant"
                and isinstance(messages[-1].get("content"), str)):  # fmt: skip
            prompt = [{k: v for k, v in m.items() if k in ("role", "content")}
                      for m in messages[:-1]]  # fmt: skip
            items.append({"input": prompt, "ideal": messages[-1]["content"]})
        if len(items) >= limit:
            break
    return items


class ParityReport:
    """For each migrated job whose job here succeeded: the source job's validation prompts
    (its training prompts when it had none) asked of the source model and of the new
    version here, both graded here by one eval (fuzzy match >= 0.8 with the file's answers),
    and how often the two answer alike. Resumable from the migration's state file."""

    def __init__(self, migration: Migration, *, timeout: float = 3600.0) -> None:
        self.m = migration
        self.timeout = timeout

    def run(self, only: list[str] | None = None) -> list[Parity]:
        reports = []
        for job in self.m.source_jobs(only):
            report = Parity(job.id, adapter_name(job))
            try:
                self._one(job, self.m.state.of(job.id), report)
            except (MigrationError, openai.APIStatusError) as e:
                report.problem = str(getattr(e, "message", None) or e)
            reports.append(report)
        return reports

    def _one(self, job: Any, done: dict[str, Any], report: Parity) -> None:
        if "job" not in done:
            raise MigrationError("not migrated yet: run the migration first")
        here = self.m.dest.fine_tuning.jobs.retrieve(done["job"])
        if here.status != "succeeded" or not here.fine_tuned_model:
            raise MigrationError(f"the job here ({here.id}) is {here.status}; report once it "
                                 "has succeeded")  # fmt: skip
        file_id = job.validation_file or job.training_file
        report.on = "validation" if job.validation_file else "training"
        parity = done.setdefault("parity", {})
        content = self.m._paced(lambda: self.m.source.files.content(file_id)).content
        items = chat_items(content, limit=PARITY_ITEMS)
        if not items:
            raise MigrationError(f"{file_id} has no chat examples to ask")
        report.items = len(items)
        hosted = self._hosted_answers(job, items, parity.setdefault("answers", []))
        runs = parity.setdefault("runs", {})
        if not runs:
            runs.update(self._start_runs(report.adapter, items, hosted, here.fine_tuned_model))
            self.m.state.save()
        finished = {side: self._wait(eval_id, run_id) for side, (eval_id, run_id) in runs.items()}
        report.hosted = _score(finished["hosted"])
        report.here = _score(finished["here"])
        eval_id, run_id = runs["here"]
        report.agreement = self._agreement(eval_id, run_id, hosted)

    def _hosted_answers(
        self, job: Any, items: list[dict[str, Any]], answers: list[str]
    ) -> list[str]:
        with self.m.progress(len(items), f"asking {job.fine_tuned_model}") as bar:
            for item in items[len(answers) :]:
                answers.append(self.m._ask(job.fine_tuned_model, item["input"]))
                self.m.state.save()  # resumable answer by answer
                if bar is not None:
                    bar.update(1)
        return answers

    def _start_runs(self, name: str, items: list[dict[str, Any]], hosted: list[str],
                    model: str) -> dict[str, tuple[str, str]]:  # fmt: skip
        dest = self.m.dest
        ev = dest.evals.create(
            name=f"parity: {name}",
            data_source_config={"type": "custom", "item_schema": PARITY_SCHEMA,
                                "include_sample_schema": True},
            testing_criteria=PARITY_CRITERIA,  # type: ignore[arg-type]
        )  # fmt: skip
        lines = [
            {"item": it, "sample": {"output_text": a}} for it, a in zip(items, hosted, strict=True)
        ]
        uploaded = dest.files.create(file=(f"parity-{name}.jsonl", _jsonl(lines)), purpose="evals")
        source: Any = {"type": "file_id", "id": uploaded.id}
        given = dest.evals.runs.create(ev.id, name="source model",
                                       data_source={"type": "jsonl", "source": source})  # fmt: skip
        asked = dest.evals.runs.create(ev.id, name=model, data_source={
            "type": "completions", "model": model, "source": source,
            "input_messages": {"type": "item_reference", "item_reference": "item.input"},
            "sampling_params": {"temperature": 0, "max_completion_tokens": 512}})  # fmt: skip
        return {"hosted": (ev.id, given.id), "here": (ev.id, asked.id)}

    def _wait(self, eval_id: str, run_id: str) -> Any:
        deadline = time.monotonic() + self.timeout
        while True:
            run = self.m.dest.evals.runs.retrieve(run_id, eval_id=eval_id)
            if run.status in ("completed", "failed", "canceled"):
                if run.status != "completed":
                    raise MigrationError(f"eval run {run_id} {run.status}: {run.error}")
                return run
            if time.monotonic() > deadline:
                raise MigrationError(f"eval run {run_id} still {run.status}; run the report again")
            time.sleep(1.0)

    def _agreement(self, eval_id: str, run_id: str, hosted: list[str]) -> float | None:
        from api.services.text_metrics import similarity

        said = {
            item.datasource_item_id: (item.sample.output[0].content if item.sample.output else "")
            for item in self.m.dest.evals.runs.output_items.list(run_id, eval_id=eval_id, limit=100)
        }
        alike = [similarity(said[i] or "", hosted[i], metric="fuzzy_match") >= 0.8 for i in said]
        return sum(alike) / len(alike) if alike else None


def _jsonl(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()


def _score(run: Any) -> float | None:
    counts = run.result_counts
    return counts.passed / counts.total if counts.total else None


def parity_table(reports: list[Parity]) -> Iterator[str]:
    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.0f}%"

    yield "source job\tadapter\tprompts\tsource model\there\tanswer alike"
    for r in reports:
        if r.problem:
            yield f"{r.source_job}\t{r.adapter}\t-\t-\t-\tno report: {r.problem}"
        else:
            yield (f"{r.source_job}\t{r.adapter}\t{r.items} ({r.on})\t{pct(r.hosted)}\t"
                   f"{pct(r.here)}\t{pct(r.agreement)}")  # fmt: skip
