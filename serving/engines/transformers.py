"""The in-process engine: transformers + peft on this machine, for hosts without vLLM.

torch, transformers and peft are imported inside the engine thread only, so importing this
module (and the gateway) stays light. One thread owns the model: the base loads once,
adapters load by name (LRU-unloaded past the budget), and the requests waiting when the
thread is free run as one mixed-adapter batch, `generate(adapter_names=[...])` with
"__base__" for base rows. Requests batch together when they sample alike; a request with a
`seed` runs alone, so its seed means what it says.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serving.engines.base import Engine, EngineRequest, ReplicaStatus
from serving.engines.responses import stream_chunks, whole_response
from serving.engines.textgen import (
    DEFAULT_CHAT_TOKENS,
    DEFAULT_COMPLETION_TOKENS,
    check_supported,
    prompt_token_ids,
)
from serving.errors import EngineError, InvalidRequest, no_replica

log = logging.getLogger(__name__)
REPLICA_NAME = "in-process"


@dataclass
class Job:
    request: EngineRequest
    prompts: list[list[int]]
    limit: int
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[tuple[Any, ...]] = field(default_factory=asyncio.Queue)
    response_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def n(self) -> int:
        return int(self.request.body.get("n") or 1)

    @property
    def sampling_key(self) -> tuple[Any, ...]:
        body = self.request.body
        temperature = body.get("temperature", 1.0)
        if temperature == 0:
            return ("greedy",)
        return ("sample", temperature, body.get("top_p", 1.0), body.get("seed"))

    @property
    def seeded(self) -> bool:
        return self.request.body.get("seed") is not None

    def emit(self, *event: Any) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


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
        self.tokenizer: Any = None
        self.request_tokenizer: Any = None

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

    def _submit(self, request: EngineRequest) -> Job:
        if not self._ready.is_set() or self._failed is not None:
            raise no_replica(5)
        check_supported(request.body)
        prompts = prompt_token_ids(self.request_tokenizer, request.endpoint, request.body)
        default = DEFAULT_CHAT_TOKENS if request.endpoint == "chat" else DEFAULT_COMPLETION_TOKENS
        asked = request.body.get("max_completion_tokens") or request.body.get("max_tokens")
        context = int(getattr(self.model.config, "max_position_embeddings", 2048))
        longest = max(len(p) for p in prompts)
        if longest + (asked or 1) > context:
            raise InvalidRequest(
                f"This model's maximum context length is {context} tokens; the prompt has "
                f"{longest} and {asked or 1} more were requested.",
                param="messages" if request.endpoint == "chat" else "prompt",
                code="context_length_exceeded",
            )
        limit = min(asked or default, context - longest)
        job = Job(request=request, prompts=prompts, limit=limit, loop=asyncio.get_running_loop())
        with self._wake:
            self._pending.append(job)
            self._wake.notify()
        return job

    async def complete(self, request: EngineRequest) -> dict[str, Any]:
        job = self._submit(request)
        texts: dict[int, list[str]] = {}
        reasons: dict[int, str] = {}
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

    async def open_stream(self, request: EngineRequest) -> AsyncIterator[dict[str, Any]]:
        job = self._submit(request)
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
            self._busy = len(batch)
            self.largest_batch = max(self.largest_batch, len(batch))
            try:
                self._generate(batch)
            except BaseException as e:
                log.exception("generation failed")
                for job in batch:
                    job.emit("error", EngineError(f"generation failed: {type(e).__name__}: {e}"))
            finally:
                self._busy = 0

    def _next_batch(self) -> list[Job] | None:
        with self._wake:
            while not self._pending and not self._stopped:
                self._wake.wait()
            if self._stopped:
                return None
            deadline = time.monotonic() + self.batch_window
            while len(self._pending) < self.max_batch_size and not self._stopped:
                left = deadline - time.monotonic()
                if left <= 0 or not self._wake.wait(left):
                    break
            head = self._pending.popleft()
            batch, rest = [head], deque[Job]()
            rows = len(head.prompts) * head.n
            while self._pending:
                job = self._pending.popleft()
                fits = rows + len(job.prompts) * job.n <= self.max_batch_size
                if fits and not head.seeded and job.sampling_key == head.sampling_key:
                    batch.append(job)
                    rows += len(job.prompts) * job.n
                else:
                    rest.append(job)
            self._pending.extendleft(reversed(rest))
            return batch

    def _load_base(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if self.threads:
            torch.set_num_threads(self.threads)  # process-wide: this engine owns torch here
        base_dir = self.load_base()
        dtype = torch.bfloat16 if self.dtype == "bfloat16" else torch.float32
        self.tokenizer = AutoTokenizer.from_pretrained(base_dir)
        # A second copy for the event loop: a Rust tokenizer used from two threads at once
        # can fail with "Already borrowed".
        self.request_tokenizer = AutoTokenizer.from_pretrained(base_dir)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype).eval()

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
            if isinstance(self.model, PeftModel):
                self.model.load_adapter(str(path), adapter_name=name)
            else:
                self.model = PeftModel.from_pretrained(self.model, str(path), adapter_name=name)
            self.model.eval()
            self.loaded[name] = None

    def _generate(self, batch: list[Job]) -> None:
        import torch

        from serving.engines.batching import BatchStreamer, generate_kwargs

        adapters = {
            j.request.adapter.name: j.request.adapter.path for j in batch if j.request.adapter
        }
        self._ensure_adapters(adapters)
        streamer = BatchStreamer(batch, tokenizer=self.tokenizer)
        kwargs = generate_kwargs(
            batch, streamer=streamer, tokenizer=self.tokenizer, peft=bool(self.loaded)
        )
        seed = batch[0].request.body.get("seed")
        if seed is not None:
            torch.manual_seed(int(seed))
        with torch.inference_mode():
            self.model.generate(**kwargs)
        streamer.finish()
