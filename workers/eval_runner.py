"""One eval run on an eval worker: row -> items -> gateway -> graders -> output items -> row.

Samples and judges are generated through the serving gateway (`LORAPLEX_GATEWAY_URL`), as
the tenant: the run holds a key of its own for the tenant, revoked when it ends, so its
traffic is the tenant's in usage, rate limits and isolation like any client's. A judge named
in `LORAPLEX_EVAL_JUDGE_MODELS` is asked at `LORAPLEX_EVAL_JUDGE_BASE_URL` instead.

A redelivered run (its worker died) keeps the items already graded and goes on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import httpx
from sqlmodel import Session, select

from api.db import get_engine, utcnow
from api.models.adapters import AdapterVersion
from api.models.evals import RUN_ACTIVE, Eval, EvalOutputItem, EvalRun
from api.services import eval_runs, graders, tenants
from api.settings import Settings
from api.storage import ArtifactStore

log = logging.getLogger(__name__)
RETRY_STATUSES = (429, 502, 503, 504)
MAX_WAIT = 600.0  # seconds a request may wait out 429/503s before the item errors
JUDGE_MAX_TOKENS = 16
HEARTBEAT_SECONDS = 5.0  # progress and liveness written this often while a run grades


class GatewayError(Exception):
    """A request the gateway (or the judge endpoint) answered with an error."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


class Chat:
    """Chat completions against one OpenAI-compatible base URL, waiting out 429/503."""

    def __init__(self, base_url: str, *, key: str, timeout: float) -> None:
        self.client = httpx.Client(
            base_url=base_url.rstrip("/"),
            headers={"Authorization": f"Bearer {key}"},
            timeout=timeout,
        )
        self.usage: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self._lock = threading.Lock()
        self.unreachable = threading.Event()  # one request gave up: the others stop too

    def complete(self, *, model: str, messages: list[dict[str, str]], **params: Any) -> dict:
        body = {"model": model, "messages": messages, **params}
        deadline = time.monotonic() + MAX_WAIT
        while True:
            if self.unreachable.is_set():
                raise GatewayError("gateway_unavailable", "The gateway is unreachable.")
            try:
                response = self.client.post("/chat/completions", json=body)
            except httpx.HTTPError as e:
                if time.monotonic() > deadline:
                    self.unreachable.set()
                    raise GatewayError("gateway_unavailable", f"Unreachable: {e}") from e
                time.sleep(2.0)
                continue
            if response.status_code in RETRY_STATUSES and time.monotonic() < deadline:
                time.sleep(min(30.0, float(response.headers.get("retry-after") or 2)))
                continue
            if response.status_code != 200:
                raise _gateway_error(response)
            answer: dict = response.json()
            self._count(model, answer.get("usage") or {})
            return answer

    def _count(self, model: str, usage: dict[str, int]) -> None:
        with self._lock:
            totals = self.usage[model]
            totals["invocation_count"] += 1
            for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
                totals[key] += int(usage.get(key) or 0)

    def per_model_usage(self) -> list[dict[str, Any]]:
        return [{"model_name": m, "cached_tokens": 0, **u} for m, u in self.usage.items()]

    def close(self) -> None:
        self.client.close()


def _gateway_error(response: httpx.Response) -> GatewayError:
    try:
        error = response.json()["error"]
        return GatewayError(str(error.get("code") or error.get("type")), str(error["message"]))
    except (ValueError, KeyError, TypeError, AttributeError):
        return GatewayError(f"http_{response.status_code}", response.text[:500])


class RunContext:
    """What grading one item needs: the eval, the run's target model, the endpoints."""

    def __init__(
        self,
        *,
        ev: Eval,
        run: EvalRun,
        target: str,
        chat: Chat,
        judge: Chat | None,
        judge_models: list[str],
    ) -> None:
        self.ev, self.run, self.target = ev, run, target
        self.chat, self.judge, self.judge_models = chat, judge, judge_models

    def judge_for(self, model: str) -> Chat:
        return self.judge if self.judge is not None and model in self.judge_models else self.chat


def _input_messages(ds: dict[str, Any], item: dict[str, Any]) -> list[dict[str, str]]:
    spec = ds["input_messages"]
    if spec["type"] == "template":
        return graders.render_messages(spec["template"], {"item": item})
    value: Any = {"item": item}
    for part in spec["item_reference"].split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if not isinstance(value, list) or not all(
        isinstance(m, dict) and isinstance(m.get("content"), str) for m in value
    ):
        raise GatewayError("invalid_item", f"{spec['item_reference']} is not a list of messages")
    return [{"role": str(m.get("role", "user")), "content": m["content"]} for m in value]


