"""docker/: the production images and compose topology (no engine runs here: no builds)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

DOCKER = Path(__file__).resolve().parent.parent / "docker"
COMPOSE = DOCKER / "compose.yaml"


def _compose_cli() -> list[str] | None:
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True)
        if probe.returncode == 0:
            return ["docker", "compose"]
    return ["docker-compose"] if shutil.which("docker-compose") else None


def test_compose_config_is_valid_for_docker_compose() -> None:
    cli = _compose_cli()
    if cli is None:
        pytest.skip("neither the `docker compose` plugin nor docker-compose is installed")
    r = subprocess.run(
        [*cli, "-f", str(COMPOSE), "config", "--quiet"], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr


def test_topology_has_every_part_with_healthchecks() -> None:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    for name in ("postgres", "redis", "api", "worker", "vllm", "gateway"):
        assert name in services
        assert "healthcheck" in services[name], f"{name} has no healthcheck"
    for name in ("worker", "vllm"):  # one GPU each
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"] and len(devices[0]["device_ids"]) == 1
    # vLLM's LoRA load/unload endpoints have no auth: never published on the host.
    assert "ports" not in services["vllm"]
    for service in services.values():
        build = service.get("build")
        if build:
            assert (DOCKER.parent / build["dockerfile"]).is_file()


@pytest.mark.parametrize("name", ["api", "worker", "serving"])
def test_dockerfiles_install_the_project(name: str) -> None:
    text = (DOCKER / f"{name}.Dockerfile").read_text()
    assert text.startswith("#") and "FROM " in text
    assert "pip install" in text and 'CMD ["loraplex"' in text
