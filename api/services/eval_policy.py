"""Evidence-based promotion: evals attached to adapters, A/B runs, the policy gate, the
guarded canary.

    a fine-tune with a validation file -> an eval attached to its adapter (its chat lines:
        `input` the prompt, `ideal` the answer; graded by fuzzy match with the answer); with
        none but a `validation_split`, the split held out, for an adapter with no eval yet
    every new version of an adapter with attached evals -> a run of each on the candidate,
        and on production and the base where they have none yet (A/B against production)
    policy.promotion {eval_id, min_margin, min_score} -> production needs the candidate's
        latest completed run >= production's + min_margin (and >= min_score); a refusal
        names the figures; `force` passes, audited with them
    policy.canary_guard -> a running canary is aborted on its own (audited, with the
        figures) when its error rate, latency p95 or eval score crosses the thresholds

A run's score is the share of its items that passed every criterion (errors count as fails).
"""

from __future__ import annotations

import json
import logging
from datetime import timedelta
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import or_
from sqlmodel import Session, col, select

from api.db import aware, utcnow
from api.errors import Conflict, NotFound
from api.models.adapters import Adapter, AdapterVersion, ModelAlias
from api.models.evals import RUN_ACTIVE, Eval, EvalOutputItem, EvalRun
from api.models.usage import UsageRecord
from api.services import eval_runs
from api.services.promotion import production_version

log = logging.getLogger(__name__)
GUARD_ACTOR = "system:canary-guard"
GUARD_MAX_ROWS = 10_000  # the newest requests per side a guard check reads
VALIDATION_CRITERIA: list[dict[str, Any]] = [
    {
        "type": "text_similarity",
        "name": "matches the reference",
        "input": "{{sample.output_text}}",
        "reference": "{{item.ideal}}",
        "evaluation_metric": "fuzzy_match",
        "pass_threshold": 0.8,
    }
]
DEFAULT_MAX_TOKENS = 128  # an attached file's runs, when its answers were not measured
VALIDATION_SCHEMA = {
    "type": "object",
    "properties": {"input": {"type": "array"}, "ideal": {"type": "string"}},
    "required": ["input", "ideal"],
}


class PromotionPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")
    eval_id: str = Field(max_length=64, description="The tenant's eval production reads.")
    min_margin: float = Field(
        0.0, ge=-1, le=1, description="Candidate score - production score must reach this."
    )
    min_score: float | None = Field(None, ge=0, le=1, description="An absolute floor.")


class CanaryGuard(BaseModel):
    model_config = ConfigDict(extra="forbid")
    min_requests: int = Field(20, ge=1, le=100_000, description="Per side, before comparing.")
    max_error_rate_increase: float | None = Field(0.05, ge=0, le=1)
    max_latency_p95_ratio: float | None = Field(2.0, gt=0, le=100)
    max_score_drop: float | None = Field(
        0.05, ge=0, le=1, description="Canary eval score below production's by more aborts."
    )
    eval_id: str | None = Field(None, max_length=64, description="Default: the policy's.")
    min_shadow_agreement: float | None = Field(
        None, ge=0, le=1, description="Shadow pairs of the canary agreeing with production."
    )
    min_shadow_samples: int = Field(20, ge=1, le=100_000)
    window_seconds: int = Field(900, ge=10, le=7 * 24 * 3600)


class Policy(BaseModel):
    model_config = ConfigDict(extra="forbid")
    promotion: PromotionPolicy | None = None
    canary_guard: CanaryGuard | None = None


# -- runs on versions ---------------------------------------------------------------------


def latest_run(
    session: Session, *, eval_id: str, version: AdapterVersion | None, base_model: str = ""
) -> EvalRun | None:
    """The latest completed run of the eval on a version (None: on the base model)."""
    query = select(EvalRun).where(EvalRun.eval_id == eval_id, EvalRun.status == "completed")
    if version is not None:
        query = query.where(EvalRun.adapter_version_id == version.id)
    else:
        query = query.where(col(EvalRun.adapter_version_id).is_(None), EvalRun.model == base_model)
    return session.exec(query.order_by(col(EvalRun.created_at).desc())).first()


