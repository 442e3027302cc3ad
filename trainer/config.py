"""The typed training config and its "auto" hyperparameter rule. Imports no torch.

The control plane imports this module to validate a job's hyperparameters and to report the
values "auto" resolved to; workers pass the same object to `trainer.recipe.train`.

`TrainConfig` rejects unknown keys and reports every problem at once: field errors from
pydantic, then cross-field problems (one `PydanticCustomError` whose context lists each).
`parse_config` / `load_config` turn both into one `ConfigError` with a `problems` list.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    model_validator,
)
from pydantic_core import PydanticCustomError

from trainer.errors import ConfigError

# Names `resolve_base_model` converts on first use; anything else is an HF id or a local path.
BUILTIN_BASE_MODELS: tuple[str, ...] = ("smollm2-135m-instruct",)
DEFAULT_BASE_MODEL = "smollm2-135m-instruct"

# learning_rate = BASE_LEARNING_RATE * learning_rate_multiplier. 2e-4 is the QLoRA paper's
# rate for 7B-65B bases; small datasets need more (see resolve_hyperparameters).
BASE_LEARNING_RATE = 2e-4
# "auto" rule constants, chosen from runs on SmolLM2-135M (docs/trainer.md, "auto").
AUTO_EXAMPLE_PASSES = 500  # examples x epochs that got 20-50 examples memorised
AUTO_MIN_EPOCHS, AUTO_MAX_EPOCHS = 3, 25  # 3 = OpenAI's default for large datasets
AUTO_MAX_BATCH_SIZE = 8
AUTO_SMALL_DATASET = 2000  # up to here lr 1e-3 (multiplier 5); above it, the paper's 2e-4
# DPO's "auto": beta 0.1 (trl's and the DPO paper's), lr 2e-4 and at most 10 epochs: on
# SmolLM2 with 24 pairs, SFT's lr 1e-3 (6 or 21 epochs) drove the loss to 0 and the greedy
# answers into repetition; 2e-4 for 10 epochs raised the margin without (docs/training.md).
AUTO_DPO_BETA = 0.1
AUTO_DPO_LR_MULTIPLIER = 1.0
AUTO_DPO_MAX_EPOCHS = 10
MAX_DPO_BETA = 2.0  # OpenAI's bound on beta

# Bounds a tenant cannot pass, whatever the operator's settings (those can only be tighter).
MAX_LORA_RANK = 256
MAX_SEQ_LENGTH = 131_072  # the longest contexts of today's open bases
MAX_TARGET_MODULES = 64
MAX_PROBE_SIZE = 200

Auto = Literal["auto"]
# A module name or a dotted suffix of one (`q_proj`, `self_attn.o_proj`). Never a pattern:
# peft runs a *string* through `re.fullmatch` against every module name, and a
# backtracking regex held a worker's GIL for minutes; a list is matched by name only.
ModuleName = Annotated[
    str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}(\.[A-Za-z0-9_]{1,64}){0,8}$")
]
Method = Literal["auto", "qlora", "lora"]
# "auto" trains plain LoRA when the base's 16-bit weights take at most this share of the
# training device's memory, QLoRA (NF4) when they do not: QLoRA's reason to exist is memory,
# and an adapter trained on the full-precision base is served on the numerics it learned
# (docs/trainer.md, "Which method").
AUTO_LORA_MAX_MEMORY_SHARE = 0.4
Quantization = Literal["nf4", "fp4", "int8", "none"]
# What the adapter is trained to do: sft (supervised: maximise the likelihood of the answers)
# or dpo (preference: raise preferred answers over rejected ones, Rafailov et al. 2023).
Objective = Literal["sft", "dpo"]


class TrainConfig(BaseModel):
    """Everything that decides what a fine-tune produces (data and paths are separate)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_model: str = Field(
        DEFAULT_BASE_MODEL,
        min_length=1,
        description="Registered base model name, Hugging Face id, or local HF directory.",
    )
    objective: Objective = Field(
        "sft",
        description="sft: supervised fine-tuning on chat examples; dpo: direct preference "
        "optimisation on preference examples (a prompt, a preferred and a rejected answer).",
    )
    dpo_beta: float | Auto = Field(
        "auto",
        description=f"DPO only: how far the adapter may move from the reference (higher: "
        f"closer to it), in (0, {MAX_DPO_BETA}]; 'auto' is {AUTO_DPO_BETA}.",
    )
    method: Method = Field(
        "auto",
        description="lora: LoRA on the full-precision base (what serving runs); qlora: LoRA on "
        "a 4-bit base (for bases too big for the device in 16-bit); auto: lora where the "
        "base's 16-bit weights fit in 40% of the device's memory, else qlora.",
    )
    quantization: Quantization | None = Field(
        None,
        description="Base weight format: nf4/fp4/int8 (qlora) or none (lora). "
        "Unset: nf4 for qlora, none for lora; with method auto, setting it picks the method.",
    )
    lora_r: int = Field(16, ge=1, le=MAX_LORA_RANK, description="LoRA rank (adapter size).")
    lora_alpha: int = Field(
        32, gt=0, le=4 * MAX_LORA_RANK, description="LoRA scaling numerator (scale = alpha/r)."
    )
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: Literal["all-linear"] | list[ModuleName] = Field(
        "all-linear",
        max_length=MAX_TARGET_MODULES,
        description="Modules that get adapters: 'all-linear' or a list of module names "
        "(plain names such as q_proj, matched against the base model's modules; no patterns).",
    )
    # Continued fine-tuning: start from this adapter's weights (a local directory) instead of
    # a fresh adapter. Its own rank, alpha and target modules are used; lora_* are ignored.
    init_adapter: str | None = Field(
        None, max_length=4096, description="Adapter directory to continue training from."
    )
    n_epochs: int | Auto = Field(
        "auto", description="Passes over the training set, or 'auto' (by dataset size)."
    )
    batch_size: int | Auto = Field("auto", description="Examples per optimizer step, or 'auto'.")
    learning_rate_multiplier: float | Auto = Field(
        "auto", description=f"Learning rate = {BASE_LEARNING_RATE} x this, or 'auto'."
    )
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "linear", description="Learning-rate schedule after warmup."
    )
    warmup_ratio: float = Field(
        0.03, ge=0, lt=1, description="Fraction of steps spent warming the rate up."
    )
    weight_decay: float = Field(0.0, ge=0, le=1, description="AdamW weight decay on LoRA weights.")
    max_seq_length: int = Field(
        1024,
        ge=16,
        le=MAX_SEQ_LENGTH,
        description="Longer examples are truncated (and counted in metrics); at most the "
        "base model's context.",
    )
    packing: bool = Field(
        False, description="Pack several examples per row (no padding; attention kept apart)."
    )
    seed: int = Field(42, ge=0, description="Seed for data order, LoRA init and dropout.")
    validation_split: float = Field(
        0.0,
        ge=0,
        le=0.5,
        description="Fraction of training examples held out for eval when no validation file.",
    )
    eval_interval: int | None = Field(
        None,
        ge=1,
        description="Steps between eval-loss runs during training; unset: before and after only.",
    )
    early_stopping_patience: int | None = Field(
        None, ge=1, description="Stop after this many evals without a lower eval loss."
    )
    checkpoint_interval: int | None = Field(
        None, ge=1, description="Steps between checkpoints handed to on_checkpoint; unset: none."
    )
    probe_size: int = Field(
        20,
        ge=0,
        le=MAX_PROBE_SIZE,
        description="Prompts per side (train, held-out) in the exact-match probe.",
    )
    probe_unquantized: bool = Field(
        True,
        description="After a quantized run, probe again on the unquantized base, as serving "
        "(vLLM) runs the adapter; the trained-on 4-bit base can answer better than that.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where to train: auto picks CUDA when present, else CPU."
    )
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="Compute precision; auto: bf16 where the device supports it."
    )
    gradient_checkpointing: bool | Auto = Field(
        "auto", description="Trade compute for memory; auto: on for CUDA, off on CPU."
    )

    @model_validator(mode="after")
    def _cross_field(self) -> TrainConfig:
        problems = cross_field_problems(self)
        if problems:
            raise PydanticCustomError(
                "cross_field", "{summary}", {"summary": "; ".join(problems), "problems": problems}
            )
        return self

    @property
    def resolved_quantization(self) -> Quantization:
        """The base's weight format for an explicit method (or quantization); for
        `method: auto` alone it depends on the base and the device: `resolve_method`."""
        if self.quantization is not None:
            return self.quantization
        if self.method == "auto":
            raise ValueError("method 'auto' is resolved against a base model and a device")
        return "nf4" if self.method == "qlora" else "none"


