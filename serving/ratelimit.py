"""Per-tenant serving rate limits: requests and tokens per minute on chat/completions and
completions, checked before the model is resolved or anything is generated.

    request --admit--> Grant (1 request + a token reservation taken; x-ratelimit-* headers)
            --Gateway.handle(on_usage=grant.settle)--> the reservation settles to real usage
    over a limit: api.services.limits.rate_limited -> 429, Retry-After, x-ratelimit-*

Each tenant has two token buckets per gateway process (capacity = the per-minute limit,
refilled continuously at limit/60 per second), so a tenant may burst up to its minute's worth
and then runs at its rate. Tokens are reserved before generation as OpenAI does: the prompt
estimated from its characters (no tokenizer on the event loop) plus `max_tokens` x `n` per
prompt; the reservation is settled to the engine's real usage when the answer ends (a failed
request gives its tokens back). A reservation larger than the whole limit can never fit:
refused at once with `x-should-retry: false`.

Why in-process buckets, not a shared store: admission is the hot path of every completion and
costs microseconds here (one dict lookup, arithmetic; no I/O, no lock: it runs on the event
loop between awaits, so check-and-take is atomic). Gateways share only Postgres, and a
database round trip (or a row lock every tenant's requests queue on) per request would cost
more than the limiter is allowed to (< 2%, bench/bench_rate_limit.py). With N gateways behind
a balancer, `rate_limit_gateways = N` makes each enforce limit/N: exact under round-robin or
least-connections balancing, stricter than the limit when one gateway gets all of a tenant's
traffic (never looser). The limits themselves come from the database, cached per tenant for
`rate_limit_refresh_seconds`, so an admin's change reaches every gateway within that time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from sqlmodel import Session
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.db import get_engine
from api.errors import LoraplexError, render
from api.services.limits import Limits, load_limits, rate_limited, window_headers
from api.services.tenants import hash_key
from api.settings import Settings
from serving.schemas import ChatCompletionRequest, CompletionRequest, SamplingRequest

CHARS_PER_TOKEN = 4  # OpenAI's rule of thumb for English; settled to the truth afterwards
PER_MESSAGE_TOKENS = 4  # the chat template's role markers around each message
# Reserved per choice when the request sets no max_tokens: a typical answer, not the context
# length (that would refuse short chats of tenants with small limits); settled afterwards.
UNSET_MAX_TOKENS = 256
MAX_REMEMBERED_KEYS = 100_000  # keys -> tenants a gateway remembers; forgotten all at once
PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})


@dataclass
class Bucket:
    """A token bucket of `capacity`, refilled to full over one minute."""

    capacity: float
    level: float
    updated: float

    @property
    def rate(self) -> float:
        return self.capacity / 60.0

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
        self.updated = now

    def resize(self, capacity: float) -> None:
        """A new limit keeps what was used: raising it frees the difference at once."""
        self.level += capacity - self.capacity
        self.capacity = capacity

    def wait_for(self, amount: float) -> float:
        return max(0.0, (amount - self.level) / self.rate)

    def until_full(self) -> float:
        return max(0.0, (self.capacity - self.level) / self.rate)


@dataclass
class Grant:
    """An admitted request: its headers, and the tokens it reserved until it settles."""

    headers: dict[str, str] = field(default_factory=dict)
    tokens: Bucket | None = None
    reserved: int = 0
    settled: bool = False

    def settle(self, usage: dict[str, Any] | None) -> None:
        """Give back what the reservation over-counted (or take what it under-counted)."""
        if self.settled:
            return
        self.settled = True
        if self.tokens is None:
            return
        used = int((usage or {}).get("prompt_tokens") or 0)
        used += int((usage or {}).get("completion_tokens") or 0)
        self.tokens.refill(time.monotonic())
        self.tokens.level = min(self.tokens.capacity, self.tokens.level + self.reserved - used)


@dataclass
class TenantState:
    limits: Limits
    fetched: float
    buckets: dict[str, Bucket] = field(default_factory=dict)  # "requests" | "tokens"


class RateLimiter:
    """This process's buckets for every tenant that called it."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._tenants: dict[str, TenantState] = {}
        self._callers: dict[str, str] = {}  # sha256 of a key -> its tenant, as authenticated

    def remember(self, authorization: str | None, *, tenant_id: str) -> None:
        """Note whose key this is (it just authenticated), for `refusal_before_body`."""
        if not authorization or not self.settings.rate_limits_enabled:
            return
        if len(self._callers) >= MAX_REMEMBERED_KEYS:
            self._callers.clear()
        self._callers[hash_key(authorization)] = tenant_id

    def caller(self, authorization: str | None) -> str | None:
        return self._callers.get(hash_key(authorization)) if authorization else None

    async def refusal_before_body(self, tenant_id: str) -> Exception | None:
        """The 429 for a tenant already out of requests this minute, or None: decided from
        the buckets (the limits cached as for admission), without the body, so a flood
        costs the gateway next to nothing. It only refuses: admission still does the rest."""
        if not self.settings.rate_limits_enabled:
            return None
        state = await self._own_state(tenant_id)
        limit = state.limits.requests_per_minute
        if not limit:
            return None
        bucket = self._bucket(state, "requests", limit, time.monotonic())
        if bucket.level >= 1:
            return None
        return self._refused(state, state.buckets, kind="requests", cost=1, tenant_id=tenant_id)

    async def charge_refused(self, tenant_id: str) -> None:
        """A request refused as malformed or out of bounds still counts against the
        tenant's requests (it cost a parse), so a stream of them is rate limited too."""
        if not self.settings.rate_limits_enabled:
            return
        state = await self._own_state(tenant_id)
        if state.limits.requests_per_minute:
            bucket = self._bucket(
                state, "requests", state.limits.requests_per_minute, time.monotonic()
            )
            bucket.level = max(0.0, bucket.level - 1)

    async def _own_state(self, tenant_id: str) -> TenantState:
        """`_state` outside a request's session (middleware has none): one of its own, opened
        only when the cached limits are due a refresh."""
        state = self._tenants.get(tenant_id)
        refresh = self.settings.rate_limit_refresh_seconds
        if state is not None and time.monotonic() - state.fetched < refresh:
            return state
        return await self._state(
            Session(get_engine(self.settings.database_url)), tenant_id=tenant_id
        )

    async def admit(self, session: Session, *, tenant_id: str, body: SamplingRequest) -> Grant:
        """Take one request and the body's token reservation, or raise RateLimited (429)."""
        if not self.settings.rate_limits_enabled:
            return Grant()
        state = await self._state(session, tenant_id=tenant_id)
        return self.take(state, tenant_id=tenant_id, cost=estimate_tokens(body))

    async def _state(self, session: Session, *, tenant_id: str) -> TenantState:
        now = time.monotonic()
        state = self._tenants.get(tenant_id)
        if state is not None and now - state.fetched < self.settings.rate_limit_refresh_seconds:
            return state
        if state is not None:
            state.fetched = now  # one refresh at a time; the others use the limits they have
        limits = await run_in_threadpool(self._load, session, tenant_id)
        state = self._tenants.setdefault(tenant_id, TenantState(limits=limits, fetched=now))
        state.limits, state.fetched = limits, now
        return state

    def _load(self, session: Session, tenant_id: str) -> Limits:
        try:
            return load_limits(session, self.settings, tenant_id=tenant_id)
        finally:
            session.close()  # the connection goes back to the pool (see resolve_and_release)

    def take(self, state: TenantState, *, tenant_id: str, cost: int) -> Grant:
        """Check and take both limits; no await inside, so concurrent requests cannot both
        take the last unit."""
        now = time.monotonic()
        windows = {
            "requests": state.limits.requests_per_minute,
            "tokens": state.limits.tokens_per_minute,
        }
        buckets = {
            kind: self._bucket(state, kind, limit, now) for kind, limit in windows.items() if limit
        }
        requests, tokens = buckets.get("requests"), buckets.get("tokens")
        if requests is not None and requests.level < 1:
            raise self._refused(state, buckets, kind="requests", cost=1, tenant_id=tenant_id)
        if tokens is not None and tokens.level < cost:
            raise self._refused(state, buckets, kind="tokens", cost=cost, tenant_id=tenant_id)
        if requests is not None:
            requests.level -= 1
        if tokens is not None:
            tokens.level -= cost
        return Grant(headers=self._headers(state, buckets), tokens=tokens, reserved=cost)

    def _bucket(self, state: TenantState, kind: str, limit: int, now: float) -> Bucket:
        capacity = limit / self.settings.rate_limit_gateways
        bucket = state.buckets.get(kind)
        if bucket is None:
            bucket = state.buckets[kind] = Bucket(capacity=capacity, level=capacity, updated=now)
        else:
            bucket.refill(now)
            if bucket.capacity != capacity:
                bucket.resize(capacity)
        return bucket

    def _headers(self, state: TenantState, buckets: dict[str, Bucket]) -> dict[str, str]:
        share = self.settings.rate_limit_gateways  # remaining: this gateway's, scaled up
        headers: dict[str, str] = {}
        for kind, bucket in buckets.items():
            limit = getattr(state.limits, f"{kind}_per_minute")
            headers |= window_headers(
                kind, limit=limit, remaining=bucket.level * share, reset=bucket.until_full()
            )
        return headers

    def _refused(
        self,
        state: TenantState,
        buckets: dict[str, Bucket],
        *,
        kind: str,
        cost: int,
        tenant_id: str,
    ) -> Exception:
        bucket, headers = buckets[kind], self._headers(state, buckets)
        limit = getattr(state.limits, f"{kind}_per_minute")
        short = {"requests": "RPM", "tokens": "TPM"}[kind]
        if cost > bucket.capacity:
            return rate_limited(
                f"Request too large for {kind} per min ({short}) in organization {tenant_id}: "
                f"Limit {limit}, Requested {cost}. Lower max_tokens or n, or shorten the prompt.",
                kind=kind,
                retry_after=None,
                headers=headers,
            )
        wait = bucket.wait_for(cost)
        used = max(0, round(bucket.capacity - bucket.level))
        return rate_limited(
            f"Rate limit reached for {kind} per min ({short}) in organization {tenant_id}: "
            f"Limit {limit}, Used {used}, Requested {cost}. Please try again in {wait:.3g}s.",
            kind=kind,
            retry_after=wait,
            headers=headers,
        )


