"""Model-name resolution: (tenant, `model`) -> the base model or one adapter version.

    a registered base model name        -> the base model
    an adapter name (the job's suffix)  -> its production version, or its canary by share
    an exact `ft:...` id the tenant owns -> that version (candidate, staging or production)
    `<ft id>:ckpt-step-N`, a job's checkpoint -> that checkpoint's adapter, as OpenAI serves
                                           its `fine_tuned_model_checkpoint` names
    an alias of an adapter (api/services/aliases.py) -> as the adapter's name

Anything else, another tenant's names included, is `model_not_found` with one message
shape, so a name's existence in another tenant cannot be probed; its "Did you mean ...?"
is drawn from the caller's own names and the base models only.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from sqlmodel import Session, col, select

from api.errors import InvalidRequest, NotFound
from api.models.adapters import Adapter, AdapterVersion, ModelAlias
from api.models.jobs import Job, JobCheckpoint
from api.models.tenants import Tenant
from api.services.suggest import did_you_mean
from api.settings import Settings

SERVABLE_BY_ID = ("candidate", "staging", "production")
# A job's `ft:` name (its last field: the job id's first characters) and a step.
CHECKPOINT_RE = re.compile(r"^(ft:.+:([0-9a-f]{8})):ckpt-step-([0-9]{1,9})$")


@dataclass(frozen=True)
class Resolution:
    requested: str
    base_model: str
    version: AdapterVersion | None = None  # None: the base model itself
    canary: bool = False
    # By name, answered by production: the version a share is mirrored to (shadow traffic).
    shadow: AdapterVersion | None = None
    shadow_percent: int = 0
    adapter_id: str | None = None


def model_not_found(model: str, *, hint: str = "") -> NotFound:
    """`hint`: a "Did you mean ...?" drawn from the caller's own names only."""
    return NotFound(
        f"The model '{model}' does not exist or you do not have access to it.{hint}",
        param="model",
        code="model_not_found",
    )


def own_model_names(session: Session, settings: Settings, *, tenant_id: str) -> list[str]:
    """Every `model` this tenant may name: the base models, its adapters, its versions' ids."""
    names = list(settings.registered_base_models())
    names += session.exec(select(Adapter.name).where(Adapter.tenant_id == tenant_id)).all()
    names += session.exec(select(ModelAlias.alias).where(ModelAlias.tenant_id == tenant_id)).all()
    names += session.exec(
        select(AdapterVersion.fine_tuned_model).where(
            AdapterVersion.tenant_id == tenant_id, col(AdapterVersion.stage).in_(SERVABLE_BY_ID)
        )
    ).all()
    return names


def _by_id(session: Session, *, tenant_id: str, model: str) -> Resolution | None:
    version = session.exec(
        select(AdapterVersion).where(
            AdapterVersion.fine_tuned_model == model, AdapterVersion.tenant_id == tenant_id
        )
    ).first()
    if version is None:
        return None
    if version.stage not in SERVABLE_BY_ID:
        why = f": {version.stage_reason}" if version.stage_reason else ""
        raise InvalidRequest(
            f"The model '{model}' is {version.stage} and cannot be served{why}",
            param="model",
            code="model_not_servable",
        )
    return Resolution(requested=model, base_model=version.base_model, version=version)


def checkpoint_model_name(job: Job, tenant: Tenant, step: int) -> str:
    """A checkpoint's `fine_tuned_model_checkpoint`: its job's `ft:` name and the step."""
    from api.services.jobs import fine_tuned_model_name  # jobs imports this module

    return f"{fine_tuned_model_name(job, tenant)}:ckpt-step-{step}"


