"""Text completion and echoed logprobs from any OpenAI-compatible server (OpenAI, vLLM, llama.cpp, Ollama).

Requests run concurrently (bounded by `max_concurrency`) under a synchronous `complete`, so the
pipeline stays plain Python. Each method has an async twin (`acomplete`, `aecho_levels`, ...): a
caller with many jobs (a simulator over a layer's explanations) awaits them all inside one `run`,
so one client and one limit cover every request and a server with N slots gets N in flight.
The SDK's own retries are off: ours retry 429 (honouring Retry-After), 5xx, timeouts,
connection errors and malformed bodies with exponential backoff and full jitter, and then give up
with an `LLMFailure` for that prompt only. Other 4xx fail at once: retrying a bad request only costs money.

The API key is read from the environment at request time and never kept on the instance, written
to the cache, logged, or put in a failure reason (reasons are scrubbed of it, since a server may
quote the key back in an error body).

With `client_processes=N` (N > 1) each attempt of a request is sent, together with the reading of
its reply and the caller's reducer, to one of N client processes (`pipeline.infra.llm_processes`), each
with its own client, and only the reduced value comes back: one Python process spends several ms
of CPU per request and so is capped by its GIL near 150 requests/s, whatever the cores. Everything
else stays here: the `max_concurrency` limit (over all processes together), retries and failure
reasons, usage, the cache and the order of results. A client process reads the key from the same
environment variable (it inherits the environment; the key is never sent to it). Requests whose
reducers cannot be sent to another process (a lambda, a function of `__main__`) run here.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import email.utils
import json
import logging
import math
import os
import random
import threading
import time
import types
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from typing import Any, TypeVar, overload
from urllib.parse import urlsplit, urlunsplit

import openai
import orjson
from openai import AsyncOpenAI

from pipeline.core.errors import AtlasInputError
from pipeline.core.llm import (
    APIS,
    ChatReply,
    Completion,
    EchoLogprobs,
    GenerationParams,
    LLMBackend,
    LLMFailure,
    Messages,
    Prompt,
    Unusable,
)
from pipeline.infra.llm_cache import LLMCache
from pipeline.infra.llm_processes import NotPortable, ProcessPool

log = logging.getLogger(__name__)

T = TypeVar("T")
DEFAULT_BASE_URL = "https://api.openai.com/v1"
NO_KEY = "not-needed"  # local servers ignore the key, but the SDK insists on one
NO_LOGPROBS = "server returned no logprobs (echo unsupported?)"
NO_CHAT_LOGPROBS = "server returned no logprobs (set the simulator's logprobs: false for sampled levels)"


class _Malformed(Exception):
    """A 2xx response we cannot use (empty, not JSON, wrong shape): retried like a 5xx."""


class _Fatal(Exception):
    """A 2xx response that retrying will not fix (e.g. no logprobs from a server without echo)."""


def _public_url(url: str) -> str:
    """The base URL without credentials or query, safe to log and to use as cache key material."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path.rstrip("/"), "", ""))


@dataclasses.dataclass
class _Session:
    """What the requests of one `OpenAIBackend.run` share."""

    client: AsyncOpenAI
    semaphore: asyncio.Semaphore
    pending: dict[tuple[str, str, str], asyncio.Future[Any]] = dataclasses.field(default_factory=dict)
    pool: ProcessPool | None = None  # the client processes, when the backend has them


@dataclasses.dataclass
class _Outcome:
    """What one attempt came to: a value (`reason` None), or why not and whether to try again
    (after `wait` seconds where the server said, else after the backoff)."""

    value: Any = None
    reason: str | None = None
    retry: bool = False
    wait: float | None = None


def _outcome_of(exc: Exception, timeout_s: float, retry_timeouts: bool) -> _Outcome | None:
    """An attempt's exception as a failed `_Outcome`; None for one that is not about the request (raise it)."""
    if isinstance(exc, openai.APIStatusError):
        reason = f"HTTP {exc.status_code}: {_brief(exc.message)}"
        if exc.status_code == 429:
            return _Outcome(reason=reason, retry=True, wait=retry_after_seconds(exc.response.headers))
        return _Outcome(reason=reason, retry=exc.status_code >= 500)  # other 4xx: retrying will not help
    if isinstance(exc, openai.APITimeoutError):
        reason = f"timed out after {timeout_s:g} s"
        if not retry_timeouts:
            # The server may still be working on it: resending would queue the same work again.
            return _Outcome(reason=f"{reason}; not resent (raise timeout_s, or lower max_concurrency)")
        return _Outcome(reason=reason, retry=True)
    if isinstance(exc, openai.APIConnectionError):
        return _Outcome(reason=f"connection error: {_brief(str(exc))}", retry=True)
    if isinstance(exc, (openai.APIResponseValidationError, json.JSONDecodeError, _Malformed)):
        return _Outcome(reason=f"malformed response: {_brief(str(exc))}", retry=True)
    if isinstance(exc, (_Fatal, Unusable)):
        return _Outcome(reason=str(exc))
    return None


def _tokens(resp: Any) -> tuple[int, int]:
    """(prompt, completion) tokens a response reports (0 where it does not)."""
    usage = getattr(resp, "usage", None)
    prompt_tokens = getattr(usage, "prompt_tokens", None)
    completion_tokens = getattr(usage, "completion_tokens", None)
    return (
        prompt_tokens if isinstance(prompt_tokens, int) else 0,
        completion_tokens if isinstance(completion_tokens, int) else 0,
    )