def estimate_tokens(body: SamplingRequest) -> int:
    """The reservation: the prompt estimated from its length, plus the most it may generate."""
    prompts = 1
    if isinstance(body, ChatCompletionRequest):
        chars = sum(_content_chars(m.content) for m in body.messages)
        prompt = chars // CHARS_PER_TOKEN + PER_MESSAGE_TOKENS * len(body.messages)
        limit = body.token_limit
    elif isinstance(body, CompletionRequest):
        prompt, prompts = _prompt_tokens(body.prompt)
        limit = body.token_limit
    else:
        prompt, limit = 0, body.max_tokens
    return prompt + (limit or UNSET_MAX_TOKENS) * (body.n or 1) * prompts


def _content_chars(content: str | list[dict[str, Any]] | None) -> int:
    if isinstance(content, str):
        return len(content)
    return sum(len(str(part.get("text") or "")) for part in content or [])


def _prompt_tokens(prompt: str | list[str] | list[int] | list[list[int]]) -> tuple[int, int]:
    """(estimated prompt tokens, number of prompts) of a completions `prompt`."""
    if isinstance(prompt, str):
        return len(prompt) // CHARS_PER_TOKEN, 1
    if prompt and all(isinstance(p, int) for p in prompt):
        return len(prompt), 1  # token ids
    tokens = 0
    for p in prompt:
        tokens += len(p) // CHARS_PER_TOKEN if isinstance(p, str) else len(p)  # type: ignore[arg-type]
    return tokens, max(1, len(prompt))


class RefuseBeforeBody:
    """ASGI middleware on the completion routes: a tenant out of requests gets its 429
    before its body is read or parsed (a 3 MB prompt, 50,000 stop strings), and every 400
    it is answered counts against its requests. The tenant is known from a key that
    authenticated on this gateway before; an unknown key goes the normal way."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in PATHS:
            await self.app(scope, receive, send)
            return
        limiter: RateLimiter = scope["app"].state.rate_limiter
        authorization = Headers(scope=scope).get("authorization")
        tenant_id = limiter.caller(authorization)
        refusal = await limiter.refusal_before_body(tenant_id) if tenant_id else None
        if isinstance(refusal, LoraplexError):
            await render(refusal)(scope, receive, send)
            return
        status = 0

        async def watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        await self.app(scope, receive, watch)
        tenant_id = tenant_id or limiter.caller(authorization)
        if status == 400 and tenant_id:
            await limiter.charge_refused(tenant_id)
