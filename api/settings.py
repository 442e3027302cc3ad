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
    # More base models a job may name: registered name -> HF id or local path (JSON in env).
    base_models: dict[str, str] = Field(default_factory=dict)
    serving_engine: Literal["auto", "vllm", "transformers"] = "auto"
    # OpenAI's own limit for a file upload.
    max_upload_bytes: int = Field(512 * MiB, gt=0)
    # JSON bodies are small; anything larger is a mistake or an attack.
    max_json_body_bytes: int = Field(8 * MiB, gt=0)
    # Training: queue routing by accelerator class, crash recovery, fairness.
    train_queue: str = Field("train-cpu", description="Queue new jobs go to (train-gpu, ...).")
    # Per base model, the queue (accelerator class) its jobs go to: e.g. a 7B base to
    # train-gpu while small ones stay on train-cpu; a base not listed goes to train_queue.
    train_queues: dict[str, str] = Field(default_factory=dict)
    worker_queues: str = Field("", description="Queues a worker consumes; default train_queue.")
    heartbeat_interval: float = Field(5.0, gt=0, description="Seconds between job heartbeats.")
    # A running job with no heartbeat for this long lost its worker: re-queue or fail it.
    heartbeat_timeout: float = Field(90.0, gt=0)
    # A job still queued this long after its last message is sent again when the broker holds
    # fewer messages than its queue has jobs (lost: a Redis restart without persistence).
    redispatch_after: float = Field(300.0, gt=0)
    max_job_attempts: int = Field(3, ge=1, description="Runs before a lost job is failed.")
    max_running_jobs_per_tenant: int = Field(2, ge=1)
    # Longest training example a job may ask for: the served base's context (SmolLM2: 8192).
    max_train_seq_length: int = Field(8192, ge=16)
    # A run whose heartbeat thread cannot run this long (C code holding the GIL) is ended by
    # its watchdog and failed as `training_hung`. Below heartbeat_timeout, so the restarted
    # worker names the hang before a reaper re-queues the job to hang elsewhere.
    training_hang_timeout: float = Field(60.0, gt=0)
    # Intermediate checkpoints a job keeps (with optimizer state, ~30x the adapter); older
    # ones are deleted as new ones land. Resuming needs only the last.
    keep_checkpoints: int = Field(3, ge=1)
    # Longer than any training run, or Redis redelivers a long job while it still runs.
    broker_visibility_timeout: int = Field(7 * 24 * 3600, gt=0)
    broker_polling_interval: float = Field(0.1, gt=0)
    # Refuse production to versions whose eval loss and probe did not improve (force overrides).
    promotion_gate: bool = False
    # The serving pool's --max-lora-rank: higher-rank adapters are registered as rejected.
    max_lora_rank: int = Field(64, ge=1)
    # Serving (the gateway and its engine). Replica URLs (JSON list in env) point the gateway
    # at vLLM servers someone else runs; empty: `serve`/`up` start `serving_spawn_replicas`.
    serving_replicas: list[str] = Field(default_factory=list)
    serving_spawn_replicas: int = Field(1, ge=0, description="vLLM replicas serve/up start.")
    # Optional base-only replicas (no LoRA): base traffic at full speed instead of through the
    # zero adapter (vLLM's CPU LoRA path costs ~half the throughput). Pointed at, or started.
    serving_base_replicas: list[str] = Field(default_factory=list)
    serving_spawn_base_replicas: int = Field(0, ge=0)
    serving_replica_port: int = Field(0, ge=0, description="First replica port; 0: any free.")
    # Adapters one vLLM batch can mix (--max-loras); the base rides on one slot (zero adapter).
    serving_max_loras: int = Field(4, ge=2)
    # Adapters a replica (or the in-process engine) holds before LRU unloading (--max-cpu-loras).
    serving_max_cpu_loras: int = Field(16, ge=2)
    serving_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    serving_kv_cache_gib: int = Field(1, ge=1, description="VLLM_CPU_KVCACHE_SPACE per replica.")
    serving_max_model_len: int | None = Field(None, ge=16)
    serving_startup_timeout: float = Field(300.0, gt=0, description="Seconds a replica may boot.")
    serving_health_interval: float = Field(2.0, gt=0, description="Seconds between probes.")
    # A replica that has served and then fails every probe this long is hung: restarted.
    serving_hang_timeout: float = Field(30.0, gt=0)
    serving_request_timeout: float = Field(600.0, gt=0)
    # Retry-After (s) on a 503 when no replica is up: about one replica boot.
    serving_retry_after: int = Field(10, ge=1)
    # The in-process transformers engine: requests arriving together share one generate().
    serving_max_batch_size: int = Field(8, ge=1)
    # Its torch threads; unset: torch's default. On a busy small box, 1 can be 50x faster
    # than 2 contended OpenMP threads (docs/benchmarks.md, serving).
    serving_torch_threads: int | None = Field(None, ge=1)
    # Every new version is asked its probe prompts through the serving engine once it lands
    # (serving/validation.py): what the tenant will get, next to what the trainer measured.
    serving_validate_new_versions: bool = True
    # Each gateway loads production and canary versions that no replica holds onto the
    # replica that will serve them, before their first by-name request, where that unloads
    # nothing (serving/prefetch.py; vLLM replicas).
    serving_prefetch_promoted: bool = True
    # Where vLLM replicas get adapters. "store": each replica fetches a version from the
    # artifact store itself, by a content-derived name, verified (serving/vllm_plugin.py): a
    # replica on any host needs only the storage URL and read credentials. "gateway": the
    # gateway hands replicas a path in its own cache (replicas must share its filesystem).
    serving_adapter_source: Literal["store", "gateway"] = "store"
    # The LoRA op of the vLLM replicas this process starts. "auto": Loraplex's grouped op
    # (serving/vllm_lora_op.py) on vllm-cpu 0.32.0, the one it is written for: LoRA rows
    # grouped by adapter, base rows plain and exact in mixed batches, so base requests need
    # no zero adapter there; vLLM's own op elsewhere (GPUs: untouched). "vllm": vLLM's own.
    serving_lora_op: Literal["auto", "vllm"] = "auto"
    # How replicas keep LoRA weights (vLLM's --lora-dtype). "auto": the replica's dtype
    # (float32 on CPUs: exact against transformers + peft in float32). "bfloat16" halves the
    # bytes a decode step reads for them, which bounds a step over many distinct adapters on
    # a CPU (the grouped op's kernel reads them as they are, arithmetic in float32; measured
    # in docs/benchmarks.md); answers may then differ from float32 peft where two tokens
    # were near-tied.
    serving_lora_dtype: Literal["auto", "bfloat16", "float16"] = "auto"
    # CPUs a vLLM CPU replica leaves to its scheduler process instead of its model threads
    # (vLLM's VLLM_CPU_NUM_OF_RESERVED_CPU). Unset: none on hosts of at most 2 CPUs, where
    # vLLM's own choice (one) halves the model's threads (measured on 2 cores: 1.45-1.54x
    # tokens/s, 15-22% less time to first token; docs/benchmarks.md), vLLM's choice
    # elsewhere (or VLLM_CPU_NUM_OF_RESERVED_CPU where the environment sets it).
    serving_replica_reserved_cpus: int | None = Field(None, ge=0)
    serving_cache_dir: Path | None = Field(None, description="Verified adapters; default home.")
    # Past either bound the least recently used versions no replica holds are deleted (and
    # fetched again if asked for): enough for many tenants' adapters of ~10-100 MB each.
    serving_cache_max_adapters: int = Field(256, ge=1)
    serving_cache_max_gib: float = Field(20.0, gt=0)
    # Per-tenant rate limits and quotas: what every tenant gets unless an admin overrides it
    # (PATCH /v1/admin/tenants/{id}/limits). 0 means unlimited. Off: no serving limiter at all.
    rate_limits_enabled: bool = True
    # OpenAI's tier-1 figures for its small models: ample for one application, while no
    # single tenant can keep a shared engine's batches full for long.
    tenant_requests_per_minute: int = Field(600, ge=0)
    tenant_tokens_per_minute: int = Field(200_000, ge=0)  # prompt + completion
    # Gateway processes the traffic is balanced over: each enforces 1/N of a serving limit
    # (the limiter is in-process; serving/ratelimit.py says why).
    rate_limit_gateways: int = Field(1, ge=1)
    # How long a gateway trusts its copy of a tenant's limits: an admin change lands within.
    rate_limit_refresh_seconds: float = Field(5.0, gt=0)
    # OpenAI's fine-tuning limit; a job holds a GPU for hours, so dozens a day is plenty.
    tenant_jobs_per_day: int = Field(48, ge=0)
    # ~4 GPU-days of QLoRA on a 7-8B base (~3k tokens/s) a month.
    tenant_training_tokens_per_month: int = Field(1_000_000_000, ge=0)
    # A tenant's backlog: enough for a sweep, not enough to bury the queue.
    max_queued_jobs_per_tenant: int = Field(20, ge=0)
    # Serving bounds (hostile tenants): checked in the gateway before anything is generated;
    # over them, a 400 naming the parameter. Rows one completion request may ask for
    # (prompts x n): 64 is 8 full batches of the default size, far above what chat needs.
    serving_max_rows_per_request: int = Field(64, ge=1)
    # UTF-8 bytes of all prompts (or message contents) of one request: tokenizing 1 MiB takes
    # ~1 s here, and it is far above any served context (8k tokens x ~4 bytes each).
    serving_max_prompt_bytes: int = Field(1 * MiB, ge=1)
    # Upload bounds and storage quota (hostile tenants)
    # Seconds a request body may go without a byte: a client that stalls mid-body gets 408 and
    # loses the connection, instead of holding its request (and memory) for as long as it likes.
    body_idle_timeout: float = Field(30.0, gt=0)
    # A tenant's files and adapter versions together: room for dozens of 512 MiB datasets and
    # hundreds of 7B-base adapters, so no tenant fills the shared artifact store. 0: unlimited.
    tenant_storage_quota_bytes: int = Field(10 * 1024 * MiB, ge=0)
    # Evals: runs go to their own queue (an eval worker: `loraplex worker --queues evals`),
    # so they never wait behind a fine-tune, and generate through the serving gateway.
    eval_queue: str = Field("evals", description="Queue eval runs go to.")
    gateway_url: str = Field(
        "", description="Base URL (…/v1) eval runs generate through; `up` sets its own."
    )
    # Items one run grades: a held-out set, not a benchmark suite; ~minutes on a CPU box.
    eval_max_items: int = Field(1000, ge=1)
    # Requests one run keeps in flight: enough to fill a batch, not to crowd out users.
    eval_concurrency: int = Field(4, ge=1, le=64)
    max_active_eval_runs_per_tenant: int = Field(8, ge=1)
    # An external OpenAI-compatible endpoint for judge models (label_model / score_model)
    # named in `eval_judge_models`; any other judge is a model the tenant calls here.
    eval_judge_base_url: str = ""
    eval_judge_api_key: str = ""
    eval_judge_models: list[str] = Field(default_factory=list)
    # Shadow traffic: mirrors one gateway runs at once; more are skipped, never queued, so
    # a candidate can never slow production down.
    serving_max_shadow_in_flight: int = Field(4, ge=1)
    # Seconds between a gateway's checks of guarded canaries (adapter policy canary_guard).
    canary_guard_interval: float = Field(5.0, gt=0)
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

    def registered_base_models(self) -> dict[str, str]:
        """Registered name -> source (a built-in name, HF id or local path)."""
        return {self.base_model: self.base_model, **self.base_models}

    def queue_for(self, base_model: str) -> str:
        """The queue a new job on `base_model` goes to."""
        return self.train_queues.get(base_model, self.train_queue)

    @property
    def queues(self) -> list[str]:
        return [q.strip() for q in (self.worker_queues or self.train_queue).split(",") if q.strip()]

    @property
    def broker_dir(self) -> Path:
        """Folder of the embedded filesystem broker."""
        return self.home / "broker"


@lru_cache
def get_settings() -> Settings:
    return Settings()