def _scrub(text: str, api_key_env: str) -> str:
    """Remove the API key from text a server may have quoted it in."""
    key = os.environ.get(api_key_env)
    return text.replace(key, "<api key>") if key else text


def _sampling(model: str, params: GenerationParams) -> dict[str, Any]:
    common: dict[str, Any] = {
        "model": model,
        "max_tokens": params.max_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "n": params.n,
        "seed": params.seed,
    }
    if params.stop:
        common["stop"] = list(params.stop)
    return common


# -- the requests, as plain data a client process can run ---------------------------------------------
# Each kind of request is `request(client, prompt, state)` (the HTTP call; `state` is the backend,
# or a client process's context, whichever remembers that the server ignores `n`) and `read(resp,
# prompt, reducer)` (the reply as the JSON value the caller keeps). The backend's methods use them
# in this process, and send them to its client processes.


@dataclasses.dataclass(frozen=True)
class _Complete:
    model: str
    params: GenerationParams
    chat: bool

    def _one(self, client: AsyncOpenAI, prompt: Prompt, n: int, seed: int) -> Awaitable[Any]:
        common = _sampling(self.model, dataclasses.replace(self.params, n=n, seed=seed))
        if self.chat:
            return client.chat.completions.create(messages=_messages(prompt), **common)
        return client.completions.create(prompt=prompt, **common)

    async def request(self, client: AsyncOpenAI, prompt: Prompt, state: Any) -> Any:
        params, one = self.params, self._one
        if params.n == 1:
            return await one(client, prompt, 1, params.seed)
        if not state._n_ignored:
            resp = await one(client, prompt, params.n, params.seed)
            got = len(getattr(resp, "choices", None) or [])
            if got != 1:
                return resp
            # llama.cpp's server (and others) ignore `n` and answer one choice: ask for the rest
            # one at a time, with their own seeds, from now on.
            if not state._n_ignored:
                log.info("%s: the server ignores n=%d; sampling one choice per request", self.model, params.n)
            state._n_ignored = True
            return _merged([resp] + [await one(client, prompt, 1, params.seed + k) for k in range(1, params.n)])
        # One after another, so the requests in flight stay within max_concurrency.
        return _merged([await one(client, prompt, 1, params.seed + k) for k in range(params.n)])

    def read(self, resp: Any, prompt: Prompt, reducer: None) -> dict[str, Any]:
        return _parse_completion(resp, self.params.n, chat=self.chat)


@dataclasses.dataclass(frozen=True)
class _Echo:
    model: str
    top_logprobs: int
    max_tokens: int  # generated after the echoed prompt (0, or 1 for servers that refuse 0)

    def request(self, client: AsyncOpenAI, prompt: Prompt, state: Any) -> Awaitable[Any]:
        return _json_body(
            client.completions.with_raw_response.create(
                model=self.model,
                prompt=prompt,
                echo=True,
                logprobs=self.top_logprobs,
                max_tokens=self.max_tokens,
                temperature=0,
            )
        )

    def read(self, resp: Any, prompt: Prompt, reducer: Callable[[EchoLogprobs, str], Any]) -> Any:
        assert isinstance(prompt, str)
        echo = _parse_echo(resp, prompt, self.max_tokens)
        return reducer(EchoLogprobs(echo["tokens"], echo["top_logprobs"], echo["text_offset"]), prompt)


@dataclasses.dataclass(frozen=True)
class _Next:
    model: str
    top_logprobs: int

    def request(self, client: AsyncOpenAI, prompt: Prompt, state: Any) -> Awaitable[Any]:
        return _json_body(
            client.completions.with_raw_response.create(
                model=self.model, prompt=prompt, max_tokens=1, logprobs=self.top_logprobs, temperature=0
            )
        )

    def read(self, resp: Any, prompt: Prompt, reducer: None) -> dict[str, Any]:
        return _parse_next(resp, prompt)


@dataclasses.dataclass(frozen=True)
class _ChatLevels:
    model: str
    params: GenerationParams
    top_logprobs: int | None

    def request(self, client: AsyncOpenAI, prompt: Prompt, state: Any) -> Awaitable[Any]:
        extra: dict[str, Any] = {}
        if self.top_logprobs is not None:
            extra = {"logprobs": True, "top_logprobs": self.top_logprobs}
        return _json_body(
            client.chat.completions.with_raw_response.create(
                messages=_messages(prompt), **_sampling(self.model, self.params), **extra
            )
        )

    def read(self, resp: Any, prompt: Prompt, reducer: Callable[[ChatReply], Any]) -> Any:
        return reducer(_parse_chat_reply(resp, self.top_logprobs is not None))


@dataclasses.dataclass(frozen=True)
class _CompletionLevels:
    model: str
    params: GenerationParams
    top_logprobs: int | None

    def request(self, client: AsyncOpenAI, prompt: Prompt, state: Any) -> Awaitable[Any]:
        extra: dict[str, Any] = {} if self.top_logprobs is None else {"logprobs": self.top_logprobs}
        return client.completions.create(prompt=prompt, **_sampling(self.model, self.params), **extra)

    def read(self, resp: Any, prompt: Prompt, reducer: Callable[[ChatReply], Any]) -> Any:
        return reducer(_parse_completion_reply(resp, self.top_logprobs is not None))


