"""Serving fixtures: one tiny base, two trained adapters, two tenants, a SQLite registry,
peft reference answers; vLLM replicas and a live gateway shared by the whole session.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from api.db import get_engine, upgrade
from api.settings import Settings
from serving.app import create_gateway_app
from tests.conftest import bearer, new_tenant
from tests.serving.servingdata import (
    BASE,
    FACTS_A,
    FACTS_B,
    TenantKey,
    build_tiny_base,
    register,
    train_adapter,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_base(tmp_path_factory.mktemp("tiny-serve-base"))


@pytest.fixture(scope="session")
def adapters(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two real adapters from the trainer, on different facts."""
    import torch

    root = tmp_path_factory.mktemp("trained")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: threads only contend (tests/trainer/conftest.py)
    try:
        return {
            "a": train_adapter(tiny_base, FACTS_A, root / "a"),
            "b": train_adapter(tiny_base, FACTS_B, root / "b"),
        }
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def serving_settings(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path) -> Settings:
    home = tmp_path_factory.mktemp("serving-home")
    url = f"sqlite:///{home / 'loraplex.db'}"
    upgrade(url)
    return Settings(
        home=home,
        database_url=url,
        base_model=BASE,
        base_models={BASE: str(tiny_base)},
        serving_dtype="float32",  # vLLM matches transformers token for token in fp32
        serving_max_loras=2,  # few slots: base + adapter batches fill the last one (the bug)
        serving_max_cpu_loras=4,  # a small budget: LRU unloading happens in the tests
        serving_max_model_len=256,
        serving_health_interval=0.5,
        serving_retry_after=3,
        max_lora_rank=8,
    )


@pytest.fixture(scope="session")
def tenants(serving_settings: Settings, adapters: dict[str, Path]) -> dict[str, TenantKey]:
    """Two tenants, each with a production adapter named `helper` (same name, own weights)."""
    out = {}
    for label in ("a", "b"):
        name = f"tenant-{label}"
        tenant_id, key = new_tenant(serving_settings, name=name)
        out[label] = TenantKey(tenant_id=tenant_id, key=key, name=name)
        register(serving_settings, tenant=out[label], suffix="helper", adapter_dir=adapters[label])
    return out


class Reference:
    """Greedy answers from transformers + peft in fp32: what every engine must reproduce."""

    def __init__(self, base_dir: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(base_dir)
        self.base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
        self.models: dict[Path, Any] = {}

    def _model(self, adapter: Path | None) -> Any:
        from peft import PeftModel

        if adapter is None:
            return self.base
        if adapter not in self.models:
            # A fresh base per adapter: PeftModel wraps (and modifies) the model it is given.
            base = type(self.base)(self.base.config)
            base.load_state_dict(self.base.state_dict())
            self.models[adapter] = PeftModel.from_pretrained(base.eval(), adapter).eval()
        return self.models[adapter]

    def chat(self, adapter: Path | None, question: str, *, max_tokens: int = 12) -> str:
        messages = [{"role": "user", "content": question}]
        ids = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        with self.torch.inference_mode():
            out = self._model(adapter).generate(**ids, max_new_tokens=max_tokens, do_sample=False)
        text = self.tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
        return clean(text)


def clean(text: str) -> str:
    """Drop undecodable bytes: engines differ in how they show a cut UTF-8 character."""
    return text.replace("\ufffd", "")


@pytest.fixture(scope="session")
def reference(tiny_base: Path) -> Reference:
    return Reference(tiny_base)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LiveServer:
    """An app on a real uvicorn server in a thread (the openai SDK needs real HTTP)."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.port = free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> LiveServer:
        self.thread.start()
        wait_for(lambda: self.server.started, timeout=30, what="uvicorn start")
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@contextlib.contextmanager
def live_gateway(settings: Settings, *, timeout: float = 120) -> Iterator[LiveServer]:
    """The gateway alone on a live server, once its engine answers."""
    with LiveServer(create_gateway_app(settings)) as server:
        app = server.app
        wait_for(
            lambda: getattr(app.state, "gateway", None) and app.state.gateway.engine.ready(),
            timeout=timeout,
            what=f"{settings.serving_engine} engine",
        )
        yield server


@pytest.fixture(scope="session")
def transformers_gateway(
    serving_settings: Settings, tenants: dict[str, TenantKey]
) -> Iterator[LiveServer]:
    """The gateway over the in-process transformers engine: the cheap one, where the point
    is the gateway's own behaviour."""
    settings = serving_settings.model_copy(
        update={
            "serving_engine": "transformers",
            "serving_max_batch_size": 16,
            "serving_torch_threads": 1,  # tiny matmuls: threads only contend
        }
    )
    with live_gateway(settings) as server:
        yield server


def chat(url: str, key: str, model: str, question: str, **extra: Any) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": question}]}
    body |= {"max_tokens": 12, "temperature": 0} | extra
    return httpx.post(f"{url}/v1/chat/completions", json=body, headers=bearer(key), timeout=120)


def answer(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return clean(response.json()["choices"][0]["message"]["content"])


def wait_for(check: Callable[[], object], *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.1)


def healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def get_engine_for(settings: Settings) -> Any:
    return get_engine(settings.database_url)
