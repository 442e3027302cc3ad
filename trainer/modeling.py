"""Load the base model (quantized or not) on the chosen device and wrap it with LoRA.

Device choices live in one `RuntimePlan` so the recipe and the metrics agree on what ran:
- CUDA: bf16 compute when the GPU supports it, gradient checkpointing on (memory is the limit).
  (Written for real but not run on this project's CPU-only machines; see docs/trainer.md.)
- CPU: bf16 compute when the CPU has AVX512-bf16 (measured faster, docs/trainer.md), else fp32;
  gradient checkpointing off (memory is plentiful, and it halved tokens/s here), and
  attention from `trainer/attention.py` (fp32, per example in packed rows).
On CPU, bitsandbytes repacks 4-bit weights on the first no-grad forward in eval mode and then
backpropagates through `gemv_4bit`, which has no autograd kernel: gradients become silently
wrong. `disable_cpu_4bit_repacking` turns that path off and must run before any such forward.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from trainer.attention import use_cpu_training_attention
from trainer.config import TrainConfig, resolve_method
from trainer.errors import BaseModelError, ConfigError


@dataclass(frozen=True)
class RuntimePlan:
    device: str  # "cuda" | "cpu"
    bf16: bool
    gradient_checkpointing: bool
    quantization: str  # nf4 | fp4 | int8 | none
    method: str = "lora"  # what `method: auto` resolved to (lora | qlora)

    @property
    def compute_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.bf16 else torch.float32


def cpu_supports_bf16() -> bool:
    return bool(torch.backends.cpu.get_cpu_capability() == "AVX512" and _avx512_bf16())


def _avx512_bf16() -> bool:
    try:
        return "avx512_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def weight_bytes_16bit(base_dir: Path | None) -> int:
    """The base's weights in 16 bits (2 bytes a parameter), from its safetensors headers
    (nothing is loaded); 0 when there are none to read."""
    from safetensors import safe_open

    total = 0
    for path in sorted(base_dir.glob("*.safetensors")) if base_dir else []:
        with safe_open(path, framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                total += 2 * math.prod(f.get_slice(key).get_shape())
    return total


def device_memory(device: str) -> int:
    if device == "cuda":
        return int(torch.cuda.get_device_properties(0).total_memory)
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def choose_plan(config: TrainConfig, base_dir: Path | None = None) -> RuntimePlan:
    """Decide device, precision, gradient checkpointing and (for `method: auto`, from the
    size of the base in `base_dir`) the method, for this machine and config."""
    cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    if config.device == "cuda" and not torch.cuda.is_available():
        raise BaseModelError("device 'cuda' requested but no CUDA device is available")
    if config.precision == "auto":
        bf16 = torch.cuda.is_bf16_supported() if cuda else cpu_supports_bf16()
    else:
        bf16 = config.precision == "bf16"
    checkpointing = config.gradient_checkpointing
    if checkpointing == "auto":
        checkpointing = cuda
    device = "cuda" if cuda else "cpu"
    method, quantization = resolve_method(
        config, weight_bytes_16bit=weight_bytes_16bit(base_dir), device_memory=device_memory(device)
    )
    return RuntimePlan(
        device=device,
        bf16=bf16,
        gradient_checkpointing=checkpointing,
        quantization=quantization,
        method=method,
    )


def quantization_config(plan: RuntimePlan) -> BitsAndBytesConfig | None:
    if plan.quantization == "none":
        return None
    if plan.quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=plan.quantization,
        bnb_4bit_use_double_quant=True,  # QLoRA's double quantization: ~0.4 bit/param saved
        bnb_4bit_compute_dtype=plan.compute_dtype,
    )


def load_tokenizer(path: Path) -> Any:
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        raise BaseModelError(f"base model {path}: tokenizer has no chat template")
    return tokenizer


def load_base_model(path: Path, *, plan: RuntimePlan) -> Any:
    """The base model on `plan.device`, quantized per plan, ready for LoRA training."""
    quant = quantization_config(plan)
    # Unquantized weights: bf16 on GPU (halves memory), fp32 on CPU (autocast does the bf16).
    dtype = torch.bfloat16 if plan.device == "cuda" and plan.bf16 else torch.float32
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, quantization_config=quant, device_map={"": plan.device}
        )
    except (OSError, ValueError) as e:
        raise BaseModelError(f"cannot load base model from {path}: {e}") from e
    disable_cpu_4bit_repacking(model)
    if plan.device == "cpu":
        use_cpu_training_attention(model)  # fp32, per example in packed rows (attention.py)
    if quant is not None:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=plan.gradient_checkpointing
        )
    elif plan.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.config.use_cache = False  # the KV cache is useless in training and costs memory
    return model


def disable_cpu_4bit_repacking(model: torch.nn.Module) -> int:
    """Keep bitsandbytes off its CPU repack path (no autograd kernel); return layers touched."""
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


def load_adapter_as_served(base_dir: Path, adapter_dir: Path, *, plan: RuntimePlan) -> Any:
    """The written adapter on the unquantized base, the way serving engines load it."""
    dtype = torch.bfloat16 if plan.device == "cuda" and plan.bf16 else torch.float32
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype, device_map={"": plan.device})
    return PeftModel.from_pretrained(base, adapter_dir).eval()


def lora_config(config: TrainConfig) -> LoraConfig:
    return LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.target_modules,
        task_type="CAUSAL_LM",
        bias="none",
        # Never modules_to_save: vLLM refuses adapters that carry full copies of layers.
        modules_to_save=None,
    )


def check_fits_base(model: Any, config: TrainConfig) -> None:
    """Refuse, before training, module names this base lacks (or that name no linear layer:
    serving engines apply LoRA to linear layers only), every one at once, as `ConfigError`."""
    if not isinstance(config.target_modules, list):
        return  # all-linear
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    problems = [
        f"target_modules: the base model has no linear module {wanted!r}"
        for wanted in config.target_modules
        if not any(n == wanted or n.endswith(f".{wanted}") for n in linear)
    ]
    if problems:
        names = sorted({n.rsplit(".", 1)[-1] for n in linear})
        problems.append(f"target_modules: its linear modules are {', '.join(names)}")
        raise ConfigError("; ".join(problems), problems)


def add_lora(model: Any, config: TrainConfig) -> PeftModel:
    """Wrap `model` with a fresh LoRA adapter, or (`init_adapter`) with that adapter's
    weights, trainable, to continue its training; `name_base` it before saving the result."""
    if config.init_adapter:
        return PeftModel.from_pretrained(model, config.init_adapter, is_trainable=True)
    check_fits_base(model, config)
    torch.manual_seed(config.seed)  # LoRA A init
    return get_peft_model(model, lora_config(config))


def name_base(peft_model: PeftModel, base_name: str) -> None:
    """Have the saved adapter name `base_name` (what serving resolves), not the local path.

    Only for the final save: while training, checkpoints keep the path, because peft looks
    for the base's config.json under that name and, when it is no directory, asks the
    Hugging Face hub, once per checkpoint (network attempts, and warnings when offline).
    """
    peft_model.peft_config["default"].base_model_name_or_path = base_name