Call = _Complete | _Echo | _Next | _ChatLevels | _CompletionLevels


@dataclasses.dataclass(frozen=True)
class _ClientSettings:
    """What a client process needs to make its client (the key's variable name, never the key)."""

    base_url: str
    api_key_env: str
    timeout_s: float
    retry_timeouts: bool

    def __call__(self) -> _ClientContext:
        client = AsyncOpenAI(
            api_key=os.environ.get(self.api_key_env) or NO_KEY,
            base_url=self.base_url,
            timeout=self.timeout_s,
            max_retries=0,
        )
        # The SDK loads its resources on first use: load them now, before the process says it is ready.
        _ = client.completions.with_raw_response, client.chat.completions.with_raw_response
        return _ClientContext(client, self)


@dataclasses.dataclass
class _ClientContext:
    """A client process's client, and what it has learnt of the server."""

    client: AsyncOpenAI
    settings: _ClientSettings
    _n_ignored: bool = False

    async def aclose(self) -> None:
        await self.client.close()

    def scrub(self, text: str) -> str:
        return _scrub(text, self.settings.api_key_env)


@dataclasses.dataclass(frozen=True)
class _Attempt:
    """One attempt of one request, run in a client process: (outcome, tokens reported or None when no
    reply arrived, whether the server is now known to ignore `n`)."""

    call: Call
    prompt: Prompt
    reducer: Any
    n_ignored: bool

    async def __call__(self, ctx: _ClientContext) -> tuple[_Outcome, tuple[int, int] | None, bool]:
        ctx._n_ignored = ctx._n_ignored or self.n_ignored
        settings = ctx.settings
        tokens = None
        try:
            resp = await self.call.request(ctx.client, self.prompt, ctx)
            tokens = _tokens(resp)
            outcome = _Outcome(self.call.read(resp, self.prompt, self.reducer))
        except Exception as exc:
            found = _outcome_of(exc, settings.timeout_s, settings.retry_timeouts)
            if found is None:
                raise
            outcome = dataclasses.replace(found, reason=_scrub(found.reason or "", settings.api_key_env))
        return outcome, tokens, ctx._n_ignored


def retry_after_seconds(headers: Any) -> float | None:
    """Seconds a 429 asks us to wait: `retry-after-ms`, or `retry-after` as seconds or an HTTP date."""
    if headers is None:
        return None
    try:
        if (ms := headers.get("retry-after-ms")) is not None:
            return max(0.0, float(ms) / 1000)
        value = headers.get("retry-after")
        if value is None:
            return None
        try:
            return max(0.0, float(value))
        except ValueError:
            when = email.utils.parsedate_to_datetime(value)
            return max(0.0, when.timestamp() - time.time())
    except (TypeError, ValueError, OverflowError):
        return None


