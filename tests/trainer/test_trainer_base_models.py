"""Base model names: local directories pass through, unknown names fail clearly."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer.base_models import resolve_base_model, smollm2_gguf_path
from trainer.errors import BaseModelError


def test_a_local_hf_directory_is_used_as_is(tiny_base: Path, tmp_path: Path) -> None:
    assert resolve_base_model(str(tiny_base), home=tmp_path) == tiny_base


def test_a_directory_without_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(BaseModelError, match=r"no config\.json"):
        resolve_base_model(str(tmp_path), home=tmp_path)


@pytest.mark.parametrize("name", ["no-such-model", "./missing/dir", "a/b/c"])
def test_an_unknown_name_lists_the_built_ins(name: str, tmp_path: Path) -> None:
    with pytest.raises(BaseModelError, match="smollm2-135m-instruct"):
        resolve_base_model(name, home=tmp_path)


def test_the_bundled_gguf_is_found_without_importing_its_package() -> None:
    assert smollm2_gguf_path().stat().st_size > 50_000_000
