"""TrainConfig: validation that names every bad field at once, the "auto" rule, YAML + --set."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from trainer.config import (
    BUILTIN_BASE_MODELS,
    TrainConfig,
    load_config,
    parse_config,
    resolve_hyperparameters,
    resolve_method,
)
from trainer.errors import ConfigError


def test_defaults_are_auto_method_on_the_bundled_base() -> None:
    config = TrainConfig()
    assert config.base_model in BUILTIN_BASE_MODELS
    assert config.method == "auto"
    assert (config.lora_r, config.lora_alpha, config.target_modules) == (16, 32, "all-linear")
    assert TrainConfig(method="lora").resolved_quantization == "none"
    assert TrainConfig(method="qlora").resolved_quantization == "nf4"


def test_auto_method_trains_plain_lora_where_the_16_bit_base_fits() -> None:
    """QLoRA is for memory: a base whose 16-bit weights take <= 40% of the device trains
    (and is then served) at full precision; a bigger one is quantized to NF4."""
    gib = 1 << 30
    auto = TrainConfig()
    smollm2_on_cpu = resolve_method(auto, weight_bytes_16bit=gib // 4, device_memory=24 * gib)
    assert smollm2_on_cpu == ("lora", "none")
    eight_b_on_24gb_gpu = resolve_method(auto, weight_bytes_16bit=16 * gib, device_memory=24 * gib)
    assert eight_b_on_24gb_gpu == ("qlora", "nf4")
    assert resolve_method(auto, weight_bytes_16bit=16 * gib, device_memory=80 * gib)[0] == "lora"
    # Explicit choices stand; with auto, a quantization picks the method.
    for config, expected in [
        (TrainConfig(method="qlora"), ("qlora", "nf4")),
        (TrainConfig(method="lora"), ("lora", "none")),
        (TrainConfig(quantization="int8"), ("qlora", "int8")),
        (TrainConfig(quantization="none"), ("lora", "none")),
    ]:
        assert resolve_method(config, weight_bytes_16bit=gib, device_memory=64 * gib) == expected


def test_every_field_has_a_help_string() -> None:
    missing = [name for name, f in TrainConfig.model_fields.items() if not f.description]
    assert missing == []


def test_all_field_errors_are_reported_together() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"lora_r": 0, "n_epochs": "many", "warmup_ratio": 2, "lr": 1e-3})
    fields = {problem.split(":")[0] for problem in info.value.problems}
    assert fields == {"lora_r", "n_epochs", "warmup_ratio", "lr"}
    assert "lr: Extra inputs are not permitted" in info.value.problems


def test_all_cross_field_errors_are_reported_together() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(
            {
                "method": "lora",
                "quantization": "nf4",
                "lr_scheduler": "constant",
                "n_epochs": 0,
                "early_stopping_patience": 2,
            }
        )
    fields = sorted(problem.split(":")[0] for problem in info.value.problems)
    assert fields == ["eval_interval", "n_epochs", "quantization", "warmup_ratio"]


def test_qlora_refuses_an_unquantized_base() -> None:
    with pytest.raises(ConfigError, match="quantization: method 'qlora'"):
        parse_config({"method": "qlora", "quantization": "none"})


@pytest.mark.parametrize(
    ("n_examples", "epochs", "batch"),
    [(10, 25, 5), (20, 25, 8), (24, 21, 8), (50, 10, 8), (100, 5, 8), (1000, 3, 8)],
)
def test_auto_hyperparameters_learn_small_datasets(
    n_examples: int, epochs: int, batch: int
) -> None:
    hp = resolve_hyperparameters(TrainConfig(), n_examples=n_examples)
    assert (hp.n_epochs, hp.batch_size) == (epochs, batch)
    assert hp.learning_rate == pytest.approx(1e-3)


def test_explicit_hyperparameters_are_kept() -> None:
    config = TrainConfig(n_epochs=2, batch_size=3, learning_rate_multiplier=0.5)
    hp = resolve_hyperparameters(config, n_examples=20)
    assert (hp.n_epochs, hp.batch_size, hp.learning_rate) == (2, 3, pytest.approx(1e-4))


def test_yaml_file_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text("method: lora\nlora_r: 8\ntarget_modules: [q_proj, v_proj]\n")
    config = load_config(path, overrides=["lora_r=4", "n_epochs=auto", "packing=true"])
    assert (config.method, config.lora_r, config.packing) == ("lora", 4, True)
    assert config.target_modules == ["q_proj", "v_proj"]


def test_bad_override_names_the_field() -> None:
    with pytest.raises(ConfigError, match="batch_size"):
        load_config(None, overrides=["batch_size=lots"])
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(None, overrides=["batch_size"])


def test_config_module_imports_no_torch() -> None:
    code = "import sys, trainer.config; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