class OpenAIBackend(LLMBackend):
    """`complete` via /completions (`api="completions"`) or /chat/completions (`api="chat"`);
    `echo_levels` via /completions with echo, `next_logprobs` via /completions with one generated
    token, `chat_levels` via /chat/completions with logprobs. Results are cached per request when a
    cache is given; the echo and chat-logprob requests cache only what the caller reduced them to."""

    backend = "openai"

    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        *,
        api_key_env: str = "OPENAI_API_KEY",
        api: str = "completions",
        max_concurrency: int = 8,
        timeout_s: float = 60.0,
        retry_timeouts: bool = False,
        max_attempts: int = 5,
        backoff_base_s: float = 0.5,
        backoff_cap_s: float = 30.0,
        max_retry_after_s: float = 120.0,
        echo_max_tokens: int = 0,
        cache: LLMCache | None = None,
        client_processes: int = 1,
    ):
        if api not in APIS:
            raise AtlasInputError(f"unknown api {api!r}: use one of {', '.join(APIS)}")
        if max_concurrency < 1:
            raise AtlasInputError(f"max_concurrency must be at least 1, got {max_concurrency}")
        if max_attempts < 1:
            raise AtlasInputError(f"max_attempts must be at least 1, got {max_attempts}")
        if not timeout_s > 0:
            raise AtlasInputError(f"timeout_s must be above 0, got {timeout_s}")
        if client_processes < 1:
            raise AtlasInputError(f"client_processes must be at least 1, got {client_processes}")
        if echo_max_tokens not in (0, 1):
            raise AtlasInputError(
                f"echo_max_tokens must be 0 or 1 (1 for servers that refuse 0), got {echo_max_tokens}"
            )
        self.model = model
        self.base_url = base_url or DEFAULT_BASE_URL
        self.api_key_env = api_key_env  # the variable's name only; its value is read per call
        self.api = api
        self.max_concurrency = max_concurrency
        self.timeout_s = timeout_s
        self.retry_timeouts = retry_timeouts
        self.max_attempts = max_attempts
        self.backoff_base_s = backoff_base_s
        self.backoff_cap_s = backoff_cap_s
        self.max_retry_after_s = max_retry_after_s
        self.echo_max_tokens = echo_max_tokens
        self.cache = cache
        self.client_processes = client_processes
        self._pool: ProcessPool | None = None  # started by the first session that needs it
        self._pool_lock = threading.Lock()
        self._scope = f"{self.backend}@{_public_url(self.base_url)}"  # different servers, different answers
        self._n_ignored = False  # set once the server has answered n > 1 with a single choice
        # The client and concurrency limit of the `run` under way in this context (see `session`).
        self._session: ContextVar[_Session | None] = ContextVar(f"openai-session-{id(self)}", default=None)

    def __repr__(self) -> str:
        return (
            f"OpenAIBackend(model={self.model!r}, base_url={_public_url(self.base_url)!r}, "
            f"api_key_env={self.api_key_env!r}, api={self.api!r})"
        )

    # -- public API -------------------------------------------------------------------------------

    def complete(self, prompts: Sequence[Prompt], params: GenerationParams) -> list[Completion | LLMFailure]:
        return self.run(lambda: self.acomplete(prompts, params))

    def complete_each(
        self,
        prompts: Sequence[Prompt],
        params: GenerationParams,
        on_result: Callable[[int, Completion | LLMFailure], None] | None = None,
    ) -> list[Completion | LLMFailure]:
        """All prompts at once under the one limit, each reported to `on_result` as it finishes."""
        return self.run(lambda: self.acomplete(prompts, params, on_result))

    async def acomplete(
        self,
        prompts: Sequence[Prompt],
        params: GenerationParams,
        on_result: Callable[[int, Completion | LLMFailure], None] | None = None,
    ) -> list[Completion | LLMFailure]:
        chat = self.api == "chat"
        if not chat and any(not isinstance(p, str) for p in prompts):
            raise AtlasInputError("a chat prompt (a list of turns) needs api: chat; this backend uses completions")
        kind = "chat" if chat else "completion"
        key_params = dataclasses.asdict(params)
        call = _Complete(self.model, params, chat)

        def done(value: Any, cached: bool) -> Completion | LLMFailure:
            return value if isinstance(value, LLMFailure) else Completion.from_record(value, cached=cached)

        report = None if on_result is None else (lambda i, value, cached: on_result(i, done(value, cached)))
        values = await self._acached_batch(prompts, kind, key_params, call, None, report)
        return [done(v, c) for v, c in values]

    def echo_logprobs(self, prompts: Sequence[str], top_logprobs: int = 5) -> list[EchoLogprobs | LLMFailure]:
        """The raw echo (not cached: it is large; `echo_levels` caches only what it reads from it)."""
        self._require_completions("echo with logprobs")
        raw = [lambda echo, prompt: echo] * len(prompts)
        return self.run(lambda: self._aecho(prompts, top_logprobs, raw, kind=None))

    def echo_levels(
        self,
        prompts: Sequence[str],
        top_logprobs: int,
        reducers: Sequence[Callable[[EchoLogprobs, str], Any]],
        version: str,
    ) -> list[Any | LLMFailure]:
        """Each prompt echoed with logprobs and passed through its reducer `(echo, prompt) -> JSON`,
        whose value is what gets cached (under `version`). A reducer raises `Unusable` for a reply
        it cannot read: that is a failure, neither retried nor cached."""
        return self.run(lambda: self.aecho_levels(prompts, top_logprobs, reducers, version))

    async def aecho_levels(
        self,
        prompts: Sequence[str],
        top_logprobs: int,
        reducers: Sequence[Callable[[EchoLogprobs, str], Any]],
        version: str,
    ) -> list[Any | LLMFailure]:
        self._require_completions("echo with logprobs")
        return await self._aecho(prompts, top_logprobs, reducers, kind=f"echo:{version}")

    def next_logprobs(self, prompts: Sequence[str], top_logprobs: int) -> list[dict[str, float] | LLMFailure]:
        """Top log-probabilities of the token after each prompt (one greedy generated token)."""
        return self.run(lambda: self.anext_logprobs(prompts, top_logprobs))

    async def anext_logprobs(self, prompts: Sequence[str], top_logprobs: int) -> list[dict[str, float] | LLMFailure]:
        self._require_completions("next-token logprobs")
        call = _Next(self.model, top_logprobs)
        values = await self._acached_batch(prompts, "next", {"top_logprobs": top_logprobs}, call)
        return [v if isinstance(v, LLMFailure) else v["top"] for v, _ in values]

    def chat_levels(
        self,
        conversations: Sequence[Messages],
        params: GenerationParams,
        top_logprobs: int | None,
        reducers: Sequence[Callable[[ChatReply], Any]],
        version: str,
    ) -> list[Any | LLMFailure]:
        """Each conversation answered on /chat/completions (with `logprobs` and `top_logprobs` unless
        None) and passed through its reducer; the reducer's JSON value is what gets cached."""
        return self.run(lambda: self.achat_levels(conversations, params, top_logprobs, reducers, version))

    async def achat_levels(
        self,
        conversations: Sequence[Messages],
        params: GenerationParams,
        top_logprobs: int | None,
        reducers: Sequence[Callable[[ChatReply], Any]],
        version: str,
    ) -> list[Any | LLMFailure]:
        by_id = {id(c): r for c, r in zip(conversations, reducers, strict=True)}
        call = _ChatLevels(self.model, params, top_logprobs)
        key = dataclasses.asdict(params) | {"top_logprobs": top_logprobs}
        values = await self._acached_batch(conversations, f"chat:{version}", key, call, lambda p: by_id[id(p)])
        return [v for v, _ in values]

    def completion_levels(
        self,
        prompts: Sequence[str],
        params: GenerationParams,
        top_logprobs: int | None,
        reducers: Sequence[Callable[[ChatReply], Any]],
        version: str,
    ) -> list[Any | LLMFailure]:
        """Each prompt continued on /completions (with `logprobs` unless None) and passed through its
        reducer as a `ChatReply` (the generated tokens with their top logprobs); the reducer's JSON
        value is what gets cached. The completions twin of `chat_levels`."""
        self._require_completions("completions with logprobs")
        by_id = {id(p): r for p, r in zip(prompts, reducers, strict=True)}
        call = _CompletionLevels(self.model, params, top_logprobs)
        key = dataclasses.asdict(params) | {"top_logprobs": top_logprobs}
        values = self._cached_batch(prompts, f"completion:{version}", key, call, lambda p: by_id[id(p)])
        return [v for v, _ in values]

    # -- machinery --------------------------------------------------------------------------------

    def _require_completions(self, what: str) -> None:
        if self.api != "completions":
            raise AtlasInputError(f"{what} needs the completions endpoint; this backend was made with api: chat")

    def _sampling(self, params: GenerationParams) -> dict[str, Any]:
        return _sampling(self.model, params)

    async def _aecho(
        self,
        prompts: Sequence[str],
        top_logprobs: int,
        reducers: Sequence[Callable[[EchoLogprobs, str], Any]],
        kind: str | None,
    ) -> list[Any | LLMFailure]:
        by_id = {id(p): r for p, r in zip(prompts, reducers, strict=True)}
        call = _Echo(self.model, top_logprobs, self.echo_max_tokens)
        # The raw echo (kind None) is for this process: it is what a client process would save us sending.
        values = await self._acached_batch(
            prompts, kind, {"top_logprobs": top_logprobs}, call, lambda p: by_id[id(p)], local=kind is None
        )
        return [v for v, _ in values]

    def run(self, make: Callable[[], Awaitable[T]]) -> T:
        """`await make()` from sync code inside one `session`: every request it makes through this
        backend, from however many calls of the async methods, shares one client and one limit."""

        async def main() -> T:
            async with self.session():
                return await make()

        return self._run_sync(main)

    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator[_Session]:
        """The client and the `max_concurrency` limit for requests made inside; a nested session is
        the outer one."""
        current = self._session.get()
        if current is not None:
            yield current
            return
        # A client per session: its connection pool belongs to this event loop, which `run` closes.
        client = AsyncOpenAI(
            api_key=os.environ.get(self.api_key_env) or NO_KEY,
            base_url=self.base_url,
            timeout=self.timeout_s,
            max_retries=0,
        )
        pool = self.start_client_processes(wait=False) if self.client_processes > 1 else None
        session = _Session(client, asyncio.Semaphore(self.max_concurrency), pool=pool)
        token = self._session.set(session)
        try:
            async with client:
                yield session
        finally:
            self._session.reset(token)

    def start_client_processes(self, wait: bool = True) -> ProcessPool | None:
        """The client processes (None with `client_processes` 1), started if they are not running or one
        has died; with `wait`, once each has made its client (the first session otherwise starts them,
        and its first requests wait for their imports)."""
        if self.client_processes < 2:
            return None
        with self._pool_lock:
            if self._pool is not None and self._pool.broken:
                self._pool.close()
                self._pool = None
            if self._pool is None:
                settings = _ClientSettings(self.base_url, self.api_key_env, self.timeout_s, self.retry_timeouts)
                self._pool = ProcessPool(self.client_processes, settings, name="openai-client")
            pool = self._pool
        if wait:
            pool.wait_ready()
        return pool

    def close(self) -> None:
        """Stop the client processes, if any (also done when the backend is garbage collected, and at
        exit); a later request starts them again."""
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()

    def _cached_batch(
        self,
        prompts: Sequence[Prompt],
        kind: str | None,
        key_params: dict[str, Any],
        call: Call,
        reducer_of: Callable[[Prompt], Any] | None = None,
    ) -> list[tuple[Any | LLMFailure, bool]]:
        """`_acached_batch` from sync code."""
        return self.run(lambda: self._acached_batch(prompts, kind, key_params, call, reducer_of))

    async def _acached_batch(
        self,
        prompts: Sequence[Prompt],
        kind: str | None,
        key_params: dict[str, Any],
        call: Call,
        reducer_of: Callable[[Prompt], Any] | None = None,
        on_result: Callable[[int, Any, bool], None] | None = None,
        local: bool = False,
    ) -> list[tuple[Any | LLMFailure, bool]]:
        """(JSON value or failure, whether it came from the cache) per prompt, in order, each also
        handed to `on_result(index, value, cached)` as soon as it is known; `kind` None caches nothing.
        Each prompt is asked with `call`, and its reply read with its reducer, `reducer_of(prompt)`
        (in a client process where the backend has them, unless `local`).
        The misses are asked at once under the session's limit, and each answer is stored as soon as
        it arrives, so a run stopped (or failed) mid-batch redoes nothing. The cache is read and
        written off the event loop, which keeps reading the other replies meanwhile. A request the
        same as one in flight in this session (two samples that wrote the same explanation) waits
        for that one's answer instead of asking again, as it would have found it in the cache."""
        cache = self.cache if kind is not None else None
        keys = [_key_text(p) for p in prompts]
        hits: list[Any | None] = [None] * len(prompts)
        if cache is not None:
            hits = await asyncio.to_thread(
                lambda: [cache.get(self._scope, self.model, kind, k, key_params) for k in keys]
            )
        self.usage.add(cache_hits=sum(h is not None for h in hits))
        async with self.session() as session:
            pool = None if local else session.pool

            async def ask(i: int) -> Any | LLMFailure:
                prompt = prompts[i]
                reducer = reducer_of(prompt) if reducer_of else None
                value = await self._with_retries(session, pool, call, prompt, reducer)
                if cache is not None and not isinstance(value, LLMFailure):
                    await asyncio.to_thread(cache.put, self._scope, self.model, kind, keys[i], key_params, value)
                return value

            async def one(i: int) -> tuple[Any | LLMFailure, bool]:
                if hits[i] is not None:
                    result: tuple[Any | LLMFailure, bool] = (hits[i], True)
                elif kind is None:
                    result = (await ask(i), False)
                elif (same := (kind, keys[i], json.dumps(key_params, sort_keys=True))) in session.pending:
                    result = (await session.pending[same], True)
                    self.usage.add(cache_hits=1)
                else:
                    session.pending[same] = task = asyncio.ensure_future(ask(i))
                    task.add_done_callback(lambda _, same=same: session.pending.pop(same, None))
                    result = (await task, False)
                if on_result is not None:
                    on_result(i, *result)
                return result

            return list(await asyncio.gather(*(one(i) for i in range(len(prompts)))))

    @staticmethod
    def _run_sync(make: Callable[[], Awaitable[T]]) -> T:
        """Run a coroutine to completion from sync code, even when this thread already runs a loop."""

        async def main() -> T:
            return await make()

        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(main())
        with ThreadPoolExecutor(max_workers=1) as pool:
            return pool.submit(asyncio.run, main()).result()

    async def _with_retries(
        self, session: _Session, pool: ProcessPool | None, call: Call, prompt: Prompt, reducer: Any
    ) -> Any | LLMFailure:
        reason = "no attempt made"
        for attempt in range(1, self.max_attempts + 1):
            outcome = None
            if pool is not None:
                outcome = await self._attempt_there(session, pool, call, prompt, reducer)
            if outcome is None:
                outcome = await self._attempt_here(session, call, prompt, reducer)
            if outcome.reason is None:
                return outcome.value
            reason = outcome.reason
            if not outcome.retry:
                return self._failure(reason, attempt)
            if attempt < self.max_attempts:
                if outcome.wait is not None:
                    delay = min(outcome.wait, self.max_retry_after_s)
                else:  # full jitter: uniform over [0, capped exponential]
                    delay = random.uniform(0, min(self.backoff_cap_s, self.backoff_base_s * 2 ** (attempt - 1)))
                log.info(
                    "%s: attempt %d failed (%s); retrying in %.2f s", self.model, attempt, self._scrub(reason), delay
                )
                await asyncio.sleep(delay)
        return self._failure(f"{reason} (gave up after {self.max_attempts} attempts)", self.max_attempts)

    async def _attempt_here(self, session: _Session, call: Call, prompt: Prompt, reducer: Any) -> _Outcome:
        """One attempt in this process: the request under the limit, its reply read after."""
        try:
            async with session.semaphore:  # held for the request only, not for the backoff sleep
                self.usage.add(requests=1)
                resp = await call.request(session.client, prompt, self)
            self._count_tokens(resp)
            return _Outcome(call.read(resp, prompt, reducer))
        except Exception as exc:
            if (outcome := _outcome_of(exc, self.timeout_s, self.retry_timeouts)) is None:
                raise
            return outcome

    async def _attempt_there(
        self, session: _Session, pool: ProcessPool, call: Call, prompt: Prompt, reducer: Any
    ) -> _Outcome | None:
        """One attempt in a client process (the limit held until its reduced value is back); None
        when the request cannot be sent there (its reducer is not importable), to run it here."""
        async with session.semaphore:
            try:  # packed once the slot is ours: what it says of the server is what is known now
                job = pool.pack(_Attempt(call, prompt, reducer, self._n_ignored))
            except NotPortable as exc:
                log.debug("%s: a request runs in this process, not a client process: %s", self.model, exc)
                return None
            self.usage.add(requests=1)
            outcome, tokens, n_ignored = await pool.run(job)
        if tokens is not None:
            self.usage.add(prompt_tokens=tokens[0], completion_tokens=tokens[1])
        if n_ignored and not self._n_ignored:
            log.info("%s: the server ignores n; sampling one choice per request", self.model)
            self._n_ignored = True
        return outcome

    def _count_tokens(self, resp: Any) -> None:
        prompt_tokens, completion_tokens = _tokens(resp)
        self.usage.add(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)

    def _failure(self, reason: str, attempts: int) -> LLMFailure:
        reason = self._scrub(reason)
        log.warning("%s: request failed after %d attempt(s): %s", self.model, attempts, reason)
        return LLMFailure(reason, attempts)

    def _scrub(self, text: str) -> str:
        """Remove the API key from text a server may have quoted it in."""
        return _scrub(text, self.api_key_env)


