"""Fine-tuning jobs, API side: validate and create, list, cancel, events, checkpoints.

Everything that can be wrong with a request is found here, before anything is queued; the
row is committed before the task is sent (the caller enqueues after `create_job` returns).
"""

from __future__ import annotations

import math
import re
import secrets
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import JsonDict
from sqlalchemy import update
from sqlmodel import Session, col, select

from api.db import utcnow
from api.errors import InvalidRequest, NotFound
from api.models.adapters import Adapter, AdapterVersion
from api.models.files import File
from api.models.jobs import ACTIVE, PAUSED, Job, JobCheckpoint, JobEvent
from api.models.tenants import Tenant
from api.services.files import FINE_TUNE
from api.services.limits import (
    check_backlog,
    check_job_quota,
    load_limits,
    planned_training_tokens,
)
from api.services.pagination import page
from api.services.quotas import storage_room
from api.services.resolver import own_model_names, resolve_model
from api.services.suggest import did_you_mean
from api.settings import Settings
from trainer.config import TrainConfig, parse_config, resolve_hyperparameters
from trainer.errors import ConfigError
from trainer.formats import MIN_EXAMPLES, PREFERENCE, SUPERVISED

SUFFIX_RE = re.compile(r"^[a-z0-9-]{1,64}$")
OPENAI_HYPERPARAMETERS = ("n_epochs", "batch_size", "learning_rate_multiplier")
ALIASES = {"r": "lora_r", "alpha": "lora_alpha", "dropout": "lora_dropout"}
DPO_ALIASES = {**ALIASES, "beta": "dpo_beta"}  # OpenAI's name for DPO's beta
# Trainer fields a tenant may set; base model, seed and device come from elsewhere.
# init_adapter is a path on the worker: set only by the worker, from a job's parent version
# (a tenant naming one could start from any directory there, another tenant's included).
# The objective follows `method.type`, and dpo_beta is `method.dpo.hyperparameters.beta`.
TUNABLE = frozenset(TrainConfig.model_fields) - {
    "base_model", "seed", "device", "init_adapter", "objective", "dpo_beta",
}  # fmt: skip
# method.type -> (the trainer's objective, the dataset kind it trains on)
METHODS = {"supervised": ("sft", SUPERVISED), "dpo": ("dpo", PREFERENCE)}
KIND_WORDS = {
    SUPERVISED: "supervised examples (messages, prompt/completion or instruction/output)",
    PREFERENCE: "preference examples (input, preferred_output, non_preferred_output)",
}
MAX_METADATA_PAIRS, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 512
# Checkpoints or evals one job may ask for: each costs an upload or a pass over the data.
MAX_PERIODIC_RUNS = 100


def _hyperparameters_schema(aliases: dict[str, str]) -> JsonDict:
    """What `build_config` accepts, for the OpenAPI schema: the trainer's own field schemas.

    Ranges checked across fields (e.g. n_epochs 1-50, a scheduler without warmup) are the
    trainer's to report; they come back as 400 naming the field.
    """
    fields = TrainConfig.model_json_schema()["properties"]
    names = {**{name: name for name in TUNABLE}, **aliases}
    properties = {key: fields[name] for key, name in sorted(names.items())}
    return {"properties": properties, "additionalProperties": False}


# Documented here, checked by the service (which words the errors as OpenAI does).
DOCUMENTED: dict[str, JsonDict] = {
    "suffix": {"pattern": SUFFIX_RE.pattern},
    "metadata": {
        "maxProperties": MAX_METADATA_PAIRS,
        "propertyNames": {"minLength": 1, "maxLength": MAX_METADATA_KEY},
        "additionalProperties": {"type": "string", "maxLength": MAX_METADATA_VALUE},
    },
    "hyperparameters": _hyperparameters_schema(ALIASES),
    "dpo_hyperparameters": _hyperparameters_schema(DPO_ALIASES),
    "integrations": {"maxItems": 0},
}


