from __future__ import annotations

from pathlib import Path

import pytest

from api.settings import Settings


def test_embedded_defaults_live_under_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAPLEX_HOME", str(tmp_path / "h"))
    s = Settings()
    assert s.database_url == f"sqlite:///{tmp_path / 'h' / 'loraplex.db'}"
    assert s.storage_url == f"file://{tmp_path / 'h' / 'artifacts'}"
    assert s.base_model == "smollm2-135m-instruct"
    assert s.serving_engine == "auto"


def test_production_values_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAPLEX_DATABASE_URL", "postgresql+psycopg://loraplex@db/loraplex")
    monkeypatch.setenv("LORAPLEX_BROKER_URL", "redis://redis:6379/0")
    monkeypatch.setenv("LORAPLEX_SERVING_ENGINE", "vllm")
    s = Settings()
    assert s.database_url.startswith("postgresql+psycopg://")
    assert s.broker_url == "redis://redis:6379/0"
    assert s.serving_engine == "vllm"


def test_bad_engine_name_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAPLEX_SERVING_ENGINE", "tensorrt")
    with pytest.raises(ValueError, match="serving_engine"):
        Settings()