class _Json(dict):
    """A JSON object whose fields read as attributes too (None when absent), as the SDK's models do."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return self.get(name)


async def _json_body(call: Awaitable[Any]) -> Any:
    """The body of a raw SDK response as `_Json`, for the bulk logprob requests: building the SDK's
    models costs ~40 ms for one echoed prompt's logprobs, which caps a client at ~25 requests/s."""
    raw = await call
    return read_json(raw.http_response.content)


def read_json(content: bytes) -> Any:
    """A response body with attribute access where the parsers use it (the response, its choices,
    their message and logprobs, usage); deeper objects stay plain dicts. orjson reads an echo of a
    long prompt's top logprobs about 4x faster than `json`, which was most of the client's CPU per
    request; bodies orjson refuses (a server writing NaN or Infinity, as Python's json does) go
    through `json`."""
    try:
        body = orjson.loads(content)
    except orjson.JSONDecodeError:
        body = json.loads(content)
    if not isinstance(body, dict):
        return body
    out = _Json(body)
    if isinstance(usage := body.get("usage"), dict):
        out["usage"] = _Json(usage)
    if isinstance(choices := body.get("choices"), list):
        out["choices"] = [_choice(c) for c in choices]
    return out


def _choice(choice: Any) -> Any:
    if not isinstance(choice, dict):
        return choice
    out = _Json(choice)
    for name in ("message", "logprobs"):
        if isinstance(value := choice.get(name), dict):
            out[name] = _Json(value)
    return out


