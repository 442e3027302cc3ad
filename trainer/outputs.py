"""What a finished run writes next to its adapter: metrics.json, train_config.json, loss.png.

out_dir/
  adapter_config.json         peft; base_model_name_or_path = the registered base name
  adapter_model.safetensors   LoRA weights only (no modules_to_save)
  metrics.json                see `METRICS_KEYS` and docs/trainer.md
  train_config.json           the config with "auto" values resolved
  loss.png                    training (and eval) loss per step
"""

from __future__ import annotations

import json
import os
from importlib import metadata
from pathlib import Path
from typing import Any

VERSIONED_PACKAGES = ("torch", "transformers", "peft", "trl", "bitsandbytes")


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write atomically, so a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def plot_loss(path: Path, *, curve: list[dict[str, float]], evals: list[dict[str, float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on workers
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([p["step"] for p in curve], [p["loss"] for p in curve], label="train loss")
    if evals:
        ax.plot([p["step"] for p in evals], [p["eval_loss"] for p in evals], "o-", label="eval")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
