"""The in-process engine: transformers + peft on this machine, for hosts without vLLM.

torch, transformers and peft are imported inside the engine thread only, so importing this
module (and the gateway) stays light. One thread owns the model: the base loads once,
adapters load by name (LRU-unloaded past the budget), and the requests waiting when the
thread is free run as one mixed-adapter batch, `generate(adapter_names=[...])` with
"__base__" for base rows. Which rows run together, and in what turns, is scheduling.py's.

Prompts are tokenized (and chat templates rendered) in a small pool of threads, each with
its own tokenizer: never on the event loop. One tenant's request can never fail another's:
when a batch fails, each request in it runs again alone and only one that fails alone fails,
with a generic message (the detail goes to the log, never to another tenant).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from serving.engines.base import Engine, EngineRequest, ModelLimits, ReplicaStatus
from serving.engines.responses import stream_chunks, whole_response
from serving.engines.scheduling import Job, Slice, next_batch, requeue
from serving.engines.textgen import (
    DEFAULT_CHAT_TOKENS,
    DEFAULT_COMPLETION_TOKENS,
    check_supported,
    prompt_token_ids,
)
from serving.errors import EngineError, InvalidRequest, no_replica

log = logging.getLogger(__name__)
REPLICA_NAME = "in-process"
# Tokenizer threads (each with its own copy: a Rust tokenizer used from two threads at once
# can fail with "Already borrowed"). Tokenizing releases the GIL; two keep one huge prompt
# from holding up everyone else's.
TOKENIZER_THREADS = 2
FAILED = "The engine could not generate an answer for this request."
# Loading a model or an adapter is one at a time per process: transformers builds a model on
# the meta device while it loads and ties its weights after, and two loads at once in one
# process (two engines, as two in-process gateways run) left a tied lm_head on meta in 10
# loads of 12 here ("Cannot copy out of meta tensor" at generation).
_LOADING = threading.Lock()


class TransformersEngine(Engine):
    kind = "transformers"

    def __init__(
        self,
        *,
        load_base: Callable[[], Path],
        dtype: str = "float32",
        budget: int = 16,
        max_batch_size: int = 8,
        batch_window: float = 0.01,
        threads: int | None = None,
    ) -> None:
        self.load_base = load_base
        self.dtype = dtype
        self.budget = budget
        self.max_batch_size = max_batch_size
        # After the first request, wait this long for companions: a batch of 8 costs about
        # as much as one on CPU (ML-NOTES: 150 vs 25 tok/s), so a few ms buy a lot.
        self.batch_window = batch_window
        self.threads = threads
        self.loaded: OrderedDict[str, None] = OrderedDict()
        self._pending: deque[Job] = deque()
        self._wake = threading.Condition()
        self._stopped = False
        self._ready = threading.Event()
        self._failed: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._busy = 0
        self.largest_batch = 0  # rows in the biggest generate() so far (observability)
        self.model: Any = None
        self.tokenizer: Any = None  # the engine thread's (decoding)
        self._tokenizers: queue.SimpleQueue[Any] = queue.SimpleQueue()  # the pool's
        self._tokenizing = ThreadPoolExecutor(TOKENIZER_THREADS, thread_name_prefix="tokenize")
        self._limits: ModelLimits | None = None

    async def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="transformers-engine", daemon=True)
        self._thread.start()

    async def wait_ready(self, timeout: float = 600) -> None:
        await asyncio.to_thread(self._ready.wait, timeout)
        if self._failed is not None:
            raise EngineError(f"engine failed to start: {self._failed}") from self._failed

    async def close(self) -> None:
        with self._wake:
            self._stopped = True
            self._wake.notify_all()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30)
        self._tokenizing.shutdown(wait=False, cancel_futures=True)

    def limits(self) -> ModelLimits | None:
        return self._limits

    def status(self) -> list[ReplicaStatus]:
        return [
            ReplicaStatus(
                name=REPLICA_NAME,
                healthy=self._ready.is_set() and self._failed is None,
                loaded=list(self.loaded),
                queue_depth=len(self._pending) + self._busy,
            )
        ]

    # Requests (event loop side) ----------------------------------------------------------

    async def _submit(self, request: EngineRequest) -> Job:
        if not self._ready.is_set() or self._failed is not None or self._limits is None:
            raise no_replica(5)
        loop = asyncio.get_running_loop()
        prompts, limit = await loop.run_in_executor(
            self._tokenizing, self._prepare, request, self._limits.context
        )
        job = Job(request=request, prompts=prompts, limit=limit, loop=loop)
        with self._wake:
            self._pending.append(job)
            self._wake.notify()
        return job

    def _prepare(self, request: EngineRequest, context: int) -> tuple[list[list[int]], int]:
        """Tokenize and check one request (in a tokenizer thread): (prompts, token limit)."""
        check_supported(request.body)
        tokenizer = self._tokenizers.get()
        try:
            prompts = prompt_token_ids(tokenizer, request.endpoint, request.body)
        finally:
            self._tokenizers.put(tokenizer)
        param = "messages" if request.endpoint == "chat" else "prompt"
        if not prompts or not all(prompts):
            raise InvalidRequest("A prompt has no tokens.", param=param, code="empty_prompt")
        default = DEFAULT_CHAT_TOKENS if request.endpoint == "chat" else DEFAULT_COMPLETION_TOKENS
        asked = request.body.get("max_completion_tokens") or request.body.get("max_tokens")
        longest = max(len(p) for p in prompts)
        if longest + (asked or 1) > context:
            raise InvalidRequest(
                f"This model's maximum context length is {context} tokens; the prompt has "
                f"{longest} and {asked or 1} more were requested.",
                param=param,
                code="context_length_exceeded",
            )
        return prompts, min(asked or default, context - longest)

    async def complete(self, request: EngineRequest) -> dict[str, Any]:
        job = await self._submit(request)
        texts: dict[int, list[str]] = {}
        reasons: dict[int, str] = {}
        event: tuple[Any, ...] = ("",)
        try:
            while True:
                event = await job.events.get()
                if event[0] == "delta":
                    texts.setdefault(event[1], []).append(event[2])
                elif event[0] == "finish":
                    reasons[event[1]] = event[2]
                elif event[0] == "error":
                    raise event[1]
                elif event[0] == "done":
                    return whole_response(job, texts, reasons, usage=event[1])
        finally:
            if event[0] != "done":  # the caller went away (cancelled): stop its rows
                request.cancelled.set()

    async def open_stream(self, request: EngineRequest) -> AsyncIterator[dict[str, Any]]:
        job = await self._submit(request)
        return stream_chunks(job)

    # The engine thread -------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._load_base()
        except BaseException as e:
            log.exception("transformers engine failed to load the base model")
            self._failed = e
            self._ready.set()
            return
        self._ready.set()
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            rows = sum(part.size for part in batch)
            self._busy = rows
            self.largest_batch = max(self.largest_batch, rows)
            try:
                self._run_batch(batch)
            finally:
                self._busy = 0
                with self._wake:
                    requeue(self._pending, batch)

    def _next_batch(self) -> list[Slice] | None:
        with self._wake:
            while True:
                while not self._pending and not self._stopped:
                    self._wake.wait()
                if self._stopped:
                    return None
                deadline = time.monotonic() + self.batch_window
                while len(self._pending) < self.max_batch_size and not self._stopped:
                    left = deadline - time.monotonic()
                    if left <= 0 or not self._wake.wait(left):
                        break
                batch = next_batch(self._pending, max_rows=self.max_batch_size)
                if batch:
                    return batch

    def _run_batch(self, batch: list[Slice]) -> None:
        """Generate for `batch`; if that fails, each request runs again alone, and only one
        that fails alone fails (one that was already sent text cannot run again)."""
        error, emitted = self._attempt(batch)
        if error is None:
            return
        if len(batch) > 1:
            log.warning("a batch of %d requests failed (%s: %s); running each alone",
                        len(batch), type(error).__name__, error)  # fmt: skip
        for part in batch:
            retry = len(batch) > 1 and id(part.job) not in emitted
            alone = self._attempt([part])[0] if retry else error
            if alone is not None:
                self._fail(part.job, alone)

    def _attempt(self, batch: list[Slice]) -> tuple[BaseException | None, set[int]]:
        """One generate() over `batch`: the error it raised, if any, and the jobs it sent
        output to."""
        from serving.engines.batching import BatchStreamer

        streamer = BatchStreamer(batch, tokenizer=self.tokenizer)
        try:
            self._generate(batch, streamer)
        except BaseException as e:  # whatever it was, the engine thread must live on
            streamer.rollback()
            return e, streamer.emitted
        return None, streamer.emitted

    def _fail(self, job: Job, error: BaseException) -> None:
        log.error("request %s failed in generation", job.response_id, exc_info=error)
        job.failed = True
        job.emit("error", EngineError(FAILED))

    def _load_base(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if self.threads:
            torch.set_num_threads(self.threads)  # process-wide: this engine owns torch here
        base_dir = self.load_base()
        dtype = torch.bfloat16 if self.dtype == "bfloat16" else torch.float32
        self.tokenizer = AutoTokenizer.from_pretrained(base_dir)
        for _ in range(TOKENIZER_THREADS):
            self._tokenizers.put(AutoTokenizer.from_pretrained(base_dir))
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        with _LOADING:
            self.model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype).eval()
        self._limits = ModelLimits(
            vocab_size=int(self.model.get_input_embeddings().num_embeddings),
            context=int(getattr(self.model.config, "max_position_embeddings", 2048)),
        )

    def _ensure_adapters(self, names: dict[str, Path]) -> None:
        from peft import PeftModel

        for name, path in names.items():
            if name in self.loaded:
                self.loaded.move_to_end(name)
                continue
            idle = [n for n in self.loaded if n not in names]
            for victim in idle[: max(0, len(self.loaded) + 1 - self.budget)]:
                self.model.delete_adapter(victim)
                del self.loaded[victim]
            with _LOADING:
                if isinstance(self.model, PeftModel):
                    self.model.load_adapter(str(path), adapter_name=name)
                else:
                    self.model = PeftModel.from_pretrained(self.model, str(path), adapter_name=name)
            self.model.eval()
            self.loaded[name] = None

    def _generate(self, batch: list[Slice], streamer: Any) -> None:
        import torch

        from serving.engines.batching import generate_kwargs

        adapters = {
            p.job.request.adapter.name: p.job.request.adapter.path
            for p in batch
            if p.job.request.adapter and p.job.request.adapter.path  # local: fetches_adapters
        }
        self._ensure_adapters(adapters)
        kwargs = generate_kwargs(
            batch, streamer=streamer, tokenizer=self.tokenizer, peft=bool(self.loaded)
        )
        seed = batch[0].seed
        if seed is not None:
            torch.manual_seed(seed)
        streamer.begin()
        with torch.inference_mode():
            self.model.generate(**kwargs)
        streamer.finish()
