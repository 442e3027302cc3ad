"""The trainer's exceptions: one tree, so callers can catch `TrainerError` and map the rest.

    TrainerError
    ├── ConfigError           the training config is invalid (`problems`: one entry per field)
    ├── DataError             a dataset file is unusable (`problems`: `line N: ...` entries)
    ├── BaseModelError        a base model name/path cannot be resolved or converted
    ├── CheckpointError       a checkpoint to resume from is missing or belongs to another run
    ├── TrainingFailed        training itself broke (e.g. wrong-gradient kernels, NaN loss)
    ├── TrainingCancelled     the caller's `should_cancel` asked to stop (`step`: last step done)
    └── TrainingPaused        the caller's `should_pause` asked to stop; a checkpoint of `step`
                              was saved (and handed to `on_checkpoint`) to resume from

Every error is raised before a model is loaded where that is possible (config, data, base).
"""

from __future__ import annotations


class TrainerError(Exception):
    """Base class of every error the trainer raises on purpose."""


class ConfigError(TrainerError):
    """Invalid training config; `problems` holds one `field: message` entry per problem."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or [message]


class DataError(TrainerError):
    """An unusable dataset; `problems` holds `line N: message` entries (up to 20)."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or [message]


class BaseModelError(TrainerError):
    """A base model cannot be found, converted or loaded."""


class CheckpointError(TrainerError):
    """A checkpoint cannot be resumed from."""


class TrainingFailed(TrainerError):
    """Training ran but its result cannot be trusted."""


class TrainingCancelled(TrainerError):
    """Training stopped because the caller asked; `step` is the last finished step."""

    def __init__(self, step: int) -> None:
        super().__init__(f"training cancelled after step {step}")
        self.step = step


class TrainingPaused(TrainerError):
    """Stopped at the caller's request after checkpointing `step`: resume from it later."""

    def __init__(self, step: int) -> None:
        super().__init__(f"training paused after step {step}, checkpointed")
        self.step = step
