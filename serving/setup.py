"""Choose and build the engine the settings ask for.

    serving_engine=vllm, or auto with vllm importable, or serving_replicas given
        -> VLLMEngine over the given replica URLs, or over `serving_spawn_replicas` started here
    serving_engine=transformers, or auto without vllm
        -> TransformersEngine in this process

Building resolves the base model to a local directory (converting a built-in once), which
replicas load and from which the zero adapter takes its shapes.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from api.settings import Settings
from serving.engines.base import Engine, ModelLimits
from serving.replicas import ReplicaProcess, plan_replicas
from serving.zero_adapter import ensure_zero_adapter


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
    zero = ensure_zero_adapter(base_dir=base_dir, base_name=settings.base_model, root=cache_root)
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
    )
    return EngineSetup(engine=vllm_engine, replicas=replicas)