def _has_run(session: Session, ev: Eval, *, version_id: str | None, model: str) -> bool:
    query = select(EvalRun.id).where(
        EvalRun.eval_id == ev.id,
        col(EvalRun.status).in_((*RUN_ACTIVE, "completed")),
        EvalRun.adapter_version_id == version_id,
    )
    if version_id is None:
        query = query.where(EvalRun.model == model)
    return session.exec(query).first() is not None


def _template_source(session: Session, ev: Eval) -> dict[str, Any] | None:
    """The data source a new run of `ev` uses: its attached file, else its latest
    completions run's, model aside."""
    meta = ev.eval_metadata or {}
    if meta.get("file_id"):
        budget = meta.get("max_completion_tokens", "")
        return {
            "type": "completions",
            "source": {"type": "file_id", "id": meta["file_id"]},
            "input_messages": {"type": "item_reference", "item_reference": "item.input"},
            "sampling_params": {
                "temperature": 0.0,
                "max_completion_tokens": int(budget) if budget.isdigit() else DEFAULT_MAX_TOKENS,
            },
        }
    last = session.exec(
        select(EvalRun).where(EvalRun.eval_id == ev.id).order_by(col(EvalRun.created_at).desc())
    ).first()
    return dict(last.data_source) if last and last.data_source["type"] == "completions" else None


def new_run(
    session: Session, ev: Eval, *, model: str, version: AdapterVersion | None, name: str
) -> EvalRun | None:
    """A run of `ev` on a version (or the base `model`); added, not committed."""
    source = _template_source(session, ev)
    if source is None:
        return None
    run = EvalRun(
        eval_id=ev.id,
        tenant_id=ev.tenant_id,
        name=name,
        model=model,
        adapter_version_id=version.id if version else None,
        data_source={**source, "model": model},
        result_counts=eval_runs.counts([]),
    )
    session.add(run)
    return run