def _by_checkpoint(session: Session, *, tenant_id: str, model: str) -> Resolution | None:
    """A checkpoint, served like a version of its own: the adapter files it holds, verified
    as any version's are. It is not in the registry (no stage, no promotion)."""
    match = CHECKPOINT_RE.match(model)
    tenant = session.get(Tenant, tenant_id)
    if match is None or tenant is None:
        return None
    _, short, step = match.groups()
    candidates = session.exec(
        select(Job).where(Job.tenant_id == tenant_id, col(Job.id).startswith(f"ftjob-{short}"))
    ).all()
    job = next(
        (j for j in candidates if checkpoint_model_name(j, tenant, int(step)) == model), None
    )
    if job is None:
        return None
    ckpt = session.exec(
        select(JobCheckpoint).where(
            JobCheckpoint.job_id == job.id, JobCheckpoint.step_number == int(step)
        )
    ).first()
    if ckpt is None:
        return None
    if not ckpt.files:
        raise InvalidRequest(
            f"The checkpoint '{model}' was recorded before checkpoints could be served",
            param="model",
            code="model_not_servable",
        )
    # Never added to a session: a view of the checkpoint in the shape serving takes.
    version = AdapterVersion(
        id=ckpt.id,
        adapter_id="",
        tenant_id=tenant_id,
        version=0,
        job_id=job.id,
        fine_tuned_model=model,
        base_model=job.model,
        storage_prefix=ckpt.storage_prefix,
        files=ckpt.files,
        size_bytes=sum(int(f["size"]) for f in ckpt.files.values()),
        rank=int((job.config or {}).get("lora_r") or 0),
        target_modules=[],
        lineage={"checkpoint": ckpt.id, "step": ckpt.step_number, "job": job.id},
        stage="candidate",
    )
    return Resolution(requested=model, base_model=job.model, version=version)


def _by_name(
    session: Session, *, tenant_id: str, model: str, rng: random.Random | None
) -> Resolution | None:
    adapter = session.exec(
        select(Adapter).where(Adapter.tenant_id == tenant_id, Adapter.name == model)
    ).first()
    if adapter is None:
        alias = session.exec(
            select(ModelAlias).where(ModelAlias.tenant_id == tenant_id, ModelAlias.alias == model)
        ).first()
        adapter = (
            session.exec(
                select(Adapter).where(
                    Adapter.tenant_id == tenant_id, Adapter.name == alias.adapter_name
                )
            ).first()
            if alias
            else None
        )
        if alias and adapter is None:
            raise NotFound(
                f"The model '{model}' is an alias of your adapter '{alias.adapter_name}', "
                "which has no version yet (its fine-tuning job has not succeeded).",
                param="model",
                code="model_not_found",
            )
    if adapter is None:
        return None
    if adapter.canary_version_id and rng and rng.random() * 100 < adapter.canary_percent:
        canary = session.get(AdapterVersion, adapter.canary_version_id)
        if canary is not None:
            return Resolution(
                requested=model, base_model=canary.base_model, version=canary, canary=True
            )
    production = session.exec(
        select(AdapterVersion).where(
            AdapterVersion.adapter_id == adapter.id, AdapterVersion.stage == "production"
        )
    ).first()
    if production is None:
        raise NotFound(
            f"The adapter '{model}' has no production version yet; call a version "
            "by its fine_tuned_model id, or ask an admin to promote one.",
            param="model",
            code="model_not_found",
        )
    shadow = (
        session.get(AdapterVersion, adapter.shadow_version_id)
        if adapter.shadow_version_id and adapter.shadow_percent
        else None
    )
    return Resolution(requested=model, base_model=production.base_model, version=production,
                      shadow=shadow, shadow_percent=adapter.shadow_percent if shadow else 0,
                      adapter_id=adapter.id)  # fmt: skip


def resolve_model(
    session: Session,
    settings: Settings,
    *,
    tenant_id: str,
    model: str,
    rng: random.Random | None = None,
    canary: bool = True,
) -> Resolution:
    """`canary=False`: an adapter name is its production version, never a canary draw."""
    if model in settings.registered_base_models():
        return Resolution(requested=model, base_model=model)
    draw = (rng or random.Random()) if canary else None
    found = None
    if model.startswith("ft:"):
        found = _by_id(session, tenant_id=tenant_id, model=model) or _by_checkpoint(
            session, tenant_id=tenant_id, model=model
        )
    # A name, or an alias (a hosted model's old ft: id among them).
    found = found or _by_name(session, tenant_id=tenant_id, model=model, rng=draw)
    if found is None:
        names = own_model_names(session, settings, tenant_id=tenant_id)
        raise model_not_found(model, hint=did_you_mean(model, names))
    return found