def _generate(rc: RunContext, item: dict[str, Any]) -> dict[str, Any]:
    ds = rc.run.data_source
    sampling = ds["sampling_params"]
    messages = _input_messages(ds, item)
    params = {
        "temperature": sampling.get("temperature", 0.0),
        "max_tokens": sampling.get("max_completion_tokens"),
    }
    for key in ("top_p", "seed"):
        if key in sampling:
            params[key] = sampling[key]
    answer = rc.chat.complete(model=rc.target, messages=messages, **params)
    choice = answer["choices"][0]
    text = choice["message"].get("content") or ""
    return {
        "input": messages,
        "output": [{"role": "assistant", "content": text}],
        "output_text": text,
        "model": ds["model"],
        "finish_reason": choice.get("finish_reason") or "stop",
        "usage": {"cached_tokens": 0, **(answer.get("usage") or {})},
        "error": None,
        "temperature": params["temperature"],
        "max_completion_tokens": params["max_tokens"],
        "top_p": sampling.get("top_p", 1.0),
        "seed": sampling.get("seed", 0),
    }


def _given_sample(entry: dict[str, Any]) -> dict[str, Any]:
    sample = dict(entry.get("sample") or {})
    if "output_text" not in sample:
        choices = sample.get("choices") or []
        first = choices[0] if choices and isinstance(choices[0], dict) else {}
        sample["output_text"] = str((first.get("message") or {}).get("content") or "")
    return sample


def _grade(rc: RunContext, criterion: dict[str, Any], ctx: dict[str, Any]) -> graders.GradeResult:
    if criterion["type"] in ("string_check", "text_similarity"):
        return graders.grade_local(criterion, ctx)
    messages = graders.judge_messages(criterion, ctx)
    params = dict(criterion.get("sampling_params") or {})
    max_tokens = params.pop("max_completions_tokens", None) or JUDGE_MAX_TOKENS
    params = {k: v for k, v in params.items() if k in ("temperature", "top_p", "seed")}
    params.setdefault("temperature", 0.0)
    judge = rc.judge_for(criterion["model"])
    answer = judge.complete(
        model=criterion["model"], messages=messages, max_tokens=max_tokens, **params
    )
    return graders.grade_judgement(criterion, answer["choices"][0]["message"].get("content") or "")


def grade_entry(rc: RunContext, index: int, entry: dict[str, Any]) -> EvalOutputItem:
    item = entry["item"]
    row = EvalOutputItem(
        run_id=rc.run.id,
        eval_id=rc.ev.id,
        tenant_id=rc.run.tenant_id,
        datasource_item_id=index,
        datasource_item=item,
        results=[],
        status="error",
    )
    problem = eval_runs.item_problem(rc.ev, item)
    if problem is not None:
        row.sample = {"error": {"code": "invalid_item", "message": problem}}
        return row
    try:
        if rc.run.data_source["type"] == "completions":
            sample = _generate(rc, item)
        else:
            sample = _given_sample(entry)
        row.sample = sample
        ctx = {"item": item, "sample": sample}
        results = [_grade(rc, c, ctx) for c in rc.ev.testing_criteria]
    except GatewayError as e:
        if e.code == "gateway_unavailable":
            raise  # not this item's fault: the run fails, and says why
        row.sample = {**(row.sample or {}), "error": {"code": e.code, "message": e.message}}
        return row
    row.results = [r.public() for r in results]
    row.status = "pass" if graders.item_passed(results) else "fail"
    return row


# -- the run ------------------------------------------------------------------------------


def _claim(session: Session, run_id: str) -> EvalRun | None:
    run = session.get(EvalRun, run_id)
    if run is None or run.status not in RUN_ACTIVE:
        return None  # deleted, canceled while queued, or already finished
    if run.cancel_requested:
        _finish(session, run, "canceled")
        return None
    run.status, run.attempts = "in_progress", run.attempts + 1
    run.started_at = run.started_at or utcnow()
    run.heartbeat_at = utcnow()
    session.add(run)
    session.commit()
    return run


def _finish(session: Session, run: EvalRun, status: str, error: dict | None = None) -> None:
    eval_runs.summarize(session, run)
    run.status, run.error, run.finished_at = status, error, utcnow()
    session.add(run)
    session.commit()