def answer_budget(content: bytes) -> int:
    """`max_completion_tokens` for a file's runs: room for its longest reference answer
    (~2 characters a token, generously) and no more, so a base model that rambles stops
    soon after; 32-512 (DEFAULT_MAX_TOKENS when the file has no chat answers)."""
    longest = 0
    for line in content.splitlines():
        try:
            messages = json.loads(line).get("messages") or []
            last = messages[-1]
        except (ValueError, AttributeError, IndexError, TypeError):
            continue
        if isinstance(last, dict) and isinstance(last.get("content"), str):
            longest = max(longest, len(last["content"]))
    return max(32, min(512, longest // 2 + 16)) if longest else DEFAULT_MAX_TOKENS


def attach_file_eval(
    session: Session,
    adapter: Adapter,
    *,
    file_id: str,
    source: str,
    what: str,
    max_tokens: int = DEFAULT_MAX_TOKENS,
) -> Eval:
    """The adapter's eval over one file of chat examples (made once per file): `what` says
    which ("validation file", "held-out split"), `source` the job it came from; its runs
    generate at most `max_tokens` (`answer_budget` of the file)."""
    for ev in attached_evals(session, adapter):
        if (ev.eval_metadata or {}).get("file_id") == file_id:
            return ev
    ev = Eval(
        tenant_id=adapter.tenant_id,
        name=f"{adapter.name}: {what}",
        data_source_config={
            "type": "custom",
            "schema": {
                "type": "object",
                "properties": {"item": VALIDATION_SCHEMA},
                "required": ["item"],
            },
        },
        testing_criteria=VALIDATION_CRITERIA,
        eval_metadata={
            "file_id": file_id,
            "source": source,
            "max_completion_tokens": str(max_tokens),
        },
        adapter_name=adapter.name,
    )
    session.add(ev)
    session.flush()
    return ev


def attached_evals(session: Session, adapter: Adapter) -> list[Eval]:
    """The evals attached to the adapter (validation files, held-out splits), oldest first."""
    query = select(Eval).where(
        Eval.tenant_id == adapter.tenant_id, Eval.adapter_name == adapter.name
    )
    return list(session.exec(query.order_by(col(Eval.created_at))))


def runs_for_new_version(session: Session, version: AdapterVersion) -> list[EvalRun]:
    """A/B: each attached eval on the candidate, and on production and the base where they
    have no run yet. Added, not committed."""
    adapter = session.get(Adapter, version.adapter_id)
    assert adapter is not None
    production = production_version(session, adapter)
    runs: list[EvalRun] = []
    for ev in attached_evals(session, adapter):
        targets: list[tuple[str, AdapterVersion | None, str]] = [
            (version.fine_tuned_model, version, f"v{version.version} (candidate)")
        ]
        if production is not None and production.id != version.id:
            targets.append((production.fine_tuned_model, production,
                            f"v{production.version} (production)"))  # fmt: skip
        targets.append((version.base_model, None, f"{version.base_model} (base)"))
        for model, target, name in targets:
            if target is not version and _has_run(
                session, ev, version_id=target.id if target else None, model=model
            ):
                continue
            run = new_run(session, ev, model=model, version=target, name=name)
            if run is not None:
                runs.append(run)
    return runs


# -- the comparison the registry shows ------------------------------------------------------


def evals_of(session: Session, *, adapter: Adapter, version: AdapterVersion) -> list[Eval]:
    """The evals attached to the adapter, then those run on the version, oldest first."""
    run_on = select(EvalRun.eval_id).where(EvalRun.adapter_version_id == version.id)
    query = select(Eval).where(
        Eval.tenant_id == adapter.tenant_id,
        or_(col(Eval.adapter_name) == adapter.name, col(Eval.id).in_(run_on)),
    )
    return list(session.exec(query.order_by(col(Eval.created_at))))


def run_summary(run: EvalRun | None) -> dict[str, Any] | None:
    if run is None:
        return None
    return {"run_id": run.id, "score": eval_runs.score(run), "result_counts": run.result_counts}


def _statuses(session: Session, run: EvalRun | None) -> dict[int, EvalOutputItem]:
    if run is None:
        return {}
    rows = session.exec(select(EvalOutputItem).where(EvalOutputItem.run_id == run.id))
    return {r.datasource_item_id: r for r in rows}


def _answer(row: EvalOutputItem | None) -> str | None:
    return None if row is None else (row.sample or {}).get("output_text")


def compare(
    session: Session, *, ev: Eval, version: AdapterVersion, diff_limit: int = 50
) -> dict[str, Any]:
    """The version beside production and the base on one eval, with the items it newly
    fails and newly passes against production (the base, when there is no production)."""
    adapter = session.get(Adapter, version.adapter_id)
    assert adapter is not None
    production = production_version(session, adapter)
    mine = latest_run(session, eval_id=ev.id, version=version)
    prod = latest_run(session, eval_id=ev.id, version=production) if production else None
    base = latest_run(session, eval_id=ev.id, version=None, base_model=version.base_model)
    reference = prod or base
    ours, theirs = _statuses(session, mine), _statuses(session, reference)
    newly_failing, newly_passing = [], []
    for index in sorted(set(ours) & set(theirs)):
        a, b = ours[index], theirs[index]
        entry = {"datasource_item_id": index, "item": a.datasource_item,
                 "output": _answer(a), "reference_output": _answer(b)}  # fmt: skip
        if a.status != "pass" and b.status == "pass":
            newly_failing.append(entry)
        elif a.status == "pass" and b.status != "pass":
            newly_passing.append(entry)
    return {
        "eval_id": ev.id,
        "eval_name": ev.name,
        "version": version.version,
        "candidate": run_summary(mine),
        "production": {**(run_summary(prod) or {}), "version": production.version}
        if production and prod
        else None,
        "base": run_summary(base),
        "compared_with": "production" if prod else ("base" if base else None),
        "newly_failing": newly_failing[:diff_limit],
        "newly_passing": newly_passing[:diff_limit],
        "newly_failing_count": len(newly_failing),
        "newly_passing_count": len(newly_passing),
    }


# -- the promotion gate ---------------------------------------------------------------------


def promotion_problem(
    session: Session, adapter: Adapter, version: AdapterVersion
) -> tuple[str | None, dict[str, Any] | None]:
    """(why production is refused or None, the figures read): the adapter's policy."""
    rule = (adapter.policy or {}).get("promotion")
    if not rule:
        return None, None
    policy = PromotionPolicy.model_validate(rule)
    ev = session.get(Eval, policy.eval_id)
    if ev is None or ev.tenant_id != adapter.tenant_id:
        return f"the policy's eval {policy.eval_id} no longer exists", None
    mine = latest_run(session, eval_id=ev.id, version=version)
    production = production_version(session, adapter)
    prod = latest_run(session, eval_id=ev.id, version=production) if production else None
    evidence = {"eval_id": ev.id, "candidate": run_summary(mine), "production": run_summary(prod),
                "min_margin": policy.min_margin, "min_score": policy.min_score}  # fmt: skip
    score = eval_runs.score(mine) if mine else None
    if score is None:
        return (f"version {version.version} has no completed run of eval {ev.id} "
                f"({ev.name!r}); run it first", evidence)  # fmt: skip
    if policy.min_score is not None and score < policy.min_score:
        return (f"eval {ev.id} scores {score:.3f} on version {version.version}, below the "
                f"policy's minimum {policy.min_score:.3f}", evidence)  # fmt: skip
    prod_score = eval_runs.score(prod) if prod else None
    if production is not None and prod_score is None:
        return (f"production (version {production.version}) has no completed run of eval "
                f"{ev.id} to compare with; run it first", evidence)  # fmt: skip
    if prod_score is not None and score < prod_score + policy.min_margin:
        return (f"eval {ev.id} scores {score:.3f} on version {version.version} against "
                f"{prod_score:.3f} for production (version {production.version}, "  # type: ignore[union-attr]
                f"margin required {policy.min_margin:+.3f})", evidence)  # fmt: skip
    return None, evidence


# -- the guarded canary ---------------------------------------------------------------------


def _traffic(
    session: Session, version_id: str, *, names: list[str], since: Any
) -> tuple[int, float, float]:
    """(requests, error rate, latency p95 ms) of a version's by-name traffic since `since`:
    requests that named the adapter (or an alias), as the split between the two versions
    sends them; calls by a pinned `ft:` id (eval runs among them) are other traffic."""
    rows = session.exec(
        select(UsageRecord.status_code, UsageRecord.latency_ms)
        .where(
            UsageRecord.adapter_version_id == version_id,
            UsageRecord.created_at >= since,
            col(UsageRecord.model).in_(names),
        )
        .order_by(col(UsageRecord.created_at).desc())
        .limit(GUARD_MAX_ROWS)  # every gateway checks every few seconds: bounded work
    ).all()
    if not rows:
        return 0, 0.0, 0.0
    errors = sum(1 for status, _ in rows if status >= 500)
    latencies = sorted(float(ms) for status, ms in rows if status < 400)
    p95 = latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))] if latencies else 0.0
    return len(rows), errors / len(rows), p95


