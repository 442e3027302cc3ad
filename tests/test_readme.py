"""The README's quick start and admin lines, run as they are written against `loraplex up`.

Every fenced block after a `<!-- readme-test: NAME -->` comment in README.md is cut into its
commands (a line and its `\\` continuations) and run by one bash, in order, so a line's
variables reach the next; the run stops at the first command that fails. What differs from
a reader's terminal is in the environment only, never in the lines:
- `loraplex up` listens on a free port, so the README's one origin, `http://127.0.0.1:8000`,
  is replaced by it (two test runs on one machine must not meet);
- the name `smollm2-135m-instruct` is registered onto a stand-in: the tiny test Llama, first
  taught to answer the tiny facts wrongly (so it stops where an answer ends, as an instruct
  model does), served in-process; `examples/support-acme.jsonl`, in the folder the lines
  run in, holds the right answers. The fine-tune takes seconds and learns something
  measurable, as the README's does on the real base (a version that did not needs `force`);
- `curl` is a shell function that runs curl with `--fail-with-body` and insists on a JSON
  answer: a line whose call answers 4xx or 5xx, or not JSON, fails;
- between the admin and canary blocks the test trains version 2 (the README says so in words).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.trainer.trainer_testdata import TINY_FACTS, chat_row, write_jsonl
from tests.workers.conftest import LORAPLEX
from tests.workers.test_up import Up

pytestmark = pytest.mark.timeout(300)

README = Path(__file__).parent.parent / "README.md"
ORIGIN = "http://127.0.0.1:8000"
BASE = "smollm2-135m-instruct"
MARK = re.compile(r"<!-- readme-test: ([\w-]+) -->\s*```bash\n(.*?)```", re.DOTALL)
RUN = ["quickstart", "admin", "<train version 2>", "canary"]

PRELUDE = r"""
set -euo pipefail
curl() {
    local out
    out=$(command curl --fail-with-body -sS "$@") || {
        printf 'curl %s\n  failed: %s\n' "$*" "$out" >&2; return 22; }
    jq -e . >/dev/null <<<"$out" || {
        printf 'curl %s\n  not JSON: %s\n' "$*" "$out" >&2; return 1; }
    printf '%s\n' "$out"
}
"""
# The test's own step, in the README's variables: version 2 of the adapter.
TRAIN_V2 = r"""
JOB=$(curl -s $API/fine_tuning/jobs -H "$H" -H "Content-Type: application/json" \
      -d '{"model": "smollm2-135m-instruct", "training_file": "'$FILE'", "suffix": "support-bot"}' \
      | jq -r .id)