def _target(session: Session, run: EvalRun) -> str:
    """The model to ask: the version pinned when the run was made, else the name as given."""
    if run.adapter_version_id:
        version = session.get(AdapterVersion, run.adapter_version_id)
        if version is None:
            raise GatewayError("model_not_found", "The adapter version was deleted.")
        return version.fine_tuned_model
    return run.model


def _stop_requested(session: Session, run: EvalRun, *, beat: bool) -> bool:
    """Whether the run was canceled or deleted; `beat`: also record its progress so far
    (result counts while it runs, as OpenAI shows them) and its heartbeat."""
    fresh = session.get(EvalRun, run.id, populate_existing=True)
    if fresh is None or fresh.cancel_requested:
        return True
    if beat:
        eval_runs.summarize(session, fresh)
        fresh.heartbeat_at = utcnow()
        session.add(fresh)
        session.commit()
    return False


def run_eval(run_id: str, *, settings: Settings, stopping: threading.Event) -> str:
    """Run (or go on with) one eval run; returns what became of it."""
    with Session(get_engine(settings.database_url), expire_on_commit=False) as session:
        run = _claim(session, run_id)
        if run is None:
            return "skipped"
        ev = session.get(Eval, run.eval_id)
        assert ev is not None  # deleting an eval deletes its runs
        if not settings.gateway_url:
            _finish(
                session,
                run,
                "failed",
                {
                    "code": "gateway_unavailable",
                    "message": "No serving gateway is configured for eval runs "
                    "(LORAPLEX_GATEWAY_URL).",
                },
            )
            return "failed"
        key, raw_key = tenants.create_key(
            session, tenant_id=run.tenant_id, name=f"eval run {run.id}"
        )
        session.commit()
        chat = Chat(settings.gateway_url, key=raw_key, timeout=settings.serving_request_timeout)
        judge = (
            Chat(
                settings.eval_judge_base_url,
                key=settings.eval_judge_api_key,
                timeout=settings.serving_request_timeout,
            )
            if settings.eval_judge_base_url
            else None
        )
        try:
            rc = RunContext(
                ev=ev,
                run=run,
                target=_target(session, run),
                chat=chat,
                judge=judge,
                judge_models=settings.eval_judge_models,
            )
            outcome = _grade_all(session, rc, settings=settings, stopping=stopping)
        except GatewayError as e:
            _finish(session, run, "failed", {"code": e.code, "message": e.message})
            outcome = "failed"
        finally:
            chat.close()
            if judge is not None:
                judge.close()
            tenants.revoke_key(session, key_id=key.id)
            session.commit()
        return outcome


def _grade_all(
    session: Session, rc: RunContext, *, settings: Settings, stopping: threading.Event
) -> str:
    run = rc.run
    done = eval_runs.done_items(session, run.id)
    store = ArtifactStore(settings.storage_url)
    pending: list[Future[EvalOutputItem]] = []
    last_beat = time.monotonic()
    with ThreadPoolExecutor(settings.eval_concurrency, thread_name_prefix="eval") as pool:
        for index, entry in enumerate(
            eval_runs.entries(run, session=session, store=store, max_items=settings.eval_max_items)
        ):
            if index in done:
                continue
            pending.append(pool.submit(grade_entry, rc, index, entry))
            if len(pending) >= settings.eval_concurrency:
                eval_runs.record_item(session, pending.pop(0).result())
                beat = time.monotonic() - last_beat > HEARTBEAT_SECONDS
                last_beat = time.monotonic() if beat else last_beat
                if _stop_requested(session, run, beat=beat) or stopping.is_set():
                    break
        for future in pending:
            eval_runs.record_item(session, future.result())
    fresh = session.get(EvalRun, run.id, populate_existing=True)
    if fresh is None:
        return "deleted"  # its eval or the run itself was deleted meanwhile
    run = fresh
    run.usage = rc.chat.per_model_usage()
    if run.cancel_requested:
        _finish(session, run, "canceled")
        return "canceled"
    if stopping.is_set():  # handed back: the next delivery goes on from here
        eval_runs.summarize(session, run)
        session.commit()
        return "interrupted"
    _finish(session, run, "completed")
    if run.adapter_version_id:  # a canary's score may now cross its guard's threshold
        from api.models.adapters import Adapter
        from api.services.eval_policy import check_canaries

        canaries = session.exec(
            select(Adapter.id).where(Adapter.canary_version_id == run.adapter_version_id)
        ).all()
        if canaries:
            check_canaries(session, adapter_ids=list(canaries))
    return "completed"