def guard_verdict(session: Session, adapter: Adapter) -> tuple[str | None, dict[str, Any]]:
    """(why the running canary must stop or None, the figures compared)."""
    guard = CanaryGuard.model_validate((adapter.policy or {}).get("canary_guard") or {})
    canary = session.get(AdapterVersion, adapter.canary_version_id or "")
    production = production_version(session, adapter)
    if canary is None or production is None:
        return None, {}
    started = aware(adapter.canary_started_at or utcnow())
    since = max(started, utcnow() - timedelta(seconds=guard.window_seconds))
    aliases = select(ModelAlias.alias).where(
        ModelAlias.tenant_id == adapter.tenant_id, ModelAlias.adapter_name == adapter.name
    )
    names = [adapter.name, *session.exec(aliases).all()]
    n_c, err_c, p95_c = _traffic(session, canary.id, names=names, since=since)
    n_p, err_p, p95_p = _traffic(session, production.id, names=names, since=since)
    figures: dict[str, Any] = {
        "canary": {"version": canary.version, "requests": n_c, "error_rate": err_c,
                   "latency_p95_ms": p95_c},
        "production": {"version": production.version, "requests": n_p, "error_rate": err_p,
                       "latency_p95_ms": p95_p},
    }  # fmt: skip
    eval_id = guard.eval_id or ((adapter.policy or {}).get("promotion") or {}).get("eval_id")
    if eval_id and guard.max_score_drop is not None:
        mine = latest_run(session, eval_id=eval_id, version=canary)
        prod = latest_run(session, eval_id=eval_id, version=production)
        s_c, s_p = (
            (eval_runs.score(mine) if mine else None),
            (eval_runs.score(prod) if prod else None),
        )
        figures["canary"]["eval_score"], figures["production"]["eval_score"] = s_c, s_p
        if s_c is not None and s_p is not None and s_c < s_p - guard.max_score_drop:
            return (f"eval {eval_id} scores {s_c:.3f} on the canary against {s_p:.3f} on "
                    f"production (allowed drop {guard.max_score_drop:.3f})", figures)  # fmt: skip
    if guard.min_shadow_agreement is not None:
        from api.services.shadow import summary

        pairs = summary(session, version_id=canary.id, since=since)
        figures["canary"]["shadow"] = pairs
        agreement = pairs["agreement"]
        if (pairs["samples"] >= guard.min_shadow_samples and agreement is not None
                and agreement < guard.min_shadow_agreement):  # fmt: skip
            return (f"shadow agreement with production {agreement:.3f} over "
                    f"{pairs['samples']} pairs, below {guard.min_shadow_agreement:.3f}",
                    figures)  # fmt: skip
    if min(n_c, n_p) < guard.min_requests:
        return None, figures
    limit = guard.max_error_rate_increase
    if limit is not None and err_c > err_p + limit:
        return (f"error rate {err_c:.3f} on the canary against {err_p:.3f} on production "
                f"(allowed increase {limit:.3f})", figures)  # fmt: skip
    ratio = guard.max_latency_p95_ratio
    if ratio is not None and p95_p > 0 and p95_c > p95_p * ratio:
        return (f"latency p95 {p95_c:.0f} ms on the canary against {p95_p:.0f} ms on "
                f"production (allowed ratio {ratio:.2f})", figures)  # fmt: skip
    return None, figures


