"""Fixtures: a tiny Llama + tokenizer built from scratch (no hub), small chat datasets."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from .trainer_testdata import TINY_FACTS, chat_row, tiny_tokenizer, write_jsonl

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 64-wide Llama with a ChatML tokenizer, saved as a local HF directory."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


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
