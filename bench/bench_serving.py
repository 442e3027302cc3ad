"""Serving: multi-LoRA throughput, naive baseline, cold-adapter latency, gateway overhead.

One run, side by side, on the real base (SmolLM2-135M-Instruct) and one vLLM CPU replica with
the LoRA op the replica launcher installs (Loraplex's grouped op by default, issue 18):
  1. tokens/s, requests spread over 8 distinct adapters vs base-only, direct (target >= 0.8)
  2. base-only through the gateway vs straight to vLLM                     (target >= 0.95)
  3. vLLM multi-LoRA through the gateway vs transformers + peft calling
     `set_adapter` per request, one request at a time, same requests       (target >= 8x)
  4. cold adapter (registered, never fetched or loaded) -> first token, p50 (target < 250 ms);
     and a version just promoted to production -> its first by-name request's first token
     (the gateways prefetch promoted versions: serving/prefetch.py)
  5. gateway overhead: the same workload through `loraplex serve` vs straight to vLLM (< 5%)

Adapters: one trained by the trainer (a few LoRA steps; `--adapter DIR` reuses one), plus
copies with scaled lora_B (valid adapters, distinct weights) registered as separate versions.
Every completion is a fixed length (`ignore_eos`), so tokens/s compare like for like.

    .venv/bin/python bench/bench_serving.py [--requests 32] [--max-tokens 64] [--concurrency 16]
        [--lora-dtype bfloat16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BASE = "smollm2-135m-instruct"
PROMPTS = [
    "Explain what a kettle does.",
    "Write a short poem about the sea.",
    "List three uses for a paperclip.",
    "Describe the colour blue to someone.",
    "Why do cats purr?",
    "Give me a tip for learning to cook.",
    "What makes a good password?",
    "Summarise the water cycle.",
]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# Setup ------------------------------------------------------------------------------------


def train_adapter(home: Path, out: Path) -> Path:
    from trainer.config import TrainConfig
    from trainer.recipe import train

    rows = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in [("What is the Zorblat code?", "7741."), ("Who runs Acme?", "Wilma Quux.")]
    ] * 4
    data = out.parent / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = TrainConfig.model_validate(
        {"base_model": BASE, "method": "lora", "quantization": "none", "precision": "fp32",
         "lora_r": 16, "n_epochs": 1, "batch_size": 4, "probe_size": 0,
         "probe_unquantized": False}
    )  # fmt: skip
    train(config, data_path=data, out_dir=out, home=home)
    return out


def variant(source: Path, out: Path, *, scale: float) -> Path:
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((source / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = BASE
    (out / "adapter_config.json").write_text(json.dumps(config))
    weights = load_file(source / "adapter_model.safetensors")
    save_file({k: v * scale if "lora_B" in k else v for k, v in weights.items()},
              out / "adapter_model.safetensors")  # fmt: skip
    return out


def register_versions(settings: Any, dirs: list[Path]) -> tuple[str, list[str], list[str]]:
    """A tenant and one candidate version per directory; returns (api key, the versions'
    model names, the names replicas that fetch adapters themselves load them under)."""
    from sqlmodel import Session

    from api.db import get_engine, upgrade
    from api.models.jobs import Job
    from api.models.tenants import Tenant
    from api.services import registry, tenants
    from api.services.jobs import fine_tuned_model_name
    from api.storage import ArtifactStore
    from serving.adapter_source import replica_name

    upgrade(settings.database_url)
    store = ArtifactStore(settings.storage_url)
    names, on_replica = [], []
    with Session(get_engine(settings.database_url), expire_on_commit=False) as session:
        tenant = tenants.create_tenant(session, name="bench")
        _, key = tenants.create_key(session, tenant_id=tenant.id)
        for i, adapter_dir in enumerate(dirs):
            job = Job(tenant_id=tenant.id, model=BASE, training_file="file-bench", suffix=f"a{i}",
                      method={}, config={}, hyperparameters={}, status="succeeded")  # fmt: skip
            session.add(job)
            session.flush()
            prefix, stored = registry.upload_adapter(store, job=job, adapter_dir=adapter_dir)
            row = session.get(Tenant, tenant.id)
            assert row is not None
            version = registry.register_version(
                session, job=job, fine_tuned_model=fine_tuned_model_name(job, row), prefix=prefix,
                stored=stored, adapter_dir=adapter_dir, metrics={}, lineage={},
                max_rank=settings.max_lora_rank,
            )  # fmt: skip
            assert version.stage == "candidate", version.stage_reason
            names.append(version.fine_tuned_model)
            on_replica.append(
                replica_name(storage_prefix=version.storage_prefix, files=version.files)
            )
        session.commit()
    # Replicas cache adapters by content: two versions with equal bytes would make the second
    # one's "cold" load skip the fetch.
    digests = [name.rpartition("@")[2] for name in on_replica]
    assert len(set(digests)) == len(digests), "two bench versions have the same bytes"
    return key, names, on_replica


def promote_all(settings: Any, names: list[str]) -> list[str]:
    """Promote these versions (each its own adapter) to production as an admin would;
    returns the adapters' names, which callers use."""
    from sqlmodel import Session, select

    from api.db import get_engine
    from api.models.adapters import Adapter, AdapterVersion
    from api.services.promotion import promote
    from api.services.tenants import Principal

    admin = Principal(key_id="bench", tenant_id=None, is_admin=True)
    out = []
    with Session(get_engine(settings.database_url), expire_on_commit=False) as session:
        for name in names:
            version = session.exec(
                select(AdapterVersion).where(AdapterVersion.fine_tuned_model == name)
            ).one()
            promote(session, actor=admin, adapter_id=version.adapter_id, number=version.version,
                    stage="production")  # fmt: skip
            adapter = session.get(Adapter, version.adapter_id)
            assert adapter is not None
            out.append(adapter.name)
    return out


