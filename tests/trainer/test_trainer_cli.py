"""`python -m trainer train`: a run on the tiny model, and bad input named before any model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"LORAPLEX_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "trainer", "train", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_trains_an_adapter(tiny_base: Path, tiny_data: Path, tmp_path: Path) -> None:
    config = tmp_path / "cfg.yaml"
    config.write_text(f"base_model: {tiny_base}\nmethod: lora\nprobe_size: 2\n")
    out = tmp_path / "adapter"
    done = run_cli(
        "--data",
        str(tiny_data),
        "--out",
        str(out),
        "--config",
        str(config),
        "--set",
        "n_epochs=1",
        "--set",
        "batch_size=4",
        home=tmp_path / "home",
    )
    assert done.returncode == 0, done.stderr
    assert "adapter written to" in done.stderr
    assert json.loads((out / "metrics.json").read_text())["steps"] == 3


def test_cli_lists_every_bad_field_and_exits_2(tiny_data: Path, tmp_path: Path) -> None:
    done = run_cli(
        "--data",
        str(tiny_data),
        "--out",
        str(tmp_path / "o"),
        "--set",
        "lora_r=0",
        "--set",
        "method=sideways",
        home=tmp_path,
    )
    assert done.returncode == 2
    assert "lora_r:" in done.stderr and "method:" in done.stderr
    assert not (tmp_path / "o").exists()


def test_cli_names_the_bad_line(tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "q", "completion": "a"}\n{"prompt": "q"}\n')
    done = run_cli(
        "--data",
        str(data),
        "--out",
        str(tmp_path / "o"),
        "--set",
        f"base_model={tmp_path / 'absent'}",
        home=tmp_path,
    )
    assert done.returncode == 2
    assert "line 2:" in done.stderr
