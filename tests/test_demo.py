"""`loraplex demo` end to end, on a tiny base model so it runs in the suite (minutes, not ten).

The real demo (`make demo`) runs the same code on SmolLM2 with the examples/ datasets.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.trainer.trainer_testdata import TINY_FACTS, chat_row, write_jsonl

LORAPLEX = str(Path(sys.executable).parent / "loraplex")


@pytest.mark.timeout(900)
def test_demo_runs_the_whole_flow_through_the_public_api(
    tmp_path: Path, learnable_llama: Path
) -> None:
    support = write_jsonl(tmp_path / "support.jsonl", [chat_row(q, a) for q, a in TINY_FACTS])
    code = write_jsonl(
        tmp_path / "code.jsonl", [chat_row(q.replace("What", "Tell me"), a) for q, a in TINY_FACTS]
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAPLEX_")}
    env.update(
        HF_HUB_OFFLINE="1",
        LORAPLEX_HOME=str(tmp_path / "home"),
        LORAPLEX_BASE_MODEL="tiny-llama",
        # A base that learns (tests/conftest.py): the demo promotes, and a version that
        # learned nothing would need `force`.
        LORAPLEX_BASE_MODELS=json.dumps({"tiny-llama": str(learnable_llama)}),
        LORAPLEX_SERVING_ENGINE="transformers",  # the 64-wide test Llama is too small for vLLM
    )
    r = subprocess.run(
        [
            LORAPLEX,
            "demo",
            "--support",
            str(support),
            "--code",
            str(code),
            "--questions",
            "3",
            "--min-match",
            "0",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=850,
    )
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-5000:]
    for step in (
        "tenants support-team and code-team",
        "promoted support-bot",
        "promoted code-bot",
        "support-team: base model vs support-bot",
        "demo succeeded",
    ):
        assert step in out, out[-5000:]
    demo = tmp_path / "home" / "demo"
    summary = json.loads((demo / "summary.json").read_text())
    assert set(summary) == {"support-bot", "code-bot"}
    for run in summary.values():
        assert run["fine_tuned_model"].startswith("ft:tiny-llama:")
        assert run["trained_tokens"] > 0 and run["adapter_bytes"] > 0
        assert len(run["answers"]) == 3 and all(a["adapter"] for a in run["answers"])
    assert (demo / "support-bot-loss.png").read_bytes().startswith(b"\x89PNG")
    # Everything it started has stopped: the platform's port no longer answers.
    assert "Traceback" not in (demo / "up.log").read_text()
