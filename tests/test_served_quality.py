"""What a tenant trained is what the tenant is served (issue 20), through the public API as a
new user meets it: `loraplex up` with every default (the bundled SmolLM2-135M-Instruct base,
the default serving engine: a vLLM replica), the official SDK, a fine-tune with every default
(method `auto`, auto hyperparameters) on 24 support facts the base cannot know
(examples/support-acme.jsonl, written for this project), a promotion, then calls by name one
at a time and 12 at once, mixed with base-model calls.

This is the suite's one SmolLM2 training run (minutes on 2 cores); it also checks what the
trainer reports about it. Figures for other methods and engines: bench/bench_served_quality.py.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.workers.conftest import LORAPLEX, wait_for_status
from tests.workers.test_up import Up, _stop

ROOT = Path(__file__).resolve().parents[1]
ACME = ROOT / "examples" / "support-acme.jsonl"
ACME_HELD_OUT = ROOT / "tests" / "trainer" / "data" / "support-acme-valid.jsonl"
BASE = "smollm2-135m-instruct"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(1800),
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vllm"),
]


def _examples(path: Path) -> list[tuple[list[dict[str, str]], str]]:
    """(the conversation up to the answer, the answer) per line."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [(r["messages"][:-1], r["messages"][-1]["content"]) for r in rows]


def _same(got: str, expected: str) -> bool:
    """The trainer's probe rule: exact after collapsing whitespace."""
    return re.sub(r"\s+", " ", got).strip() == re.sub(r"\s+", " ", expected).strip()


def _ask(sdk: openai.OpenAI, model: str, messages: list[dict[str, str]]) -> str:
    answer = sdk.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=32,  # answers are at most ~20 tokens; the base runs to the limit
        temperature=0,  # type: ignore[arg-type]
    )
    return answer.choices[0].message.content or ""


def test_a_fact_set_trained_with_defaults_is_served_as_trained(
    tmp_path: Path, tiny_llama: Path
) -> None:
    up = Up(tmp_path, tiny_llama)  # every serving and training default
    proc = up.start("up.log", ready="/healthz")
    try:
        sdk = up.sdk()
        train = sdk.files.create(file=ACME.open("rb"), purpose="fine-tune")
        held_out = sdk.files.create(file=ACME_HELD_OUT.open("rb"), purpose="fine-tune")
        job = sdk.fine_tuning.jobs.create(
            model=BASE, training_file=train.id, validation_file=held_out.id, suffix="kettle"
        )
        done = wait_for_status(sdk, job.id, {"succeeded", "failed", "cancelled"}, timeout=1200)
        assert done.status == "succeeded", done.error

        admin = {"Authorization": f"Bearer {_admin_key(up)}"}
        adapter = httpx.get(f"{up.url}/v1/admin/adapters/embedded:kettle", headers=admin).json()
        (version,) = adapter["versions"]
        metrics: dict[str, Any] = version["metrics"]
        # method auto on a 135M base: plain LoRA on the full-precision weights, the numerics
        # serving runs; the record says so (a QLoRA run: 20/20 on NF4, 11/20 as served).
        assert metrics["method"] == "lora" and metrics["quantization"] == "none"
        assert metrics["numerics"] == {"trained": "full", "validated": ["full"], "served": "full"}
        assert metrics["exact_match_before"]["train"]["exact"] == 0
        assert metrics["exact_match_after"]["train"]["rate"] >= 0.95
        assert metrics["eval_loss_after"] < metrics["eval_loss_before"] / 4
        deadline = time.monotonic() + 300  # the replica has had the training run to boot
        while httpx.get(f"{up.url}/readyz", timeout=60).status_code != 200:
            assert time.monotonic() < deadline, (tmp_path / "up.log").read_text()[-3000:]
            time.sleep(1)
        promoted = httpx.post(
            f"{up.url}/v1/admin/adapters/embedded:kettle/versions/1/promote",
            json={"stage": "production"}, headers=admin, timeout=600,  # the probe: ~1-2 min
        )  # fmt: skip
        assert promoted.status_code == 200, promoted.text
        # Before promoting, `up` asked its own engine the trainer's probe prompts: the gate's
        # figure is what the tenant will get, not what the trainer saw in its own process.
        one = httpx.get(f"{up.url}/v1/admin/adapters/embedded:kettle", headers=admin).json()
        served = one["versions"][0]["metrics"]["exact_match_served"]
        assert served["engine"] == "vllm"
        assert served["train"]["rate"] >= 0.95, served["train"]["samples"]
        assert served["validation"]["n"] == metrics["exact_match_after"]["validation"]["n"]
        facts = _examples(ACME)
        base_alone = [_ask(sdk, BASE, m) for m, _ in facts]
        assert sum(_same(got, a) for got, (_, a) in zip(base_alone, facts, strict=True)) == 0
        alone = [_ask(sdk, "kettle", m) for m, _ in facts]
        right = [_same(got, a) for got, (_, a) in zip(alone, facts, strict=True)]
        report = [(a, got) for ok, got, (_, a) in zip(right, alone, facts, strict=True) if not ok]
        assert sum(right) >= 0.95 * len(facts), report

        # 12 at once, half to the adapter and half to the base, over every fact.
        calls = [(model, i) for i in range(len(facts)) for model in ("kettle", BASE)]
        with ThreadPoolExecutor(12) as pool:
            loaded = list(pool.map(lambda c: _ask(sdk, c[0], facts[c[1]][0]), calls))
        by_call = dict(zip(calls, loaded, strict=True))
        right_loaded = sum(_same(by_call["kettle", i], a) for i, (_, a) in enumerate(facts))
        assert right_loaded >= 0.95 * len(facts), [by_call["kettle", i] for i in range(len(facts))]
        changed = [i for i in range(len(facts)) if by_call[BASE, i] != base_alone[i]]
        assert not changed, [(base_alone[i], by_call[BASE, i]) for i in changed]

        # The held-out file became the adapter's eval (docs/evals.md): `up`'s eval worker ran
        # it through this engine on the new version and on the base, and the SDK reads both.
        (ev,) = [e for e in sdk.evals.list() if e.name == "kettle: validation file"]
        runs = _finished_runs(sdk, ev.id, 2)
        tuned, base = runs["v1 (candidate)"], runs[f"{BASE} (base)"]
        assert tuned.status == base.status == "completed", (tuned.error, base.error)
        assert (
            tuned.result_counts.total == base.result_counts.total == len(_examples(ACME_HELD_OUT))
        )
        assert tuned.result_counts.passed > base.result_counts.passed, (tuned, base)
    finally:
        assert _stop(proc) == 0


def _admin_key(up: Up) -> str:
    created = subprocess.run(
        [LORAPLEX, "admin", "create-key", "--admin"],
        cwd=up.workdir, env=up.env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return str(json.loads(created.stdout)["api_key"])


def _finished_runs(sdk: openai.OpenAI, eval_id: str, n: int) -> dict[str, Any]:
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        runs = list(sdk.evals.runs.list(eval_id))
        if len(runs) >= n and all(r.status in ("completed", "failed", "canceled") for r in runs):
            return {r.name: r for r in runs}
        time.sleep(2)
    raise TimeoutError([(r.name, r.status) for r in sdk.evals.runs.list(eval_id)])