def check_canaries(session: Session, *, adapter_ids: list[str] | None = None) -> list[str]:
    """Abort every guarded canary past its thresholds; returns the adapters aborted."""
    from api.services import promotion
    from api.services.tenants import Principal

    query = select(Adapter).where(col(Adapter.canary_version_id).is_not(None))
    if adapter_ids is not None:
        query = query.where(col(Adapter.id).in_(adapter_ids))
    aborted = []
    for adapter in list(session.exec(query)):
        if not (adapter.policy or {}).get("canary_guard"):
            continue
        why, figures = guard_verdict(session, adapter)
        if why is None:
            continue
        system = Principal(key_id=GUARD_ACTOR, tenant_id=None, is_admin=True)
        try:
            promotion.finish_canary(
                session, actor=system, adapter_id=adapter.id, promote=False,
                reason=f"canary guard: {why}", evidence=figures,
            )  # fmt: skip
        except Conflict:  # another gateway aborted it first
            session.rollback()
            continue
        log.warning("aborted the canary of %s: %s", adapter.name, why)
        aborted.append(adapter.id)
    return aborted


def set_policy(session: Session, *, actor: Any, adapter: Adapter, policy: Policy) -> Adapter:
    """Replace the adapter's policy (audited). Its evals must be the adapter's tenant's."""
    from api.services import audit
    from api.services.evals import get_eval

    for eval_id, param in (
        (policy.promotion.eval_id if policy.promotion else None, "promotion.eval_id"),
        (policy.canary_guard.eval_id if policy.canary_guard else None, "canary_guard.eval_id"),
    ):
        if eval_id is not None:
            try:
                get_eval(session, tenant_id=adapter.tenant_id, eval_id=eval_id)
            except NotFound as e:
                raise NotFound(
                    f"The adapter's tenant has no eval with id {eval_id!r}",
                    param=param,
                    code="eval_not_found",
                ) from e
    before = adapter.policy
    adapter.policy = policy.model_dump(exclude_none=True) or None
    session.add(adapter)
    audit.record(
        session,
        actor=actor,
        action="policy.set",
        target_type="adapter",
        target_id=adapter.id,
        tenant_id=adapter.tenant_id,
        before={"policy": before},
        after={"policy": adapter.policy},
    )
    session.commit()
    return adapter
