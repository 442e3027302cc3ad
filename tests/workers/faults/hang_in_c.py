"""Fault injection: run the command in argv[1:] (a `loraplex worker`) with a trainer that,
for jobs of LoRA rank 7, hangs inside C code holding the GIL, as peft did matching a
tenant's catastrophic `target_modules` regex (issue 13). Other jobs train normally."""

from __future__ import annotations

import re
import runpy
import sys
from typing import Any

import trainer.modeling

CATASTROPHIC = r"(?:[a-z_0-9]*[a-z_0-9]*\.?)*X"
real_add_lora = trainer.modeling.add_lora


def add_lora(model: Any, config: Any) -> Any:
    if config.lora_r == 7:
        re.fullmatch(CATASTROPHIC, "model.layers.0.self_attn.q_proj" * 4)  # minutes, GIL held
    return real_add_lora(model, config)


trainer.modeling.add_lora = add_lora
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