until curl -s $API/fine_tuning/jobs/$JOB -H "$H" | jq -re 'select(.finished_at) | .status'
do sleep 1; done
"""


def readme_blocks(text: str) -> dict[str, list[str]]:
    """Marked block name -> its commands, each a line plus its continuation lines."""
    blocks: dict[str, list[str]] = {}
    for name, body in MARK.findall(text):
        commands: list[str] = []
        for line in body.splitlines():
            if commands and commands[-1].endswith("\\"):
                commands[-1] += "\n" + line
            elif line.strip() and not line.lstrip().startswith("#"):
                commands.append(line)
        blocks[name] = commands
    return blocks


def _json(out: str) -> dict[str, Any]:
    return dict(json.loads(out))


def _chat(out: str) -> bool:
    body = _json(out)
    return body["object"] == "chat.completion" and body["choices"][0]["message"]["role"] == (
        "assistant"
    )


# Newest first: what the admin lines did, and nothing else.
AUDIT = ["rollback", "canary.promote", "canary.set", "canary.abort", "canary.set"]
AUDIT += ["promote.production"]
# (a pattern a command matches, what its output must satisfy). Every pattern must match.
EXPECT: list[tuple[str, Callable[[str], bool]]] = [
    (r"select\(\.finished_at\)", lambda out: out.strip() == "succeeded"),
    (r"/events", lambda out: bool(out.strip())),
    (r"fine_tuned_model\)", lambda out: out == ""),
    (r"chat/completions", _chat),
    (r"\$U/adapters -H", lambda out: "support-bot" in out),
    (r"versions/1/promote", lambda out: _json(out)["production_version"] == 1),
    (r'"version": 2, "percent"', lambda out: _json(out)["canary_version"] == 2),
    (r"canary/abort", lambda out: _json(out)["canary_version"] is None),
    (r"canary/promote", lambda out: _json(out)["production_version"] == 2),
    (r"/rollback", lambda out: _json(out)["production_version"] == 1),
    (r"/audit", lambda out: out.split() == AUDIT),
]


def _script(blocks: dict[str, list[str]], url: str) -> tuple[str, list[str]]:
    """The bash script, and the command each of its `::: N` markers stands for."""
    commands: list[str] = []
    for name in RUN:
        if name == "<train version 2>":
            commands.append(TRAIN_V2.strip())
        else:
            commands += [c.replace(ORIGIN, url) for c in blocks[name]]
    lines = [PRELUDE]
    for i, command in enumerate(commands):
        lines += [f"printf '\\n::: {i}\\n'", command]
    return "\n".join(lines) + "\n", commands


def test_the_readme_blocks_are_found() -> None:
    blocks = readme_blocks(README.read_text())
    assert set(RUN) - {"<train version 2>"} <= set(blocks)
    quickstart = "\n".join(blocks["quickstart"])
    assert "loraplex admin create-tenant" in quickstart and "chat/completions" in quickstart
    admin = "\n".join(blocks["admin"] + blocks["canary"])
    assert "create-key --admin" in admin
    for action in ("promote", "canary", "canary/promote", "canary/abort", "rollback"):
        assert f"/{action}" in admin, action


def test_the_readme_quick_start_and_admin_lines_work_as_written(
    tmp_path: Path, tiny_llama: Path, learnable_llama: Path
) -> None:
    blocks = readme_blocks(README.read_text())
    base = learnable_llama
    rows = [chat_row(q, a) for q, a in TINY_FACTS] * 2
    (tmp_path / "examples").mkdir()
    write_jsonl(tmp_path / "examples" / "support-acme.jsonl", rows)
    up = Up(
        tmp_path,
        tiny_llama,
        OMP_NUM_THREADS="1",  # tiny matmuls: threads only contend (tests/workers/conftest.py)
        LORAPLEX_BASE_MODELS=json.dumps({BASE: str(base)}),
        LORAPLEX_SERVING_ENGINE="transformers",
    )
    script, commands = _script(blocks, up.url)
    proc = up.start("up.log")
    try:
        env = {**up.env, "PATH": f"{Path(LORAPLEX).parent}{os.pathsep}{os.environ['PATH']}"}
        ran = subprocess.run(
            ["bash", "-c", script],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
        )
    finally:
        proc.terminate()
        proc.wait(60)
    outputs = _outputs(ran.stdout)
    transcript = "\n".join(f"$ {commands[i]}\n{out}" for i, out in sorted(outputs.items()))
    assert ran.returncode == 0, f"{transcript}\n{ran.stderr}\n{(tmp_path / 'up.log').read_text()}"
    assert sorted(outputs) == list(range(len(commands)))
    for pattern, check in EXPECT:
        matched = [i for i, c in enumerate(commands) if re.search(pattern, c)]
        assert matched, f"no README command matches {pattern!r}: update EXPECT with the README"
        for i in matched:
            assert check(outputs[i]), f"$ {commands[i]}\n{outputs[i]}"


def _outputs(stdout: str) -> dict[int, str]:
    """Command index -> what it printed, from the `::: N` markers."""
    parts = re.split(r"\n::: (\d+)\n", "\n" + stdout)
    return {int(parts[i]): parts[i + 1] for i in range(1, len(parts), 2)}
