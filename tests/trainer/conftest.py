"""Fixtures: a tiny Llama + tokenizer built from scratch (no hub), small chat datasets."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from .trainer_testdata import TINY_FACTS, chat_row, write_jsonl

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_base(tiny_llama: Path) -> Path:
    """The suite's tiny Llama (tests/conftest.py), under the name these tests use."""
    return tiny_llama


@pytest.fixture(autouse=True)
def _one_thread_for_tiny_models(request: pytest.FixtureRequest) -> Iterator[None]:
    """Tiny matmuls gain nothing from threads, and on a busy 2-core box two OpenMP threads
    made each one ~400x slower (7.8 ms vs 20 us, measured): run tiny-model tests on one."""
    if "tiny_base" not in request.fixturenames:
        yield
        return
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture()
def tiny_data(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "train.jsonl", [chat_row(q, a) for q, a in TINY_FACTS])


@pytest.fixture()
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"
