"""Choose and build the engine the settings ask for.

    serving_engine=vllm, or auto with vllm importable, or serving_replicas given
        -> VLLMEngine over the given replica URLs, or over `serving_spawn_replicas` started here
    serving_engine=transformers, or auto without vllm
        -> TransformersEngine in this process

Building resolves the base model to a local directory (converting a built-in once), which
replicas load and from which the zero adapter takes its shapes. A first start takes minutes
(conversion, vLLM start-up) while completions answer 503: `say_building`, `say_starting` and
`say_when_ready` put each step, the engine's log and the moment it can serve on the console.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from api.settings import Settings
from serving.engines.base import Engine, LocalAdapter, ModelLimits
from serving.replicas import ReplicaProcess, plan_replicas
from serving.zero_adapter import ZERO_ADAPTER_NAME, ensure_zero_adapter

log = logging.getLogger(__name__)
READY_POLL_SECONDS = 0.5


@dataclass
class EngineSetup:
    engine: Engine
    replicas: list[ReplicaProcess]  # processes to start and stop with the gateway


def engine_kind(settings: Settings) -> str:
    if settings.serving_engine != "auto":
        return settings.serving_engine
    if settings.serving_replicas or importlib.util.find_spec("vllm") is not None:
        return "vllm"
    return "transformers"


def base_model_dir(settings: Settings) -> Path:
    from trainer.base_models import resolve_base_model

    source = settings.registered_base_models()[settings.base_model]
    return resolve_base_model(source, home=settings.home)


def model_limits(base_dir: Path, *, max_model_len: int | None) -> ModelLimits:
    """The base's vocabulary and context from its config.json (no torch: replicas load it)."""
    config = json.loads((base_dir / "config.json").read_text())
    text = config.get("text_config") or config
    context = int(text.get("max_position_embeddings") or 2048)
    return ModelLimits(vocab_size=int(text["vocab_size"]), context=max_model_len or context)


def build_engine(
    settings: Settings, *, on_event: Callable[[str], None] | None = None
) -> EngineSetup:
    if engine_kind(settings) == "transformers":
        from serving.engines.transformers import TransformersEngine

        engine: Engine = TransformersEngine(
            load_base=lambda: base_model_dir(settings),
            dtype="bfloat16" if settings.serving_dtype == "bfloat16" else "float32",
            budget=settings.serving_max_cpu_loras,
            max_batch_size=settings.serving_max_batch_size,
            threads=settings.serving_torch_threads,
        )
        return EngineSetup(engine=engine, replicas=[])
    from serving.engines.vllm import VLLMEngine

    base_dir = base_model_dir(settings)
    cache_root = settings.serving_cache_dir or settings.home / "adapter-cache"
    fetches = settings.serving_adapter_source == "store"
    zero = (LocalAdapter(name=ZERO_ADAPTER_NAME, path=None) if fetches  # replicas write it
            else ensure_zero_adapter(base_dir=base_dir, base_name=settings.base_model,
                                     root=cache_root))  # fmt: skip
    replicas: list[ReplicaProcess] = []
    urls = list(settings.serving_replicas)
    if not urls:
        replicas += plan_replicas(
            settings,
            model_dir=base_dir,
            served_name=settings.base_model,
            count=settings.serving_spawn_replicas,
        )
        urls = [r.url for r in replicas]
    base_urls = list(settings.serving_base_replicas)
    if not base_urls and settings.serving_spawn_base_replicas:
        base_only = plan_replicas(
            settings.model_copy(update={"serving_replica_port": 0}),
            model_dir=base_dir,
            served_name=settings.base_model,
            count=settings.serving_spawn_base_replicas,
            lora=False,
        )
        replicas += base_only
        base_urls = [r.url for r in base_only]
    vllm_engine = VLLMEngine(
        urls=urls,
        base_urls=base_urls,
        served_model=settings.base_model,
        zero_adapter=zero,
        budget=settings.serving_max_cpu_loras,
        health_interval=settings.serving_health_interval,
        request_timeout=settings.serving_request_timeout,
        retry_after=settings.serving_retry_after,
        on_event=on_event,
        limits=model_limits(base_dir, max_model_len=settings.serving_max_model_len),
        fetches_adapters=fetches,
    )
    return EngineSetup(engine=vllm_engine, replicas=replicas)


def say_building(settings: Settings) -> None:
    """Before the engine is built: a built-in base converts first (minutes, once)."""
    from trainer.base_models import needs_conversion

    source = settings.registered_base_models().get(settings.base_model)
    if source is not None and needs_conversion(source, home=settings.home):
        log.info("converting the base model %s for serving (first start only; a few "
                 "minutes): chat and completions answer 503 until it is ready", source)  # fmt: skip


def say_starting(setup: EngineSetup, settings: Settings) -> None:
    """The engine is built and its replicas are starting: what, and where their logs are."""
    for replica in setup.replicas:
        log.info("starting the serving engine: vLLM replica on port %d (log at %s)",
                 replica.port, replica.log_path)  # fmt: skip
    if not setup.replicas and setup.engine.kind == "transformers":
        log.info("starting the serving engine: %s in process (transformers)", settings.base_model)
    elif not setup.replicas:
        urls = ", ".join(settings.serving_replicas)
        log.info("serving engine: waiting for vLLM replicas at %s", urls)


async def say_when_ready(engine: Engine, url: str | None) -> None:
    """One line once a replica (or the in-process model) can take requests."""
    while not any(replica.healthy for replica in engine.status()):
        await asyncio.sleep(READY_POLL_SECONDS)
    log.info("ready to serve at %s", url or "this gateway's address")
