"""End to end on the real SmolLM2-135M-Instruct: the default method learns a made-up domain.

Two processes convert the bundled GGUF into the same fresh home at once (the race the atomic
rename guards against); the resulting base is then fine-tuned with every default ("auto")
on examples/support-acme.jsonl, facts about a fictional kettle that the base cannot know.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from trainer.config import TrainConfig
from trainer.recipe import train

ROOT = Path(__file__).resolve().parents[2]
ACME = ROOT / "examples" / "support-acme.jsonl"
ACME_VALID = Path(__file__).parent / "data" / "support-acme-valid.jsonl"
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


@pytest.mark.slow
def test_default_adapter_answers_what_the_base_cannot_on_the_numerics_it_is_served_on(
    smollm2_home: RacedHome, tmp_path: Path
) -> None:
    out = tmp_path / "adapter"
    result = train(
        TrainConfig(),
        data_path=ACME,
        validation_path=ACME_VALID,
        out_dir=out,
        home=smollm2_home.home,
    )
    before, after = result.metrics["exact_match_before"], result.metrics["exact_match_after"]
    assert before["train"]["exact"] == 0 and before["validation"]["exact"] == 0
    assert after["train"]["rate"] >= 0.9, after["train"]["samples"]
    assert result.eval_loss_before is not None and result.eval_loss_after is not None
    assert result.eval_loss_after < result.eval_loss_before / 4
    # method auto on a 135M base and a CPU: plain LoRA on the full-precision weights, the
    # numerics serving runs it on (QLoRA here: 20/20 on NF4, 11/20 as served; docs/trainer.md).
    assert (result.metrics["method"], result.metrics["method_requested"]) == ("lora", "auto")
    assert (result.metrics["device"], result.metrics["quantization"]) == ("cpu", "none")
    assert result.exact_match_train_unquantized is None  # trained as served: nothing to redo

    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == BASE
