"""Text completion and echoed logprobs from any OpenAI-compatible server (OpenAI, vLLM, llama.cpp, Ollama).

Requests run concurrently (bounded by `max_concurrency`) under a synchronous `complete`, so the
pipeline stays plain Python. The SDK's own retries are off: ours retry 429 (honouring
Retry-After), 5xx, timeouts, connection errors and malformed bodies with exponential backoff and
full jitter, and then give up with an `LLMFailure` for that prompt only. Other 4xx fail at once:
retrying a bad request only costs money.

The API key is read from the environment at request time and never kept on the instance, written
to the cache, logged, or put in a failure reason (reasons are scrubbed of it, since a server may
quote the key back in an error body).
"""

from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import json
import logging
import math
import os
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import openai
from openai import AsyncOpenAI

from pipeline.errors import AtlasInputError
from pipeline.llm import Completion, EchoLogprobs, GenerationParams, LLMBackend, LLMFailure
from pipeline.llm_cache import LLMCache

log = logging.getLogger(__name__)

T = TypeVar("T")
DEFAULT_BASE_URL = "https://api.openai.com/v1"
NO_KEY = "not-needed"  # local servers ignore the key, but the SDK insists on one
NO_LOGPROBS = "server returned no logprobs (echo unsupported?)"


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
    """`complete` via /completions (or /chat/completions with `chat=True`); `echo_logprobs` via
    /completions with echo. Results are cached per request when a cache is given."""

    backend = "openai"

    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        *,
        api_key_env: str = "OPENAI_API_KEY",
        chat: bool = False,
        max_concurrency: int = 8,
        timeout_s: float = 60.0,
        max_attempts: int = 5,
        backoff_base_s: float = 0.5,
        backoff_cap_s: float = 30.0,
        max_retry_after_s: float = 120.0,
        echo_max_tokens: int = 0,
        cache: LLMCache | None = None,
    ):
        if max_concurrency < 1:
            raise AtlasInputError(f"max_concurrency must be at least 1, got {max_concurrency}")
        if max_attempts < 1:
            raise AtlasInputError(f"max_attempts must be at least 1, got {max_attempts}")
        if echo_max_tokens not in (0, 1):
            raise AtlasInputError(
                f"echo_max_tokens must be 0 or 1 (1 for servers that refuse 0), got {echo_max_tokens}"
            )
        self.model = model
        self.base_url = base_url or DEFAULT_BASE_URL
        self.api_key_env = api_key_env  # the variable's name only; its value is read per call
        self.chat = chat
        self.supports_echo = not chat
        self.max_concurrency = max_concurrency
        self.timeout_s = timeout_s
        self.max_attempts = max_attempts
        self.backoff_base_s = backoff_base_s
        self.backoff_cap_s = backoff_cap_s
        self.max_retry_after_s = max_retry_after_s
        self.echo_max_tokens = echo_max_tokens
        self.cache = cache
        self._scope = f"{self.backend}@{_public_url(self.base_url)}"  # different servers, different answers

    def __repr__(self) -> str:
        return (
            f"OpenAIBackend(model={self.model!r}, base_url={_public_url(self.base_url)!r}, "
            f"api_key_env={self.api_key_env!r}, chat={self.chat})"
        )

    # -- public API -------------------------------------------------------------------------------

    def complete(self, prompts: Sequence[str], params: GenerationParams) -> list[Completion | LLMFailure]:
        kind = "chat" if self.chat else "completion"
        key_params = dataclasses.asdict(params)

        def request(client: AsyncOpenAI, prompt: str) -> Awaitable[Any]:
            common: dict[str, Any] = {
                "model": self.model,
                "max_tokens": params.max_tokens,
                "temperature": params.temperature,
                "top_p": params.top_p,
                "n": params.n,
                "seed": params.seed,
            }
            if params.stop:
                common["stop"] = list(params.stop)
            if self.chat:
                return client.chat.completions.create(messages=[{"role": "user", "content": prompt}], **common)
            return client.completions.create(prompt=prompt, **common)

        def parse(resp: Any, prompt: str) -> dict[str, Any]:
            return _parse_completion(resp, params.n, chat=self.chat)

        values = self._cached_batch(prompts, kind, key_params, request, parse)
        return [v if isinstance(v, LLMFailure) else Completion.from_record(v, cached=c) for v, c in values]

    def echo_logprobs(self, prompts: Sequence[str], top_logprobs: int = 5) -> list[EchoLogprobs | LLMFailure]:
        if self.chat:
            raise AtlasInputError(
                "echo with logprobs needs the completions endpoint; this backend was made with chat=True"
            )

        def request(client: AsyncOpenAI, prompt: str) -> Awaitable[Any]:
            return client.completions.create(
                model=self.model,
                prompt=prompt,
                echo=True,
                logprobs=top_logprobs,
                max_tokens=self.echo_max_tokens,
                temperature=0,
            )

        def parse(resp: Any, prompt: str) -> dict[str, Any]:
            return _parse_echo(resp, prompt, self.echo_max_tokens)

        values = self._cached_batch(prompts, "echo", {"top_logprobs": top_logprobs}, request, parse)
        return [
            v if isinstance(v, LLMFailure) else EchoLogprobs(v["tokens"], v["top_logprobs"], v["text_offset"])
            for v, _ in values
        ]

    # -- machinery --------------------------------------------------------------------------------

    def _cached_batch(
        self,
        prompts: Sequence[str],
        kind: str,
        key_params: dict[str, Any],
        request: Callable[[AsyncOpenAI, str], Awaitable[Any]],
        parse: Callable[[Any, str], dict[str, Any]],
    ) -> list[tuple[dict[str, Any] | LLMFailure, bool]]:
        """(JSON value or failure, whether it came from the cache) per prompt, in order."""
        out: list[tuple[dict[str, Any] | LLMFailure, bool] | None] = [None] * len(prompts)
        misses: list[int] = []
        for i, prompt in enumerate(prompts):
            hit = self.cache.get(self._scope, self.model, kind, prompt, key_params) if self.cache else None
            if hit is not None:
                out[i] = (hit, True)
            else:
                misses.append(i)
        if misses:
            results = self._run_sync(lambda: self._gather([prompts[i] for i in misses], request, parse))
            for i, result in zip(misses, results, strict=True):
                if self.cache is not None and not isinstance(result, LLMFailure):
                    self.cache.put(self._scope, self.model, kind, prompts[i], key_params, result)
                out[i] = (result, False)
        return [r for r in out if r is not None]

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

    async def _gather(
        self,
        prompts: list[str],
        request: Callable[[AsyncOpenAI, str], Awaitable[Any]],
        parse: Callable[[Any, str], dict[str, Any]],
    ) -> list[dict[str, Any] | LLMFailure]:
        # A client per call: its connection pool belongs to this event loop, which asyncio.run closes.
        semaphore = asyncio.Semaphore(self.max_concurrency)
        client = AsyncOpenAI(
            api_key=os.environ.get(self.api_key_env) or NO_KEY,
            base_url=self.base_url,
            timeout=self.timeout_s,
            max_retries=0,
        )
        async with client:
            return list(
                await asyncio.gather(*(self._with_retries(client, semaphore, p, request, parse) for p in prompts))
            )

    async def _with_retries(
        self,
        client: AsyncOpenAI,
        semaphore: asyncio.Semaphore,
        prompt: str,
        request: Callable[[AsyncOpenAI, str], Awaitable[Any]],
        parse: Callable[[Any, str], dict[str, Any]],
    ) -> dict[str, Any] | LLMFailure:
        reason = "no attempt made"
        for attempt in range(1, self.max_attempts + 1):
            wait: float | None = None
            try:
                async with semaphore:  # held for the request only, not for the backoff sleep
                    resp = await request(client, prompt)
                return parse(resp, prompt)
            except openai.APIStatusError as exc:
                reason = f"HTTP {exc.status_code}: {_brief(exc.message)}"
                if exc.status_code == 429:
                    wait = retry_after_seconds(exc.response.headers)
                elif exc.status_code < 500:
                    return self._failure(reason, attempt)
            except openai.APITimeoutError:
                reason = f"timed out after {self.timeout_s:g} s"
            except openai.APIConnectionError as exc:
                reason = f"connection error: {_brief(str(exc))}"
            except (openai.APIResponseValidationError, json.JSONDecodeError, _Malformed) as exc:
                reason = f"malformed response: {_brief(str(exc))}"
            except _Fatal as exc:
                return self._failure(str(exc), attempt)
            if attempt < self.max_attempts:
                if wait is not None:
                    delay = min(wait, self.max_retry_after_s)
                else:  # full jitter: uniform over [0, capped exponential]
                    delay = random.uniform(0, min(self.backoff_cap_s, self.backoff_base_s * 2 ** (attempt - 1)))
                log.info(
                    "%s: attempt %d failed (%s); retrying in %.2f s", self.model, attempt, self._scrub(reason), delay
                )
                await asyncio.sleep(delay)
        return self._failure(f"{reason} (gave up after {self.max_attempts} attempts)", self.max_attempts)

    def _failure(self, reason: str, attempts: int) -> LLMFailure:
        reason = self._scrub(reason)
        log.warning("%s: request failed after %d attempt(s): %s", self.model, attempts, reason)
        return LLMFailure(reason, attempts)

    def _scrub(self, text: str) -> str:
        """Remove the API key from text a server may have quoted it in."""
        key = os.environ.get(self.api_key_env)
        return text.replace(key, "<api key>") if key else text


def _brief(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + "..."


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
    top: list[dict[str, float]] = []
    for entry in raw_top:  # null for the first token: nothing precedes it
        top.append(
            {str(t): float(v) for t, v in (entry or {}).items() if isinstance(v, int | float) and math.isfinite(v)}
        )
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