def _key_text(prompt: Prompt) -> str:
    """A prompt as cache key material: a chat prompt as canonical JSON of its turns."""
    return prompt if isinstance(prompt, str) else json.dumps(prompt, ensure_ascii=False, sort_keys=True)


def _messages(prompt: Prompt) -> Messages:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def _brief(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + "..."


def _merged(responses: list[Any]) -> Any:
    """Single-choice responses as one response of all their choices, with their usage summed."""

    def total(field: str) -> int:
        return sum(v for r in responses if isinstance(v := getattr(getattr(r, "usage", None), field, None), int))

    if any(not getattr(r, "choices", None) for r in responses):
        raise _Malformed("no choices in a response")
    choices = [r.choices[0].model_copy(update={"index": i}) for i, r in enumerate(responses)]
    usage = types.SimpleNamespace(prompt_tokens=total("prompt_tokens"), completion_tokens=total("completion_tokens"))
    return types.SimpleNamespace(choices=choices, usage=usage)


def _parse_completion(resp: Any, n: int, chat: bool) -> dict[str, Any]:
    """Texts and token counts, or `_Malformed` when the body is not a usable completion."""
    choices = getattr(resp, "choices", None)
    if not isinstance(choices, list) or not choices:
        raise _Malformed(f"no choices in the response (got {type(resp).__name__})")
    texts: list[str] = []
    truncated: list[bool] = []
    for choice in sorted(choices, key=lambda c: c.index if isinstance(getattr(c, "index", None), int) else 0):
        text = getattr(getattr(choice, "message", None), "content", None) if chat else getattr(choice, "text", None)
        if not isinstance(text, str):
            raise _Malformed("a choice has no text")
        texts.append(text)
        truncated.append(getattr(choice, "finish_reason", None) == "length")
    if len(texts) != n:
        raise _Malformed(f"{len(texts)} choices for n={n}")
    usage = getattr(resp, "usage", None)
    prompt_tokens = getattr(usage, "prompt_tokens", None)
    completion_tokens = getattr(usage, "completion_tokens", None)
    return {
        "texts": texts,
        "truncated": truncated,
        "prompt_tokens": prompt_tokens if isinstance(prompt_tokens, int) else 0,
        "completion_tokens": completion_tokens if isinstance(completion_tokens, int) else 0,
    }


def _parse_echo(resp: Any, prompt: str, generated_max: int) -> dict[str, Any]:
    """The prompt's tokens, top logprobs and offsets, trimmed of any generated token (`max_tokens=1`)."""
    choices = getattr(resp, "choices", None)
    if not isinstance(choices, list) or not choices:
        raise _Malformed(f"no choices in the response (got {type(resp).__name__})")
    lp = getattr(choices[0], "logprobs", None)
    tokens = getattr(lp, "tokens", None)
    if not tokens:
        raise _Fatal(NO_LOGPROBS)
    raw_top = getattr(lp, "top_logprobs", None)
    if not isinstance(raw_top, list) or len(raw_top) != len(tokens):
        raise _Fatal(NO_LOGPROBS if not raw_top else "top_logprobs and tokens differ in length")
    top = _TopLogprobs(raw_top)
    offsets = getattr(lp, "text_offset", None)
    offsets = [int(o) for o in offsets] if isinstance(offsets, list) and len(offsets) == len(tokens) else []
    keep = len(tokens)
    if generated_max > 0:
        if offsets:
            keep = sum(1 for o in offsets if o < len(prompt))
        else:
            usage = getattr(resp, "usage", None)
            generated = getattr(usage, "completion_tokens", None)
            if isinstance(generated, int) and 0 <= generated <= len(tokens):
                keep = len(tokens) - generated
            else:  # last resort: count characters until the prompt is covered
                covered, keep = 0, 0
                while keep < len(tokens) and covered < len(prompt):
                    covered += len(tokens[keep])
                    keep += 1
    return {"tokens": [str(t) for t in tokens[:keep]], "top_logprobs": top[:keep], "text_offset": offsets[:keep]}


_NUMBER = (int, float)  # a tuple: `isinstance(v, int | float)` builds the union for every candidate


def _finite_top(entry: dict[Any, Any]) -> dict[str, float]:
    """One position's top logprobs with finite numbers only, as {token: float}."""
    isfinite = math.isfinite
    return {str(t): float(v) for t, v in entry.items() if isinstance(v, _NUMBER) and isfinite(v)}


class _TopLogprobs(Sequence[dict[str, float]]):
    """Each echoed token's top logprobs (finite numbers only; {} for the first token's null), cleaned
    when read: a simulator reads a few positions of a long prompt, and cleaning every position cost
    more than the rest of the client's work on the reply."""

    def __init__(self, raw: Sequence[Any]):
        self._raw = raw

    def __len__(self) -> int:
        return len(self._raw)

    @overload
    def __getitem__(self, i: int) -> dict[str, float]: ...
    @overload
    def __getitem__(self, i: slice) -> _TopLogprobs: ...
    def __getitem__(self, i: int | slice) -> dict[str, float] | _TopLogprobs:
        if isinstance(i, slice):
            return _TopLogprobs(self._raw[i])
        entry = self._raw[i]
        if not isinstance(entry, dict):
            return {}
        return _finite_top(entry)


def _parse_next(resp: Any, prompt: Prompt) -> dict[str, Any]:
    """The top logprobs of the first generated token (legacy completions shape, or the chat-style
    `logprobs.content[]` some servers answer /completions with)."""
    choices = getattr(resp, "choices", None)
    if not isinstance(choices, list) or not choices:
        raise _Malformed(f"no choices in the response (got {type(resp).__name__})")
    lp = getattr(choices[0], "logprobs", None)
    raw_top = getattr(lp, "top_logprobs", None)
    if isinstance(raw_top, list) and raw_top and isinstance(raw_top[0], dict):
        entry = raw_top[0]
        return {"top": _finite_top(entry)}
    content = getattr(lp, "content", None) if lp is not None else None
    if content is None and isinstance(lp, dict):
        content = lp.get("content")
    if isinstance(content, list) and content:
        return {"top": _top_from_chat_entry(content[0])}
    raise _Fatal("server returned no logprobs for the generated token")


def _field(obj: Any, name: str) -> Any:
    return obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)


