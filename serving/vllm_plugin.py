"""Loraplex's adapter source for vLLM: loaded inside each replica, never by the gateway.

Two vLLM plugins under one name, `loraplex` (pyproject.toml entry points), active when a
replica runs with `VLLM_PLUGINS=loraplex` and `LORAPLEX_REPLICA_STORAGE_URL`:

- a LoRA resolver (`vllm.general_plugins`): vLLM asks it for any model name it does not hold.
  A Loraplex adapter name (`<prefix>@<digest>`, serving/adapter_source.py) is fetched from
  the artifact store into the replica's own cache and verified against its digest; the
  all-zero base adapter is written locally from the base model's config. Any other name: None.
- a route (`vllm.endpoint_plugins`): `POST /loraplex/v1/load_adapter {"lora_name": ...}`
  resolves and loads ahead of the first request, so a gateway learns why a replica refuses
  an adapter (422 with the reason) instead of a bare "model does not exist"; and
  `GET /loraplex/v1/info`, which says whether base rows are plain rows here (the grouped
  LoRA op, serving/vllm_lora_op.py, installed by `register` when LORAPLEX_LORA_OP=grouped).

`VLLM_PLUGINS=loraplex` also keeps vLLM's own resolvers (a local directory, the Hugging Face
hub) off: a replica loads nothing but verified Loraplex adapters.

Settings (environment of the replica): LORAPLEX_REPLICA_STORAGE_URL (read access is enough;
S3 credentials as for any AWS client), LORAPLEX_REPLICA_CACHE_DIR (default
~/.cache/loraplex-replica), LORAPLEX_REPLICA_CACHE_MAX_ADAPTERS (256),
LORAPLEX_REPLICA_CACHE_MAX_GIB (20), LORAPLEX_REPLICA_CACHE_KEEP (16),
LORAPLEX_REPLICA_FOLD_SCALING (0; 1 folds the LoRA scaling into lora_B on the way in, see
adapter_source.FoldScaling: ~15 ms off a cold load in two bench runs, within the noise in a
third; off until a longer A/B settles it, docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import logging
import os
from argparse import Namespace
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from api.storage import ArtifactStore
from serving.adapter_source import (
    INFO_PATH,
    LOAD_PATH,
    REPLICA_ENV,
    AdapterRefused,
    ReplicaAdapterStore,
    parse_replica_name,
)
from serving.zero_adapter import ZERO_ADAPTER_NAME, ensure_zero_adapter

log = logging.getLogger("loraplex.replica")
NAME = "loraplex"
_source: ReplicaAdapterStore | None = None


def source() -> ReplicaAdapterStore | None:
    """This process's adapter store, from the environment (None: not configured)."""
    global _source
    url = os.environ.get("LORAPLEX_REPLICA_STORAGE_URL", "")
    if _source is None and url:
        root = Path(os.environ.get("LORAPLEX_REPLICA_CACHE_DIR", "")
                    or Path.home() / ".cache" / "loraplex-replica")  # fmt: skip
        _source = ReplicaAdapterStore(
            ArtifactStore(url),
            root,
            max_adapters=int(os.environ.get("LORAPLEX_REPLICA_CACHE_MAX_ADAPTERS", "256")),
            max_bytes=int(float(os.environ.get("LORAPLEX_REPLICA_CACHE_MAX_GIB", "20")) * 2**30),
            keep=int(os.environ.get("LORAPLEX_REPLICA_CACHE_KEEP", "16")),
            fold=os.environ.get("LORAPLEX_REPLICA_FOLD_SCALING", "0") == "1",
        )
    return _source


async def local_path(base_model: str, lora_name: str) -> Path | None:
    """Where the adapter `lora_name` is on this replica, fetched and verified if needed;
    None when the name is not Loraplex's. Raises AdapterRefused."""
    store = source()
    if store is None:
        return None
    if lora_name == ZERO_ADAPTER_NAME:
        # For the base model vLLM serves (`--model`, a local directory); in a hidden folder,
        # which the cache's pruning never counts or deletes.
        zero = await asyncio.to_thread(
            ensure_zero_adapter, base_dir=Path(base_model), base_name=base_model,
            root=store.root / ".base",
        )  # fmt: skip
        return zero.path
    if parse_replica_name(lora_name) is None:
        return None
    return await asyncio.to_thread(store.fetch, lora_name)