def resolve_method(
    config: TrainConfig, *, weight_bytes_16bit: int, device_memory: int
) -> tuple[Literal["lora", "qlora"], Quantization]:
    """(method, quantization) this run uses. Explicit choices stand; `auto` picks plain LoRA
    where the 16-bit base fits in AUTO_LORA_MAX_MEMORY_SHARE of the device memory."""
    if config.method != "auto":
        return config.method, config.resolved_quantization
    if config.quantization is not None:
        return ("lora" if config.quantization == "none" else "qlora"), config.quantization
    if weight_bytes_16bit <= AUTO_LORA_MAX_MEMORY_SHARE * device_memory:
        return "lora", "none"
    return "qlora", "nf4"


def cross_field_problems(config: TrainConfig) -> list[str]:
    """Every problem that involves more than one field, as `field: message` strings."""
    problems: list[str] = []
    quant = config.quantization
    if config.method == "lora" and quant not in (None, "none"):
        problems.append(f"quantization: method 'lora' trains an unquantized base, not {quant}")
    if config.method == "qlora" and quant == "none":
        problems.append("quantization: method 'qlora' needs nf4, fp4 or int8")
    if isinstance(config.n_epochs, int) and not 1 <= config.n_epochs <= 50:
        problems.append("n_epochs: must be 1-50 (OpenAI's range) or 'auto'")
    if isinstance(config.batch_size, int) and not 1 <= config.batch_size <= 256:
        problems.append("batch_size: must be 1-256 or 'auto'")
    lrm = config.learning_rate_multiplier
    if isinstance(lrm, float) and not 0 < lrm <= 100:
        problems.append("learning_rate_multiplier: must be in (0, 100] or 'auto'")
    if config.lr_scheduler == "constant" and config.warmup_ratio > 0:
        problems.append("warmup_ratio: scheduler 'constant' has no warmup; use 0")
    if isinstance(config.target_modules, list) and not config.target_modules:
        problems.append("target_modules: must name at least one module")
    if config.early_stopping_patience is not None and config.eval_interval is None:
        problems.append("eval_interval: early_stopping_patience needs an eval interval in steps")
    beta = config.dpo_beta
    if isinstance(beta, float) and not 0 < beta <= MAX_DPO_BETA:
        problems.append(f"dpo_beta: must be in (0, {MAX_DPO_BETA}] or 'auto'")
    if config.objective != "dpo" and beta != "auto":
        problems.append("dpo_beta: only the dpo objective has a beta")
    if config.objective == "dpo" and config.packing:
        problems.append("packing: the dpo objective trains on whole pairs; it does not pack")
    return problems


