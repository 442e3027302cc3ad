"""`loraplex export`: a version, downloaded over the API and merged into its base, is a
plain transformers model that computes what base + adapter compute through peft."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from api.settings import Settings
from tests.api.conftest import TINY, add_version
from tests.conftest import new_tenant, serve_in_thread

LORAPLEX = str(Path(sys.executable).parent / "loraplex")


def export(url: str, key: str, *args: str, settings: Settings) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "LORAPLEX_HOME": str(settings.home),
        "LORAPLEX_BASE_MODELS": json.dumps(settings.base_models),
        "LORAPLEX_URL": url,
        "LORAPLEX_API_KEY": key,
    }
    return subprocess.run(
        [LORAPLEX, "export", *args], capture_output=True, text=True, env=env, timeout=300
    )


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_an_exported_version_computes_what_base_plus_adapter_compute(
    settings: Settings, tiny_llama: Path, tiny_adapter: Path, tmp_path: Path
) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    settings = settings.model_copy(update={"base_models": {TINY: str(tiny_llama)}})
    tenant_id, key = new_tenant(settings)
    version = add_version(settings, tiny_adapter, tenant_id=tenant_id, suffix="exported")
    out = tmp_path / "merged"
    with serve_in_thread(settings) as url:
        done = export(url, key, "exported", "--out", str(out), settings=settings)
        assert done.returncode == 0, done.stderr
        assert f"exported {version.fine_tuned_model} merged into {TINY}" in done.stdout
        assert "... downloading exported" in done.stderr  # progress, step by step

        again = export(url, key, "exported", "--out", str(out), settings=settings)
        assert again.returncode == 1 and "exists and is not empty" in again.stderr
        unknown = export(url, key, "nope", "--out", str(tmp_path / "x"), settings=settings)
        assert unknown.returncode == 1 and "No adapter named 'nope'" in unknown.stderr
        assert not (tmp_path / "x").exists()

    record = json.loads((out / "loraplex-export.json").read_text())
    assert record["fine_tuned_model"] == version.fine_tuned_model and record["version"] == 1
    assert list(out.glob("*.safetensors")) and (out / "tokenizer_config.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template  # the base's chat template travels with it
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What colour is the sky?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.inference_mode():
        merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(**ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
        plain = base(**ids).logits
        peft = PeftModel.from_pretrained(base, tiny_adapter).eval()(**ids).logits
    assert torch.allclose(merged, peft, atol=1e-4)
    assert not torch.allclose(plain, peft, atol=1e-4)  # the adapter changes the answer
