"""Promotion of adapter versions through stages, canaries, rollback, deletion.

    candidate ──► staging ──► production ──► archived
        │            ▲  │          ▲             │
        └────────────┼──┴──────────┘   (force)   │
                     └───────────────────────────┘
    rejected: incompatible or corrupted; never served, never promoted.

A version that learned nothing measurable (`no_improvement`) reaches production only with
`force`, whatever the promotion gate setting.

One production version per adapter: promotions lock the adapter row, and a unique partial
index on (adapter_id) WHERE stage = 'production' stops anything that slips past the lock.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from api.db import utcnow
from api.errors import Conflict, InvalidRequest, NotFound
from api.models.adapters import STAGES, Adapter, AdapterVersion
from api.services import audit
from api.services.tenants import Principal
from api.storage import ArtifactStore

# (from, to) moves allowed without `force`.
ALLOWED = {
    ("candidate", "staging"),
    ("candidate", "production"),
    ("candidate", "archived"),
    ("staging", "production"),
    ("staging", "archived"),
    ("staging", "candidate"),
    ("production", "staging"),
    ("production", "archived"),
    ("archived", "staging"),
    ("archived", "candidate"),
}
CANARY_STAGES = ("candidate", "staging")


def version_state(v: AdapterVersion) -> dict[str, Any]:
    return {"version": v.version, "stage": v.stage, "fine_tuned_model": v.fine_tuned_model}


def adapter_state(a: Adapter, session: Session) -> dict[str, Any]:
    canary = session.get(AdapterVersion, a.canary_version_id) if a.canary_version_id else None
    prod = production_version(session, a)
    return {
        "production": prod.version if prod else None,
        "canary": canary.version if canary else None,
        "canary_percent": a.canary_percent,
    }


def lock_adapter(session: Session, adapter_id: str) -> Adapter:
    adapter = session.exec(
        select(Adapter).where(Adapter.id == adapter_id).with_for_update()
    ).first()
    if adapter is None:
        raise NotFound(
            f"No adapter with id {adapter_id!r}", param="adapter_id", code="adapter_not_found"
        )
    return adapter


def get_version(session: Session, adapter: Adapter, number: int) -> AdapterVersion:
    version = session.exec(
        select(AdapterVersion).where(
            AdapterVersion.adapter_id == adapter.id, AdapterVersion.version == number
        )
    ).first()
    if version is None:
        raise NotFound(
            f"Adapter {adapter.name!r} has no version {number}",
            param="version",
            code="version_not_found",
        )
    return version


def production_version(session: Session, adapter: Adapter) -> AdapterVersion | None:
    return session.exec(
        select(AdapterVersion).where(
            AdapterVersion.adapter_id == adapter.id, AdapterVersion.stage == "production"
        )
    ).first()


def _probe_rate(metrics: dict[str, Any], key: str) -> float | None:
    rate = ((metrics.get(key) or {}).get("train") or {}).get("rate")
    return float(rate) if rate is not None else None


# The probe that says most about what a tenant gets, first: through the serving engine, then
# the trainer's re-probe of a quantized run on the full-precision base, then its own.
AS_SERVED = ("exact_match_served", "exact_match_unquantized")


def _as_served(metrics: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
    """(metrics key, train side) of the most faithful as-served probe, if any."""
    for key in AS_SERVED:
        train = (metrics.get(key) or {}).get("train") or {}
        if train.get("n"):
            return key, train
    return None, {}


def probe_as_served(
    session: Session, *, gateway: Any, adapter_id: str, number: int
) -> dict[str, Any] | None:
    """Run the version's probe through this process's serving engine (serving/validation.py)
    and keep it in its metrics as `exact_match_served`, once; None when this process does
    not serve (a control plane alone), its engine is not ready, or there are no prompts.
    Called from a worker thread of the admin API (anyio runs the probe on the event loop)."""
    if gateway is None or not gateway.engine.ready():
        return None
    from anyio.from_thread import run

    from serving.validation import probe_as_served as run_probe

    version = get_version(session, session.get(Adapter, adapter_id) or _missing(adapter_id), number)
    if version.stage == "rejected" or (version.metrics or {}).get("exact_match_served"):
        return (version.metrics or {}).get("exact_match_served")
    served = run(run_probe, gateway, version)
    if served is not None:
        version.metrics = {**(version.metrics or {}), "exact_match_served": served}
        session.add(version)
        session.commit()
    return served


def _missing(adapter_id: str) -> Adapter:
    raise NotFound(f"No adapter {adapter_id!r}.", param="adapter_id")


# A served probe this far below the trained one means the tenant would not get what it
# trained (2 of 20 answers is noise from batching and dtype; a QLoRA adapter on the
# full-precision base lost 9 of 24).
SERVED_TOLERANCE = 0.1


def gate_problems(version: AdapterVersion) -> list[str]:
    """The promotion gate: production needs a lower eval loss or a better probe score, and
    never a probe score, as served, below the base model's.

    The gate reads the probe as served wherever it exists (AS_SERVED): through the serving
    engine (`exact_match_served`, measured before a promotion by a process that serves), else
    the trainer's re-probe of a QLoRA adapter on the full-precision base; and refuses a
    version that answers as served clearly worse than it did where it was trained (what the
    tenant trained is not what the tenant would get).
    """
    m = version.metrics or {}
    probe_before = _probe_rate(m, "exact_match_before")
    trained = _probe_rate(m, "exact_match_after")
    key, as_served = _as_served(m)
    served = float(as_served["rate"]) if key else None
    probe_after = served if served is not None else trained
    where = "through the serving engine" if key == "exact_match_served" else "as served"
    if served is not None and probe_before is not None and served < probe_before:
        return [f"{where} the exact-match probe is {served}, below the base model's {probe_before}"]
    if served is not None and trained is not None and served < trained - SERVED_TOLERANCE:
        return [
            f"{where} the exact-match probe is {served:.2f}, against {trained:.2f} on the "
            "numerics it was trained on"
        ]
    before, after = m.get("eval_loss_before"), m.get("eval_loss_after")
    if before is not None and after is not None and after < before:
        return []
    if probe_before is not None and probe_after is not None and probe_after > probe_before:
        return []
    margins = preference_margins(m)
    if margins is not None and margins[1] > margins[0]:
        return []
    return [
        f"eval loss {before} -> {after} did not improve and the exact-match probe "
        f"{probe_before} -> {probe_after} did not either"
    ]


def _probe_score(probe: dict[str, Any]) -> str:
    n = int(probe.get("n") or 0)
    exact = probe.get("exact")
    exact = round(float(probe.get("rate") or 0) * n) if exact is None else int(exact)
    return f"{exact}/{n}"


def preference_margins(metrics: dict[str, Any]) -> tuple[float, float] | None:
    """A DPO version's mean log p(preferred) - log p(rejected) on its training pairs, before
    and after training (None for other versions): what DPO optimises, and its evidence."""
    preference = metrics.get("preference") or {}
    before = ((preference.get("margin_before") or {}).get("train") or {}).get("margin")
    after = ((preference.get("margin_after") or {}).get("train") or {}).get("margin")
    if before is None or after is None:
        return None
    return float(before), float(after)


def no_improvement(metrics: dict[str, Any]) -> str | None:
    """Why a version learned nothing measurable (None if it did, or nothing was measured).

    Its exact-match probe on the training prompts, as served (AS_SERVED wherever one
    exists), is no better than the base model's (0/20 -> 0/20), and no held-out eval loss
    went down either. The worker warns when it registers such a version, and promotion to
    production needs `force`, whether the gate is on or not.
    """
    before = (metrics.get("exact_match_before") or {}).get("train") or {}
    _, served = _as_served(metrics)
    after = served or (metrics.get("exact_match_after") or {}).get("train") or {}
    if not before.get("n") or not after.get("n"):
        return None
    loss_before, loss_after = metrics.get("eval_loss_before"), metrics.get("eval_loss_after")
    if loss_before is not None and loss_after is not None and loss_after < loss_before:
        return None
    if float(after.get("rate") or 0) > float(before.get("rate") or 0):
        return None
    margins = preference_margins(metrics)
    if margins is not None and margins[1] > margins[0]:
        return None  # DPO moved probability to the preferred answers: it learned
    where = " as served" if served else ""
    return (
        f"learned nothing measurable: its exact-match probe{where} answered "
        f"{_probe_score(before)} training prompts before training and {_probe_score(after)} "
        "after"
    )


def _commit(session: Session) -> None:
    try:
        session.commit()
    except IntegrityError as e:
        session.rollback()
        raise Conflict(
            "Another promotion of this adapter happened at the same time; reload and try again.",
            code="concurrent_promotion",
            headers={"x-should-retry": "true"},  # a lost race: the retry meets the new state
        ) from e


def _audit_and_commit(
    session: Session,
    *,
    actor: Principal,
    action: str,
    adapter: Adapter,
    before: dict[str, Any],
    reason: str | None,
    evidence: dict[str, Any] | None = None,
) -> None:
    """Record an adapter-level admin action with its before/after, then commit both."""
    after = adapter_state(adapter, session)
    audit.record(
        session,
        actor=actor,
        action=action,
        target_type="adapter",
        target_id=adapter.id,
        tenant_id=adapter.tenant_id,
        before=before,
        after={**after, "evidence": evidence} if evidence else after,
        reason=reason,
    )
    _commit(session)


def _leave_candidacy(adapter: Adapter, version: AdapterVersion) -> None:
    """A version leaving candidate/staging is no canary and no shadow any more (promoted,
    production would be mirrored to itself; archived, rejected or deleted, to a dead end)."""
    if adapter.canary_version_id == version.id:
        adapter.canary_version_id, adapter.canary_percent = None, 0
    if adapter.shadow_version_id == version.id:
        adapter.shadow_version_id, adapter.shadow_percent = None, 0


def _set_stage(session: Session, adapter: Adapter, version: AdapterVersion, stage: str) -> None:
    """Move one version; a new production version archives the old one."""
    if stage == "production":
        current = production_version(session, adapter)
        if current is not None and current.id != version.id:
            current.stage = "archived"
            session.add(current)
            session.flush()  # the old production leaves before the new one arrives
        version.promoted_at = utcnow()
    if stage not in CANARY_STAGES:
        _leave_candidacy(adapter, version)
    version.stage, version.stage_reason = stage, None
    session.add(version)
    session.add(adapter)


def promote(
    session: Session,
    *,
    actor: Principal,
    adapter_id: str,
    number: int,
    stage: str,
    force: bool = False,
    gate: bool = False,
    reason: str | None = None,
) -> AdapterVersion:
    if stage not in STAGES or stage == "rejected":
        raise InvalidRequest(
            "stage must be one of candidate, staging, production, archived", param="stage"
        )
    adapter = lock_adapter(session, adapter_id)
    version = get_version(session, adapter, number)
    before = {**version_state(version), **adapter_state(adapter, session)}
    if version.stage == "rejected":
        raise Conflict(
            f"Version {number} of {adapter.name!r} was rejected "
            f"({version.stage_reason}); it can never be promoted.",
            code="version_rejected",
        )
    if version.stage == stage:
        return version  # idempotent: nothing to do, nothing to audit
    forced = False
    if (version.stage, stage) not in ALLOWED:
        if not force:
            raise Conflict(
                f"Cannot move version {number} from {version.stage} to {stage} without force=true.",
                code="invalid_transition",
            )
        forced = True
    if stage == "production" and gate:
        problems = gate_problems(version)
        if problems and not force:
            raise Conflict(
                f"Promotion gate: {problems[0]}; pass force=true to override.",
                code="promotion_gate_failed",
            )
        forced = forced or bool(problems)
    evidence = None
    if stage == "production":
        from api.services import eval_policy  # it reads production_version from here

        problem, evidence = eval_policy.promotion_problem(session, adapter, version)
        if problem is not None and not force:
            raise Conflict(
                f"Promotion policy: {problem}; pass force=true to override.",
                code="eval_policy_failed",
            )
        forced = forced or problem is not None
    useless = no_improvement(version.metrics or {}) if stage == "production" else None
    if useless is not None:
        if not force:
            raise Conflict(
                f"Version {number} of {adapter.name!r} {useless}. Promoting it to production "
                "needs force=true.",
                code="no_measurable_improvement",
            )
        forced = True
    _set_stage(session, adapter, version, stage)
    audit.record(
        session,
        actor=actor,
        action=f"promote.{stage}",
        target_type="adapter_version",
        target_id=version.fine_tuned_model,
        tenant_id=adapter.tenant_id,
        before=before,
        after={
            **version_state(version),
            **adapter_state(adapter, session),
            **({"evidence": evidence} if evidence else {}),
        },
        forced=forced,
        reason=reason,
    )
    _commit(session)
    return version


def rollback(
    session: Session, *, actor: Principal, adapter_id: str, reason: str | None = None
) -> AdapterVersion:
    """Production goes back to the version that was production before the current one."""
    adapter = lock_adapter(session, adapter_id)
    current = production_version(session, adapter)
    if current is None:
        raise Conflict(
            f"{adapter.name!r} has no production version to roll back.", code="nothing_to_roll_back"
        )
    previous = session.exec(
        select(AdapterVersion)
        .where(
            AdapterVersion.adapter_id == adapter.id,
            AdapterVersion.stage == "archived",
            col(AdapterVersion.promoted_at).is_not(None),
            AdapterVersion.id != current.id,
        )
        .order_by(col(AdapterVersion.promoted_at).desc())
    ).first()
    if previous is None:
        raise Conflict(
            f"{adapter.name!r} has no earlier production version.", code="nothing_to_roll_back"
        )
    before = adapter_state(adapter, session)
    _set_stage(session, adapter, previous, "production")
    _audit_and_commit(
        session, actor=actor, action="rollback", adapter=adapter, before=before, reason=reason
    )
    return previous


def set_canary(
    session: Session,
    *,
    actor: Principal,
    adapter_id: str,
    number: int,
    percent: int,
    reason: str | None = None,
) -> Adapter:
    """Start a canary or change its share (the seed's gradual 5/25/50/100% shift)."""
    if not 0 < percent <= 100:
        raise InvalidRequest("percent must be 1-100", param="percent")
    adapter = lock_adapter(session, adapter_id)
    version = get_version(session, adapter, number)
    if production_version(session, adapter) is None:
        raise Conflict(
            "A canary needs a production version to share traffic with.",
            code="no_production_version",
        )
    if version.stage not in CANARY_STAGES:
        raise Conflict(
            f"Version {number} is {version.stage}; a canary must be a candidate "
            "or staging version.",
            code="invalid_transition",
        )
    if adapter.canary_version_id not in (None, version.id):
        raise Conflict(
            "Another canary is running; promote or abort it first.", code="canary_in_progress"
        )
    before = adapter_state(adapter, session)
    if adapter.canary_version_id != version.id:
        adapter.canary_started_at = utcnow()  # the guard compares traffic from here
    adapter.canary_version_id, adapter.canary_percent = version.id, percent
    session.add(adapter)
    _audit_and_commit(
        session, actor=actor, action="canary.set", adapter=adapter, before=before, reason=reason
    )
    return adapter


def finish_canary(
    session: Session,
    *,
    actor: Principal,
    adapter_id: str,
    promote: bool,
    reason: str | None = None,
    evidence: dict[str, Any] | None = None,
) -> Adapter:
    """Promote the canary to full production, or roll it back, in one call. `evidence`: the
    figures that decided it (the canary guard's), kept in the audit entry."""
    adapter = lock_adapter(session, adapter_id)
    canary = session.get(AdapterVersion, adapter.canary_version_id or "")
    if canary is None:
        raise Conflict(f"{adapter.name!r} has no canary running.", code="no_canary")
    before = adapter_state(adapter, session)
    adapter.canary_version_id, adapter.canary_percent = None, 0
    if promote:
        _set_stage(session, adapter, canary, "production")
    action = "canary.promote" if promote else "canary.abort"
    _audit_and_commit(
        session,
        actor=actor,
        action=action,
        adapter=adapter,
        before=before,
        reason=reason,
        evidence=evidence,
    )
    return adapter


def delete_version(
    session: Session, store: ArtifactStore, *, actor: Principal, adapter_id: str, number: int
) -> None:
    adapter = lock_adapter(session, adapter_id)
    version = get_version(session, adapter, number)
    if version.stage == "production" or adapter.canary_version_id == version.id:
        raise Conflict(
            f"Version {number} is serving traffic ({version.stage}"
            f"{', canary' if adapter.canary_version_id == version.id else ''}); "
            "promote another version first.",
            code="version_in_use",
        )
    _leave_candidacy(adapter, version)
    session.add(adapter)
    audit.record(
        session,
        actor=actor,
        action="version.delete",
        target_type="adapter_version",
        target_id=version.fine_tuned_model,
        tenant_id=adapter.tenant_id,
        before=version_state(version),
    )
    session.delete(version)
    _commit(session)
    store.delete(version.storage_prefix)  # after the row: never a row without bytes


def verify_version(store: ArtifactStore, version: AdapterVersion) -> list[str]:
    """Re-hash every stored file against the registry; the list of mismatches."""
    import hashlib

    problems = []
    for rel, info in sorted(version.files.items()):
        key = f"{version.storage_prefix}/{rel}"
        if not store.exists(key):
            problems.append(f"{rel}: missing from the artifact store")
            continue
        digest = hashlib.sha256()
        for chunk in store.iter_bytes(key):
            digest.update(chunk)
        if digest.hexdigest() != info["sha256"]:
            problems.append(f"{rel}: sha256 does not match the registry")
    return problems


def reject(
    session: Session, *, actor: Principal | None, version: AdapterVersion, problems: list[str]
) -> None:
    """Take a corrupted version out of service for good."""
    adapter = session.get(Adapter, version.adapter_id)
    before = version_state(version)
    version.stage, version.stage_reason = "rejected", "; ".join(problems)
    if adapter is not None:
        _leave_candidacy(adapter, version)
        session.add(adapter)
    session.add(version)
    if actor is not None:
        audit.record(
            session,
            actor=actor,
            action="version.reject",
            target_type="adapter_version",
            target_id=version.fine_tuned_model,
            tenant_id=version.tenant_id,
            before=before,
            after=version_state(version),
            reason=version.stage_reason,
        )
    session.commit()
