"""One training job, end to end: claim the row, fetch data, train, register, finish.

The ML stack is imported inside `run_training_job`, never at module import.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from sqlmodel import Session, select

from api.db import connection_lost, get_engine, utcnow
from api.models.adapters import AdapterVersion
from api.models.files import File
from api.models.jobs import Job
from api.models.tenants import Tenant
from api.services import job_runs, promotion, registry
from api.services.files import store_result_file
from api.services.job_runs import Claim, LeaseLost
from api.services.jobs import METHODS, add_event, fine_tuned_model_name
from api.services.limits import load_limits
from api.settings import Settings
from api.storage import ArtifactStore, StorageError, StoredObject
from workers.watchdog import Watchdog

if TYPE_CHECKING:
    from trainer.callbacks import Checkpoint, Progress
    from trainer.recipe import TrainResult

log = logging.getLogger(__name__)

# Outcomes of `run_training_job`, for the task and for logs.
DONE, SKIPPED, DEFERRED, LOST, HANDED_BACK = "done", "skipped", "deferred", "lost", "handed back"
PARKED = "paused"  # the tenant paused it: checkpointed, waiting for resume
EVENTS_PER_RUN = 50  # metrics events per run, whatever its length
CANCEL_POLL_SECONDS = 0.25
# Waits before retrying work whose database connection dropped: a few seconds in all,
# about a PostgreSQL restart or failover.
DB_RETRY_DELAYS = (0.2, 1.0, 3.0)
T = TypeVar("T")


class JobContext:
    """What the trainer's callbacks need: the claim, a session of their own, the store."""

    def __init__(
        self, settings: Settings, claim: Claim, *, stopping: threading.Event | None = None
    ) -> None:
        self.settings = settings
        self.claim = claim
        self.stopping = stopping or threading.Event()
        self.store = ArtifactStore(settings.storage_url)
        self.session = Session(get_engine(settings.database_url), expire_on_commit=False)
        self.lost = threading.Event()
        self.paused = threading.Event()  # the tenant paused the job: checkpoint and park
        self._last_poll = 0.0
        self._phase_started: dict[str, float] = {}  # phase -> time.monotonic() it began
        self._probe_seconds = 0.0  # how long the probe before training took
        self._steps_ran = False
        self._lock = threading.Lock()  # the heartbeat thread shares the session
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat_loop, daemon=True)
        self.watchdog = Watchdog(settings, claim)

    def __enter__(self) -> JobContext:
        self.watchdog.arm()
        self._beat.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._beat.join()
        self.watchdog.disarm()
        self.session.close()

    def _heartbeat_loop(self) -> None:
        # Covers the long silent phases (model load, evaluation) between training steps.
        # A hang that holds the GIL stops this loop, and with it the watchdog's re-arming.
        while not self._stop.wait(self.settings.heartbeat_interval):
            self.watchdog.pet()
            self.beat()

    def transaction(self, work: Callable[[Session], T]) -> T:
        """Run `work` on the job's session, alone (the heartbeat thread shares it). A dropped
        connection rolls it back and runs it again on a fresh one: `work` must be safe to
        repeat, and commits what it writes."""
        with self._lock:
            for delay in (*DB_RETRY_DELAYS, None):
                try:
                    return work(self.session)
                except BaseException as e:
                    self.session.rollback()
                    if delay is None or not connection_lost(e):
                        raise
                    log.warning("job %s: database connection lost; retrying", self.claim.job_id)
                    time.sleep(delay)
            raise AssertionError("unreachable")

    def beat(self, **values: Any) -> None:
        try:
            self.transaction(lambda session: job_runs.heartbeat(session, self.claim, **values))
        except job_runs.PauseRequested:
            self.paused.set()
        except LeaseLost:
            self.lost.set()
        except Exception:  # the database is away for longer: the next beat tries again
            log.warning("heartbeat failed for %s", self.claim.job_id, exc_info=True)

    def should_cancel(self) -> bool:
        """Asked after every step: the job may have been cancelled or handed elsewhere.

        The row is read at most every CANCEL_POLL_SECONDS: real steps take longer than
        that, so a cancel still lands within one step, and tiny steps don't hammer the DB.
        """
        now = time.monotonic()
        if now - self._last_poll >= CANCEL_POLL_SECONDS:
            self._last_poll = now
            self.beat()
        return self.lost.is_set()

    def should_pause(self) -> bool:
        """Asked after every step: the tenant paused the job, or the worker is stopping (a
        deploy, a scale-down): checkpoint now, then park the job or hand it back."""
        return self.paused.is_set() or self.stopping.is_set()

    def on_progress(self, p: Progress) -> None:
        every = max(1, p.total_steps // EVENTS_PER_RUN)
        if p.step % every and p.step != p.total_steps:
            return
        loss = f"{p.loss:.4f}" if p.loss is not None else "n/a"
        data = {
            "step": p.step,
            "total_steps": p.total_steps,
            "train_loss": p.loss,
            "train_mean_token_accuracy": p.token_accuracy,
            "learning_rate": p.learning_rate,
            "tokens_per_second": p.tokens_per_second,
            "eta_seconds": p.eta_seconds,
        }
        if p.reward_margin is not None:  # DPO: the implicit reward margin and its accuracy
            data["train_reward_margin"] = p.reward_margin
            data["train_reward_accuracy"] = p.reward_accuracy
        message = f"Step {p.step}/{p.total_steps}: training loss={loss}"
        self.transaction(
            lambda session: _commit_event(
                session, self.claim.job_id, message, type="metrics", data=data
            )
        )
        self._steps_ran = True
        if p.eta_seconds is not None:
            # After the last step the probe runs again (about as long as it took before).
            self.estimate_finish(p.eta_seconds + self._probe_seconds)

    def estimate_finish(self, seconds: float) -> None:
        """The job's `estimated_finish`: `seconds` from now (a Unix timestamp on the API)."""
        self.beat(estimated_finish=datetime.fromtimestamp(time.time() + seconds, tz=UTC))

    def on_phase(self, name: str, message: str) -> None:
        """A phase of the run begins (the trainer's, or upload and registration here): one
        event, so the minutes between training steps never look like a hang."""
        now = self._phase_started[name] = time.monotonic()
        if name == "training" and "probing_before" in self._phase_started:
            self._probe_seconds = now - self._phase_started["probing_before"]
        self.transaction(
            lambda session: _commit_event(session, self.claim.job_id, message, data={"phase": name})
        )
        if self._steps_ran and name.startswith("probing_"):
            self.estimate_finish(self._probe_seconds)  # a probe like the one before training
        else:
            self.beat()

    def on_checkpoint(self, ckpt: Checkpoint) -> None:
        prefix = f"jobs/{self.claim.job_id}/checkpoints/step-{ckpt.step}"
        stored = self.store.put_dir(prefix, ckpt.path)
        adapter_files = {
            rel: info
            for rel, info in registry.stored_files(stored).items()
            if rel in registry.REQUIRED_FILES
        }
        try:
            dropped = self.transaction(
                lambda session: job_runs.record_checkpoint(
                    session,
                    self.claim,
                    step=ckpt.step,
                    prefix=prefix,
                    metrics=dict(ckpt.metrics),
                    keep=self.settings.keep_checkpoints,
                    files=adapter_files,
                )
            )
        except LeaseLost:
            self.lost.set()
            return
        for old in dropped:
            try:
                self.store.delete(old)
            except (StorageError, OSError):  # unlisted bytes, harmless; logged for operators
                log.warning("job %s: could not delete %s", self.claim.job_id, old, exc_info=True)


def _commit_event(session: Session, job_id: str, message: str, **fields: Any) -> None:
    add_event(session, job_id, message, **fields)
    session.commit()


def _fetch_file(ctx: JobContext, file_id: str, dest: Path) -> Path:
    row = ctx.transaction(lambda session: session.get(File, file_id))
    if row is None:
        raise StorageError(f"{file_id} was deleted")
    if ctx.store.get_file(row.storage_key, dest) != row.sha256:
        raise StorageError(f"{file_id}: stored bytes do not match their sha256")
    return dest


def _results_csv(metrics: dict[str, Any]) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(
        ["step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy"]
    )
    evals = {int(e["step"]): e for e in metrics.get("eval_curve", [])}
    for point in metrics.get("loss_curve", []):
        ev = evals.get(int(point["step"]), {})
        writer.writerow(
            [
                point["step"],
                point.get("loss"),
                point.get("token_accuracy"),
                ev.get("eval_loss"),
                ev.get("eval_token_accuracy"),
            ]
        )
    return out.getvalue().encode()


def _training_config(job: Job, settings: Settings, *, init_adapter: Path | None = None) -> Any:
    """The trainer's config: the job's, on the base's local source, with the objective its
    method names (sft or dpo) and, when it continues a version, that version's weights."""
    from trainer.config import parse_config

    source = settings.registered_base_models().get(job.model, job.model)
    objective, _ = METHODS[(job.method or {}).get("type", "supervised")]
    extra = {"init_adapter": str(init_adapter)} if init_adapter else {}
    return parse_config({**job.config, "base_model": source, "objective": objective, **extra})


def _fetch_parent(ctx: JobContext, job: Job, target: Path) -> Path:
    """Continued fine-tuning: the parent version's files, verified against the registry."""
    from serving.cache import download_verified
    from serving.errors import AdapterIntegrityError

    parent = ctx.transaction(lambda session: session.get(AdapterVersion, job.parent_version_id))
    if parent is None:
        raise RuntimeError(f"the adapter version {job.parent_version_id} this job continues "
                           "was deleted")  # fmt: skip
    try:
        download_verified(ctx.store, parent, target)
    except AdapterIntegrityError as e:
        raise RuntimeError(f"cannot continue from {parent.fine_tuned_model}: {e.message}") from e
    return target


def _train(job: Job, ctx: JobContext, *, workdir: Path) -> TrainResult:
    from trainer.recipe import train

    # Reads go through ctx.transaction too: the heartbeat thread shares the session.
    data = _fetch_file(ctx, job.training_file, workdir / "train.jsonl")
    valid = None
    if job.validation_file:
        valid = _fetch_file(ctx, job.validation_file, workdir / "valid.jsonl")
    resume = None
    latest = ctx.transaction(lambda session: job_runs.latest_checkpoint(session, job_id=job.id))
    if latest is not None:
        resume = workdir / "resume"
        shutil.rmtree(resume, ignore_errors=True)
        ctx.store.get_dir(latest.storage_prefix, resume)
        message = f"Resuming from checkpoint at step {latest.step_number}"
        ctx.transaction(lambda session: _commit_event(session, job.id, message))
    parent = _fetch_parent(ctx, job, workdir / "parent") if job.parent_version_id else None
    return train(
        _training_config(job, ctx.settings, init_adapter=parent),
        data_path=data,
        validation_path=valid,
        out_dir=workdir / "adapter",
        home=ctx.settings.home,
        on_progress=ctx.on_progress,
        on_phase=ctx.on_phase,
        on_checkpoint=ctx.on_checkpoint,
        should_cancel=ctx.should_cancel,
        should_pause=ctx.should_pause,
        resume_from=resume,
    )


def _lineage(session: Session, job: Job, result: TrainResult) -> dict[str, Any]:
    def file_info(file_id: str | None) -> dict[str, Any] | None:
        row = session.get(File, file_id) if file_id else None
        return {"id": row.id, "sha256": row.sha256} if row else None

    parent = session.get(AdapterVersion, job.parent_version_id) if job.parent_version_id else None
    return {
        "job_id": job.id,
        # Continued fine-tuning: the version whose weights this one started from.
        "parent": {"version_id": parent.id, "fine_tuned_model": parent.fine_tuned_model}
        if parent
        else None,
        "training_file": file_info(job.training_file),
        "validation_file": file_info(job.validation_file),
        "hyperparameters": result.hyperparameters.model_dump(),
        "config": job.config,
        "seed": job.seed,
        "versions": result.metrics.get("versions", {}),
    }


def _version_metrics(m: dict[str, Any]) -> dict[str, Any]:
    keys = (
        "train_loss",
        "eval_loss_before",
        "eval_loss_after",
        "exact_match_before",
        "exact_match_after",
        "exact_match_unquantized",  # the probe as served: what the promotion gate reads
        "trained_tokens",
        "runtime_seconds",
        "steps",
        "device",
        "precision",
        "method",  # what `method: auto` resolved to
        "quantization",
        "objective",  # sft | dpo
        "preference",  # dpo: rewards and the preferred-vs-rejected margin before and after
    )
    metrics = {k: m.get(k) for k in keys}
    metrics["no_measurable_improvement"] = promotion.no_improvement(metrics) is not None
    return metrics


def _set_base_name(adapter_dir: Path, base_name: str) -> None:
    """Adapters name the registered base, which is what serving loads them against."""
    path = adapter_dir / "adapter_config.json"
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = base_name
    path.write_text(json.dumps(config, indent=2))


def _register(
    session: Session,
    ctx: JobContext,
    result: TrainResult,
    *,
    prefix: str,
    stored: dict[str, StoredObject],
    csv_keys: list[str],
    evals: EvalInputs,
) -> None:
    """The version, the results file, the adapter's evals and their runs, and `succeeded`:
    one transaction, so a client that sees the job succeeded finds its eval attached."""
    job = job_runs.owned_job(session, ctx.claim)
    tenant = session.get(Tenant, job.tenant_id)
    assert tenant is not None
    name = fine_tuned_model_name(job, tenant)
    metrics = _version_metrics(result.metrics)
    version = registry.register_version(
        session,
        job=job,
        fine_tuned_model=name,
        prefix=prefix,
        stored=stored,
        adapter_dir=result.out_dir,
        metrics=metrics,
        lineage=_lineage(session, job, result),
        max_rank=ctx.settings.max_lora_rank,
    )
    csv_file = store_result_file(
        session,
        ctx.store,
        tenant_id=job.tenant_id,
        filename=f"{job.id}-results.csv",
        data=_results_csv(result.metrics),
    )
    csv_keys.append(csv_file.storage_key)
    # Compare-and-set: a cancel that committed first wins, and this whole transaction (the
    # version and the results file with it) rolls back. A pause that came after the last
    # step does not throw the finished run away.
    job_runs.settle(
        session,
        ctx.claim,
        from_paused=True,
        status="succeeded",
        finished_at=utcnow(),
        fine_tuned_model=name,
        trained_tokens=result.trained_tokens,
        result_files=[csv_file.id],
    )
    useless = promotion.no_improvement(metrics)
    if useless is not None:
        add_event(
            session,
            job.id,
            f"The adapter {useless}. Check the data and hyperparameters (more epochs, a higher "
            "learning rate); promoting it to production needs force=true.",
            level="warn",
            data={"phase": "registering", "no_measurable_improvement": True},
        )
    add_event(session, job.id, f"New fine-tuned model created: {name}")
    _start_evals(session, ctx, job, version, evals, keys=csv_keys)
    add_event(session, job.id, "The job has successfully completed")
    session.commit()


def _has_version(session: Session, job_id: str) -> bool:
    return (
        session.exec(select(AdapterVersion.id).where(AdapterVersion.job_id == job_id)).first()
        is not None
    )


def _succeed(job_id: str, ctx: JobContext, result: TrainResult) -> None:
    job = ctx.transaction(lambda session: session.get(Job, job_id, populate_existing=True))
    assert job is not None
    _set_base_name(result.out_dir, job.model)
    ctx.on_phase("uploading", "Uploading the adapter to the artifact store")
    # All or nothing: a failed upload (a full disk) leaves none of the adapter's files.
    prefix, stored = registry.upload_adapter(ctx.store, job=job, adapter_dir=result.out_dir)
    csv_keys: list[str] = []
    workdir = result.out_dir.parent
    valid = workdir / "valid.jsonl"
    evals = EvalInputs(
        held_out=_held_out_split(job, ctx.settings, data=workdir / "train.jsonl"),
        validation=valid.read_bytes() if job.validation_file and valid.is_file() else None,
    )
    ctx.on_phase("registering", "Registering the adapter version")
    try:
        ctx.transaction(
            lambda session: _register(
                session, ctx, result, prefix=prefix, stored=stored, csv_keys=csv_keys, evals=evals
            )
        )
    except BaseException:
        if ctx.transaction(lambda session: _has_version(session, job_id)):
            return  # the commit went through though its connection dropped before the reply
        for key in (prefix, *csv_keys):
            ctx.store.delete(key)  # no half-registered version: bytes go with the row
        raise
    from workers.celery_app import send_eval_runs

    send_eval_runs(ctx.settings, evals.run_ids)


@dataclass
class EvalInputs:
    """What a finished job gives its adapter's evals (see `_start_evals`), and the runs
    they started, to enqueue once committed."""

    held_out: bytes | None
    validation: bytes | None
    run_ids: list[str] = field(default_factory=list)


def _held_out_split(job: Job, settings: Settings, *, data: Path) -> bytes | None:
    """The training lines a supervised job without a validation file held out
    (`validation_split`), as the trainer chose them: the adapter's eval set if it has none."""
    from trainer.data import split_validation
    from trainer.formats import iter_examples

    config = _training_config(job, settings)
    if job.validation_file or config.validation_split <= 0 or config.objective != "sft":
        return None
    raw = data.read_bytes().splitlines(keepends=True)
    numbers = [n for n, _ in iter_examples(raw)]
    _, held = split_validation(numbers, fraction=config.validation_split, seed=config.seed)
    return b"".join(raw[n - 1].rstrip(b"\n") + b"\n" for n in sorted(held)) or None


def _start_evals(
    session: Session,
    ctx: JobContext,
    job: Job,
    version: AdapterVersion,
    evals: EvalInputs,
    *,
    keys: list[str],
) -> None:
    """The job's validation file (or the split it held out, for an adapter with no eval
    yet) becomes an eval attached to its adapter; each attached eval runs on the new version,
    and on production and the base where they have no run (A/B). In a savepoint of the
    registration: never fails the job, an eval that cannot start is a warning event. Stored
    bytes go in `keys` (deleted if the registration rolls back); the runs' ids in `evals`."""
    from api.models.adapters import Adapter
    from api.services import eval_policy

    if version.stage == "rejected":
        return
    session.flush()  # the registration's own rows: their errors are not the evals'
    try:
        with session.begin_nested():
            adapter = session.get(Adapter, version.adapter_id)
            assert adapter is not None
            if job.validation_file:
                budget = eval_policy.answer_budget(evals.validation or b"")
                eval_policy.attach_file_eval(session, adapter, file_id=job.validation_file,
                                             source=job.id, what="validation file",
                                             max_tokens=budget)  # fmt: skip
            elif evals.held_out and not eval_policy.attached_evals(session, adapter):
                name = f"{job.id}-held-out.jsonl"
                split = store_result_file(session, ctx.store, tenant_id=job.tenant_id,
                                          filename=name, data=evals.held_out)  # fmt: skip
                keys.append(split.storage_key)
                eval_policy.attach_file_eval(session, adapter, file_id=split.id, source=job.id,
                                             what="held-out split",
                                             max_tokens=eval_policy.answer_budget(evals.held_out),
                                             )  # fmt: skip
            runs = eval_policy.runs_for_new_version(session, version)
    except Exception as e:
        log.exception("job %s: could not start its eval runs", job.id)
        add_event(session, job.id, f"Could not start the adapter's eval runs: {e}", level="warn")
        return
    evals.run_ids = [run.id for run in runs]
    if runs:
        names = ", ".join(f"{r.name} ({r.id})" for r in runs)
        add_event(session, job.id, f"Eval runs started: {names}",
                  data={"eval_runs": evals.run_ids})  # fmt: skip


def _fail_from(ctx: JobContext, error: BaseException) -> None:
    from trainer.errors import (
        BaseModelError,
        CheckpointError,
        ConfigError,
        DataError,
        TrainingFailed,
    )

    codes: list[tuple[type[BaseException], str, str | None]] = [
        (ConfigError, "invalid_hyperparameters", "hyperparameters"),
        (DataError, "invalid_training_file", "training_file"),
        (BaseModelError, "model_not_available", "model"),
        (CheckpointError, "checkpoint_unusable", None),
        (TrainingFailed, "training_failed", None),
        (StorageError, "storage_error", None),
    ]
    code, param, message = (
        "internal_error",
        None,
        f"Training failed unexpectedly ({type(error).__name__}).",
    )
    for cls, c, p in codes:
        if isinstance(error, cls):
            code, param, message = c, p, str(error)
            break
    with contextlib.suppress(LeaseLost):
        ctx.transaction(
            lambda session: job_runs.fail(
                session, ctx.claim, code=code, message=message, param=param
            )
        )


def _start(session: Session, settings: Settings, job_id: str, worker: str) -> Claim | str:
    """Turn a message into a claim. A message is this queue's turn, not a ticket for its own
    job: the worker takes the queued job whose tenant has waited longest (fair share), so a
    tenant's backlog never starves the others. Only a job whose worker died is taken back
    by its own message (the reaper's re-send), to resume it."""
    job = session.get(Job, job_id)
    if job is None:
        return SKIPPED

    def limit_of(tenant_id: str) -> int | None:  # an admin's override, else the setting
        return load_limits(session, settings, tenant_id=tenant_id).max_running_jobs or None

    candidates = [(job_id, job.tenant_id)] if job.status == "running" else []
    candidates += job_runs.fair_order(session, queue=job.queue, limit_of=limit_of)
    for candidate, tenant_id in candidates:
        claim = job_runs.claim(
            session,
            job_id=candidate,
            worker=worker,
            stale_after=settings.heartbeat_timeout,
            tenant_limit=limit_of(tenant_id),
        )
        if claim is not None:
            add_event(session, candidate, f"Fine-tuning job started (attempt {claim.attempt})")
            session.commit()
            return claim
    if not job_runs.queued_counts(session, queues=[job.queue]):
        return SKIPPED  # nothing waits: a duplicate or a finished job's message
    # Jobs wait, but each of their tenants runs its limit: this message tries again later.
    session.refresh(job)
    if job.status == "queued":
        job.dispatched_at = utcnow()
        session.commit()
    return DEFERRED


def _hand_back(ctx: JobContext, *, step: int) -> str:
    from workers.celery_app import enqueue_training

    try:
        queue = ctx.transaction(lambda session: job_runs.hand_back(session, ctx.claim, step=step))
    except LeaseLost:
        return LOST  # cancelled meanwhile: nothing to hand back
    enqueue_training(ctx.settings, ctx.claim.job_id, queue=queue)
    log.info("job %s handed back after step %d: the worker is stopping", ctx.claim.job_id, step)
    return HANDED_BACK


def _park(ctx: JobContext, *, step: int | None) -> str:
    parked = ctx.transaction(lambda session: job_runs.park(session, ctx.claim, step=step))
    if parked:
        log.info("job %s paused after step %s; the worker is free", ctx.claim.job_id, step)
        return PARKED
    return LOST


def run_training_job(
    job_id: str, *, settings: Settings, worker: str, stopping: threading.Event | None = None
) -> str:
    """Run one job if it is ours to run; returns DONE, SKIPPED, DEFERRED, LOST or
    HANDED_BACK (`stopping` was set: checkpointed, queued again to resume elsewhere)."""
    from trainer.errors import TrainingCancelled, TrainingPaused

    with Session(get_engine(settings.database_url), expire_on_commit=False) as session:
        claim = _start(session, settings, job_id, worker)
        if isinstance(claim, str):
            return claim
        if claim.job_id != job_id:
            log.info("message for %s: runs %s (fair share)", job_id, claim.job_id)
        job_id = claim.job_id
        job = session.get(Job, job_id, populate_existing=True)
        assert job is not None
    workdir = settings.home / "work" / job_id
    workdir.mkdir(parents=True, exist_ok=True)
    with JobContext(settings, claim, stopping=stopping) as ctx:
        try:
            result = _train(job, ctx, workdir=workdir)
            _succeed(job_id, ctx, result)
            return DONE
        except TrainingPaused as e:
            if ctx.paused.is_set():
                return _park(ctx, step=e.step)
            return _hand_back(ctx, step=e.step)
        except (TrainingCancelled, LeaseLost):
            log.info("job %s stopped: cancelled or handed to another worker", job_id)
            return LOST
        except Exception as e:
            if connection_lost(e):
                # The database stayed away through every retry: the job keeps its row as
                # `running`, and once its heartbeats stop the reaper re-queues it to resume.
                log.exception("job %s: database unreachable; leaving it to the reaper", job_id)
                return LOST
            log.exception("job %s failed", job_id)
            _fail_from(ctx, e)
            return DONE
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