def _top_from_chat_entry(entry: Any) -> dict[str, float]:
    top: dict[str, float] = {}
    for cand in _field(entry, "top_logprobs") or []:
        token, value = _field(cand, "token"), _field(cand, "logprob")
        if isinstance(token, str) and isinstance(value, int | float) and math.isfinite(value):
            # Tokens that decode alike (e.g. partial UTF-8) keep the likelier one.
            top[token] = max(top.get(token, -math.inf), float(value))
    return top


def _parse_chat_reply(resp: Any, want_logprobs: bool) -> ChatReply:
    """The reply's text and, per generated token, its bytes and top logprobs."""
    parsed = _parse_completion(resp, 1, chat=True)
    choice = resp.choices[0]
    tokens: list[tuple[bytes, dict[str, float]]] = []
    if want_logprobs:
        lp = getattr(choice, "logprobs", None)
        content = _field(lp, "content") if lp is not None else None
        if not isinstance(content, list) or (not content and parsed["texts"][0]):
            raise _Fatal(NO_CHAT_LOGPROBS)
        tokens = _content_tokens(content)
    return ChatReply(
        text=parsed["texts"][0],
        tokens=tokens,
        truncated=parsed["truncated"][0],
        prompt_tokens=parsed["prompt_tokens"],
        completion_tokens=parsed["completion_tokens"],
    )


