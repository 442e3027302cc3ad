"""What `loraplex up` puts on the console on a first start and one fine-tune (issue 21,
items 8 and 10): lines a person can read, levels that mean something, no progress bars, no
attempts to reach the network, and each start-up step up to "ready to serve at ..."."""

from __future__ import annotations

import logging
import re
import shutil
import time
from pathlib import Path

import httpx
import pytest

from api.settings import Settings
from serving.setup import say_building
from tests.workers.conftest import tiny_dataset, wait_for_status
from tests.workers.test_up import Up, _stop
from trainer.config import DEFAULT_BASE_MODEL

pytestmark = pytest.mark.timeout(300)

PROGRESS_BAR = re.compile(r"it/s\]|s/it\]|examples/s\]|\d%\|")
NETWORK = ("Unable to fetch remote file", "Name or service not known", "huggingface.co")
FORM = "application/x-www-form-urlencoded"  # what `curl -d` sends
# A log record at WARNING or above in any of the formats on this console: ours and Celery's
# ("... WARNING name: ..."), uvicorn's ("WARNING:  ..."), Python warnings ("UserWarning: ").
WARNING_LINE = re.compile(r" (WARNING|ERROR|CRITICAL) |^(WARNING|ERROR|CRITICAL):|Warning: ")


def _wait_for_line(log: Path, text: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text(errors="replace"):
        assert time.monotonic() < deadline, f"no {text!r} in:\n{log.read_text()}"
        time.sleep(0.2)


def test_a_first_start_and_one_fine_tune_leave_a_readable_log(
    tmp_path: Path, tiny_llama: Path
) -> None:
    # The default base, named as a new user's install names it (not a path), with its
    # one-time conversion already cached: the tiny model stands in for SmolLM2. The rest of
    # LORAPLEX_HOME is fresh, and HF_HUB_OFFLINE is not set, as in a new user's shell.
    shutil.copytree(tiny_llama, tmp_path / ".loraplex" / "models" / DEFAULT_BASE_MODEL)
    up = Up(tmp_path, tiny_llama, OMP_NUM_THREADS="1", LORAPLEX_SERVING_ENGINE="transformers")
    for name in ("HF_HUB_OFFLINE", "LORAPLEX_BASE_MODELS"):
        up.env.pop(name)
    log = tmp_path / "up.log"
    proc = up.start(log.name)
    try:
        sdk = up.sdk()
        file_id = sdk.files.create(file=("t.jsonl", tiny_dataset()), purpose="fine-tune").id
        job = sdk.fine_tuning.jobs.create(
            model=DEFAULT_BASE_MODEL,
            training_file=file_id,
            hyperparameters={"n_epochs": 2, "batch_size": 4},
        )
        done = wait_for_status(sdk, job.id, {"succeeded", "failed"}, timeout=180)
        assert done.status == "succeeded", done.error
        _wait_for_line(log, "ready to serve at")
        # As curl sends it: `curl -d '{...}'` with no -H "Content-Type: application/json".
        answer = httpx.post(
            f"{up.url}/v1/chat/completions",
            content=f'{{"model": "{done.fine_tuned_model}", "max_tokens": 4, '
            '"messages": [{"role": "user", "content": "hi"}]}',
            headers={"Authorization": f"Bearer {sdk.api_key}", "Content-Type": FORM},
            timeout=60,
        )
        assert answer.status_code == 200, answer.text
    finally:
        assert _stop(proc) == 0
    lines = log.read_text(errors="replace").splitlines()

    assert [line for line in lines if PROGRESS_BAR.search(line)] == []
    assert [line for line in lines if any(text in line for text in NETWORK)] == []
    assert [line for line in lines if WARNING_LINE.search(line)] == []
    said = "\n".join(lines)
    assert "starting the training worker (pid " in said
    assert f"starting the serving engine: {DEFAULT_BASE_MODEL} in process (transformers)" in said
    assert f"INFO serving.setup: ready to serve at {up.url}" in said


def test_a_base_that_must_convert_first_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings(home=tmp_path / "home", database_url=f"sqlite:///{tmp_path}/db")
    with caplog.at_level(logging.INFO, logger="serving.setup"):
        say_building(settings)
    assert caplog.messages == [
        f"converting the base model {DEFAULT_BASE_MODEL} for serving (first start only; a few "
        "minutes): chat and completions answer 503 until it is ready"
    ]
    (settings.home / "models" / DEFAULT_BASE_MODEL).mkdir(parents=True)
    (settings.home / "models" / DEFAULT_BASE_MODEL / "config.json").write_text("{}")
    caplog.clear()
    say_building(settings)  # converted once: nothing to say
    assert caplog.messages == []