def wait_http(url: str, *, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process for {url} exited")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(url)


# Measurements -----------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its descendants so far (from /proc)."""
    total = 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except (OSError, IndexError):
        return total
    return total + sum(cpu_seconds(int(c)) for c in children)


async def workload(
    url: str, *, key: str | None, models: list[str], requests: int, max_tokens: int,
    concurrency: int,
) -> float:  # fmt: skip
    """Completion tokens per second over `requests` chat requests, `concurrency` at a time."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    limit = asyncio.Semaphore(concurrency)
    tokens = 0

    async def one(client: httpx.AsyncClient, i: int) -> None:
        nonlocal tokens
        body = {"model": models[i % len(models)], "max_tokens": max_tokens, "temperature": 0,
                "ignore_eos": True,
                "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]}  # fmt: skip
        async with limit:
            response = await client.post(f"{url}/v1/chat/completions", json=body, headers=headers)
        response.raise_for_status()
        tokens += response.json()["usage"]["completion_tokens"]

    async with httpx.AsyncClient(timeout=600) as client:
        started = time.perf_counter()
        await asyncio.gather(*(one(client, i) for i in range(requests)))
        return tokens / (time.perf_counter() - started)


async def first_token_seconds(url: str, *, key: str, model: str) -> float:
    body = {"model": model, "max_tokens": 4, "temperature": 0, "stream": True,
            "messages": [{"role": "user", "content": PROMPTS[0]}]}  # fmt: skip
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(timeout=120) as client:
        started = time.perf_counter()
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body,
                                 headers=headers) as response:  # fmt: skip
            response.raise_for_status()
            async for line in response.aiter_lines():
                if line.startswith("data:") and '"content"' in line:
                    return time.perf_counter() - started
    raise RuntimeError("no token streamed")


async def sequential_latency(url: str, *, key: str | None, model: str, n: int) -> float:
    """p50 seconds of short non-streamed requests, one at a time (per-request overhead)."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    times = []
    async with httpx.AsyncClient(timeout=120) as client:
        for i in range(n):
            messages = [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]
            body = {"model": model, "max_tokens": 8, "temperature": 0, "ignore_eos": True,
                    "messages": messages}  # fmt: skip
            started = time.perf_counter()
            (await client.post(f"{url}/v1/chat/completions", json=body, headers=headers)
             ).raise_for_status()  # fmt: skip
            times.append(time.perf_counter() - started)
    return statistics.median(times)


class NaivePeft:
    """transformers + peft, `set_adapter` per request, one request at a time, at its best
    settings here: fp32 (bf16 generation through peft was slower still) and one torch thread
    (on this shared 2-core box two OpenMP threads made a forward 50x slower: 3.5 s vs 0.07 s)."""

    def __init__(self, base_dir: Path, adapters: list[Path]) -> None:
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        torch.set_num_threads(1)
        self.tokenizer = AutoTokenizer.from_pretrained(base_dir)
        model: Any = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        model = PeftModel.from_pretrained(model, str(adapters[0]), adapter_name="a0")
        for i, path in enumerate(adapters[1:], start=1):
            model.load_adapter(str(path), adapter_name=f"a{i}")
        self.model = model.eval()
        self.count = len(adapters)
        self.tokens = 0
        self.seconds = 0.0
        self.served = 0

    def run(self, requests: int, *, max_tokens: int) -> None:
        started = time.perf_counter()
        for _ in range(requests):
            i = self.served
            self.served += 1
            self.model.set_adapter(f"a{i % self.count}")
            messages = [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]
            ids = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
            )
            with self.torch.inference_mode():
                out = self.model.generate(**ids, max_new_tokens=max_tokens,
                                          min_new_tokens=max_tokens, do_sample=False)  # fmt: skip
            self.tokens += out.shape[1] - ids["input_ids"].shape[1]
        self.seconds += time.perf_counter() - started

    @property
    def tok_s(self) -> float:
        return self.tokens / self.seconds