class Hyperparameters(BaseModel):
    """The values "auto" resolved to for one dataset; what the jobs API reports."""

    model_config = ConfigDict(frozen=True)

    n_epochs: int = Field(description="Passes over the training set.")
    batch_size: int = Field(description="Examples per optimizer step.")
    learning_rate_multiplier: float = Field(description="Multiplier of BASE_LEARNING_RATE.")
    learning_rate: float = Field(description="Peak learning rate used.")
    beta: float | None = Field(None, description="DPO's beta; None for supervised runs.")


def resolve_hyperparameters(config: TrainConfig, *, n_examples: int) -> Hyperparameters:
    """Resolve "auto" epochs, batch size and lr multiplier for `n_examples` training examples.

    Rule (measurements in docs/trainer.md): aim for ~500 example passes, i.e. epochs =
    ceil(500 / n) clamped to 3-25 (20 examples -> 25 epochs, 50 -> 10, >=167 -> 3); batch =
    min(8, n // 2); lr multiplier 5 (lr 1e-3) up to 2000 examples, 1 (2e-4) beyond. DPO
    (docs/training.md): at most 10 epochs, lr multiplier 1, beta 0.1.
    """
    n = max(1, n_examples)
    dpo = config.objective == "dpo"
    epochs = config.n_epochs
    if epochs == "auto":
        most = AUTO_DPO_MAX_EPOCHS if dpo else AUTO_MAX_EPOCHS
        epochs = min(most, max(AUTO_MIN_EPOCHS, math.ceil(AUTO_EXAMPLE_PASSES / n)))
    batch = config.batch_size
    if batch == "auto":
        batch = min(AUTO_MAX_BATCH_SIZE, max(1, n // 2))
    lrm = config.learning_rate_multiplier
    if lrm == "auto":
        lrm = AUTO_DPO_LR_MULTIPLIER if dpo else 5.0 if n <= AUTO_SMALL_DATASET else 1.0
    beta = None
    if dpo:
        beta = AUTO_DPO_BETA if config.dpo_beta == "auto" else config.dpo_beta
    return Hyperparameters(
        n_epochs=epochs,
        batch_size=batch,
        learning_rate_multiplier=lrm,
        learning_rate=BASE_LEARNING_RATE * lrm,
        beta=beta,
    )


def _problems_of(error: ValidationError) -> list[str]:
    problems: list[str] = []
    for item in error.errors():
        ctx = item.get("ctx") or {}
        if item["type"] == "cross_field":
            problems.extend(ctx["problems"])
            continue
        # Union members add their own loc parts (e.g. "int", "literal['auto']"): keep the field.
        field = str(item["loc"][0]) if item["loc"] else "config"
        problems.append(f"{field}: {item['msg']}")
    return list(dict.fromkeys(problems))


def parse_config(data: Mapping[str, Any]) -> TrainConfig:
    """Build a `TrainConfig` from plain data; raise `ConfigError` listing every problem."""
    try:
        return TrainConfig.model_validate(dict(data))
    except ValidationError as e:
        problems = _problems_of(e)
        raise ConfigError("invalid training config: " + "; ".join(problems), problems) from e


def parse_overrides(pairs: Sequence[str]) -> dict[str, Any]:
    """`["key=value", ...]` -> dict; values are YAML scalars/lists (3, 1e-3, auto, [q,v])."""
    result: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(
                f"--set {pair!r}: expected key=value", [f"{pair}: expected key=value"]
            )
        result[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
    return result


def load_config(path: Path | None = None, *, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a YAML config file (optional), apply `key=value` overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"{path}: cannot read config: {e}") from e
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of field: value")
        data.update(loaded or {})
    data.update(parse_overrides(overrides))
    return parse_config(data)