class SupervisedMethod(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hyperparameters: dict[str, Any] = Field(
        default_factory=dict, json_schema_extra=DOCUMENTED["hyperparameters"]
    )


class DpoMethod(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hyperparameters: dict[str, Any] = Field(
        default_factory=dict, json_schema_extra=DOCUMENTED["dpo_hyperparameters"]
    )


class Method(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["supervised", "dpo"] = Field(
        description="supervised (chat examples) or dpo (preference pairs); the settings go "
        "under the key of the same name. Reinforcement fine-tuning is not offered."
    )
    supervised: SupervisedMethod | None = None
    dpo: DpoMethod | None = None


class JobRequest(BaseModel):
    """POST /v1/fine_tuning/jobs, as OpenAI defines it, plus Loraplex's LoRA knobs."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1, description="A registered base model name.")
    training_file: str = Field(min_length=1)
    validation_file: str | None = None
    suffix: str | None = Field(
        None,
        description="The adapter's name: 1-64 of [a-z0-9-].",
        json_schema_extra=DOCUMENTED["suffix"],
    )
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    metadata: dict[str, str] | None = Field(None, json_schema_extra=DOCUMENTED["metadata"])
    method: Method | None = None
    hyperparameters: dict[str, Any] | None = Field(
        None,
        description="Deprecated; use method.",
        json_schema_extra=DOCUMENTED["hyperparameters"],
    )
    integrations: list[dict[str, Any]] | None = Field(
        None, description="Not supported.", json_schema_extra=DOCUMENTED["integrations"]
    )


def _fail(message: str, *, param: str, code: str = "invalid_value") -> InvalidRequest:
    return InvalidRequest(message, param=param, code=code)


def check_metadata(meta: dict[str, str] | None) -> None:
    """OpenAI's metadata bounds (16 pairs, keys 1-64, values up to 512 characters)."""
    meta = meta or {}
    if len(meta) > MAX_METADATA_PAIRS:
        raise _fail(f"metadata may hold at most {MAX_METADATA_PAIRS} pairs", param="metadata")
    for key, value in meta.items():
        if not 0 < len(key) <= MAX_METADATA_KEY or len(value) > MAX_METADATA_VALUE:
            raise _fail(
                f"metadata keys are 1-{MAX_METADATA_KEY} characters, values at most "
                f"{MAX_METADATA_VALUE}",
                param=f"metadata.{key}",
            )


def _check_suffix_and_metadata(req: JobRequest) -> None:
    if req.suffix is not None and not SUFFIX_RE.match(req.suffix):
        raise _fail("suffix must be 1-64 characters of a-z, 0-9 and '-'", param="suffix")
    check_metadata(req.metadata)
    if req.integrations:
        raise _fail("integrations are not supported", param="integrations")


def method_type(req: JobRequest) -> str:
    return req.method.type if req.method is not None else "supervised"


def _hyperparameters(req: JobRequest) -> tuple[dict[str, Any], str]:
    """The request's hyperparameters and where they were given; the method's settings must
    sit under the key its `type` names (as OpenAI has it)."""
    if req.method is not None and req.hyperparameters is not None:
        raise _fail("give hyperparameters in method, not both", param="hyperparameters")
    if req.method is None:
        return dict(req.hyperparameters or {}), "hyperparameters"
    kind = req.method.type
    given = [key for key in (*METHODS, *(req.method.model_extra or {})) if key != kind]
    for key in given:
        if key in METHODS and getattr(req.method, key) is None:
            continue
        raise _fail(
            f"method.type is {kind!r}, so its settings go under method.{kind}, not method.{key}",
            param=f"method.{key}",
        )
    block = getattr(req.method, kind)
    return dict(block.hyperparameters if block else {}), f"method.{kind}.hyperparameters"


def build_config(req: JobRequest, *, seed: int, base_model: str | None = None) -> TrainConfig:
    """The trainer config for a request (on `base_model`, default `req.model`); 400 naming
    the first bad field."""
    raw, where = _hyperparameters(req)
    objective, _ = METHODS[method_type(req)]
    aliases = DPO_ALIASES if objective == "dpo" else ALIASES
    values: dict[str, Any] = {}
    for key, value in raw.items():
        name = aliases.get(key, key)
        if key not in aliases and name not in TUNABLE:
            raise _fail(f"unknown hyperparameter {key!r}", param=f"{where}.{key}")
        values[name] = value
    fixed = {"base_model": base_model or req.model, "seed": seed, "objective": objective}
    try:
        return parse_config({**values, **fixed})
    except ConfigError as e:
        # Worded with the name the tenant used: OpenAI's `beta` is the trainer's dpo_beta.
        problems = [re.sub(r"^dpo_beta:", "beta:", problem) for problem in e.problems]
        field = problems[0].split(":", 1)[0]
        raise _fail("; ".join(problems), param=f"{where}.{field}") from e


def _usable_file(
    session: Session, *, tenant_id: str, file_id: str, param: str, min_examples: int, kind: str
) -> File:
    row = session.get(File, file_id)
    code = f"invalid_{param}"
    if row is None or row.tenant_id != tenant_id:
        raise _fail(f"{param} {file_id!r} does not exist", param=param, code=code)
    if row.purpose != FINE_TUNE:
        raise _fail(
            f"{param} {file_id!r} has purpose {row.purpose!r}, not 'fine-tune'",
            param=param,
            code=code,
        )
    if row.status != "processed":
        raise _fail(
            f"{param} {file_id!r} is not usable ({row.status}): {row.status_details}",
            param=param,
            code=code,
        )
    # Files validated before preference data existed have no kind: they are supervised.
    has = (row.stats or {}).get("kind") or SUPERVISED
    if has != kind:
        method = next(name for name, (_, wanted) in METHODS.items() if wanted == kind)
        other = next(name for name, (_, wanted) in METHODS.items() if wanted == has)
        raise _fail(
            f"{param} {file_id!r} holds {KIND_WORDS[has]}; method {method!r} trains on "
            f"{KIND_WORDS[kind]}. Use method type {other!r} for this file.",
            param=param,
            code=code,
        )
    n = int((row.stats or {}).get("examples", 0))
    if n < min_examples:
        raise _fail(
            f"{'Training' if param == 'training_file' else 'Validation'} file has {n} "
            f"example(s), but must have at least {min_examples} examples",
            param=param,
            code="invalid_n_examples",
        )
    return row


def total_steps(*, n_examples: int, n_epochs: int, batch_size: int) -> int:
    return math.ceil(n_examples / batch_size) * n_epochs


def _check_bounds(config: TrainConfig, settings: Settings, *, steps: int, where: str) -> None:
    """What this deployment can serve and afford, on top of the trainer's own ranges."""
    if config.lora_r > settings.max_lora_rank:
        raise _fail(
            f"lora_r {config.lora_r} is above this deployment's maximum LoRA rank "
            f"({settings.max_lora_rank}): such an adapter could not be served",
            param=f"{where}.lora_r",
        )
    if config.max_seq_length > settings.max_train_seq_length:
        raise _fail(
            f"max_seq_length {config.max_seq_length} is above the base model's context "
            f"({settings.max_train_seq_length})",
            param=f"{where}.max_seq_length",
        )
    for name in ("checkpoint_interval", "eval_interval"):
        interval = getattr(config, name)
        if interval is not None and steps // interval > MAX_PERIODIC_RUNS:
            raise _fail(
                f"{name} {interval} would run {steps // interval} times in this job's {steps} "
                f"steps; at most {MAX_PERIODIC_RUNS} are allowed (use at least "
                f"{math.ceil(steps / MAX_PERIODIC_RUNS)})",
                param=f"{where}.{name}",
            )


def _check_quotas(
    session: Session, settings: Settings, *, tenant_id: str, train: File, n_epochs: int
) -> None:
    """The tenant's jobs per day and training tokens per month (this locks the tenant's
    row until the job is stored), its backlog of waiting jobs, and room for the result."""
    planned = planned_training_tokens(file_stats=train.stats, n_epochs=n_epochs)
    check_job_quota(session, settings, tenant_id=tenant_id, planned_tokens=planned)
    limits = load_limits(session, settings, tenant_id=tenant_id)
    check_backlog(session, tenant_id=tenant_id, limit=limits.max_queued_jobs)
    room = storage_room(session, settings, tenant_id=tenant_id)
    if room.quota and room.used >= room.quota:
        raise InvalidRequest(
            f"You have exceeded your storage quota ({room.quota} bytes; {room.used} in use): "
            "this job's adapter could not be stored. Delete old files or adapter versions.",
            param="training_file",
            code="storage_quota_exceeded",
        )


def _parent_version(
    session: Session, settings: Settings, *, tenant_id: str, model: str
) -> AdapterVersion:
    """Continued fine-tuning: `model` names one of the tenant's adapter versions (an `ft:` id,
    or an adapter name: its production version); 400 otherwise, alike for another tenant's
    names and names that do not exist."""
    try:
        found = resolve_model(session, settings, tenant_id=tenant_id, model=model, canary=False)
    except (NotFound, InvalidRequest) as e:
        names = own_model_names(session, settings, tenant_id=tenant_id)
        raise _fail(
            f"model {model!r} is neither a registered base model nor one of your adapter "
            f"versions ({e.message}).{did_you_mean(model, names)}",
            param="model",
            code="model_not_available",
        ) from e
    version = found.version
    assert version is not None  # a base model name never gets here
    if version.base_model not in settings.registered_base_models():
        raise _fail(
            f"{version.fine_tuned_model} was trained on {version.base_model!r}, which this "
            "deployment no longer has; it cannot be trained further here",
            param="model",
            code="model_not_available",
        )
    return version


def create_job(session: Session, settings: Settings, *, tenant_id: str, req: JobRequest) -> Job:
    """Validate everything, then store the job as `queued` (the caller enqueues it). `model`
    is a base model, or one of the tenant's adapter versions to continue training from."""
    parent = None
    if req.model not in settings.registered_base_models():
        parent = _parent_version(session, settings, tenant_id=tenant_id, model=req.model)
    base = parent.base_model if parent else req.model
    _check_suffix_and_metadata(req)
    seed = req.seed if req.seed is not None else secrets.randbelow(2**31)
    config = build_config(req, seed=seed, base_model=base)
    suffix = req.suffix
    if parent is not None:
        # Its weights, rank and target modules: a new version of the same adapter by default.
        config = config.model_copy(update={"lora_r": parent.rank})
        adapter = session.get(Adapter, parent.adapter_id)
        suffix = suffix or (adapter.name if adapter else None)
    kind = METHODS[method_type(req)][1]
    train = _usable_file(
        session,
        tenant_id=tenant_id,
        file_id=req.training_file,
        param="training_file",
        min_examples=MIN_EXAMPLES,
        kind=kind,
    )
    if req.validation_file is not None:
        _usable_file(
            session,
            tenant_id=tenant_id,
            file_id=req.validation_file,
            param="validation_file",
            min_examples=1,
            kind=kind,
        )
    n_examples = int((train.stats or {})["examples"])
    hp = resolve_hyperparameters(config, n_examples=n_examples)
    resolved = hp.model_dump(exclude_none=True)  # beta only for dpo
    steps = total_steps(n_examples=n_examples, n_epochs=hp.n_epochs, batch_size=hp.batch_size)
    _check_bounds(config, settings, steps=steps, where=_hyperparameters(req)[1])
    _check_quotas(session, settings, tenant_id=tenant_id, train=train, n_epochs=hp.n_epochs)
    if config.checkpoint_interval is None:
        # Four checkpoints a run bounds what a lost worker costs without slowing training.
        config = config.model_copy(update={"checkpoint_interval": max(1, steps // 4)})
    job = Job(
        tenant_id=tenant_id,
        model=base,
        parent_version_id=parent.id if parent else None,
        training_file=req.training_file,
        validation_file=req.validation_file,
        suffix=suffix,
        seed=seed,
        job_metadata=req.metadata,
        # OpenAI's shape: the method's resolved hyperparameters under its type's key.
        method={"type": method_type(req), method_type(req): {"hyperparameters": resolved}},
        config=config.model_dump(mode="json"),
        hyperparameters=resolved,
        queue=settings.queue_for(base),
    )
    session.add(job)
    add_event(session, job.id, f"Created fine-tuning job: {job.id}")
    if parent is not None:
        add_event(session, job.id, f"Continuing the training of {parent.fine_tuned_model}")
    add_event(session, job.id, f"Validating training file: {req.training_file}")
    job.status, job.dispatched_at = "queued", utcnow()  # the caller sends it after commit
    add_event(session, job.id, "Files validated, moving job to queued state")
    session.commit()
    return job


def add_event(
    session: Session,
    job_id: str,
    message: str,
    *,
    type: str = "message",
    level: str = "info",
    data: dict[str, Any] | None = None,
) -> JobEvent:
    event = JobEvent(job_id=job_id, message=message, type=type, level=level, data=data)
    session.add(event)
    return event


def get_job(session: Session, *, tenant_id: str, job_id: str) -> Job:
    job = session.get(Job, job_id)
    if job is None or job.tenant_id != tenant_id:
        raise NotFound(
            f"No fine-tuning job with id {job_id!r}",
            param="fine_tuning_job_id",
            code="fine_tuning_job_not_found",
        )
    return job


def list_jobs(
    session: Session,
    *,
    tenant_id: str,
    after: str | None,
    limit: int,
    metadata: dict[str, str] | None = None,
) -> tuple[list[Job], bool]:
    query = select(Job).where(Job.tenant_id == tenant_id)
    if metadata:
        # JSON containment differs per database; filter in Python over the tenant's jobs.
        matching = [
            j.id
            for j in session.exec(query)
            if all((j.job_metadata or {}).get(k) == v for k, v in metadata.items())
        ]
        query = query.where(col(Job.id).in_(matching))
    return page(session, query, model=Job, after=after, limit=limit)


def _transition(
    session: Session,
    job: Job,
    *,
    allowed: tuple[str, ...],
    values: dict[str, Any],
    code: str,
    refused: str,
) -> None:
    """Compare-and-set the job's row from one of `allowed` to `values`: a worker finishing it
    at this moment either commits first (this changes nothing and says so: a 400 `code`,
    `refused` formatted with the job's `id` and `status`) or loses its lease. The caller adds
    its event and commits."""
    result = session.execute(
        update(Job).where(col(Job.id) == job.id, col(Job.status).in_(allowed)).values(**values)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        session.rollback()
        session.refresh(job)
        raise InvalidRequest(
            refused.format(id=job.id, status=job.status), param="fine_tuning_job_id", code=code
        )
    session.refresh(job)


def cancel_job(session: Session, *, tenant_id: str, job_id: str) -> Job:
    """Cancel at once: a queued (or paused) job never starts; a running one loses its lease
    and its worker stops within one step without writing a result."""
    job = get_job(session, tenant_id=tenant_id, job_id=job_id)
    _transition(
        session, job, allowed=(*ACTIVE, PAUSED),
        values={"status": "cancelled", "lease": None, "cancel_requested": True,
                "finished_at": utcnow(),
                "estimated_finish": None},  # null unless running, as OpenAI has it
        code="job_not_cancellable",
        refused="Job {id} has already {status}; it cannot be cancelled.",
    )  # fmt: skip
    add_event(session, job_id, "Fine-tuning job cancelled")
    session.commit()
    session.refresh(job)
    return job


def pause_job(session: Session, *, tenant_id: str, job_id: str) -> Job:
    """Pause a queued or running job: a queued one is simply held; a running one's worker
    checkpoints within a step or two and lets it go (the job keeps its lease until then).
    Pausing a paused job changes nothing."""
    job = get_job(session, tenant_id=tenant_id, job_id=job_id)
    if job.status == PAUSED:
        return job
    _transition(
        session, job, allowed=ACTIVE, values={"status": PAUSED, "estimated_finish": None},
        code="job_not_pausable", refused="Job {id} has already {status}; it cannot be paused.",
    )  # fmt: skip
    if job.lease is None:
        add_event(session, job_id, "Fine-tuning job paused before training")
    else:
        add_event(session, job_id, "Pausing: the job is saved at its next step")
    session.commit()
    session.refresh(job)
    return job


def resume_job(session: Session, *, tenant_id: str, job_id: str) -> Job:
    """Queue a paused job again; it continues from its last checkpoint. The caller sends its
    message after commit (as for a new job). Resuming a job that is not paused is a 400."""
    job = get_job(session, tenant_id=tenant_id, job_id=job_id)
    _transition(
        session, job, allowed=(PAUSED,),
        values={"status": "queued", "lease": None, "worker": None, "dispatched_at": utcnow()},
        code="job_not_paused",
        refused="Job {id} is {status}, not paused; only a paused job can be resumed.",
    )  # fmt: skip
    add_event(session, job_id, "Fine-tuning job resumed: queued again")
    session.commit()
    session.refresh(job)
    return job


def list_events(
    session: Session, *, tenant_id: str, job_id: str, after: str | None, limit: int
) -> tuple[list[JobEvent], bool]:
    get_job(session, tenant_id=tenant_id, job_id=job_id)
    query = select(JobEvent).where(JobEvent.job_id == job_id)
    return page(session, query, model=JobEvent, after=after, limit=limit)


def list_checkpoints(
    session: Session, *, tenant_id: str, job_id: str, after: str | None, limit: int
) -> tuple[list[JobCheckpoint], bool]:
    get_job(session, tenant_id=tenant_id, job_id=job_id)
    query = select(JobCheckpoint).where(JobCheckpoint.job_id == job_id)
    return page(session, query, model=JobCheckpoint, after=after, limit=limit)


def tenant_slug(tenant: Tenant) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", tenant.name.lower()).strip("-") or tenant.id


def fine_tuned_model_name(job: Job, tenant: Tenant) -> str:
    short = job.id.removeprefix("ftjob-")[:8]
    return f"ft:{job.model}:{tenant_slug(tenant)}:{job.suffix or ''}:{short}"