# Main -------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per pair")
    parser.add_argument("--naive-requests", type=int, default=10, help="over all rounds")
    parser.add_argument("--cold", type=int, default=8, help="cold adapters to time")
    parser.add_argument("--dtype", default="float32", choices=["bfloat16", "float32"])
    parser.add_argument("--lora-dtype", default="auto", choices=["auto", "bfloat16"],
                        help="serving_lora_dtype: how the replica keeps LoRA weights")  # fmt: skip
    parser.add_argument("--home", type=Path, default=ROOT / ".loraplex", help="model cache")
    parser.add_argument("--adapter", type=Path, help="a trained adapter dir to reuse")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from api.settings import Settings
    from serving.replicas import free_port, plan_replicas
    from trainer.base_models import resolve_base_model

    work = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    settings = Settings(
        home=args.home, database_url=f"sqlite:///{work / 'bench.db'}",
        storage_url=f"file://{work / 'artifacts'}", serving_cache_dir=work / "cache",
        serving_dtype=args.dtype, serving_lora_dtype=args.lora_dtype,
        serving_max_loras=9, serving_max_cpu_loras=32,
        max_lora_rank=16, serving_max_model_len=1024, serving_replica_port=free_port(),
    )  # fmt: skip
    base_dir = resolve_base_model(BASE, home=args.home)
    trained = args.adapter or train_adapter(args.home, work / "trained")
    hot = [variant(trained, work / f"hot{i}", scale=1 + 0.1 * i) for i in range(8)]
    # Scales no hot version uses (hot: 1.0-1.7): a cold version must be bytes the replica
    # has never fetched, not a copy of a hot one under another name (register_versions checks).
    cold = [variant(trained, work / f"cold{i}", scale=0.2 + 0.03 * i) for i in range(args.cold)]
    cold += [variant(trained, work / f"promoted{i}", scale=0.55 + 0.05 * i)
             for i in range(args.cold)]  # fmt: skip
    key, names, on_replica = register_versions(settings, hot + cold)
    hot_names, cold_names = names[:8], names[8 : 8 + args.cold]
    promoted_names = names[8 + args.cold :]

    replica = plan_replicas(settings, model_dir=base_dir, served_name=BASE, count=1)[0]
    replica.log_path = work / "vllm.log"
    gateway_port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAPLEX_")} | {
        "LORAPLEX_HOME": str(args.home), "LORAPLEX_DATABASE_URL": settings.database_url,
        "LORAPLEX_STORAGE_URL": settings.storage_url,
        "LORAPLEX_SERVING_CACHE_DIR": str(settings.serving_cache_dir),
        "LORAPLEX_SERVING_REPLICAS": json.dumps([replica.url]),
        "LORAPLEX_SERVING_ENGINE": "vllm", "LORAPLEX_MAX_LORA_RANK": "16",
        "LORAPLEX_SERVING_MAX_CPU_LORAS": "32", "LORAPLEX_LOG_LEVEL": "WARNING",
    }  # fmt: skip
    gateway = None
    try:
        replica.start()
        log("starting vLLM replica...")
        wait_http(f"{replica.url}/health", timeout=300, proc=replica.proc)
        gateway = subprocess.Popen(
            [str(Path(sys.executable).parent / "loraplex"), "serve", "--port", str(gateway_port)],
            env=env, stdout=open(work / "gateway.log", "wb"), stderr=subprocess.STDOUT,  # noqa: SIM115
        )  # fmt: skip
        gw = f"http://127.0.0.1:{gateway_port}"
        wait_http(f"{gw}/healthz", timeout=60, proc=gateway)
        assert replica.proc is not None
        pids = {"gateway": gateway.pid, "vllm": replica.proc.pid}
        naive = NaivePeft(base_dir, hot)
        results = asyncio.run(
            measure(
                args,
                replica.url,
                gw,
                key,
                hot_names,
                on_replica[:8],
                cold_names,
                pids,
                naive,
                promote=lambda: promote_all(settings, promoted_names),
            )
        )
    finally:
        if gateway is not None:
            gateway.send_signal(signal.SIGTERM)
            gateway.wait(30)
        replica.stop()
    report(results, args)
    shutil.rmtree(work, ignore_errors=True)


