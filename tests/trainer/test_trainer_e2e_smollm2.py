"""The real SmolLM2-135M-Instruct base: converted once, safely, by racing processes.

Two processes convert the bundled GGUF into the same fresh home at once (the race the atomic
rename guards against).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BASE = "smollm2-135m-instruct"
CONVERT = (
    "import sys; from pathlib import Path; from trainer.base_models import resolve_base_model;"
    f"print(resolve_base_model({BASE!r}, home=Path(sys.argv[1])))"
)


@dataclass(frozen=True)
class RacedHome:
    home: Path
    printed: list[str]


@pytest.fixture(scope="module")
def smollm2_home(tmp_path_factory: pytest.TempPathFactory) -> RacedHome:
    home = tmp_path_factory.mktemp("loraplex-home")
    env = os.environ | {"HF_HUB_OFFLINE": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CONVERT, str(home)],
            cwd=ROOT,
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(2)
    ]
    printed = [proc.communicate(timeout=600)[0].strip().splitlines()[-1] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0]
    return RacedHome(home=home, printed=printed)


@pytest.mark.slow
def test_racing_conversions_leave_one_complete_model(smollm2_home: RacedHome) -> None:
    target = smollm2_home.home / "models" / BASE
    assert smollm2_home.printed == [str(target), str(target)]
    leftovers = [p.name for p in target.parent.iterdir() if p.name != BASE]
    assert leftovers == [f".{BASE}.lock"]  # no half-written temp directories
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in target.iterdir()
    }
    assert "quantization_config" not in json.loads((target / "config.json").read_text())


# Training SmolLM2 with every default, and serving what it trained, is the suite's one slow
# training run: tests/test_served_quality.py, through `loraplex up` and the SDK.
