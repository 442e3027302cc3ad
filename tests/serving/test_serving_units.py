"""Small pieces of the gateway, without engines: routing, error mapping, decoding, the zero
adapter, and the import boundary (the control plane never loads torch, gateway or not)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from serving.engines.textgen import RowDecoder
from serving.errors import upstream_error
from serving.replicas import vllm_lora_rank
from serving.router import Replica, choose_replica, eviction_order
from serving.zero_adapter import ensure_zero_adapter


def test_control_plane_with_gateway_imports_no_ml_stack() -> None:
    code = (
        "import sys; from api.main import create_app; create_app(with_gateway=True);"
        "import serving.app, serving.engines.vllm, serving.engines.transformers;"
        "print([m for m in ('torch', 'vllm', 'transformers', 'peft') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_requests_go_where_the_adapter_is_else_to_the_least_loaded() -> None:
    a, b, c = Replica("a", healthy=True), Replica("b", healthy=True), Replica("c")
    a.inflight, b.inflight = 3, 1
    a.touch("x")
    assert choose_replica([a, b, c], adapter="x") is a  # holds it, not much busier
    assert choose_replica([a, b, c], adapter="y") is b  # least loaded healthy one
    a.inflight = 9
    assert choose_replica([a, b, c], adapter="x") is b  # a holder too busy: spread
    assert choose_replica([a, b, c], adapter="x", exclude={"a", "b"}) is None  # c is down


def test_eviction_is_lru_and_spares_pinned_and_busy_adapters() -> None:
    replica = Replica("a", healthy=True)
    for name in ("zero", "old", "busy", "new"):
        replica.touch(name)
    replica.in_use["busy"] = 1
    assert eviction_order(replica, budget=4, pinned={"zero"}) == ["old"]
    assert eviction_order(replica, budget=3, pinned={"zero"}) == ["old", "new"]
    assert eviction_order(replica, budget=8, pinned=set()) == []


@pytest.mark.parametrize(
    ("status", "expected", "code"),
    [(400, 400, "invalid_request"), (404, 404, "not_found"), (409, 400, "invalid_request"),
     (422, 400, "invalid_request"), (500, 500, "engine_error")],
)  # fmt: skip
def test_vllm_errors_become_openai_errors(status: int, expected: int, code: str) -> None:
    body = {"error": {"message": "boom", "type": "BadRequestError", "param": None, "code": status}}
    error = upstream_error(status, body)
    assert (error.status_code, error.code, error.message) == (expected, code, "boom")


class CharTokenizer:
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids)


def test_decoder_holds_back_a_possible_stop_string_and_cuts_at_it() -> None:
    decoder = RowDecoder(CharTokenizer(), stops=["END"], limit=100, eos_ids={0})
    shown = "".join(decoder.push(ord(ch)) for ch in "abcEN")
    assert shown == "abc"  # "EN" might start "END"
    assert decoder.push(ord("D")) == "" and decoder.finish_reason == "stop"
    limited = RowDecoder(CharTokenizer(), stops=[], limit=2, eos_ids={0})
    assert limited.push(ord("a")) + limited.push(ord("b")) == "ab"
    assert limited.finish_reason == "length"
    eos = RowDecoder(CharTokenizer(), stops=[], limit=9, eos_ids={0})
    assert eos.push(ord("a")) + eos.push(0) == "a" and eos.finish_reason == "stop"


def test_zero_adapter_is_a_valid_all_zero_peft_adapter(tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    base = tmp_path / "base"
    base.mkdir()
    config = {"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 3}
    (base / "config.json").write_text(json.dumps(config))
    zero = ensure_zero_adapter(base_dir=base, base_name="b", root=tmp_path / "cache")
    weights = load_file(zero.path / "adapter_model.safetensors")
    assert len(weights) == 6 and all(not w.any() for w in weights.values())
    assert weights["base_model.model.model.layers.2.self_attn.q_proj.lora_B.weight"].shape == (
        64,
        1,
    )
    adapter_config = json.loads((zero.path / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == "b" and adapter_config["r"] == 1
    assert ensure_zero_adapter(base_dir=base, base_name="b", root=tmp_path / "cache") == zero


def test_lora_rank_rounds_up_to_one_vllm_accepts() -> None:
    assert [vllm_lora_rank(r) for r in (1, 8, 9, 64, 100, 999)] == [1, 8, 16, 64, 128, 512]


def test_trimming_after_a_burst_unloads_only_idle_adapters() -> None:
    replica = Replica("a", healthy=True)
    for name in ("zero", "a", "b", "c", "d", "e"):
        replica.touch(name)
    replica.in_use["e"] = 1
    assert eviction_order(replica, budget=4, pinned={"zero"}, incoming=0) == ["a", "b"]


def test_replicas_on_the_cpu_build_serve_in_float32_unless_told_otherwise(tmp_path: Path) -> None:
    """Issue 20: bf16 on vLLM's CPU kernels makes greedy answers depend on the batch (13 of
    24 base answers changed under load, none in float32: docs/benchmarks.md)."""
    import importlib.util

    from api.settings import Settings
    from serving.replicas import replica_command

    if importlib.util.find_spec("vllm") is None:
        pytest.skip("needs vllm (the CPU build)")

    def dtype(**values: object) -> str:
        command = replica_command(
            Settings(home=tmp_path, **values), model_dir=tmp_path, served_name="b", port=1
        )
        return command[command.index("--dtype") + 1]

    assert dtype() == "float32"
    assert dtype(serving_dtype="bfloat16") == "bfloat16"


def test_replicas_keep_lora_weights_as_the_setting_says(tmp_path: Path) -> None:
    """`serving_lora_dtype`: the replica's own dtype unless told (vLLM's --lora-dtype); a
    base-only replica takes no LoRA flags at all."""
    from api.settings import Settings
    from serving.replicas import replica_command

    def command(lora: bool = True, **values: object) -> list[str]:
        return replica_command(Settings(home=tmp_path, **values), model_dir=tmp_path,
                               served_name="b", port=1, lora=lora)  # fmt: skip

    assert "--lora-dtype" not in command()
    with_bf16 = command(serving_lora_dtype="bfloat16")
    assert with_bf16[with_bf16.index("--lora-dtype") + 1] == "bfloat16"
    assert "--lora-dtype" not in command(lora=False, serving_lora_dtype="bfloat16")
    with pytest.raises(ValueError):
        Settings(home=tmp_path, serving_lora_dtype="int8")