async def measure(
    args: argparse.Namespace, vllm: str, gw: str, key: str, hot: list[str],
    hot_on_replica: list[str], cold: list[str], pids: dict[str, int], naive: NaivePeft,
    promote: Callable[[], list[str]],
) -> dict[str, Any]:  # fmt: skip
    """`hot` by name through the gateway; `hot_on_replica` the same versions by the names the
    replica holds them under (the gateway loaded them in the warm-up)."""
    shape = {"requests": args.requests, "max_tokens": args.max_tokens,
             "concurrency": args.concurrency}  # fmt: skip
    # Warm up: the gateway fetches and loads the 8 hot adapters (and, with vLLM's own op, its
    # zero adapter).
    await workload(gw, key=key, models=[*hot, BASE], requests=18, max_tokens=4, concurrency=9)
    runs: dict[str, list[float]] = {}
    configs = {
        "direct_base": (vllm, None, [BASE]),
        "direct_8_adapters": (vllm, None, hot_on_replica),
        "gateway_base": (gw, key, [BASE]),
        "gateway_8_adapters": (gw, key, hot),
    }
    cpu: dict[str, float] = {"gateway": 0.0, "vllm": 0.0}
    for round_ in range(args.rounds):
        for name, (url, k, models) in configs.items():
            before = {p: cpu_seconds(pid) for p, pid in pids.items()}
            tok_s = await workload(url, key=k, models=models, **shape)
            if name == "gateway_8_adapters":
                for p, pid in pids.items():
                    cpu[p] += cpu_seconds(pid) - before[p]
            runs.setdefault(name, []).append(tok_s)
            log(f"round {round_}: {name} {tok_s:.0f} tok/s")
        # The naive baseline in the same rounds (vLLM idle meanwhile): same noise, side by side.
        naive.run(max(1, args.naive_requests // args.rounds), max_tokens=args.max_tokens)
        log(f"round {round_}: naive peft {naive.tok_s:.1f} tok/s so far")
    latency = {
        "direct_p50_s": await sequential_latency(vllm, key=None, model=hot_on_replica[0], n=20),
        "gateway_p50_s": await sequential_latency(gw, key=key, model=hot[0], n=20),
    }
    warm = [await first_token_seconds(gw, key=key, model=hot[i % 8]) for i in range(8)]
    cold_ttft = [await first_token_seconds(gw, key=key, model=name) for name in cold]
    # Versions promoted to production, then called by their adapters' names a few seconds on
    # (what a client does after a rollout; the gateway prefetches in between).
    from serving.prefetch import PREFETCH_INTERVAL

    by_name = promote()
    await asyncio.sleep(2 * PREFETCH_INTERVAL + 1)
    promoted_ttft = [await first_token_seconds(gw, key=key, model=name) for name in by_name]
    from serving.adapter_source import INFO_PATH

    async with httpx.AsyncClient(timeout=30) as client:
        info = await client.get(f"{vllm}{INFO_PATH}")
    return {
        "lora_op": info.json()["lora_op"] if info.status_code == 200 else "vllm (no plugin)",
        **{name: statistics.median(values) for name, values in runs.items()},
        "runs": runs,
        "naive_peft_tok_s": naive.tok_s,
        # CPU the gateway spends per request vs what vLLM spends: its real cost, free of noise.
        "gateway_cpu_ms_per_request": cpu["gateway"] * 1000 / (args.rounds * args.requests),
        "gateway_cpu_share": cpu["gateway"] / max(cpu["vllm"], 1e-9),
        **latency,
        "warm_ttft_p50_s": statistics.median(warm),
        "cold_ttft_p50_s": statistics.median(cold_ttft),
        "cold_ttft_all_s": cold_ttft,
        "promoted_ttft_p50_s": statistics.median(promoted_ttft),
        "promoted_ttft_all_s": promoted_ttft,
    }


def report(r: dict[str, Any], args: argparse.Namespace) -> None:
    multi_vs_base = r["gateway_8_adapters"] / r["gateway_base"]
    direct_multi_vs_base = r["direct_8_adapters"] / r["direct_base"]
    gateway_base_vs_direct = r["gateway_base"] / r["direct_base"]
    vs_naive = r["gateway_8_adapters"] / r["naive_peft_tok_s"]
    overhead = 1 - r["gateway_8_adapters"] / r["direct_8_adapters"]
    latency_overhead = r["gateway_p50_s"] / r["direct_p50_s"] - 1
    lines = [
        f"workload: {args.requests} chat requests x {args.max_tokens} tokens, concurrency "
        f"{args.concurrency}, {args.dtype} (LoRA weights: {args.lora_dtype}), median of "
        f"{args.rounds} alternating rounds; replica LoRA op: {r['lora_op']}",
        f"vLLM direct: base {r['direct_base']:.0f} tok/s, 8 adapters "
        f"{r['direct_8_adapters']:.0f} tok/s -> ratio {direct_multi_vs_base:.2f} (target >= 0.8)",
        f"gateway:     base {r['gateway_base']:.0f} tok/s -> {gateway_base_vs_direct:.2f} of "
        f"direct base (target >= 0.95); 8 adapters {r['gateway_8_adapters']:.0f} tok/s -> "
        f"ratio {multi_vs_base:.2f} of gateway base",
        f"naive peft set_adapter per request: {r['naive_peft_tok_s']:.1f} tok/s -> vLLM multi-LoRA "
        f"is {vs_naive:.1f}x (target >= 8x at concurrency 16)",
        f"cold adapter -> first token p50 {r['cold_ttft_p50_s'] * 1000:.0f} ms (target < 250 ms); "
        f"warm p50 {r['warm_ttft_p50_s'] * 1000:.0f} ms; just promoted, by name, p50 "
        f"{r['promoted_ttft_p50_s'] * 1000:.0f} ms",
        f"gateway overhead: throughput {overhead * 100:.1f}% lower (target < 5%); "
        f"short request p50 {r['direct_p50_s'] * 1000:.0f} -> {r['gateway_p50_s'] * 1000:.0f} ms "
        f"({latency_overhead * 100:+.1f}%); gateway CPU {r['gateway_cpu_ms_per_request']:.1f} ms"
        f"/request = {r['gateway_cpu_share'] * 100:.1f}% of vLLM's CPU on the same requests",
    ]
    print("\n".join(lines))
    print(json.dumps(r, default=float))


if __name__ == "__main__":
    main()
