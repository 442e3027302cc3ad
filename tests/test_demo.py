"""`loraplex demo` end to end, on a tiny base model so it runs in the suite (minutes, not ten).

The real demo (`make demo`) runs the same code on SmolLM2 with the examples/ datasets.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
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
    # --keep: the platform stays up for the web console once the demo is done.
    demo_run = subprocess.Popen(
        [LORAPLEX, "demo", "--support", str(support), "--code", str(code),
         "--questions", "3", "--min-match", "0", "--keep"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        out = _until_kept(demo_run)
        console = re.search(r"web console: (http://127\.0\.0\.1:\d+)/console/", out)
        assert console, out[-5000:]
        _console_is_up(console.group(1), tmp_path / "home" / "demo" / "keys.json")
    finally:
        demo_run.send_signal(signal.SIGTERM)  # as Ctrl-C: the demo stops the platform
        out_after, _ = demo_run.communicate(timeout=120)
    out += out_after
    assert demo_run.returncode == 143, out[-5000:]  # ended by SIGTERM, after succeeding
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
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{console.group(1)}/healthz", timeout=5)
    assert "Traceback" not in (demo / "up.log").read_text()


def _until_kept(demo_run: subprocess.Popen[str]) -> str:
    """The demo's output up to the line saying the platform stays up (or its end)."""
    assert demo_run.stdout is not None
    lines = []
    for line in demo_run.stdout:
        lines.append(line)
        if "Ctrl-C stops it" in line:
            break
    out = "".join(lines)
    assert demo_run.poll() is None, out[-5000:]
    return out


def _console_is_up(url: str, keys_path: Path) -> None:
    """The console's page, and the demo's admin key (from its keys file) on the API."""
    assert keys_path.stat().st_mode & 0o777 == 0o600
    keys = json.loads(keys_path.read_text())
    assert set(keys) == {"admin", "support-team", "code-team"}
    page = httpx.get(f"{url}/console/", timeout=10)
    assert (
        page.status_code == 200
        and "frame-ancestors 'none'" in page.headers["content-security-policy"]
    )
    admin = {"Authorization": f"Bearer {keys['admin']}"}
    adapters = httpx.get(f"{url}/v1/admin/adapters", headers=admin, timeout=10).json()["data"]
    assert {a["name"] for a in adapters} == {"support-bot", "code-bot"}