def _content_tokens(content: list) -> list[tuple[bytes, dict[str, float]]]:
    """Chat-style `logprobs.content[]` entries as (token bytes, top logprobs) per generated token."""
    tokens = []
    for entry in content:
        token, raw = _field(entry, "token"), _field(entry, "bytes")
        if isinstance(raw, list) and all(isinstance(b, int) and 0 <= b < 256 for b in raw):
            data = bytes(raw)
        elif isinstance(token, str):
            data = token.encode("utf-8")
        else:
            raise _Malformed("a logprobs entry has no token")
        tokens.append((data, _top_from_chat_entry(entry)))
    return tokens


def _parse_completion_reply(resp: Any, want_logprobs: bool) -> ChatReply:
    """A /completions answer as a `ChatReply`: its text and, per generated token, its bytes and top
    logprobs (the legacy `tokens`/`top_logprobs` arrays, or the chat-style `content[]` that llama.cpp's
    server answers /completions with)."""
    parsed = _parse_completion(resp, 1, chat=False)
    tokens: list[tuple[bytes, dict[str, float]]] = []
    if want_logprobs:
        lp = getattr(resp.choices[0], "logprobs", None)
        names, tops = _field(lp, "tokens"), _field(lp, "top_logprobs")
        content = _field(lp, "content") if lp is not None else None
        if isinstance(names, list) and isinstance(tops, list) and len(names) == len(tops) and names:
            for name, top in zip(names, tops, strict=True):
                tokens.append((str(name).encode("utf-8"), _finite_top(top or {})))
        elif isinstance(content, list) and content:
            tokens = _content_tokens(content)
        elif parsed["texts"][0]:
            raise _Fatal("server returned no logprobs for the generated tokens (set the simulator's logprobs: false)")
    return ChatReply(
        text=parsed["texts"][0],
        tokens=tokens,
        truncated=parsed["truncated"][0],
        prompt_tokens=parsed["prompt_tokens"],
        completion_tokens=parsed["completion_tokens"],
    )
