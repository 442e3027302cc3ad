"""Process settings: one pydantic-settings class, environment prefix `LORAPLEX_`.

Environment variables are read here and nowhere else. Defaults are the embedded ones of
CONTRACT.md: a SQLite file, a local artifact dir and a broker needing no server, all under
`LORAPLEX_HOME`.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MiB = 1024 * 1024


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LORAPLEX_", extra="ignore")

    home: Path = Field(Path(".loraplex"), description="Root of all embedded state.")
    database_url: str = Field("", description="SQLAlchemy URL; default SQLite under home.")
    broker_url: str = Field("", description="Celery broker; default an embedded transport.")
    storage_url: str = Field("", description="fsspec URL of the artifact store.")
    base_model: str = Field("smollm2-135m-instruct", description="The served base model.")
    serving_engine: Literal["auto", "vllm", "transformers"] = "auto"
    # OpenAI's own limit for a file upload.
    max_upload_bytes: int = Field(512 * MiB, gt=0)
    # JSON bodies are small; anything larger is a mistake or an attack.
    max_json_body_bytes: int = Field(8 * MiB, gt=0)
    # A training job may not stay "running" without a heartbeat for longer than this.
    log_level: str = "INFO"

    @model_validator(mode="after")
    def _embedded_defaults(self) -> Settings:
        self.home = self.home.expanduser().absolute()
        if not self.database_url:
            self.database_url = f"sqlite:///{self.home / 'loraplex.db'}"
        if not self.storage_url:
            self.storage_url = f"file://{self.home / 'artifacts'}"
        if not self.broker_url:
            self.broker_url = "filesystem://"
        return self

    @property
    def broker_dir(self) -> Path:
        """Folder of the embedded filesystem broker."""
        return self.home / "broker"


@lru_cache
def get_settings() -> Settings:
    return Settings()
