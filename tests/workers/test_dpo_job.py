"""A DPO job through the official SDK and a real worker: it trains, registers a version whose
metrics carry the preferred-vs-rejected margin, and answers in OpenAI's shape throughout."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest

from tests.trainer.trainer_testdata import TINY_FACTS
from tests.workers.conftest import TINY, versions, wait_for_status

pytestmark = pytest.mark.timeout(600)


def tiny_preferences() -> bytes:
    """Each fact's answer preferred over the next fact's."""
    answers = [a for _, a in TINY_FACTS]
    rows = [
        {
            "input": {"messages": [{"role": "user", "content": q}]},
            "preferred_output": [{"role": "assistant", "content": a}],
            "non_preferred_output": [
                {"role": "assistant", "content": answers[(i + 1) % len(answers)]}
            ],
        }
        for i, (q, a) in enumerate(TINY_FACTS)
    ]
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_dpo_job_trains_and_registers_a_version(
    sdk: openai.OpenAI, start_worker, settings
) -> None:
    start_worker()
    data = sdk.files.create(file=("prefs.jsonl", tiny_preferences()), purpose="fine-tune").id
    hp = {"n_epochs": 6, "batch_size": 4, "beta": 0.2, "method": "lora",
          "learning_rate_multiplier": 10}  # fmt: skip
    method: Any = {"type": "dpo", "dpo": {"hyperparameters": hp}}  # with Loraplex's own knobs
    job = sdk.fine_tuning.jobs.create(model=TINY, training_file=data, suffix="prefs", method=method)
    done = wait_for_status(sdk, job.id, {"succeeded", "failed", "cancelled"})
    assert done.status == "succeeded", done.error
    assert done.method and done.method.type == "dpo" and done.method.dpo
    assert done.method.dpo.hyperparameters and done.method.dpo.hyperparameters.beta == 0.2
    steps = [e for e in sdk.fine_tuning.jobs.list_events(job.id, limit=100) if e.type == "metrics"]
    assert steps[0].message == "Step 18/18: " + steps[0].message.split(": ", 1)[1]
    data_keys: Any = steps[0].data
    assert {"train_loss", "train_reward_margin"} <= set(data_keys)

    (version,) = versions(settings, job.id)
    assert version.fine_tuned_model == done.fine_tuned_model
    assert version.metrics["objective"] == "dpo"
    margin = version.metrics["preference"]
    before, after = margin["margin_before"]["train"], margin["margin_after"]["train"]
    assert after["margin"] > before["margin"], margin