def register() -> None:
    """`vllm.general_plugins` entry point (every vLLM process calls it): the grouped LoRA op
    where the launcher asked for it (serving/vllm_lora_op.py; raises where it cannot be
    installed, so such a replica never starts with vLLM's op), and the adapter resolver
    (only the API server's registry is ever asked)."""
    from vllm.lora.request import LoRARequest
    from vllm.lora.resolver import LoRAResolver, LoRAResolverRegistry

    _die_with_parent_process()
    _log_to_stderr()

    if os.environ.get("LORAPLEX_LORA_OP", "") == "grouped":
        from serving import vllm_lora_op

        vllm_lora_op.install()
    if source() is None:
        log.warning("loraplex plugin: LORAPLEX_REPLICA_STORAGE_URL is not set; the Loraplex "
                    "adapter source is off")  # fmt: skip
        return

    class LoraplexResolver(LoRAResolver):
        async def resolve_lora(self, base_model_name: str, lora_name: str) -> Any:
            try:
                path = await local_path(base_model_name, lora_name)
            except AdapterRefused as e:
                log.error("refused adapter %s (%s): %s", lora_name, e.reason, e)
                return None
            if path is None:
                return None
            # vLLM replaces the id with a fresh one: an id is never reused for other bytes.
            return LoRARequest(lora_name=lora_name, lora_int_id=1, lora_path=str(path))

    LoRAResolverRegistry.register_resolver("Loraplex", LoraplexResolver())


def _log_to_stderr() -> None:
    """Loraplex's own lines (which LoRA op, the kernel) go to the replica's log beside
    vLLM's, in every vLLM process of a replica Loraplex started; vLLM configures only its
    own logger."""
    logger = logging.getLogger("loraplex")
    if os.environ.get(REPLICA_ENV) != "1" or logger.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s [%(name)s] %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def _die_with_parent_process() -> None:
    """In a replica Loraplex started, vLLM's engine-core and model-worker processes (started
    by vLLM with multiprocessing) die with the process that started them. The launcher's
    parent-death signal reaches only the API server; without this, a gateway killed hard
    (OOM killer, kill -9) left the engine and the model (~1.5 GB) running, orphaned."""
    import multiprocessing

    parent = multiprocessing.parent_process()
    if os.environ.get(REPLICA_ENV) == "1" and parent is not None and parent.pid is not None:
        from api.children import die_with

        die_with(parent.pid)


class Endpoints:
    """`vllm.endpoint_plugins` entry point: the explicit load route."""

    name = NAME
    required_tasks = None

    def attach_router(self, app: FastAPI) -> None:
        app.add_api_route(LOAD_PATH, load_adapter, methods=["POST"])
        app.add_api_route(INFO_PATH, info, methods=["GET"])

    async def init_state(self, engine_client: Any, state: Any, args: Namespace) -> None:
        return None


async def info(request: Request) -> JSONResponse:
    """What a gateway needs to know of this replica: `lora_op` "grouped" means base rows
    (no adapter) are plain rows here, exact in a mixed batch (no zero adapter needed)."""
    from vllm.platforms import current_platform

    from serving.vllm_lora_op import QUALNAME

    grouped = current_platform.get_punica_wrapper() == QUALNAME
    return JSONResponse({"lora_op": "grouped" if grouped else "vllm"})


async def load_adapter(request: Request) -> JSONResponse:
    try:
        body = await request.json()
        lora_name = str(body["lora_name"])
    except (ValueError, KeyError, TypeError):
        return _error(400, "invalid_request", 'Send {"lora_name": "..."}.')
    models = request.app.state.openai_serving_models
    if lora_name in models.lora_requests:
        return JSONResponse({"lora_name": lora_name, "loaded": True})
    try:
        # Fetch and verify first: a refusal comes back with its reason.
        path = await local_path(models.model_config.model, lora_name)
    except AdapterRefused as e:
        log.error("refused adapter %s (%s): %s", lora_name, e.reason, e)
        return _error(422, e.reason, str(e))
    if path is None:
        return _error(404, "unknown", f"{lora_name!r} is not a Loraplex adapter name.")
    result = await models.resolve_lora(lora_name)
    if getattr(result, "lora_name", None) == lora_name:
        return JSONResponse({"lora_name": lora_name, "loaded": True})
    error = getattr(result, "error", None)
    return _error(int(getattr(error, "code", 500) or 500), "load_failed",
                  str(getattr(error, "message", result)))  # fmt: skip


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "code": code}}, status_code=status)
