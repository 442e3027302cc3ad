"""Export: one adapter version merged into its base, as a plain transformers model directory.

For use elsewhere (another server, llama.cpp after a GGUF conversion, a hub upload): the
version's files come from a Loraplex deployment over its API (`GET /v1/adapters/{name}` and
`.../versions/{n}/files`, each file checked against the sha256 the API sends), the base from
this machine (a built-in is converted once, as the trainer does). peft merges W + (alpha/r)·BA
into each adapted weight; the result is saved as safetensors with the tokenizer and its chat
template, plus `loraplex-export.json` saying what it was made from.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from trainer.base_models import resolve_base_model

EXPORT_RECORD = "loraplex-export.json"
DTYPES = ("float32", "bfloat16", "float16")


class ExportError(Exception):
    """The export cannot be made (the version, its files, the base); the message says why."""


@dataclass(frozen=True)
class Exported:
    out_dir: Path
    fine_tuned_model: str
    base_model: str
    size_bytes: int


def pick_version(adapter: dict[str, Any], number: int | None) -> dict[str, Any]:
    """The asked-for version; by default the production one, else the newest servable."""
    versions = adapter.get("versions") or []
    if number is not None:
        found = next((v for v in versions if v["version"] == number), None)
        if found is None:
            raise ExportError(f"adapter {adapter['name']!r} has no version {number}")
        return found
    production = next((v for v in versions if v["stage"] == "production"), None)
    servable = [v for v in versions if v["stage"] != "rejected"]
    if production is None and not servable:
        raise ExportError(f"adapter {adapter['name']!r} has no version to export")
    return production or max(servable, key=lambda v: v["version"])


def download_version(
    client: httpx.Client, name: str, number: int | None, dest: Path
) -> dict[str, Any]:
    """Fetch and verify the version's files into `dest`; returns the version object."""
    response = client.get(f"/v1/adapters/{name}")
    _raise_for(response)
    version = pick_version(response.json(), number)
    files = client.get(f"/v1/adapters/{name}/versions/{version['version']}/files")
    _raise_for(files)
    digests = json.loads(files.headers.get("x-loraplex-files-sha256", "{}"))
    with tarfile.open(fileobj=io.BytesIO(files.content), mode="r:") as tar:
        for member in tar.getmembers():
            if not member.isfile() or Path(member.name).name != member.name:
                continue  # the API sends flat regular files; anything else is not ours
            data = tar.extractfile(member)
            assert data is not None
            content = data.read()
            if hashlib.sha256(content).hexdigest() != digests.get(member.name):
                raise ExportError(f"{member.name} does not match the sha256 the API sent")
            (dest / member.name).write_bytes(content)
    missing = set(digests) - {p.name for p in dest.iterdir()}
    if missing:
        raise ExportError(f"the download lacks {', '.join(sorted(missing))}")
    return version


def _raise_for(response: httpx.Response) -> None:
    if response.is_success:
        return
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text[:300]
    raise ExportError(f"{response.request.url.path}: HTTP {response.status_code}: {message}")


def merge(base_dir: Path, adapter_dir: Path, out_dir: Path, *, dtype: str = "float32") -> int:
    """Merge the adapter into the base and save it (safetensors, tokenizer, chat template);
    returns the weights' size in bytes."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = getattr(torch, dtype)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch_dtype)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    merged.save_pretrained(out_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out_dir)
    return sum(p.stat().st_size for p in out_dir.glob("*.safetensors"))


def export_version(
    *,
    url: str,
    key: str,
    name: str,
    out_dir: Path,
    home: Path,
    base_models: dict[str, str],
    number: int | None = None,
    dtype: str = "float32",
    step: Callable[[str], None] = lambda _: None,
) -> Exported:
    """Download version `number` (default: production) of adapter `name`, merge, save."""
    if dtype not in DTYPES:
        raise ExportError(f"dtype must be one of {', '.join(DTYPES)}")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ExportError(f"{out_dir} exists and is not empty")
    with tempfile.TemporaryDirectory(prefix="loraplex-export-") as tmp:
        adapter_dir = Path(tmp) / "adapter"
        adapter_dir.mkdir()
        step(f"downloading {name} from {url}")
        headers = {"Authorization": f"Bearer {key}"}
        with httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=300) as client:
            version = download_version(client, name, number, adapter_dir)
        base_name = version["base_model"]
        source = base_models.get(base_name, base_name)
        step(f"loading the base model {base_name}")
        base_dir = resolve_base_model(source, home=home)
        step(f"merging {version['id']} into {base_name} ({dtype})")
        staging = out_dir.with_name(f".{out_dir.name}.partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            size = merge(base_dir, adapter_dir, staging, dtype=dtype)
            record = {
                "fine_tuned_model": version["id"],
                "adapter": name,
                "version": version["version"],
                "base_model": base_name,
                "dtype": dtype,
                "adapter_files": {rel: info["sha256"] for rel, info in version["files"].items()},
            }
            (staging / EXPORT_RECORD).write_text(json.dumps(record, indent=2))
            if out_dir.exists():
                out_dir.rmdir()  # empty, checked above
            staging.rename(out_dir)  # a finished export or none: never half a model
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return Exported(out_dir, version["id"], base_name, size)
