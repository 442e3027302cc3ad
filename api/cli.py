"""The `loraplex` command line: processes, database, administration."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Annotated, Any

import typer

from api.settings import get_settings

app = typer.Typer(
    help="Loraplex: self-hosted LoRA fine-tuning and multi-adapter serving.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
db_app = typer.Typer(help="Database maintenance.", no_args_is_help=True)
admin_app = typer.Typer(help="Tenants and API keys.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(admin_app, name="admin")

HostOpt = Annotated[str, typer.Option(help="Interface to bind.")]
PortOpt = Annotated[int, typer.Option(help="Port to listen on.")]


def _configure_logging(level: str) -> None:
    from api.logs import configure_logging

    configure_logging(level)


def _uvicorn_log_config() -> dict[str, Any]:
    from api.logs import uvicorn_log_config

    return uvicorn_log_config()


def _exit_if_engine_still_building() -> None:
    """Stopped while the serving engine was still being built (the base model converting or
    loading in torch, in a daemon thread): everything else is shut down, so leave at once.
    Finalising the interpreter under that thread aborts in C++ ("terminate called without an
    active exception", exit -6). The conversion writes atomically, so nothing is left half."""
    import logging
    import sys
    import threading

    from serving.app import ENGINE_BUILD_THREAD

    if any(t.name == ENGINE_BUILD_THREAD and t.is_alive() for t in threading.enumerate()):
        logging.getLogger(__name__).info("stopped while the serving engine was still loading")
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


def _upgrade() -> None:
    from api.db import upgrade

    settings = get_settings()
    settings.home.mkdir(parents=True, exist_ok=True)
    upgrade(settings.database_url)


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Apply database migrations up to the latest."""
    _upgrade()
    typer.echo("database is up to date")


@admin_app.command("create-tenant")
def create_tenant(name: str) -> None:
    """Create a tenant and its first API key; prints {"tenant_id", "api_key"} once."""
    from api.db import session_scope
    from api.errors import LoraplexError
    from api.services import tenants

    _upgrade()
    try:
        with session_scope(get_settings().database_url) as session:
            tenant = tenants.create_tenant(session, name=name)
            _, raw = tenants.create_key(session, tenant_id=tenant.id)
    except LoraplexError as e:
        _fail(e.message)
    typer.echo(json.dumps({"tenant_id": tenant.id, "api_key": raw}))


@admin_app.command("create-key")
def create_key(
    admin: Annotated[bool, typer.Option("--admin", help="A platform admin key.")] = False,
    tenant: Annotated[str | None, typer.Option(help="Tenant id for a tenant key.")] = None,
) -> None:
    """Create an API key; prints {"api_key"} once (it is stored only as a hash)."""
    from api.db import session_scope
    from api.errors import LoraplexError
    from api.services import tenants

    if admin == (tenant is not None):
        _fail("give exactly one of --admin or --tenant TENANT_ID")
    _upgrade()
    try:
        with session_scope(get_settings().database_url) as session:
            key, raw = tenants.create_key(session, tenant_id=tenant, is_admin=admin)
    except LoraplexError as e:
        _fail(e.message)
    typer.echo(json.dumps({"api_key": raw, "key_id": key.id}))


@app.command()
def export(
    name: Annotated[str, typer.Argument(help="The adapter's name.")],
    out: Annotated[Path, typer.Option("--out", help="Directory to write (new or empty).")],
    version: Annotated[
        int | None, typer.Option(help="Version number; default: production, else the newest.")
    ] = None,
    url: Annotated[
        str, typer.Option(envvar="LORAPLEX_URL", help="The Loraplex API's base URL.")
    ] = "http://127.0.0.1:8000",
    key: Annotated[
        str,
        typer.Option(envvar=["LORAPLEX_API_KEY", "OPENAI_API_KEY"], help="Your API key."),
    ] = "",
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16.")] = "float32",
) -> None:
    """Download an adapter version merged into its base: a plain transformers model
    (safetensors, tokenizer, chat template) for use elsewhere. docs/training.md, Export."""
    from trainer.errors import BaseModelError
    from trainer.export import ExportError, export_version

    if not key:
        _fail("give your API key with --key or LORAPLEX_API_KEY")
    settings = get_settings()
    try:
        done = export_version(
            url=url,
            key=key,
            name=name,
            out_dir=out,
            home=settings.home,
            base_models=settings.registered_base_models(),
            number=version,
            dtype=dtype,
            step=lambda message: typer.echo(f"... {message}", err=True),
        )
    except (ExportError, BaseModelError) as e:
        _fail(str(e))
    typer.echo(
        f"exported {done.fine_tuned_model} merged into {done.base_model}: {done.out_dir} "
        f"({done.size_bytes / 2**20:.1f} MiB of weights)"
    )


@app.command()
def migrate(
    source_url: Annotated[
        str,
        typer.Option("--from", help="The source's OpenAI API URL, e.g. https://api.openai.com."),
    ],
    source_key: Annotated[str, typer.Option("--key", help="The source account's API key.")],
    url: Annotated[
        str, typer.Option("--to", envvar="LORAPLEX_URL", help="This Loraplex's API URL.")
    ] = "http://127.0.0.1:8000",
    key: Annotated[
        str, typer.Option("--to-key", envvar="LORAPLEX_API_KEY", help="Your Loraplex API key.")
    ] = "",
    base: Annotated[
        str | None, typer.Option(help="The base model to train on here; default: the served one.")
    ] = None,
    job: Annotated[
        list[str] | None,
        typer.Option(help="Only this source job (repeatable); default: all succeeded."),
    ] = None,
    distill: Annotated[
        bool, typer.Option(help="Train on the source model's own answers to the training prompts.")
    ] = False,
    rps: Annotated[
        float, typer.Option(help="Most calls per second to the source.", min=0.01)
    ] = 2.0,
    state: Annotated[Path, typer.Option(help="Progress file: run again with it to resume.")] = Path(
        "loraplex-migrate.json"
    ),
    report: Annotated[
        bool,
        typer.Option(
            "--report",
            help="Once the jobs here succeeded: the parity report (the source model and the new "
            "version on the same prompts, graded by one eval here).",
        ),
    ] = False,
) -> None:
    """Recreate a hosted account's fine-tunes here (files, jobs, suffixes) through the OpenAI
    API, and make the old ft: model ids aliases of the new adapters. docs/migrate.md."""
    import contextlib
    import sys

    import openai

    from api.migrate import (
        Migration,
        ParityReport,
        State,
        outcomes_table,
        parity_table,
        v1,
    )

    if not key:
        _fail("give your Loraplex API key with --to-key or LORAPLEX_API_KEY")

    @contextlib.contextmanager
    def bar(length: int, label: str) -> Any:
        with typer.progressbar(length=length, label=label, file=sys.stderr) as progress:
            yield progress

    migration = Migration(
        source=openai.OpenAI(base_url=v1(source_url), api_key=source_key, max_retries=5),
        dest=openai.OpenAI(base_url=v1(url), api_key=key, max_retries=2),
        base_model=base or get_settings().base_model,
        state=State.load(state),
        distill=distill,
        rps=rps,
        say=lambda message: typer.echo(f"... {message}", err=True),
        progress=bar,
    )
    try:
        results = ParityReport(migration).run(job) if report else migration.run(job)
    except openai.APIConnectionError as e:
        _fail(f"cannot reach {e.request.url}: {e}")
    except openai.APIStatusError as e:
        _fail(f"{e.request.url}: {e.message}")
    table = parity_table if report else outcomes_table
    for line in table(results):  # type: ignore[arg-type]
        typer.echo(line)
    if any(r.problem for r in results):
        raise typer.Exit(1)


@app.command()
def api(host: HostOpt = "127.0.0.1", port: PortOpt = 8000) -> None:
    """Run the control-plane API alone."""
    import uvicorn

    _upgrade()
    _configure_logging(get_settings().log_level)
    uvicorn.run(
        "api.main:create_app",
        factory=True,
        host=host,
        port=port,
        log_config=_uvicorn_log_config(),
        log_level=get_settings().log_level.lower(),
    )


def _not_yet(what: str) -> None:
    _fail(f"`loraplex {what}` is not available yet in this build")


@app.command()
def worker(
    queues: Annotated[str | None, typer.Option(help="Comma-separated queues to consume.")] = None,
) -> None:
    """Run one worker: one training job (or eval run, with `--queues evals`) at a time,
    plus the lost-job reaper."""
    from celery.signals import worker_ready

    from workers.celery_app import celery_for
    from workers.tasks import start_reaper
    from workers.watchdog import fail_hung_jobs

    _upgrade()
    settings = get_settings()
    if queues:
        settings = settings.model_copy(update={"worker_queues": queues})
    _configure_logging(settings.log_level)
    fail_hung_jobs(settings)  # before taking work: a hung job must not hang this run too
    # Celery's multi-line "superuser privileges" warning is about pickle, which this worker
    # never accepts (JSON only); containers run as root.
    from celery.exceptions import SecurityWarning

    warnings.filterwarnings("ignore", category=SecurityWarning, module="celery.platforms")

    @worker_ready.connect(weak=False)
    def _ready(**_: object) -> None:
        start_reaper(settings)

    celery_for(settings).worker_main(
        [
            "--quiet",  # no multi-line banner: the log says "Connected to" and "ready."
            "worker",
            "--pool=solo",
            "--concurrency=1",
            "--prefetch-multiplier=1",
            f"--queues={','.join(settings.queues)}",
            f"--loglevel={settings.log_level}",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            f"--hostname=loraplex-{os.getpid()}@%h",
        ]
    )


@app.command()
def serve(host: HostOpt = "127.0.0.1", port: PortOpt = 8001) -> None:
    """Run the serving gateway alone, with its engine (vLLM replicas it starts or is pointed
    at via LORAPLEX_SERVING_REPLICAS, or the in-process transformers engine)."""
    import signal
    import sys

    import uvicorn

    from serving.app import create_gateway_app

    _upgrade()
    settings = get_settings()
    _configure_logging(settings.log_level)
    # uvicorn shuts down on SIGTERM/SIGINT (the gateway's shutdown stops the replicas it
    # started), then re-raises the signal to the previous handler: exit normally there.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: sys.exit(0))
    gateway = create_gateway_app(settings)
    gateway.state.public_url = f"http://{host}:{port}"  # for its "ready to serve at" line
    try:
        uvicorn.run(
            gateway,
            host=host,
            port=port,
            log_config=_uvicorn_log_config(),
            log_level=settings.log_level.lower(),
        )
    finally:
        _exit_if_engine_still_building()


@app.command()
def up(host: HostOpt = "127.0.0.1", port: PortOpt = 8000) -> None:
    """Run the whole platform on this machine: the API and the serving gateway on one port,
    a training worker, an eval worker and the serving engine (vLLM replicas, or in-process
    transformers).

    SIGTERM or Ctrl-C stops every child: uvicorn's shutdown stops the gateway's replicas.
    """
    import signal
    import sys

    import uvicorn

    from api.worker_process import WorkerProcess

    _upgrade()
    settings = get_settings()
    _configure_logging(settings.log_level)
    loraplex = os.path.join(os.path.dirname(sys.argv[0]) or ".", "loraplex")
    worker_cmd = (
        [loraplex, "worker"]
        if os.path.exists(loraplex)
        else [sys.executable, "-m", "api.cli", "worker"]
    )
    worker = WorkerProcess(worker_cmd)  # restarted if it dies on its own
    # Eval runs on a worker of their own (never behind a fine-tune), generating through this
    # process's gateway.
    local = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    gateway_url = settings.gateway_url or f"http://{local}:{port}/v1"
    evaluator = WorkerProcess(
        [*worker_cmd, "--queues", settings.eval_queue],
        env={**os.environ, "LORAPLEX_GATEWAY_URL": gateway_url},
        what="eval",
    )

    # uvicorn shuts down cleanly on SIGTERM/SIGINT, then re-raises the signal to the handler
    # that was there before it: this one, which exits normally so the worker is stopped too.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: sys.exit(0))
    try:
        from api.main import create_app

        platform = create_app(settings, with_gateway=True)
        platform.state.public_url = f"http://{host}:{port}"  # for its "ready to serve at" line
        uvicorn.run(
            platform,
            host=host,
            port=port,
            log_config=_uvicorn_log_config(),
            log_level=settings.log_level.lower(),
        )
    finally:
        evaluator.stop()
        worker.stop()
        _exit_if_engine_still_building()


@app.command()
def demo(
    questions: Annotated[int, typer.Option(help="Questions asked per tenant.")] = 4,
    min_match: Annotated[
        float, typer.Option(help="Share of trained answers each adapter must reproduce.")
    ] = 0.75,
    support: Annotated[Path | None, typer.Option(help="The support team's dataset.")] = None,
    code: Annotated[Path | None, typer.Option(help="The code team's dataset.")] = None,
    keep: Annotated[
        bool,
        typer.Option(
            "--keep", help="Keep the platform up afterwards, for the web console (Ctrl-C stops)."
        ),
    ] = False,
) -> None:
    """Train and serve two tenants' adapters end to end on this machine; ends with the web
    console's URL."""
    from api.demo import run_demo

    raise typer.Exit(
        run_demo(
            get_settings(),
            questions=questions,
            min_match=min_match,
            support=support,
            code=code,
            keep=keep,
        )
    )


if __name__ == "__main__":
    app()
